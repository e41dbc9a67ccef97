"""Before/after on the real sample: main's linear_probe search vs this branch's, on the same real features
(/work/rehearsal/probe-before/features.npz, written by `cxrvit train --recipe improved` with main's code)."""
import importlib.util, json, sys, time
import numpy as np
sys.path.insert(0, "/work/wt-fullscale/src")
from cxrvit.data.cache import CXRCache
from cxrvit.evaluation.metrics import auroc, tune_thresholds
from cxrvit.training.config import load_recipe
from cxrvit.training import linear_probe as new
spec = importlib.util.spec_from_file_location("old_lp", "/work/main/src/cxrvit/training/linear_probe.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)

cache = CXRCache("/work/rehearsal/sample-cache")
cfg = load_recipe("improved")
z = np.load("/work/rehearsal/probe-before/features.npz")
rows, feats = z["rows"], z["feats"]
labels, p = list(cfg.data.labels), cfg.probe
y = cache.labels(labels).astype(np.float64)[rows]
k = min(p.cv_folds, len(np.unique(np.asarray(cache.patient_ids)[rows])))
scored = [labels.index(s) for s in cfg.scored_labels]
res = {}
for name in ("old", "new"):
    t = time.perf_counter()
    if name == "old":
        oofs = [old.cross_fit(feats, rows, y, rows, feats, y, cache.patient_ids, c, k, cfg.data.split_seed) for c in p.c_grid]
    else:
        oofs = new.cross_fit_path(feats, rows, y, rows, feats, y, cache.patient_ids, p.c_grid, k, cfg.data.split_seed)
    scores = [float(np.nanmean(auroc(y, o)[scored])) for o in oofs]
    best = None
    for c, sc, o in zip(p.c_grid, scores, oofs):
        if best is None or sc > best[1]:
            best = (c, sc, o)
    thr = tune_thresholds(y, best[2])
    w, b = (old if name == "old" else new).fit_head(feats, y, best[0])
    res[name] = dict(s=time.perf_counter() - t, scores=scores, C=best[0], oofs=oofs, thr=thr, w=w, b=b)
    print(name, f"{res[name]['s']:.1f} s", "scores", scores, "C", best[0], flush=True)
o, n = res["old"], res["new"]
print("same C:", o["C"] == n["C"])
print("max |d score|:", max(abs(a - b) for a, b in zip(o["scores"], n["scores"])))
print("max |d oof prob| per C:", [float(np.abs(a - b).max()) for a, b in zip(o["oofs"], n["oofs"])])
print("thresholds equal:", bool(np.array_equal(o["thr"], n["thr"])), "max |d thr|:", float(np.nanmax(np.abs(o["thr"] - n["thr"]))))
lo, ln = feats @ o["w"].T + o["b"], feats @ n["w"].T + n["b"]
print("final head: max |d logit|", float(np.abs(lo - ln).max()), "max |d prob|", float(np.abs(1/(1+np.exp(-lo)) - 1/(1+np.exp(-ln))).max()))
