"""Server optimizers (fedpeft/serveropt.py, ``server.*``): FedAvgM, FedAdagrad, FedAdam, FedYogi over
a strategy's aggregate. The math against a hand computation, FedAvgM at lr 1 / momentum 0 against
the plain strategy through the server adapter, frozen factors untouched, the refusals, and a resume
that continues bit for bit. Pure tensors, in-process."""

import io
import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord

import strategies
from fedpeft import messages
from fedpeft.lora import LoraFactors, scaling_for
from fedpeft.server import FlowerAdapter
from fedpeft.serveropt import OptState, ServerOptimizer, ServerOptLayer
from strategies.base import ClientSpec, GlobalModel
from tests.harness import FakeGrid, config_error

SHAPES = {"l0.q": (6, 8), "l0.v": (5, 8)}
RANK, ALPHA = 4, 8.0
S = scaling_for(RANK, ALPHA)
NODES = {11: 0, 12: 1, 13: 2}


# ------------------------------------------------------------------ the math, by hand


def hand(kind, xs, deltas, lr, beta1=0.9, beta2=0.99, tau=1e-3, momentum=0.9):
    """Reddi et al. 2021, Algorithm 2 (and Hsu et al.'s FedAvgM), one float at a time, step by step."""
    out = []
    for i, x in enumerate(xs):
        m, v = 0.0, tau * tau
        traj = []
        for d in deltas:
            di = d[i]
            if kind == "fedavgm":
                m = momentum * m + di
                x = x + lr * m
            else:
                m = beta1 * m + (1 - beta1) * di
                if kind == "fedadagrad":
                    v = v + di * di
                elif kind == "fedyogi":
                    v = v - (1 - beta2) * di * di * math.copysign(1.0, v - di * di) * (v != di * di)
                else:
                    v = beta2 * v + (1 - beta2) * di * di
                x = x + lr * m / (math.sqrt(v) + tau)
            traj.append(x)
        out.append(traj)
    return [[t[k] for t in out] for k in range(len(deltas))]  # per step, the values


@pytest.mark.parametrize("kind, lr, beta1", [("fedavgm", 0.7, 0.9), ("fedadagrad", 0.1, 0.0), ("fedadagrad", 0.1, 0.5),
                                             ("fedadam", 0.1, 0.9), ("fedyogi", 0.01, 0.9)])
def test_first_two_steps_equal_a_hand_computation(kind, lr, beta1):
    x0 = [0.5, -1.0, 2.0, 0.0]
    d1 = [0.3, -0.02, 0.0, 1e-4]  # Δ_1 = aggregate_1 − x_0 (a zero entry: v moves by Δ² = 0 only)
    d2 = [-0.1, -0.05, 0.2, 1e-4]  # Δ_2 = aggregate_2 − x_1
    opt = ServerOptimizer(kind, lr, momentum=0.9, beta1=beta1, beta2=0.99, tau=1e-3)
    want = hand(kind, x0, [d1, d2], lr, beta1=beta1, momentum=0.9)
    x = {"t": torch.tensor(x0, dtype=torch.float64)}
    state = OptState()
    for step, d in enumerate((d1, d2)):
        agg = {"t": x["t"] + torch.tensor(d, dtype=torch.float64)}
        x, state = opt.step(x, agg, state)
        torch.testing.assert_close(x["t"], torch.tensor(want[step], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert state.steps == 2
    # the step is not the aggregate's: the optimizer did something (and Adam's is not Yogi's, ...)
    assert not torch.allclose(x["t"], agg["t"])


def test_fedadam_first_step_by_the_numbers():
    """Δ = 1 from x = 0, lr 0.1, β₁ 0.9, β₂ 0.99, τ 1e-3: m = 0.1, v = 0.99·1e-6 + 0.01, x = 0.1·0.1/(√v + 1e-3)."""
    x, _ = ServerOptimizer("fedadam", 0.1).step({"t": torch.zeros(1, dtype=torch.float64)}, {"t": torch.ones(1, dtype=torch.float64)}, OptState())
    assert x["t"].item() == pytest.approx(0.01 / (math.sqrt(0.01000099) + 1e-3), rel=1e-14)
    assert x["t"].item() == pytest.approx(0.099005, abs=1e-6)  # the paper's step: no bias correction


# ------------------------------------------------------------------ through the server adapter


def start_model(name, g):
    """Factors and a head; Fed-SB (peft=lora_xs) has no factors: its cores travel as the method's tensors (the head's)."""
    adapter = {m: LoraFactors(torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g), S) for m, (o, i) in SHAPES.items()}
    head = {"w": torch.randn(2, 8, generator=g), "b": torch.randn(2, generator=g)}
    if name == "fed_sb":
        adapter, head = {}, {**head, **{f"{m}.R": torch.randn(RANK, RANK, generator=g) for m in SHAPES}}
    return GlobalModel(adapter, head)


def make_adapter(name, optimizer=None, seed=0):
    st = strategies.build(name)
    return FlowerAdapter(st, start_model(name, torch.Generator().manual_seed(seed)), fraction=1.0, min_clients=1,
                         client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes={} if name == "fed_sb" else SHAPES, seed=0,
                         server_optimizer=optimizer)


def run_round(fa, rnd):
    """One round through ``fa``: each client adds seeded noise to the factors its plan trains and
    to the head, and replies with what its plan sends."""
    msgs = list(fa.configure_train(rnd, fa.arrays(), ConfigRecord(), FakeGrid(NODES)))
    out = []
    for m in msgs:
        node = m.metadata.dst_node_id
        spec, payload, _ = fa.sent[node]
        up_A, up_B = payload.plan.uplink
        g = torch.Generator().manual_seed(1000 * rnd + node)
        adapter = {n: LoraFactors(f.A + 0.1 * torch.randn(f.A.shape, generator=g), f.B + 0.1 * torch.randn(f.B.shape, generator=g), f.scaling)
                   for n, f in payload.adapter.items()}
        head = {h: t + 0.1 * torch.randn(t.shape, generator=g) for h, t in payload.head.items()}
        seed = {"A_seed": payload.plan.A_seed} if payload.plan.A_seed is not None else {}  # FFA-LoRA's A: regenerated, its seed echoed
        content = messages.encode(adapter, head, {"num-examples": 10 * NODES[node] + 3, **seed}, send_A=up_A, send_B=up_B)
        out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), has_error=lambda: False, content=content))
    fa.aggregate_train(rnd, out)
    assert fa.stats[rnd].applied and fa.stats[rnd].rejected == 0


