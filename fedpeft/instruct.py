"""Instruction data: alpaca, chat and prompt/completion rows rendered into ``prompt`` / ``response``.

``data.format`` names the rows' shape, ``data.template`` how they are rendered:

* ``alpaca``: ``instruction``, ``input`` (optional, may be empty), ``output``;
* ``chat``: ``messages``, a list of ``{role, content}``; the last message must be the assistant's
  (the loss covers that one; earlier turns are part of the prompt);
* ``prompt_completion``: ``prompt``, ``completion``.

A column named otherwise is mapped with ``data.columns`` (``{instruction: question, ...}``), a
task column with ``data.task_column``. Every row becomes a conversation (``messages``: an optional
system message, the user's turn, the assistant's answer), rendered with a Jinja chat template
through ``tokenizer.apply_chat_template``: the tokenizer's own (``data.template`` null, when it has
one, or ``tokenizer``) or a named one (:data:`TEMPLATES`). ``prompt`` is the rendering of the
conversation without its answer and with the generation prompt; ``response`` is the rest of the
full conversation's rendering (the answer and the template's end of turn), so ``prompt + response``
is exactly the full rendering. The formatted rows (the interface every consumer reads):

* ``prompt`` (str): tokenized with ``add_special_tokens=False``;
* ``response`` (str): the loss covers its tokens only (:func:`clients.train.encode`);
* ``answer`` (str): the raw reference answer, for generative metrics;
* ``task`` (str): the task column's value, or the dataset's name; with a task column it is also
  the ``group`` (the natural partition key: one task per client group) unless
  ``data.group_column`` names another.

Truncation is ``clients.train.fit``'s: a pair longer than ``model.max_length`` loses the start of
its prompt first (the prompt keeps at least half the window, or all of itself), then the tail of
its response; it never silently loses a whole response, and ``clients.train`` counts the examples
it cuts. :func:`check_prompts` refuses a ``model.max_length`` that leaves no prompt room for a response.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any, Iterable

from fedpeft.config import TEMPLATE_NAMES, ConfigError, DataError

# The fields of each instruction format a dataset must have (all of them: fedpeft.config.FORMAT_FIELDS).
REQUIRED = {"alpaca": ("instruction", "output"), "chat": ("messages",), "prompt_completion": ("prompt", "completion")}

_ALPACA_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_ALPACA_INTRO_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                       "Write a response that appropriately completes the request.")

# Named chat templates (Jinja, as tokenizers carry them; ``eos_token`` is the tokenizer's).
TEMPLATES = {
    # The Stanford Alpaca prompt (github.com/tatsu-lab/stanford_alpaca), as FlowerTune formats its
    # data; a system message replaces the introduction. The response ends with the eos token.
    "alpaca": (
        "{% set ns = namespace(intro=none) %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.intro = m['content'] %}"
        "{% elif m['role'] == 'user' %}"
        "{% if m['input'] %}{{ ns.intro if ns.intro is not none else '" + _ALPACA_INTRO_INPUT + "' }}\n\n"
        "### Instruction:\n{{ m['content'] }}\n\n### Input:\n{{ m['input'] }}\n\n### Response:\n"
        "{% else %}{{ ns.intro if ns.intro is not none else '" + _ALPACA_INTRO + "' }}\n\n"
        "### Instruction:\n{{ m['content'] }}\n\n### Response:\n{% endif %}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endif %}{% endfor %}"
    ),
    # ChatML (<|im_start|>role ... <|im_end|>), without a default system message.
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # The user's text as it is, the answer right after it, then eos: for data that carry their own formatting.
    "plain": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% elif m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    ),
}
assert TEMPLATE_NAMES == ("tokenizer", *TEMPLATES), "fedpeft.config.TEMPLATE_NAMES names the templates here"


@dataclass(frozen=True)
class Spec:
    """How instruction data are read and rendered (hashable: data loads are cached on it)."""

    format: str
    template: str | None  # None: the tokenizer's own, or the format's default when it has none
    columns: tuple[tuple[str, str], ...]  # (field, dataset column) overrides
    task_column: str | None
    system_prompt: str | None
    tokenizer: str  # the model whose tokenizer renders and counts (fedpeft.models.model_path)


def spec(data: Any, model_name: str) -> Spec | None:
    """The :class:`Spec` of a ``data`` config (``DataConfig`` or its DictConfig) for model
    ``model_name``; None for ``data.format=text``."""
    if data.format == "text":
        return None
    if not model_name:
        raise ConfigError(f"data.format: format={data.format} renders rows with the model's tokenizer, but no model.name was given")
    cols = tuple(sorted(dict(data.columns or {}).items()))
    return Spec(data.format, data.template, cols, data.task_column, data.system_prompt, model_name)


@lru_cache(maxsize=4)
def tokenizer(model_name: str):
    """The tokenizer of model ``model_name`` (a built-in, a hub id or a local path), cached."""
    from transformers import AutoTokenizer

    from fedpeft.models import model_path

    tok = AutoTokenizer.from_pretrained(model_path(model_name))
    if tok.pad_token is None:  # as fedpeft.models.build sets it
        tok.pad_token = tok.eos_token
    return tok


def template_of(tok: Any, fmt: str, template: str | None, model_name: str = "") -> str:
    """The Jinja chat template rendering ``fmt`` rows: ``template`` by name, or (None) the
    tokenizer's own, or, when it has none, ``alpaca`` for alpaca rows and ``plain`` for
    prompt/completion rows; chat rows need a real chat template. Raises :class:`ConfigError`."""
    own = getattr(tok, "chat_template", None)
    model = f"model {model_name!r}" if model_name else "the model"
    if template is None:
        if own:
            return own
        if fmt == "chat":
            raise ConfigError(f"data.template: data.format=chat needs a chat template, and the tokenizer of {model} has none; "
                              f"set data.template to one of {', '.join(TEMPLATES)}")
        return TEMPLATES["alpaca" if fmt == "alpaca" else "plain"]
    if template == "tokenizer":
        if not own:
            raise ConfigError(f"data.template: the tokenizer of {model} has no chat template; set data.template to one of {', '.join(TEMPLATES)}")
        return own
    if template not in TEMPLATES:
        raise ConfigError(f"data.template: unknown template {template!r}; expected one of {', '.join(TEMPLATE_NAMES)} (or null)")
    return TEMPLATES[template]


def render(tok: Any, chat_template: str, messages: list[dict[str, Any]]) -> tuple[str, str]:
    """``(prompt, response)`` of a conversation whose last message is the assistant's: the prompt
    is the rendering without it and with the generation prompt, the response the rest of the full
    rendering (``prompt + response`` is the full rendering)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("an instruction conversation must end with the assistant's message (the response the loss covers)")
    prompt = tok.apply_chat_template(messages[:-1], chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the conversation without its answer differently from the start of the full "
                        "conversation, so the response cannot be separated; use data.template=chatml or alpaca")
    return prompt, full[len(prompt):]


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def messages_of(row: dict[str, Any], fmt: str, system_prompt: str | None, *, split_input: bool = False) -> list[dict[str, Any]]:
    """A row of ``fmt`` (its fields already under their format names) as a conversation. An alpaca
    row's input follows its instruction in the user's turn after a blank line, or with
    ``split_input`` (the alpaca template's own ``### Input`` section) is the turn's ``input``."""
    if fmt == "chat":
        msgs = row["messages"]
        if not isinstance(msgs, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError("data.format=chat: 'messages' must be a list of {role, content} objects")
        msgs = [{"role": str(m["role"]), "content": _text(m["content"])} for m in msgs]
    elif fmt == "alpaca":
        instruction, inp = _text(row["instruction"]).strip(), _text(row.get("input")).strip()
        user = {"role": "user", "content": instruction, "input": inp} if split_input else \
            {"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}
        msgs = [user, {"role": "assistant", "content": _text(row["output"]).strip()}]
    else:
        msgs = [{"role": "user", "content": _text(row["prompt"])}, {"role": "assistant", "content": _text(row["completion"])}]
    if system_prompt is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs


def format_rows(rows: list[dict[str, Any]], fmt: str, tok: Any, chat_template: str, system_prompt: str | None) -> dict[str, list[str]]:
    """``prompt``, ``response`` and ``answer`` columns for ``rows`` (format names already)."""
    split_input = chat_template == TEMPLATES["alpaca"]
    out: dict[str, list[str]] = {"prompt": [], "response": [], "answer": []}
    for row in rows:
        msgs = messages_of(row, fmt, system_prompt, split_input=split_input)
        prompt, response = render(tok, chat_template, msgs)
        out["prompt"].append(prompt)
        out["response"].append(response)
        out["answer"].append(msgs[-1]["content"])
    return out


def check_prompts(prompts: Iterable[str], tok: Any, max_length: int, name: str, sample: int = 2000) -> None:
    """``model.max_length`` must leave room for a response after some prompt: refuse one shorter
    than every prompt (of the first ``sample``), naming the shortest."""
    ids = tok(list(islice(prompts, sample)), add_special_tokens=False)["input_ids"]
    shortest = min((len(i) for i in ids), default=0)
    if ids and shortest >= max_length:
        raise ConfigError(f"model.max_length: {max_length} tokens is shorter than every prompt of data {name!r} "
                          f"(the shortest has {shortest} tokens); raise model.max_length above {shortest} (prompt + response)")
