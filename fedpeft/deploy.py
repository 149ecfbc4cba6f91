"""A real, local Flower deployment: one SuperLink and N SuperNodes on this machine, on loopback.

:func:`make_pki` writes a development CA, a server certificate (SANs for 127.0.0.1 and localhost)
and one OpenSSH key pair per SuperNode. :class:`Deployment` starts ``flower-superlink`` with TLS
and SuperNode authentication, registers every node's public key, starts the ``flower-supernode``
processes, waits until all are online, runs apps with ``flwr run``, and on ``close()`` (or leaving
the ``with`` block, Ctrl-C included) stops every process it started and their children.

    pki = make_pki(work / "pki", 2)
    with Deployment(work, 2, [{"partition-id": 0}, {"partition-id": 1}], pki=pki) as dep:
        status = dep.run(Path("."), {"config": "..."}, timeout=3600)   # "finished:completed"

Everything listens on 127.0.0.1 only: the SuperLink's one port (Fleet, Control and Runtime APIs)
and each SuperNode's own Runtime API port. Plain text (``insecure=True``) must be asked for.

The SuperLink keeps its state in memory (no ``--database``): a deployment lives as long as this
object, its nodes are registered afresh at every start, and a file would carry registrations and
half-finished runs of a crashed launch into the next one. Logs go to ``work_dir/superlink.log`` and
``work_dir/supernode-<i>.log``.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.launch import ENV_DEFAULTS, descendants, has_env, proc_table, project_dir, send_signal
from fedpeft.runconfig import to_run_config
from fedpeft.tracking import say

log = logging.getLogger(__name__)

CONNECTION = "fedpeft"  # the SuperLink connection's name in our private FLWR_HOME/config.toml
LOOPBACK = "127.0.0.1"
_MARKER = "FEDPEFT_DEPLOYMENT"  # env var every process we start (and its children) inherits
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT")  # uvicorn's access lines
_NOT_DETAIL = ("INFO", "WARNING", "DEBUG", "ERROR", "For more information")


class DeploymentError(RuntimeError):
    """A deployment step failed; the message is one line that names the culprit."""


# ---------------------------------------------------------------------------------------------
# PKI


@dataclass(frozen=True)
class Pki:
    """Paths of a development PKI: the CA, the SuperLink's certificate, one key pair per node."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys, OpenSSH format (ECDSA P-384)
    node_public_keys: tuple[Path, ...]  # "ecdsa-sha2-nistp384 ..."


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # an existing file keeps its old mode through O_CREAT
        f.write(data)
    return path


