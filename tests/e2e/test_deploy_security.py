"""A real local Flower deployment (fedpeft.deploy) on loopback: TLS, SuperNode authentication, what
is refused, and that nothing is left running or listening afterwards.

The app is a toy built here (fedpeft's own ServerApp/ClientApp are not needed): its ServerApp asks
every connected node for its node config and writes the answers to the run config's ``out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedpeft.deploy import Deployment, DeploymentError, format_node_config, free_ports, make_node_keypair, make_pki
from tests.harness import listeners

pytestmark = pytest.mark.slow

NODE_CONFIGS = [{"partition-id": 0, "name": "alpha node"}, {"partition-id": 1, "name": "it's beta"}]

TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
description = "A toy Flower app for fedpeft's deployment tests"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedpeft-tests"

[tool.flwr.app.components]
serverapp = "toyapp_mod.server:app"
clientapp = "toyapp_mod.client:app"

[tool.flwr.app.config]
out = ""
fail = false
"""

TOY_SERVER = """\
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise RuntimeError("toy ServerApp asked to fail")
    ask = [Message(content=RecordDict({"ask": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="query")
           for node in grid.get_node_ids()]
    answers = {}
    for reply in grid.send_and_receive(ask, timeout=60):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        answers[str(reply.metadata.src_node_id)] = dict(reply.content["node"])
    Path(str(context.run_config["out"])).write_text(json.dumps(answers))
"""

TOY_CLIENT = """\
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"node": ConfigRecord(dict(context.node_config))}), reply_to=msg)
"""


def make_toyapp(root: Path) -> Path:
    app = root / "toyapp"  # `flwr build` wants letters, digits and hyphens
    (app / "toyapp_mod").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TOY_PYPROJECT)
    (app / "toyapp_mod" / "__init__.py").write_text("")
    (app / "toyapp_mod" / "server.py").write_text(TOY_SERVER)
    (app / "toyapp_mod" / "client.py").write_text(TOY_CLIENT)
    return app


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            left.add(pid)
    return left


def marked(marker: str) -> set[int]:
    """Live processes whose environment carries the deployment's marker."""
    from fedpeft.deploy import processes_with_env

    return alive(processes_with_env(marker))


