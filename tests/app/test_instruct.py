"""Instruction tuning in-process: the response-only loss of ``clients.train.encode`` (checked against
cross-entropy computed by hand, and prompt positions get no gradient), truncation counted in the
train metrics, the cohort engine equal to the per-client engine on instruction rows, the built-in
``data=instruct`` federation as the preset partitions it, and one small federated round of it.

Models: a two-layer random Llama with SmolLM2-Instruct's tokenizer (its chat template), built like
any local checkpoint; SmolLM2-135M itself in the federated round."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from clients.cohort import CohortJob
from clients.train import TrainSettings, encode, train
from fedpeft import data as fdata
from fedpeft import instruct
from fedpeft.config import ConfigError
from fedpeft.models import build, use_adapter
from fedpeft.plan import Payload
from tests.app.test_cohort import check, random_adapter
from tests.harness import dropout_off, federate, save_tiny_llama

MAXLEN = 64
QA = [("What is the capital of France?", "Paris"), ("Who wrote Hamlet?", "William Shakespeare"), ("Is this review positive or negative?\n\nA dull, "
      "joyless film.", "negative"), ("Continue: To be, or not to be,", "that is the question"), ("2 + 2 =", "4"), ("Name a colour.", "blue")]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from fedpeft.models import converted_dir

    if not (converted_dir() / "tokenizer_config.json").exists():
        pytest.skip("SmolLM2's converted checkpoint (its tokenizer) is not cached")
    return instruct.tokenizer("smollm2")


def rows(tok, pairs, system_prompt="Be brief."):
    """Instruction rows (prompt, response, answer, task) of (question, answer) pairs, in SmolLM2's chat template."""
    cols = instruct.format_rows([{"prompt": q, "completion": a} for q, a in pairs], "prompt_completion", tok, tok.chat_template, system_prompt)
    return Dataset.from_dict({**cols, "task": ["qa"] * len(pairs)})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny_instruct_llama"), smol_tokenizer, positions=128)
    spec = SimpleNamespace(name=str(path), task="causal_lm", target_modules=["q_proj", "v_proj"], rank=4, alpha=8.0, dropout=0.0, max_length=MAXLEN)
    lm = dropout_off(build(spec, num_labels=None, device="cpu", seed=0))
    use_adapter(lm, 4, 8.0)
    return lm


def test_labels_cover_the_response_only_and_the_loss_is_its_mean_cross_entropy(tiny_llama, smol_tokenizer):
    lm, tok = tiny_llama, smol_tokenizer
    data = rows(tok, QA[:4])
    batch = encode(lm, data[:])
    for i, r in enumerate(data):  # input = prompt ids + response ids; labels = -100 except on the response; right padding
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        s = tok(r["response"], add_special_tokens=False)["input_ids"]
        n = len(p) + len(s)
        assert batch["input_ids"][i, :n].tolist() == p + s
        assert batch["labels"][i].tolist() == [-100] * len(p) + s + [-100] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert tok.decode(s).endswith("<|im_end|>\n")
    out = lm.model(**batch)
    logits = out.logits.float()
    # by hand: position t predicts token t+1; only response tokens are targets; mean over them
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    by_hand = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert int(keep.sum()) == sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in data["response"])
    all_tokens = F.cross_entropy(logits[:, :-1][batch["attention_mask"][:, 1:] == 1], batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1])
    assert abs(all_tokens.item() - out.loss.item()) > 1e-3  # a loss over every token would be another number


def test_prompt_positions_get_no_gradient(tiny_llama, smol_tokenizer):
    """The loss's gradient with respect to the logits is exactly zero wherever the next token is a
    prompt (or padding) token, and non-zero wherever it is a response token: the model is never
    trained to predict the prompt."""
    lm, tok = tiny_llama, smol_tokenizer
    batch = encode(lm, rows(tok, QA[:3])[:])
    out = lm.model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    g = out.logits.grad[:, :-1].abs().sum(-1)  # position t predicts token t+1
    response = batch["labels"][:, 1:] != -100
    assert torch.all(g[~response] == 0)
    assert torch.all(g[response] > 0)
    assert out.logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing
    lm.model.zero_grad(set_to_none=True)


