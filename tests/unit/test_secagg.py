"""Secure aggregation (fedpeft/secagg.py, ``secagg.*``): Flower's SecAgg+ between the server adapter
and clients running Flower's ``secaggplus_mod`` in-process. What the server receives holds no
client's tensors; the unmasked mean equals the plain aggregation within SecAgg+'s quantization
bound, for every strategy that allows it; a client that fails after sharing its keys is tolerated
within the threshold; the protocol's bytes are counted; the refusals are one line. Pure tensors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.client.mod import secaggplus_mod
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import strategies
from fedpeft import messages
from fedpeft.lora import LoraFactors, scaling_for
from fedpeft.secagg import SecAggPlus, as_fit_result
from fedpeft.server import FlowerAdapter
from strategies.base import ClientSpec, GlobalModel
from tests.harness import AppGrid, config_error, transported

SHAPES = {"l0.q": (6, 8), "l0.v": (5, 8)}
RANK, ALPHA = 4, 8.0
S = scaling_for(RANK, ALPHA)
NODES = {11: 0, 12: 1, 13: 2, 14: 3}
CLIP, LEVELS = 8.0, 2**22
ALLOWED = ["dp_lora", "fed_sb", "fedavg", "federa", "fedsa_lora", "ffa_lora", "rolora"]


def examples(node):
    return 10 * NODES[node] + 3


def start_model(name, g):
    adapter = {m: LoraFactors(torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g), S) for m, (o, i) in SHAPES.items()}
    head = {"w": torch.randn(2, 8, generator=g), "b": torch.randn(2, generator=g)}
    if name == "fed_sb":  # Fed-SB (peft=lora_xs): its cores travel as the method's tensors
        adapter, head = {}, {**head, **{f"{m}.R": torch.randn(RANK, RANK, generator=g) for m in SHAPES}}
    return GlobalModel(adapter, head)


def make_adapter(name, secure=None):
    st = strategies.build(name, weighting="num_examples")
    base = {m: torch.randn(o, i, generator=torch.Generator().manual_seed(7)) for m, (o, i) in SHAPES.items()} if st.needs_base_weights else None
    return FlowerAdapter(st, start_model(name, torch.Generator().manual_seed(0)), fraction=1.0, min_clients=2,
                         client_spec=lambda i: ClientSpec(i, RANK, ALPHA), shapes={} if name == "fed_sb" else SHAPES, seed=0,
                         known_partitions=lambda: NODES, secure=secure, base_weights=base)


def trained(fa, msg, rnd):
    """What node ``msg``'s client replies in round ``rnd``: seeded noise on what its plan trains."""
    node = msg.metadata.dst_node_id
    spec, payload, _ = fa.sent[node]
    up_A, up_B = payload.plan.uplink
    g = torch.Generator().manual_seed(1000 * rnd + node)
    adapter = {n: LoraFactors(f.A + 0.1 * torch.randn(f.A.shape, generator=g), f.B + 0.1 * torch.randn(f.B.shape, generator=g), f.scaling)
               for n, f in payload.adapter.items()}
    head = {h: t + 0.1 * torch.randn(t.shape, generator=g) for h, t in payload.head.items()}
    seed = {"A_seed": payload.plan.A_seed} if payload.plan.A_seed is not None else {}  # FFA-LoRA's A: regenerated, its seed echoed
    return messages.encode(adapter, head, {"num-examples": examples(node), **seed}, send_A=up_A, send_B=up_B)


class Clients(AppGrid):
    """Each node: Flower's ``secaggplus_mod`` over :func:`fedpeft.secagg.as_fit_result` over a client
    that replies :func:`trained`. ``fail``: nodes that raise at the collect stage (after sharing
    their keys). Keeps every reply the server pulls, with its stage, and each client's tensors."""

    def __init__(self, fa, rnd, fail=()):
        from flwr.app import Context, RecordDict

        super().__init__({n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES})
        self.fa, self.rnd, self.fail = fa, rnd, set(fail)
        self.seen, self.sent_by = [], {}

    def deliver(self, msg, context):
        from flwr.app import Message

        def client(m, c):
            if m.metadata.dst_node_id in self.fail:
                raise RuntimeError("injected: fails after sharing its keys")
            content = trained(self.fa, m, self.rnd)
            self.sent_by[m.metadata.dst_node_id] = {k: a.numpy() for k, a in content.array_records[messages.ARRAYS].items()}
            return Message(content=content, reply_to=m)

        msg = transported(msg)  # Flower's workflow sends one content object to all; each node edits its copy
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        reply = secaggplus_mod(msg, context, lambda m, c: as_fit_result(client(m, c), c, "num_examples"))
        self.seen.append((stage, reply))
        return reply


