"""Reliability tests run tiny tensors: one intra-op thread is as fast, and keeps their timing
stable when the machine's cores are shared (oversubscribed OpenMP threads spin)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
