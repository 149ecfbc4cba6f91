"""``engine.kind=cohort`` without a model: packing clients into ``train.cohort`` messages and
splitting the replies back (``fedpeft.cohorts``), and the settings checked before a run (the two
engines' federations compared: tests/app/test_cohort_engine.py)."""

from __future__ import annotations

from uuid import uuid4

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedpeft import cohorts
from fedpeft.composing import compose
from fedpeft.config import ConfigError
from fedpeft.serverapp import changed_keys

pytestmark = pytest.mark.usefixtures("task_identity")

# ------------------------------------------------------------------ packing


@pytest.mark.parametrize("n,size,want", [(0, 4, []), (1, 8, [1]), (5, 4, [3, 2]), (8, 8, [8]), (9, 4, [3, 3, 3]), (10, 3, [3, 3, 2, 2])])
def test_cohorts_are_near_equal_consecutive_groups(n, size, want):
    got = cohorts.groups(n, size)
    assert [len(g) for g in got] == want
    assert [i for g in got for i in g] == list(range(n))


def content(i: int) -> RecordDict:
    from flwr.app import ArrayRecord

    return RecordDict({"config": ConfigRecord({"x": i}), "arrays": ArrayRecord(torch_state_dict={"t": torch.full((3,), float(i))})})


def train_msg(node: int, i: int) -> Message:
    return Message(content=content(i), message_type="train", dst_node_id=node)


def test_a_cohort_carries_each_members_records_unchanged_and_replies_split_back():
    msgs = [train_msg(70 + i, i) for i in (2, 0, 1)]
    batch = cohorts.Cohorts(msgs, {70: 0, 71: 1, 72: 2}, size=2)
    assert [m.metadata.dst_node_id for m in batch.messages] == [70, 72] and batch.weights == [2, 1]
    assert [m.metadata.message_type for m in batch.messages] == ["train.cohort"] * 2
    members = cohorts.unpack(batch.messages[0].content)
    assert [p for p, _, _ in members] == [0, 1]
    assert [c.config_records["config"]["x"] for _, c, _ in members] == [0, 1]
    assert torch.equal(members[1][1].array_records["arrays"].to_torch_state_dict()["t"], torch.full((3,), 1.0))
    # Member 0 answers, member 1 fails alone; the second cohort fails as a whole; no reply is lost or invented.
    for m in batch.messages:
        m.metadata.__dict__["_message_id"] = str(uuid4())
    r0 = Message(content=cohorts.pack_replies([content(10), Error(code=2, reason="boom")]), reply_to=batch.messages[0])
    r1 = Message(Error(code=0, reason="worker died"), reply_to=batch.messages[1])
    stray = Message(content=RecordDict(), reply_to=train_msg(99, 9))
    out = batch.split([r1, stray, r0])
    by_node = {m.metadata.src_node_id: m for m in out}
    assert sorted(by_node) == [70, 71, 72]
    assert by_node[72].has_error() and by_node[72].error.reason == "worker died"
    assert by_node[71].has_error() and by_node[71].error.reason == "boom" and by_node[71].error.code == 2
    assert by_node[70].content.config_records["config"]["x"] == 10
    sent = {m.metadata.dst_node_id: m.metadata.message_id for m in msgs}
    assert all(m.metadata.reply_to_message_id == sent[node] for node, m in by_node.items())
    # No reply for a cohort (the round timed out): its members get none, and the server counts them failed.
    assert batch.split([r0]) and {m.metadata.src_node_id for m in batch.split([r0])} == {70, 71}