def plain_round(name, rnd=1):
    fa = make_adapter(name)
    grid = Clients(fa, rnd)
    msgs = list(fa.configure_train(rnd, fa.arrays(), ConfigRecord(), grid))
    replies = []
    for m in msgs:
        reply = SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id, reply_to_message_id=""),
                                has_error=lambda: False, content=trained(fa, m, rnd))
        replies.append(reply)
    fa.aggregate_train(rnd, replies)
    return fa


def secure_round(name, rnd=1, fail=(), threshold=0.5):
    settings = SimpleNamespace(num_shares=1.0, reconstruction_threshold=threshold, clipping_range=CLIP, quantization_range=LEVELS)
    fa = make_adapter(name, SecAggPlus(settings, max_weight=max(examples(n) for n in NODES), timeout=None))
    grid = Clients(fa, rnd, fail)
    msgs = list(fa.configure_train(rnd, fa.arrays(), ConfigRecord(), grid))
    fa.aggregate_train(rnd, fa.secure.exchange(grid, msgs, fa.partition_of))
    return fa, grid


def tensors(model):
    return {**{f"A/{n}": f.A for n, f in model.adapter.items()}, **{f"B/{n}": f.B for n, f in model.adapter.items()},
            **{f"head/{h}": t for h, t in model.head.items()}}


def bound(grid, nodes):
    """SecAgg+'s error per entry: K·(2c + max|x|)/(R·Σw) (stochastic rounding, less than a level 2c/R
    per client, and the weights' rounding to 1/R; w_k = n_k / max_weight)."""
    peak = max(float(np.abs(a).max()) for n in nodes for a in grid.sent_by[n].values())
    w = sum(examples(n) for n in nodes) / max(examples(n) for n in NODES)
    return len(nodes) * (2 * CLIP + peak) / (LEVELS * w)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ALLOWED)
def test_the_unmasked_mean_equals_the_plain_aggregate_within_the_quantization_bound(name):
    plain = plain_round(name)
    secure, grid = secure_round(name)
    assert secure.stats[1].applied and secure.stats[1].replied == 4 and secure.stats[1].rejected == 0
    tol = bound(grid, NODES) * (S if name == "ffa_lora" else 1)  # FFA-LoRA keeps s·B̄: the mean's error times s
    assert 0 < tol < 1e-4
    a, b = tensors(plain.model), tensors(secure.model)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        err = float((a[k].double() - b[k].double()).abs().max())
        assert err <= tol, (k, err, tol)
        moved += not torch.equal(a[k], tensors(make_adapter(name).model)[k])
    assert moved  # the round changed the model: the comparison is not of two starts


@pytest.mark.usefixtures("task_identity")
def test_the_server_receives_no_clients_tensors_only_masked_vectors():
    fa, grid = secure_round("fedavg")
    stages = [s for s, _ in grid.seen]
    assert stages == [Stage.SETUP] * 4 + [Stage.SHARE_KEYS] * 4 + [Stage.COLLECT_MASKED_VECTORS] * 4 + [Stage.UNMASK] * 4
    for _, reply in grid.seen:  # no ArrayRecord carries anything
        assert all(len(r) == 0 for r in reply.content.array_records.values())
    for stage, reply in grid.seen:
        if stage != Stage.COLLECT_MASKED_VECTORS:
            continue
        node = reply.metadata.src_node_id
        raw = b"".join(v for rec in reply.content.config_records.values() for vals in rec.values()
                       for v in (vals if isinstance(vals, list) else [vals]) if isinstance(v, bytes))
        mine = grid.sent_by[node]
        for a in mine.values():  # no tensor's bytes (nor its first 8 entries') travel
            assert a.tobytes()[:32] not in raw
        # the masked vector looks nothing like the update: its entries are uncorrelated with it
        masked = np.concatenate([messages_array(b).ravel() for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]][1:])
        x = np.concatenate([a.ravel() for a in mine.values()])
        assert masked.shape == x.shape
        assert abs(np.corrcoef(masked.astype(float), x)[0, 1]) < 0.4
    # what reaches the strategy is one update, the mean, equal to no client's
    assert fa.stats[1].applied and fa.stats[1].replied == 4


