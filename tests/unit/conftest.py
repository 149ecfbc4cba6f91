"""The unit tier runs torch on one thread. Its tensors are small, and on this project's shared 2-core
machine a second intra-op thread only waits for the core the other processes hold: measured beside
three other test runs, the tier took 217 s with torch's default two threads and 81 s with one."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
