"""What a run leaves after a fault, and what resume makes of it (issue 24, §2 and §3).

Damaged state: a truncated ``state/server.pt`` or one without its keys is one line (exit 2) that
offers the previous round's state, which every round keeps beside it; a half-written last row of
``metrics.jsonl`` is dropped with a warning, any other bad row refused in one line before Ray starts.

Full disk and non-ASCII path (a read-only folder and a whole run on a full disk:
tests/e2e/test_durable_runs.py): the disk-full tests run a short Python script in a private mount
namespace (``unshare --mount``) on a small tmpfs filled to the last byte, so the ``ENOSPC`` is the
kernel's own (:func:`tests.harness.in_tmpfs`); they are skipped where this process may not mount.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.harness import in_tmpfs

# ------------------------------------------------------------------ §3: a full disk, a read-only directory, a non-ASCII path


def test_a_full_disk_leaves_the_previous_summary_and_no_half_metrics_row(tmp_path, can_mount):
    """Tracker.finish on a full disk: summary.json keeps its previous content (it was left 0 bytes or
    half-written); log_round: a row that does not fit is cut off, so metrics.jsonl ends with the last
    complete row; the error names the file and says No space left on device."""
    out = in_tmpfs(tmp_path, """
        from fedpeft.tracking import Tracker
        t = Tracker(MNT / "run", {}, mode="disabled", project="p", group="g", tags=[])
        t.log_round(0, {"accuracy": 0.5})
        t.finish({"status": "running", "rounds": 1})
        before = (MNT / "run" / "summary.json").read_bytes()
        fill()
        errors = []
        try:
            t.log_round(1, {"accuracy": 0.6, "note": "x" * 20000})  # more than any partly filled page holds
        except OSError as e:
            errors.append([e.errno, e.filename])
        try:
            t.finish({"status": "finished", "rounds": 1, "history": ["y" * 20000]})
        except OSError as e:
            errors.append([e.errno, e.filename])
        print(json.dumps({"before": before.decode(), "after": (MNT / "run" / "summary.json").read_text(),
                          "metrics": (MNT / "run" / "metrics.jsonl").read_text(), "errors": errors,
                          "left": sorted(p.name for p in (MNT / "run").iterdir())}))
    """)
    assert json.loads(out["after"]) == {"status": "running", "rounds": 1} and out["after"] == out["before"]
    lines = out["metrics"].split("\n")
    assert lines[-1] == "" and [json.loads(l)["round"] for l in lines[:-1]] == [0]
    import errno

    run = str(tmp_path / "mnt" / "run")
    assert out["errors"] == [[errno.ENOSPC, f"{run}/metrics.jsonl"], [errno.ENOSPC, f"{run}/summary.json"]]
    assert out["left"] == ["metrics.jsonl", "summary.json"]  # no temporary file left behind


def test_the_server_state_on_a_full_disk_stays_the_last_complete_one(tmp_path, can_mount):
    """torch.save on a full disk says only 'unexpected pos …': the state goes through the same atomic
    write, keeps the previous one, and names the file; an adapter checkpoint's safetensors error
    ("os error 28") is read back as ENOSPC naming the checkpoint."""
    out = in_tmpfs(tmp_path, """
        import torch
        from fedpeft import durable
        path = MNT / "state" / "server.pt"
        durable.save_torch({"round": 1, "config": {}, "adapter": {"w": torch.ones(8)}}, path, keep_previous=True)
        fill()
        try:
            durable.save_torch({"round": 2, "config": {}, "adapter": {"w": torch.zeros(20000)}}, path, keep_previous=True)
            error = None
        except OSError as e:
            error = [e.errno, e.filename]
        from safetensors.torch import save_file
        try:
            save_file({"w": torch.zeros(20000)}, str(MNT / "a.safetensors"))
        except Exception as e:
            st = durable.os_error(e, MNT / "adapters" / "round_002")
        print(json.dumps({"error": error, "round": torch.load(path, weights_only=False)["round"],
                          "files": sorted(p.name for p in path.parent.iterdir()), "st": [st.errno, st.filename]}))
    """)
    import errno

    assert out["error"] == [errno.ENOSPC, str(tmp_path / "mnt" / "state" / "server.pt")]
    assert out["round"] == 1 and out["files"] == ["server.pt"]
    assert out["st"] == [errno.ENOSPC, str(tmp_path / "mnt" / "adapters" / "round_002")]


def test_a_write_failure_is_one_line_naming_the_file_the_last_round_and_the_resume():
    import errno

    from fedpeft.serverapp import write_failure

    e = OSError(errno.ENOSPC, "No space left on device", "/runs/a/state/server.pt")
    assert write_failure(e, Path("/runs/a"), 3) == (
        "cannot write /runs/a/state/server.pt: No space left on device; the last complete round is 3; free space and continue with resume=/runs/a")
    assert write_failure(e, Path("/runs/a"), None) == (
        "cannot write /runs/a/state/server.pt: No space left on device; no round is complete yet; free space and start the run again")
    ro = OSError(errno.EROFS, "Read-only file system", "/runs/a/summary.json")
    assert write_failure(ro, Path("/runs/a"), 0).endswith("the last complete round is 0; make it writable and continue with resume=/runs/a")


def test_a_non_ascii_run_dir_is_accepted_as_given(tmp_path):
    """Hydra's lexer refuses ``ü`` in an unquoted value; fedpeft quotes such a value for it."""
    from fedpeft.composing import compose_run, quote_values

    words = [f"hydra.run.dir={tmp_path}/dir ü", "clients=4", "model.target_modules=[query,value]", "tracking.tags=[a,b]"]
    quoted = quote_values(words)
    assert quoted == [f"hydra.run.dir='{tmp_path}/dir ü'", *words[1:]]
    cfg, run_dir = compose_run(quoted)
    assert run_dir == tmp_path / "dir ü" and cfg.clients == 4 and list(cfg.model.target_modules) == ["query", "value"]
    assert quote_values(["tracking.tags=[ü]"]) == ["tracking.tags=[ü]"]  # not a plain value: left to Hydra's error


