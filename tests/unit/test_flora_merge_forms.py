"""FLoRA's base merges travel in their cheapest exact form (issue 12), prepared once per round.

Per module the server sends the stacked factors, their SVD re-factorisation (a stack past
``min(out, in)`` components that is numerically of lower rank) or the dense ``ΔW``, whichever
carries the fewest values (:mod:`fedpeft.merges`); every message of a round holds the same encoded
``Array`` objects; the merge store, a device's node state and a resumed server carry the same form,
so every worker's base is the same bit for bit. In-process, no model: a fake ``LoadedModel`` with
plain weight tensors (``fedpeft.models.apply_merge`` only touches ``base_layer.weight``).
"""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import app as client_app
from fedpeft import merges, messages
from fedpeft.lora import LoraFactors, SvdFactors, delta, fresh_adapter, scaling_for
from fedpeft.models import PREFIX, apply_merge
from fedpeft.server import FlowerAdapter, global_adapter
from strategies.base import ClientSpec, GlobalModel
from strategies.flora import FLoRA
from tests.harness import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")

ALPHA = 8.0


def stack64(f: LoraFactors) -> torch.Tensor:
    return f.B.double() @ f.A.double()


def dense64(form) -> torch.Tensor:
    return form.double() if isinstance(form, torch.Tensor) else stack64(form)