def test_truncated_and_dropped_examples_are_counted_in_the_train_metrics(tiny_llama, smol_tokenizer):
    lm, tok = tiny_llama, smol_tokenizer
    long_q = "Summarise: " + "the quick brown fox jumps over the lazy dog " * 8  # > MAXLEN tokens of prompt alone
    data = rows(tok, [QA[0], QA[1], (long_q, "a fox"), QA[4]])
    data = Dataset.from_dict({**data[:], "response": [*list(data["response"])[:3], ""]})  # an empty response: nothing to train
    update, metrics = train(lm, Payload(random_adapter(lm, 4, 8.0, 1), {}), data, TrainSettings(local_steps=2, batch_size=4, lr=1e-3), seed=0, client_id=0)
    assert metrics["truncated_fraction"] == 0.25 and metrics["dropped_fraction"] == 0.25
    batch = encode(lm, data[2:3])
    assert batch["input_ids"].shape[1] == MAXLEN  # cut to max_length ...
    assert tok.decode(batch["input_ids"][0, batch["labels"][0] != -100]) == "a fox<|im_end|>\n"  # ... with its response whole
    assert tok.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\na fox<|im_end|>\n")
    _, text_metrics = train(lm, Payload(random_adapter(lm, 4, 8.0, 1), {}), Dataset.from_dict({"text": ["hello world"] * 2}),
                            TrainSettings(local_steps=1, batch_size=2, lr=1e-3), seed=0, client_id=0)
    assert "truncated_fraction" not in text_metrics  # text data: metrics unchanged


def test_cohort_engine_trains_instruction_rows_as_the_per_client_engine(tiny_llama, smol_tokenizer):
    """Heterogeneous ranks, instruction rows of different prompt and response lengths: every
    client's update and metrics (truncation shares included) equal the per-client engine's."""
    lm, tok = tiny_llama, smol_tokenizer
    long_q = "Summarise: " + "the quick brown fox jumps over the lazy dog " * 8
    data = [rows(tok, QA[:4]), rows(tok, [*QA[3:], (long_q, "a fox")])]
    jobs = [CohortJob(Payload(random_adapter(lm, r, a, 60 + k), {}), data[k], seed=80 + k, client_id=k, rank=r, alpha=a)
            for k, (r, a) in enumerate([(4, 8.0), (2, 4.0)])]
    cohort, _ = check(lm, jobs, TrainSettings(local_steps=2, batch_size=3, lr=1e-3))
    assert cohort[1][1]["truncated_fraction"] == pytest.approx(1 / 4) and cohort[0][1]["truncated_fraction"] == 0.0