def test_each_members_node_state_travels_with_its_cohort_and_comes_back_outside_its_bytes():
    """A member's node state (FLoRA's kept merges, a top-k residual, FedSA-LoRA's B) is the engine's
    to carry, per client, whichever node its cohort goes to: round 2's cohorts differ from round
    1's, and each member gets back the state its round-1 reply left; what the member's reply counts
    (``aggregate_train``'s bytes up) is its content alone."""
    from flwr.app import ArrayRecord

    from fedpeft import messages

    states: dict = {}
    nodes = {70: 0, 71: 1, 72: 2}

    def worker(batch, rnd):  # each member appends this round to its state, as a ClientApp's node state changes
        replies = []
        for m in batch.messages:
            members = cohorts.unpack(m.content)
            for pid, _, state in members:
                old = state.array_records["kept"].to_torch_state_dict()["t"] if "kept" in state.array_records else torch.zeros(0)
                state["kept"] = ArrayRecord(torch_state_dict={"t": torch.cat([old, torch.tensor([float(10 * pid + rnd)])])})
            m.metadata.__dict__["_message_id"] = str(uuid4())
            replies.append(Message(content=cohorts.pack_replies([content(pid) for pid, _, _ in members], [st for _, _, st in members]), reply_to=m))
        return batch.split(replies)

    one = cohorts.Cohorts([train_msg(n, p) for n, p in nodes.items()], nodes, size=2, states=states)
    assert [m.metadata.dst_node_id for m in one.messages] == [70, 72]  # {0, 1} and {2}
    out = worker(one, 1)
    assert all(messages.num_bytes(m.content) == messages.num_bytes(content(nodes[m.metadata.src_node_id])) for m in out)
    assert all(not any(k.startswith("state") for k in m.content) for m in out)
    two = cohorts.Cohorts([train_msg(n, p) for n, p in nodes.items() if p != 0], nodes, size=1, states=states)  # 1 and 2 alone
    assert [m.metadata.dst_node_id for m in two.messages] == [71, 72]
    worker(two, 2)
    got = {p: states[p].array_records["kept"].to_torch_state_dict()["t"].tolist() for p in nodes.values()}
    assert got == {0: [1.0], 1: [11.0, 12.0], 2: [21.0, 22.0]}


def test_a_malformed_cohort_is_refused_naming_the_record():
    with pytest.raises(ValueError, match="without its 'cohort' record"):
        cohorts.unpack(content(0))
    bad = cohorts.pack([content(0)], [0])
    bad["5/config"] = ConfigRecord({"x": 1})
    with pytest.raises(ValueError, match=r"cohort record '5/config' names no member \(the cohort has 1\)"):
        cohorts.unpack(bad)


# ------------------------------------------------------------------ settings


def test_cohort_settings_are_checked_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match="engine.kind: unknown value 'batched'"):
        compose(["engine.kind=batched"])
    with pytest.raises(ConfigError, match="engine.cohort_size: must be at least 1"):
        compose(["engine.kind=cohort", "engine.cohort_size=0"])


def test_fedpeft_deploy_refuses_the_cohort_engine_in_one_line(capsys):
    from fedpeft.cli import main

    assert main(["deploy", "engine.kind=cohort", "tracking.mode=disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedpeft: error: engine.kind=cohort batches clients on a simulation worker; a deployment's devices each train "
                   "their own data: use engine.kind=per_client with fedpeft deploy"]


def test_a_run_may_resume_on_another_engine_but_not_with_other_settings():
    saved = {"rounds": 3, "engine": {"kind": "per_client", "num_cpus": 1}, "train": {"lr": 0.1}}
    assert changed_keys(saved, {"rounds": 5, "engine": {"kind": "cohort", "cohort_size": 8, "num_cpus": 2}, "train": {"lr": 0.1}}) == []
    assert changed_keys(saved, {"rounds": 3, "engine": {"kind": "cohort"}, "train": {"lr": 0.2}}) == ["train.lr"]
    # A key added to fedpeft after the run was saved: unchanged at its default, a change otherwise.
    defaults = {"train": {"lr": 0.003, "optimizer": "adamw"}}
    assert changed_keys(saved, {"rounds": 3, "train": {"lr": 0.1, "optimizer": "adamw"}}, defaults=defaults) == []
    assert changed_keys(saved, {"rounds": 3, "train": {"lr": 0.1, "optimizer": "sgd"}}, defaults=defaults) == ["train.optimizer"]
