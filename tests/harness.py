"""What several test modules share (import it as ``tests.harness``; no test module imports another):

- :class:`FakeGrid` and :class:`AppGrid`: Flower grids in-process, the first answering the server's
  queries only, the second delivering every message to the real ClientApp;
- :func:`reply_to` and :func:`random_B`: a client's reply with given factors, and factors to send;
- :func:`dropout_off`: a built model with dropout off (engines that draw from their own RNG streams);
- :func:`run_cli`: ``fedpeft`` commands in a working directory, with their exit code and output;
- :func:`read_csv` and :data:`PNG`: what ``fedpeft compare`` writes;
- :class:`LargestTensor`: the largest tensor any torch function returns;
- :func:`listeners`: every listening TCP socket and the processes holding it;
- :func:`simulate`: a small run on Flower's simulation engine (starts Ray);
- the reader of W&B's offline run files (:func:`offline_runs`, :func:`check_run`).

Flower, fedpeft and the clients are imported where they are used, so that importing this module
costs no more than torch.
"""

from __future__ import annotations

import csv
import itertools
import json
import struct
import time
import zlib
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

# ------------------------------------------------------------------ in-process Flower grids


class FakeGrid:
    """A Flower grid for in-process tests of the server adapter: ``nodes`` maps node id → partition
    id, and query messages are answered the way ``clients.app.query_handler`` answers them;
    ``created_at``: node id → when its reply was made (default 0.0 for all)."""

    def __init__(self, nodes, created_at=None):
        self.nodes = dict(nodes)
        self.created_at = dict(created_at or {})
        self.queries = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, msgs, *, timeout=None):
        from types import SimpleNamespace

        from flwr.app import ConfigRecord, RecordDict

        out = []
        for m in msgs:
            self.queries += 1
            node = m.metadata.dst_node_id
            content = RecordDict({"config": ConfigRecord({"partition-id": self.nodes[node]})})
            metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=m.metadata.message_id, created_at=self.created_at.get(node, 0.0))
            out.append(SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content))
        return out


class AppGrid:
    """Flower's grid API over the real ClientApp, in-process: a pushed message is handled at once
    with its node's Context (an exception becomes the error reply Flower's simulation engine makes
    of it), and its reply waits to be pulled."""

    pull_interval = 0.0

    def __init__(self, contexts):
        self.contexts, self.waiting, self.types = contexts, {}, []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, msgs):
        from uuid import uuid4

        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        ids = []
        for m in msgs:
            m.metadata.__dict__["_message_id"] = mid = str(uuid4())
            self.types.append(m.metadata.message_type)
            try:
                self.waiting[mid] = self.deliver(m, self.contexts[m.metadata.dst_node_id])
            except Exception as ex:  # as flwr's vce_api reports a ClientApp's exception
                self.waiting[mid] = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=m)
            ids.append(mid)
        return ids

    def deliver(self, msg, context):
        from clients import app as client_app

        return client_app.app(msg, context)

    def pull_messages(self, ids):
        return [self.waiting.pop(i) for i in list(ids) if i in self.waiting]

    def send_and_receive(self, msgs, *, timeout=None):
        return self.pull_messages(self.push_messages(msgs))


class Wire(AppGrid):
    """:class:`AppGrid` whose messages reach the nodes through Flower's wire format (protobuf), as
    a deployment's and the simulation's Ray workers do: each node edits its own copy (Flower's
    SecAgg+ workflow sends one content object to every node and its mod pops keys from it)."""

    def deliver(self, msg, context):
        return super().deliver(transported(msg), context)


