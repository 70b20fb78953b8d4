"""Test harness shared by fanout's test suite and its benchmarks, shipped in
the package the way asyncpg ships ``asyncpg._testbase`` and uvloop
``uvloop._testbase``: one implementation of starting, watching and stopping
the processes they drive. Not an API for users of fanout."""

from fanout._testbase.process import NodeProcess, Proc

__all__ = ["NodeProcess", "Proc"]