def wait_exit(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(0.2)
    return {name: p.poll() for name, p in procs.items()}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A TLS + SuperNode-auth deployment with two nodes, shared by the tests below (starting one
    takes ~20 s here); the last test closes it."""
    root = tmp_path_factory.mktemp("deploy")
    pki = make_pki(root / "pki", 2)
    t0 = time.monotonic()
    dep = Deployment(root / "work", 2, NODE_CONFIGS, pki=pki, round_poll=0.5, startup_timeout=90)
    with dep:
        print(f"[timing] TLS deployment with 2 nodes up in {time.monotonic() - t0:.1f} s")
        yield dep, pki, root


def test_pki_files_and_formats(tmp_path):
    from cryptography import x509

    pki = make_pki(tmp_path / "pki", 2)
    for key in (pki.ca_key, pki.server_key, *pki.node_keys):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert all(k.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----") for k in pki.node_keys)
    assert all(p.read_text().startswith("ecdsa-sha2-nistp384 ") for p in pki.node_public_keys)
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_node_config_text_is_what_flower_parses():
    from flwr.common.config import parse_config_args

    config = {"partition-id": 3, "lr": 0.5, "name": "it's a node", "quote": 'say "hi" = x', "plain": "a\\b c",
              "empty": "", "flag": True}
    assert parse_config_args([format_node_config(config)]) == config
    with pytest.raises(DeploymentError, match="both quote kinds"):
        format_node_config({"bad": "it's \"quoted\""})


def test_plain_text_must_be_asked_for(tmp_path):
    with pytest.raises(DeploymentError) as err:
        Deployment(tmp_path, 1, [{"partition-id": 0}])
    assert "insecure=True" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # refused before starting or writing anything


def test_toy_app_runs_over_tls_with_node_auth(tls, tmp_path, capsys):
    dep, _, root = tls
    app = make_toyapp(tmp_path)
    out = tmp_path / "answers.json"
    t0 = time.monotonic()
    assert dep.run(app, {"out": str(out)}, timeout=180) == "finished:completed"
    took = time.monotonic() - t0
    answers = json.loads(out.read_text())
    assert answers == {str(dep.node_ids[i]): NODE_CONFIGS[i] for i in range(2)}
    assert "Successfully started run" in capsys.readouterr().out  # flwr run's output was streamed
    with capsys.disabled():
        print(f"[timing] one toy round over TLS, `flwr run` to status read: {took:.1f} s")

    # `flwr run --stream` exits 0 when the ServerApp raised: the launcher reads the real status.
    with pytest.raises(DeploymentError, match=r"ended finished:failed: .*toy ServerApp asked to fail") as err:
        dep.run(app, {"out": str(out), "fail": True}, timeout=120)
    assert "\n" not in str(err.value)
    # A run-config key the app does not declare is refused, on one line, by name.
    with pytest.raises(DeploymentError, match=r"run config key\(s\) no-such-key not declared in .*toyapp") as err:
        dep.run(app, {"no-such-key": 1}, timeout=60)
    assert "\n" not in str(err.value)


def test_everything_listens_on_loopback_only(tls):
    dep, _, _ = tls
    ours = dep.pids()
    mine = [(addr, port) for addr, port, pids in listeners() if pids & ours]
    assert mine, "no listening socket of ours found: is ss able to see process ids?"
    assert {addr for addr, _ in mine} == {"127.0.0.1"}, mine
    assert {port for _, port in mine} == {dep.port, *dep.node_ports}


def test_unregistered_supernode_is_refused(tls, tmp_path):
    dep, pki, root = tls
    key, _ = make_node_keypair(tmp_path / "stranger.key", tmp_path / "stranger.pub")  # never registered
    (port,) = free_ports(1)
    node = dep.spawn("stranger", ["flower-supernode", "--superlink", f"127.0.0.1:{dep.port}", "--host", "127.0.0.1",
                                  "--port", str(port), "--root-certificates", str(pki.ca_cert),
                                  "--auth-supernode-private-key", str(key)])
    t0 = time.monotonic()
    assert wait_exit({"stranger": node}, 60) == {"stranger": 1}
    print(f"[timing] unregistered node refused in {time.monotonic() - t0:.1f} s")
    log = (dep.work_dir / "stranger.log").read_text()
    assert "[code: 2004] Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in (dep.work_dir / "superlink.log").read_text()
    assert len([n for n in dep.nodes() if n["status"] == "online"]) == 2


def test_supernode_without_our_ca_cannot_connect(tls, tmp_path):
    dep, pki, root = tls
    other = make_pki(tmp_path / "other", 1)  # a CA the SuperLink's certificate was not signed by
    keys = [make_node_keypair(tmp_path / f"k{i}.key", tmp_path / f"k{i}.pub") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:  # registered: only TLS stands in the way
        ids = list(pool.map(dep.register, [pub for _, pub in keys]))
    ports = free_ports(2)
    base = ["flower-supernode", "--superlink", f"127.0.0.1:{dep.port}", "--host", "127.0.0.1"]
    procs = {
        "wrong-ca": dep.spawn("wrong-ca", [*base, "--port", str(ports[0]), "--root-certificates", str(other.ca_cert),
                                           "--auth-supernode-private-key", str(keys[0][0])]),
        # without --root-certificates Flower 1.41 uses the system's CAs, which do not know ours
        "no-ca": dep.spawn("no-ca", [*base, "--port", str(ports[1]), "--auth-supernode-private-key", str(keys[1][0])]),
    }
    t0 = time.monotonic()
    assert wait_exit(procs, 60) == {"wrong-ca": 1, "no-ca": 1}
    print(f"[timing] nodes without our CA gave up in {time.monotonic() - t0:.1f} s")
    for name in procs:
        assert "CERTIFICATE_VERIFY_FAILED" in (dep.work_dir / f"{name}.log").read_text(), name
    status = {int(n["node-id"]): n["status"] for n in dep.nodes()}
    assert [status[i] for i in ids] == ["registered", "registered"]  # never connected


def test_node_restarts_with_its_key_and_config(tls):
    dep, _, _ = tls
    before = list(dep.node_ids)
    t0 = time.monotonic()
    dep.kill_node(1, signal.SIGTERM)  # a graceful stop: the SuperLink marks the node offline at once
    assert {int(n["node-id"]): n["status"] for n in dep.nodes()}[before[1]] == "offline"
    dep.start_node(1)
    print(f"[timing] node stopped and back online in {time.monotonic() - t0:.1f} s")
    assert dep.node_ids == before  # same key, same node id


def test_close_stops_every_process_and_port(tls):
    dep, _, _ = tls
    pids, ports = dep.pids(), {dep.port, *dep.node_ports}
    assert len(pids) >= 6  # superlink + its superexec, 2 × (supernode + its superexec)
    t0 = time.monotonic()
    dep.close()
    print(f"[timing] close: {time.monotonic() - t0:.1f} s")
    assert not alive(pids)
    assert not marked(dep.marker)
    assert not [(a, p) for a, p, _ in listeners() if p in ports]


def test_a_node_that_cannot_start_is_named_and_nothing_is_left(tmp_path):
    """Node 0's registered public key is not its own: start() fails with one line naming it and
    saying why (from its log), and stops what it had started."""
    pki = make_pki(tmp_path / "pki", 1)
    make_node_keypair(tmp_path / "other.key", pki.node_public_keys[0])  # overwrite node-0.pub
    dep = Deployment(tmp_path / "work", 1, [{"partition-id": 0}], pki=pki, round_poll=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeploymentError) as err:
        with dep:
            pytest.fail("started with a key the SuperLink does not know")
    print(f"[timing] failed start reported in {time.monotonic() - t0:.1f} s")
    message = str(err.value)
    assert message.startswith("supernode-0 exited with status 1: ") and "2004" in message and "\n" not in message
    assert not marked(dep.marker)


CHILD = """\
import json, logging, sys, time
from pathlib import Path
from fedpeft.deploy import Deployment
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
with Deployment(Path(sys.argv[1]), 1, [{"partition-id": 0}], insecure=True, round_poll=0.5) as dep:
    print(json.dumps({"marker": dep.marker, "pids": sorted(dep.pids()), "ports": [dep.port, *dep.node_ports]}),
          flush=True)
    time.sleep(600)
"""


def test_insecure_warns_and_ctrl_c_stops_everything(tmp_path):
    """Plain text is logged as such; Ctrl-C (SIGINT to the launcher) stops the whole tree."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    # a terminal's foreground job: SIGINT at its default even where this suite runs as a background job (ignored)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "work")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    info: dict = {}
    try:
        line = child.stdout.readline()
        assert line, f"launcher died: {child.stderr.read()[-2000:]}"
        info = json.loads(line)
        ours = set(info["pids"])
        mine = [(addr, port) for addr, port, pids in listeners() if pids & ours]
        assert {addr for addr, _ in mine} == {"127.0.0.1"} and {p for _, p in mine} == set(info["ports"])
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in alive(ours)]
        assert any(b"flower-superlink" in c[1] and b"--insecure" in c for c in cmdlines if len(c) > 1)
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        print(f"[timing] Ctrl-C to everything stopped: {time.monotonic() - t0:.1f} s")
    finally:
        if child.poll() is None:  # a SIGKILLed launcher cannot stop its deployment (own sessions): stop it here
            child.kill()
            child.wait()
            for pid in marked(info["marker"]) if info else ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert re.search(r"WARNING insecure=True: .*plain text", err), err[-2000:]
    assert "KeyboardInterrupt" in err
    assert not alive(ours) and not marked(info["marker"])
    assert not [(a, p) for a, p, _ in listeners() if p in info["ports"]]
