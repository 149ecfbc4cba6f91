"""Inputs that used to fail late or say too little: a data file that cannot be read says what is
wrong with it, once, before anything runs; a missing label column names the key to set; a run whose
evaluation loss explodes says it diverged (the rule: above 10x round 0's loss, or not finite)."""

import logging
import math

import pytest

from fedpeft import data as fdata
from fedpeft.metrics import divergence
from tests.harness import run_cli


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "the file is empty"),
        (b"\n \n", "the file is empty"),
        (b"text,label\n", "the file has a header but no rows"),
        (b"text,label\r\n\r\n", "the file has a header but no rows"),
        (b"text,label\ncaf\xe9,1\nok,0\n", "the file is not UTF-8 text (byte 0xe9 at offset 14); save it as UTF-8"),
        (b"text,label\nok,0\n" + b"x,1\n" * 400_000 + b"\xff,1\n", f"(byte 0xff at offset {16 + 4 * 400_000})"),  # past the first 1 MiB read
        (b"text,label\nabc,1\nd\xc3", "the file is not UTF-8 text (byte 0xc3 at offset 18)"),  # cut inside a character
    ],
)
def test_a_data_file_that_cannot_be_read_says_what_is_wrong_once(content, expected, tmp_path, caplog):
    f = tmp_path / "reviews.csv"
    f.write_bytes(content)
    with caplog.at_level(logging.DEBUG), pytest.raises(fdata.DataError) as e:
        fdata.load(str(f))
    assert str(e.value).startswith(f"dataset {str(f)!r}: the file ") and expected in str(e.value)
    assert "\n" not in str(e.value)
    assert not [r for r in caplog.records if r.name.startswith("datasets")]  # said once: by the DataError


def test_a_file_in_a_data_folder_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(f"a {i},{i % 2}" for i in range(20)))
    (tmp_path / "test.csv").write_text("text,label\n")
    with pytest.raises(fdata.DataError) as e:
        fdata.load(str(tmp_path))
    assert str(e.value) == f"dataset {str(tmp_path)!r}: file {tmp_path / 'test.csv'} has a header but no rows"


def test_an_unreadable_file_names_the_cause_not_the_datasets_wrapper(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"text": "a", "label": 1}\n{"text": ')
    with pytest.raises(fdata.DataError) as e:
        fdata.load(str(f))
    assert "cannot read the local path" in str(e.value) and "An error occurred while generating the dataset" not in str(e.value)


def test_a_missing_label_column_first_suggests_data_label_column(tmp_path, monkeypatch, capsys):
    f = tmp_path / "reviews.csv"
    f.write_text("text,stars\n" + "\n".join(f"review {i},{'good' if i % 2 else 'bad'}" for i in range(40)))
    code, _, err = run_cli(["simulate", f"data.name={f}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.strip() == (f"fedpeft: config error: data.label_column: data {str(f)!r} has no label column 'label': set "
                           "data.label_column=<one of stars>, or, to train a language model on its text, use a causal_lm model (e.g. model=smollm2)")


def rows(*losses):
    return [{"round": r, "loss": v} for r, v in enumerate(losses)]


def test_divergence_is_a_loss_above_ten_times_round_0s_or_not_finite():
    assert divergence(rows(0.69, 0.6, 0.5)) is None
    assert divergence(rows(0.5, 5.0, 4.0)) is None  # 10x exactly: not above
    line = divergence(rows(0.69, 0.6, 16585.0, 7.0))
    assert line == ("diverged: round 2's evaluation loss 1.658e+04 is 24036x round 0's 0.69 (the rule: above 10x round 0's, or not finite); "
                    "lower train.lr")
    assert divergence(rows(0.69, math.nan)).startswith("diverged: round 1's evaluation loss nan is not finite")
    assert divergence(rows(0.69, math.inf)).startswith("diverged: round 1's evaluation loss inf is not finite")
    assert divergence([{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.1}]) is None  # no loss to compare
    assert divergence([{"round": 1, "loss": 1e9}]) is None  # no round 0 (nothing to compare with)
