"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication, SuperNodes, ``flwr run``.

Each test starts and stops its own SuperLink on a free loopback port (smoke preset: tiny models).
"""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.core.config import RunConfig
from simulations.certs import certificate_hosts, make_server_certificates, make_site_keys
from simulations.deploy import (
    Deployment,
    Layout,
    SiteNode,
    default_sites,
    deployment_processes,
    node_status,
    round_sites,
    start_superlink,
    start_supernode,
    stop,
)
from simulations.launcher import LaunchResult


def _cfg(run_dir: Path) -> RunConfig:
    return RunConfig.from_flat({"preset": "smoke", "run-dir": str(run_dir)})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_line(path: Path, text: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} never appeared in {path}")


@pytest.mark.e2e
def test_certificates_name_only_loopback_and_private_keys_are_owner_only(tmp_path: Path) -> None:
    # Prepare / Execute
    certs = make_server_certificates(tmp_path / "certs")
    keys = make_site_keys(tmp_path / "keys", "hospital-a")
    # Assert: the server certificate is signed by the CA and names only the loopback
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert sorted(certificate_hosts(certs.server_cert)) == ["127.0.0.1", "localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    for key_file in (certs.ca_key, certs.server_key, keys.private_key):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # the site key pair is what Flower loads: an OpenSSH NIST P-384 key, public half matching
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    # an existing CA is never replaced silently; keys are kept (the SuperLink may have registered them)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_server_certificates(tmp_path / "certs")
    assert make_site_keys(tmp_path / "keys", "hospital-a").public_key.read_bytes() == keys.public_key.read_bytes()
    with pytest.raises(ValueError, match="site name"):
        make_site_keys(tmp_path / "keys", "../escape")


@pytest.mark.e2e
def test_two_sites_one_round_and_one_query_over_tls_with_authentication(tmp_path: Path) -> None:
    # Prepare: one federated round followed by one coordinator query (smoke: 4 candidates per site, 4 selected)
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path / "run"), "federation.al-every": 1})
    # Execute
    with Deployment(tmp_path / "dep") as dep:
        nodes = dep.start(default_sites(2))
        result = dep.run(cfg, echo=False, timeout_s=600)
    # Assert
    layout = dep.layout
    assert result.returncode == 0, result.log_file.read_text()[-3000:]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    assert (tmp_path / "run" / "checkpoints" / "round-001" / "sidecar.json").is_file()
    (record,) = _records(tmp_path / "run")
    assert sorted((s["name"], s["status"]) for s in record["sites"]) == [("site-0", "ok"), ("site-1", "ok")]
    assert {s["node_id"] for s in record["sites"]} == set(nodes.values())  # the registered identities trained
    assert round_sites(tmp_path / "run", nodes) == [{"site-0": "ok", "site-1": "ok"}]
    # the coordinator's query went over the same TLS links to both registered sites, and its selection was released
    query = record["active_learning"]
    assert sorted((s["name"], s["status"], s["candidates"]) for s in query["sites"]) == [
        ("site-0", "ok", 4), ("site-1", "ok", 4)]
    assert {s["node_id"] for s in query["sites"]} == set(nodes.values())
    assert query["candidates"] == 8 and query["selected"] == 4 == query["release_size"]
    meta = [json.loads(line) for line in (tmp_path / "run" / "release" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and {m["source_site"] for m in meta} <= {"site-0", "site-1"}
    for m in meta:
        assert (tmp_path / "run" / "release" / m["file_name"]).is_file()
        assert m["round"] == 1 and 0 < m["privacy"]["epsilon"] <= cfg.privacy.target_epsilon
    layout_logs = {site: layout.path("logs", f"supernode-{site}.log").read_text() for site in nodes}
    assert all("Receiving: query message" in text for text in layout_logs.values())
    superlink_log = layout.path("logs", "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in superlink_log
    for site, node in nodes.items():
        assert f"SuperNode ID: {node}" in layout.path("logs", f"supernode-{site}.log").read_text()
    assert deployment_processes(layout) == []
    assert not list(layout.path("pids").glob("*.pid"))


@pytest.mark.e2e
def test_unregistered_and_insecure_supernodes_are_refused(tmp_path: Path) -> None:
    # Prepare: a SuperLink with one registered site (the control), plus three intruders
    with Deployment(tmp_path / "dep") as dep:
        layout = dep.layout
        nodes = dep.start([SiteNode(0, "site-0")])
        make_site_keys(layout.path("keys"), "rogue")  # a valid key pair that the admin never registered
        # Execute
        rogue = start_supernode(layout, SiteNode(1, "rogue"), max_wait_time=20)
        plain = start_supernode(layout, SiteNode(2, "plain"), insecure=True, authenticate=False, max_wait_time=5)
        nokey = start_supernode(layout, SiteNode(3, "nokey"), authenticate=False, max_wait_time=5)
        codes = {name: proc.wait(timeout=60) for name, proc in (("rogue", rogue), ("plain", plain), ("nokey", nokey))}
        status = node_status(layout)
    # Assert: every intruder gave up, and the SuperLink knows only the registered site, online
    assert all(code != 0 for code in codes.values()), codes
    assert status == {nodes["site-0"]: "online"}
    superlink_log = layout.path("logs", "superlink.log").read_text()
    log = {n: layout.path("logs", f"supernode-{n}.log").read_text() for n in ("rogue", "plain", "nokey")}
    assert "No SuperNode found with the given public key" in superlink_log
    assert "Failed to activate SuperNode" in log["rogue"]
    assert "could not establish a connection" in log["plain"]  # plain HTTP against the TLS port
    assert "must be registered" in log["nokey"]  # TLS but no key: self-registration is disabled
    assert "SuperNode ID" not in log["rogue"] + log["plain"] + log["nokey"]
    assert deployment_processes(layout) == []


@pytest.mark.e2e
def test_a_killed_supernode_is_reported_missing_and_the_run_finishes(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg(tmp_path / "run")
    results: list[LaunchResult] = []
    with Deployment(tmp_path / "dep") as dep:
        nodes = dep.start(default_sites(2))
        runner = threading.Thread(target=lambda: results.append(dep.run(cfg, echo=False, timeout_s=600)))
        runner.start()
        # Execute: site-1 dies (SIGKILL, no goodbye) right after it received its training task
        _wait_for_line(dep.layout.path("logs", "supernode-site-1.log"), "Receiving: train message", timeout_s=300)
        dep.kill("site-1")
        runner.join(timeout=600)
    # Assert: the round ended with site-0's update and names site-1 as missing
    (result,) = results
    assert result.returncode == 0, result.log_file.read_text()[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "round-001").is_dir()
    assert round_sites(tmp_path / "run", nodes) == [{"site-0": "ok", "site-1": "missing"}]
    (record,) = _records(tmp_path / "run")
    assert any("Node Unavailable" in s["reason"] for s in record["sites"])  # the SuperLink's word for it
    evaluated = {s["name"]: s["evaluation"].get("num-examples", 0) for s in record["sites"] if s["evaluation"]}
    assert list(evaluated) == ["site-0"] and evaluated["site-0"] > 0  # evaluation went on with the survivor
    assert deployment_processes(dep.layout) == []


@pytest.mark.e2e
def test_superlink_binds_all_interfaces_and_advertises_a_certified_name(tmp_path: Path) -> None:
    # Prepare: a consortium SuperLink on every interface, dialled as "localhost" (a name in its certificate)
    layout = Layout(tmp_path / "dep")
    make_server_certificates(layout.path("certs"))
    # Execute / Assert: a wildcard bind needs the advertised name; a name outside the certificate is refused
    with pytest.raises(ValueError, match="--advertise"):
        start_superlink(layout, host="0.0.0.0")
    with pytest.raises(ValueError, match="not a name in the server certificate"):
        start_superlink(layout, host="0.0.0.0", advertise="hospital-net.example")
    try:
        start_superlink(layout, host="0.0.0.0", advertise="localhost")  # returns once /health answers over TLS
        address = layout.superlink_address()
        assert address.startswith("localhost:")
        assert f'address = "{address}"' in layout.path(".flwr", "config.toml").read_text()
    finally:
        stop(layout)
    assert deployment_processes(layout) == []
