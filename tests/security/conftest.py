import pytest

from .canary import Canary


@pytest.fixture
def canary(tmp_path):
    """Precious files outside the folders under test (``tmp_path / "outside"``)."""
    return Canary(tmp_path / "outside")