def factors(out, inn, r, seed, basis=None):
    """Random stacked factors at scaling 1; with ``basis`` (out × k) every column of B is one of
    its columns (exactly: the stack is of rank k in float32 too)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inn, generator=g) * 0.1
    B = torch.randn(out, r, generator=g) * 0.1 if basis is None else basis[:, torch.randint(basis.shape[1], (r,), generator=g)]
    return LoraFactors(A, B.contiguous(), 1.0)


# ------------------------------------------------------------------ the form per case


@pytest.mark.parametrize(
    "r, deficient, want",
    [
        (8, False, "factors"),  # low rank: the stack itself
        (27, False, "factors"),  # 27 · 112 = 3024 ≤ 48 · 64 = 3072: still the stack
        (28, False, "dense"),  # 28 · 112 > 3072, r ≤ min(out, in): dense
        (80, False, "dense"),  # r > min: a generic stack has numerical rank 48 and 48 · 112 > 3072: dense
        (80, True, "svd"),  # r > min, but the stack spans 5 directions: its SVD at rank 5
    ],
)
def test_each_merge_goes_in_its_cheapest_exact_form(r, deficient, want):
    out, inn = 48, 64
    basis = torch.randn(out, 5, generator=torch.Generator().manual_seed(1)) if deficient else None
    f = factors(out, inn, r, seed=r, basis=basis)
    form = merges.cheapest_form(f)
    assert merges.kind(form) == want
    assert merges.shape(form) == (out, inn)
    if want == "factors":
        assert form is f  # bit for bit the stack
    if want == "svd":
        assert isinstance(form, SvdFactors) and form.rank == 5 and form.A.dtype == torch.float32
    if want == "dense":
        assert form.shape == (out, inn) and form.dtype == torch.float32
    # the fewest values of the candidates that are exact
    candidates = [r * (out + inn), out * inn] + ([5 * (out + inn)] if deficient else [])
    assert merges.numel(form) == min(candidates)
    # exact to float32 rounding of ΔW (formed in float64, rounded once)
    exact = stack64(f)
    err = (dense64(form) - exact).abs().max()
    assert err <= 4 * torch.finfo(torch.float32).eps * exact.abs().max() * (form.rank if want == "svd" else 1)
    assert merges.cheapest_form(f).__class__ is form.__class__  # deterministic choice
    if not isinstance(form, torch.Tensor):
        assert form.scaling == 1.0


def test_a_generic_stack_past_min_goes_dense_without_an_svd(monkeypatch):
    """The sketch proves the numerical rank reaches ⌈out·in/(out+in)⌉, so no SVD is computed."""

    def no_svd(f):
        raise AssertionError("svd_factors called")

    monkeypatch.setattr(merges, "svd_factors", no_svd)
    assert merges.kind(merges.cheapest_form(factors(48, 64, 80, 0))) == "dense"
    with pytest.raises(AssertionError, match="svd_factors called"):  # a rank-deficient one needs it
        merges.cheapest_form(factors(48, 64, 80, 0, torch.randn(48, 5)))


def test_a_merge_not_at_scaling_1_is_refused():
    with pytest.raises(ValueError, match="scaling 1"):
        merges.cheapest_form(LoraFactors(torch.ones(2, 4), torch.ones(3, 2), 0.5))


# ------------------------------------------------------------------ every carrier holds the same form


def three_forms():
    basis = torch.randn(24, 2, generator=torch.Generator().manual_seed(3))
    merge = merges.cheapest({
        "l0.q": factors(24, 16, 3, 1),  # factors
        "l0.v": factors(24, 16, 40, 2),  # dense
        "l1.q": factors(24, 16, 40, 3, basis),  # svd, rank 2
    })
    assert [merges.kind(merge[m]) for m in ("l0.q", "l0.v", "l1.q")] == ["factors", "dense", "svd"]
    return merge


def same_form(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return not isinstance(b, torch.Tensor) and torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and b.scaling == 1.0


def test_every_form_round_trips_through_messages_the_store_and_node_state(tmp_path):
    merge = three_forms()
    dec = messages.decode(messages.encode({}, {}, {}, merges={2: merge}))
    assert sorted(dec.merges) == [2] and all(same_form(merge[m], dec.merges[2][m]) for m in merge)
    merges.save_merge(tmp_path, 2, merge)
    back = merges.load_merge(tmp_path, 2)
    assert sorted(back) == sorted(merge) and all(same_form(merge[m], back[m]) for m in merge)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client_app.keep_merges(ctx, {1: merge})
    client_app.keep_merges(ctx, {2: {"l0.q": merge["l0.q"]}})
    kept = client_app.kept_merges(ctx)
    assert sorted(kept) == [1, 2] and all(same_form(merge[m], kept[1][m]) for m in merge)


def test_a_malformed_merge_is_refused_with_its_version():
    record = ArrayRecord(torch_state_dict={"merge3/D/l0.q": torch.ones(4, 4), "merge3/A/l0.q": torch.ones(2, 4)})
    with pytest.raises(messages.UpdateError, match="merge 3"):
        messages.decode(RecordDict({messages.ARRAYS: record, messages.CONFIG: ConfigRecord({})}))


# ------------------------------------------------------------------ the server: prepared once, shared, counted


SHAPES = {"l0.q": (24, 16), "l0.v": (24, 16)}  # dense: 384 values; stacked factors: 40 per rank


class FakeLM:
    """What ``apply_merge`` touches of a ``LoadedModel``: the modules' base weights."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weights = {m: torch.randn(o, i, generator=g) for m, (o, i) in SHAPES.items()}
        self.model = SimpleNamespace(get_submodule=lambda name: SimpleNamespace(base_layer=SimpleNamespace(weight=self.weights[name[len(PREFIX):]])))
        self.base_version = 0

    def copy(self):
        other = FakeLM()
        other.weights = {m: w.clone() for m, w in self.weights.items()}
        other.base_version = self.base_version
        return other


def flora_adapter(**kw):
    return FlowerAdapter(FLoRA(seed=0), GlobalModel({}, {"head.w": torch.zeros(2, 3)}), fraction=1.0, min_clients=1,
                         client_spec=lambda i: ClientSpec(i, 4, ALPHA), shapes=SHAPES, seed=0, **kw)


def replies(fa, msgs, grid, basis=None, seed=0):
    """Each client's fresh LoRA with a random B (columns of ``basis``, if given: the stack has its rank)."""
    out = []
    for m in msgs:
        dec = messages.decode(m.content)
        pid = grid.nodes[m.metadata.dst_node_id]
        fresh = fresh_adapter(SHAPES, 4, scaling_for(4, ALPHA), int(dec.config["init_seed"]))
        g = torch.Generator().manual_seed(seed * 1000 + pid)
        trained = {
            name: LoraFactors(
                f.A, torch.randn(f.B.shape, generator=g) * 0.05 if basis is None else basis[:, torch.randint(basis.shape[1], (4,), generator=g)], f.scaling
            )
            for name, f in fresh.items()
        }
        content = messages.encode(trained, {"head.w": torch.full((2, 3), float(pid))}, {"num-examples": 10 + pid})
        out.append(Message(content=content, reply_to=m))
    return out


