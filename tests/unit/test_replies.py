"""One client cannot take the federation down: every reply is checked against what its node was
sent, a bad one is rejected with a one-line reason (a warning, counted in ``stats.rejected``)
before anything it declares is allocated, and the round aggregates exactly the good ones."""

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord
from flwr.common.constant import ErrorCode

from fedpeft import compression, messages
from fedpeft.lora import LoraFactors, scaling_for, seeded_lora_A
from fedpeft.server import Codecs, FlowerAdapter
from fedpeft.tracking import progress_line
from strategies.base import ClientSpec, ClientUpdate, GlobalModel
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FFALoRA
from strategies.hetlora import HetLoRA
from tests.harness import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"l0.q": (6, 8), "l0.v": (6, 8)}
HEAD = {"classifier.weight": torch.ones(2, 8), "classifier.bias": torch.zeros(2)}
RANK, ALPHA = 4, 8.0
SCALING = scaling_for(RANK, ALPHA)  # 2.0
NODES = {11: 0, 12: 1, 13: 2, 14: 3}  # node id → partition id


def factors(value: float, r: int = RANK, scaling: float = SCALING):
    return {m: LoraFactors(torch.full((r, i), value) + 0.01 * torch.arange(i), torch.full((o, r), value + 1), scaling) for m, (o, i) in SHAPES.items()}


def head(value: float):
    return {k: t + value for k, t in HEAD.items()}


def reply(node: int, content=None, error=None, code=2, reply_to=""):
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=reply_to), has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error, code=code), content=content,
    )


def setup(strategy=None, min_clients=1, **kw):
    strategy = strategy or FedAvg()
    model = kw.pop("model", None) or GlobalModel(factors(0.0), HEAD)
    fa = FlowerAdapter(strategy, model, fraction=1.0, min_clients=min_clients, client_spec=lambda i: ClientSpec(i, RANK, ALPHA),
                       shapes=SHAPES, seed=0, **kw)
    fa.configure_train(1, fa.arrays(), ConfigRecord(), FakeGrid(NODES))
    return fa


GOOD = {11: (1.0, 10), 13: (3.0, 30)}  # node → (value, num-examples): the good replies next to each bad one


def good_replies(fa, codec="none"):
    out = []
    for node, (v, n) in GOOD.items():
        ref = fa.sent[node][2]
        kw = dict(codec=codec, fraction=1.0, reference=ref, generator=torch.Generator().manual_seed(0)) if codec != "none" else {}
        out.append(reply(node, messages.encode(factors(v), head(v), {"num-examples": n}, **kw)))
    return out


def good_only(fa_before_model, strategy=None):
    """The aggregate of the good replies alone, by the strategy's own math."""
    updates = [ClientUpdate(NODES[node], factors(v), head(v), n) for node, (v, n) in GOOD.items()]
    return (strategy or FedAvg()).aggregate(fa_before_model, updates)


def assert_model_equals(fa, want, exact=True):
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6))
    for m in SHAPES:
        assert same(fa.model.adapter[m].A, want.adapter[m].A) and same(fa.model.adapter[m].B, want.adapter[m].B)
        assert fa.model.adapter[m].A.dtype == torch.float32
    for k in HEAD:
        assert same(fa.model.head[k], want.head[k]) and fa.model.head[k].dtype == torch.float32


def run_one_bad(fa, bad_content, caplog, codec="none", node=12):
    """Two good replies (nodes 11, 13) and one bad one; the bad one is rejected, the round is the good ones' aggregate."""
    before = fa.model
    arrays, metrics = fa.aggregate_train(1, [*good_replies(fa, codec), reply(node, bad_content)])
    s = fa.stats[1]
    assert (s.sampled, s.replied, s.rejected, s.failed, s.applied) == (4, 2, 1, 1, True)  # node 14 sent nothing: a failed client
    assert metrics["clients_rejected"] == 1 and metrics["clients_replied"] == 2 and metrics["round_applied"] == 1
    assert arrays is not None
    if codec == "none":
        assert_model_equals(fa, good_only(before))
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1 and "\n" not in rejected[0]
    return rejected[0]


