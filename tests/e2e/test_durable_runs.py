"""A run on a full disk, and one under a read-only folder (issue 24, §3), as the user meets them:
``fedpeft simulate`` in a private mount namespace on a tmpfs of its own (:func:`tests.harness.in_tmpfs`)."""

from __future__ import annotations

import json

import pytest

from tests.harness import in_tmpfs

pytestmark = pytest.mark.slow

RUN = ["clients=2", "rounds=2", "train.local_steps=2", "model.rank=4", "model.alpha=8", "model.max_length=32", "data.eval_samples=64",
       "tracking.mode=disabled"]


def noise(line: str) -> bool:
    return "kernels-community" in line  # bitsandbytes' notice when it is imported, on every fedpeft command here


def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, can_mount):
    """The disk fills while round 2 (the last) trains: the run stops, exit 1, with one line naming the file it
    could not write, the last complete round (1) and the resume; no file is left empty or half
    written (summary.json: none; metrics.jsonl: rows 0 and 1, whole). Space freed, resume finishes."""
    out = in_tmpfs(tmp_path, f"""
        import subprocess
        RUN = {RUN!r}
        run = MNT / "run"
        env = {{**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"}}
        p = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "simulate", *RUN, f"hydra.run.dir={{run}}"], stdout=subprocess.PIPE,
                             stderr=open("{tmp_path}/err1", "w"), text=True, env=env)
        for line in p.stdout:
            if line.startswith("[fedpeft] round 1/2"):
                fill()
        rc1 = p.wait(timeout=600)
        after = {{"metrics": (run / "metrics.jsonl").read_text(), "summary": (run / "summary.json").exists(),
                 "empty": [str(f) for f in run.rglob("*") if f.is_file() and f.stat().st_size == 0 and f.name != "cli.log"],
                 "tmp": [str(f) for f in run.rglob("*.tmp")]}}
        (MNT / "filler").unlink()
        r = subprocess.run([sys.executable, "-m", "fedpeft.cli", "simulate", f"resume={{run}}"], capture_output=True, text=True, env=env, timeout=600)
        print(json.dumps({{"rc1": rc1, "err1": open("{tmp_path}/err1").read(), "after": after, "rc2": r.returncode, "err2": r.stderr,
                          "rows": [json.loads(l)["round"] for l in (run / "metrics.jsonl").read_text().splitlines()],
                          "status": json.loads((run / "summary.json").read_text())["status"]}}))
    """, options="size=64m", timeout=1500)
    run = tmp_path / "mnt" / "run"
    # Ray's workers' own warnings stream to stderr too: fedpeft's lines are those it starts with "fedpeft:"
    err = [l for l in out["err1"].splitlines() if l.startswith("fedpeft")]
    assert out["rc1"] == 1 and len(err) == 1 and "Traceback" not in out["err1"], out["err1"][-3000:]
    assert err[0].startswith(f"fedpeft: cannot write {run}/"), err[0]
    assert err[0].endswith(f": No space left on device; the last complete round is 1; free space and continue with resume={run}"), err[0]
    a = out["after"]
    assert not a["summary"] and a["empty"] == [] and a["tmp"] == []
    assert [json.loads(l)["round"] for l in a["metrics"].splitlines()] == [0, 1] and a["metrics"].endswith("\n")
    assert out["rc2"] == 0, out["err2"][-3000:]
    assert out["rows"] == [0, 1, 2] and out["status"] == "finished"


def test_a_run_dir_under_a_read_only_folder_is_refused_before_anything_loads(tmp_path, can_mount):
    """On a read-only file system (root may write any folder, but not there) the run dir is refused
    while composing, in one line naming the folder, before the data or the model load."""
    out = in_tmpfs(tmp_path, """
        import subprocess
        (MNT / "runs").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(MNT)], check=True)
        r = subprocess.run([sys.executable, "-m", "fedpeft.cli", "simulate", f"hydra.run.dir={MNT}/runs/a/b", "rounds=1"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        print(json.dumps({"rc": r.returncode, "err": r.stderr, "out": r.stdout}))
    """)
    lines = [l for l in out["err"].splitlines() if l.strip() and not noise(l)]
    assert out["rc"] == 2 and len(lines) == 1, out["err"][-2000:]
    assert lines[0] == (f"fedpeft: config error: hydra.run.dir: cannot write {tmp_path}/mnt/runs (to make {tmp_path}/mnt/runs/a/b in): "
                        "a read-only file system; choose a run directory you can write")
    assert out["out"].splitlines() == ["[fedpeft] checking the config, the data and the model's shapes …"]  # and nothing loaded after
