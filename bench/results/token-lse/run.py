"""Exploratory, not an arm: does a log-sum-exp pooled token head read a frozen backbone better than the patch mean?

For each label c, every patch token gets a linear score s_i = z_i . w_c (z: the final-norm patch tokens,
standardised per channel), and the image's logit is b_c + (1/r) log mean_i exp(r s_i). r -> 0 is the product's
linear probe on the patch mean (the same model, fitted here by L-BFGS rather than cxrvit's Newton solver); a large
r approaches the maximum over patches, the pooling NIH's ChestX-ray8 paper used for localised findings. For each r
the L2 weight is picked by a 3-fold patient cross-fit on the fold's training rows, thresholds are tuned on those
out-of-fold predictions, and the held-out fold is scored once at every r (all printed: this looks at the held-out
rows, which is why it is exploratory).

    python bench/results/token-lse/run.py --cache runs/sample-cache160 --arm runs/cv2-tokavg-seeds/fold0/mae224s-probe-avg

``--arm`` is an arm folder of `cxrvit bench arms` (its ``run/model.safetensors`` and ``heldout.npz``); the tokens
of all cache rows are kept beside the log in ``--work`` (fp16, ~160 MB an arm) so a re-run only refits.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cxrvit.data import splits
from cxrvit.data.cache import CXRCache
from cxrvit.data.preprocess import Preprocessing, eval_transform
from cxrvit.evaluation.metrics import auroc, f1_at, tune_thresholds
from cxrvit.model.vit import build_model

SCORED = ("Atelectasis", "Effusion", "Mass/Nodule")


def tokens(cache, arm: Path, work: Path) -> np.ndarray:
    out = work / f"{arm.parent.name}-{arm.name}.npy"
    if not out.exists():
        model = build_model("vit_small", num_classes=15)
        model.load_state_dict(load_file(str(arm / "run" / "model.safetensors")))
        model.eval()
        prep = Preprocessing(size=224, source_size=cache.size)
        toks = np.zeros((len(cache), 197, model.embed_dim), np.float16)
        with torch.no_grad():
            for s in range(0, len(cache), 64):
                grey = torch.from_numpy(np.array(cache.pixels[s:s + 64]))[:, None]
                toks[s:s + 64] = model.forward_features(prep.normalize(eval_transform(grey, 224))).numpy()
        np.save(out, toks)
    return np.load(out, mmap_mode="r")


def fit(patches, y, rows, r, lam, iters=60):
    z = patches[rows]
    mu, sd = z.mean((0, 1)), z.std((0, 1)) + 1e-6
    yy = torch.from_numpy(y[rows])
    w = torch.zeros(z.shape[-1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def logits(zz):
        s = zz @ w
        pooled = s.mean(1) if r == 0 else (torch.logsumexp(r * s, 1) - np.log(s.shape[1])) / r
        return pooled + b

    z = (z - mu) / sd

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(z), yy, reduction="sum") / len(rows)
        loss = loss + lam * (w ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return lambda rr: torch.sigmoid(logits((patches[rr] - mu) / sd)).detach().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--arm", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("runs/token-lse"))
    args = ap.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = CXRCache(args.cache)
    held = np.load(args.arm / "heldout.npz")
    labels = [str(x) for x in held["labels"]]
    scored = [labels.index(s) for s in SCORED]
    y = cache.labels(labels).astype(np.float32)
    hrows = held["rows"]
    trows = np.setdiff1d(np.arange(len(cache)), hrows)
    patches = torch.from_numpy(np.asarray(tokens(cache, args.arm, args.work)[:, 1:], dtype=np.float32))
    print(f"{args.arm}: {len(trows)} training rows, {len(hrows)} held out")
    for r in (0, 1, 3, 10):
        start, best = time.time(), None
        for lam in (1e-1, 1e-2, 1e-3):
            oof = np.zeros((len(trows), y.shape[1]))
            pos = {v: i for i, v in enumerate(trows)}
            for fit_rows, inner in splits.patient_kfold(trows, cache.patient_ids, k=3, seed=0):
                oof[[pos[v] for v in inner]] = fit(patches, y, fit_rows, r, lam)(inner)
            score = float(np.nanmean(auroc(y[trows], oof)[scored]))
            if best is None or score > best[0]:
                best = (score, lam, oof)
        score, lam, oof = best
        probs = fit(patches, y, trows, r, lam)(hrows)
        au = auroc(y[hrows], probs)[scored]
        f1 = f1_at(y[hrows], probs, tune_thresholds(y[trows], oof))[scored]
        print(f"r={r:>2}  L2 {lam:g}  cross-fitted {score:.3f}  held-out AUROC {au.mean():.3f} {np.round(au, 3)}  "
              f"F1 {f1.mean():.3f} {np.round(f1, 3)}  ({time.time() - start:.0f} s)", flush=True)
    au = auroc(y[hrows], held["probs"])[scored]
    f1 = f1_at(y[hrows], held["probs"], held["thresholds"])[scored]
    print(f"the arm's own probe: held-out AUROC {au.mean():.3f} {np.round(au, 3)}  F1 {f1.mean():.3f} {np.round(f1, 3)}")


if __name__ == "__main__":
    main()
