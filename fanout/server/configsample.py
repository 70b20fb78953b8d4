"""``fanout config --sample``: every node setting as a commented TOML file.

Generated from :class:`~fanout.server.config.NodeConfig`, so the sample
always names every setting with its current default and doc. Each setting
is a commented ``# name = default`` line: uncomment what you change. The
secrets are left out of it on purpose: they belong in the environment
(``FANOUT_SECRET``, ``FANOUT_API_KEY``), not in a file others may read.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap

from .config import NodeConfig

#: Settings the sample never writes a value for (see the module's doc).
SECRETS = ("secret", "api_key")

HEADER = """\
# fanout node configuration (TOML), written by `fanout config --sample`.
#
#   fanout node --config node.toml
#
# Precedence: defaults, then this file, then FANOUT_* environment variables
# (FANOUT_PORT=7000), then command-line flags (--port 7000). Every setting is
# listed with its default, commented out: uncomment the ones you change.
# `fanout node --help` lists the same settings; docs/operations.md explains
# them. Off loopback a node needs FANOUT_SECRET (the token secret) and, with
# its admin API, FANOUT_API_KEY: keep both in the environment (systemd
# EnvironmentFile=, a container's secrets), not here.

[node]
"""


def _value(value) -> str:
    # JSON strings are TOML basic strings; ints and floats print alike.
    return json.dumps(value) if isinstance(value, str) else repr(value)


def sample() -> str:
    """The sample file's text."""
    out = [HEADER]
    for f in dataclasses.fields(NodeConfig):
        doc = textwrap.wrap(f.metadata["doc"], 76)
        out.extend(f"# {line}" for line in doc)
        if f.name in SECRETS:
            out.append(f"# ({f.name}: set FANOUT_{f.name.upper()} in the environment)")
        else:
            out.append(f"# {f.name} = {_value(f.default)}")
        out.append("")
    return "\n".join(out)
