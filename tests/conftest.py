"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in a module and its subprocesses (OMP_NUM_THREADS=1): float sums depend on the
    thread count, so bit-identical comparisons need the same one, and 2 threads on a busy 2-core CI
    machine make a 1 s extraction take 10-40 s. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
