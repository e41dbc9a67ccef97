"""bench/gpu.sh's last stage: runs/gpu/summary.md from what the stages before it left in OUT.

    python bench/gpu_summary.py --out runs/gpu

The table of stages (status, seconds, limit), the CUDA-path checks of bench/cuda_check.py (with the bounds each
check used), throughput and MFU from bench/model.py's tables and from the speeds the runs logged, and the arms
table. A stage that failed or never ran is said to be missing; the summary itself never fails on it.
"""
from __future__ import annotations

import os
import sys

# Keep bench/ itself off sys.path: a script here must never shadow a module of the same name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import glob
import json
import statistics
from pathlib import Path

import yaml

TRAIN_GFLOP_224 = 27.6          # ViT-S/16 train step per image at 224 px (bench/model.py)


def gflop_train(size: int) -> float:
    return TRAIN_GFLOP_224 * ((size // 16) ** 2 + 1) / 197


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_speed(run: Path) -> float | None:
    """Median over epochs of the engine's img/s at each epoch's last logged step (metrics.jsonl)."""
    last: dict[int, float] = {}
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train" and "img_per_s" in rec:
                last[rec["epoch"]] = rec["img_per_s"]
    except (OSError, ValueError):
        return None
    return statistics.median(last.values()) if last else None


def _pretrain_speed(run: Path) -> float | None:
    rate = None
    for name in ("log.jsonl", "metrics.jsonl"):
        try:
            for line in (run / name).read_text().splitlines():
                rec = json.loads(line)
                if rec.get("kind") == "train" and "images_per_s" in rec:
                    rate = rec["images_per_s"]           # cumulative since the start: the last is the run's
        except (OSError, ValueError):
            continue
    return rate


def _arch_size(run: Path, key: str) -> tuple[str | None, int | None]:
    """(model.arch, training size) from a run's config.yaml; key ``model`` (fine-tuning) or ``mae``."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        return cfg["model"]["arch"], int(cfg["model"]["img_size"] if key == "model" else cfg["mae"]["size"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None, None


def write_summary(out: Path) -> Path:
    out = Path(out)
    lines = ["# bench/gpu.sh summary", ""]
    env = (out / "env.txt").read_text().strip() if (out / "env.txt").is_file() else "(no env.txt)"
    lines += ["```", env, "```", ""]
    # stages
    lines += ["## Stages", "", "| stage | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    stages = (out / "stages.tsv").read_text().splitlines() if (out / "stages.tsv").is_file() else []
    for row in stages:
        name, rc, secs, limit = (row.split("\t") + ["", "", "", ""])[:4]
        status = {"0": "ok", "124": "TIMED OUT (resumable: rerun bench/gpu.sh)", "skip": "skipped"}.get(
            rc, f"FAILED (exit {rc}; see logs/{name}.log)")
        lines.append(f"| {name} | {status} | {secs} | {limit} |")
    lines.append("")
    # checks
    chk, ddp = _load(out / "cuda_check.json"), _load(out / "ddp_check.json")
    lines += ["## CUDA path", ""]
    if chk:
        a, bounds = chk["autocast"], chk.get("bounds", {})
        lines.append(f"- bf16 autocast vs fp32, same weights ({a['arch']}, {a['size']} px, batch {a['batch']}): "
                     f"logits max rel diff {a['logit_rel']:.2e} (bound {bounds.get('logit_rel')}), loss rel diff "
                     f"{a['loss_rel']:.2e} (bound {bounds.get('loss_rel')}), gradient cosine {a['grad_cos']:.4f} "
                     f"(bound {bounds.get('grad_cos')}); logits dtype under autocast {a['autocast_logits_dtype']}; "
                     f"engine `precision: auto` -> {a['engine_auto_precision']} — **{'ok' if a['ok'] else 'FAILED'}**")
        if "loader" in chk:
            ld = chk["loader"]
            bw = (f"; host->device {ld['h2d_pinned_gb_s']:.1f} GB/s pinned vs {ld['h2d_pageable_gb_s']:.1f} GB/s "
                  "pageable" if "h2d_pinned_gb_s" in ld else "")
            lines.append(f"- engine BatchLoader: pin_memory default {ld['pin_memory_default']}, batch pinned "
                         f"{ld['batch_pinned']}, non_blocking copy intact {ld['non_blocking_copy_intact']}{bw} — "
                         f"**{'ok' if ld['ok'] else 'FAILED'}**")
    else:
        lines.append("- cuda_check.json missing (stage failed or not run)")
    if ddp:
        lines.append(f"- DDP, {ddp['world_size']} process(es), backend **{ddp['backend']}** (process group up in "
                     f"{ddp['init_process_group_s']} s): all_reduce {ddp['all_reduce']} (expected "
                     f"{ddp['all_reduce_expected']}), DDP vs plain gradient max rel diff {ddp['grad_rel']:.1e} "
                     f"(bound {ddp.get('bound_grad_rel')}) — **{'ok' if ddp['ok'] else 'FAILED'}**")
    else:
        lines.append("- ddp_check.json missing (stage failed or not run)")
    tr = out / "torchrun-train"
    if (tr / "bundle.json").is_file():
        spd = _run_speed(tr)
        lines.append(f"- `torchrun --nproc_per_node=1 -m cxrvit train` (1 epoch): finished, bundle written; "
                     f"engine {spd:.1f} img/s" if spd else "- torchrun train: finished")
    else:
        lines.append("- `torchrun --nproc_per_node=1 -m cxrvit train`: no bundle (stage failed or not run)")
    lines.append("")
    # throughput
    lines += ["## Throughput and MFU", ""]
    ceil, peak = None, None
    for md in sorted(glob.glob(str(out / "throughput-b*.md"))):
        text = Path(md).read_text()
        lines += [f"From `{Path(md).name}` (`bench/model.py`):", "", text.strip(), ""]
    for js in sorted(glob.glob(str(out / "throughput-b*.json"))):
        rec = _load(Path(js)) or {}
        for key, v in (rec.get("ceiling_gflops") or {}).items():
            if key.startswith("bf16@"):
                ceil = max(ceil or 0.0, v)
        if rec.get("peak_bf16_gflops"):
            peak = max(peak or 0.0, rec["peak_bf16_gflops"])
    rows = []
    for run in sorted(out.glob("arms/fold*/*/run")) + ([tr] if tr.is_dir() else []):
        (arch, size), spd = _arch_size(run, "model"), _run_speed(run)
        if spd and size:
            # FLOP are counted for ViT-S/16 only (the dry run's vit_tiny gets no MFU)
            rows.append((str(run.relative_to(out)), "fine-tune (engine: loading, augment, step, EMA)", arch, size,
                         spd, spd * gflop_train(size) if arch == "vit_small" else None))
    for run in sorted(out.glob("arms/fold*/pretrain-*")):
        (arch, size), spd = _arch_size(run, "mae"), _pretrain_speed(run)
        if spd and size:
            rows.append((str(run.relative_to(out)), "MAE pre-training (end to end: + checkpoints, probes)", arch,
                         size, spd, None))
    if rows:
        lines += ["Speeds measured inside the runs (median over epochs). MFU: ViT-S/16 train-step FLOP per second "
                  f"({TRAIN_GFLOP_224} GFLOP per image at 224 px) over the best measured bf16 matmul rate at the "
                  f"model's own shapes, {ceil or float('nan'):.0f} GFLOP/s"
                  + (f", and over the bf16 8192^3 `torch.mm` peak, {peak:.0f} GFLOP/s" if peak else "") + ".", "",
                  "| run | what | arch | px | img/s | MFU vs model-shape ceiling | vs peak |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for name, what, arch, size, spd, gf in rows:
            mfu = f"{100 * gf / ceil:.1f}%" if gf and ceil else "—"
            mfp = f"{100 * gf / peak:.1f}%" if gf and peak else "—"
            lines.append(f"| {name} | {what} | {arch} | {size} | {spd:.1f} | {mfu} | {mfp} |")
        lines.append("")
    # arms
    lines += ["## The decisive comparison (`cxrvit bench arms`)", ""]
    res = out / "arms" / "results.md"
    lines += [res.read_text().strip() if res.is_file() else
              "No results.md: the arms stage did not finish within its limit. It resumes where it stopped: "
              "rerun `bash bench/gpu.sh`.", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out / "summary.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="bench/gpu.sh's OUT (runs/gpu)")
    args = ap.parse_args(argv)
    print(f"wrote {write_summary(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
