"""The cohort engine's grouping of clients into forward passes (clients/cohort.py), on lengths alone
(the engine against the per-client engine, on real models: tests/app/test_cohort.py)."""

import pytest

from clients.cohort import CohortError


def test_forward_passes_group_similar_lengths_and_respect_the_token_cap():
    from clients.cohort import _passes

    lengths, counts = [16, 15, 10, 9, 16], [4, 4, 4, 4, 2]
    assert _passes(lengths, counts, None, None) == [[0, 1, 2, 3, 4]]
    assert _passes(lengths, counts, 0.1, None) == [[0, 1, 4], [2, 3]]  # 10 < 0.9·16 opens a pass; 9 ≥ 0.9·10 joins it
    assert _passes(lengths, counts, 0.0, None) == [[0, 4], [1], [2], [3]]
    assert _passes(lengths, counts, None, 100) == [[0, 4], [1], [2, 3]]  # (4+2)·16 = 96 ≤ 100 < (6+4)·16
    with pytest.raises(CohortError, match="pad_tolerance"):
        _passes(lengths, counts, 1.5, None)
