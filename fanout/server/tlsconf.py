"""The node's TLS setup: the core's TlsContext from config, which mode
connections will get, and the figures the node exports.

The record layer is the core's (pyx/core/tls.pyx, tlsio.h): OpenSSL's C
API, called from C for every recipient by the loop thread and the writer
threads alike, so no Python runs per recipient. ``tls_mode = "auto"`` asks
OpenSSL for kernel TLS (SSL_OP_ENABLE_KTLS): after the handshake the kernel
encrypts a connection's writes where it has the ``tls`` ULP and supports
the cipher; otherwise OpenSSL encrypts them in the core, with no other
difference. Which mode each connection got: ``Connection.tls_mode`` and the
``fanout_tls_connections_kernel``/``_core`` counters.
"""

from __future__ import annotations

import logging
import socket

from .. import _core
from .config import ConfigError, NodeConfig

log = logging.getLogger("fanout.tls")

TCP_ULP = getattr(socket, "TCP_ULP", 31)    # linux/tcp.h


def kernel_tls_available() -> tuple[bool, str]:
    """Whether this kernel takes the ``tls`` ULP on a TCP socket, and why
    not: tried on a loopback connection (which also loads the module where
    the kernel can load it), as OpenSSL will do after each handshake."""
    if not _core.ktls_built():
        return False, "this build's OpenSSL has no kernel TLS"
    try:
        with socket.create_server(("127.0.0.1", 0)) as server, \
                socket.create_connection(server.getsockname(), timeout=2) as client:
            accepted, _ = server.accept()
            accepted.close()
            client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        return False, f"the kernel has no tls ULP ({exc.strerror or exc})"
    return True, "the kernel has the tls ULP"


def make_context(config: NodeConfig) -> _core.TlsContext | None:
    """The node's TlsContext, or None when no TLS port is on. Logs which
    mode connections get; a certificate or key OpenSSL cannot use is a
    ConfigError."""
    if not config.tls_enabled:
        return None
    try:
        ctx = _core.TlsContext(config.tls_cert, config.tls_key, config.tls_mode)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.tls_mode == "core":
        log.info("TLS (%s): the core's OpenSSL encrypts (tls_mode core)",
                 _core.openssl_version())
    else:
        ok, why = kernel_tls_available()
        if ok:
            log.info("TLS (%s): kernel TLS where the cipher allows (%s), else the core's",
                     _core.openssl_version(), why)
        else:
            log.info("TLS (%s): the core's OpenSSL encrypts; kernel TLS unavailable: %s",
                     _core.openssl_version(), why)
    return ctx


def export_metrics(metrics) -> None:
    """Counters of TLS connections by mode and of failed handshakes
    (process-wide, counted by the core once per connection)."""

    def counters():
        stats = _core.tls_stats()
        yield ("fanout_tls_connections_kernel", "TLS connections whose writes the kernel "
               "encrypts (kernel TLS)", stats["kernel"])
        yield ("fanout_tls_connections_core", "TLS connections encrypted by the core's "
               "OpenSSL", stats["core"])
        yield ("fanout_tls_handshake_failures", "TLS handshakes that failed (bad "
               "certificate, wrong host name, not TLS, ...)", stats["failed"])
    metrics.add_counters(counters)