def content_of(value=2.0, n=20, r=RANK, scaling=SCALING, hd=None, **kw):
    return messages.encode(factors(value, r, scaling), head(value) if hd is None else hd, {"num-examples": n}, **kw)


# --- num-examples ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, reason",
    [
        (math.inf, "num-examples is inf, not an integer"),
        (math.nan, "num-examples is nan, not an integer"),
        (-5, "num-examples is -5, outside [1, 1000000000]"),
        (0, "num-examples is 0, outside [1, 1000000000]"),
        (10.0, "num-examples is 10.0, not an integer"),
        (True, "num-examples is True, not an integer"),
        (10**18, "num-examples is 1000000000000000000, outside [1, 1000000000]"),
    ],
)
def test_bad_num_examples_is_rejected_and_weighs_nothing(n, reason, caplog):
    fa = setup()
    line = run_one_bad(fa, content_of(n=n), caplog)
    assert line == f"round 1: update from client 1 (node 12) rejected: {reason}"


def test_num_examples_must_match_the_partition_size_the_server_knows(caplog):
    sizes = {0: 10, 1: 20, 2: 30, 3: 40}
    fa = setup(expected_examples=sizes.get)
    line = run_one_bad(fa, content_of(n=25), caplog)  # in range, but not client 1's 20 examples
    assert line.endswith("client 1 (node 12) rejected: num-examples is 25, expected 20 (the client's partition size)")
    assert fa.stats[1].replied == 2  # the good replies claim exactly their partition sizes (10, 30)


# --- rank and scaling ------------------------------------------------------------------------


def test_a_rank_below_the_one_sent_is_rejected_under_fedavg(caplog):
    fa = setup()
    line = run_one_bad(fa, content_of(r=3), caplog)
    assert line.endswith("client 1 (node 12) rejected: array 'B/l0.q' has shape (6, 3): rank 3, expected rank 4")


def test_hetlora_accepts_the_rank_or_its_one_pruning_step_and_nothing_else(caplog):
    het = HetLoRA(gamma=0.5, r_min=1)  # rank 4 may answer at 4 or pruned_rank(4) = 2
    assert het.reply_ranks(RANK) == (2, 4)
    model = GlobalModel(factors(0.0), HEAD)
    fa = setup(het, model=model)
    before = fa.model
    pruned = messages.encode(factors(1.0, r=2), head(1.0), {"num-examples": 10})  # a pruned rank keeps its scaling
    full = messages.encode(factors(3.0), head(3.0), {"num-examples": 30})
    rank3 = messages.encode(factors(5.0, r=3), head(5.0), {"num-examples": 10})
    rescaled = messages.encode(factors(5.0, r=2, scaling=scaling_for(2, ALPHA)), head(5.0), {"num-examples": 10})
    fa.aggregate_train(1, [reply(11, pruned), reply(12, rank3), reply(13, full), reply(14, rescaled)])
    s = fa.stats[1]
    assert (s.replied, s.rejected) == (2, 2)
    text = caplog.text
    assert "client 1 (node 12) rejected: array 'B/l0.q' has shape (6, 3): rank 3, expected rank 2 or 4" in text
    assert "client 3 (node 14) rejected: scaling/l0.q is 4.0, expected 2.0" in text
    want = het.aggregate(before, [ClientUpdate(0, factors(1.0, r=2), head(1.0), 10), ClientUpdate(2, factors(3.0), head(3.0), 30)])
    assert_model_equals(fa, want)
    assert fa.strategy_state.rank_now == {0: 2}


@pytest.mark.parametrize("scaling", [math.nan, math.inf, 1e30, 3.0])
def test_a_scaling_that_is_not_finite_or_not_the_one_sent_is_rejected(scaling, caplog):
    fa = setup()
    line = run_one_bad(fa, content_of(scaling=scaling), caplog)
    assert line.endswith(f"client 1 (node 12) rejected: scaling/l0.q is {scaling!r}, expected 2.0")


