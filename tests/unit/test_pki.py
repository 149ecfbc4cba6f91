"""``fedpeft pki``: the certificates and keys a real deployment needs, checked with `cryptography`."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import run_cli


def test_pki_writes_a_ca_a_server_certificate_with_the_sans_and_node_keys(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["pki", "pki", "--nodes", "2", "--san", "server.example", "--san", "10.0.0.5"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    d = tmp_path / "pki"
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key", "node-0.key", "node-0.pub", "node-1.key", "node-1.pub",
                                                   "server.crt", "server.key"]
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["server.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    for i in range(2):
        pub = ser.load_ssh_public_key((d / f"node-{i}.pub").read_bytes())
        key = ser.load_ssh_private_key((d / f"node-{i}.key").read_bytes(), None)
        assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()  # each .pub is its .key's
    for name in ("ca.key", "server.key", "node-0.key", "node-1.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert "flwr supernode register" in out and str(d / "server.crt") in out


@pytest.mark.parametrize("args, expected", [
    (["--nodes", "1"], "is not empty; choose a new or empty directory (nothing is overwritten)"),
])
def test_pki_never_overwrites(args, expected, tmp_path, monkeypatch, capsys):
    d = tmp_path / "pki"
    d.mkdir()
    (d / "ca.key").write_text("mine")
    code, out, err = run_cli(["pki", "pki", *args], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert [p.name for p in d.iterdir()] == ["ca.key"] and (d / "ca.key").read_text() == "mine"


def test_pki_needs_at_least_one_node(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["pki", "pki", "--nodes", "0"], tmp_path, monkeypatch, capsys)
    assert e.value.code == 2 and "--nodes must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()
