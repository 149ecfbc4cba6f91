"""The node-local partition cache (``clients.partition_cache``, issue 24 §5): a cold ClientApp
process reads its partition from disk instead of loading and cutting the whole dataset.

- a hit gives exactly the rows and features a miss built, without building again;
- a changed input (seed, model, partition, the data files of a local dataset) is another entry;
- a damaged file or an entry whose recorded key differs is rebuilt, never trusted; a cache folder
  that cannot be written is done without;
- through ``clients.app.node_data``, a built-in dataset's cached partition equals the one the
  partitioner cuts, and a warm cache never calls the partitioner.
"""

import hashlib
import json
from dataclasses import replace

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from clients import partition_cache as pc


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pc, "cache_dir", lambda: tmp_path / "cache" / "partitions")  # the assets stay where they are
    pc._READ.clear()  # each test starts as a fresh process would
    yield tmp_path / "cache" / "partitions"
    pc._READ.clear()


def rows(n: int = 12, shift: int = 0) -> Dataset:
    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    return Dataset.from_dict({"text": [f"row {i + shift}" for i in range(n)], "label": [(i + shift) % 2 for i in range(n)]}, features=feats)


class Builder:
    def __init__(self, ds: Dataset):
        self.ds, self.calls = ds, 0

    def __call__(self) -> Dataset:
        self.calls += 1
        return self.ds


KEY = {"data": "toy", "seed": 0, "partition-id": 1}


def fresh_process():
    pc._READ.clear()


def test_hit_returns_what_the_miss_built_without_building(cache):
    b = Builder(rows())
    first = pc.cached(KEY, b)
    fresh_process()
    second = pc.cached(KEY, b)
    assert b.calls == 1
    assert first.to_dict() == second.to_dict() == rows().to_dict()
    assert second.features == rows().features
    where = pc.entry_dir(KEY)
    assert where.parent == cache
    meta = json.loads((where / pc.META).read_text())
    assert meta["key"] == KEY
    assert meta["files"] and all(hashlib.sha256((where / rel).read_bytes()).hexdigest() == sha for rel, sha in meta["files"].items())


def test_a_changed_input_is_another_entry():
    b = Builder(rows())
    pc.cached(KEY, b)
    other = Builder(rows(shift=5))
    got = pc.cached({**KEY, "seed": 1}, other)
    assert other.calls == 1 and got.to_dict() == rows(shift=5).to_dict()
    assert pc.entry_dir(KEY) != pc.entry_dir({**KEY, "seed": 1})


def test_a_damaged_file_is_rebuilt_not_trusted():
    b = Builder(rows())
    pc.cached(KEY, b)
    where = pc.entry_dir(KEY)
    arrow = next(f for f in (where / pc.DATA).rglob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    i = bytes(data).index(b"row 3")
    data[i:i + 5] = b"row 9"  # same size, another value: only the checksum can tell
    arrow.write_bytes(bytes(data))
    fresh_process()
    got = pc.cached(KEY, b)
    assert b.calls == 2 and got.to_dict() == rows().to_dict()
    meta = json.loads((where / pc.META).read_text())
    assert all(hashlib.sha256((where / rel).read_bytes()).hexdigest() == sha for rel, sha in meta["files"].items())


@pytest.mark.parametrize("damage", ["truncated meta", "missing data file", "other key", "extra file"])
def test_a_broken_entry_is_rebuilt(damage):
    b = Builder(rows())
    pc.cached(KEY, b)
    where = pc.entry_dir(KEY)
    if damage == "truncated meta":
        (where / pc.META).write_text((where / pc.META).read_text()[:20])
    elif damage == "missing data file":
        next((where / pc.DATA).rglob("*.arrow")).unlink()
    elif damage == "other key":
        meta = json.loads((where / pc.META).read_text())
        (where / pc.META).write_text(json.dumps({**meta, "key": {**KEY, "seed": 7}}))
    else:
        (where / pc.DATA / "stray.arrow").write_bytes(b"x")
    fresh_process()
    assert pc.cached(KEY, b).to_dict() == rows().to_dict() and b.calls == 2


def test_an_unwritable_cache_is_gone_without(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(pc, "cache_dir", lambda: blocker / "partitions")  # cannot be created
    b = Builder(rows())
    assert pc.cached(KEY, b).to_dict() == rows().to_dict() and b.calls == 1


def test_local_files_sign_the_key(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\na,0\n")
    before = pc.path_signature(str(f))
    f.write_text("text,label\na,0\nb,1\n")
    assert before != pc.path_signature(str(f)) and before[0][0] == "d.csv"
    assert pc.path_signature("election_tweets") is None  # a built-in: pinned assets, no files here


def test_node_data_reads_the_partition_from_the_cache(monkeypatch):
    from omegaconf import OmegaConf

    from clients import app as client_app
    from fedpeft.composing import compose
    from fedpeft.config import Config

    s: Config = OmegaConf.to_object(compose(["clients=3", "data=election_tweets"]))
    node = {"partition-id": 2, "num-partitions": 3}
    want = client_app.get_partitioner(s.data, s.partition, 3, s.seed, s.model.name)[0].load_partition(2)
    got = client_app.node_data(s, node)
    assert got.to_dict() == want.to_dict() and got.features == want.features
    fresh_process()

    def refuse(*a, **k):
        raise AssertionError("a warm cache must not partition the dataset again")

    monkeypatch.setattr(client_app, "get_partitioner", refuse)
    assert client_app.node_data(s, node).to_dict() == want.to_dict()
    fresh_process()
    other = replace(s, seed=s.seed + 1)  # another seed: another entry, so it partitions again
    with pytest.raises(AssertionError, match="warm cache"):
        client_app.node_data(other, node)