def transported(msg):
    """``msg`` as a node receives it: through Flower's wire format."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(msg))


class Machines(AppGrid):
    """:class:`AppGrid` as a Ray cluster of ``len(dirs)`` machines that share no disk: the messages
    of each push (a round's train messages, its evaluate messages) go to the next machine in turn,
    so a node changes machines every round and a machine's worker lags behind the nodes it serves;
    each machine's worker has its own cached base model (``clients.app._MODELS``) and sees the
    run's shared dir as ``dirs[k]`` (the driver's machine: the run's own; another: an empty
    directory, as a tmpfs over the run's path). The node's Flower state travels with the message,
    as Flower's simulation carries it. ``served`` counts the messages each machine handled."""

    def __init__(self, contexts, dirs):
        super().__init__(contexts)
        self.dirs, self.pushes = list(dirs), 0
        self.caches = [{} for _ in self.dirs]
        self.served = [0] * len(self.dirs)

    def push_messages(self, msgs):
        self.pushes += 1
        return super().push_messages(msgs)

    def deliver(self, msg, context):
        from flwr.app import Context

        from clients import app as client_app

        k = self.pushes % len(self.dirs)
        self.served[k] += 1
        view = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config, state=context.state,
                       run_config={**context.run_config, "shared-dir": str(self.dirs[k])})
        saved = dict(client_app._MODELS)
        client_app._MODELS.clear()
        client_app._MODELS.update(self.caches[k])
        try:
            return client_app.app(msg, view)
        finally:
            self.caches[k] = dict(client_app._MODELS)
            client_app._MODELS.clear()
            client_app._MODELS.update(saved)



def reply_to(msg, adapter, head, n=10):
    """The reply to ``msg`` of a client that trained ``adapter`` and ``head`` on ``n`` examples."""
    from flwr.app import Message

    from fedpeft import messages

    return Message(content=messages.encode(adapter, head, {"num-examples": n}), reply_to=msg)


def random_B(adapter, seed, scale=0.05):
    """``adapter`` with every B drawn at random (std ``scale``, seeded), as if trained."""
    from fedpeft.lora import LoraFactors

    g = torch.Generator().manual_seed(seed)
    return {m: LoraFactors(f.A, scale * torch.randn(f.B.shape, generator=g), f.scaling) for m, f in adapter.items()}


def save_tiny_llama(path: Path, tok, *, positions: int = 64) -> Path:
    """A random-init two-layer Llama (hidden 32, 4 heads, 2 KV heads: a grouped-query ``v_proj``),
    seeded, with the tokenizer ``tok`` (SmolLM2's), saved at ``path`` as a local checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=positions, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dropout_off(lm):
    """``lm`` (a ``fedpeft.models.LoadedModel``) with every dropout layer's probability set to 0."""
    for mod in lm.model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return lm


# ------------------------------------------------------------------ the CLI, and the files compare writes


def run_cli(args, tmp_path, monkeypatch, capsys):
    """``fedpeft <args>`` run in ``tmp_path``: (exit code, stdout, stderr)."""
    from fedpeft.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def config_error(args, tmp_path, monkeypatch, capsys) -> str:
    """``fedpeft <args>`` must stop with exit 2 and exactly one line on stderr: that line."""
    code, out, err = run_cli(args, tmp_path, monkeypatch, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0]


PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ tensors and processes


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns (no monkeypatching), and fails at once
    when one exceeds ``limit`` elements (so a dense implementation fails fast instead of going on to
    decompose a 20000 × 20000 matrix)."""

    def __init__(self, limit=float("inf")):
        super().__init__()
        self.limit = limit
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                if t.numel() > self.limit:
                    raise AssertionError(f"{func} made a {tuple(t.shape)} tensor")
        return out


def listeners():
    """(address, port, pids) of every listening TCP socket, from ``ss -ltnp``."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        addr, _, port = fields[3].rpartition(":")
        rows.append((addr.strip("[]"), int(port), {int(p) for p in re.findall(r"pid=(\d+)", line)}))
    return rows


# ------------------------------------------------------------------ Flower's simulation engine (Ray)


def simulate(tmp_path, *overrides):
    """A small MiniLM run (rank 4, 48 tokens, 256 test examples, W&B offline) in ``tmp_path / "run"``
    on Flower's simulation engine: (config, the run's summary)."""
    from fedpeft.composing import compose
    from fedpeft.simulation import run

    cfg = compose(["tracking.mode=offline", "model.rank=4", "model.alpha=8", "model.max_length=48", "data.eval_samples=256", *overrides])
    return cfg, run(cfg, tmp_path / "run")


