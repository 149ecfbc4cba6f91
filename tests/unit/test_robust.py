"""Robust aggregation (fedpeft/robust.py, ``server.robust``) and Byzantine attacks (fedpeft/attacks.py,
``profile.byzantine``): each rule against an independent computation (numpy's median, scipy's
trim_mean, Krum's scores by brute force over Python floats, effective-update distances from dense
matrices), the rules through the server adapter over the strategies they apply to, the attacks by
their formulas, a toy round where the median resists sign-flipping attackers and FedAvg does not,
and the refusals. Pure tensors, in-process."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from scipy import stats

import strategies
from fedpeft import attacks, messages
from fedpeft.lora import LoraFactors, scaling_for
from fedpeft.robust import RobustRule, coordinate_median, effective_sq_distances, krum_scores, krum_select, sq_distances, trimmed_mean
from fedpeft.server import FlowerAdapter, robust_aggregate
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from tests.harness import FakeGrid, config_error

SHAPES = {"l0.q": (6, 8), "l0.v": (5, 8)}
RANK, ALPHA = 4, 8.0
S = scaling_for(RANK, ALPHA)
NODES = {10 + i: i for i in range(7)}


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ the rules against independent computations


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9])
def test_median_is_numpys(n):
    xs = [rand(3, 4, seed=i) for i in range(n)]
    want = np.median(np.stack([x.numpy() for x in xs]), axis=0)
    np.testing.assert_allclose(coordinate_median(xs).numpy(), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n, beta", [(10, 0.1), (10, 0.2), (10, 0.25), (7, 0.3), (5, 0.49), (4, 0.0)])
def test_trimmed_mean_is_scipys(n, beta):
    xs = [rand(2, 5, seed=100 + i) for i in range(n)]
    want = stats.trim_mean(np.stack([x.numpy() for x in xs]), beta, axis=0)
    np.testing.assert_allclose(trimmed_mean(xs, beta).numpy(), want, rtol=1e-13, atol=1e-15)


def test_trimmed_mean_at_beta_0_is_the_mean_and_identical_tensors_come_back_bit_for_bit():
    xs = [rand(4, 3, seed=i).float() for i in range(6)]
    torch.testing.assert_close(trimmed_mean(xs, 0.0), torch.stack(xs).mean(0), rtol=1e-6, atol=1e-7)
    frozen = torch.tensor([0.1, 0.7, 1 / 3])  # (3·x)/3 need not round back to x
    for out in (trimmed_mean([frozen] * 3, 0.0), coordinate_median([frozen] * 4)):
        assert out is frozen
    with pytest.raises(ValueError, match="same-shaped"):
        coordinate_median([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"^server.trim_beta: must be in \[0, 0.5\)"):
        trimmed_mean(xs, 0.5)


def brute_krum(points, f, m):
    """Blanchard et al.'s Krum from the definition, on lists of Python floats."""
    n = len(points)
    d = [[sum((a - b) ** 2 for a, b in zip(points[i], points[j])) for j in range(n)] for i in range(n)]
    scores = [sum(sorted(d[i][j] for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]
    return scores, sorted(range(n), key=lambda i: (scores[i], i))[:m]


@pytest.mark.parametrize("n, f, m", [(7, 2, 1), (10, 2, 1), (10, 2, 8), (10, 3, 4), (5, 0, 5)])
def test_krum_and_multi_krum_are_the_brute_force_ones(n, f, m):
    g = torch.Generator().manual_seed(n * 10 + f)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    X[: f] += 5.0  # f far-off clients
    points = X.tolist()
    scores, chosen = brute_krum(points, f, m)
    d2 = sq_distances([[x[:2], x[2:].reshape(2, 2)] for x in X])  # each client as two tensors
    np.testing.assert_allclose(d2.numpy(), [[sum((a - b) ** 2 for a, b in zip(p, q)) for q in points] for p in points], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(krum_scores(d2, f).numpy(), scores, rtol=1e-12)
    assert krum_select(d2, f, m) == chosen
    assert not set(chosen) & set(range(f)) or m > n - 2 * f  # the far-off clients are not kept
    rule = RobustRule("krum" if m == 1 else "multi_krum", f=f, m=m)
    assert rule.select(d2) == sorted(chosen)
    with pytest.raises(ValueError, match=r"^server.multi_krum_m: must be in \[1, n - f\]"):
        krum_select(d2, f, n - f + 1)
    with pytest.raises(ValueError, match=r"^server.krum_f: Krum scores need n >= f \+ 3"):
        krum_scores(d2[:f + 2, :f + 2], f)


def test_multi_krum_keeps_n_minus_f_by_default():
    assert RobustRule("multi_krum", f=2).kept(10) == 8 and RobustRule("multi_krum", f=2, m=3).kept(10) == 3
    assert RobustRule("multi_krum", f=2, m=9).kept(10) == 8 and RobustRule("krum", f=2).kept(10) == 1
    assert RobustRule("krum", f=2).min_updates() == 5 and RobustRule("median").min_updates() == 1


def test_effective_distances_are_the_dense_ones_at_different_ranks():
    ranks = [4, 2, 3, 4]
    modules = [[LoraFactors(rand(r, i, seed=10 * k + r), rand(o, r, seed=10 * k + r + 5), scaling_for(r, ALPHA)) for k, r in enumerate(ranks)]
               for (o, i) in SHAPES.values()]
    heads = [[rand(2, 3, seed=50 + k)] for k in range(len(ranks))]
    dense = [torch.cat([torch.cat([(f.scaling * f.B @ f.A).reshape(-1) for f in (m[k] for m in modules)]), heads[k][0].reshape(-1)])
             for k in range(len(ranks))]
    want = [[float(((a - b) ** 2).sum()) for b in dense] for a in dense]
    np.testing.assert_allclose(effective_sq_distances(modules, heads).numpy(), want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ through the server adapter


def start_model(name, g):
    adapter = {m: LoraFactors(torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g), S) for m, (o, i) in SHAPES.items()}
    head = {"w": torch.randn(2, 8, generator=g), "b": torch.randn(2, generator=g)}
    if name == "fed_sb":
        adapter, head = {}, {**head, **{f"{m}.R": torch.randn(RANK, RANK, generator=g) for m in SHAPES}}
    return GlobalModel(adapter, head)


def make_adapter(name, robust=None, **kw):
    st = strategies.build(name, **kw)
    return FlowerAdapter(st, start_model(name, torch.Generator().manual_seed(0)), fraction=1.0, min_clients=1,
                         client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes={} if name == "fed_sb" else SHAPES, seed=0, robust=robust)


def replies(fa, rnd, move=lambda node, t, g: t + 0.1 * torch.randn(t.shape, generator=g)):
    """Each client moves the factors its plan trains and the head (``move``), and replies what its plan sends."""
    out = []
    for m in fa.configure_train(rnd, fa.arrays(), ConfigRecord(), FakeGrid(NODES)):
        node = m.metadata.dst_node_id
        _, payload, _ = fa.sent[node]
        up_A, up_B = payload.plan.uplink
        g = torch.Generator().manual_seed(1000 * rnd + node)
        adapter = {n: LoraFactors(move(node, f.A, g) if up_A else f.A, move(node, f.B, g) if up_B else f.B, f.scaling) for n, f in payload.adapter.items()}
        head = {h: move(node, t, g) for h, t in payload.head.items()}
        seed = {"A_seed": payload.plan.A_seed} if payload.plan.A_seed is not None else {}
        content = messages.encode(adapter, head, {"num-examples": 10 * NODES[node] + 3, **seed}, send_A=up_A, send_B=up_B)
        out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=""), has_error=lambda: False, content=content))
    return out