def make_node_keypair(private_key: Path, public_key: Path) -> tuple[Path, Path]:
    """One SuperNode's ECDSA P-384 key pair, both in OpenSSH format (the private one 0600)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private_key, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()), 0o600)
    _write(public_key, key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH) + b"\n")
    return private_key, public_key


def make_pki(directory: Path, num_nodes: int, hosts: tuple[str, ...] = (LOOPBACK, "localhost")) -> Pki:
    """A development CA (``ca.crt``/``ca.key``), a server certificate signed by it with a SAN per host
    (IP entries for addresses, DNS entries for names), and ``node-<i>.key``/``node-<i>.pub`` for
    ``num_nodes`` SuperNodes. Private keys are written 0600. For development only: the CA key lies
    next to the certificates."""
    if num_nodes < 1:
        raise DeploymentError(f"make_pki: num_nodes must be at least 1, got {num_nodes}")
    if not hosts:
        raise DeploymentError("make_pki: hosts is empty; the server certificate needs at least one SAN")
    directory = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365)

    def pem_key(key) -> bytes:
        return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("fedpeft development CA")).issuer_name(name("fedpeft development CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pki = Pki(
        ca_cert=_write(directory / "ca.crt", ca_cert.public_bytes(ser.Encoding.PEM)),
        ca_key=_write(directory / "ca.key", pem_key(ca_key), 0o600),
        server_cert=_write(directory / "server.crt", server_cert.public_bytes(ser.Encoding.PEM)),
        server_key=_write(directory / "server.key", pem_key(server_key), 0o600),
        node_keys=tuple(directory / f"node-{i}.key" for i in range(num_nodes)),
        node_public_keys=tuple(directory / f"node-{i}.pub" for i in range(num_nodes)),
    )
    for private, public in zip(pki.node_keys, pki.node_public_keys):
        make_node_keypair(private, public)
    return pki


# ---------------------------------------------------------------------------------------------
# Processes: everything we start carries a marker in its environment, which its children inherit;
# psutil finds them even after they were re-parented (the SuperLink's superexec runs in its own
# session, a dead SuperNode's superexec lingers a few seconds).


def processes_with_env(entry: str, table: dict[int, int] | None = None) -> set[int]:
    """The live processes whose environment holds ``entry`` (``NAME=value``), e.g. every process a
    ``flwr`` CLI started with one ``FLWR_HOME``."""
    name, _, value = entry.partition("=")
    return {pid for pid in (proc_table() if table is None else table) if has_env(pid, name, value)}


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held open together, so never the same)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def format_node_config(config: dict[str, int | float | str | bool]) -> str:
    """``--node-config`` text as Flower's ``parse_config_args`` reads it: ``k=1 k2='text'``."""
    parts = []
    for key, value in config.items():
        if not _KEY.fullmatch(key):
            raise DeploymentError(f"node config key {key!r}: use letters, digits, '_', '-' or '.'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, str):
            if "\n" in value or "\r" in value or ("'" in value and '"' in value):
                raise DeploymentError(f"node config {key}={value!r}: a value cannot hold a newline, or both quote kinds")
            text = f"'{value}'" if "'" not in value else json.dumps(value, ensure_ascii=False)
        else:
            raise DeploymentError(f"node config {key}={value!r}: values must be int, float, str or bool")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def log_tail(path: Path, since: int = 0) -> str:
    """What a Flower log says went wrong, on one line: its last ERROR and the lines explaining it
    (ANSI colours stripped), or its last line when there is no ERROR; from byte ``since`` on."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = _ANSI.sub("", f.read().decode(errors="replace"))
    except OSError:
        return f"(no log at {path})"
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    errors = [i for i, r in enumerate(rows) if r.startswith("ERROR")]
    if not errors:
        return rows[-1] if rows else f"(empty log {path.name})"
    picked = [rows[errors[-1]]]
    for row in rows[errors[-1] + 1:]:
        if row.startswith(_NOT_DETAIL) or _STAMP.match(row) or len(picked) == 4:
            break
        picked.append(row)
    return " | ".join(" ".join(r.split()) for r in picked)


def _flat(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in table.items():
        keys |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


def check_run_config(app_dir: Path, run_config: dict) -> None:
    """Flower refuses run-config keys the app does not declare, without naming them: name them."""
    pyproject = Path(app_dir) / "pyproject.toml"
    try:
        declared = _flat(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"].get("config", {}))
    except OSError as err:
        raise DeploymentError(f"{app_dir} is not a Flower app: cannot read {pyproject} ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise DeploymentError(f"{pyproject}: {err}") from None
    except KeyError:
        raise DeploymentError(f"{app_dir} is not a Flower app: {pyproject} has no [tool.flwr.app]") from None
    for key, value in run_config.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise DeploymentError(f"run config {key!r}={value!r}: keys are str, values str, int, float or bool")
    unknown = sorted(_flat(run_config) - declared)
    if unknown:
        raise DeploymentError(f"run config key(s) {', '.join(unknown)} not declared in {pyproject} "
                              f"[tool.flwr.app.config] (declared: {', '.join(sorted(declared)) or 'none'})")


def cli_error(lines: list[str]) -> str:
    """The ``flwr`` CLI's error on one line: the text of its last boxed ``Error`` panel, or its
    last non-empty line."""
    rows = [r.strip() for r in lines if r.strip()]
    starts = [i for i, r in enumerate(rows) if r.startswith("╭")]
    if starts:
        body = [r.strip("│ ") for r in rows[starts[-1] + 1:] if r.startswith("│")]
        if body:
            return " ".join(" ".join(body).split())
    return rows[-1] if rows else "no output"


# ---------------------------------------------------------------------------------------------


class Deployment:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback; a context manager.

    ``pki`` (from :func:`make_pki`) gives TLS and SuperNode authentication; without it the launcher
    refuses unless ``insecure=True`` says that plain text is wanted. ``node_configs[i]`` is node
    ``i``'s ``--node-config``. ``env`` adds to the processes' environment. ``round_poll`` is how
    often (seconds) the launcher asks the SuperLink about nodes and runs (default 1 s).
    ``startup_timeout`` bounds the wait for the SuperLink and the nodes.
    """

    def __init__(self, work_dir: Path, num_nodes: int, node_configs: list[dict[str, int | float | str]], *,
                 insecure: bool = False, env: dict[str, str] | None = None, round_poll: float | None = None,
                 pki: Pki | None = None, startup_timeout: float = 60.0):
        if num_nodes < 1:
            raise DeploymentError(f"num_nodes must be at least 1, got {num_nodes}")
        if len(node_configs) != num_nodes:
            raise DeploymentError(f"node_configs has {len(node_configs)} entries for {num_nodes} nodes")
        if pki is None and not insecure:
            raise DeploymentError("no certificates: pass pki=make_pki(...) for TLS, or insecure=True "
                                  "to accept plain-text traffic")
        if pki is not None and insecure:
            raise DeploymentError("both pki and insecure=True given: choose TLS or plain text")
        if pki is not None and len(pki.node_keys) < num_nodes:
            raise DeploymentError(f"pki has keys for {len(pki.node_keys)} nodes, {num_nodes} asked for")
        bin_dir = Path(sys.executable).parent
        for exe in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            if not (bin_dir / exe).exists():
                raise DeploymentError(f"{exe} not found in {bin_dir}: install flwr into this environment")

        self.work_dir = Path(work_dir).resolve()
        self.num_nodes = num_nodes
        self.node_args = [format_node_config(c) for c in node_configs]
        self.insecure = insecure
        self.pki = pki
        self.poll = round_poll if round_poll is not None else 1.0
        self.startup_timeout = startup_timeout
        self.bin_dir = bin_dir
        self.marker = f"{_MARKER}={uuid.uuid4().hex}"
        self.port: int | None = None  # the SuperLink's
        self.node_ports: list[int] = []
        self.node_ids: list[int | None] = [None] * num_nodes  # as the SuperLink knows them
        self._log_start: dict[int, int] = {}  # node -> offset in its log where its current process began
        self.procs: dict[str, subprocess.Popen] = {}  # superlink, supernode-<i>, flwr-run-<n>, spawn()ed
        self._runs = 0
        self._closed = False
        self._env = dict(os.environ)
        self._env.update(env or {})
        self._env.update({
            "PATH": f"{bin_dir}{os.pathsep}{self._env.get('PATH', '')}",  # flower-superexec, flwr-*app by name
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",  # the CLI's rich error panels wrap at 80 columns otherwise
            _MARKER: self.marker.split("=", 1)[1],
        })

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Deployment:
        """Start the SuperLink, register the nodes, start them and wait until all are online."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        atexit.register(self.close)  # a script that forgets close() still leaves nothing behind
        t0 = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port, *self.node_ports = free_ports(1 + self.num_nodes)
        self._write_cli_config()
        cmd = ["flower-superlink", "--host", LOOPBACK, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.insecure:
            log.warning("insecure=True: SuperLink and SuperNodes talk plain text on 127.0.0.1:%s "
                        "(no TLS, no SuperNode authentication); never use this beyond a trusted machine", self.port)
            cmd += ["--insecure"]
        else:
            cmd += ["--ssl-ca-certfile", str(self.pki.ca_cert), "--ssl-certfile", str(self.pki.server_cert),
                    "--ssl-keyfile", str(self.pki.server_key), "--enable-supernode-auth"]
        self.spawn("superlink", cmd, home="superlink")
        self._wait_for_port()
        log.info("superlink listening on %s:%d after %.1f s (log: %s)", LOOPBACK, self.port, time.monotonic() - t0,
                 self.work_dir / "superlink.log")
        if not self.insecure:  # one CLI process per key, side by side: each takes seconds to import
            with ThreadPoolExecutor(self.num_nodes) as pool:
                self.node_ids = list(pool.map(self.register, self.pki.node_public_keys[:self.num_nodes]))
        for i in range(self.num_nodes):
            self.start_node(i, wait=False)
        self.wait_for_nodes()
        log.info("%d supernodes online after %.1f s (logs: %s)", self.num_nodes, time.monotonic() - t0,
                 self.work_dir / "supernode-<i>.log")

    def close(self) -> None:
        """Stop every process started here and all their descendants: SIGTERM, a few seconds'
        grace, then SIGKILL. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._stop(self._ours(), grace=5.0)
        except KeyboardInterrupt:  # a second Ctrl-C: no grace, but still stop everything
            self._stop(self._ours(), grace=0.0)
            raise
        for p in self.procs.values():
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._close_logs()

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, name: str, cmd: list[str], *, home: str | None = None, log_mode: str = "w",
              stdout=None) -> subprocess.Popen:
        """Start ``cmd`` (an executable from the environment's bin dir) in its own session, with our
        environment, output to ``work_dir/<name>.log`` (or ``stdout``); tracked and stopped by close()."""
        if self._closed:
            raise DeploymentError(f"cannot start {name}: the deployment is closed")
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise DeploymentError(f"cannot start {name}: it is running (pid {old.pid})")
        env = dict(self._env)
        env["FLWR_HOME"] = str(self.work_dir / "home" / (home or name))
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        if stdout is None:
            out = open(self.work_dir / f"{name}.log", log_mode + "b")  # closed in _close_logs
            err = subprocess.STDOUT
        else:
            out, err = stdout, subprocess.STDOUT
        argv = [str(self.bin_dir / cmd[0]), *cmd[1:]]
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=self.work_dir, start_new_session=True)
        proc._fedpeft_log = out if stdout is None else None  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def node_command(self, i: int) -> list[str]:
        cmd = ["flower-supernode", "--superlink", f"{LOOPBACK}:{self.port}", "--host", LOOPBACK,
               "--port", str(self.node_ports[i]), "--node-config", self.node_args[i]]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--root-certificates", str(self.pki.ca_cert),
                      "--auth-supernode-private-key", str(self.pki.node_keys[i])]

    def start_node(self, i: int, *, wait: bool = True) -> None:
        """(Re)start node ``i`` with its key, node config and port; wait until it is online.

        After a SIGKILL the SuperLink keeps the node "online" until its heartbeat expires (about a
        minute) and refuses the same key meanwhile: wait for that first (with TLS only; in plain
        text a restarted node gets a new id, and the old one lingers as "online" as long)."""
        name, log_file = f"supernode-{i}", self.work_dir / f"supernode-{i}.log"
        restart = name in self.procs
        if restart and not self.insecure and self.node_ids[i] is not None:
            self._wait_offline(i)
        self._log_start[i] = log_file.stat().st_size if restart and log_file.exists() else 0
        self.spawn(name, self.node_command(i), log_mode="a" if restart else "w")
        if wait:
            self.wait_for_nodes()

    def _wait_offline(self, i: int, timeout: float = 120.0) -> None:
        deadline, said = time.monotonic() + timeout, False
        while any(int(n["node-id"]) == self.node_ids[i] and n["status"] == "online" for n in self.nodes()):
            if time.monotonic() > deadline:
                raise DeploymentError(f"supernode-{i}: the SuperLink still lists node {self.node_ids[i]} online "
                                      f"after {timeout:.0f} s; it refuses the same key until then")
            if not said:
                log.info("supernode-%d: waiting for the SuperLink to notice the old session is gone "
                         "(heartbeat expiry, about a minute after a SIGKILL)", i)
                said = True
            time.sleep(max(self.poll, 2.0))

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to node ``i``'s process group (its superexec and clientapp too), as a crash
        of its machine would; waits for the node itself to exit."""
        proc = self.procs[f"supernode-{i}"]
        _signal_once(descendants({proc.pid}), sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"supernode-{i} (pid {proc.pid}) still alive 10 s after signal {sig}") from None

    def pids(self) -> set[int]:
        """Every live process this deployment started, children included."""
        return self._ours()

    def _ours(self) -> set[int]:
        table = proc_table()
        found = processes_with_env(self.marker, table)
        found |= {p.pid for p in self.procs.values() if p.poll() is None}
        return descendants(found, table) - {os.getpid()}

    def _stop(self, victims: set[int], grace: float) -> None:
        """SIGTERM our process groups and ``victims``, then SIGKILL whatever of ours is left."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
            # Only groups that hold a live process of ours: a dead one's number may be reused.
            _signal_once(victims | {p.pid for p in self.procs.values() if p.poll() is None}, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for p in self.procs.values():
                    p.poll()  # reap our own children
                victims = self._ours() | (victims & set(proc_table()))
                if not victims:
                    return
                time.sleep(0.1)
        raise DeploymentError(f"processes {sorted(victims)} survived SIGKILL")

    def _close_logs(self) -> None:
        for p in self.procs.values():
            f = getattr(p, "_fedpeft_log", None)
            if f is not None and not f.closed:
                f.close()

    # -- the SuperLink's side ------------------------------------------------------------------

    def _write_cli_config(self) -> None:
        home = self.work_dir / "home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        conn: dict[str, object] = {"address": f"{LOOPBACK}:{self.port}"}
        if self.insecure:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(Path(self.pki.ca_cert).resolve())
        text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
        (home / "config.toml").write_text(text)

    def _wait_for_port(self) -> None:
        proc, deadline = self.procs["superlink"], time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"superlink exited with status {proc.returncode}: "
                                      f"{log_tail(self.work_dir / 'superlink.log')}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((LOOPBACK, self.port)) == 0:
                    return
            time.sleep(0.1)
        raise DeploymentError(f"superlink not listening on {LOOPBACK}:{self.port} after {self.startup_timeout:.0f} s: "
                              f"{log_tail(self.work_dir / 'superlink.log')}")

    def cli(self, *args: str, timeout: float = 60.0) -> dict:
        """Run ``flwr <args> --format json`` against our SuperLink; its JSON answer, or a one-line
        DeploymentError with Flower's error message."""
        env = dict(self._env, FLWR_HOME=str(self.work_dir / "home" / "cli"))
        argv = [str(self.bin_dir / "flwr"), *args, "--format", "json"]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                                 stdin=subprocess.DEVNULL, cwd=self.work_dir)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"flwr {' '.join(args)}: no answer within {timeout:.0f} s") from None
        out = _ANSI.sub("", res.stdout)
        try:
            data = json.loads(out[out.index("{"):])
        except ValueError:
            detail = cli_error(_ANSI.sub("", res.stderr + out).splitlines())
            raise DeploymentError(f"flwr {' '.join(args)} exited {res.returncode}: {detail}") from None
        if res.returncode != 0 or not data.get("success", False):
            msg = " ".join(str(data.get("error-message", data)).split())
            raise DeploymentError(f"flwr {' '.join(args)} failed: {msg}")
        return data

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's OpenSSH public key with the SuperLink; its node id."""
        return int(self.cli("supernode", "register", str(public_key), CONNECTION)["node-id"])

    def nodes(self) -> list[dict]:
        """The SuperLink's node list (``flwr supernode list --format json``)."""
        return self.cli("supernode", "list", CONNECTION)["nodes"]

    def wait_for_nodes(self, timeout: float | None = None) -> None:
        """Until every node we run is online at the SuperLink; a one-line error naming the node
        that exited (with the tail of its log) or the ones still missing at the timeout."""
        limit = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            sl = self.procs["superlink"]
            if sl.poll() is not None:
                raise DeploymentError(f"superlink exited with status {sl.returncode}: "
                                      f"{log_tail(self.work_dir / 'superlink.log')}")
            for i in range(self.num_nodes):
                proc = self.procs.get(f"supernode-{i}")
                if proc is not None and proc.poll() is not None:
                    raise DeploymentError(f"supernode-{i} exited with status {proc.returncode}: "
                                          f"{log_tail(self.work_dir / f'supernode-{i}.log')}")
            # A node has connected once its current process logged the id the SuperLink gave it (a
            # killed node's id stays "online" at the SuperLink until its heartbeat expires). Reading
            # logs is free; the CLI costs seconds of start-up, so it only confirms.
            logged = [self._logged_node_id(i) for i in range(self.num_nodes)]
            missing = [i for i in range(self.num_nodes) if logged[i] is None]
            if not missing:
                online = {int(n["node-id"]) for n in self.nodes() if n["status"] == "online"}
                missing = [i for i in range(self.num_nodes) if logged[i] not in online]
                if not missing:
                    self.node_ids = logged
                    return
            if time.monotonic() > deadline:
                i = missing[0]
                raise DeploymentError(f"supernode-{i} not online after {limit:.0f} s"
                                      f" ({len(missing)} of {self.num_nodes} missing): "
                                      f"{log_tail(self.work_dir / f'supernode-{i}.log')}")
            time.sleep(0.2 if None in logged else self.poll)

    def _logged_node_id(self, i: int) -> int | None:
        """The id in node ``i``'s log since its last (re)start, once it has connected."""
        try:
            with open(self.work_dir / f"supernode-{i}.log", "rb") as f:
                f.seek(self._log_start.get(i, 0))
                text = _ANSI.sub("", f.read().decode(errors="replace"))
        except OSError:
            return None
        ids = re.findall(r"SuperNode ID: (\d+)", text)
        return int(ids[-1]) if ids else None

    # -- runs ----------------------------------------------------------------------------------

    def run(self, app_dir: Path, run_config: dict[str, str | int | float | bool], timeout: float) -> str:
        """``flwr run <app_dir> --run-config <toml> --stream``, its output streamed to our stdout;
        returns the run's final status (``finished:completed``) as the SuperLink reports it, or
        raises a one-line DeploymentError (failed or stopped run, timeout, refused config)."""
        if self._closed:
            raise DeploymentError("run: the deployment is closed")
        app_dir = Path(app_dir).resolve()
        check_run_config(app_dir, run_config)
        self._runs += 1
        cfg = self.work_dir / f"run-config-{self._runs}.toml"
        cfg.write_text(tomli_w.dumps(run_config))
        deadline = time.monotonic() + timeout
        link_log_at = (self.work_dir / "superlink.log").stat().st_size
        proc = self.spawn(f"flwr-run-{self._runs}", ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(cfg),
                                                     "--stream"], home="cli", stdout=subprocess.PIPE)
        tail: list[str] = []
        run_id: list[int] = []

        def pump() -> None:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace")
                sys.stdout.write(line)
                sys.stdout.flush()
                plain = _ANSI.sub("", line).strip()
                if plain:
                    tail[:] = [*tail[-29:], plain]
                if not run_id and (m := re.search(r"Successfully started run (\d+)", plain)):
                    run_id.append(int(m.group(1)))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if run_id:
                try:
                    self.cli("stop", str(run_id[0]), CONNECTION, timeout=30)
                except DeploymentError as err:
                    log.warning("%s", err)
            send_signal(proc.pid, signal.SIGKILL, group=True)  # the CLI only; the SuperLink stops the run
            proc.wait()
            raise DeploymentError(f"run {run_id[0] if run_id else '?'} of {app_dir.name} did not finish "
                                  f"within {timeout:.0f} s (asked the SuperLink to stop it)") from None
        finally:
            if proc.poll() is not None:  # on Ctrl-C, close() ends the CLI and with it the reader
                reader.join(timeout=5)
        if proc.returncode != 0 or not run_id:
            why = log_tail(self.work_dir / "superlink.log", since=link_log_at)
            why = f" (superlink: {why})" if why.startswith("ERROR") else ""
            raise DeploymentError(f"flwr run {app_dir.name} exited {proc.returncode}: {cli_error(tail)}{why}")
        status, details = self._final_status(run_id[0], deadline)
        if status != "finished:completed":
            hint = details if details not in ("", "N/A") else log_tail(self.work_dir / "superlink.log", since=link_log_at)
            raise DeploymentError(f"run {run_id[0]} of {app_dir.name} ended {status}: {hint}")
        return status

    def _final_status(self, run_id: int, deadline: float) -> tuple[str, str]:
        """The run's status from the SuperLink; the log stream can end a moment before it is final."""
        while True:
            runs = self.cli("list", CONNECTION, "--run-id", str(run_id))["runs"]
            status, details = runs[0]["status"], " ".join(str(runs[0].get("status-details") or "").split())
            if status.startswith("finished") or time.monotonic() > deadline:
                return status, details
            time.sleep(self.poll)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_once(pids: set[int], sig: int) -> None:
    """Send ``sig`` to the process groups of ``pids`` and to those of ``pids`` outside them, once
    each: Flower's handlers put SIG_DFL back on the first SIGTERM, so a second one kills a process
    in the middle of its graceful exit (a SuperNode then never deactivates at the SuperLink)."""
    groups = {g for g in map(_pgid, pids) if g} - {os.getpgrp()}  # never our own group
    for pgid in groups:
        send_signal(pgid, sig, group=True)
    for pid in pids:
        if _pgid(pid) not in groups:
            send_signal(pid, sig)


