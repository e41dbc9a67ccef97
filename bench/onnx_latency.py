"""Per-image CPU latency of ViT-S/16: PyTorch eager vs onnxruntime, batch 1 and 16 (p50 / p95).

The ONNX graph is the one ``cxrvit export --format onnx`` writes (grey input, normalisation folded
into the patch filter, fixed size); it is checked against PyTorch before timing. Per-image latency
is a call's wall time divided by its batch size; p50 / p95 are over the timed calls.

    .venv/bin/python bench/onnx_latency.py                       # random ViT-S weights
    .venv/bin/python bench/onnx_latency.py --model RUN           # a trained bundle
    .venv/bin/python bench/onnx_latency.py --write docs/history/benchmarks.md
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrvit.data.preprocess import Preprocessing  # noqa: E402
from cxrvit.inference.export import export_onnx, verify_onnx  # noqa: E402
from cxrvit.model.vit import vit_small  # noqa: E402


def latencies(fn, batch: int, calls: int, warmup: int = 2) -> np.ndarray:
    """Per-image milliseconds of each timed call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000 / batch)
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", metavar="RUN", help="model bundle (default: random ViT-S/16 weights, 15 labels)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--calls", type=int, default=20, help="timed calls at batch 1 (larger batches: calls / batch, >= 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--write", metavar="MD", help="replace the ONNX latency section of this markdown file")
    args = ap.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    if args.model:
        from cxrvit.inference.bundle import load_bundle
        bundle = load_bundle(args.model)
        model, pre = bundle.model, bundle.preprocessing
    else:
        torch.manual_seed(0)
        model, pre = vit_small(num_classes=15), Preprocessing(size=args.size)
    model.eval()
    size = pre.size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        export_onnx(model, path, pre, size=size)
        export_s = time.perf_counter() - t
        diff = verify_onnx(path, model, pre, sizes=[(size, size)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        rows = ["| runtime | batch | calls | p50 ms/image | p95 ms/image | images/s (p50) |", "|---|---|---|---|---|---|"]
        print(f"export {export_s:.0f} s; onnxruntime vs torch max |logit diff| {diff:.2e}", flush=True)
        print("\n".join(rows), flush=True)
        for batch in args.batches:
            calls = args.calls if batch == 1 else max(5, args.calls // batch)
            grey = torch.rand(batch, 1, size, size)
            feed = {"grey": grey.numpy()}

            @torch.no_grad()
            def eager():
                model(pre.normalize(grey))

            for name, fn in (("torch eager fp32", eager), (f"onnxruntime {ort.__version__}",
                                                            lambda: session.run(["logits"], feed))):
                ms = latencies(fn, batch, calls)
                p50, p95 = np.percentile(ms, 50), np.percentile(ms, 95)
                rows.append(f"| {name} | {batch} | {calls} | {p50:.1f} | {p95:.1f} | {1000 / p50:.1f} |")
                print(rows[-1], flush=True)

    load = os.getloadavg()[0]
    section = "\n".join([
        "<!-- bench:onnx start -->",
        f"Machine: {os.cpu_count()}-core CPU, {args.threads} threads, shared with other jobs "
        f"(load average {load:.1f} at the end of the run). torch {torch.__version__}, onnxruntime {ort.__version__}.",
        f"Command: `.venv/bin/python bench/onnx_latency.py{' --model ' + args.model if args.model else ''}"
        f"{f' --threads {args.threads}' if args.threads != os.cpu_count() else ''}` "
        f"({'bundle' if args.model else 'random ViT-S/16 weights'}, {size} px, fp32).",
        f"ONNX export took {export_s:.0f} s; onnxruntime vs PyTorch: max |logit difference| {diff:.2e}.",
        "",
        *rows,
        "<!-- bench:onnx end -->",
    ])
    if args.write:
        text = open(args.write).read() if os.path.exists(args.write) else ""
        pattern = re.compile(r"<!-- bench:onnx start -->.*?<!-- bench:onnx end -->", re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        with open(args.write, "w") as f:
            f.write(text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
