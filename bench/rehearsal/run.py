"""The full-scale rehearsal (issue 22): run each stage under measure.py, then print one Markdown table.

Stages write ``RESULTS/<stage>.json``; ``--table`` only reads them, so the table (and the README's
numbers) always come from one recorded set of runs. See docs/full-scale.md.

    python bench/rehearsal/run.py prepare-resume      # SIGKILL at ~50 %, re-run, compare with cache-full
    python bench/rehearsal/run.py summary|split|loader|probe|eval|probe-half|eval-small
    python bench/rehearsal/run.py --table
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import measure  # noqa: E402

ROOT = Path("/work/rehearsal")
PY = sys.executable
CACHE_FILES = ("pixels.u8", "index.csv", "meta.json", "COMPLETE")


def _cxrvit(*args) -> list[str]:
    return [PY, "-m", "cxrvit", *args]


def _done_count(cache: Path, n: int) -> int:
    bits = cache / ".partial" / "progress.bits"
    try:
        return int(np.unpackbits(np.frombuffer(bits.read_bytes(), np.uint8), count=n).sum())
    except (FileNotFoundError, ValueError):
        return 0


def _sha(cache: Path) -> dict:
    from cxrvit.data.cache import sha256_file

    return {name: sha256_file(cache / name) for name in CACHE_FILES}


def prepare_resume(res: Path) -> dict:
    """Kill a prepare at half-way, resume it, and check the result is byte-identical to cache-full."""
    out, n = ROOT / "cache-resumed", 112_120
    killed_json = res / "prepare-killed.json"
    # A killed run's leftovers are kept: a second call only resumes (and the kill's record is reused).
    if (out / "COMPLETE").exists() or (out.exists() and not (out / ".partial").is_dir()):
        raise SystemExit(f"{out} exists and is not a killed run: remove it first")
    cmd = _cxrvit("prepare", "--data", str(ROOT / "nih"), "--out", str(out), "--size", "256", "--no-progress")
    at_kill = {}

    def half(_elapsed):
        done = _done_count(out, n)
        if done >= n // 2:
            at_kill["done"] = done
            return True
        return False

    if out.exists():
        first = json.loads(killed_json.read_text()) if killed_json.is_file() else {"note": "killed by an earlier call"}
        at_kill.setdefault("done", _done_count(out, n))
    else:
        first = measure(cmd, kill_when=half)
        first["bitmap_at_kill"] = at_kill.get("done")
        killed_json.write_text(json.dumps(first, indent=2) + "\n")
    log = res / "prepare-resumed.log"
    with open(log, "w") as fh:
        second = measure(cmd, stdout=fh, stderr=subprocess.STDOUT)   # prepare logs "resuming: ..." on stderr
    text = log.read_text()
    m = re.search(r"resuming: ([\d,]+) of", text)
    resumed_from = int(m.group(1).replace(",", "")) if m else 0
    full, resumed = _sha(ROOT / "cache-full"), _sha(out)
    return {"killed_run": first, "bitmap_at_kill": at_kill.get("done"), "resumed_run": second,
            "resumed_from": resumed_from, "decoded_by_resume": n - resumed_from,
            "identical": full == resumed, "sha256_full": full, "sha256_resumed": resumed}


#: stage name -> arguments of stages.py (the cache is inserted second); "-small" runs are the size-ratio partners.
STAGES = {
    "split": ["split", "--steps", "2"],
    "loader": ["loader", "--images", "6400"],
    "probe": ["probe", "--rows", "86524"],
    "probe-half": ["probe", "--rows", "43262"],
    "eval": ["eval", "--rows", "25596"],
    "eval-small": ["eval", "--rows", "12798"],
}


def run_stage(name: str, cache: Path) -> dict:
    """One stage in a child process, measured from outside; its own JSON comes back on stdout."""
    out = ROOT / "results" / f"{name}.stdout"
    with open(out, "w") as fh:
        m = measure([PY, str(HERE / "stages.py"), STAGES[name][0], str(cache), *STAGES[name][1:]], stdout=fh)
    lines = out.read_text().strip().splitlines()
    return {"measure": m, "result": json.loads(lines[-1]) if m["rc"] == 0 and lines else None}


def run_summary(cache: Path) -> dict:
    out = ROOT / "results" / "summary.stdout"
    with open(out, "w") as fh:
        m = measure(_cxrvit("data-summary", str(cache)), stdout=fh)
    return {"measure": m, "text": out.read_text()}


def _load(res: Path, name: str) -> dict | None:
    f = res / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _row(stage, wall, n, anon_kb, written, note) -> str:
    ips = f"{n / wall:,.0f}" if wall and n else "-"
    disk = f"{written / 2**30:.2f} GiB" if written >= 2**30 else f"{written / 2**20:.0f} MiB"
    return f"| {stage} | {wall:,.1f} s | {ips} | {anon_kb / 2**20:.2f} GiB | {disk} | {note} |"


def table(res: Path) -> str:
    """One Markdown table from the recorded results; a missing stage is a row saying so."""
    rows = ["| stage | wall | images/s | peak RssAnon (process tree) | disk written | notes |",
            "|---|---|---|---|---|---|"]
    full = _load(res, "prepare-full")
    if full:
        rows.append(_row("a. `prepare --size 256`, 112,120 images, uninterrupted", full["wall_s"], 112_120,
                         full["peak_rss_anon_kb"], full["write_bytes"],
                         "512-px sample PNGs stand in for NIH's 1024-px ones (4x the pixels to decode; not measured here)"))
    pr = _load(res, "prepare-resume")
    if pr:
        r = pr["resumed_run"]
        rows.append(_row(f"a. prepare resumed after SIGKILL at {pr['resumed_from']:,} done", r["wall_s"],
                         pr["decoded_by_resume"], r["peak_rss_anon_kb"], r["write_bytes"],
                         f"decoded {pr['decoded_by_resume']:,} = only the rows not done; cache byte-identical to "
                         f"the uninterrupted one: **{'yes' if pr['identical'] else 'NO'}** (sha256 of "
                         + ", ".join(CACHE_FILES) + ")"))
    if full and pr:
        r = pr["resumed_run"]
        rows.append(f"| e. prepare: 112,120 vs {pr['decoded_by_resume']:,} images decoded | "
                    f"x{full['wall_s'] / r['wall_s']:.2f} time for x{112_120 / pr['decoded_by_resume']:.1f} images | | "
                    f"x{full['peak_rss_anon_kb'] / r['peak_rss_anon_kb']:.2f} | | the two runs met different loads "
                    "from other jobs; linear would be x2.0 |")
    sm = _load(res, "summary")
    if sm:
        m = sm["measure"]
        rows.append(_row("a. `data-summary`", m["wall_s"], 112_120, m["peak_rss_anon_kb"], m["write_bytes"],
                         "30,805 patients; train_val 86,524 / test 25,596"))
    sp = _load(res, "split")
    if sp and sp["result"]:
        r, m = sp["result"], sp["measure"]
        c = r["counts"]
        rows.append(_row(f"b. official split + {r['steps']} training steps ({r['recipe']}, batch {r['batch_size']}, "
                         f"{r['img_size']} px)", m["wall_s"], r["images"], m["peak_rss_anon_kb"], m["write_bytes"],
                         f"protocol chosen: {r['protocol_auto']}; fit {c['fit']['images']:,} img / "
                         f"{c['fit']['patients']:,} pat, val {c['val']['images']:,} / {c['val']['patients']:,}, "
                         f"test {c['test']['images']:,} / {c['test']['patients']:,}; "
                         f"{r['steps_per_epoch']:,} steps/epoch; step {np.mean(r['step_s']):.1f} s"))
    ld = _load(res, "loader")
    if ld and ld["result"]:
        r, m = ld["result"], ld["measure"]
        rows.append(_row(f"b. training loader, {r['images']:,} images", r["wall_s"], r["images"],
                         m["peak_rss_anon_kb"], m["write_bytes"],
                         f"RssAnon {r['rss_anon_mb_after_first_batch']:.0f} -> {r['rss_anon_mb_end']:.0f} MB "
                         f"after batch 1 -> last; {r['img_per_s_first_half']:,.0f} / {r['img_per_s_second_half']:,.0f}"
                         " img/s first / second half (cold / warm page cache)"))
    probe_what = "c. linear probe: C search (3 C x 5 patient folds, cross-fitted) + thresholds + final head"
    for big, small, what in (("probe", "probe-half", probe_what),
                             ("eval", "eval-small", "d. eval scoring: F1/AUROC/AP + 1,000 patient resamples")):
        pair = [(_load(res, n) or {}).get("result") and _load(res, n) for n in (small, big)]
        for rec in pair:
            if rec:
                r, m = rec["result"], rec["measure"]
                note = r["inputs"]
                if "search_s" in r:
                    note += (f"; search {r['search_s']:.0f} s, thresholds {r['thresholds_s']:.1f} s, final head "
                             f"{r['final_head_s']:.0f} s (the feature pass, {r['feature_rows']:,} rows, "
                             f"{r['feature_pass_s']:.0f} s, is not in the wall time)")
                rows.append(_row(f"{what}, {r['rows']:,} rows", r["wall_s"], r["rows"], m["peak_rss_anon_kb"],
                                 m["write_bytes"], note))
        if all(pair):
            (a, b) = [x["result"] for x in pair]
            ma, mb = [x["measure"]["peak_rss_anon_kb"] for x in pair]
            rows.append(f"| e. {big}: {b['rows']:,} vs {a['rows']:,} rows | x{b['wall_s'] / a['wall_s']:.2f} time "
                        f"for x{b['rows'] / a['rows']:.1f} rows | | x{mb / ma:.2f} | | linear would be "
                        f"x{b['rows'] / a['rows']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="?")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--cache", type=Path, default=ROOT / "cache-full")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(args.results))
        return 0
    if args.stage == "prepare-resume":
        result = prepare_resume(args.results)
        (args.results / "prepare-resume.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("sha")}, indent=1))
    elif args.stage == "summary":
        result = run_summary(args.cache)
        (args.results / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        print(result["text"])
    elif args.stage in STAGES:
        result = run_stage(args.stage, args.cache)
        (args.results / f"{args.stage}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=1))
    elif args.stage:
        raise SystemExit(f"unknown stage {args.stage!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
