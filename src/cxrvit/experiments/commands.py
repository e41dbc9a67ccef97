"""``cxrvit bench recipes`` and ``cxrvit bench arms``: thin layers over the one arms harness."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cxrvit.evaluation.bootstrap import DEFAULT_RESAMPLES


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print a table")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    p = bsub.add_parser("arms", help="N training strategies on the same patients, folds and seeds: one table",
                        description="Runs (or resumes) every arm of an arms YAML file (recipe, overrides, init "
                                    "checkpoint or per-fold self-supervised pre-training) on the same patient "
                                    "folds and seeds, then scores pooled held-out predictions with paired "
                                    "patient-bootstrap CIs against the reference arm. Finished arms are reused "
                                    "while their resolved config is unchanged. See docs/evaluation.md.")
    p.add_argument("plan", metavar="ARMS.yaml",
                   help="the arms file (e.g. bench/arms/recipes.yaml, bench/arms/ssl.yaml, bench/arms/sample-cv2.yaml)")
    p.add_argument("--data", required=True, metavar="CACHE", help="prepared labelled cache folder")
    p.add_argument("--out", required=True, metavar="DIR", help="fold runs, pre-training runs, predictions, results.md")
    p.add_argument("--only", nargs="+", metavar="ARM",
                   help="run only these arms (a second worker can run others on the same --out at the same time)")
    p.add_argument("--init", metavar="CKPT",
                   help="backbone every arm without its own init/pretrain starts from (e.g. DINO's "
                        "dino_deitsmall16_pretrain.pth); use a new --out for it")
    p.add_argument("--reports", action="store_true",
                   help="also write each arm's ROC/PR/reliability/F1 plots into OUT/report-<arm>/")
    p.add_argument("--reference", metavar="ARM",
                   help="pair every arm with this arm instead of the plan's reference; the table goes to "
                        "OUT/results-vs-ARM.md (re-scores a finished benchmark without training anything)")
    p.add_argument("--seeds-fixed", action="store_true",
                   help="bootstrap patients only, holding several seeds' models fixed (how tables scored before "
                        "6 December were made); by default each resample draws seeds as well as patients")
    p.add_argument("--tables", default="results", metavar="STEM",
                   help="file stem of the scored tables in OUT (default results: OUT/results.md, "
                        "OUT/results-vs-ARM.md); a plan that shares its OUT with another plan (a stage continued "
                        "from that plan's) keeps its own tables under its own stem")
    _common(p)
    p.set_defaults(func=cmd_bench_arms)

    p = bsub.add_parser("recipes", help="k-fold (or official-split) comparison of two training recipes",
                        description="The two-arm plan A (reference) vs B of `bench arms`: patient-wise k-fold CV "
                                    "on one cache; out-of-fold predictions pooled and compared with a paired "
                                    "patient bootstrap (B − A), plots in OUT/report-<recipe>/. Resumable.")
    p.add_argument("--data", required=True, metavar="CACHE", help="prepared cache folder")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--recipes", nargs=2, default=["baseline", "improved"], metavar=("A", "B"),
                   help="two recipe names or YAML paths (difference is B − A)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to both recipes (repeatable), e.g. --set schedule.epochs=8")
    p.add_argument("--protocol", choices=("auto", "cv", "official"), default="auto",
                   help="auto: official split when the cache has it and > 20k images, else cv")
    p.add_argument("--out", default="runs/bench-recipes", metavar="DIR", help="fold runs, predictions, results.md")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--init", metavar="CKPT", help="backbone checkpoint both recipes start from (default: random init)")
    _common(p)
    p.set_defaults(func=cmd_bench_recipes)


def _common(p) -> None:
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the recipes' engine.device)")
    p.add_argument("--append-to", metavar="MD", help="also append the results section to this Markdown file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_bench_arms(args) -> int:
    # Deferred: the harness pulls in torch and every training part; `cxrvit --help` should not.
    from cxrvit.experiments.plan import load_plan, with_default_init

    try:
        plan = with_default_init(load_plan(args.plan), args.init)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(exc)
    return _run(plan, args, reports=args.reports)


def cmd_bench_recipes(args) -> int:
    # Deferred: the harness pulls in torch and every training part; `cxrvit --help` should not.
    from cxrvit.experiments.plan import recipes_plan

    try:
        plan = recipes_plan(args.recipes, args.overrides, protocol=args.protocol, folds=args.folds, seed=args.seed,
                            init=args.init)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(exc)
    return _run(plan, args, reports=True)


def _run(plan, args, *, reports: bool) -> int:
    # Deferred: the harness pulls in torch and every training part; `cxrvit --help` should not.
    from cxrvit.experiments.arms import run_arms

    command = "cxrvit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    try:
        result = run_arms(plan, args.data, args.out, only=getattr(args, "only", None), device=args.device,
                          progress=not args.quiet, n_resamples=args.bootstrap, command=command, reports=reports,
                          log=lambda m: print(m, file=sys.stderr, flush=True),
                          reference=getattr(args, "reference", None), tables=getattr(args, "tables", "results"),
                          resample_seeds=not getattr(args, "seeds_fixed", False))
    # FloatingPointError: a fold whose loss diverged (engine.core.NonFiniteLossError), named with its step
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError) as exc:
        return _fail(exc)
    if result is None:
        return 0
    print(result.markdown())
    if args.append_to:
        # The benchmark behind this table took hours: a missing folder must not lose it.
        Path(args.append_to).parent.mkdir(parents=True, exist_ok=True)
        with open(args.append_to, "a") as f:
            f.write("\n" + result.markdown())
    return 0


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2