_RUN_IDS = itertools.count(1000)


def federate(tmp_path, *overrides, run_id: int | None = None, machines: int = 1, resume: bool = False, wire: bool = False):
    """The same small MiniLM run as :func:`simulate`, in-process: the real server
    (:class:`fedpeft.serverapp.Federation`) over :class:`AppGrid` (the real ClientApp, each node with
    its own Context), in ``tmp_path / "run"``, W&B off: (config, the run's summary). Each call is a
    new run id (a worker's cached base model is per run, as FLoRA's merges change it). With
    ``machines`` > 1, over :class:`Machines`: the other machines see an empty shared dir. ``resume``:
    continue the run in ``tmp_path / "run"`` (new node states, as a new Flower run has). ``wire``:
    over :class:`Wire` (messages through Flower's wire format). What it
    cannot show (Ray workers, processes) the e2e tier shows. Needs the ``task_identity`` fixture."""
    from flwr.app import Context, RecordDict

    from fedpeft.composing import compose
    from fedpeft.runconfig import RunSpec, to_run_config
    from fedpeft.serverapp import Federation

    cfg = compose(["tracking.mode=disabled", "model.rank=4", "model.alpha=8", "model.max_length=48", "data.eval_samples=256",
                   "engine.device=cpu", "engine.num_cpus=1", *overrides])
    run_dir = tmp_path / "run"
    run_id = next(_RUN_IDS) if run_id is None else run_id
    rc = to_run_config(cfg, run_dir, shared_dir=str(run_dir / "state"), resume=resume)
    contexts = {
        100 + i: Context(run_id=run_id, node_id=100 + i, node_config={"partition-id": i, "num-partitions": cfg.clients}, state=RecordDict(),
                         run_config=rc)
        for i in range(cfg.clients)
    }
    others = [tmp_path / f"machine_{k}" / "state" for k in range(1, machines)]
    grid = Machines(contexts, [run_dir / "state", *others]) if machines > 1 else (Wire if wire else AppGrid)(contexts)
    return cfg, Federation(cfg, RunSpec(run_dir, resume=resume, shared_dir=str(run_dir / "state"))).run(grid)


# ------------------------------------------------------------------ W&B's offline run files

# W&B 0.31 ships no Python reader for its run files (wandb-core writes and syncs them); the format
# is LevelDB's log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# chunks, each with a header (CRC-32 of type byte + data, length, type FULL/FIRST/MIDDLE/LAST).
BLOCK, CHUNK_HEADER, FULL, FIRST, MIDDLE, LAST = 32768, 7, 1, 2, 3, 4
INTERNAL = {"_step", "_timestamp", "_runtime", "_wandb"}


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "not a W&B run file"
    records, pos, parts = [], 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's zero trailer
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + CHUNK_HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"bad checksum at byte {pos}"
        pos += CHUNK_HEADER + length
        parts += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def items(updates) -> dict:
    """A history row's items or a summary's/config's updates as a flat ``{key: value}``."""
    return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}


