"""Subcommands of the inference part: ``cxrvit predict``, ``cxrvit dicom-info`` and ``cxrvit export``.

Each handler imports what it runs inside itself: those modules pull in torch, pydicom and PIL, and
``cxrvit --help`` (which imports every commands module) should not pay for them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: Side of the picture under the heat-maps (the maps themselves are at the model's resolution).
OVERLAY_SIZE = 448

DICOM_INFO_FIELDS = (
    ("patient_name", "Patient name"), ("patient_id", "Patient ID"), ("age", "Age"), ("sex", "Sex"),
    ("modality", "Modality"), ("body_part", "Body part"), ("view_position", "View position"),
    ("size", "Image size"), ("bits", "Bits (stored/allocated)"), ("photometric", "Photometric"),
    ("spacing", "Pixel spacing (mm)"), ("transfer_syntax", "Transfer syntax"), ("sop_class", "SOP class"),
    ("header_problems", "Header problems"), ("qc", "QC flags"), ("decode_error", "Pixel data"),
)


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="score PNG/JPEG/DICOM files with a model bundle",
                              description="Score images; one output row per input file. Exit code 1 if any "
                                          "file could not be read (the others are still scored).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders (recursive) or .txt lists of paths")
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle folder (bundle.json + weights)")
    p.add_argument("--out", default="predictions.csv", help="output .csv or .json (default predictions.csv)")
    p.add_argument("--heatmaps", metavar="DIR", help="write an explanation overlay PNG per image here")
    p.add_argument("--target", help="label for Grad-CAM (default: each image's most probable label)")
    p.add_argument("--per-head", action="store_true", help="overlays also show each attention head")
    p.add_argument("--report", nargs="?", const="full", choices=("short", "full"),
                   help="print a templated preliminary report per image (default form: full)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with a 90%% centre zoom, as validation does (default: as the bundle's thresholds were tuned)")
    p.add_argument("--no-fix-inverted", dest="fix_inverted", action="store_false",
                   help="score images QC finds inverted as they are (default: re-invert them, flag auto_inverted)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_predict)

    d = subparsers.add_parser("dicom-info", help="print the header summary of DICOM files")
    d.add_argument("files", nargs="+", metavar="FILE")
    d.add_argument("--preview", metavar="OUT.png", help="write the decoded image (several files: OUT-<name>.png)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=run_dicom_info)

    e = subparsers.add_parser(
        "export", help="export a trained model (dino .pth, safetensors, onnx) with labels, thresholds, preprocessing",
        description="Export a model bundle. The head keeps only --labels (in that order).")
    e.add_argument("--model", required=True, metavar="RUN", help="model bundle folder (model.safetensors + bundle.json)")
    e.add_argument("--format", default="dino", choices=("dino", "safetensors", "onnx"),
                   help="dino: plain DINO-layout state_dict (torch.save) + <out>.json (model.pth -> "
                        "model.pth.json); safetensors: metadata in the header; onnx: grey [B,1,H,W] in 0..1 -> "
                        "logits, probabilities (+ <out>.json)")
    e.add_argument("--labels", default=None,
                   help="comma-separated labels to keep, e.g. Atelectasis,Effusion,Mass/Nodule (default: all)")
    e.add_argument("--out", required=True, help="output file")
    e.add_argument("--dynamic-size", action="store_true",
                   help="onnx only: accept any H, W that are multiples of 16 (default: the bundle's size)")
    e.add_argument("--opset", type=int, default=18, help="onnx opset (default 18)")
    e.set_defaults(func=run_export)


# -- predict -----------------------------------------------------------------------------------

def run_predict(args: argparse.Namespace) -> int:
    # In the handler, not at the top: keeps `cxrvit --help` from importing torch (module docstring).
    from cxrvit.inference.bundle import load_bundle
    from cxrvit.inference.predict import PredictionWriter, collect_inputs, predict_files

    if Path(args.out).suffix.lower() not in (".csv", ".json"):
        print(f"error: --out {args.out}: must end in .csv or .json", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.model, device=args.device)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: cannot load model bundle: {exc}", file=sys.stderr)
        return 2
    if args.target and args.target not in bundle.labels:
        print(f"error: --target {args.target!r} is not one of the bundle's labels: {', '.join(bundle.labels)}",
              file=sys.stderr)
        return 2
    try:
        paths = collect_inputs(args.inputs)
    except ValueError as exc:  # a .txt list that is not readable text
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print("error: no input files found", file=sys.stderr)
        return 2
    try:  # before any scoring, as --out below: a --heatmaps path that is a file fails now
        callbacks = [_heatmap_writer(bundle, Path(args.heatmaps), args.target, args.per_head)] if args.heatmaps else []
    except OSError as exc:
        why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"error: --heatmaps {args.heatmaps}: cannot create the folder ({why})", file=sys.stderr)
        return 2
    reports: dict[str, str] = {}
    if args.report:
        callbacks.append(_report_writer(bundle, reports, full=args.report == "full"))

    def on_batch(loaded, probs):
        for callback in callbacks:
            callback(loaded, probs)

    try:  # before any scoring: an --out that cannot be written fails now, not after the last file
        writer = PredictionWriter(args.out, bundle.labels)
    except OSError as exc:
        why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"error: --out {args.out}: cannot write it ({why})", file=sys.stderr)
        return 2
    try:
        with writer:  # each batch's rows are appended as it finishes; leaving the block ends the file
            rows = predict_files(bundle, paths, batch_size=args.batch_size, tta=args.tta,
                                 fix_inverted=args.fix_inverted, progress=not args.no_progress,
                                 on_batch=on_batch if callbacks else None, on_rows=writer.write,
                                 display_size=OVERLAY_SIZE if args.heatmaps else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {writer.count} of {len(paths)} files written to {writer.path}", file=sys.stderr)
        return 130
    out = writer.path
    failed = [r for r in rows if r.status != "ok"]
    flagged = [r for r in rows if r.qc_flags]
    print(f"scored {len(rows) - len(failed)} of {len(rows)} files -> {out}"
          f" ({len(flagged)} with QC flags, {len(failed)} failed)")
    for r in failed:
        print(f"  failed: {r.error}", file=sys.stderr)
    for r in rows:
        if r.path in reports:
            print(f"\n== {r.path}\n{reports[r.path]}")
    return 1 if failed else 0


def _report_writer(bundle, reports: dict[str, str], full: bool):
    """A callback for predict_files that fills ``reports`` (path -> text) for each scored image."""
    # Only when --report is asked for: the explanation maps import the heat-map code (and torch).
    from cxrvit.inference import prelim_report
    from cxrvit.inference.findings import explain_findings, labels_to_explain

    def write(loaded, probs: np.ndarray) -> None:
        per_image = [dict(zip(bundle.labels, map(float, p))) for p in probs]
        chosen = [labels_to_explain(p, bundle.thresholds) for p in per_image]
        explained = explain_findings(bundle, [img.square for img in loaded], probs, chosen,
                                     [img.placement for img in loaded])
        for img, p, e in zip(loaded, per_image, explained):
            calls = prelim_report.assess(p, bundle.thresholds, e.peaks)
            reports[str(img.path)] = prelim_report.render(calls, img.flags, full=full)

    return write


def _heatmap_writer(bundle, folder: Path, target: str | None, per_head: bool):
    """A callback for predict_files that draws an overlay per scored image."""
    import torch

    # Only when --heatmaps is asked for: matplotlib and torch, which `cxrvit --help` should not import.
    from cxrvit.inference import heatmaps, scoring

    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()

    def write(loaded, probs: np.ndarray) -> None:
        grey = torch.from_numpy(np.stack([img.square for img in loaded])).unsqueeze(1)
        x = scoring.model_input(grey.to(next(bundle.model.parameters()).device), bundle.preprocessing)
        idx = [bundle.labels.index(target) if target else int(np.argmax(p)) for p in probs]
        maps = heatmaps.explain(bundle.model, x, idx, per_head=per_head)
        for i, img in enumerate(loaded):
            p = {label: float(v) for label, v in zip(bundle.labels, probs[i])}
            findings = [k for k, v in p.items() if v >= bundle.thresholds.get(k, 0.5)]
            name = img.path.stem
            while name in used:  # same stem in different folders
                name += "_"
            used.add(name)
            shown = img.display if img.display is not None else img.square
            heatmaps.save_overlay(folder / f"{name}.png", shown, {k: v[i] for k, v in maps.items()},
                                  heatmaps.caption_for(p, findings, bundle.labels[idx[i]], img.flags),
                                  title=str(img.path))

    return write


# -- dicom-info --------------------------------------------------------------------------------

def _preview_path(preview: Path, src: Path, many: bool, used: set[str]) -> Path:
    """OUT.png for one file; OUT-<name>.png for several, where files of one name in different folders get
    OUT-<name>_.png and so on instead of overwriting each other's preview."""
    if not many:
        return preview
    name = src.stem
    while name in used:
        name += "_"
    used.add(name)
    return preview.with_name(f"{preview.stem}-{name}.png")


