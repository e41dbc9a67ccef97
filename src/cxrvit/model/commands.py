"""``cxrvit export``: thin CLI over :func:`cxrvit.model.export.export_bundle`."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained model (dino .pth, safetensors, onnx) with labels, thresholds, preprocessing",
        description="Export a model bundle. The head keeps only --labels (in that order).")
    p.add_argument("--model", required=True, metavar="RUN", help="model bundle folder (model.safetensors + bundle.json)")
    p.add_argument("--format", default="dino", choices=("dino", "safetensors", "onnx"),
                   help="dino: plain DINO-layout state_dict (torch.save) + <out>.json; safetensors: metadata "
                        "in the header; onnx: grey [B,1,H,W] in 0..1 -> logits, probabilities (+ <out>.json)")
    p.add_argument("--labels", default=None,
                   help="comma-separated labels to keep, e.g. Atelectasis,Effusion,Mass/Nodule (default: all)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--dynamic-size", action="store_true",
                   help="onnx only: accept any H, W that are multiples of 16 (default: the bundle's size)")
    p.add_argument("--opset", type=int, default=18, help="onnx opset (default 18)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from cxrvit.model.export import export_bundle

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    if args.dynamic_size and args.format != "onnx":
        print("cxrvit export: --dynamic-size applies to --format onnx only", file=sys.stderr)
        return 2
    try:
        result = export_bundle(args.model, args.out, args.format, labels,
                               dynamic_size=args.dynamic_size, opset=args.opset)
    except (ValueError, FileNotFoundError) as e:
        print(f"cxrvit export: {e}", file=sys.stderr)
        return 2
    meta = result.metadata
    print(f"wrote {result.weights} ({args.format}, labels: {', '.join(meta['labels'])})")
    if result.metadata_path:
        print(f"wrote {result.metadata_path}")
    for note in result.notes:
        print(note)
    return 0
