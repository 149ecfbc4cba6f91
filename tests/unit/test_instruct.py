"""Instruction data (fedpeft/instruct.py, fedpeft/data.py): templates, the truncation rule, loading
local alpaca / chat / prompt-completion files, and the one-line refusals. A tiny word-level
tokenizer made here stands in for a model's (no model is loaded)."""

from __future__ import annotations

import json

import pytest

from clients.train import fit
from fedpeft import data as fdata
from fedpeft import instruct
from fedpeft.composing import compose
from fedpeft.config import ConfigError
from fedpeft.data import DataError

CHATML = instruct.TEMPLATES["chatml"]
WORDS = "what is the capital of france paris spain madrid say hi hello translate cat chat".split()


def tiny_tokenizer(path, chat_template=None):
    """A whitespace word-level tokenizer saved at ``path`` (a model directory for ``Spec.tokenizer``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<pad>", "</s>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="[UNK]")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """A tokenizer without a chat template (as a base model's)."""
    return tiny_tokenizer(tmp_path_factory.mktemp("plain_tok"))


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """A tokenizer whose own chat template is ChatML."""
    return tiny_tokenizer(tmp_path_factory.mktemp("chat_tok"), CHATML)


def spec(tok, fmt="alpaca", template=None, columns=(), task_column=None, system_prompt=None):
    return instruct.Spec(fmt, template, tuple(columns), task_column, system_prompt, tok)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris", "domain": "geo"},
    {"instruction": "Translate", "input": "chat", "output": "cat", "domain": "lang"},
    {"instruction": "What is the capital of Spain?", "input": "", "output": "Madrid", "domain": "geo"},
    {"instruction": "Say hi", "input": "", "output": "hello", "domain": "lang"},
    {"instruction": "Translate", "input": "cat", "output": "chat", "domain": "lang"},
]


# ------------------------------------------------------------------ the truncation rule


@pytest.mark.parametrize("p, r, L, kept", [
    (5, 3, 8, (5, 3)),  # fits: unchanged
    (10, 3, 8, (5, 3)),  # the prompt loses its start, the response stays whole
    (10, 10, 8, (4, 4)),  # both long: the prompt keeps half the window, the response the rest
    (3, 10, 8, (3, 5)),  # a short prompt stays whole, the response loses its tail
    (0, 10, 8, (0, 8)),
    (10, 0, 8, (8, 0)),  # nothing to keep of an empty response: dropped
])
def test_fit_keeps_the_prompts_end_and_the_responses_start(p, r, L, kept):
    P, R = list(range(100, 100 + p)), list(range(200, 200 + r))
    fp, fr = fit(P, R, L)
    assert (len(fp), len(fr)) == kept
    assert len(fp) + len(fr) <= L
    assert fp == P[len(P) - len(fp):]  # the prompt's end (its generation prompt) is kept
    assert fr == R[: len(fr)]


# ------------------------------------------------------------------ templates


def test_alpaca_template_is_the_stanford_alpaca_prompt(plain_tok):
    tok = instruct.tokenizer(plain_tok)
    tmpl = instruct.template_of(tok, "alpaca", None)
    assert tmpl == instruct.TEMPLATES["alpaca"]  # no chat template of its own: the format's default
    out = instruct.format_rows([ALPACA_ROWS[0], ALPACA_ROWS[1]], "alpaca", tok, tmpl, None)
    assert out["prompt"][0] == ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                                "### Instruction:\nWhat is the capital of France?\n\n### Response:\n")
    assert out["prompt"][1] == ("Below is an instruction that describes a task, paired with an input that provides further context. "
                                "Write a response that appropriately completes the request.\n\n"
                                "### Instruction:\nTranslate\n\n### Input:\nchat\n\n### Response:\n")
    assert out["response"] == ["Paris</s>", "cat</s>"]
    assert out["answer"] == ["Paris", "cat"]
    with_system = instruct.format_rows([ALPACA_ROWS[0]], "alpaca", tok, tmpl, "Answer briefly.")
    assert with_system["prompt"][0].startswith("Answer briefly.\n\n### Instruction:\n")