# --- arrays: serialisation, headers, sizes, dtypes, keys -------------------------------------


def npy(shape, descr="<f4", body=b"\0" * 16) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    return b.getvalue() + body


def tampered(key, array):
    c = content_of()
    c.array_records[messages.ARRAYS][key] = array
    return c


@pytest.mark.parametrize(
    "key, array, reason",
    [
        ("B/l0.q", lambda: Array(dtype="float32", shape=(6, 4), stype="pickle", data=b"\x80\x04not an array"),
         "array 'B/l0.q': serialisation 'pickle' is not 'numpy.ndarray'"),
        ("A/l0.q", lambda: Array(dtype="float32", shape=(4, 8), stype="numpy.ndarray", data=npy((10**12,))),
         "array 'A/l0.q': declared float32 (4, 8), its .npy header says float32 (1000000000000,)"),
        ("A/l0.q", lambda: Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=npy((4, 8), body=b"\0" * 128)),
         "array 'A/l0.q' has shape (1000000, 1000000), expected (4, 8)"),
        ("A/l0.q", lambda: Array(dtype="float32", shape=(4, 8), stype="numpy.ndarray", data=npy((4, 8), body=b"\0" * 100)),
         "array 'A/l0.q': 100 data bytes, its float32 (4, 8) needs 128"),
        ("head/classifier.bias", lambda: Array(np.zeros(2, dtype=np.float64)), "array 'head/classifier.bias' is float64, expected float32"),
        ("B/l0.v", lambda: Array(np.ones((6, 4), dtype=np.complex64)), "array 'B/l0.v' is complex64, expected float32"),
        ("merge1/A/l0.q", lambda: Array(np.zeros((4, 8), dtype=np.float32)), "unexpected array 'merge1/A/l0.q'"),
        ("head/extra", lambda: Array(np.zeros(2, dtype=np.float32)), "unexpected array 'head/extra'"),
    ],
    ids=["pickle", "npy-header-1e12", "declared-shape-1e12", "short-data", "float64", "complex64", "merge-key", "extra-head"],
)
def test_arrays_are_checked_from_their_headers_before_anything_is_deserialised(key, array, reason, caplog, monkeypatch):
    seen = []
    numpy_of = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: (seen.append(self.stype), numpy_of(self))[1])
    fa = setup()
    line = run_one_bad(fa, tampered(key, array()), caplog)
    assert line.endswith(f"client 1 (node 12) rejected: {reason}")
    assert "pickle" not in seen


def test_a_codec_other_than_the_uplink_one_is_rejected(caplog):
    fa = setup()
    line = run_one_bad(fa, content_of(codec="fp16"), caplog)
    assert line.endswith("client 1 (node 12) rejected: codec 'fp16' (delta None) is not the uplink codec 'none'")


@pytest.mark.parametrize("codec", ["topk", "int8"])
def test_a_compressed_reply_declaring_a_huge_shape_is_rejected_before_decoding(codec, caplog, monkeypatch):
    densify = compression.densify

    def bounded(indices, values, shape):
        assert math.prod(shape) <= 10**6, f"densify allocated {math.prod(shape)} elements"
        return densify(indices, values, shape)

    monkeypatch.setattr(compression, "densify", bounded)
    fa = setup(codecs=Codecs(uplink=codec))
    ref = fa.sent[12][2]
    bad = messages.encode(factors(2.0), head(2.0), {"num-examples": 20}, codec=codec, fraction=1.0, reference=ref, generator=torch.Generator().manual_seed(0))
    bad.config_records[messages.CONFIG]["shape/A/l0.q"] = [10**5, 1000]
    line = run_one_bad(fa, bad, caplog, codec=codec)
    assert line.endswith("client 1 (node 12) rejected: array 'A/l0.q' has shape (100000, 1000), expected (4, 8)")
    if codec == "topk":  # fraction 1: every value travels, so the good replies decode exactly
        assert_model_equals(fa, good_only(GlobalModel(factors(0.0), HEAD)), exact=False)