def messages_array(b):
    from flwr.common import bytes_to_ndarray

    return bytes_to_ndarray(b)


@pytest.mark.usefixtures("task_identity")
def test_a_client_failing_after_sharing_its_keys_is_tolerated_within_the_threshold():
    fa, grid = secure_round("fedavg", fail={12})
    st = fa.stats[1]
    assert st.applied and st.failed == 1 and st.replied == 3
    survivors = [11, 13, 14]
    n = {k: examples(k) for k in survivors}
    mean = {key: sum(n[k] * grid.sent_by[k][key].astype(np.float64) for k in survivors) / sum(n.values()) for key in grid.sent_by[11]}
    got = {f"A/{m}": f.A for m, f in fa.model.adapter.items()} | {f"B/{m}": f.B for m, f in fa.model.adapter.items()} | {
        f"head/{h}": t for h, t in fa.model.head.items()}
    tol = bound(grid, survivors)
    for key, value in mean.items():
        assert float(np.abs(got[key].double().numpy() - value).max()) <= tol, key


@pytest.mark.usefixtures("task_identity")
def test_more_dropouts_than_the_threshold_allows_halt_the_protocol_and_the_round_is_not_applied():
    start = tensors(make_adapter("fedavg").model)
    fa, _ = secure_round("fedavg", fail={12}, threshold=1.0)  # every share needed: one dropout is too many
    assert not fa.stats[1].applied and fa.secure.last.halted == Stage.COLLECT_MASKED_VECTORS and fa.secure.last.mean is None
    assert all(torch.equal(start[k], v) for k, v in tensors(fa.model).items())


@pytest.mark.usefixtures("task_identity")
def test_the_protocols_bytes_are_counted_as_sent():
    fa, grid = secure_round("fedavg")
    row = fa.stats[1]
    last = fa.secure.last
    collect = [r for s, r in grid.seen if s == Stage.COLLECT_MASKED_VECTORS]
    others = [r for s, r in grid.seen if s != Stage.COLLECT_MASKED_VECTORS]
    assert last.bytes_up == sum(messages.num_bytes(r.content) for r in others) > 0
    assert row.bytes_up == last.bytes_up + sum(messages.num_bytes(r.content) for r in collect)
    masked = sum(len(b) for r in collect for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
    assert masked > 4 * sum(a.nbytes for a in grid.sent_by[11].values())  # int64 masked entries: 8 bytes each, vs 4 per float
    assert last.bytes_down > 0 and row.bytes_down > last.bytes_down


# ------------------------------------------------------------------ the client's refusals


def fit_context(max_weight, clip):
    from flwr.app import Context, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"max_weight": float(max_weight), "clipping_range": float(clip)})})
    return Context(run_id=1, node_id=11, node_config={}, state=state, run_config={})


def a_reply(n, value):
    from flwr.app import Message, RecordDict

    g = torch.Generator().manual_seed(0)
    adapter = {"l0.q": LoraFactors(torch.rand(RANK, 8, generator=g), torch.full((6, RANK), value), S)}
    msg = Message(RecordDict(), dst_node_id=11, message_type="train")
    return Message(content=messages.encode(adapter, {}, {"num-examples": n}), reply_to=msg)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("weighting, n, value, expected", [
    ("num_examples", 20, 0.5, "secagg.max_weight=10 is below this client's weight 20 (its num-examples): SecAgg+ would overflow"),
    ("num_examples", 10, 2.0, "secagg.clipping_range=1: an entry of this client's weighted update reaches 2, which SecAgg+ would clip"),
    ("num_examples", 5, 1.5, None),  # |x|·n/max_weight = 0.75: kept
    ("uniform", 20, 0.5, None),  # weight 1, whatever num-examples says
])
def test_a_client_refuses_what_secagg_would_distort(weighting, n, value, expected):
    context = fit_context(10 if weighting == "num_examples" else 1, 1.0)
    if expected is not None:
        with pytest.raises(ValueError) as e:
            as_fit_result(a_reply(n, value), context, weighting)
        assert str(e.value) == expected + ("; raise secagg.max_weight" if "max_weight" in expected else "; raise secagg.clipping_range")
        return
    from flwr.compat.common import recorddict_compat as compat

    out = as_fit_result(a_reply(n, value), context, weighting)
    fit = compat.recorddict_to_fitres(out.content, keep_input=True)
    layout = out.content.config_records[messages.SECAGG_LAYOUT]
    assert fit.num_examples == (n if weighting == "num_examples" else 1)
    assert list(layout["keys"]) == ["A/l0.q", "B/l0.q"] and list(layout["dtypes"]) == ["float32", "float32"]
    arrays = out.content.array_records[messages.ARRAYS]
    assert [np.array_equal(a, arrays[k].numpy()) for a, k in zip(parameters_to_ndarrays(fit.parameters), layout["keys"])] == [True, True]


