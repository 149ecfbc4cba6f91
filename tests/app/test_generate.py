"""Generative evaluation with a real causal LM (SmolLM2-135M-Instruct, a LoRA adapter with random B):
left-padded batched greedy generation equals each prompt's own, the loss covers response tokens
only, the server's per-round evaluation of instruction rows and its samples, ``fedpeft eval`` on a
saved adapter (reproducing a FLoRA run's rounds), and lm-evaluation-harness on a saved adapter.

Instruction rows are made here by hand with SmolLM2's chat template (the columns fedpeft's
instruction data has: ``prompt``, ``response``, ``answer``, ``task``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from clients.train import encode_instruction
from fedpeft import generate as G
from fedpeft.config import EvalConfig, ModelConfig
from tests.harness import random_B, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [  # (task, question, answer): two short-label tasks and a free-text one, prompts of different lengths
    ("sentiment", "Is this review positive or negative? 'A warm, funny and beautifully acted film that I will watch again.'", "positive"),
    ("sentiment", "Positive or negative: 'Dull.'", "negative"),
    ("capital", "What is the capital of France?", "Paris"),
    ("capital", "Name the capital city of Japan, in one word.", "Tokyo"),
    ("story", "Continue the line: 'To be, or not to be,'", "that is the question"),
    ("story", "Write one sentence about the sea.", "The sea was calm and grey under a low winter sky."),
]


def instruction_rows(tokenizer) -> Dataset:
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}],
                                             tokenize=False, add_generation_prompt=True) for _, q, _ in QUESTIONS]
    return Dataset.from_dict({"prompt": prompts, "response": [a + "<|im_end|>\n" for *_, a in QUESTIONS],
                              "answer": [a for *_, a in QUESTIONS], "task": [t for t, *_ in QUESTIONS]})


@pytest.fixture(scope="module")
def lm():
    """SmolLM2 with a rank-4 LoRA on q_proj / v_proj whose B is random (an adapter that changes the model)."""
    from fedpeft.models import build, read_adapter, write_adapter

    model_cfg = OmegaConf.structured(ModelConfig(name="smollm2", task="causal_lm", target_modules=["q_proj", "v_proj"], rank=4, alpha=8, max_length=96))
    lm = build(model_cfg, num_labels=None, device="cpu", seed=0)
    g = read_adapter(lm)
    write_adapter(lm, random_B(g.adapter, seed=1, scale=0.05), g.head)
    return lm


@pytest.fixture(scope="module")
def rows(lm):
    return instruction_rows(lm.tokenizer)


# ------------------------------------------------------------------ generation and the loss


def test_left_padded_batches_generate_what_each_prompt_generates_alone(lm, rows, monkeypatch):
    prompts = rows["prompt"]
    lengths = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 3  # the batch really pads
    alone = [G.generate(lm, [p], 8, 1)[0] for p in prompts]
    batched = G.generate(lm, prompts, 8, 6)
    assert batched == alone
    assert all(a.strip() and "<|im_end|>" not in a for a in alone)
    assert lm.tokenizer.padding_side == "right"  # restored after generating

    @contextmanager
    def keep_side(tokenizer, side):  # what generate would do without left padding
        yield

    monkeypatch.setattr(G, "padding_side", keep_side)
    assert G.generate(lm, prompts, 8, 6) != alone  # right padding changes the continuations: the check above bites


def test_generation_stops_at_the_end_of_turn(lm, rows):
    assert G.stop_token_ids(lm, rows["response"]) == [lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = lm.tokenizer(rows["prompt"][2], add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             eos_token_id=[], pad_token_id=lm.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in full[:-1]  # the answer ends its turn within 16 tokens, and goes on past it when nothing stops it
    want = lm.tokenizer.decode(full[: full.index(end)], skip_special_tokens=True).strip()
    assert G.generate(lm, [rows["prompt"][2]], 16, 1) == [want] and want


def test_the_loss_covers_the_response_tokens_only(lm, rows):
    batch = encode_instruction(lm, rows[:])[0]
    tok = lm.tokenizer
    for i in range(len(rows)):
        p = tok(rows["prompt"][i], add_special_tokens=False)["input_ids"]
        r = tok(rows["response"][i], add_special_tokens=False)["input_ids"]
        n = len(p) + len(r)
        assert batch["input_ids"][i, :n].tolist() == p + r
        assert batch["labels"][i, :n].tolist() == [-100] * len(p) + r
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()
    # the mean cross-entropy per response token, each row alone and unpadded, per task and overall
    sums, counts = {}, {}
    with torch.no_grad():
        for i, task in enumerate(rows["task"]):
            one = encode_instruction(lm, rows[i : i + 1])[0]
            logits = lm.model(input_ids=one["input_ids"]).logits[0, :-1]
            target = one["labels"][0, 1:]
            keep = target != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            for key in (task, None):
                sums[key] = sums.get(key, 0.0) + nll
                counts[key] = counts.get(key, 0) + int(keep.sum())
    m = G.response_loss(lm, rows, batch_size=4)
    assert m["loss"] == pytest.approx(sums[None] / counts[None], rel=1e-5)
    assert m["perplexity"] == pytest.approx(torch.tensor(sums[None] / counts[None]).exp().item(), rel=1e-5)
    for task in ("sentiment", "capital", "story"):
        assert m[f"loss/{task}"] == pytest.approx(sums[task] / counts[task], rel=1e-5)
    # cut to max_length as in training (clients.train.fit): the prompt loses its start, the response keeps its first tokens
    short = dataclasses.replace(lm, max_length=10)
    cut = encode_instruction(short, rows[:2])[0]
    kept = (cut["labels"] != -100).sum(1).tolist()
    whole = [len(lm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rows["response"][:2]]
    assert cut["input_ids"].shape[1] <= 10 and kept == [min(w, 10 - 10 // 2) for w in whole] and min(kept) > 0


def test_evaluate_scores_generations_per_task_and_keeps_samples(lm, rows):
    settings = EvalConfig(max_new_tokens=10, generate_samples=4, log_samples=2)
    metrics, samples = G.evaluate(lm, rows, settings, batch_size=4, seed=0)
    picked = rows.select(G.pick_rows(rows, 4, 0))
    gens = G.generate(lm, picked["prompt"], 10, 4)
    records = [{"task": t, "answer": a, "generation": g} for t, a, g in zip(picked["task"], picked["answer"], gens)]
    assert {k: v for k, v in metrics.items() if k.startswith("gen/")} == G.generation_metrics(records, {"sentiment": True, "capital": True, "story": False})
    assert {k for k in metrics if not k.startswith("gen/")} == {"loss", "perplexity"} | {f"{m}/{t}" for m in ("loss", "perplexity")
                                                                                          for t in ("sentiment", "capital", "story")}
    assert {"gen/sentiment/accuracy", "gen/capital/accuracy", "gen/story/rougeL"} <= set(metrics)
    assert "gen/story/accuracy" not in metrics
    assert [s["generation"] for s in samples] == gens[:2]
    assert [s["task"] for s in samples] == picked["task"][:2]
    assert all(set(s) == {"task", "prompt", "answer", "generation", "correct", "rougeL"} for s in samples)
    assert samples[0]["correct"] is G.answer_match(gens[0], picked["answer"][0])


# ------------------------------------------------------------------ the server's evaluation, samples, fedpeft eval


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory, rows):
    """A server (fedpeft.serverapp.Federation) on SmolLM2 whose held-out set is ``rows``, with a
    global adapter of random B, evaluating and recording round 0 into its run dir."""
    from fedpeft.composing import compose
    from fedpeft.runconfig import RunSpec
    from fedpeft.serverapp import Federation

    run_dir = tmp_path_factory.mktemp("instruct") / "run"
    cfg = compose(["model=smollm2", "model.rank=4", "model.alpha=8", "model.max_length=96", "model.eval_batch_size=4", "tracking.mode=disabled",
                   "engine.device=cpu", "clients=2", "data.eval_samples=8", "eval.max_new_tokens=10", "eval.generate_samples=4", "eval.log_samples=3"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fed = Federation(cfg, RunSpec(run_dir))
        fed.test = rows
        fed.adapter.model = dataclasses.replace(fed.adapter.model, adapter=random_B(fed.adapter.model.adapter, seed=2, scale=0.05))
        row = fed.evaluate(0, fed.adapter.arrays())
        fed.record(0, row)
    finally:
        torch.set_num_threads(before)
    return fed, row, run_dir


def test_the_server_evaluates_instruction_rows_and_logs_samples(instruct_run, rows):
    fed, row, run_dir = instruct_run  # its values: fedpeft eval recomputes them below
    assert {"loss", "perplexity", "loss/story", "gen/rougeL", "gen/accuracy", "gen/capital/exact_match", "gen/story/rougeL"} <= set(row)
    assert {"accuracy", "gen/story/accuracy"}.isdisjoint(row)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == {"round": 0, "elapsed_s": logged[0]["elapsed_s"], **row}
    written = [json.loads(line) for line in (run_dir / "samples" / "round_000.jsonl").read_text().splitlines()]
    picked = rows.select(G.pick_rows(rows, 3, fed.cfg.seed))
    assert [(w["round"], w["task"], w["prompt"], w["answer"]) for w in written] == list(zip([0] * 3, picked["task"], picked["prompt"], picked["answer"]))
    for w in written:
        assert w["rougeL"] == G.rouge_l(w["generation"], w["answer"])
        assert w["correct"] == (G.answer_match(w["generation"], w["answer"]) if w["task"] != "story" else None)
    assert not list((run_dir / "samples").glob("*.tmp")) and fed.samples == {}
    assert (run_dir / "adapters" / "round_000" / "adapter_model.safetensors").is_file()


def test_fedpeft_eval_re_evaluates_an_instruction_runs_adapter(instruct_run, rows, monkeypatch, capsys, tmp_path):
    from fedpeft import preflight

    fed, row, run_dir = instruct_run
    monkeypatch.setattr(preflight, "prepare_data", lambda cfg: (None, None, rows, None))  # this run's held-out rows
    code, out, err = run_cli(["eval", str(run_dir)], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"[fedpeft] eval: {run_dir}, the adapter of round 0 on {len(rows)} held-out examples"
    table = {l.split()[0]: l.split()[1:] for l in lines[3:] if l and not l.startswith("  ")}
    for key in ("loss", "perplexity", "gen/accuracy", "gen/rougeL", "gen/story/rougeL"):
        assert table[key] == [f"{row[key]:.4f}"] * 2  # re-evaluated, and as the run logged it
    assert sum(l.startswith("  [") for l in lines) == 3  # the samples
    # eval.* may change: no generation at all
    code, out, _ = run_cli(["eval", str(run_dir), "round=0", "eval.generate_samples=0"], tmp_path, monkeypatch, capsys)
    table = {l.split()[0]: l.split()[1:] for l in out.splitlines()[3:]}
    assert code == 0 and table["perplexity"] == [f"{row['perplexity']:.4f}"] * 2, out
    assert not any(k.startswith("gen/") for k in table), out


# ------------------------------------------------------------------ fedpeft eval on a FLoRA run


@pytest.fixture(scope="module")
def flora_run(tmp_path_factory):
    """A small FLoRA run (MiniLM, heterogeneous ranks, 2 rounds: round 2's base holds round 1's
    merge), in-process through the real server and ClientApp."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.harness import federate

    mp = pytest.MonkeyPatch()
    for attr in ("_task_id", "_run_id", "_node_id"):
        mp.setattr(TaskIdentity, attr, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("flora")
    try:
        cfg, summary = federate(tmp, "strategy=flora", "ranks=flora", "ranks.levels=[4,2]", "clients=2", "rounds=2", "train.local_steps=2",
                                "train.batch_size=8", "model.max_length=32", "data.eval_samples=64")
    finally:
        torch.set_num_threads(before)
        mp.undo()
    assert summary["status"] == "finished"
    return tmp / "run", summary


def test_fedpeft_eval_reproduces_each_round_of_a_flora_run(flora_run, tmp_path, monkeypatch, capsys):
    run_dir, summary = flora_run
    assert summary["history"][2]["bytes_down"] > summary["history"][1]["bytes_down"]  # round 2 sent round 1's merge
    for words, r in ((["round=1"], 1), ([], 2)):  # default: the last saved round
        code, out, err = run_cli(["eval", str(run_dir), *words], tmp_path, monkeypatch, capsys)
        assert code == 0, err
        assert f"the adapter of round {r} on 64 held-out examples" in out
        table = {l.split()[0]: [float(x) for x in l.split()[1:]] for l in out.splitlines()[3:] if l.strip()}
        logged = summary["history"][r]
        assert set(table) == {"accuracy", "loss"}
        assert table["accuracy"] == [round(logged["accuracy"], 4)] * 2
        assert table["loss"] == [round(logged["loss"], 4)] * 2
    from fedpeft.evaluation import evaluate_run

    ev = evaluate_run(run_dir, 2)
    assert ev.metrics["accuracy"] == summary["history"][2]["accuracy"]
    assert ev.metrics["loss"] == pytest.approx(summary["history"][2]["loss"], rel=1e-6)  # the merged base: W_0 + the saved adapter


def test_fedpeft_eval_survives_a_damaged_metrics_file(flora_run, tmp_path, monkeypatch, capsys, caplog):
    """The run's metrics.jsonl is only shown beside the re-evaluation: a half-written last row (a
    kill mid-write) is left out, and a line damaged elsewhere costs the logged column, with a warning
    naming the line, never the re-evaluation."""
    run_dir, summary = flora_run
    logged = round(summary["history"][1]["accuracy"], 4)
    torn, broken = tmp_path / "torn", tmp_path / "broken"
    for d in (torn, broken):
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("state"))
    with (torn / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "accur')
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(["{oops"] + lines[1:]) + "\n")
    for d, shown in ((torn, logged), (broken, None)):
        caplog.clear()
        code, out, err = run_cli(["eval", str(d), "round=1"], tmp_path, monkeypatch, capsys)
        assert code == 0, err
        row = next(l.split() for l in out.splitlines() if l.startswith("accuracy"))
        assert float(row[1]) == logged  # re-evaluated, in both cases
        assert row[2] == (f"{shown:.4f}" if shown is not None else "—")
        if shown is None:
            assert any(f"{d / 'metrics.jsonl'} line 1 is not a metrics row" in r.getMessage() for r in caplog.records)


