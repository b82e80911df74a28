"Shared pytest set-up: the `slow` marker, and the repository root for tests that read the checkout."
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: heavy test; the quick developer command (`make dev`) leaves it out')

@pytest.fixture
def root(): return ROOT
