import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for ``evalfakes`` (tests/ has no __init__.py)

from evalfakes import FakeCache  # noqa: E402


@pytest.fixture
def cache():
    return FakeCache()