def test_fedpeft_simulate_takes_a_non_ascii_run_dir(tmp_path, monkeypatch):
    from fedpeft import cli, simulation

    seen = []
    monkeypatch.setattr(simulation, "run", lambda cfg, run_dir, **kw: seen.append(Path(run_dir)) or {})
    assert cli.main(["simulate", f"hydra.run.dir={tmp_path}/dir ü", "rounds=1"]) == 0
    assert seen == [tmp_path / "dir ü"]


# ------------------------------------------------------------------ §2: damaged state on resume


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as a run leaves it after round 2: config.yaml, metrics rows 0-2, the state of
    round 2 (state/server.pt) and of round 1 before it (state/server.prev.pt)."""
    from fedpeft.composing import compose

    cfg = compose(["clients=4", "rounds=4"])
    d = tmp_path / "run"
    (d / "state").mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "accuracy": 0.5 + r / 10}) + "\n" for r in range(3)))
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"round": 1, "config": config, "adapter": {"w": torch.ones(3)}}, d / "state" / "server.prev.pt")
    torch.save({"round": 2, "config": config, "adapter": {"w": torch.ones(3) * 2}}, d / "state" / "server.pt")
    return d


def resume(run_dir, capsys, monkeypatch):
    """``fedpeft simulate resume=run_dir``: (exit code, stderr lines); simulation.run (Ray) must not start."""
    from fedpeft import cli, simulation

    started = []
    monkeypatch.setattr(simulation, "run", lambda *a, **kw: started.append(a))
    code = cli.main(["simulate", f"resume={run_dir}"])
    assert not started or code == 0
    return code, [l for l in capsys.readouterr().err.splitlines() if l.strip()], started


def test_a_truncated_state_is_one_line_offering_the_previous_rounds(run_dir, capsys, monkeypatch):
    state = run_dir / "state" / "server.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    code, err, started = resume(run_dir, capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and not started, err
    assert err[0].startswith(f"fedpeft: error: resume: {state} is damaged (a truncated or corrupted file: PytorchStreamReader failed"), err[0]
    prev = run_dir / "state" / "server.prev.pt"
    assert err[0].endswith(f"the state of round 1 before it is sound: to resume from round 1, run: mv '{prev}' '{state}', "
                           f"then resume={run_dir} again"), err[0]
    shutil.move(prev, state)  # what the line says to do: resume then starts, from round 1
    code, err, started = resume(run_dir, capsys, monkeypatch)
    assert code == 0 and len(started) == 1
    from fedpeft.serverapp import load_state

    assert load_state(run_dir, started[0][0])["round"] == 1


def test_a_state_without_its_keys_is_one_line(run_dir, capsys, monkeypatch):
    torch.save({"round": 2}, run_dir / "state" / "server.pt")
    (run_dir / "state" / "server.prev.pt").unlink()
    code, err, started = resume(run_dir, capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and not started, err
    assert err[0] == (f"fedpeft: error: resume: {run_dir / 'state' / 'server.pt'} is damaged (it lacks 'config', 'adapter' of a fedpeft "
                      "server state), and there is no sound previous state (server.prev.pt) to fall back on: start the run again")


def test_every_round_keeps_the_previous_rounds_state(tmp_path):
    from fedpeft import durable

    path = tmp_path / "state" / "server.pt"
    for r in (1, 2, 3):
        durable.save_torch({"round": r}, path, keep_previous=True)
    assert torch.load(path)["round"] == 3 and torch.load(durable.previous(path))["round"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["server.prev.pt", "server.pt"]


def test_a_half_written_last_metrics_row_is_dropped_with_a_warning(run_dir, caplog):
    from fedpeft.composing import compose
    from fedpeft.serverapp import load_state

    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"round": 3, "accu')  # a crash mid-append
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        assert load_state(run_dir, compose(["clients=4", "rounds=4"]))["round"] == 2
    assert [json.loads(l)["round"] for l in path.read_text().splitlines()] == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: line 4 is a half-written row (Unterminated string starting at: line 1 column 14 (char 13)), "
        "what an interrupted write leaves; dropped"]


def test_a_bad_metrics_row_inside_the_file_is_refused_in_one_line_before_ray(run_dir, capsys, monkeypatch):
    path = run_dir / "metrics.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], rows[1][:9], rows[2]]) + "\n")
    code, err, started = resume(run_dir, capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and not started, err
    assert err[0].startswith(f"fedpeft: error: resume: {path} line 2 is not a metrics row (Expecting"), err[0]
    assert err[0].endswith("restore the file from a copy or delete that line")
