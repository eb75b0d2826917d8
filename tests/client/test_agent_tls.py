"""The agent over TLS: --ca verifies the coordinator; a coordinator it cannot verify is not trusted."""

from __future__ import annotations

import datetime
import ipaddress
import random
import threading
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_fleet import FakeFleet

from tinyfleet.client.agent import Agent, AgentConfig
from tinyfleet.client.connection import read_ca
from tinyfleet.client.descriptions import minimal_description
from tinyfleet.client.state_dir import StateDir


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer, *, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def throwaway_pki(directory: Path, name: str) -> tuple[Path, bytes, bytes]:
    """A CA file, and the server's key and certificate (PEM) signed by that CA."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tinyfleet test CA")])
    ca_cert = _cert("tinyfleet test CA", ca_key, ca_name, ca_key, ca=True)
    server_cert = _cert("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    ca_path = directory / f"{name}-ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_path, key_pem, server_cert.public_bytes(serialization.Encoding.PEM)


def run_agent(fleet: FakeFleet, state: Path, root_certificates: bytes) -> tuple[Agent, threading.Thread]:
    config = AgentConfig(
        server=fleet.address,
        state_dir=StateDir(state),
        description=minimal_description("pi-tls", ram_kb=1024, flash_kb=4096, cpu="armv8"),
        data_spec="sine:seed=2",
        root_certificates=root_certificates,
        backoff_base_s=0.05,
        backoff_cap_s=0.1,
    )
    agent = Agent(config, rng=random.Random(0))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread


def test_agent_connects_over_tls_only_to_a_coordinator_its_ca_vouches_for(tmp_path: Path) -> None:
    ca_path, key_pem, cert_pem = throwaway_pki(tmp_path, "fleet")
    other_ca, _, _ = throwaway_pki(tmp_path, "other")
    fleet = FakeFleet(tls=grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    fleet.start()
    try:
        stranger, stranger_thread = run_agent(fleet, tmp_path / "stranger", read_ca(other_ca))
        agent, thread = run_agent(fleet, tmp_path / "state", read_ca(ca_path))
        try:
            conn = fleet.wait_connections(1)
            assert conn.hello.device_id == "urn:tinyfleet:device:pi-tls"
            conn.wait_for("heartbeat")
            deadline = time.monotonic() + 10
            while stranger.backoff.attempt < 3:  # it keeps failing the handshake and backing off
                assert time.monotonic() < deadline, "the agent trusting another CA stopped retrying"
                time.sleep(0.05)
            # ... and never got as far as registering.
            assert len(fleet.registrations) == 1 and len(fleet.connections) == 1
        finally:
            for running, running_thread in ((agent, thread), (stranger, stranger_thread)):
                running.stop()
                running_thread.join(10)
                assert not running_thread.is_alive()
    finally:
        fleet.stop()