def merge_arrays(msg):
    return {k: a for k, a in msg.content.array_records[messages.ARRAYS].items() if k.startswith("merge")}


def without_merges(content):
    arrays = {k: a for k, a in content.array_records[messages.ARRAYS].items() if not k.startswith("merge")}
    return RecordDict({messages.ARRAYS: ArrayRecord(arrays), messages.CONFIG: content.config_records[messages.CONFIG]})


def test_the_server_prepares_each_merge_once_and_every_client_reaches_the_same_base_bit_for_bit(tmp_path):
    """Mutation checks (fedpeft/server.py): ``encoded_merge`` without its cache → the identity
    assertion fails; ``on_merge`` given ``self.model.merges[v]`` (the stack) → the store's dense
    merge differs; bytes counted without the merges → the per-message byte check fails; the
    forms not in ``state_dict`` → the resumed server's forms are recomputed and the legacy branch
    sends the stack: the resumed-message check fails."""
    stored = {}
    fa = flora_adapter(on_merge=lambda v, merge: (stored.__setitem__(v, merge), merges.save_merge(tmp_path, v, merge)))
    grid = FakeGrid({200 + p: p for p in range(6)})
    lm0 = FakeLM()
    w0 = {m: w.clone() for m, w in lm0.weights.items()}
    by_rounds = lm0.copy()  # node 200's worker: each merge from its round's message
    ctx = Context(run_id=1, node_id=200, node_config={}, state=RecordDict(), run_config={})  # node 200 as a device

    def round_(rnd, basis=None):
        msgs = list(fa.configure_train(rnd, fa.arrays(), ConfigRecord(), grid))
        assert fa.stats[rnd].bytes_down == sum(messages.num_bytes(m.content) for m in msgs)
        first = next(m for m in msgs if m.metadata.dst_node_id == 200)
        dec = messages.decode(first.content)
        client_app.sync_base(by_rounds, int(dec.config["base-version"]), dec.merges)
        process = lm0.copy()  # a device: a new process every round, its merges in the node state
        client_app.sync_base(process, int(dec.config["base-version"]), {**client_app.kept_merges(ctx), **dec.merges})
        client_app.keep_merges(ctx, dec.merges)
        fa.aggregate_train(rnd, replies(fa, msgs, grid, basis, seed=rnd))
        assert fa.stats[rnd].replied == len(msgs)
        return msgs

    round_(1)  # 6 clients × rank 4 = 24 > 16 = min(out, in), generic: dense
    assert {merges.kind(f) for f in fa.merges.forms[1].values()} == {"dense"}
    basis = torch.randn(24, 2, generator=torch.Generator().manual_seed(7))
    msgs2 = round_(2, basis)  # every client's B in one 2-d subspace: the SVD at rank 2
    assert {merges.kind(f) for f in fa.merges.forms[2].values()} == {"svd"} and all(f.rank == 2 for f in fa.merges.forms[2].values())
    grid.nodes = {200: 0, 201: 1}  # two clients × rank 4 = 8: 8 · 40 = 320 ≤ 384, the stack itself
    round_(3)
    assert all(fa.merges.forms[3][m] is fa.model.merges[2][m] for m in SHAPES)

    # One encoded merge per round, its Arrays shared by every message (not copied per client), and
    # counted in every message's bytes.
    shared = [merge_arrays(m) for m in msgs2]
    assert set(shared[0]) == {f"merge1/D/{m}" for m in SHAPES}
    assert all(s[k] is shared[0][k] for s in shared[1:] for k in shared[0])
    for m in msgs2:
        extra = messages.num_bytes(m.content) - messages.num_bytes(without_merges(m.content))
        assert extra == sum(len(a.data) + len(k) for k, a in merge_arrays(m).items()) > 384 * 4 * len(SHAPES)
    # The store holds the very forms the messages carry.
    assert all(stored[v] is fa.merges.forms[v] for v in (1, 2, 3))

    # A node that joins now gets all three merges, in one message; the store (a checkpoint) replays to the same base.
    grid.nodes = {200: 0, 205: 5, 210: 9}
    msgs4 = list(fa.configure_train(4, fa.arrays(), ConfigRecord(), grid))
    late_dec = messages.decode(next(m for m in msgs4 if m.metadata.dst_node_id == 210).content)
    assert sorted(late_dec.merges) == [1, 2, 3]
    # client 5 trained on base 1 in round 2, sat out round 3
    assert sorted(messages.decode(next(m for m in msgs4 if m.metadata.dst_node_id == 205).content).merges) == [2, 3]
    late, from_store, process = lm0.copy(), lm0.copy(), lm0.copy()
    client_app.sync_base(late, 3, late_dec.merges)
    client_app.sync_base(from_store, 3, {v: merges.load_merge(tmp_path, v) for v in (1, 2, 3)})  # the checkpoint beside server.pt
    own = messages.decode(next(m for m in msgs4 if m.metadata.dst_node_id == 200).content).merges
    assert sorted(own) == [3] and sorted(client_app.kept_merges(ctx)) == [1, 2]
    client_app.sync_base(by_rounds, 3, own)
    client_app.sync_base(process, 3, {**client_app.kept_merges(ctx), **own})
    assert by_rounds.base_version == process.base_version == 3

    exact = {m: w0[m].double() + sum(stack64(merge[m]) for merge in fa.model.merges) for m in SHAPES}
    for m in SHAPES:
        w = late.weights[m]
        for other in (by_rounds, from_store, process):
            assert torch.equal(other.weights[m], w)  # bit for bit, whichever way the merges came
        torch.testing.assert_close(w.double(), exact[m], rtol=0, atol=1e-6)
        assert (w - w0[m]).abs().max() > 1e-3
    # The server's evaluation adapter (the exact stacks, re-factorised past min(out, in)) is the same ΔW.
    evald = global_adapter(fa.model)
    for m in SHAPES:
        torch.testing.assert_close(delta(evald[m]).double(), exact[m] - w0[m].double(), rtol=0, atol=1e-6)

    # A resumed server sends the same forms, bit for bit.
    again = flora_adapter()
    again.load_state_dict(fa.state_dict())
    assert sorted(again.merges.forms) == [1, 2, 3]
    grid.nodes = {210: 9}
    resumed = messages.decode(list(again.configure_train(4, again.arrays(), ConfigRecord(), grid))[0].content)
    assert all(same_form(late_dec.merges[v][m], resumed.merges[v][m]) for v in (1, 2, 3) for m in SHAPES)
    # A state from before merge forms: its nodes got the stacks, and so do the ones it sends to now.
    legacy = flora_adapter()
    legacy.load_state_dict({k: v for k, v in fa.state_dict().items() if k != "merge_forms"})
    assert all(legacy.merges.forms[v][m] is legacy.model.merges[v - 1][m] for v in (1, 2, 3) for m in SHAPES)