def test_builtin_instruct_federation_one_task_per_client(tmp_path):
    from fedpeft.composing import compose
    from fedpeft.models import converted_dir
    from fedpeft.preflight import prepare_data

    if not (converted_dir() / "tokenizer_config.json").exists():
        pytest.skip("SmolLM2's converted checkpoint (its tokenizer) is not cached")
    cfg = compose(["+preset=instruct", f"hydra.run.dir={tmp_path / 'run'}"])
    assert (cfg.model.name, cfg.model.quantization, cfg.data.format, cfg.partition.kind, cfg.clients) == ("smollm2", "4bit", "alpaca", "natural", 5)
    assert list(cfg.model.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ds, partitioner, test, _ = prepare_data(cfg)
    tasks = sorted(fdata.INSTRUCT_TASKS)
    parts = [partitioner.load_partition(i) for i in range(cfg.clients)]
    assert sorted(p["task"][0] for p in parts) == tasks and all(len(set(p["task"])) == 1 and len(p) == 200 for p in parts)
    assert Counter(test["task"]) == {t: 40 for t in tasks}
    assert not set(ds["train"]["prompt"]) & set(test["prompt"])  # drawn from the sources' own splits
    answers = Counter(a for a, t in zip(test["answer"], test["task"]) if t != "shakespeare_continue")
    assert answers["Trump"] == answers["Clinton"] == answers["positive"] == answers["negative"] == 20 and answers["crude oil"] == 5
    tok = instruct.tokenizer("smollm2")
    longest = max(len(p) + len(r) for p, r in zip(tok(list(ds["train"]["prompt"]), add_special_tokens=False)["input_ids"],
                                                  tok(list(ds["train"]["response"]), add_special_tokens=False)["input_ids"]))
    assert longest <= cfg.model.max_length  # the preset's window truncates nothing
    with pytest.raises(ConfigError, match=r"^model\.max_length: 32 tokens is shorter than every prompt of data 'instruct'"):
        compose(["+preset=instruct", "model.max_length=32", f"hydra.run.dir={tmp_path / 'run2'}"])


def test_a_federated_round_of_the_instruct_preset(tmp_path, task_identity, one_torch_thread):
    """SmolLM2-135M, the built-in federation, one round of one step per client (float32 base here:
    quantization is another part's), a 48-token window that truncates most examples: the round's
    metrics count them, and the server's evaluation is the held-out response loss."""
    from fedpeft.models import converted_dir

    if not (converted_dir() / "config.json").exists():
        pytest.skip("SmolLM2's converted checkpoint is not cached")
    cfg, summary = federate(tmp_path, "+preset=instruct", "model.quantization=none", "model.target_modules=[q_proj,v_proj]", "model.max_length=48",
                            "rounds=1", "train.local_steps=1", "train.batch_size=2", "data.eval_samples=10")
    assert summary["status"] == "finished"
    row = summary["history"][-1]
    assert row["clients_replied"] == 5 and row["round_applied"] == 1
    assert 0.5 < row["truncated_fraction"] < 1 and row["dropped_fraction"] == 0
    assert 0 < row["loss"] < 20 and row["perplexity"] > 1


def test_a_local_file_through_the_preflight_columns_mapped_one_task_per_client(tmp_path):
    """``fedpeft simulate`` on a user's jsonl: its columns mapped with ``+data.columns.*``, its task
    column the natural key; a missing column is one line naming the file's columns."""
    import json

    from fedpeft.composing import compose
    from fedpeft.data import DataError
    from fedpeft.models import converted_dir
    from fedpeft.preflight import prepare_data

    if not (converted_dir() / "tokenizer_config.json").exists():
        pytest.skip("SmolLM2's converted checkpoint (its tokenizer) is not cached")
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "reply": str(2 * i), "domain": "sums" if i % 2 else "doubles"}) + "\n"
                         for i in range(20)))
    words = ["model=smollm2", f"data.name={f}", "data.format=alpaca", "+data.columns.instruction=question", "data.task_column=domain",
             "partition=natural", "clients=2", "min_clients=1"]
    cfg = compose([*words, "+data.columns.output=reply", f"hydra.run.dir={tmp_path / 'run'}"])
    ds, partitioner, test, num_labels = prepare_data(cfg)
    assert num_labels is None and len(ds["train"]) == 16 and len(test) == 4
    parts = [partitioner.load_partition(i) for i in range(2)]
    assert sorted(p["task"][0] for p in parts) == ["doubles", "sums"] and all(len(set(p["task"])) == 1 for p in parts)
    row = ds["train"][0]
    assert row["prompt"].endswith(f"{row['prompt'].split('user')[-1].split('<|im_end|>')[0]}<|im_end|>\n<|im_start|>assistant\n")
    assert row["response"] == f"{row['answer']}<|im_end|>\n" and row["answer"] == str(2 * int(row["prompt"].split("What is ")[1].split(" ")[0]))
    with pytest.raises(DataError, match=r"needs the column\(s\) 'output', missing from its train split \(columns: question, reply, domain\)"):
        compose([*words, f"hydra.run.dir={tmp_path / 'run2'}"])