# ---------------------------------------------------------------------------------------------
# fedpeft deploy: the fedpeft app on a local deployment


def node_configs(cfg, run_dir: Path) -> list[dict[str, int | float | str]]:
    """What each local SuperNode is started with: the partition it serves (as in simulation, so
    both engines train the same clients on the same data) and its own state dir."""
    return [{"partition-id": i, "num-partitions": int(cfg.clients), "state-dir": str(run_dir / "deploy" / f"node-{i}")} for i in range(cfg.clients)]


def run(cfg, run_dir: Path, *, resume: bool = False, insecure: bool = False) -> dict:
    """``fedpeft deploy``: the fedpeft ServerApp and ClientApp on a real local deployment: a
    SuperLink and ``clients`` SuperNodes with TLS and SuperNode authentication (a development CA,
    certificates and node keys generated into ``run_dir/deploy/``), run with ``flwr run``; every
    process is stopped afterwards, also on Ctrl-C or an error. Returns the run's summary."""
    run_dir = Path(run_dir).resolve()
    work = run_dir / "deploy"
    pki = None if insecure else make_pki(work / "pki", cfg.clients)
    timeout = cfg.engine.round_timeout * (cfg.rounds + 1) + 600
    say(f"deployment: a SuperLink and {cfg.clients} SuperNodes on 127.0.0.1, "
        + ("plain text (--insecure)" if insecure else f"TLS and SuperNode authentication (CA and keys in {work / 'pki'})"))
    with Deployment(work, cfg.clients, node_configs(cfg, run_dir), insecure=insecure, pki=pki, env=dict(ENV_DEFAULTS)) as dep:
        dep.run(project_dir(), to_run_config(cfg, run_dir, resume=resume), timeout=timeout)
    return json.loads((run_dir / "summary.json").read_text())