def test_a_quantized_part_of_the_wrong_dtype_is_rejected(caplog):
    fa = setup(codecs=Codecs(uplink="int8"))
    bad = messages.encode(factors(2.0), head(2.0), {"num-examples": 20}, codec="int8", reference=fa.sent[12][2], generator=torch.Generator().manual_seed(0))
    bad.array_records[messages.ARRAYS]["B/l0.q#scale"] = Array(np.zeros(4, dtype=np.float64))
    line = run_one_bad(fa, bad, caplog, codec="int8")
    assert line.endswith("client 1 (node 12) rejected: array 'B/l0.q#scale' is float64, expected float32")


@pytest.mark.parametrize(
    "entry, value, reason",
    [("in_features/l0.q", 10**12, "in_features/l0.q is 1000000000000, expected 8"), ("A_seed", 7, "A_seed is 7, expected 3 (the one sent)")],
)
def test_a_frozen_A_is_regenerated_only_from_what_was_sent(entry, value, reason, caplog):
    ffa = FFALoRA(seed=3)
    model = ffa.init(GlobalModel({m: LoraFactors(torch.zeros(RANK, i), torch.zeros(o, RANK), SCALING) for m, (o, i) in SHAPES.items()}, HEAD))
    fa = setup(ffa, model=model)
    before = fa.model

    def ffa_factors(v):
        return {m: LoraFactors(seeded_lora_A(m, RANK, i, 3), torch.full((o, RANK), v), SCALING) for m, (o, i) in SHAPES.items()}

    good = [reply(n, messages.encode(ffa_factors(v), head(v), {"num-examples": k, "A_seed": 3}, send_A=False)) for n, (v, k) in GOOD.items()]
    bad = messages.encode(ffa_factors(2.0), head(2.0), {"num-examples": 20, "A_seed": 3}, send_A=False)
    bad.config_records[messages.CONFIG][entry] = value
    fa.aggregate_train(1, [*good, reply(12, bad)])
    assert (fa.stats[1].replied, fa.stats[1].rejected) == (2, 1)
    assert f"client 1 (node 12) rejected: {reason}" in caplog.text
    want = ffa.aggregate(before, [ClientUpdate(NODES[n], ffa_factors(v), head(v), k) for n, (v, k) in GOOD.items()])
    assert_model_equals(fa, want)


# --- who replies -----------------------------------------------------------------------------


def test_a_reply_from_a_node_not_sampled_and_a_second_reply_are_rejected(caplog):
    fa = setup()
    before = fa.model
    again = reply(11, content_of(value=5.0, n=10))  # node 11's second reply
    stranger = reply(99, content_of(value=7.0, n=10))
    fa.aggregate_train(1, [*good_replies(fa), again, stranger])
    s = fa.stats[1]
    assert (s.replied, s.rejected) == (2, 2)
    assert "round 1: update from node 99 rejected: node 99 was not sampled in round 1" in caplog.text
    assert "round 1: update from client 0 (node 11) rejected: a second reply from node 11 in round 1" in caplog.text
    assert_model_equals(fa, good_only(before))


# --- rounds that are not applied, failures ---------------------------------------------------


def test_a_round_with_fewer_than_min_clients_good_replies_is_not_applied(caplog):
    fa = setup(min_clients=3)
    before = fa.model
    arrays, metrics = fa.aggregate_train(1, [*good_replies(fa), reply(12, content_of(n=-1)), reply(14, error="RuntimeError: boom")])
    assert fa.model is before and arrays is None
    assert metrics["round_applied"] == 0 and fa.stats[1].applied is False and fa.rounds_applied == 0
    assert (metrics["clients_replied"], metrics["clients_rejected"], metrics["clients_failed"]) == (2, 1, 1)
    assert "round 1 not applied: 2 good update(s) of 4 sampled, fewer than min_clients=3; the global model is unchanged" in caplog.text
    line = progress_line(1, 5, dict(metrics), 3.0)
    assert "clients 2/4 (1 failed, 1 rejected)" in line and "not applied" in line
    # with three good replies it is applied
    fa = setup(min_clients=3)
    arrays, metrics = fa.aggregate_train(1, [*good_replies(fa), reply(12, content_of(n=20))])
    assert metrics["round_applied"] == 1 and fa.stats[1].applied is True and fa.rounds_applied == 1 and arrays is not None