def tensors(model):
    return {**{f"A/{n}": f.A for n, f in model.adapter.items()}, **{f"B/{n}": f.B for n, f in model.adapter.items()},
            **{f"head/{h}": t for h, t in model.head.items()}}


def received(fa, msgs, rnd):
    """The updates the adapter decoded from ``msgs`` (in partition order), checked as it checks them."""
    return [fa.check_reply(m.metadata.src_node_id, m)[0] for m in sorted(msgs, key=lambda m: NODES[m.metadata.src_node_id])]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["fedavg", "ffa_lora", "fedsa_lora", "rolora", "fed_sb"])
@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
def test_coordinate_wise_rules_take_every_trained_tensor_over_the_clients(name, kind):
    rule = RobustRule(kind, beta=0.2)
    fa = make_adapter(name, rule)
    before = fa.model
    for rnd in (1, 2):  # RoLoRA: B, then A
        msgs = replies(fa, rnd)
        ups = received(fa, msgs, rnd)
        prev = fa.model
        fa.aggregate_train(rnd, msgs)
        assert fa.stats[rnd].applied and fa.stats[rnd].rejected == 0
        got, old = tensors(fa.model), tensors(prev)
        for key, t in got.items():
            part, _, mod = key.partition("/")
            vals = [u.head[mod] for u in ups] if part == "head" else [getattr(u.adapter[mod], part) for u in ups]
            stacked = np.stack([v.double().numpy() for v in vals])
            want = np.median(stacked, axis=0) if kind == "median" else stats.trim_mean(stacked, 0.2, axis=0)
            if name == "ffa_lora" and part == "B":
                want = S * want  # FFA-LoRA keeps s·B at scaling 1
            if all(torch.equal(v, vals[0]) for v in vals):  # a factor no client trained: the strategy's own
                assert torch.equal(t, old[key]), key
            else:
                np.testing.assert_allclose(t.double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert tensors(fa.model).keys() == tensors(before).keys()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["fedavg", "rolora", "ffa_lora"])
