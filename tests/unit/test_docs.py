"""The docs' commands are the ones the project runs: the README's test command is exactly what CI
runs, every page is reachable from the README, every relative link resolves, and every command in
a ``bash`` block of the README, ``docs/*.md`` and ``experiments/**/README.md`` is checked: a
``fedpeft simulate`` / ``deploy`` / ``eval`` line composes and validates (no data or model loaded),
a script exists and takes the flags given, ``flwr`` / ``flower-superlink`` / ``flower-supernode``
lines parse with Flower's own parsers (and a ``--run-config`` names keys the app has), and a
``python -c`` snippet compiles and imports what exists."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("**/README.md"))]
# Programs that are not this project's or Flower's: their lines are shown, not checked here (the
# README's `bash .ci/setup ...` lines are CI's own; lm_eval's command runs through its API in
# tests/app/test_generate.py).
OTHERS = {"bash", "export", "wandb", "lm_eval", "pip", "ray", "ssh-keygen", "cd"}


def test_the_readmes_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):readme.index("## The embedded default")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b and b.strip().startswith("bash .ci/setup"))
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test_command]
    assert "ruff check" in test_command  # the lint runs before the tests


def test_the_front_page_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert 60 <= len(readme.splitlines()) <= 250
    linked = {(ROOT / target).resolve() for target, _ in links(readme)}
    pages = {p.resolve() for p in PAGES[1:] if p.parent == ROOT / "docs" or p == ROOT / "experiments" / "README.md"}
    assert pages - linked == set(), f"not linked from README.md: {sorted(str(p.relative_to(ROOT)) for p in pages - linked)}"
    index = (ROOT / "experiments" / "README.md").read_text()
    reports = {p.resolve() for p in PAGES if p.parent.parent == ROOT / "experiments"}
    linked = {(ROOT / "experiments" / target).resolve() for target, _ in links(index)}
    assert reports - linked == set(), f"not linked from experiments/README.md: {reports - linked}"


def links(text: str) -> list[tuple[str, str]]:
    """(path, anchor) of every relative markdown link (an empty path: the page itself)."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", strip_code(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        out.append((path, anchor))
    return out


def strip_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for path, anchor in links(page.read_text()):
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.relative_to(ROOT)}: link to {path} names no file"
        if anchor:
            assert target.suffix == ".md" and anchor in anchors(target.read_text()), f"{page.relative_to(ROOT)}: no heading #{anchor} in {path or 'this page'}"