def test_most_clients_failing_with_one_error_ends_the_run_with_that_line():
    from fedpeft.server import FederationFailed

    fa = setup()
    trace = "Traceback (most recent call last):\n  File \"clients/app.py\", line 3\nKeyError: 'text'"
    replies = [reply(11, content_of()), *(reply(n, error=trace) for n in (12, 13, 14))]
    with pytest.raises(FederationFailed) as e:
        fa.aggregate_train(1, replies)
    assert str(e.value) == "KeyError: 'text' (3 of 4 sampled clients)"
    assert isinstance(e.value, RuntimeError)


def test_scattered_failures_are_one_warning_each_and_the_round_goes_on(caplog):
    fa = setup()
    before = fa.model
    same = "ValueError: disk full"
    replies = [*good_replies(fa), reply(12, error=same), reply(14, error=same)]  # 2 of 4: not more than half
    arrays, metrics = fa.aggregate_train(1, replies)
    assert metrics["clients_failed"] == 2 and metrics["round_applied"] == 1
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed == ["round 1: client 1 on node 12 failed: ValueError: disk full", "round 1: client 3 on node 14 failed: ValueError: disk full"]
    assert_model_equals(fa, good_only(before))
    fa = setup()
    injected = [reply(n, error=f"InjectedFailure: client {NODES[n]}: injected failure in round 1") for n in (12, 13, 14)]
    _, metrics = fa.aggregate_train(1, [reply(11, content_of()), *injected])  # 3 of 4, each its own line
    assert metrics["clients_failed"] == 3 and metrics["clients_replied"] == 1
    fa = setup()
    gone = [reply(n, error="Node Unavailable", code=5) for n in (12, 13, 14)]  # nodes that dropped out: no client's error
    _, metrics = fa.aggregate_train(1, [reply(11, content_of()), *gone])
    assert metrics["clients_failed"] == 3 and metrics["clients_replied"] == 1


def test_progress_line_shows_failures_and_rejections():
    m = {"clients_sampled": 4, "clients_replied": 2, "clients_failed": 1, "clients_rejected": 1, "round_applied": 1}
    line = progress_line(2, 10, m, 5.0)
    assert "clients 2/4 (1 failed, 1 rejected)" in line and "not applied" not in line
    assert "clients 3/4 (1 rejected) |" in progress_line(2, 10, {**m, "clients_replied": 3, "clients_failed": 0}, 5.0)


@pytest.mark.parametrize("codec", compression.KINDS)
@pytest.mark.parametrize("send_A", [True, False])
def test_replies_encoded_as_clients_encode_them_pass_the_checks(codec, send_A):
    """No false rejections: every uplink codec, with and without A, at the rank sent and at a
    pruned rank, as ``clients/app.py`` encodes a reply (a delta from its start, top-k residual)."""
    shapes = {"l0.q": (48, 64), "l0.v": (64, 16)}  # a wide and a tall B: the quantizers transpose tall ones
    g = torch.Generator().manual_seed(0)
    start = {m: LoraFactors(seeded_lora_A(m, RANK, i, 3), torch.randn(o, RANK, generator=g), SCALING) for m, (o, i) in shapes.items()}
    hd = {"classifier.weight": torch.randn(2, 64, generator=g), "classifier.bias": torch.randn(2, generator=g)}
    ref = messages.tensors_of(start, hd, send_A=send_A)
    for r in (RANK, 2):
        end = {m: LoraFactors(f.A[:r] if send_A else seeded_lora_A(m, r, f.A.shape[1], 3), f.B[:, :r] + 0.1, SCALING) for m, f in start.items()}
        cfg = {"num-examples": 7, "partition-id": 1, **({} if send_A else {"A_seed": 3})}
        kw = dict(codec=codec, fraction=0.1, reference=ref, generator=torch.Generator().manual_seed(1), residual={}) if codec != "none" else {}
        content = messages.encode(end, hd, cfg, send_A=send_A, **kw)
        got = messages.check_reply_layout(content, shapes, {k: tuple(t.shape) for k, t in hd.items()}, (2, RANK), scaling=SCALING,
                                          send_A=send_A, A_seed=None if send_A else 3, codec=codec)
        assert got == r
        dec = messages.decode(content, ref if codec != "none" else None)
        messages.check_update(dec.adapter, dec.head, shapes, RANK, hd)


