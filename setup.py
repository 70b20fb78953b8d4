"""Build fanout's compiled core (pyx/ -> fanout._core) and its protobuf module.

Build switches (environment variables), in the style of uvloop/asyncpg:
  FANOUT_DEBUG=1     C asserts on (FANOUT_DEBUG macro), -O0 -g, Cython
                     linetrace + profiling hooks, bounds checks.
  FANOUT_ANNOTATE=1  write Cython's HTML annotation next to the sources.
  FANOUT_SLOW=1      a deliberately slowed core (busy work per recipient write),
                     used only to show that `make perf-check` catches a
                     regression; never for real use.
"""

import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).parent.resolve()
PROTO_DIR = HERE / "fanout" / "protocol"
MIN_CYTHON = (3, 0)


def _flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def generate_protobuf():
    """fanout/protocol/*.proto -> *_pb2.py (+ .pyi), with protoc from
    grpcio-tools, a build requirement; each regenerated when its .proto is
    newer. fanout.proto is the client wire protocol, cluster.proto the
    messages between nodes and routers."""
    for src in sorted(PROTO_DIR.glob("*.proto")):
        out = PROTO_DIR / (src.stem + "_pb2.py")
        if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        from grpc_tools import protoc
        import grpc_tools

        include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main([
            "protoc", f"-I{PROTO_DIR}", f"-I{include}",
            f"--python_out={PROTO_DIR}", f"--pyi_out={PROTO_DIR}", str(src),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed on {src} (exit {rc})")


class BuildPy(build_py):
    def run(self):
        generate_protobuf()
        super().run()


def extensions():
    import Cython
    from Cython.Build import cythonize

    version = tuple(int(p) for p in Cython.__version__.split(".")[:2])
    if version < MIN_CYTHON:
        raise SystemExit(f"Cython >= {MIN_CYTHON} needed, found {Cython.__version__}")

    debug = _flag("FANOUT_DEBUG")
    macros = [("CYTHON_TRACE_NOGIL", "1"), ("FANOUT_DEBUG", "1")] if debug else [("NDEBUG", "1")]
    if _flag("FANOUT_SLOW"):
        macros.append(("FANOUT_SLOW", "1"))
    cflags = ["-O0", "-g3", "-UNDEBUG"] if debug else ["-O2"]
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": False,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
        "linetrace": debug,
        "profile": debug,
    }
    # One extension per top-level .pyx: the core, and (when present) the
    # load generator, which lives in the package so `fanout load` ships.
    modules = {"fanout._core": "pyx/core/_core.pyx", "fanout._loadgen": "pyx/loadgen/_loadgen.pyx"}
    # C headers with bodies (the core's writer threads) sit beside the .pyx
    # that uses them; `depends` rebuilds the module when one changes.
    exts = [Extension(name, [src], include_dirs=["pyx/includes", str(pathlib.Path(src).parent)],
                      depends=[str(h) for h in (HERE / src).parent.glob("*.h")],
                      # the core's TLS layer (pyx/core/tls.pyx, tlsio.h): OpenSSL
                      libraries=["ssl", "crypto"],
                      define_macros=macros, extra_compile_args=cflags)
            for name, src in modules.items() if (HERE / src).exists()]
    # cythonize regenerates a .c only when it is older than its sources, not
    # when the directives change: debug and release C each need a directory.
    return cythonize(exts, compiler_directives=directives,
                     annotate=_flag("FANOUT_ANNOTATE"),
                     include_path=[".", "pyx/includes", "pyx/core", "pyx/loadgen"],
                     build_dir="build/cython-debug" if debug else "build/cython")


generate_protobuf()
setup(ext_modules=extensions(), cmdclass={"build_py": BuildPy})
