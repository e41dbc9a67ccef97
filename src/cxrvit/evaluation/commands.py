"""``cxrvit eval``, ``cxrvit compare`` and ``cxrvit bench recipes``: thin layers over the library."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a trained model bundle on a prepared cache",
                              description="Per-label F1 at the bundle's validation-tuned thresholds, F1 at 0.5, "
                                          "trivial F1, AUROC/AP with patient-bootstrap 95%% CIs, confusion counts.")
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

    bench = subparsers.add_parser("bench", help="benchmarks that print a table")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    p = bsub.add_parser("recipes", help="k-fold (or official-split) comparison of two training recipes",
                        description="Patient-wise k-fold CV of two recipes on one cache; out-of-fold predictions "
                                    "pooled and compared with a paired patient bootstrap (B − A). Resumable.")
    p.add_argument("--data", required=True, metavar="CACHE", help="prepared cache folder")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--recipes", nargs=2, default=["baseline", "improved"], metavar=("A", "B"),
                   help="two recipe names or YAML paths (difference is B − A)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to both recipes (repeatable), e.g. --set schedule.epochs=8")
    p.add_argument("--protocol", choices=("auto", "cv", "official"), default="auto",
                   help="auto: official split when the cache has it and > 20k images, else cv")
    p.add_argument("--out", default="runs/bench-recipes", metavar="DIR", help="fold runs, predictions, results.md")
    p.add_argument("--seed", type=int, default=0, help="fold assignment and bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the recipes' engine.device)")
    p.add_argument("--init", metavar="CKPT", help="backbone checkpoint both recipes start from (default: random init)")
    p.add_argument("--append-to", metavar="MD", help="also append the results section to this Markdown file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_recipes)

    p = bsub.add_parser("arms", help="N training strategies on the same patients, folds and seeds: one table",
                        description="Runs (or resumes) every arm of an arms YAML file (recipe, overrides, init "
                                    "checkpoint or per-fold self-supervised pre-training) on the same patient "
                                    "folds and seeds, then scores pooled held-out predictions with paired "
                                    "patient-bootstrap CIs against the reference arm. See docs/evaluation.md.")
    p.add_argument("plan", metavar="ARMS.yaml", help="the arms file (e.g. bench/arms/sample-cv2.yaml)")
    p.add_argument("--data", required=True, metavar="CACHE", help="prepared labelled cache folder")
    p.add_argument("--out", required=True, metavar="DIR", help="fold runs, pre-training runs, predictions, results.md")
    p.add_argument("--only", nargs="+", metavar="ARM",
                   help="run only these arms (a second worker can run others on the same --out at the same time)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the recipes' engine.device)")
    p.add_argument("--init", metavar="CKPT",
                   help="backbone every arm without its own init/pretrain starts from (e.g. DINO's "
                        "dino_deitsmall16_pretrain.pth); use a new --out for it")
    p.add_argument("--append-to", metavar="MD", help="also append the results section to this Markdown file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_arms)


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
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
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
        Path(args.json).write_text(json.dumps(c.to_json(), indent=2))
    return 0


def cmd_bench_recipes(args) -> int:
    from cxrvit.experiments.crossval import run_recipes

    command = _command_line()
    try:
        result = run_recipes(args.data, args.out, recipes=args.recipes, folds=args.folds, overrides=args.overrides,
                             protocol=args.protocol, seed=args.seed, n_resamples=args.bootstrap, device=args.device,
                             progress=not args.quiet, command=command, init=args.init)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        return _fail(exc)
    return _print_table(result.markdown(), args.append_to)


def cmd_bench_arms(args) -> int:
    from cxrvit.experiments.arms import load_plan, run_arms, with_default_init

    command = _command_line()
    try:
        plan = with_default_init(load_plan(args.plan), args.init)
        result = run_arms(plan, args.data, args.out, only=args.only, device=args.device, progress=not args.quiet,
                          n_resamples=args.bootstrap, command=command,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return _fail(exc)
    if result is None:
        return 0
    return _print_table(result.markdown(), args.append_to)


def _command_line() -> str:
    return "cxrvit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""


def _print_table(text: str, append_to: str | None) -> int:
    print(text)
    if append_to:
        with open(append_to, "a") as f:
            f.write("\n" + text)
    return 0