def test_fedpeft_eval_bad_input_is_one_line(flora_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = flora_run
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("state"))
    (damaged / "adapters" / "round_001" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "nowhere")], f"eval: {tmp_path / 'nowhere'} does not exist"),
        ([str(tmp_path / "empty")], "is not a fedpeft run directory (no config.yaml)"),
        ([str(run_dir), "round=7"], f"round: round 7 of {run_dir} was not saved (no adapters/round_007); saved rounds: 0-2"),
        ([str(run_dir), "round=last"], "round: expected a round number, got 'last'"),
        ([str(run_dir), "model.rank=2"], "eval: 'model.rank=2': only round=K, eval.*"),
        ([str(run_dir), "eval.max_new_tokens=0"], "eval.max_new_tokens: must be at least 1, got 0"),
        ([str(damaged), "round=1"], f"eval: the adapter in {damaged / 'adapters' / 'round_001'} could not be loaded (SafetensorError"),
    ]
    for args, expected in cases:
        code, out, err = run_cli(["eval", *args], tmp_path, monkeypatch, capsys)
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
        assert lines[0].startswith("fedpeft: error: ")


# ------------------------------------------------------------------ lm-evaluation-harness on a saved adapter

TASK_YAML = """task: fedpeft_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TINY = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green"], "label": 0},
    {"question": "How many legs does a dog have?", "choices": ["three", "four"], "label": 1},
    {"question": "What is the opposite of hot?", "choices": ["cold", "loud"], "label": 0},
    {"question": "Which animal says meow?", "choices": ["cow", "cat"], "label": 1},
]


def test_lm_eval_runs_on_a_saved_adapter(lm, tmp_path):
    """docs/llm.md's command, ``lm_eval --model hf --model_args pretrained=<base>,peft=<adapter>
    --tasks fedpeft_tiny --include_path <dir>``, through lm-eval's own ``simple_evaluate`` with the
    same arguments (the CLI spends ~40 s here indexing lm-eval's thousands of built-in tasks before
    it starts; the API can skip them). Its log-likelihoods are the adapted model's, computed here."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from fedpeft.models import model_path, save_adapter

    adapter = tmp_path / "adapters" / "round_001"
    save_adapter(lm, adapter)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TINY))
    (tasks / "tiny.yaml").write_text(TASK_YAML.format(data=tasks / "tiny.jsonl"))
    out = simple_evaluate(model="hf", model_args=f"pretrained={model_path('smollm2')},peft={adapter}", tasks=["fedpeft_tiny"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), device="cpu", batch_size=4, log_samples=True)
    acc = out["results"]["fedpeft_tiny"]["acc,none"]
    tok = lm.tokenizer

    def loglik(context: str, continuation: str) -> float:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
        return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))

    theirs, ours, base, right = [], [], [], []
    for s, d in zip(sorted(out["samples"]["fedpeft_tiny"], key=lambda s: s["doc_id"]), TINY):
        context = f"Question: {d['question']}\nAnswer:"
        theirs += [r[0][0] for r in s["resps"]]
        mine = [loglik(context, " " + c) for c in d["choices"]]
        ours += mine
        right.append(int(mine.index(max(mine)) == d["label"]))
        with lm.model.disable_adapter():
            base += [loglik(context, " " + c) for c in d["choices"]]
    assert theirs == pytest.approx(ours, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(theirs, base)) > 2e-2  # the adapter changes them: lm-eval applied it
    assert 0 <= acc <= 1 and acc == sum(right) / len(right)