def run_dicom_info(args: argparse.Namespace) -> int:
    from PIL import Image

    # In the handler, not at the top: pydicom and PIL stay out of `cxrvit --help` (module docstring).
    from cxrvit.data import images
    from cxrvit.data.dicom import is_dicom_file
    from cxrvit.data.images import ImageReadError
    from cxrvit.inference.qc import dicom_summary

    many = len(args.files) > 1
    # One file's preview is saved under the name as given (several get OUT-<name>.png): checked before any file is
    # read, as a name Pillow cannot save to ended the run with a traceback and lost the summaries.
    preview_format = Image.registered_extensions().get(Path(args.preview).suffix.lower()) if args.preview else None
    if args.preview and not many and preview_format not in Image.SAVE:
        print(f"error: --preview {args.preview}: not an image file name Pillow can write (e.g. OUT.png)",
              file=sys.stderr)
        return 2
    failures = 0
    results = []
    used: set[str] = set()
    for name in args.files:
        path = Path(name)
        try:
            if path.is_dir():
                raise ImageReadError(path, "is a folder: name its files (e.g. FOLDER/*.dcm)")
            if not path.is_file():
                raise ImageReadError(path, "no such file")
            if not is_dicom_file(path):
                raise ImageReadError(path, "not a DICOM file (content not recognised)")
            info = dicom_summary(path)
            if info["decode_error"]:
                failures += 1
            elif args.preview:
                out = _preview_path(Path(args.preview), path, many, used)
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images.to_uint8(images.read_grey(path))).save(out)
                info["preview"] = str(out)
            results.append(info)
        except (ImageReadError, OSError) as exc:
            failures += 1
            results.append({"path": str(path), "error": str(exc)})
    if args.json:
        print(json.dumps(results if many else results[0], indent=2))
    else:
        for info in results:
            print(info["path"])
            if "error" in info:
                print(f"  error: {info['error']}")
                continue
            for key, label in DICOM_INFO_FIELDS:
                value = info.get(key)
                if isinstance(value, list):
                    value = ", ".join(value) or "none"
                print(f"  {label:<24} {value if value not in (None, '') else '-'}")
            if "preview" in info:
                print(f"  {'Preview':<24} {info['preview']}")
    return 1 if failures else 0


# -- export ------------------------------------------------------------------------------------

def run_export(args: argparse.Namespace) -> int:
    # In the handler, not at the top: torch and safetensors stay out of `cxrvit --help` (module docstring).
    from cxrvit.inference.export import export_bundle

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
