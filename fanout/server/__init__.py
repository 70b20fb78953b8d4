"""The connector: one node's client port, sessions, rooms and broadcast hub,
overload control, admin API and metrics.

:mod:`.app` is the composition root that wires them; start there.
"""
