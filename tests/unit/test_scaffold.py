"""SCAFFOLD's control variates (``strategy.scaffold``, :mod:`fedpeft.scaffold`): two clients, two
rounds of SGD on quadratics against numbers worked out by hand; the server's update with a partial
sample; the plan's wire key; the server's state; and the one-line refusals (strategies whose factors'
change is not the update, heterogeneous ranks, local and central DP, the cohort engine)."""

from __future__ import annotations

import pytest
import torch

import strategies
from fedpeft import messages
from fedpeft.plan import KEYS, ClientPlan
from fedpeft.scaffold import ControlVariates, client_update, correction
from tests.harness import config_error
from tests.unit.test_plan import payloads

TAKERS = ["dp_lora", "fed_sb", "fedavg", "federa", "fedsa_lora", "ffa_lora", "rolora"]


def local_sgd(x: torch.Tensor, b: torch.Tensor, corr: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """K SGD steps on f(y) = ½‖y − b‖² (gradient y − b) with SCAFFOLD's corrected gradient g − c_i + c."""
    y = x.clone()
    for _ in range(steps):
        y = y - lr * ((y - b) + corr)
    return y


def test_two_clients_two_rounds_of_sgd_equal_a_hand_computation():
    """N = 2 clients, both sampled, K = 2 steps at η = 0.5, f_1 = ½(y − 2)², f_2 = ½(y + 4)², x = 0.

    Round 1 (c = c_i = 0): client 1 goes 0 → 1 → 1.5, client 2 0 → −2 → −3; c_1 = (0 − 1.5)/1 = −1.5,
    c_2 = 3; x = mean(1.5, −3) = −0.75, c = 2/2 · mean(−1.5, 3) = 0.75.
    Round 2: client 1 corrects by c − c_1 = 2.25: −0.75 → −0.5 → −0.375; c_1 = −1.5 − 0.75 + (−0.75 + 0.375)
    = −2.625 (Δ −1.125). Client 2 by −2.25: −0.75 → −1.25 → −1.5; c_2 = 3 − 0.75 + 0.75 = 3 (Δ 0).
    x = −0.75 + mean(0.375, −0.75) = −0.9375, c = 0.75 + mean(−1.125, 0) = 0.1875."""
    K, lr = 2, 0.5
    b = {1: torch.tensor([2.0]), 2: torch.tensor([-4.0])}
    server = ControlVariates(num_clients=2)
    x = torch.tensor([0.0])
    c_i: dict[int, dict] = {1: {}, 2: {}}
    want = [  # per round: (y_1, y_2, c_1, c_2, x, c)
        (1.5, -3.0, -1.5, 3.0, -0.75, 0.75),
        (-0.375, -1.5, -2.625, 3.0, -0.9375, 0.1875),
    ]
    for y1_want, y2_want, c1_want, c2_want, x_want, c_want in want:
        c = server.for_client({"B/m": (1,)})
        ys, deltas = {}, []
        for i in (1, 2):
            corr = correction(c, c_i[i])["B/m"]
            ys[i] = local_sgd(x, b[i], corr, K, lr)
            c_i[i], delta = client_update(c_i[i], c, {"B/m": x}, {"B/m": ys[i]}, K, lr)
            deltas.append(delta)
        x = torch.stack([ys[1], ys[2]]).mean(dim=0)  # η_g = 1: FedAvg's mean
        server.apply(deltas)
        got = (ys[1], ys[2], c_i[1]["B/m"], c_i[2]["B/m"], x, server.c["B/m"])
        for g, w in zip(got, (y1_want, y2_want, c1_want, c2_want, x_want, c_want)):
            assert float(g) == pytest.approx(w, abs=1e-7)
        assert float(server.c["B/m"]) == pytest.approx(float(c_i[1]["B/m"] + c_i[2]["B/m"]) / 2, abs=1e-7)  # c = mean c_i


def test_the_server_scales_the_mean_delta_by_the_sampled_share_and_keeps_other_keys():
    server = ControlVariates(num_clients=4)
    server.c = {"A/m": torch.tensor([1.0, 1.0]), "B/m": torch.tensor([5.0])}
    server.apply([{"A/m": torch.tensor([2.0, 0.0])}, {"A/m": torch.tensor([4.0, -2.0])}])  # |S| = 2 of N = 4
    assert server.c["A/m"].tolist() == [1.0 + 0.5 * 3.0, 1.0 + 0.5 * -1.0]
    assert server.c["B/m"].tolist() == [5.0]  # not trained this round (RoLoRA's other factor): kept
    assert server.for_client({"A/m": (2,), "head/h": (3,)})["head/h"].tolist() == [0.0, 0.0, 0.0]  # new key: 0
    with pytest.raises(ValueError, match="c of A/m is \\(2,\\), the client trains \\(3,\\)"):
        server.for_client({"A/m": (3,)})


def test_the_client_keeps_the_variates_of_tensors_it_did_not_train():
    old = {"A/m": torch.tensor([1.0]), "B/m": torch.tensor([7.0])}
    new, delta = client_update(old, {"A/m": torch.tensor([0.5])}, {"A/m": torch.tensor([2.0])}, {"A/m": torch.tensor([1.0])}, 4, 0.25)
    assert new["A/m"].tolist() == [1.0 - 0.5 + (2.0 - 1.0) / (4 * 0.25)] and delta["A/m"].tolist() == [0.5]
    assert new["B/m"] is old["B/m"] and set(delta) == {"A/m"}
    assert correction({"A/m": torch.tensor([0.5])}, {}) == {"A/m": torch.tensor([0.5])}  # c_i = 0 before its first round


@pytest.mark.parametrize("name", TAKERS)
def test_every_strategy_that_takes_it_sends_the_flag_and_off_sends_nothing(name):
    assert strategies.REGISTRY[name].takes_scaffold()
    for label, p in payloads(name, scaffold=True):
        cfg = p.plan.to_config()
        assert cfg["scaffold"] is True and p.plan.scaffold, label
        assert ClientPlan.from_config(cfg) == p.plan and set(cfg) <= KEYS, label
    for (label, p), (_, q) in zip(payloads(name), payloads(name, scaffold=False)):
        assert q.plan == p.plan and "scaffold" not in q.plan.to_config(), label


def test_only_the_factor_space_strategies_take_it():
    assert sorted(n for n, c in strategies.REGISTRY.items() if c.takes_scaffold()) == TAKERS


def test_the_control_record_is_checked_before_it_is_read():
    from flwr.app import RecordDict

    content = RecordDict({"scaffold": messages.encode_control({"A/m": torch.ones(2, 3)})})
    assert messages.decode_control(content, {"A/m": (2, 3)})["A/m"].tolist() == [[1.0] * 3] * 2
    with pytest.raises(messages.UpdateError, match="expected float32 \\(3, 2\\)"):
        messages.decode_control(content, {"A/m": (3, 2)})
    with pytest.raises(messages.UpdateError, match="fewer arrays"):
        messages.decode_control(content, {"A/m": (2, 3), "B/m": (3, 2)})
    bad = RecordDict({"scaffold": messages.encode_control({"A/m": torch.tensor([float("nan")])})})
    with pytest.raises(messages.UpdateError, match="non-finite"):
        messages.decode_control(bad, {"A/m": (1,)})
    with pytest.raises(messages.UpdateError, match="'scaffold' array record"):
        messages.decode_control(RecordDict(), {"A/m": (1,)})


def test_the_server_state_round_trips_and_refuses_another_number_of_clients():
    a = ControlVariates(3)
    a.apply([{"B/m": torch.tensor([3.0])}])
    b = ControlVariates(3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.c["B/m"], a.c["B/m"]) and float(b.c["B/m"]) == 1.0
    with pytest.raises(ValueError, match="of 3 clients, this run has 4"):
        ControlVariates(4).load_state_dict(a.state_dict())


@pytest.mark.parametrize("override, expected", [
    ("strategy=hetlora strategy.scaffold=true",
     "strategy.scaffold: SCAFFOLD's control variates do not work with strategy=hetlora (its clients' ranks differ and shrink"),
    ("strategy=flora strategy.scaffold=true", "strategy.scaffold: SCAFFOLD's control variates do not work with strategy=flora (it merges"),
    ("strategy=flexlora strategy.scaffold=true", "strategy.scaffold: SCAFFOLD's control variates do not work with strategy=flexlora (it re-factorises"),
    ("strategy=fedex_lora strategy.scaffold=true",
     "strategy.scaffold: SCAFFOLD's control variates do not work with strategy=fedex_lora (it folds each round's residual"),
    ("strategy=hetlora strategy.scaffold=true", "; use strategy=" + " | ".join(TAKERS) + ", or strategy.scaffold=false"),
    ("strategy=ffa_lora ranks=heavy_tail strategy.scaffold=true",
     "strategy.scaffold: SCAFFOLD keeps one control variate per tensor, of one shape, but ranks.kind=tiers gives ranks"),
    ("strategy.scaffold=true privacy=local", "strategy.scaffold: SCAFFOLD does not compose with privacy.mode=local: Δc_i"),
    ("strategy.scaffold=true privacy=central", "strategy.scaffold: SCAFFOLD does not compose with privacy.mode=central: Δc_i"),
    ("strategy.scaffold=true engine.kind=cohort",
     "strategy.scaffold: SCAFFOLD's control variates (each client's c_i, its own state) are not batched by engine.kind=cohort: "
     "use engine.kind=per_client, or strategy.scaffold=false"),
    ("strategy.scaffold=maybe", "strategy.scaffold: Value 'maybe' is not a valid bool"),
])
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line


def test_the_cohort_trainer_refuses_a_plan_with_control_variates_in_one_line():
    from clients.cohort import CohortError, CohortJob, _check_jobs
    from strategies.base import Payload

    class LM:  # what _check_jobs reads of the model
        base_version, head = 0, {}

    job = CohortJob(client_id=1, payload=Payload({}, plan=ClientPlan(scaffold=True)), data=[0], seed=0)
    with pytest.raises(CohortError) as e:
        _check_jobs(LM(), [job])
    assert str(e.value) == ("strategy.scaffold (SCAFFOLD's control variates): the cohort engine does not batch them; "
                            "use engine.kind=per_client, or strategy.scaffold=false")


def test_a_run_saved_before_scaffold_resumes_and_turning_it_on_is_a_changed_key():
    """A run saved before ``strategy.scaffold`` existed resumes (false is its default); resuming with
    scaffold turned on (no control variates in the state) or off is refused like any changed key."""
    from omegaconf import OmegaConf

    from fedpeft.composing import compose
    from fedpeft.config import schema
    from fedpeft.serverapp import changed_keys

    defaults = OmegaConf.to_container(OmegaConf.structured(schema()))
    new = OmegaConf.to_container(compose([]), resolve=True)
    old = OmegaConf.to_container(compose([]), resolve=True)
    del old["strategy"]["scaffold"]  # saved by a fedpeft without SCAFFOLD
    assert changed_keys(old, new, defaults=defaults) == []
    on = OmegaConf.to_container(compose(["strategy.scaffold=true"]), resolve=True)
    assert changed_keys(new, on, defaults=defaults) == ["strategy.scaffold"] == changed_keys(on, new, defaults=defaults)
