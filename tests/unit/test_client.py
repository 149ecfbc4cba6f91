"""A client's batch order and injected failures: seeded, on no model (local training and the model
plumbing: tests/app/test_client.py)."""

from clients import app as client_app
from clients.train import batch_order


def test_batch_order_is_seeded_and_covers_each_pass_once():
    a = list(batch_order(10, 5, 4, seed=3))
    assert a == list(batch_order(10, 5, 4, seed=3))
    assert a != list(batch_order(10, 5, 4, seed=4))
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first pass is a permutation
    assert [len(b) for b in a] == [4, 4, 4, 4, 4]
    assert [len(b) for b in batch_order(3, 2, 8, seed=0)] == [3, 3]  # a tiny partition: whole batches


def test_injected_failures_are_seeded_and_match_the_rate():
    fails = [client_app.should_fail(0, r, c, 0.3) for r in range(1, 21) for c in range(50)]
    assert fails == [client_app.should_fail(0, r, c, 0.3) for r in range(1, 21) for c in range(50)]
    assert 0.25 < sum(fails) / len(fails) < 0.35
    assert not any(client_app.should_fail(0, r, c, 0.0) for r in range(5) for c in range(5))
