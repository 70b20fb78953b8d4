"""The load generator's TLS viewers (fanout load --transport tls / wss): real
handshakes with a node's TLS ports (certificates from `fanout cert`), every
delivery counted and checked as over TCP, and the refusals a viewer must
tell apart: an untrusted certificate, a wrong name, plaintext on the port."""

from __future__ import annotations

import time

import pytest

from conftest import SECRET, dev_certs
from fanout.load import LoadConfig, build_viewers, plan, run


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return dev_certs(tmp_path_factory, "tls")


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    return dev_certs(tmp_path_factory, "other")


@pytest.fixture
def tls_node(start_node, certs):
    return start_node("--log-level", "WARNING", "--tls-port", "0", "--wss-port", "0",
                      "--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tls", "wss"])
def test_tls_load_against_node_counts_every_delivery(tls_node, certs, transport):
    node = tls_node
    port = node.tls_port if transport == "tls" else node.wss_port
    result = run(LoadConfig(
        host="127.0.0.1", port=port, transport=transport, tls_ca=str(certs / "ca.pem"),
        tls_server_name="localhost", admin_port=node.admin_port, api_key=node.api_key,
        secret=SECRET, viewers=120, rooms=2, processes=1, rate=400, warmup=0.5,
        duration=2.0, decode_every=10, node_pid=node.proc.pid, progress=False))
    accepted = result["published"]["accepted"]
    assert accepted >= 600
    assert result["expected_deliveries"] == accepted * 60
    assert result["deliveries"] == result["expected_deliveries"]
    assert result["viewers_joined"] == 120 and result["errors"] == {}
    assert result["gaps"] == result["reorders"] == result["divergences"] == 0
    assert result["check"]["verified_viewers"] == 120
    assert result["ok"] is True


def _settle(cfg: LoadConfig):
    """Run the viewers until each has joined or ended; (stats, ends)."""
    viewers = build_viewers(plan(cfg)[0])
    viewers.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = viewers.stats()
        if stats["done"] + stats["joined"] >= cfg.viewers:
            break
        viewers.run_for(0.05)
    stats, ends = viewers.stats(), viewers.ends()
    viewers.close()
    return stats, ends


@pytest.mark.timeout(60)
def test_tls_viewers_refuse_untrusted_certificates_and_wrong_names(tls_node, certs,
                                                                   other_certs):
    node = tls_node
    # another CA: the node's certificate does not chain to it
    stats, ends = _settle(LoadConfig(host="127.0.0.1", port=node.tls_port, transport="tls",
                                      tls_ca=str(other_certs / "ca.pem"), secret=SECRET,
                                      viewers=2, rate=0))
    assert ends == {"tls:0": 2} and stats["retries"] == 0 and stats["joined"] == 0
    assert list(stats["tls_errors"]) == ["certificate verify failed"], stats["tls_errors"]
    # the right CA, a name the certificate does not hold
    stats, ends = _settle(LoadConfig(host="127.0.0.1", port=node.wss_port, transport="wss",
                                      tls_ca=str(certs / "ca.pem"),
                                      tls_server_name="example.org", secret=SECRET,
                                      viewers=2, rate=0))
    assert ends == {"tls:0": 2} and stats["tls_errors"] == {"certificate verify failed": 2}
    # and without a CA the certificate is not checked: they join
    stats, _ = _settle(LoadConfig(host="127.0.0.1", port=node.tls_port, transport="tls",
                                   tls_server_name="example.org", secret=SECRET, viewers=2,
                                   rate=0))
    assert stats["joined"] == 2 and stats["tls_handshakes"] == 2


@pytest.mark.timeout(60)
def test_tls_viewers_on_a_plaintext_port_fail_clearly(tls_node):
    stats, ends = _settle(LoadConfig(host="127.0.0.1", port=tls_node.port, transport="tls",
                                      secret=SECRET, viewers=2, rate=0))
    assert stats["joined"] == 0 and stats["tls_failures"] >= 2
    assert all(key.startswith("tls:") for key in ends), ends