def test_the_merges_arrays_are_not_copied_per_client():
    """The server's memory for a round's merges does not grow with the number of clients: the
    merge arrays held by 40 messages are the bytes of one."""
    fa = flora_adapter()
    grid = FakeGrid({300 + p: p for p in range(40)})
    msgs = list(fa.configure_train(1, fa.arrays(), ConfigRecord(), grid))
    fa.aggregate_train(1, replies(fa, msgs, grid))  # 40 × 4 = 160 components: dense
    msgs = list(fa.configure_train(2, fa.arrays(), ConfigRecord(), grid))
    held = {id(a.data): len(a.data) for m in msgs for a in merge_arrays(m).values()}
    counted = sum(messages.num_bytes(m.content) - messages.num_bytes(without_merges(m.content)) for m in msgs)
    assert sum(held.values()) == fa.merges.encoded_merge(fa.model, 1).num_bytes() - sum(len(k) for k in fa.merges.encoded_merge(fa.model, 1).arrays)
    assert counted == 40 * fa.merges.encoded_merge(fa.model, 1).num_bytes()  # yet each client's bytes_down counts them
    assert fa.merges.encoded_merge(fa.model, 1).num_bytes() < 2 * 24 * 16 * 4 + 1000  # dense, not the rank-160 stack


def test_apply_merge_refuses_a_dense_merge_of_the_wrong_shape():
    lm = FakeLM()
    with pytest.raises(ValueError, match="does not fit"):
        apply_merge(lm, {"l0.q": torch.zeros(16, 24)})
