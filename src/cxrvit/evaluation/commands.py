"""``cxrvit eval`` and ``cxrvit compare``: thin layers over the library (``cxrvit bench``: experiments/commands.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a trained model bundle on a prepared cache",
                              description="Per-label F1 at the bundle's thresholds (tuned on validation or "
                                          "cross-fitted predictions, never the scored images), F1 at 0.5, trivial F1, "
                                          "AUROC/AP with patient-bootstrap 95% CIs, confusion counts.")
    p.add_argument("--model", required=True, metavar="RUN", help="model bundle folder (bundle.json + model.safetensors)")
    _common(p)
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON to this file")
    p.add_argument("--report", metavar="DIR", help="write report.md and ROC/PR/reliability/F1 plots into DIR")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("compare", help="paired patient bootstrap of the difference between two bundles",
                              description="B − A in F1 (scored targets and their mean) and AUROC, on the same images.")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    _common(p, splits=("test", "all"))
    p.add_argument("--json", metavar="OUT", help="write the comparison as JSON to this file")
    p.set_defaults(func=cmd_compare)


def _common(p, splits=("test", "val", "all")) -> None:
    p.add_argument("--data", required=True, metavar="CACHE", help="prepared (labelled) cache folder")
    p.add_argument("--split", default="test", choices=splits,
                   help="test: NIH's official test list (needs a cache with the split lists); "
                        + ("val: the images the thresholds were tuned on (F1 marked in-sample); " if "val" in splits
                           else "") + "all: every image in the cache (e.g. another dataset)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="patient bootstrap resamples")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--allow-unverified-thresholds", action="store_true",
                   help="score a bundle that does not record its threshold-tuning images (marked in the report)")


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_eval(args) -> int:
    from cxrvit.evaluation.evaluate import evaluate_run
    from cxrvit.evaluation.report import markdown, provenance_line, write_report

    try:
        result = evaluate_run(args.model, args.data, args.split, n_resamples=args.bootstrap, seed=args.seed,
                              device=args.device, batch_size=args.batch_size,
                              allow_unverified_thresholds=args.allow_unverified_thresholds,
                              progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return _fail(exc)
    print(markdown(result, title=f"cxrvit eval: {args.model} on {args.data} ({args.split})", plots=False))
    if result.provenance.get("in_sample") or not result.provenance.get("verified"):
        print("warning: " + provenance_line(result.provenance).replace("**", ""), file=sys.stderr)
    if result.info.get("input_note"):
        print("note: " + result.info["input_note"], file=sys.stderr)
    if args.json:
        _write_json(args.json, result.to_json())
    if args.report:
        path = write_report(result, args.report, title=f"cxrvit eval: {args.model} ({args.split})")
        print(f"report: {path}")
    return 0


def cmd_compare(args) -> int:
    from cxrvit.evaluation.compare import compare_runs

    try:
        c = compare_runs(args.run_a, args.run_b, args.data, args.split, n_resamples=args.bootstrap, seed=args.seed,
                         device=args.device, batch_size=args.batch_size,
                         allow_unverified_thresholds=args.allow_unverified_thresholds, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return _fail(exc)
    print(c.markdown())
    if args.json:
        _write_json(args.json, c.to_json())
    return 0


def _write_json(path: str, obj: dict) -> None:
    """Write ``--json`` output, creating its folder (the numbers took a bootstrap to get: do not lose them to a
    missing folder). allow_nan=False: to_json maps undefined numbers to null, and a NaN that slips past it
    fails here instead of writing a file that strict JSON parsers reject."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2, allow_nan=False))