# ------------------------------------------------------------------ the samples in the run dir and in W&B


def test_samples_go_to_the_run_dir_and_to_a_wandb_table(tmp_path):
    from fedpeft.tracking import SAMPLE_COLUMNS, Tracker
    from tests.harness import offline_runs

    samples = [{"task": "sentiment", "prompt": "<|im_start|>user\nGood?<|im_end|>\n", "answer": "positive", "generation": "Positive!",
                "correct": True, "rougeL": 1.0},
               {"task": "story", "prompt": "p", "answer": "a long tale", "generation": "a tale", "correct": None, "rougeL": 0.8}]
    t = Tracker(tmp_path / "run", {"seed": 0}, mode="offline", project="fedpeft-test", group="g", tags=[], job_type="fedavg")
    t.log_round(0, {"loss": 2.0})
    t.log_round(1, {"loss": 1.5, "gen/accuracy": 0.5}, samples=samples)
    t.finish({"status": "finished"})
    run_dir = tmp_path / "run"
    assert not (run_dir / "samples" / "round_000.jsonl").exists()
    assert [json.loads(l) for l in (run_dir / "samples" / "round_001.jsonl").read_text().splitlines()] == [{"round": 1, **s} for s in samples]
    (run,) = offline_runs(run_dir)
    assert not any(k.startswith("samples") for k in run.history[0])
    ref = {k[len("samples/"):]: v for k, v in run.history[1].items() if k.startswith("samples/")}  # the table's reference, flattened
    assert ref["_type"] == "table-file" and ref["nrows"] == 2 and run.history[1]["loss"] == 1.5
    table = json.loads((run.path / "files" / ref["path"]).read_text())
    assert table["columns"] == list(SAMPLE_COLUMNS)
    assert table["data"] == [[1, *[s[c] for c in SAMPLE_COLUMNS[1:]]] for s in samples]


def test_a_resumed_run_drops_the_samples_of_rounds_after_its_state(tmp_path):
    from types import SimpleNamespace

    from fedpeft.serverapp import Federation

    run_dir = tmp_path / "run"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "loss": 1.0}) + "\n" for r in range(4)))
    for name in ("round_000.jsonl", "round_001.jsonl", "round_002.jsonl", "round_003.jsonl", "round_003.tmp"):
        (run_dir / "samples" / name).write_text("{}\n")
    fed = SimpleNamespace(run_dir=run_dir)
    Federation.trim_to(fed, 1)  # the state says round 1 was the last complete one
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["round_000.jsonl", "round_001.jsonl"]
    assert [r["round"] for r in fed.history] == [0, 1]