def test_the_superlinks_unavailable_reply_for_a_dead_node_is_that_nodes_failure(caplog):
    """A SuperLink answers for a node that went offline itself: an error reply from its own node id
    (1) to the message sent to that node. It is that node's failure, not an unsolicited update.
    Mutation check: matching replies by ``src_node_id`` only (fedpeft/server.py ``_sender``) rejects
    it ("node 1 was not sampled") and counts node 14 as silent: fails."""
    fa = setup()
    for node, m in fa.out.items():
        m.metadata.__dict__["_message_id"] = f"id-{node}"  # as the grid does when it sends them
    dead = reply(1, error="Node 14 is unavailable", code=ErrorCode.NODE_UNAVAILABLE, reply_to="id-14")
    _, metrics = fa.aggregate_train(1, [*good_replies(fa), reply(12, content_of()), dead])
    s = fa.stats[1]
    assert (s.sampled, s.replied, s.rejected, s.failed) == (4, 3, 0, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert any("client 3 on node 14 failed: Node 14 is unavailable" in l for l in lines), lines
    assert not any("rejected" in l for l in lines)


def test_every_client_diverging_ends_the_run_though_the_lines_differ_by_client_id():
    """Compared by cause, not text: the clients' NaN lines differ only by their client id (and nan/inf)."""
    from fedpeft.server import FederationFailed

    fa = setup()
    wrapped = "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: client {}: training loss became {}'>"
    # what Flower's Ray backend hands on: Ray's RayTaskError around the ClientAppException, with the actor's traceback
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=4242, ip=127.0.0.1, actor_id=3f0c)\n"
           "  File \"/flwr/simulation/ray_transport/ray_actor.py\", line 64, in run\n    raise ClientAppException(str(ex)) from ex\n"
           "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: client {}: training loss became {}'>")
    replies = [reply(n, error=form.format(NODES[n], v)) for n, v, form in ((11, "nan", wrapped), (12, "nan", ray), (13, "inf", ray), (14, "nan", wrapped))]
    with pytest.raises(FederationFailed) as e:
        fa.aggregate_train(1, replies)
    assert str(e.value) == "client 0: training loss became nan (4 of 4 sampled clients)"


def test_a_dead_worker_is_one_line_without_flowers_wrapping(caplog):
    """Flower wraps any exception of its Ray backend as ``<class '...'>:<'...'>``: the line is the message, no stray ``'>``."""
    fa = setup()
    line = "its Ray worker process (pid 4242) died (killed: out of memory, or a signal); a fresh worker replaces it"
    reason = "<class 'fedpeft.raypool.WorkerDied'>:<'" + line + "'>"  # flwr's vce_api.worker: str(type(ex)) + ":<'" + str(ex) + "'>"
    _, metrics = fa.aggregate_train(1, [*good_replies(fa), reply(12, error=reason, code=0), reply(14, content_of(n=20))])
    assert metrics["clients_failed"] == 1 and metrics["round_applied"] == 1
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed == [f"round 1: client 1 on node 12 failed: {line}"]