def test_trimmed_mean_at_beta_0_is_the_plain_strategy_with_uniform_weights(name):
    plain = make_adapter(name, weighting="uniform")
    robust = make_adapter(name, RobustRule("trimmed_mean", beta=0.0), weighting="uniform")
    for rnd in (1, 2):
        plain.aggregate_train(rnd, replies(plain, rnd))
        robust.aggregate_train(rnd, replies(robust, rnd))
        a, b = tensors(plain.model), tensors(robust.model)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind, m", [("krum", None), ("multi_krum", None), ("multi_krum", 3)])
def test_krum_keeps_the_honest_clients_and_the_strategy_aggregates_them(kind, m):
    bad = {10, 13}  # partitions 0 and 3 send far-off updates
    move = lambda node, t, g: t + (20.0 if node in bad else 0.1) * torch.randn(t.shape, generator=g)  # noqa: E731
    fa = make_adapter("fedavg", RobustRule(kind, f=2, m=m))
    msgs = replies(fa, 1, move)
    ups = received(fa, msgs, 1)
    fa.aggregate_train(1, msgs)
    vectors = [[t for n in sorted(u.adapter) for t in (u.adapter[n].A, u.adapter[n].B)] + [u.head[h] for h in sorted(u.head)] for u in ups]
    X = [torch.cat([t.reshape(-1).double() for t in v]).tolist() for v in vectors]
    keep = {"krum": 1, "multi_krum": m or len(ups) - 2}[kind]
    _, chosen = brute_krum(X, 2, keep)
    assert not {0, 3} & set(chosen) and fa.stats[1].train_metrics["robust_kept"] == keep
    want = strategies.build("fedavg").aggregate(make_adapter("fedavg").model, [ups[i] for i in sorted(chosen)])
    a, b = tensors(want), tensors(fa.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("task_identity")
def test_a_round_with_fewer_replies_than_krum_scores_need_is_not_applied():
    fa = make_adapter("fedavg", RobustRule("krum", f=3))  # needs f + 3 = 6 replies
    msgs = replies(fa, 1)
    before = tensors(fa.model)
    fa.aggregate_train(1, msgs[:5])
    assert not fa.stats[1].applied and all(torch.equal(t, before[k]) for k, t in tensors(fa.model).items())


def test_krum_on_effective_updates_for_heterogeneous_ranks():
    """HetLoRA's clients at ranks 4, 2, 3, 4, 2, 3: Krum measures s_k·B_k·A_k (the dense distances)
    and hands HetLoRA the kept clients' updates."""
    ranks = [4, 2, 3, 4, 2, 3]
    ups = []
    for k, r in enumerate(ranks):
        scale = 30.0 if k == 1 else 0.1
        adapter = {m: LoraFactors(rand(r, i, seed=k * 7 + 1).float(), scale * rand(o, r, seed=k * 7 + 2).float(), scaling_for(r, ALPHA))
                   for m, (o, i) in SHAPES.items()}
        ups.append(ClientUpdate(client_id=k, adapter=adapter, head={}, num_examples=10))
    hetlora = strategies.build("hetlora")
    model = GlobalModel({m: LoraFactors(torch.zeros(4, i), torch.zeros(o, 4), scaling_for(4, ALPHA)) for m, (o, i) in SHAPES.items()}, {})
    dense = [torch.cat([(f.scaling * f.B.double() @ f.A.double()).reshape(-1) for f in u.adapter.values()]).tolist() for u in ups]
    _, chosen = brute_krum(dense, 1, 4)
    out, kept = robust_aggregate(RobustRule("multi_krum", f=1, m=4), hetlora, model, ups)
    assert kept == sorted(chosen) and 1 not in kept
    want = hetlora.aggregate(model, [ups[i] for i in kept])
    assert all(torch.equal(tensors(out)[k], t) for k, t in tensors(want).items())


def test_the_median_resists_sign_flipping_attackers_where_the_mean_does_not():
    """Ten clients whose honest updates scatter around a common Δ; the two attackers of the seed
    send θ_g − Δ_k (:func:`fedpeft.attacks.attack`). FedAvg's update shrinks to about 0.6·Δ;
    the median's and the trimmed mean's stay near Δ, Krum keeps an honest client."""
    g = {"t": rand(200, seed=0)}
    delta = rand(200, seed=1)
    bad = attacks.attackers(0, 10, 0.2)
    assert len(bad) == 2
    sent = []
    for k in range(10):
        honest = {"t": g["t"] + delta + 0.3 * rand(200, seed=10 + k)}
        sent.append(attacks.attack("sign_flip", honest, g) if k in bad else honest)
    err = lambda x: float((x - g["t"] - delta).norm() / delta.norm())  # noqa: E731
    mean = torch.stack([s["t"] for s in sent]).mean(0)
    assert err(mean) > 0.35
    assert err(coordinate_median([s["t"] for s in sent])) < 0.15
    assert err(trimmed_mean([s["t"] for s in sent], 0.2)) < 0.15
    kept = RobustRule("krum", f=2).select(sq_distances([[s["t"]] for s in sent]))
    assert not set(kept) & bad


# ------------------------------------------------------------------ the attacks


def test_attackers_are_a_fixed_seeded_share_of_the_clients():
    a = attacks.attackers(3, 10, 0.2)
    assert a == attacks.attackers(3, 10, 0.2) and len(a) == 2 and a <= set(range(10))
    assert len({attacks.attackers(s, 10, 0.2) for s in range(20)}) > 5  # the seed draws them
    assert [attacks.attacker_count(b, 10) for b in (0.0, 0.04, 0.05, 0.2, 0.25, 0.5)] == [0, 0, 1, 2, 3, 5]
    assert attacks.attackers(0, 10, 0.0) == frozenset()


def test_each_attack_by_its_formula():
    start = {"A/m": rand(3, 4, seed=0), "head/w": rand(2, seed=1)}
    sent = {k: t + rand(*t.shape, seed=7) for k, t in start.items()}
    flip = attacks.attack("sign_flip", sent, start)
    scale = attacks.attack("scale", sent, start, scale=-3.0)
    fixed = attacks.attack("fixed", sent, start, value=0.25)
    noise = attacks.attack("gaussian", {"x": torch.zeros(20000)}, {"x": torch.ones(20000)}, std=0.5, generator=torch.Generator().manual_seed(0))
    for k in start:
        assert torch.equal(flip[k], 2 * start[k] - sent[k])
        torch.testing.assert_close(scale[k], start[k] - 3.0 * (sent[k] - start[k]))
        assert torch.equal(fixed[k], torch.full_like(sent[k], 0.25))
    eps = noise["x"] - 1
    assert abs(float(eps.mean())) < 4 * 0.5 / math.sqrt(20000) and abs(float(eps.std()) / 0.5 - 1) < 4 / math.sqrt(2 * 20000)
    again = attacks.attack("gaussian", {"x": torch.zeros(20000)}, {"x": torch.ones(20000)}, std=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["x"], noise["x"])
    with pytest.raises(ValueError, match=r"^profile.attack: unknown value 'nope'"):
        attacks.attack("nope", sent, start)


# ------------------------------------------------------------------ the config


@pytest.mark.parametrize(
    "override, expected",
    [
        ("strategy=flora server.robust=median", "server.robust: median does not work with strategy=flora (it merges the stacked products"),
        ("strategy=flexlora server.robust=trimmed_mean", "server.robust: trimmed_mean does not work with strategy=flexlora ("),
        ("strategy=hetlora server.robust=median", "server.robust: median does not work with strategy=hetlora ("),
        ("strategy=fedex_lora server.robust=median", "server.robust: median does not work with strategy=fedex_lora ("),
        ("strategy=ffa_lora ranks=hetlora server.robust=median", "server.robust: median takes each coordinate over same-shaped client factors, "
                                                                   "but ranks.kind=uniform gives ranks [7, 21, "),
        ("privacy=central privacy.noise_multiplier=1 strategy.weighting=uniform server.robust=krum server.krum_f=2",
         "server.robust: krum does not work with privacy.mode=central"),
        ("server.robust=krum server.krum_f=4", "server.krum_f: krum needs n > 2f + 2 clients per round (Blanchard et al. 2017), "
                                                 "but a round samples n=10 with server.krum_f=4"),
        ("server.robust=multi_krum server.krum_f=2 server.multi_krum_m=9", "server.multi_krum_m: must be at most n − f = 8"),
        ("server.robust=median server.trim_beta=0.2", "server.trim_beta: applies to server.robust=trimmed_mean only, not server.robust=median"),
        ("server.robust=trimmed_mean server.trim_beta=0.5", "server.trim_beta: must be in [0, 0.5)"),
        ("server.robust=bulyan", "server.robust: unknown value 'bulyan'; expected one of none, median, trimmed_mean, krum, multi_krum"),
        ("profile.byzantine=0.04", "profile.byzantine: 0.04 of clients=10 rounds to no attacker; use at least 0.05, or 0"),
        ("profile.attack=scale", "profile.attack: applies with profile.byzantine > 0 only"),
        ("profile.byzantine=0.2 profile.attack_scale=5", "profile.attack_scale: applies to profile.attack=scale with profile.byzantine > 0 only, "
                                                     "not profile.attack=sign_flip"),
        ("profile.byzantine=0.2 profile.attack=gaussian profile.attack_std=0", "profile.attack_std: must be positive"),
        ("profile.byzantine=0.2 profile.attack=flip", "profile.attack: unknown value 'flip'; expected one of sign_flip, scale, gaussian, fixed"),
    ],
)
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line
    if "does not work with strategy=" in expected:
        assert "; use strategy=dp_lora | fed_sb | fedavg | federa | fedsa_lora | ffa_lora | flasc | rolora | slora, or server.robust=krum | multi_krum" in line


@pytest.mark.parametrize("words, expected", [
    ([], None),
    (["server.robust=median"], RobustRule("median", 0.1, 1, None)),
    (["server.robust=trimmed_mean", "server.trim_beta=0.2"], RobustRule("trimmed_mean", 0.2, 1, None)),
    (["server.robust=multi_krum", "server.krum_f=2", "server.multi_krum_m=5"], RobustRule("multi_krum", 0.1, 2, 5)),
    (["strategy=hetlora", "ranks=hetlora", "server.robust=krum", "server.krum_f=2"], RobustRule("krum", 0.1, 2, None)),
])
def test_the_server_group_composes_into_the_rule(words, expected, tmp_path):
    from fedpeft.composing import compose

    cfg = compose([*words, f"hydra.run.dir={tmp_path / 'run'}"])
    assert RobustRule.from_config(cfg.server) == expected
