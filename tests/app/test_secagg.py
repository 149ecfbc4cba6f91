"""Secure aggregation through the real server and ClientApp in-process (``tests.harness.federate``
over Flower's wire format): Flower's ``secaggplus_mod`` outermost on every client's train handler,
the workflow's stages in the server's round loop. What reaches the strategy is the unmasked mean,
equal to the weighted mean of what the clients trained within SecAgg+'s quantization bound, and
never one client's update; a client that fails after sharing its keys (the fault profile) is
tolerated; the protocol's bytes are in each round's counts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.harness import federate

pytestmark = pytest.mark.usefixtures("task_identity", "one_torch_thread")


def test_a_fedavg_run_aggregates_securely_with_a_dropout(tmp_path, monkeypatch):
    from clients import app as client_app
    from fedpeft import messages
    from strategies.fedavg import FedAvg

    sent = {}  # (round, client) → (num-examples, the tensors its reply carried before the mods)
    plain = client_app.plain_reply

    def recording(msg, step, update, metrics):
        reply = plain(msg, step, update, metrics)
        sent[step.server_round, step.partition_id] = (update.num_examples,
                                                      {k: a.numpy().copy() for k, a in reply.content.array_records[messages.ARRAYS].items()})
        return reply

    received = []  # what the strategy's aggregate is given, each round
    aggregate = FedAvg.aggregate

    def intercept(self, model, updates):
        received.append([{**{f"A/{m}": f.A.numpy().copy() for m, f in u.adapter.items()}, **{f"B/{m}": f.B.numpy().copy() for m, f in u.adapter.items()},
                          **{f"head/{h}": t.numpy().copy() for h, t in u.head.items()}} for u in updates])
        out = aggregate(self, model, updates)
        return out

    monkeypatch.setattr(client_app, "plain_reply", recording)
    monkeypatch.setattr(FedAvg, "aggregate", intercept)
    # client 1 fails in round 1 after sharing its keys (the fault profile is inside Flower's mod: the collect stage)
    monkeypatch.setattr(client_app, "should_fail", lambda seed, rnd, pid, rate: (rnd, pid) == (1, 1))
    cfg, summary = federate(tmp_path, "clients=4", "rounds=2", "train.local_steps=2", "data.eval_samples=64", "tracking.save_adapters=false",
                            "secagg.enabled=true", "profile.failure_rate=0.01", wire=True)
    assert summary["status"] == "finished"
    r1, r2 = summary["history"][1:]
    assert (r1["clients_replied"], r1["clients_failed"], r1["round_applied"]) == (3, 1, 1)
    assert (r2["clients_replied"], r2["clients_failed"], r2["round_applied"]) == (4, 0, 1)
    assert len(received) == 2 and all(len(u) == 1 for u in received)  # one update a round: the unmasked mean
    for rnd, (got,) in zip((1, 2), received):
        clients = sorted(c for r, c in sent if r == rnd)
        assert clients == ([0, 2, 3] if rnd == 1 else [0, 1, 2, 3])
        n = {c: sent[rnd, c][0] for c in clients}
        mean = {k: sum(n[c] * sent[rnd, c][1][k].astype(np.float64) for c in clients) / sum(n.values()) for k in got}
        peak = max(float(np.abs(a).max()) for c in clients for a in sent[rnd, c][1].values())
        w = sum(n.values()) / max(n.values())  # ≥ Σ n_k / max_weight: max_weight is the largest partition
        tol = len(clients) * (2 * cfg.secagg.clipping_range + peak) / (cfg.secagg.quantization_range * w)
        for k, v in got.items():
            assert float(np.abs(v - mean[k]).max()) <= tol, (rnd, k)
            for c in clients:  # and it is no client's update
                assert not np.allclose(v, sent[rnd, c][1][k], atol=tol) or np.allclose(mean[k], sent[rnd, c][1][k], atol=tol), (rnd, k, c)
    for r in (r1, r2):  # the protocol's keys and shares are counted, besides the payloads and the masked vectors
        assert r["secagg_bytes_down"] > 0 and r["secagg_bytes_up"] > 0
        assert r["bytes_up"] > r["secagg_bytes_up"]
