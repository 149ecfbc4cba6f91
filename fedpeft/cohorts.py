"""The cohort engine's messages: K clients' train messages travel as one Flower message.

``engine.kind=cohort``: the strategy still makes one train message per sampled client
(:meth:`fedpeft.server.FlowerAdapter.configure_train`, which counts each client's bytes down), and
checks and aggregates one reply per client (``aggregate_train``, which counts each client's bytes
up); in between, :class:`Cohorts` packs the messages of up to ``cohort_size`` clients into one
``train.cohort`` message to the first member's node, and splits each cohort reply back into the
members' replies. A member's records travel unchanged under the key ``"<j>/<name>"`` (j: its
place in the cohort), so what a client is sent and what it sends back, and their byte counts, are
exactly the per-client engine's. The worker side is ``clients.app.cohort_handler``.

A member's node state (what the per-client engine's Flower node state keeps for it across rounds:
the FLoRA merges it was sent, its top-k residual, FedSA-LoRA's own B) is held here on the server,
per client, and travels with the cohort message under ``"state/<j>/<name>"`` and back with the
reply, whichever worker and machine trains the cohort; it is the engine's transport, not the
strategy's communication (outside the members' byte counts, as a node state is).
"""

from __future__ import annotations

import math
from uuid import uuid4

from flwr.app import ConfigRecord, Error, Message, RecordDict

COHORT = "cohort"  # the ConfigRecord naming the members: their partition ids, in order
ACTION = "cohort"  # the ClientApp's handler: ClientApp.train(ACTION)
MESSAGE_TYPE = f"train.{ACTION}"  # Flower routes it to that handler
ERROR = "error"  # a member's error: ConfigRecord {"code", "reason"} under "<j>/error"
STATE = "state"  # member j's node state: its records under "state/<j>/<name>"


def groups(n: int, size: int) -> list[range]:
    """``n`` clients in ``ceil(n / size)`` consecutive cohorts whose sizes differ by at most one
    (5 clients, size 4: 3 + 2, not 4 + 1, so that two workers finish together)."""
    if n == 0:
        return []
    m = math.ceil(n / size)
    base, extra = divmod(n, m)
    out, start = [], 0
    for i in range(m):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def _put_states(out: RecordDict, states: list[RecordDict] | None) -> None:
    for j, state in enumerate(states or []):
        for name, record in state.items():
            out[f"{STATE}/{j}/{name}"] = record


def _state_key(key: str) -> tuple[int, str] | None:
    """(member, record name) of a ``"state/<j>/<name>"`` key, else None."""
    head, sep, rest = key.partition("/")
    j, sep2, name = rest.partition("/")
    return (int(j), name) if head == STATE and sep and sep2 and j.isdigit() else None


def pack(contents: list[RecordDict], partitions: list[int], states: list[RecordDict] | None = None) -> RecordDict:
    """One cohort's content: member j's records under ``"<j>/<name>"``, its node state's under
    ``"state/<j>/<name>"``, and ``cohort`` naming the members' partition ids."""
    out = RecordDict()
    for j, content in enumerate(contents):
        for name, record in content.items():
            out[f"{j}/{name}"] = record
    _put_states(out, states)
    out[COHORT] = ConfigRecord({"partitions": [int(p) for p in partitions]})
    return out


def unpack(content: RecordDict) -> list[tuple[int, RecordDict, RecordDict]]:
    """The members of a cohort content, in order: (partition id, the member's own content, its node state)."""
    if COHORT not in content.config_records:
        raise ValueError("a train.cohort message without its 'cohort' record")
    partitions = [int(p) for p in content.config_records[COHORT]["partitions"]]
    members = [RecordDict() for _ in partitions]
    states = [RecordDict() for _ in partitions]
    for key, record in content.items():
        if key == COHORT:
            continue
        state = _state_key(key)
        if state is not None and state[0] < len(members):
            states[state[0]][state[1]] = record
            continue
        j, sep, name = key.partition("/")
        if not sep or not j.isdigit() or int(j) >= len(members):
            raise ValueError(f"cohort record {key!r} names no member (the cohort has {len(members)})")
        members[int(j)][name] = record
    return list(zip(partitions, members, states))