def test_the_tokenizers_chat_template_comes_first_and_prompt_plus_response_is_the_full_rendering(chat_tok):
    tok = instruct.tokenizer(chat_tok)
    tmpl = instruct.template_of(tok, "alpaca", None)
    assert tmpl == CHATML
    out = instruct.format_rows([ALPACA_ROWS[1]], "alpaca", tok, tmpl, "Be brief.")
    full = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate\n\nchat"},
                                    {"role": "assistant", "content": "cat"}], tokenize=False)
    assert out["prompt"][0] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTranslate\n\nchat<|im_end|>\n<|im_start|>assistant\n"
    assert out["response"][0] == "cat<|im_end|>\n"
    assert out["prompt"][0] + out["response"][0] == full
    # a named template overrides the tokenizer's
    assert instruct.template_of(tok, "alpaca", "alpaca") == instruct.TEMPLATES["alpaca"]


def test_chat_rows_train_on_the_last_assistant_turn(chat_tok):
    tok = instruct.tokenizer(chat_tok)
    msgs = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what is the capital of spain"}, {"role": "assistant", "content": "madrid"}]
    out = instruct.format_rows([{"messages": msgs}], "chat", tok, CHATML, None)
    assert out["prompt"][0].endswith("<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nwhat is the capital of spain<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    assert out["response"][0] == "madrid<|im_end|>\n" and out["answer"][0] == "madrid"
    with pytest.raises(DataError, match="end with the assistant"):
        instruct.format_rows([{"messages": msgs[:1]}], "chat", tok, CHATML, None)


def test_prompt_completion_plain_template_keeps_the_text_as_it_is(plain_tok):
    tok = instruct.tokenizer(plain_tok)
    tmpl = instruct.template_of(tok, "prompt_completion", None)
    out = instruct.format_rows([{"prompt": "Q: capital of france? A:", "completion": " paris"}], "prompt_completion", tok, tmpl, None)
    assert (out["prompt"][0], out["response"][0], out["answer"][0]) == ("Q: capital of france? A:", " paris</s>", " paris")


def test_chat_without_a_template_and_unknown_templates_are_refused(plain_tok, chat_tok):
    tok = instruct.tokenizer(plain_tok)
    refused = r"^data\.template: data\.format=chat needs a chat template.*has none; set data\.template to one of alpaca, chatml, plain$"
    with pytest.raises(ConfigError, match=refused):
        instruct.template_of(tok, "chat", None, "base")
    with pytest.raises(ConfigError, match=r"^data\.template: the tokenizer .* has no chat template"):
        instruct.template_of(tok, "alpaca", "tokenizer")
    assert instruct.template_of(tok, "chat", "chatml") == CHATML
    with pytest.raises(ConfigError, match=r"data\.template: unknown template 'vicuna'; expected one of tokenizer, alpaca, chatml, plain"):
        instruct.template_of(instruct.tokenizer(chat_tok), "alpaca", "vicuna")


# ------------------------------------------------------------------ loading files


def test_local_alpaca_jsonl_with_a_task_column(tmp_path, plain_tok):
    f = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    ds = fdata.load(str(f), seed=0, instruct=spec(plain_tok, task_column="domain"))
    assert ds["train"].column_names == ["prompt", "response", "answer", "task", "group"]
    assert len(ds["train"]) + len(ds["test"]) == 5 and len(ds["test"]) == 1  # a seeded 20% holdout
    rows = ds["train"].to_list() + ds["test"].to_list()
    by_answer = {r["answer"]: r for r in rows}
    assert by_answer["Paris"]["task"] == by_answer["Paris"]["group"] == "geo"
    assert by_answer["cat"]["prompt"].endswith("### Input:\nchat\n\n### Response:\n")
    assert fdata.task_of(ds) == "causal_lm"
    # the task is the natural partition key: one task per client
    parts = fdata.partition(ds["train"], "natural", 2, seed=0)
    assert sorted({t for i in range(2) for t in set(parts.load_partition(i)["task"])}) == ["geo", "lang"]
    assert all(len(set(parts.load_partition(i)["task"])) == 1 for i in range(2))


def test_local_files_of_each_format_and_their_own_test_split(tmp_path, chat_tok):
    d = tmp_path / "chat"
    d.mkdir()
    msgs = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    write_jsonl(d / "train.jsonl", [msgs("say hi", "hello"), msgs("translate cat", "chat")])
    write_jsonl(d / "test.jsonl", [msgs("capital of spain", "madrid")])
    ds = fdata.load(str(d), instruct=spec(chat_tok, "chat"))
    assert (len(ds["train"]), len(ds["test"])) == (2, 1) and list(ds["test"]["answer"]) == ["madrid"]
    assert list(ds["train"]["task"]) == [str(d)] * 2 and "group" not in ds["train"].column_names  # no task column: the data's name

    import pandas as pd

    pd.DataFrame({"q": ["say hi", "capital of france"], "a": ["hello", "paris"]}).to_parquet(tmp_path / "pc.parquet")
    pc = fdata.load(str(tmp_path / "pc.parquet"), seed=1, instruct=spec(chat_tok, "prompt_completion", columns=[("prompt", "q"), ("completion", "a")]))
    assert sorted([*pc["train"]["answer"], *pc["test"]["answer"]]) == ["hello", "paris"]
    (tmp_path / "pc.csv").write_text("prompt,completion\nsay hi,hello\ncapital of france,paris\n")
    assert len(fdata.load(str(tmp_path / "pc.csv"), instruct=spec(chat_tok, "prompt_completion"))["train"]) == 1


def test_a_dataset_without_the_formats_columns_names_them(tmp_path, plain_tok):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "say hi", "answer": "hello"}] * 3)
    with pytest.raises(DataError, match=r"^dataset '.*qa\.jsonl': data\.format=alpaca needs the column\(s\) 'instruction', 'output', missing from "
                                        r"its train split \(columns: question, answer\); map yours with \+data\.columns\.<field>=<column>$"):
        fdata.load(str(f), instruct=spec(plain_tok))
    ok = fdata.load(str(f), seed=0, instruct=spec(plain_tok, columns=[("instruction", "question"), ("output", "answer")]))
    assert {*ok["train"]["answer"], *ok["test"]["answer"]} == {"hello"}
    with pytest.raises(DataError, match=r"'nope' \(data\.columns\.output\)"):
        fdata.load(str(f), instruct=spec(plain_tok, columns=[("instruction", "question"), ("output", "nope")]))
    with pytest.raises(DataError, match=r"^dataset '.*bad\.jsonl', train split: data\.format=chat: 'messages' must be a list of \{role, content\} objects$"):
        fdata.load(str(write_jsonl(tmp_path / "bad.jsonl", [{"messages": "hi"}])), instruct=spec(plain_tok, "chat", template="chatml"))
    with pytest.raises(DataError, match=r"no task column 'domain'"):
        fdata.load(str(f), instruct=spec(plain_tok, columns=[("instruction", "question"), ("output", "answer")], task_column="domain"))


