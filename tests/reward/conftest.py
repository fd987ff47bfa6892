"""Fixtures for the judger tests: where the shared real data lives."""

from pathlib import Path

import pytest

# CI clones the repository with shared/ beside it: <repo>/../shared/data
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (it sits beside the repository in CI)")
    return SHARED_DATA
