import sys
from pathlib import Path

# The evaluation tests' fakes (a cache, a tiny bundle) and their real-sample cache fixture.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))

from evalfakes import nih_tiny_cache  # noqa: E402,F401 (a fixture)
