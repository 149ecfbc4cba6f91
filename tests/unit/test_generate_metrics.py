"""The generative metrics on hand-made generations (fedpeft/generate.py), the rows generated each
round, the generative summary, and the ``eval.*`` keys' checks. No model: the generation itself
is tested in tests/app/test_generate.py."""

from __future__ import annotations

import pytest
from datasets import Dataset
from rouge_score import rouge_scorer

from fedpeft import generate as G
from tests.harness import run_cli


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Cat!", "cat"),
        ("  an   apple,  a day ", "apple day"),
        ("Positive.", "positive"),
        ("THEATRE of the absurd", "theatre of absurd"),  # articles as words only
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalisation_is_squads(text, normalised):
    assert G.normalize_answer(text) == normalised


@pytest.mark.parametrize(
    "generation, answer, exact, match",
    [
        ("Positive", "positive", True, True),
        ("positive.", "Positive", True, True),
        ("The answer: Paris", "Paris", False, False),  # not at the start
        ("Positive. The review praises the acting.", "positive", False, True),  # starts with the answer
        ("positively great", "positive", False, False),  # not at a word boundary
        ("The sci.space group", "sci.space", False, True),  # punctuation and articles dropped on both sides
        ("it is sci.space", "sci.space", False, False),
        ("", "", True, True),
        ("anything", "", False, False),  # an empty answer matches only an empty generation
        ("neg", "negative", False, False),  # a prefix of the answer is not the answer
    ],
)
def test_exact_match_and_answer_match(generation, answer, exact, match):
    assert G.exact_match(generation, answer) is exact
    assert G.answer_match(generation, answer) is match


def test_rouge_l_is_rouge_scores_f1():
    answer, generation = "the cat sat on the mat", "the cat on the mat"
    # LCS = 5 tokens: P = 5/5, R = 5/6, F1 = 2PR / (P + R)
    assert G.rouge_l(generation, answer) == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6), abs=1e-12)
    for a, g in [(answer, generation), ("To be, or not to be", "to be is to do"), ("abc", "xyz"), ("Hello world", "")]:
        want = rouge_scorer.RougeScorer(["rougeL"]).score(a, g)["rougeL"].fmeasure
        assert G.rouge_l(g, a) == want


RECORDS = [
    {"task": "sentiment", "answer": "positive", "generation": "Positive. I liked it."},  # a match, not exact
    {"task": "sentiment", "answer": "negative", "generation": "negative"},  # exact
    {"task": "sentiment", "answer": "negative", "generation": "positive"},  # wrong
    {"task": "story", "answer": "once upon a time there lived a king", "generation": "there lived a king"},
    {"task": "story", "answer": "the end of the tale came soon", "generation": "nothing alike"},
]


def test_generation_metrics_per_task_and_overall():
    short = {"sentiment": True, "story": False}
    m = G.generation_metrics(RECORDS, short)
    rouge = [G.rouge_l(r["generation"], r["answer"]) for r in RECORDS]
    assert set(m) == {"gen/rougeL", "gen/exact_match", "gen/accuracy", "gen/sentiment/rougeL", "gen/sentiment/exact_match",
                      "gen/sentiment/accuracy", "gen/story/rougeL"}
    assert m["gen/sentiment/exact_match"] == pytest.approx(1 / 3)
    assert m["gen/sentiment/accuracy"] == pytest.approx(2 / 3)
    assert m["gen/exact_match"] == pytest.approx(1 / 3) and m["gen/accuracy"] == pytest.approx(2 / 3)  # over the short-label rows
    assert m["gen/rougeL"] == pytest.approx(sum(rouge) / 5)  # over every row
    assert m["gen/story/rougeL"] == pytest.approx((rouge[3] + rouge[4]) / 2)
    assert 0 < rouge[3] < 1 and rouge[4] == 0
    # no task column: overall keys only; free text only: no accuracy at all
    plain = [{k: v for k, v in r.items() if k != "task"} for r in RECORDS[:3]]
    assert G.generation_metrics(plain, {None: True}) == {"gen/rougeL": pytest.approx(sum(rouge[:3]) / 3),
                                                         "gen/exact_match": pytest.approx(1 / 3), "gen/accuracy": pytest.approx(2 / 3)}
    assert set(G.generation_metrics(RECORDS[3:], short)) == {"gen/rougeL", "gen/story/rougeL"}
    assert G.generation_metrics([], short) == {}


def test_short_labels_are_answers_of_three_words_or_fewer_on_average():
    ds = Dataset.from_dict({"task": ["a", "a", "b", "b", "c"],
                            "answer": ["one", "one two three four five", "x y z", "x y z w", "sci.space"]})
    assert G.short_label_tasks(ds) == {"a": True, "b": False, "c": True}  # a: 3.0, b: 3.5, c: 1
    assert G.short_label_tasks(ds.remove_columns("task")) == {None: True}  # no task column: one task, 14 words / 5
    assert G.short_label_tasks(ds.select([1, 3]).remove_columns("task")) == {None: False}  # 9 words / 2


def test_the_rows_generated_are_fixed_and_balanced_over_tasks():
    ds = Dataset.from_dict({"task": ["a"] * 10 + ["b"] * 3 + ["c"] * 5, "answer": ["x"] * 18})
    rows = G.pick_rows(ds, 9, seed=0)
    assert rows == G.pick_rows(ds, 9, seed=0)  # the same every round
    assert rows != G.pick_rows(ds, 9, seed=1)
    tasks = [ds["task"][i] for i in rows]
    assert sorted(tasks) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert tasks[:3] == ["a", "b", "c"]  # in turn: the first few samples cover every task
    more = [ds["task"][i] for i in G.pick_rows(ds, 14, seed=0)]
    assert more.count("b") == 3 and more.count("a") == 6 and more.count("c") == 5  # b runs out, the others go on
    assert sorted(G.pick_rows(ds, 100, seed=0)) == list(range(18))
    assert G.pick_rows(ds, 0, seed=0) == []
    assert len(set(G.pick_rows(ds.remove_columns("task"), 7, seed=0))) == 7


def test_the_summary_line_names_each_tasks_metric():
    m = G.generation_metrics(RECORDS, {"sentiment": True, "story": False})
    line = G.summary_line({"loss": 1.0, **m})
    assert line == (f"generative accuracy {m['gen/accuracy']:.4f} (sentiment {m['gen/sentiment/accuracy']:.3f}); "
                    f"Rouge-L {m['gen/rougeL']:.4f} (story {m['gen/story/rougeL']:.3f})")
    assert G.summary_line({"loss": 1.0, "perplexity": 2.7}) == ""


@pytest.mark.parametrize(
    "override, expected",
    [
        ("eval.max_new_tokens=0", "eval.max_new_tokens: must be at least 1, got 0"),
        ("eval.generate_samples=-1", "eval.generate_samples: must be non-negative (0: no generation), got -1"),
        ("eval.log_samples=-2", "eval.log_samples: must be non-negative (0: none), got -2"),
        ("eval.max_new_token=8", "unknown key 'eval.max_new_token'"),
    ],
)
def test_eval_keys_are_checked_in_one_line(override, expected, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["simulate", override], tmp_path, monkeypatch, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