def pack_replies(replies: list[RecordDict | Error], states: list[RecordDict] | None = None) -> RecordDict:
    """A cohort reply: member j's reply content under ``"<j>/<name>"``, or its error as
    ``"<j>/error"``, and its node state as it left it under ``"state/<j>/<name>"``."""
    out = RecordDict()
    for j, reply in enumerate(replies):
        if isinstance(reply, Error):
            out[f"{j}/{ERROR}"] = ConfigRecord({"code": int(reply.code), "reason": str(reply.reason)})
            continue
        for name, record in reply.items():
            out[f"{j}/{name}"] = record
    _put_states(out, states)
    return out


class Cohorts:
    """One round's per-client train messages packed into cohorts (:func:`groups` of the messages in
    partition order), and the cohort replies split back into per-client replies.

    Each per-client message gets a message id here (as a grid gives it when it pushes the message),
    so that a member's reply answers it: ``Message(content, reply_to=member)``.

    ``states`` (client id → its node state; the engine's, kept across rounds) is what each member
    takes along and what its reply brings back (a member of a failed cohort keeps its old one)."""

    def __init__(self, msgs: list[Message], partition_of: dict[int, int], size: int, states: dict[int, RecordDict] | None = None) -> None:
        msgs = sorted(msgs, key=lambda m: partition_of.get(m.metadata.dst_node_id, -1))
        self.members: list[list[Message]] = [[msgs[i] for i in g] for g in groups(len(msgs), size)]
        self.messages: list[Message] = []
        self.states = {} if states is None else states
        self.partition_of = partition_of
        for members in self.members:
            for m in members:
                m.metadata.__dict__["_message_id"] = str(uuid4())  # what Flower's grids do on push
            pids = [partition_of[m.metadata.dst_node_id] for m in members]
            content = pack([m.content for m in members], pids, [self.states.get(p, RecordDict()) for p in pids])
            self.messages.append(Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=members[0].metadata.dst_node_id))

    @property
    def weights(self) -> list[int]:
        """Clients per cohort message, in the order of :attr:`messages` (for progress)."""
        return [len(m) for m in self.members]

    def split(self, replies: list[Message]) -> list[Message]:
        """Per-client replies from the cohort replies: each member's content, or its own error, or
        (the whole cohort failed: a worker crash, a cohort the engine refused) the cohort's error.
        A cohort with no reply (timeout) gives its members none: the server counts them failed."""
        by_id = {m.metadata.message_id: members for m, members in zip(self.messages, self.members)}
        out = []
        for reply in replies:
            members = by_id.get(reply.metadata.reply_to_message_id)
            if members is None:
                continue  # not a reply to this round's cohorts
            if reply.has_error():
                out += [Message(reply.error, reply_to=m) for m in members]
                continue
            parts: list[RecordDict] = [RecordDict() for _ in members]
            states: dict[int, RecordDict] = {}
            for key, record in reply.content.items():
                state = _state_key(key)
                if state is not None:
                    if state[0] < len(members):
                        states.setdefault(state[0], RecordDict())[state[1]] = record
                    continue
                j, sep, name = key.partition("/")
                if sep and j.isdigit() and int(j) < len(members):
                    parts[int(j)][name] = record
            for j, m in enumerate(members):
                self.states[self.partition_of[m.metadata.dst_node_id]] = states.get(j, RecordDict())
            for m, part in zip(members, parts):
                if ERROR in part.config_records:
                    e = part.config_records[ERROR]
                    out.append(Message(Error(code=int(e["code"]), reason=str(e["reason"])), reply_to=m))
                else:
                    out.append(Message(content=part, reply_to=m))
        return out
