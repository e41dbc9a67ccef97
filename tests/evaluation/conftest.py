import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for ``evalfakes`` (tests/ has no __init__.py)

from evalfakes import FakeCache, nih_tiny_cache  # noqa: E402,F401 (a fixture, shared with tests/experiments)


@pytest.fixture
def cache():
    return FakeCache()
