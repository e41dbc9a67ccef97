"""cxrvit: multi-label chest X-ray classification with the DINO ViT-Small/16."""
from cxrvit.labels import DEFAULT_LABELS, NIH_FINDINGS, SCORED_TARGETS

__version__ = "0.1.0"
__all__ = ["DEFAULT_LABELS", "NIH_FINDINGS", "SCORED_TARGETS", "__version__"]
