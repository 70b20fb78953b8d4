"""The client-only distribution (clients/python, fanout-im-client): a pure
Python wheel of the SDK that works against a real node with none of the
node's packages importable, the distribution names in pyproject.toml, and
the node package's build (quiet, with the demo page in it)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from conftest import token

ROOT = Path(__file__).resolve().parent.parent

#: What the client must never need (the node's packages and the core).
NOT_NEEDED = ("fanout._core", "fanout._loadgen", "fanout.server", "uvloop", "aiohttp",
              "prometheus_client", "jwt", "rich", "cryptography", "h11")

PROGRAM = f"""
import asyncio, sys

class Refuse:
    # Any of these imported anywhere fails the run.
    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in {NOT_NEEDED!r}):
            raise ImportError("the client must not need " + name)

sys.meta_path.insert(0, Refuse())
import fanout
from fanout.client import Client

async def main(port, token):
    async with Client("127.0.0.1", port, token) as client:
        await client.join("lobby")
        await client.say("lobby", "from the client wheel")
        async for event in client:
            print(fanout.__file__, event.sender, event.payload.decode())
            return

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def test_the_client_wheel_is_pure_python_and_talks_to_a_node(tmp_path, node):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                          "--no-build-isolation", "-w", str(tmp_path / "wheels"),
                          str(ROOT / "clients" / "python")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    assert wheel.name.startswith("fanout_im_client-") and wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        zf.extractall(tmp_path / "site")
    modules = {n for n in names if n.startswith("fanout/")}
    assert "fanout/client/sdk.py" in modules and "fanout/protocol/fanout_pb2.py" in modules
    assert not [n for n in modules if n.endswith((".so", ".pyx", ".pxd"))]
    assert not [n for n in modules if n.startswith(("fanout/server/", "fanout/load/"))]
    requires = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:"))
    assert [r.split(">")[0] for r in requires] == ["lz4", "protobuf"], requires

    run = subprocess.run([sys.executable, "-c", PROGRAM, str(node.port), token("wheel-user")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    where, sender, text = run.stdout.strip().split(" ", 2)
    assert where.startswith(str(tmp_path / "site")), where    # the wheel's copy, not the repo's
    assert (sender, text) == ("wheel-user", "from the client wheel")


def test_distribution_names_and_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    # "fanout" on PyPI is another project; the import name stays fanout.
    assert project["name"] == "fanout-im" and client["name"] == "fanout-im-client"
    assert client["version"] == project["version"]
    # The node's install is lean: no tool, test or bench package in it.
    deps = " ".join(project["dependencies"])
    for extra_only in ("rich", "cryptography", "pytest", "numpy", "nats"):
        assert extra_only not in deps, extra_only
    assert set(project["optional-dependencies"]) >= {"tools", "test", "bench", "cluster"}


def test_the_node_package_builds_without_warnings_and_ships_the_demo_page(tmp_path):
    """`make run` and `pip install .` build the package: setuptools' warning
    that the demo's static files "would be ignored" (a folder it could
    import that the package list lacked) alarmed every new user's install."""
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "would be ignored" not in out.stderr and "absent from" not in out.stderr, out.stderr
    shipped = {p.name for p in (tmp_path / "fanout" / "demo" / "static").iterdir()}
    assert shipped == {p.name for p in (ROOT / "fanout" / "demo" / "static").iterdir()}
