"""A templated (not generative) preliminary report: FINDINGS and IMPRESSION from a model's calls.

The commercial readers this project is compared with (KARA-CXR, Lunit INSIGHT CXR) hand the reader
a short and a full text. Ours is filled in from numbers only, so every sentence can be traced to a
probability, the bundle's tuned threshold (validation or cross-fitted) and the peak of a Grad-CAM map:

- a label is *called* when its probability is at or over its threshold (as ``cxrvit predict``);
- a call close to its threshold is *hedged* ("possible ...") and a near miss is said not to be
  excludable, because a small change in the image would flip it;
- the probability is named by a fixed band, and the location by the heat-map peak's side and zone;
- "no finding above threshold" is said in those words, never "normal": the model only looks for
  its labels;
- QC flags come first, because they say whether the rest means anything;
- a "No Finding" label (a bundle may have one) is never reported as a finding: it is left out of the findings,
  near misses and impression, and named only in the full form when nothing else is called;
- the same disclaimer closes both forms.

Used by ``cxrvit predict --report`` and by ``cxrvit serve``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

#: Probability bands, highest first: (lower bound, name).
BANDS = ((0.8, "very high"), (0.5, "high"), (0.2, "intermediate"), (0.0, "low"))
#: A call is hedged when its logit is within this distance of the threshold's logit. Logits, not
#: probabilities, because thresholds of weak models sit anywhere from 0.02 to 0.9 and a fixed
#: probability margin would be huge at one end and nothing at the other. 0.5 in logit is about
#: +-0.12 around a threshold of 0.5 and +-0.02 around 0.05.
NEAR_LOGIT = 0.5

DISCLAIMER = (
    "Machine-generated preliminary read by cxrvit; NOT A DIAGNOSIS. It must be checked by a qualified reader. "
    "The model only scores the labels listed, on one frontal image, at operating points tuned on held-out "
    "predictions of its training data (a validation split or cross-fitting); it cannot assess anything else (e.g. fractures, lines, tubes and devices, comparison with prior "
    "studies, clinical history, lateral views), and heat-map locations are approximate.")

#: Readable text for QC flags (``qc.py``); the flag's detail after ':' is appended.
QC_MESSAGES = {
    "not_radiograph": "not a projection radiograph (DICOM modality {detail})",
    "no_modality": "the DICOM header names no modality",
    "not_chest": "body part is not chest ({detail})",
    "lateral_view": "lateral view: the model was trained on frontal (PA/AP) films",
    "unusual_view": "unusual view position ({detail})",
    "low_resolution": "low resolution ({detail} px)",
    "unusual_aspect": "unusual aspect ratio ({detail}): may not be a whole chest film",
    "blank_image": "the image is (almost) blank",
    "possibly_inverted": "the image looks inverted (negative)",
    "auto_inverted": "re-inverted before scoring",
    "multi_frame": "multi-frame DICOM ({detail} frames): only the first frame was scored",
    "colour_converted": "a colour image (photometric {detail}) converted to grey before scoring",
    "exif_rotated": "stored rotated or mirrored: turned upright as its EXIF orientation tag ({detail}) says",
}
#: Flags after which the scores should not be read at all (the others are caveats).
SEVERE_FLAGS = frozenset({"not_radiograph", "not_chest", "lateral_view", "blank_image"})


def qc_message(flag: str) -> str:
    name, _, detail = flag.partition(":")
    template = QC_MESSAGES.get(name)
    return template.format(detail=detail) if template else flag


def is_no_finding(label: str) -> bool:
    """Whether ``label`` is the "No Finding" label (any case; spaces or underscores)."""
    return " ".join(label.replace("_", " ").split()).lower() == "no finding"


def band(p: float) -> str:
    return next(name for lower, name in BANDS if p >= lower)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclass
class LabelCall:
    label: str
    probability: float
    threshold: float
    call: bool  # at or over threshold
    near: bool  # within NEAR_LOGIT of the threshold, either side
    band: str
    peak: dict | None = None  # {"side": ..., "zone": ...} from the Grad-CAM peak, when computed

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def where(self) -> str:
        if not self.peak:
            return ""
        side = self.peak["side"]
        return f"{self.peak['zone']} zone, {'central' if side == 'central' else side + ' side'}"


def assess(probs: Mapping[str, float], thresholds: Mapping[str, float],
           peaks: Mapping[str, dict] | None = None) -> list[LabelCall]:
    """One :class:`LabelCall` per label, sorted by probability (highest first)."""
    peaks = peaks or {}
    out = []
    for label, p in probs.items():
        t = float(thresholds.get(label, 0.5))
        out.append(LabelCall(label, float(p), t, p >= t, abs(_logit(p) - _logit(t)) < NEAR_LOGIT, band(p),
                             peaks.get(label)))
    return sorted(out, key=lambda c: -c.probability)


def _finding_sentence(c: LabelCall, full: bool) -> str:
    name = c.label.replace("_", " ")
    where = f", {c.where}" if c.where else ""
    numbers = f"probability {c.probability:.2f}, operating point {c.threshold:.2f}" if full else f"{c.probability:.2f}"
    if c.near:
        return f"Possible {name} (borderline: {numbers}{where})."
    return f"{name} ({c.band}: {numbers}{where})."


def report_sections(calls: Sequence[LabelCall], qc_flags: Sequence[str] = (), full: bool = True) -> dict:
    """The report as sections: ``quality``, ``findings``, ``impression`` (lists of sentences)."""
    no_finding = [c for c in calls if is_no_finding(c.label)]
    calls = [c for c in calls if not is_no_finding(c.label)]  # findings only: "No Finding" is not one
    positive = [c for c in calls if c.call]
    quality = [qc_message(f) for f in qc_flags]
    severe = any(f.partition(":")[0] in SEVERE_FLAGS for f in qc_flags)
    findings = [_finding_sentence(c, full) for c in positive]
    if not positive:
        findings.append(f"No finding above threshold among the {len(calls)} labels assessed.")
        if full:
            findings += [f"The model's {c.label.replace('_', ' ')} label: probability {c.probability:.2f}, operating "
                         f"point {c.threshold:.2f}." for c in no_finding]
    if full:
        excluded = [c for c in calls if not c.call and c.near]
        findings += [f"{c.label.replace('_', ' ')} cannot be excluded (probability {c.probability:.2f}, just below "
                     f"operating point {c.threshold:.2f})." for c in excluded]
        below = [c.label.replace("_", " ") for c in calls if not c.call and not c.near]
        if below:
            findings.append("Below threshold: " + ", ".join(below) + ".")
    if positive:
        impression = ["; ".join(("possible " if c.near else "") + c.label.replace("_", " ") for c in positive) + "."]
        impression[0] = impression[0][0].upper() + impression[0][1:]
    else:
        impression = ["No finding above threshold."]
    if severe:
        impression.insert(0, "Input is probably not a frontal chest radiograph: findings from it are unreliable.")
    return {"quality": quality, "findings": findings, "impression": impression, "severe_qc": severe}


def render(calls: Sequence[LabelCall], qc_flags: Sequence[str] = (), full: bool = True) -> str:
    """The report as plain text; ``full=False`` is the short form."""
    s = report_sections(calls, qc_flags, full)
    lines = [f"PRELIMINARY REPORT ({'full' if full else 'short'} form)"]
    if s["quality"]:
        lines.append("INPUT QUALITY: " + "; ".join(s["quality"]) + ".")
    lines.append("FINDINGS: " + " ".join(s["findings"]))
    lines.append("IMPRESSION: " + " ".join(s["impression"]))
    lines.append(DISCLAIMER)
    return "\n".join(lines)