@pytest.mark.usefixtures("task_identity")
def test_a_node_with_secagg_refuses_a_train_message_outside_the_protocol(tmp_path):
    from flwr.app import Context, Message, RecordDict

    from fedpeft.composing import compose
    from fedpeft.runconfig import to_run_config
    from fedpeft.secagg import secure_aggregation_mod

    msg = Message(RecordDict({messages.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=11, message_type="train")
    reached = []
    for enabled in (True, False):
        rc = to_run_config(compose([f"secagg.enabled={str(enabled).lower()}"]), tmp_path / "run")
        context = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config=rc)
        if enabled:
            with pytest.raises(ValueError, match=r"^secagg.enabled: this train message is not part of Flower's SecAgg\+ protocol; "
                                                 r"the node does not send its update in the clear"):
                secure_aggregation_mod(msg, context, lambda m, c: reached.append(m))
        else:
            secure_aggregation_mod(msg, context, lambda m, c: reached.append(m))
    assert reached == [msg]  # without secagg the message goes on to the train handler


# ------------------------------------------------------------------ the config


@pytest.mark.parametrize(
    "override, expected",
    [
        ("strategy=flora ranks=flora secagg.enabled=true", "secagg.enabled: secure aggregation does not work with strategy=flora (it stacks"),
        ("strategy=flexlora secagg.enabled=true", "secagg.enabled: secure aggregation does not work with strategy=flexlora"),
        ("strategy=hetlora secagg.enabled=true", "secagg.enabled: secure aggregation does not work with strategy=hetlora"),
        ("strategy=fedex_lora secagg.enabled=true", "secagg.enabled: secure aggregation does not work with strategy=fedex_lora"),
        ("privacy=central privacy.noise_multiplier=1 strategy.weighting=uniform secagg.enabled=true",
         "secagg.enabled: secure aggregation does not work with privacy.mode=central"),
        ("compression.uplink=int8 secagg.enabled=true", "secagg.enabled: secure aggregation sums the clients' float tensors, not compression.uplink=int8"),
        ("engine.kind=cohort secagg.enabled=true", "secagg.enabled: secure aggregation runs Flower's SecAgg+ with each client's own node"),
        ("strategy=ffa_lora ranks=heavy_tail secagg.enabled=true", "ranks.kind: secure aggregation sums same-shaped tensors"),
        ("clients=2 secagg.enabled=true", "secagg.enabled: Flower's SecAgg+ needs at least 3 sampled clients per round, got 2"),
        ("secagg.enabled=true secagg.num_shares=2", "secagg.num_shares: must be a share in (0, 1] or a count of at least 3"),
        ("secagg.enabled=true secagg.num_shares=5 secagg.reconstruction_threshold=5", "secagg.reconstruction_threshold: must be a share"),
        ("secagg.enabled=true secagg.quantization_range=1073741824", "secagg.quantization_range: must be at least 2 with sampled clients (10)"),
        ("secagg.clipping_range=4", "secagg.clipping_range: applies with secagg.enabled=true only"),
    ],
)
def test_refusals_are_one_line_naming_both_sides(override, expected, tmp_path, monkeypatch, capsys):
    line = config_error(["simulate", *override.split()], tmp_path, monkeypatch, capsys)
    assert expected in line, line
    if "does not work with strategy=" in expected:
        assert f"; use strategy={' | '.join(ALLOWED)}, or secagg.enabled=false" in line