def commands(text: str) -> list[str]:
    """The command lines of a page's ``bash`` blocks: continuation lines joined, comments and
    here-documents dropped, ``a && b`` split."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines, heredoc = [], None
        for line in block.replace("\\\n", " ").splitlines():
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if m := re.search(r"<<-?'?(\w+)'?", line):
                heredoc = m.group(1)
            lines.append(line)
        for line in lines:
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return [w for w in out if w]


def page_commands():
    for page in PAGES:
        for words in commands(page.read_text()):
            yield pytest.param(words, id=f"{page.relative_to(ROOT)}: {' '.join(words)[:80]}")


def overrides(words: list[str]) -> list[list[str]]:
    """A command's KEY=VALUE words as runs: a ``--multirun`` sweep's ``a,b,c`` values each once."""
    swept = {i: w.split("=", 1)[1].split(",") for i, w in enumerate(words) if "=" in w and "," in w.split("=", 1)[1] and "[" not in w}
    runs = max((len(v) for v in swept.values()), default=1)
    return [[f"{w.split('=', 1)[0]}={swept[i][k % len(swept[i])]}" if i in swept else w for i, w in enumerate(words)] for k in range(runs)]


def check_fedpeft(args: list[str]) -> None:
    from fedpeft.composing import compose_config

    command, rest = args[0], args[1:]
    if command in ("simulate", "deploy"):
        for flag in ("--config-dir", "-cd", "--config-name", "-cn"):  # a user's own YAML: a placeholder in the docs
            while flag in rest:
                i = rest.index(flag)
                rest = rest[:i] + rest[i + 2:]
        rest = [a for a in rest if a not in ("--multirun", "--help", "--insecure") and not a.startswith("resume=")]
        for run in overrides(rest):
            compose_config(run)
    elif command == "eval":
        assert rest and not rest[0].count("="), "fedpeft eval RUN_DIR [round=K] [KEY=VALUE ...]"
        compose_config([a for a in rest[1:] if not a.startswith("round=")])
    elif command == "compare":
        source = (ROOT / "fedpeft" / "compare.py").read_text()
        for flag in (a for a in rest if a.startswith("--")):
            assert f'"{flag}"' in source, f"fedpeft compare takes no {flag}"
    elif command == "pki":
        source = (ROOT / "fedpeft" / "cli.py").read_text()
        assert len([a for a in rest if not a.startswith("-")]) >= 1, "fedpeft pki DIR --nodes N [--san HOST ...]"
        for flag in (a for a in rest if a.startswith("--")):
            assert f'"{flag}"' in source, f"fedpeft pki takes no {flag}"
    elif command == "fetch-assets":
        from fedpeft.assets import ASSETS

        assert set(rest) <= set(ASSETS)
    else:
        raise AssertionError(f"fedpeft has no command {command!r}")


def check_script(args: list[str]) -> None:
    if args[0] == "-m":
        assert args[1] == "pytest"
        for path in (a for a in args[2:] if not a.startswith("-") and a != "not slow"):
            assert (ROOT / path).exists(), path
        return
    if args[0] == "-c":
        check_python(args[1])
        return
    script = ROOT / args[0]
    assert script.is_file(), f"no script {args[0]}"
    source = script.read_text()
    for flag in (a for a in args[1:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{args[0]} takes no {flag}"
    keys = [a for a in args[1:] if "=" in a and not a.startswith("-")]
    if keys:
        from fedpeft.composing import compose_config

        compose_config(keys)


def check_python(code: str) -> None:
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def check_flwr(args: list[str]) -> None:
    import click
    from flwr.cli.app import typer_click_object
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    ctx = typer_click_object.make_context("flwr", list(args), resilient_parsing=False)
    command = ctx.command
    while isinstance(command, click.Group):  # e.g. `flwr supernode register ...`
        name, command, rest = command.resolve_command(ctx, ctx.protected_args + ctx.args)
        ctx = command.make_context(name, rest, parent=ctx)
    if args[0] == "run":
        app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        run_config = fuse_dicts(flatten_dict(app), parse_config_args(ctx.params["run_config_overrides"] or []))
        from fedpeft.composing import compose_config
        from fedpeft.runconfig import overrides as app_overrides

        compose_config(app_overrides(run_config))
        federation = parse_config_args(ctx.params["federation_config_overrides"] or [])
        simulation_config_from_json({k.replace("-", "_"): v for k, v in federation.items()})


def check_flower(program: str, args: list[str]) -> None:
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as parser
    else:
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as parser
    parser().parse_args(args)


def check_pkill(args: list[str]) -> None:
    """Only the local SuperLink that ``flwr run`` starts: the pattern is the start of the command
    line Flower gives it (``flwr/cli/local_superlink.py``)."""
    import flwr.cli.local_superlink as local

    assert args[:2] == ["-TERM", "-f"] and len(args) == 3, "pkill -TERM -f PATTERN"
    tree = ast.parse(Path(local.__file__).read_text())
    command = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "command"
                   and isinstance(node.value, ast.List))
    words = [e.value for e in command.elts[:3] if isinstance(e, ast.Constant)]
    assert " ".join(words) == args[2], f"flwr starts its local SuperLink as {' '.join(words)!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_and_toml_block_parses(page):
    """A ``python`` block compiles and imports only what exists; a ``toml`` block is TOML."""
    text = page.read_text()
    for code in re.findall(r"```python\n(.*?)```", text, re.S):
        check_python(code)
    for code in re.findall(r"```toml\n(.*?)```", text, re.S):
        tomllib.loads(code)


def test_the_checks_refuse_what_is_wrong():
    from fedpeft.config import ConfigError

    with pytest.raises(ConfigError, match="model.rank"):
        check_fedpeft(["simulate", "peft.rank=4"])  # misspelt key
    with pytest.raises(ConfigError):
        check_fedpeft(["deploy", "strategy=fedavg,nope", "--multirun"])  # the sweep's second value
    with pytest.raises(AssertionError, match="takes no --bogus"):
        check_script(["experiments/privacy/run.py", "--bogus"])
    with pytest.raises(Exception, match="No such option"):
        check_flwr(["run", ".", "local", "--federation", "x", "--bogus"])
    with pytest.raises(ValueError, match="not present"):
        check_flwr(["run", ".", "--run-config", "nope='1'"])  # a key the app's run config lacks
    with pytest.raises(ValueError, match="Unknown simulation config"):
        check_flwr(["run", ".", "--federation-config", "options.num-supernodes=3"])
    with pytest.raises(AssertionError):
        check_pkill(["-TERM", "-f", "flower-superlink --simulation"])
    with pytest.raises(AssertionError, match="has no make_pki2"):
        check_python("from fedpeft.deploy import make_pki2")


@pytest.mark.parametrize("words", page_commands())
def test_every_command_in_the_docs_is_checked(words):
    while re.match(r"[A-Z_]+=", words[0]):  # an environment assignment before the command
        words = words[1:]
    program, args = words[0], words[1:]
    if program in ("fedpeft", ".venv/bin/fedpeft"):
        check_fedpeft(args)
    elif program in (".venv/bin/python", "python"):
        check_script(args)
    elif program == "flwr":
        check_flwr(args)
    elif program in ("flower-superlink", "flower-supernode"):
        check_flower(program, args)
    elif program == "pkill":
        check_pkill(args)
    elif program == ".venv/bin/ruff":
        assert args == ["check"]
    else:
        assert program in OTHERS, f"a command nothing checks: {' '.join(words)} (check it here, or name its program in OTHERS)"