def complete_records(path: Path, timeout: float = 60) -> list:
    """The records of a finished run's file. ``run.finish()`` returns before wandb-core (a process
    of its own) has written the file out: wait for the exit record and for the file to stop growing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        size = path.stat().st_size
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            time.sleep(0.2)
            if path.stat().st_size == size:
                return records
        time.sleep(0.1)
    raise AssertionError(f"{path}: not written out (no exit record, or still growing) after {timeout}s")


class OfflineRun:
    """What one ``wandb/offline-run-*`` directory recorded."""

    def __init__(self, path: Path):
        self.path = path
        records = complete_records(next(path.glob("run-*.wandb")))
        kinds = [r.WhichOneof("record_type") for r in records]
        self.run = records[kinds.index("run")].run
        self.config = {k: v for k, v in items(self.run.config.update).items() if k != "_wandb"}
        for r in records:
            if r.WhichOneof("record_type") == "config":
                self.config.update({k: v for k, v in items(r.config.update).items() if k != "_wandb"})
        self.history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        self.metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
        self.summary: dict = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                self.summary.update(items(r.summary.update))
        self.exit_code = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_history_is_metrics_jsonl(history: list[dict], rows: list[dict]) -> None:
    """Every W&B history row holds exactly the numbers of the metrics.jsonl row of its round, at
    step = round."""
    assert [h["round"] for h in history] == [r["round"] for r in rows]
    for h, row in zip(history, rows):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        logged = {k: v for k, v in h.items() if k not in INTERNAL}
        assert logged == numbers, (row["round"], set(logged) ^ set(numbers))
        assert h["_step"] == row["round"]


def check_run(run_dir: Path, config: dict, *, group: str, job_type: str) -> OfflineRun:
    """For a real run's directory (tests/e2e/test_simulation.py): one offline W&B run whose history
    is metrics.jsonl, whose config is the run's resolved config, and whose summary has the finals."""
    (run,) = offline_runs(run_dir)
    rows = jsonl(run_dir)
    assert_history_is_metrics_jsonl(run.history, rows)
    assert run.config == json.loads(json.dumps(config))
    assert (run.run.run_group, run.run.job_type) == (group, job_type)
    assert run.run.run_id == (run_dir / "wandb-id").read_text().strip()
    final = {k: v for k, v in rows[-1].items() if isinstance(v, (int, float))}
    assert {k[len("final/"):]: v for k, v in run.summary.items() if k.startswith("final/")} == final
    return run


def pruning_plan(gamma: float, lam: float, r_min: int, **plan):
    """A client plan with HetLoRA's self-pruning (its loss term and its finalisation), as HetLoRA's
    payload builds it; ``plan``: the plan's other fields."""
    from fedpeft.plan import ClientPlan, SelfPruning

    prune = SelfPruning(gamma=gamma, lam=lam, r_min=r_min)
    return ClientPlan(loss_term=prune, finalise=prune, **plan)


# ------------------------------------------------------------------ a small file system of its own


def in_tmpfs(tmp_path: Path, script: str, *, options: str = "size=256k", timeout: float = 120) -> dict:
    """Run ``script`` (Python; ``MNT`` is the mount point, ``fill()`` fills it to the last byte) in a
    private mount namespace with a tmpfs mounted at ``tmp_path/mnt`` (``options``: mount(8)'s, e.g. its
    size), from the repository root; what it prints last, as JSON. Needs the ``can_mount`` fixture."""
    import subprocess
    import sys
    import textwrap

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prelude = textwrap.dedent("""
        import json, os, sys
        from pathlib import Path
        MNT = Path(sys.argv[1])

        def fill():
            with open(MNT / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\\0" * 4096)
                except OSError:
                    pass
    """)
    code = prelude + textwrap.dedent(script)
    shell = f'mount -t tmpfs -o {options} tmpfs "$1" && exec "$2" -c "$3" "$1"'
    r = subprocess.run(["unshare", "--mount", "sh", "-c", shell, "sh", str(mnt), sys.executable, code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def rotten_minilm(rows: int):
    """MiniLM-L6 with LoRA r=4 on query/value and a 2-way head (seed 0), ``rows`` shuffled rotten
    tomatoes training rows, and the adapter it starts from: the in-process client tests' setup."""
    from types import SimpleNamespace

    from fedpeft import data as fdata
    from fedpeft.models import build, read_adapter

    torch.set_num_threads(2)
    model = SimpleNamespace(name="minilm", task="classification", target_modules=["query", "value"], rank=4, alpha=8.0, dropout=0.0, max_length=32)
    lm = build(model, num_labels=2, device="cpu", seed=0)
    return lm, fdata.load("rotten_tomatoes", seed=0)["train"].shuffle(seed=2).select(range(rows)), read_adapter(lm)
