"""probe-before (main's solver, full `cxrvit train --recipe improved` run) vs probe-after (this branch, --resume on
the same features.npz): C, c_search, thresholds, head weights, and the head's probabilities on the training features."""
import json
import numpy as np
from safetensors.numpy import load_file
B, A = "/work/rehearsal/probe-before", "/work/rehearsal/probe-after"
mb, ma = (json.load(open(f"{d}/bundle.json")) for d in (B, A))
tb, ta = mb["training"], ma["training"]
print("C:", tb["C"], ta["C"], "oof mean AUROC scored:", tb["oof_mean_auroc_scored"], ta["oof_mean_auroc_scored"])
print("c_search scores:", [s["score"] for s in tb["c_search"]], [s["score"] for s in ta["c_search"]])
d = max(abs(x["auroc"][k] - y["auroc"][k]) for x, y in zip(tb["c_search"], ta["c_search"]) for k in x["auroc"] if x["auroc"][k] is not None)
print("max |d per-label oof AUROC| over the grid:", d)
thb, tha = mb["thresholds"], ma["thresholds"]
print("thresholds: max |d|", max(abs(thb[k] - tha[k]) for k in thb), "identical:", thb == tha)
hb, ha = load_file(f"{B}/model.safetensors"), load_file(f"{A}/model.safetensors")
print("non-head tensors identical:", all(np.array_equal(hb[k], ha[k]) for k in hb if not k.startswith("head")))
f = np.load(f"{B}/features.npz")["feats"]
lb = f @ hb["head.weight"].astype(np.float64).T + hb["head.bias"]
la = f @ ha["head.weight"].astype(np.float64).T + ha["head.bias"]
print("head (float32 in the bundle): max |d logit|", float(np.abs(lb - la).max()), "max |d prob|", float(np.abs(1/(1+np.exp(-lb)) - 1/(1+np.exp(-la))).max()))
print("seconds:", tb["seconds"], ta["seconds"])
