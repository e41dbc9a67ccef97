"""ViT-S/16 throughput against the measured matrix-multiply ceiling of this machine.

One run measures
1. the ceiling: fp32 and bf16 ``torch.mm`` / ``torch.bmm`` throughput on the model's own layer shapes
   (qkv, proj, fc1, fc2 and the two attention products of one forward at the benchmark batch),
   aggregated with the weights they have in the model;
2. ViT-S/16 forward (eval, no grad) and train-step (forward + backward + AdamW) throughput at
   224 and 128 px, fp32 and bf16 autocast, for cxrvit's model (SDPA attention) and a plain
   DINO-style implementation (explicit softmax), loaded with the same weights;
3. model FLOP utilisation: 4.6 GMAC = 9.2 GFLOP per forward image at 224 px (x3 for a train
   step: 27.6 GFLOP), scaled by the token count at 128 px (65 / 197), divided by the ceiling.

    .venv/bin/python bench/model.py                   # default: a few minutes on 2 cores
    .venv/bin/python bench/model.py --write docs/history/benchmarks.md
    .venv/bin/python bench/model.py --device cuda --sizes 224 --batch 64 --repeats 20 --json F  # bench/gpu.sh

On CUDA every timed call ends with ``torch.cuda.synchronize()``, the CPU-time columns are left out
(they measure the launching thread, not the GPU), and the ceiling table gains a large square bf16
``torch.mm`` (8192^3), the practical peak of the GPU, as a second MFU denominator.
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json
import platform
import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from cxrvit.model.vit import vit_small

GFLOP_FWD_224 = 9.2  # 4.6 GMAC (DINO's count for ViT-S/16 at 224 px)
DEVICE = torch.device("cpu")  # set by --device; every tensor of a measurement lives here


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def gflop_per_image(size: int, train: bool) -> float:
    tokens = (size // 16) ** 2 + 1
    return GFLOP_FWD_224 * tokens / 197 * (3 if train else 1)


# -- a plain DINO-style ViT-S: explicit softmax, no fused kernels -----------------------------------
class PlainAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = PlainAttention(dim, heads)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainViT(nn.Module):
    """Same state_dict as cxrvit's; fixed 224-px position table, interpolated for other sizes."""

    def __init__(self, num_classes: int, dim: int = 384, depth: int = 12, heads: int = 6):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 197, dim))
        self.blocks = nn.ModuleList(PlainBlock(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if h != 224 or w != 224:
            grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid, size=(h // 16, w // 16), mode="bicubic", align_corners=False)
            pos = torch.cat((pos[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


# -- timing ----------------------------------------------------------------------------------------
@dataclass
class Timing:
    wall: float  # median wall seconds per call
    cpu: float   # median CPU seconds per call, all threads of this process


def timeit(fn, repeats: int, warmup: int = 1) -> Timing:
    """Medians of wall and process-CPU time per call.

    On a machine shared with other jobs the wall time measures the contention as much as the code;
    CPU time counts only the time our threads were on a core, so throughput per CPU-second is the
    steadier figure (it still includes cache interference and any spin-waiting).
    """
    for _ in range(warmup if DEVICE.type == "cpu" else max(warmup, 3)):
        fn()
    _sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return Timing(statistics.median(wall), statistics.median(cpu))


def layer_shapes(batch: int, size: int, dim: int = 384, heads: int = 6, depth: int = 12):
    """(name, kind, shape, count) of every matrix product in one forward; kind mm: (M, K, N), bmm: (B, M, K, N)."""
    t = (size // 16) ** 2 + 1
    m = batch * t
    return [
        ("patch_embed", "mm", (batch * (t - 1), 768, dim), 1),
        ("qkv", "mm", (m, dim, 3 * dim), depth), ("proj", "mm", (m, dim, dim), depth),
        ("fc1", "mm", (m, dim, 4 * dim), depth), ("fc2", "mm", (m, 4 * dim, dim), depth),
        ("q@k^T", "bmm", (batch * heads, t, dim // heads, t), depth),
        ("attn@v", "bmm", (batch * heads, t, t, dim // heads), depth),
    ]


def ceiling(batch: int, size: int, dtype: torch.dtype, repeats: int) -> tuple[Timing, dict]:
    """GFLOP per wall-second and per CPU-second of the model's matmuls at ``dtype``, aggregated as
    one forward (total FLOP / total time, each product weighted by how often the model runs it)."""
    total_flop, wall, cpu, per = 0.0, 0.0, 0.0, {}
    for name, kind, shape, count in layer_shapes(batch, size):
        if kind == "mm":
            m, k, n = shape
            a, b = torch.randn(m, k, dtype=dtype, device=DEVICE), torch.randn(k, n, dtype=dtype, device=DEVICE)
            t = timeit(lambda: torch.mm(a, b), repeats)
            flop = 2 * m * k * n
        else:
            bb, m, k, n = shape
            a, b = (torch.randn(bb, m, k, dtype=dtype, device=DEVICE),
                    torch.randn(bb, k, n, dtype=dtype, device=DEVICE))
            t = timeit(lambda: torch.bmm(a, b), repeats)
            flop = 2 * bb * m * k * n
        per[name] = flop / t.wall / 1e9
        total_flop += flop * count
        wall += t.wall * count
        cpu += t.cpu * count
    return Timing(total_flop / wall / 1e9, total_flop / cpu / 1e9), per


def square_peak(dtype: torch.dtype, repeats: int, n: int = 8192) -> float:
    """GFLOP per wall-second of one large square ``torch.mm``: the practical peak of a GPU."""
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    return 2 * n ** 3 / timeit(lambda: torch.mm(a, b), repeats).wall / 1e9


def measure(model: nn.Module, size: int, batch: int, bf16: bool, train: bool, repeats: int) -> Timing:
    """Seconds per call (wall, CPU) of one forward or one train step on ``batch`` images."""
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    y = torch.randint(0, 2, (batch, model.head.out_features), device=DEVICE).float()
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return timeit(step, repeats)
    model.eval()

    @torch.no_grad()
    def fwd():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)
    return timeit(fwd, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    ap.add_argument("--batch", type=int, default=4, help="images per forward / train step at 224 px "
                                                        "(128 px uses 3x as many: similar work per call)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--write", metavar="MD", help="replace the benchmark section of this markdown file")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--json", metavar="F", help="also write the ceilings and rows as JSON (bench/gpu.sh reads it)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False (torch {torch.__version__})")
    gpu = DEVICE.type == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cx = vit_small(num_classes=15)
    plain = PlainViT(num_classes=15)
    plain.load_state_dict(cx.state_dict(), strict=True)
    with torch.no_grad():
        probe = torch.randn(2, 3, 224, 224)
        diff = (cx.eval()(probe) - plain.eval()(probe)).abs().max().item()
    print(f"cxrvit vs plain, same weights: max |logit diff| = {diff:.1e}", flush=True)
    cx, plain = cx.to(DEVICE), plain.to(DEVICE)
    record = {"device": str(DEVICE), "machine": describe_machine(args.threads), "batch": args.batch,
              "gflop_fwd_224": GFLOP_FWD_224, "ceiling_gflops": {}, "rows": []}
    peak = None
    if gpu:
        peak = square_peak(torch.bfloat16, max(5, args.repeats))
        record["peak_bf16_gflops"] = peak
        print(f"bf16 square 8192^3 torch.mm: {peak / 1e3:.0f} TFLOP/s", flush=True)

    names = [n for n, *_ in layer_shapes(1, 224)]
    ceil_lines = ["| matmul ceiling | size | batch | " + " | ".join(names) + " | aggregate GFLOP/s | per CPU-s |",
                  "|---|---|---|" + "---|" * (len(names) + 2)]
    rows = ["| model | size | dtype | mode | batch | img/s | GFLOP/s | MFU (wall) vs same dtype | vs bf16 "
            "| GFLOP/CPU-s | MFU (CPU time) vs same dtype | vs bf16 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if gpu:  # CPU time of the launching thread says nothing about a GPU; the square-mm peak does
        rows = ["| model | size | dtype | mode | batch | img/s | GFLOP/s | MFU vs same dtype (model shapes) "
                "| vs bf16 (model shapes) | vs bf16 peak (8192^3 mm) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        batch = args.batch if size >= 224 else args.batch * 3
        # the ceiling is measured next to the model rows it normalises: contention drifts over minutes
        ceil = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ceil[name], per = ceiling(batch, size, dtype, max(3, args.repeats))
            record["ceiling_gflops"][f"{name}@{size}"] = ceil[name].wall
            ceil_lines.append(f"| {name} | {size} | {batch} | " + " | ".join(f"{v:.0f}" for v in per.values())
                              + f" | **{ceil[name].wall:.0f}** | {ceil[name].cpu:.0f} |")
            print(ceil_lines[-1], flush=True)
        for mode in ("forward", "train"):
            for dtype in ("fp32", "bf16"):
                for impl, model in (("cxrvit (SDPA)", cx), ("plain (explicit softmax)", plain)):
                    t = measure(model, size, batch, dtype == "bf16", mode == "train", args.repeats)
                    flop = batch * gflop_per_image(size, mode == "train")
                    gw, gc = flop / t.wall, flop / t.cpu
                    record["rows"].append({"impl": impl, "size": size, "dtype": dtype, "mode": mode, "batch": batch,
                                           "img_s": batch / t.wall, "gflops": gw,
                                           "mfu_bf16": gw / ceil["bf16"].wall,
                                           "mfu_peak": gw / peak if peak else None})
                    if gpu:
                        rows.append(f"| {impl} | {size} | {dtype} | {mode} | {batch} | {batch / t.wall:.1f} | "
                                    f"{gw:.0f} | {100 * gw / ceil[dtype].wall:.1f}% | "
                                    f"{100 * gw / ceil['bf16'].wall:.1f}% | {100 * gw / peak:.1f}% |")
                    else:
                        rows.append(f"| {impl} | {size} | {dtype} | {mode} | {batch} | {batch / t.wall:.2f} | {gw:.0f} | "
                                    f"{100 * gw / ceil[dtype].wall:.0f}% | {100 * gw / ceil['bf16'].wall:.0f}% | {gc:.0f} | "
                                    f"{100 * gc / ceil[dtype].cpu:.0f}% | {100 * gc / ceil['bf16'].cpu:.0f}% |")
                    print(rows[-1], flush=True)

    section = "\n".join([
        "<!-- bench:model start -->",
        f"Machine: {describe_machine(args.threads)}.",
        f"Command: `.venv/bin/python bench/model.py --batch {args.batch} --repeats {args.repeats}"
        f"{' --sizes ' + ' '.join(map(str, args.sizes)) if args.sizes != [224, 128] else ''}"
        f"{f' --threads {args.threads}' if args.threads != os.cpu_count() else ''}"
        f"{f' --device {args.device}' if gpu else ''}` "
        f"(torch {torch.__version__}, {args.threads} threads).",
        "",
        *ceil_lines,
        *(["", f"bf16 square 8192^3 `torch.mm` (practical peak): **{peak:.0f}** GFLOP/s."] if gpu else []),
        "",
        "Per-product columns: GFLOP per wall-second of `torch.mm` / `torch.bmm` on that layer's shape (median). "
        "Aggregate: total FLOP / total time over one forward's products; per CPU-s: the same per CPU-second.",
        "",
        *rows,
        "",
        f"FLOP per image: {GFLOP_FWD_224} GFLOP forward at 224 px (4.6 GMAC), x3 for a train step; "
        f"scaled by tokens at 128 px (65/197). MFU = model FLOP rate / aggregate matmul rate, by wall time "
        f"and by CPU time. cxrvit vs plain with the same weights: max |logit diff| {diff:.1e}.",
        "<!-- bench:model end -->",
    ])
    if args.write:
        write_section(args.write, section)
        print(f"wrote {args.write}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")


def describe_machine(threads: int) -> str:
    if DEVICE.type == "cuda":
        p = torch.cuda.get_device_properties(DEVICE)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                f"compute capability {p.major}.{p.minor}), CUDA {torch.version.cuda}, torch {torch.__version__}, "
                f"{os.cpu_count()} CPU cores")
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = " ".join(sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512_vnni|avx512f|avx2)\b", text))))
        model = re.search(r"model name\s*:\s*(.*)", text)
        name = model.group(1).strip() if model else platform.processor()
    except OSError:
        name = platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    bf16 = "native bf16 matmul" if native else "no avx512_bf16 / amx_bf16: bf16 matmuls are emulated"
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({name}; flags: {flags or 'n/a'}; {bf16}), "
            f"shared with other jobs (load average {load:.1f} at the end of the run)")


def write_section(path: str, section: str) -> None:
    """Replace the marked block in ``path`` (or append it), keeping the rest of the file."""
    text = open(path).read() if os.path.exists(path) else ""
    pattern = re.compile(r"<!-- bench:model start -->.*?<!-- bench:model end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
