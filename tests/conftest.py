"""Shared fixtures: offline by default, and one pretrained organism for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPILLOVER_NO_PROGRESS", "1")

import pytest  # noqa: E402

from spillover.organism.model import Organism, load_organism  # noqa: E402


SHARED_DATA = Path(os.environ.get("SPILLOVER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""Reference data beside the checkout (../shared/data); tests that need it skip where it is absent."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def organism() -> Organism:
    """The default organism, pretrained once per machine (about 4 minutes, pinned kernels) and cached."""
    return load_organism()


@pytest.fixture(scope="module")
def one_thread():
    """A 360k-parameter model gains nothing from threads, and on a shared machine spinning
    OpenMP threads make it many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