def tensors(model):
    return {**{f"A/{n}": f.A for n, f in model.adapter.items()}, **{f"B/{n}": f.B for n, f in model.adapter.items()},
            **{f"head/{h}": t for h, t in model.head.items()}}


def same(a, b):
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["fedavg", "ffa_lora", "fedsa_lora", "rolora", "fed_sb"])
def test_fedavgm_at_lr_1_and_momentum_0_is_the_plain_strategy_exactly(name):
    plain, opt0 = make_adapter(name), make_adapter(name, ServerOptimizer("fedavgm", 1.0, momentum=0.0))
    opt9 = make_adapter(name, ServerOptimizer("fedavgm", 1.0))
    for rnd in (1, 2, 3):
        for fa in (plain, opt0, opt9):
            run_round(fa, rnd)
        assert same(plain.model, opt0.model), rnd
    assert opt0.server_opt.state.steps == 3
    assert not same(plain.model, opt9.model)  # momentum 0.9 does move it: the layer is applied


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_ffa_lora_A_stays_the_shared_A_and_B_moves(kind):
    server = SimpleNamespace(optimizer=kind, lr=None, momentum=0.9, beta1=None, beta2=0.99, tau=1e-3)  # the server group's defaults
    fa, plain = make_adapter("ffa_lora", ServerOptimizer.from_config(server)), make_adapter("ffa_lora")
    A0 = {n: f.A.clone() for n, f in fa.model.adapter.items()}
    for rnd in (1, 2):
        run_round(fa, rnd)
        run_round(plain, rnd)
    for n, f in fa.model.adapter.items():
        assert torch.equal(f.A, A0[n])  # FFA-LoRA's A: regenerated from its seed on every client, never moved
        assert not torch.equal(f.B, plain.model.adapter[n].B)
    assert not any(k.startswith("A/") for k in fa.server_opt.state.m)


@pytest.mark.usefixtures("task_identity")
def test_rolora_moves_only_the_factor_the_round_trained_and_keeps_the_other_moments():
    fa = make_adapter("rolora", ServerOptimizer("fedadam", 0.1))
    A0 = {n: f.A.clone() for n, f in fa.model.adapter.items()}
    run_round(fa, 1)  # first = B: only B trains
    assert all(torch.equal(f.A, A0[n]) for n, f in fa.model.adapter.items())
    B1 = {n: f.B.clone() for n, f in fa.model.adapter.items()}
    mB = {k: t.clone() for k, t in fa.server_opt.state.m.items() if k.startswith("B/")}
    assert mB and not any(k.startswith("A/") for k in fa.server_opt.state.m)
    run_round(fa, 2)  # A trains; B (and its moments) stay exactly
    assert all(torch.equal(f.B, B1[n]) for n, f in fa.model.adapter.items())
    assert all(not torch.equal(f.A, A0[n]) for n, f in fa.model.adapter.items())
    assert all(torch.equal(fa.server_opt.state.m[k], t) for k, t in mB.items())
    run_round(fa, 3)  # B again: the clients' frozen A equals the stepped global A (else RoLoRA rejects them)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["fedavgm", "fedyogi"])
