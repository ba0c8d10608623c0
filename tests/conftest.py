import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

# Under pytest-xdist each worker gets one core: two workers with two threads each on a 2-core
# machine spend most of their time waiting for time slices.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored after: tiny models gain nothing from more."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One intra-op thread for a whole module (its module-scoped fixtures included): on a shared
    2-core machine a serving engine thread's OpenMP workers competing with the test's threads
    slow these tests tens of times."""
    with _torch_threads(1):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
