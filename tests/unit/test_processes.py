"""The process table that stopping a deployment or an interrupted run walks (psutil)."""

import os
import subprocess
import sys
import time

from fedpeft.deploy import processes_with_env
from fedpeft.launch import descendants, has_env, proc_table


def test_marked_processes_and_their_children_are_found_and_nothing_else():
    marker = f"FEDPEFT_TEST_MARK={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "print(c.pid, flush=True); time.sleep(60)"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        table = proc_table()
        assert table[child] == parent.pid and table[parent.pid] == os.getpid()
        assert processes_with_env(marker) == {parent.pid, child}  # the child inherited the marker
        assert has_env(parent.pid, *marker.split("=")) and not has_env(os.getpid(), *marker.split("="))
        assert not has_env(2**22 + 7, "X", "y")  # no such process
        assert descendants({parent.pid}) == {parent.pid, child}
        assert os.getpid() in descendants({os.getppid()}) or os.getppid() == 1
    finally:
        for pid in descendants({parent.pid}):
            os.kill(pid, 9)
        parent.wait()
    time.sleep(0.2)
    assert processes_with_env(marker) == set()
    assert parent.pid not in proc_table()  # reaped: not listed (zombies never are)
