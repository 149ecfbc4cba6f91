"""``fedpeft simulate --help``: the config groups and every key with its default and a one-line
description, read from the comments beside each field of the config dataclasses
(:mod:`fedpeft.config`, and each strategy's own dataclass for ``strategy.*``). Fast: it composes the
default config with Hydra (no Ray, no model, no peft) and imports torch only for the strategies'
registry."""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` for dataclass ``cls`` and its dataclass bases: the comment block
    just above a field (no blank line between) and a comment on the field's own line, joined."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = source.splitlines()
        own = {f.name for f in dataclasses.fields(klass)}
        for i, line in enumerate(lines, 1):
            m = re.match(r"\s+(\w+)\s*:[^=]*(=|$)", line)
            if not m or m.group(1) not in own or line.lstrip().startswith("#"):
                continue
            above: list[str] = []
            j = i - 1
            while j >= 1 and lines[j - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(j, ""))
                j -= 1
            text = " ".join([*above, comments.get(i, "")]).strip()
            if text:
                docs[m.group(1)] = " ".join(text.split())
    return docs


def one_line(text: str, width: int = 110) -> str:
    """The first sentence of ``text``, at most ``width`` characters."""
    first = re.split(r"(?<=[a-z0-9)\]])\. (?=[A-Z(])", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 1].rstrip() + "…"


@lru_cache(maxsize=1)
def key_docs() -> dict[str, str]:
    """``{dotted key: description}`` for every key of the schema."""
    import strategies
    from fedpeft import config as C

    out: dict[str, str] = {}
    hints = typing.get_type_hints(C.Config)
    for name, doc in field_docs(C.Config).items():
        out[name] = doc
    for name, tp in hints.items():
        if dataclasses.is_dataclass(tp):
            for key, doc in field_docs(tp).items():
                out[f"{name}.{key}"] = doc
    out["strategy.name"] = "The aggregation strategy (strategy=<name> also sets its own defaults)"
    readers: dict[str, list[str]] = {}
    for name, cls in sorted(strategies.REGISTRY.items()):
        docs = field_docs(cls)
        for key in cls.config_fields():
            readers.setdefault(key, []).append(name)
            if key in docs:
                out.setdefault(f"strategy.{key}", docs[key])
    for key, names in readers.items():
        if len(names) < len(strategies.REGISTRY) and f"strategy.{key}" in out:
            out[f"strategy.{key}"] = f"[{', '.join(names)}] {one_line(out[f'strategy.{key}'], 90)}"
    return out


def render(cfg: Any, docs: dict[str, str], prefix: str = "", indent: int = 0) -> list[str]:
    """``cfg`` as YAML-like lines, each key with its default and its description as a comment."""
    from omegaconf import DictConfig, OmegaConf

    lines: list[str] = []
    pad = "  " * indent
    for key in cfg:
        value = cfg[key]
        dotted = f"{prefix}{key}"
        doc = docs.get(dotted)
        if isinstance(value, DictConfig) and len(value) and not dotted.endswith((".columns", ".kwargs")):
            lines.append(f"{pad}{key}:")
            lines += render(value, docs, dotted + ".", indent + 1)
            continue
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        text = "null" if shown is None else str(shown).lower() if isinstance(shown, bool) else str(shown)
        lines.append(f"{pad}{key}: {text}" + (f"  # {one_line(doc)}" if doc else ""))
    return lines


def groups() -> list[str]:
    """``group: option, ...`` for every config group: the YAML options under configs/ and the
    generated ``strategy`` and ``peft`` groups."""
    import strategies
    from fedpeft import methods
    from fedpeft.config import CONFIG_DIR

    found = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(CONFIG_DIR).iterdir() if d.is_dir()}
    found["strategy"] = sorted(strategies.REGISTRY)
    found["peft"] = sorted(methods.METHODS)
    return [f"{g}: {', '.join(opts)}" for g, opts in sorted(found.items()) if opts]


def text() -> str:
    """The whole help: the header and footer of configs/config.yaml's ``hydra.help``, the groups,
    and the default config's keys with their descriptions."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedpeft.config import CONFIG_DIR, register

    hydra_help = yaml.safe_load((Path(CONFIG_DIR) / "config.yaml").read_text(encoding="utf-8"))["hydra"]["help"]
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config")
    finally:
        GlobalHydra.instance().clear()
    return "\n".join([
        hydra_help["header"].rstrip(), "", "== Config groups (GROUP=OPTION) ==", *groups(), "",
        "== Keys, their defaults and what they mean ==", *render(cfg, key_docs()), "", hydra_help["footer"].rstrip(), "",
    ])
