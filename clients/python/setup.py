"""Build fanout-im-client: the SDK's modules, copied from the repository's
fanout/ package at build time (so there is one copy of the source), and
fanout_pb2 generated from fanout.proto with grpcio-tools.

An sdist carries the staged copy (src/), so it builds without the rest of
the repository.
"""

import pathlib
import shutil

from setuptools import setup

HERE = pathlib.Path(__file__).parent.resolve()
REPO = HERE.parent.parent / "fanout"
STAGE = HERE / "src" / "fanout"

#: The client's modules and data, relative to the fanout package: what
#: fanout.client imports, and nothing of the node (tests check the list).
#: Every module of fanout/client/ comes along (CLIENT_GLOB), so a new one
#: of the SDK needs no edit here.
CLIENT_GLOB = "client/*.py"
FILES = [
    "__init__.py",
    "py.typed",
    "protocol/__init__.py",
    "protocol/errors.py",
    "protocol/wire.py",
    "protocol/fanout.proto",
]


def stage() -> None:
    if not REPO.is_dir():          # building from an sdist: src/ is there already
        return
    if STAGE.exists():
        shutil.rmtree(STAGE)
    names = FILES + sorted(str(p.relative_to(REPO)) for p in REPO.glob(CLIENT_GLOB))
    for name in names:
        (STAGE / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, STAGE / name)
    for dictionary in (REPO / "protocol").glob("lz4dict-*.bin"):
        shutil.copy2(dictionary, STAGE / "protocol" / dictionary.name)
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    proto_dir = STAGE / "protocol"
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}",
                      f"--python_out={proto_dir}", f"--pyi_out={proto_dir}",
                      str(proto_dir / "fanout.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed on fanout.proto (exit {rc})")


stage()
setup(
    package_dir={"": "src"},
    packages=["fanout", "fanout.client", "fanout.protocol"],
    package_data={"fanout": ["py.typed"], "fanout.protocol": ["*.proto", "*.pyi", "lz4dict-*.bin"]},
)