def test_max_length_shorter_than_every_prompt_is_refused(plain_tok):
    tok = instruct.tokenizer(plain_tok)
    prompts = ["what is the capital of france", "say hi"]  # 6 and 2 tokens
    instruct.check_prompts(prompts, tok, 8, "d")
    instruct.check_prompts(prompts, tok, 3, "d")  # one prompt leaves room
    with pytest.raises(ConfigError, match=r"^model\.max_length: 2 tokens is shorter than every prompt of data 'd' \(the shortest has 2 tokens\)"):
        instruct.check_prompts(prompts, tok, 2, "d")


def test_config_keys_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match=r"^data\.template: unknown value 'vicuna'; expected one of tokenizer, alpaca, chatml, plain$"):
        compose(["model=smollm2", "data.format=alpaca", "data.template=vicuna"])
    with pytest.raises(ConfigError, match=r"^data\.format: unknown value 'sharegpt'"):
        compose(["model=smollm2", "data.format=sharegpt"])
    with pytest.raises(ConfigError, match=r"^data\.template: applies to instruction data only"):
        compose(["data.template=alpaca"])
    with pytest.raises(ConfigError, match=r"^data\.columns\.messages: not a field of data\.format=alpaca"):
        compose(["model=smollm2", "data.format=alpaca", "+data.columns.messages=m"])
    with pytest.raises(ConfigError, match=r"^model\.task: data\.format=chat trains a causal LM"):
        compose(["data.format=chat"])
    with pytest.raises(DataError, match=r"built-in data 'instruct' is instruction data: set data\.format=alpaca"):
        fdata.load("instruct")
