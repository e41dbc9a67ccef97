"""``cxrvit serve``: a thin CLI over :func:`cxrvit.serve.app.create_app`, run by uvicorn."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NO_MODEL = ("error: cxrvit serve needs a trained model bundle: --model RUN (a folder with bundle.json and "
            "model.safetensors).\n"
            "  To get one: bash scripts/run_sample.sh  (trains on the bundled NIH sample; writes runs/sample/run)\n"
            "  then:       cxrvit serve --model runs/sample/run")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="web viewer + JSON API for one model bundle",
                              description="Serve the reading-room page and the API (POST /api/predict, GET "
                                          "/api/model, /healthz, OpenAPI at /docs). Binds to 127.0.0.1 by default.")
    p.add_argument("--model", metavar="RUN", help="model bundle folder (e.g. runs/sample/run)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest accepted upload (default 64)")
    p.add_argument("--max-pending", type=int, default=16,
                   help="predictions admitted at once, running + queued; more get 503 (default 16)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than this, from the header before decoding (default "
                        "50000000: 50 megapixels, above any real chest radiograph)")
    p.add_argument("--show-identifiers", action="store_true",
                   help="show DICOM patient name and ID on the page (hidden by default)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the explanation maps (faster)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if not args.model:
        print(NO_MODEL, file=sys.stderr)
        return 2
    if args.max_pixels is not None and args.max_pixels < 1:
        print(f"error: --max-pixels {args.max_pixels}: must be a positive number of pixels", file=sys.stderr)
        return 2
    if args.max_pending < 1:  # a server that admits none answers every prediction "busy"
        print(f"error: --max-pending {args.max_pending}: must be at least 1", file=sys.stderr)
        return 2
    if not args.max_upload_mb > 0:  # nor does one that refuses every upload as too large
        print(f"error: --max-upload-mb {args.max_upload_mb:g}: must be a positive number of MB", file=sys.stderr)
        return 2
    # In the handler: fastapi/uvicorn (and torch behind the bundle) stay out of `cxrvit --help`, and a
    # broken web install is reported here, as an error naming what to reinstall.
    try:
        import uvicorn

        from cxrvit.serve.app import create_app
        from cxrvit.serve.analysis import Settings
    except ImportError as exc:
        print(f"error: cxrvit serve needs fastapi, uvicorn and python-multipart ({exc}); "
              "reinstall cxrvit (pip install -e .)", file=sys.stderr)
        return 2
    from cxrvit.inference.bundle import load_bundle  # in the handler: torch stays out of `cxrvit --help`

    try:
        bundle = load_bundle(args.model, device=args.device)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: cannot load model bundle: {exc}\n\n{NO_MODEL}", file=sys.stderr)
        return 2
    settings = Settings(max_upload_bytes=int(args.max_upload_mb * 2**20), show_identifiers=args.show_identifiers,
                        heatmaps=not args.no_heatmaps)
    if args.max_pixels is not None:
        settings.max_pixels = args.max_pixels
    app = create_app(bundle, source=str(Path(args.model).resolve()), settings=settings, max_pending=args.max_pending)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: the viewer has no login; anyone who can reach this port can "
              "upload images", file=sys.stderr)
    print(f"cxrvit serve: model {args.model} ({len(bundle.labels)} labels) -> http://{args.host}:{args.port}/ "
          f"(API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
