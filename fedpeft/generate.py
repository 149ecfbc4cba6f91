"""Generative evaluation of a causal LM on instruction rows: what the server measures each round.

Instruction rows have the string columns ``prompt`` (the templated prompt, tokenized with
``add_special_tokens=False``), ``response`` (the templated response, ending with the template's
end-of-turn or eos text), ``answer`` (the raw reference answer) and, optionally, ``task``.
:func:`evaluate` reports

- ``loss`` / ``perplexity``: the mean cross-entropy over the *response* tokens of every held-out
  row (prompt and padding tokens are labelled -100, each row cut to ``model.max_length`` as in training:
  :func:`clients.train.encode_instruction`), and per task
  ``loss/<task>`` / ``perplexity/<task>``;
- on ``eval.generate_samples`` held-out rows (a fixed seeded subset, balanced over the tasks:
  :func:`pick_rows`), greedy generations (:func:`generate`: batched with left padding, at most
  ``eval.max_new_tokens`` new tokens, stopping at eos or the template's end-of-turn token) scored
  against ``answer`` (:func:`generation_metrics`): ``gen/rougeL`` (Rouge-L F1, the ``rouge-score``
  package) for every task, and for *short-label* tasks — answers of at most
  :data:`SHORT_ANSWER_WORDS` words on average over the held-out rows — also ``gen/exact_match``
  (normalised generation = normalised answer) and ``gen/accuracy`` (exact match, or the
  normalised generation starts with the normalised answer followed by a word boundary: an
  instruction-tuned model that answers ``Positive. The review praises...`` is right); per task
  ``gen/<task>/rougeL``, ``gen/<task>/exact_match``, ``gen/<task>/accuracy``. Normalisation is
  SQuAD's (:func:`normalize_answer`). The overall ``gen/*`` values are means over the generated
  rows (those of short-label tasks for accuracy and exact match).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import defaultdict
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from clients.train import encode_instruction
from fedpeft.config import ConfigError
from fedpeft.models import LoadedModel

INSTRUCTION_COLUMNS = ("prompt", "response")
SHORT_ANSWER_WORDS = 3  # a task whose answers average at most this many words is scored by accuracy too


def is_instruction(data: Any) -> bool:
    """Whether ``data`` (a ``datasets.Dataset``) holds instruction rows (``prompt`` and ``response``)."""
    return all(c in getattr(data, "column_names", ()) for c in INSTRUCTION_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Tokens


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def response_loss(lm: LoadedModel, data: Any, batch_size: int) -> dict[str, float]:
    """``loss`` (mean cross-entropy per response token over all of ``data``) and ``perplexity``,
    and with a ``task`` column ``loss/<task>`` and ``perplexity/<task>`` (each task's own tokens)."""
    model = lm.model
    model.eval()
    sums: dict[str | None, float] = defaultdict(float)
    counts: dict[str | None, int] = defaultdict(int)
    tasks = "task" in data.column_names
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        batch = encode_instruction(lm, rows)[0]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        L = batch["labels"].shape[1]
        logits = logits[:, -L:]  # a prompt-learning method prepends virtual tokens' positions
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none").view(targets.shape)
        mask = targets != -100
        per_row, n_row = (nll * mask).sum(1).tolist(), mask.sum(1).tolist()
        for i, (s, n) in enumerate(zip(per_row, n_row)):
            sums[None] += s
            counts[None] += n
            if tasks:
                sums[rows["task"][i]] += s
                counts[rows["task"][i]] += n
    mean = sums[None] / max(counts[None], 1)
    out = {"loss": mean, "perplexity": perplexity(mean)}
    for t in sorted(k for k in counts if k is not None):
        m = sums[t] / max(counts[t], 1)
        out[f"loss/{t}"], out[f"perplexity/{t}"] = m, perplexity(m)
    return out


# ---------------------------------------------------------------------------------------------
# Greedy generation


@contextmanager
def padding_side(tokenizer: Any, side: str) -> Iterator[None]:
    """The tokenizer pads on ``side`` inside the block; its own side is restored after."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def stop_token_ids(lm: LoadedModel, responses: Sequence[str] = ()) -> list[int]:
    """The tokens that end a generation: the tokenizer's eos, the model's generation-config eos
    ids, and the template's end-of-turn token as the held-out ``responses`` end with it (the last
    special or added token of each distinct response ending, e.g. ``<|im_end|>``, ``<|eot_id|>``)."""
    tok = lm.tokenizer
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)

    add(tok.eos_token_id)
    add(getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None))
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    for ending in {r[-32:] for r in responses}:
        last = [t for t in tok(ending, add_special_tokens=False)["input_ids"] if t in special]
        if last:
            ids.add(last[-1])
    return sorted(ids)


@torch.no_grad()
def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int, stop_ids: Sequence[int] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (templated, tokenized with ``add_special_tokens=False``;
    a prompt longer than ``lm.max_length`` tokens keeps its last ``max_length``), ``batch_size`` at
    a time, left-padded (the tokenizer pads on the left for this call only; the model takes its
    positions from the attention mask), at most ``max_new_tokens`` new tokens each, stopping at any
    of ``stop_ids`` (default: :func:`stop_token_ids`). Each continuation is cut at its first stop
    token and decoded without special tokens, stripped."""
    from transformers import GenerationConfig

    tok, model = lm.tokenizer, lm.model
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(lm)
    # a fresh config: the checkpoint's own sampling settings (temperature, top_p) do not apply to greedy decoding, and
    # the KV cache is on even where training turned it off in the model's config (gradient checkpointing)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                              use_cache=True)
    model.eval()
    out: list[str] = []
    with padding_side(tok, "left"):
        for start in range(0, len(prompts), batch_size):
            ids = [p[-lm.max_length :] for p in tok(list(prompts[start : start + batch_size]), add_special_tokens=False)["input_ids"]]
            enc = tok.pad({"input_ids": ids}, return_tensors="pt")
            width = enc["input_ids"].shape[1]
            gen = model.generate(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device), generation_config=config)
            for row in gen[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                out.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return out


# ---------------------------------------------------------------------------------------------
# Metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles a / an /
    the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(generation: str, answer: str) -> bool:
    """The normalised generation equals the normalised answer."""
    return normalize_answer(generation) == normalize_answer(answer)


def answer_match(generation: str, answer: str) -> bool:
    """:func:`exact_match`, or the normalised generation starts with the normalised answer followed
    by a word boundary (``positive, the review...`` matches ``Positive``; ``positively`` does not).
    An answer that normalises to nothing matches only a generation that does too."""
    g, a = normalize_answer(generation), normalize_answer(answer)
    return g == a or (bool(a) and g.startswith(a + " "))


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(generation: str, answer: str) -> float:
    """Rouge-L F1 of ``generation`` against ``answer`` (``rouge_score``'s own tokenizer: lowercase
    ASCII words and digits, no stemming)."""
    return float(_rouge().score(answer, generation)["rougeL"].fmeasure)


def short_label_tasks(data: Any) -> dict[str | None, bool]:
    """Per task (``None`` without a task column) whether its answers are short labels: at most
    :data:`SHORT_ANSWER_WORDS` words on average over the rows of ``data``."""
    tasks = data["task"] if "task" in data.column_names else [None] * len(data)
    words: dict[str | None, list[int]] = defaultdict(list)
    for t, a in zip(tasks, data["answer"]):
        words[t].append(len(str(a).split()))
    return {t: sum(w) / len(w) <= SHORT_ANSWER_WORDS for t, w in words.items()}


def generation_metrics(records: Sequence[Mapping[str, Any]], short: Mapping[str | None, bool]) -> dict[str, float]:
    """The ``gen/*`` metrics of generated ``records`` (each with ``task``, ``answer`` and
    ``generation``): ``gen/rougeL`` always, ``gen/exact_match`` and ``gen/accuracy`` over the rows
    of the ``short``-label tasks (when there are any), each per task (``gen/<task>/...``) where a
    record's task is not None, and overall (the mean over rows)."""
    by_task: dict[str | None, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r.get("task")].append(r)

    def scores(rows: Sequence[Mapping[str, Any]], labels: bool) -> dict[str, float]:
        n = len(rows)
        out = {"rougeL": sum(rouge_l(r["generation"], r["answer"]) for r in rows) / n}
        if labels:
            out["exact_match"] = sum(exact_match(r["generation"], r["answer"]) for r in rows) / n
            out["accuracy"] = sum(answer_match(r["generation"], r["answer"]) for r in rows) / n
        return out

    out: dict[str, float] = {}
    if not records:
        return out
    out.update({f"gen/{k}": v for k, v in scores(records, False).items()})
    labelled = [r for r in records if short.get(r.get("task"), False)]
    if labelled:
        out.update({f"gen/{k}": v for k, v in scores(labelled, True).items() if k != "rougeL"})
    for t in sorted(k for k in by_task if k is not None):
        out.update({f"gen/{t}/{k}": v for k, v in scores(by_task[t], short.get(t, False)).items()})
    return out


def pick_rows(data: Any, n: int, seed: int) -> list[int]:
    """``n`` row indices of ``data`` to generate for, the same every round: each task's rows in a
    seeded order, then the tasks taken in turn (sorted by name), so every task gets ``n / tasks``
    rows as far as it has them. All rows (in that order) when ``n >= len(data)``; none when 0."""
    if n <= 0:
        return []
    tasks = data["task"] if "task" in data.column_names else [None] * len(data)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        groups[t].append(i)
    rng = random.Random(seed)
    queues = []
    for t in sorted(groups, key=str):
        idx = groups[t]
        rng.shuffle(idx)
        queues.append(idx)
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def evaluate(lm: LoadedModel, data: Any, settings: Any, batch_size: int, seed: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The server's evaluation of instruction rows ``data``: :func:`response_loss` over all of it,
    and greedy generations for ``settings.generate_samples`` rows (:func:`pick_rows`; ``settings``:
    the config's ``eval`` section) scored by :func:`generation_metrics`. Returns the metrics and
    the first ``settings.log_samples`` generated rows as samples: ``task``, ``prompt``, ``answer``,
    ``generation``, ``correct`` (:func:`answer_match`; None for a free-text task) and ``rougeL``
    (the run's samples table, :data:`fedpeft.tracking.SAMPLE_COLUMNS`)."""
    metrics = response_loss(lm, data, batch_size)
    idx = pick_rows(data, int(settings.generate_samples), seed)
    if not idx:
        return metrics, []
    if "answer" not in data.column_names:
        raise ConfigError(f"eval.generate_samples: the held-out instruction rows have no 'answer' column to score generations against "
                         f"(columns: {', '.join(data.column_names)}); set eval.generate_samples=0")
    rows = data.select(idx)
    stops = stop_token_ids(lm, rows["response"][:16])
    generations = generate(lm, rows["prompt"], int(settings.max_new_tokens), batch_size, stops)
    tasks = rows["task"] if "task" in rows.column_names else [None] * len(rows)
    records = [{"task": t, "prompt": p, "answer": str(a), "generation": g}
               for t, p, a, g in zip(tasks, rows["prompt"], rows["answer"], generations)]
    short = short_label_tasks(data)
    metrics.update(generation_metrics(records, short))
    samples = [{**r, "correct": answer_match(r["generation"], r["answer"]) if short.get(r["task"], False) else None,
                "rougeL": rouge_l(r["generation"], r["answer"])} for r in records[: int(settings.log_samples)]]
    return metrics, samples


def summary_line(row: Mapping[str, Any]) -> str:
    """The generative metrics of a metrics row in words: ``generative accuracy 0.4100 (sentiment
    0.550, topic 0.270); Rouge-L 0.3300 (continue 0.190)`` (per task: accuracy where the task has
    it, Rouge-L for the free-text tasks); empty when the row has none."""
    tasks = sorted(k[len("gen/"):-len("/rougeL")] for k in row if k.startswith("gen/") and k.endswith("/rougeL") and k != "gen/rougeL")
    parts = []
    if "gen/accuracy" in row:
        per = [f"{t} {row[f'gen/{t}/accuracy']:.3f}" for t in tasks if f"gen/{t}/accuracy" in row]
        parts.append(f"generative accuracy {row['gen/accuracy']:.4f}" + (f" ({', '.join(per)})" if per else ""))
    if "gen/rougeL" in row:
        per = [f"{t} {row[f'gen/{t}/rougeL']:.3f}" for t in tasks if f"gen/{t}/accuracy" not in row]
        parts.append(f"Rouge-L {row['gen/rougeL']:.4f}" + (f" ({', '.join(per)})" if per else ""))
    return "; ".join(parts)