def test_resume_continues_bit_for_bit(kind):
    a = make_adapter("fedavg", ServerOptimizer(kind, 0.5))
    for rnd in (1, 2):
        run_round(a, rnd)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    assert saved["server_optimizer"]["steps"] == 2 and saved["server_optimizer"]["kind"] == kind
    b, fresh = make_adapter("fedavg", ServerOptimizer(kind, 0.5), seed=9), make_adapter("fedavg", ServerOptimizer(kind, 0.5), seed=9)
    b.load_state_dict(saved)
    fresh.load_state_dict({k: v for k, v in saved.items() if k != "server_optimizer"})  # the model without the optimizer's state
    for fa in (a, b, fresh):
        run_round(fa, 3)
    assert same(a.model, b.model)
    assert all(torch.equal(a.server_opt.state.m[k], b.server_opt.state.m[k]) for k in a.server_opt.state.m)
    assert a.server_opt.state.steps == b.server_opt.state.steps == 3
    assert not same(a.model, fresh.model)  # the moments matter: without them the run goes elsewhere
    with pytest.raises(ValueError, match=r"^server.optimizer: the saved state is fedadam's, not"):
        make_adapter("fedavg", ServerOptimizer(kind, 0.5)).load_state_dict({**saved, "server_optimizer": {**saved["server_optimizer"], "kind": "fedadam"}})


def test_the_banner_line_names_what_each_optimizer_reads():
    assert ServerOptimizer("fedavgm", 1.0, momentum=0.9).describe() == "server optimizer: fedavgm, lr 1.0, momentum 0.9"
    assert ServerOptimizer("fedadagrad", 0.1, beta1=0.0).describe() == \
        "server optimizer: fedadagrad, lr 0.1, β₁ 0.0, τ 0.001 (Reddi et al. 2021, no bias correction)"
    assert ServerOptimizer("fedyogi", 0.01).describe() == "server optimizer: fedyogi, lr 0.01, β₁ 0.9, β₂ 0.99, τ 0.001 (Reddi et al. 2021, no bias correction)"


def test_a_tensor_that_changes_shape_is_refused():
    layer = ServerOptLayer(ServerOptimizer("fedadam", 0.1))
    f = {"m": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 1.0)}
    g = {"m": LoraFactors(torch.zeros(3, 3), torch.zeros(4, 3), 1.0)}
    with pytest.raises(ValueError, match=r"^server.optimizer: A/m is \(3, 3\) after aggregation, \(2, 3\) before"):
        layer.apply(f, {}, g, {})


# ------------------------------------------------------------------ the config


@pytest.mark.parametrize(
    "override, expected",
    [
        ("strategy=flora server.optimizer=fedadam", "server.optimizer: fedadam does not work with strategy=flora (it merges each round's"),
        ("strategy=flexlora server.optimizer=fedyogi", "server.optimizer: fedyogi does not work with strategy=flexlora (it re-factorises"),
        ("strategy=hetlora server.optimizer=fedavgm", "server.optimizer: fedavgm does not work with strategy=hetlora ("),
        ("strategy=fedex_lora server.optimizer=fedadagrad", "server.optimizer: fedadagrad does not work with strategy=fedex_lora ("),
        ("strategy=fedavg privacy=central privacy.noise_multiplier=1 strategy.weighting=uniform server.optimizer=fedadam",
         "server.optimizer: fedadam does not work with privacy.mode=central"),
        ("server.optimizer=adam", "server.optimizer: unknown value 'adam'; expected one of none, fedavgm, fedadagrad, fedadam, fedyogi"),
        ("server.optimizer=fedadam server.momentum=0.5", "server.momentum: applies to server.optimizer=fedavgm only, not server.optimizer=fedadam"),
        ("server.optimizer=fedadam server.tau=0", "server.tau: must be positive"),
        ("server.optimizer=fedavgm server.lr=-1", "server.lr: must be positive"),
    ],
)
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line
    if "does not work with strategy=" in expected:
        assert "; use strategy=dp_lora | fed_sb | fedavg | federa | fedsa_lora | ffa_lora | flasc | rolora, or server.optimizer=none" in line


@pytest.mark.parametrize("words, expected", [
    ([], None),
    (["server.optimizer=fedavgm"], ServerOptimizer("fedavgm", 1.0, momentum=0.9, beta1=0.0)),
    (["server.optimizer=fedadam"], ServerOptimizer("fedadam", 0.1, beta1=0.9, beta2=0.99, tau=1e-3)),
    (["server.optimizer=fedyogi", "server.tau=0.01"], ServerOptimizer("fedyogi", 0.01, beta1=0.9, tau=0.01)),
    (["server.optimizer=fedadagrad", "server.lr=0.3"], ServerOptimizer("fedadagrad", 0.3, beta1=0.0)),
    (["strategy=rolora", "server.optimizer=fedadam", "server.beta1=0.5"], ServerOptimizer("fedadam", 0.1, beta1=0.5)),
])
def test_the_server_group_composes_into_the_optimizer(words, expected, tmp_path):
    from fedpeft.composing import compose

    cfg = compose([*words, f"hydra.run.dir={tmp_path / 'run'}"])
    assert ServerOptimizer.from_config(cfg.server) == expected
