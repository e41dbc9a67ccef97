"""``cxrvit data-summary``: what a cache holds, overall and per official split.

The three scored targets (Atelectasis, Effusion, Mass/Nodule) come first because they are the
numbers a reader checks; the other findings and ``No Finding`` follow in NIH's order.
"""
from __future__ import annotations

import numpy as np

from cxrvit.data.cache import CXRCache
from cxrvit.labels import NIH_FINDINGS, NO_FINDING, SCORED_TARGETS

#: Label order in every summary: scored targets, then the remaining findings, then No Finding.
SUMMARY_LABELS: tuple[str, ...] = SCORED_TARGETS + tuple(f for f in NIH_FINDINGS if f not in SCORED_TARGETS) + (NO_FINDING,)


def _part(cache: CXRCache, rows: np.ndarray, labels: np.ndarray | None) -> dict:
    index = cache.index.iloc[rows]
    views = index["view"].replace("", "unknown").value_counts().sort_index()
    part = {
        "images": int(len(rows)),
        "patients": int(index["patient_id"].nunique()),
        "views": {str(v): int(c) for v, c in views.items()},
    }
    if labels is not None:
        pos = labels[rows].sum(0).astype(int)
        part["positives"] = {name: int(p) for name, p in zip(SUMMARY_LABELS, pos)}
        part["prevalence"] = {name: (round(float(p) / len(rows), 4) if len(rows) else 0.0)
                              for name, p in zip(SUMMARY_LABELS, pos)}
    return part


def summarize(cache: CXRCache) -> dict:
    """The summary as a JSON-ready dict: keys ``images``, ``patients``, ``views``, ``positives``,
    ``prevalence`` (labelled caches), ``splits`` (per official split), and the data report."""
    labels = cache.labels(SUMMARY_LABELS) if cache.labelled else None
    out = {"cache": str(cache.root), "size": cache.size, "labelled": cache.labelled}
    out.update(_part(cache, np.arange(len(cache)), labels))
    split = cache.index["official_split"].replace("", "unassigned").to_numpy(dtype=object)
    out["splits"] = {name: _part(cache, np.flatnonzero(split == name), labels)
                     for name in ("train_val", "test", "unassigned") if (split == name).any()}
    meta = cache.meta
    out["data_report"] = {k: meta.get(k) for k in ("source", "csv", "csv_variant", "listed_absent",
                                                   "unlisted_present", "duplicate_names", "views_filter")}
    out["data_report"]["bad_images"] = len(meta.get("bad_images", []))
    return out


def format_summary(summary: dict) -> str:
    """A plain-text table of :func:`summarize`'s result."""
    parts = {"all": summary, **summary["splits"]}
    lines = [f"cache {summary['cache']}: {summary['size']} px, {'labelled' if summary['labelled'] else 'unlabelled'}"]
    report = summary["data_report"]
    lines.append(f"source {report['source']}: {report['listed_absent'] or 0:,} listed-but-absent, "
                 f"{report['unlisted_present'] or 0:,} unlisted, {report['bad_images']:,} unreadable images left out, "
                 f"views filter: {report['views_filter'] or 'none (all views kept)'}")
    width = 20
    header = f"{'':{width}}" + "".join(f"{name:>20}" for name in parts)
    lines += ["", header]
    lines.append(f"{'images':{width}}" + "".join(f"{p['images']:>20,}" for p in parts.values()))
    lines.append(f"{'patients':{width}}" + "".join(f"{p['patients']:>20,}" for p in parts.values()))
    all_views = sorted({v for p in parts.values() for v in p["views"]})
    for view in all_views:
        lines.append(f"{'view ' + view:{width}}" + "".join(f"{p['views'].get(view, 0):>20,}" for p in parts.values()))
    if summary["labelled"]:
        lines.append("")
        lines.append(f"{'positives (prev.)':{width}}")
        for i, name in enumerate(SUMMARY_LABELS):
            cells = "".join(f"{p['positives'][name]:>11,} ({100 * p['prevalence'][name]:5.1f}%)" for p in parts.values())
            lines.append(f"{name:{width}}{cells}")
            if i == len(SCORED_TARGETS) - 1:
                lines.append(f"{'':{width}}" + "-" * 20 * len(parts))
    return "\n".join(lines)
