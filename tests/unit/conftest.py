"""The unit tier runs torch on one thread. Its tensors are small, and on this project's shared 2-core
machine a second intra-op thread only waits for the core the other processes hold: measured beside
three other test runs, the tier took 217 s with torch's default two threads and 81 s with one."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_per_unit_test(one_torch_thread):  # tests/conftest.py's fixture, for every unit test
    yield
