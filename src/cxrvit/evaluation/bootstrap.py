"""Patient-level bootstrap: confidence intervals that respect who the images belong to.

Images of one patient are correlated (same body, often the same finding on follow-ups), so
resampling *images* would understate the uncertainty. We resample *patients* with replacement
and take all of each drawn patient's images. A resample is represented as per-image weights
(``w_i`` = how many times image i's patient was drawn), which lets every metric in
:mod:`cxrvit.evaluation.metrics` evaluate a whole block of resamples in one vectorised call.

Paired comparisons reuse the same :class:`PatientBootstrap` (same seed -> same draws) for both
models, so the difference is computed on identical resamples and the shared noise cancels.

Several training seeds stacked (each image once per seed, ``groups`` = the seed of each row): patients and
seeds are crossed, so each resample draws both, independently and with replacement, and a row's weight is
the product of its patient's and its seed's draw counts (a crossed, "pigeonhole" bootstrap; Owen 2007,
Ann. Appl. Stat.). Resampling patients alone would treat the seeds' models as fixed: the interval would
say nothing about how much another pre-training or training seed moves the score.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap interval."""

    value: float
    lo: float
    hi: float
    level: float = 0.95
    valid_resamples: int = 0  # resamples where the statistic was defined (e.g. AUROC needs both classes)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        if np.isnan(self.value):
            return "n/a"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        if np.isnan(self.lo):
            return f.format(self.value)
        return f"{f.format(self.value)} ({f.format(self.lo)} to {f.format(self.hi)})"


class PatientBootstrap:
    """Seeded patient resampling over a fixed list of images.

    ``patient_ids[i]`` is the patient of image i. Each resample draws as many patients as there are
    (with replacement, uniformly); an image's weight is its patient's draw count. ``groups[i]`` (optional:
    the training seed whose prediction row i is) adds the crossed level: each resample also draws as many
    groups as there are, and row i's weight is multiplied by its group's draw count. One group, or none,
    gives the plain patient bootstrap, draw for draw.
    """

    def __init__(self, patient_ids, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                 chunk: int | None = None, groups=None):
        patient_ids = np.asarray(patient_ids).astype(str)
        if patient_ids.ndim != 1 or len(patient_ids) == 0:
            raise ValueError("bootstrap needs a non-empty 1-D list of patient ids, one per image")
        if n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
        _, self.image_patient = np.unique(patient_ids, return_inverse=True)
        self.n_patients = int(self.image_patient.max()) + 1
        self.image_group, self.n_groups = None, 1
        if groups is not None:
            groups = np.asarray(groups).astype(str)
            if groups.shape != patient_ids.shape:
                raise ValueError(f"groups must give one group per image: {len(groups)} for {len(patient_ids)} images")
            _, image_group = np.unique(groups, return_inverse=True)
            if image_group.max() > 0:
                self.image_group, self.n_groups = image_group, int(image_group.max()) + 1
        self.n_images = len(patient_ids)
        self.n_resamples = n_resamples
        self.seed = seed
        # Keep a block of weights to about 32 MB of float64 whatever the test-set size.
        self.chunk = chunk or max(1, min(n_resamples, 4_000_000 // max(self.n_images, 1)))

    def weights(self) -> Iterator[np.ndarray]:
        """Yield ``[b, N]`` float64 weight blocks; the same sequence every time (seeded)."""
        rng = np.random.default_rng(self.seed)
        done = 0
        uniform = np.full(self.n_patients, 1.0 / self.n_patients)
        while done < self.n_resamples:
            b = min(self.chunk, self.n_resamples - done)
            counts = rng.multinomial(self.n_patients, uniform, size=b)  # [b, patients]
            w = counts[:, self.image_patient].astype(np.float64)
            if self.image_group is not None:   # drawn after the patients: without groups the draws are unchanged
                g = rng.multinomial(self.n_groups, np.full(self.n_groups, 1.0 / self.n_groups), size=b)
                w *= g[:, self.image_group]
            yield w
            done += b

    @property
    def unit(self) -> str:
        """What a resample draws: ``"patient"``, or ``"patient x seed"`` (crossed) with several groups."""
        return "patient" if self.image_group is None else "patient x seed"

    def run(self, statistic: Callable[[np.ndarray | None], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Evaluate ``statistic(weights)`` on every resample block and stack the results.

        ``statistic(None)`` must give the point estimate (all weights 1) and ``statistic(w)`` with
        ``w`` of shape ``[b, N]`` arrays with a leading axis b. Returns ``{name: [B, ...]}``.
        """
        blocks: dict[str, list[np.ndarray]] = {}
        for w in self.weights():
            for name, value in statistic(w).items():
                blocks.setdefault(name, []).append(np.asarray(value))
        return {name: np.concatenate(parts, axis=0) for name, parts in blocks.items()}


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN resamples -> ``(lo, hi, n_valid)``."""
    samples = np.asarray(samples, dtype=np.float64)
    alpha = (1 - level) / 2
    valid = np.isfinite(samples).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives NaN, on purpose
        lo = np.nanquantile(samples, alpha, axis=0)
        hi = np.nanquantile(samples, 1 - alpha, axis=0)
    return lo, hi, valid


def estimates(point: np.ndarray, samples: np.ndarray, level: float = 0.95) -> list[Estimate]:
    """One :class:`Estimate` per column of a ``[K]`` point / ``[B, K]`` samples pair."""
    point = np.atleast_1d(np.asarray(point, dtype=np.float64))
    samples = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    lo, hi, valid = percentile_ci(samples, level)
    return [Estimate(float(point[k]), float(lo[k]), float(hi[k]), level, int(valid[k])) for k in range(len(point))]


def verdict(name: str, est: Estimate, a: str = "B", b: str = "A", digits: int = 3) -> str:
    """One line, e.g. ``improved − baseline mean F1 = +0.043 (95% CI +0.012 to +0.071): improved is better``."""
    pct = f"{round(est.level * 100)}% CI"
    if np.isnan(est.value):
        return f"{a} − {b} {name}: undefined on these images"
    f = f"{{:+.{digits}f}}"
    head = f"{a} − {b} {name} = {f.format(est.value)} ({pct} {f.format(est.lo)} to {f.format(est.hi)})"
    if est.lo > 0:
        return f"{head}: {a} is better"
    if est.hi < 0:
        return f"{head}: {b} is better"
    return f"{head}: no significant difference"
