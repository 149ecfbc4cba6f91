"""FLASC through the real server and ClientApp (in-process, :func:`tests.harness.federate`): every
payload and every client's reply is the joint top-k at its density, k = ⌈d·N⌉ of the N entries
that travel, and the server accepts and aggregates the replies (the math against a hand
computation: tests/unit/test_flasc.py)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from fedpeft import messages
from fedpeft.server import FlowerAdapter
from tests.harness import federate


def entries(content) -> tuple[int, int]:
    """(index-value pairs sent, entries they stand for) of a top-k coded message."""
    record, cfg = content.array_records[messages.ARRAYS], content.config_records[messages.CONFIG]
    sent = sum(np.load(io.BytesIO(record[k].data)).size for k in record if k.endswith("#idx"))
    return sent, sum(math.prod(v) for k, v in cfg.items() if k.startswith("shape/"))


@pytest.mark.usefixtures("task_identity")
def test_flasc_sends_its_densities_both_ways_and_the_rounds_apply(tmp_path, monkeypatch):
    down, up = [], []
    configure, check = FlowerAdapter.configure_train, FlowerAdapter.check_reply

    def spy_configure(self, *a, **k):
        msgs = list(configure(self, *a, **k))
        down.extend(entries(m.content) for m in msgs)
        return msgs

    def spy_check(self, node, msg):
        up.append(entries(msg.content))
        return check(self, node, msg)

    monkeypatch.setattr(FlowerAdapter, "configure_train", spy_configure)
    monkeypatch.setattr(FlowerAdapter, "check_reply", spy_check)
    _, summary = federate(tmp_path, "strategy=flasc", "strategy.density_down=0.5", "strategy.density_up=0.1", "clients=2", "rounds=2",
                          "train.local_steps=2", "data.eval_samples=64")
    assert summary["rounds_applied"] == 2
    assert len(down) == len(up) == 4
    n = down[0][1]
    assert all(total == n for _, total in down + up) and n > 1000
    assert all(sent == math.ceil(0.5 * n) for sent, _ in down)
    assert all(sent == math.ceil(0.1 * n) for sent, _ in up)
