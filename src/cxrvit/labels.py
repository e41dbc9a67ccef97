"""The NIH ChestX-ray14 label vocabulary and the targets derived from it.

NIH's spellings are kept exactly (``Pleural_Thickening`` with its underscore) so that a
label name read from ``Data_Entry_2017.csv`` is the name used everywhere else.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

#: The 14 findings of ChestX-ray14, in NIH's order and spelling.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"

#: Targets computed from the findings. Each maps a name to the findings it ORs together.
DERIVED_TARGETS: Mapping[str, tuple[str, ...]] = {
    "Mass/Nodule": ("Mass", "Nodule"),
}

#: The three targets this project is scored on, in the order reports list them.
SCORED_TARGETS: tuple[str, ...] = ("Atelectasis", "Effusion", "Mass/Nodule")

#: Default training label set: the 14 findings plus the derived Mass/Nodule (15 sigmoids).
DEFAULT_LABELS: tuple[str, ...] = NIH_FINDINGS + ("Mass/Nodule",)

ALL_LABEL_NAMES: tuple[str, ...] = NIH_FINDINGS + (NO_FINDING,) + tuple(DERIVED_TARGETS)


def validate_label_names(names: Sequence[str]) -> tuple[str, ...]:
    """Return ``names`` as a tuple, or raise naming the first unknown label."""
    names = tuple(names)
    for name in names:
        if name not in ALL_LABEL_NAMES:
            raise ValueError(
                f"unknown label {name!r}; known labels are: {', '.join(ALL_LABEL_NAMES)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"label set has duplicates: {names}")
    return names


def label_matrix(
    column: Callable[[str], np.ndarray], names: Sequence[str]
) -> np.ndarray:
    """Build an ``[N, K]`` float32 multi-hot matrix for ``names``.

    ``column(finding)`` returns the 0/1 vector of one NIH finding (or ``No Finding``);
    derived targets are the logical OR of their parts.
    """
    names = validate_label_names(names)
    cols = []
    for name in names:
        parts = DERIVED_TARGETS.get(name, (name,))
        col = np.zeros_like(np.asarray(column(parts[0]), dtype=bool))
        for part in parts:
            col |= np.asarray(column(part), dtype=bool)
        cols.append(col)
    return np.stack(cols, axis=1).astype(np.float32)
