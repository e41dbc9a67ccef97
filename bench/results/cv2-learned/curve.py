"""Print the MAE pre-training monitor of a bench-arms run as a Markdown table (issue 20).

    python bench/results/cv2-learned/curve.py /work/runs/cv2-learned/fold0/pretrain-mae/log.jsonl
"""
import json
import sys


def main(path: str) -> None:
    records = [json.loads(line) for line in open(path)]
    train = {round(r["epoch"]): r for r in records if r["kind"] == "train"}
    print("| epoch | step | MAE loss (last logged) | k-NN CLS | linear CLS | k-NN mean-pool | linear mean-pool |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in records if r["kind"] == "probe"):
        near = [t for e, t in train.items() if e <= r["epoch"]]
        loss = f"{near[-1]['loss']:.3f}" if near else "–"
        print(f"| {r['epoch']} | {r['step']} | {loss} | {r['knn_cls_auroc']:.3f} | {r['linear_cls_auroc']:.3f} "
              f"| {r['knn_mean_auroc']:.3f} | {r['linear_mean_auroc']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
