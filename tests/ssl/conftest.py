"""The SSL tests' one fixture; the fakes it builds on live in ``sslfakes.py``."""
import pytest

from sslfakes import ArrayCache, load_tiny


@pytest.fixture(scope="session")
def tiny_cache() -> ArrayCache:
    return load_tiny(48)
