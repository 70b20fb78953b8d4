"""The load tool, ``fanout load``: a fleet of viewer processes (the C engine
in ``fanout._loadgen``), a publisher, verification and the report."""

from .run import LoadConfig, LoadError, build_viewers, plan, run

__all__ = ["LoadConfig", "LoadError", "run", "plan", "build_viewers"]
