"""The structure holds: no import cycles among the server's modules, each
layer imports only the layers below it, and the overload controller works
with no sockets or loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fanout.server.overload import CALM_SECONDS, OverloadControl

PACKAGE = Path(__file__).resolve().parent.parent / "fanout"

#: What each layer may import from the others (besides itself).
ALLOWED = {
    "protocol": set(),
    "cluster": {"protocol"},
    "bus": {"protocol", "cluster"},
    "logic": {"protocol", "bus", "cluster", "_core"},
    "router": {"protocol", "cluster", "logic"},
    "client": {"protocol"},
    "server": {"protocol", "bus", "logic", "cluster", "_core"},
    "load": {"protocol", "_loadgen", "_core"},
    # A tool on top of everything: it embeds a node and a client; nothing imports it.
    "demo": {"protocol", "client", "server"},
}


def _imports(path: Path, package: str) -> set[str]:
    """Modules of fanout that ``path`` (the module ``package``) imports, as
    dotted names."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("fanout"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fanout"))
    return found


def _modules(layer: str) -> dict[str, Path]:
    return {f"fanout.{layer}.{p.stem}": p for p in (PACKAGE / layer).glob("*.py")
            if p.stem != "__init__"}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_the_layers_below(layer):
    for name, path in _modules(layer).items():
        for module in _imports(path, name):
            parts = module.split(".")
            if len(parts) > 1 and parts[1] != layer:
                assert parts[1] in ALLOWED[layer], f"{name} imports {module}"


def test_no_import_cycles_among_server_modules():
    modules = _modules("server")
    graph = {name: {m for m in _imports(path, name) if m in modules} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in graph[name]:
            visit(dep, trail + [name])
        state[name] = 2

    for name in graph:
        visit(name, [])


def test_overload_steps_up_at_once_and_down_slowly():
    changes = []
    control = OverloadControl(lag_degraded_ms=20, lag_overloaded_ms=100,
                              backlog_degraded_bytes=1000, on_change=changes.append)
    for lag in (0.001, 0.002, 0.003):
        control.add_lag(lag)
    assert control.tick(0) == 0 and control.loop_lag == pytest.approx(0.002)
    for lag in (0.001, 0.3, 0.3, 0.3):          # most probes very late: overloaded
        control.add_lag(lag)
    assert control.tick(0) == 2 and changes == [2]
    for _ in range(CALM_SECONDS - 1):
        assert control.tick(0) == 2             # no samples: no lag, but not calm long enough
    assert control.tick(0) == 1 and changes == [2, 1]
    assert control.update(0.0, 5000) == 1       # a write backlog keeps it degraded
    for _ in range(CALM_SECONDS):
        control.update(0.0, 0)
    assert control.level == 0 and changes == [2, 1, 0]
    control.add_lag(0.05)
    assert control.tick(0) == 1                 # degraded, not overloaded


def test_client_input_does_not_raise_the_level():
    """Issue 8 item 8: loop lag explained by client input (an attacker's ping
    flood) leaves the level alone; the same lag from the node's own work
    (flushes) raises it. Raw lag is still reported."""
    changes = []
    control = OverloadControl(lag_degraded_ms=20, lag_overloaded_ms=100,
                              backlog_degraded_bytes=1000, on_change=changes.append)
    for _ in range(10):                         # a saturated loop, all of it client input
        control.add_input(0.4)
        control.add_lag(0.3)
    assert control.tick(0) == 0 and changes == []
    assert control.loop_lag == pytest.approx(0.3) and control.work_lag == 0.0
    for _ in range(10):                         # half of the lateness is the node's own
        control.add_input(0.15)
        control.add_lag(0.3)
    assert control.tick(0) == 2 and changes == [2]
    assert control.work_lag == pytest.approx(0.15)


def test_timed_input_adds_the_callback_time_even_when_it_raises():
    import time

    from fanout.server.overload import TimedInput

    control = OverloadControl(lag_degraded_ms=20, lag_overloaded_ms=100,
                              backlog_degraded_bytes=1000, on_change=lambda level: None)
    TimedInput(lambda: time.sleep(0.02), control)()

    def boom():
        time.sleep(0.02)
        raise RuntimeError("handler bug")
    with pytest.raises(RuntimeError):
        TimedInput(boom, control)()
    assert 0.04 <= control.input_time < 0.5
    control.add_lag(0.05)                       # the lag is all input: no work lag
    control.tick(0)
    assert control.work_lag == pytest.approx(0.01, abs=0.011) and control.level == 0


def test_timed_input_counts_neither_input_before_the_probe_nor_own_flushes():
    """Review of item 8: input handled before the next lag probe was due did
    not delay it, and a flush run inside a read callback (a chat filling a
    batch) is the node's own work: neither is discounted from the lag."""
    import time

    from fanout.server.overload import TimedInput

    control = OverloadControl(lag_degraded_ms=20, lag_overloaded_ms=100,
                              backlog_degraded_bytes=1000, on_change=lambda level: None)
    control.probe_due = time.monotonic() + 60          # the probe is not due yet
    TimedInput(lambda: time.sleep(0.02), control)()
    assert control.input_time == 0.0
    control.probe_due = 0.0
    flushed = [0.0]

    def chat_that_flushes():
        time.sleep(0.01)                                # input handling
        flushed[0] += 0.03                              # the hub's flush clock moves
        time.sleep(0.03)                                # ... by the flush it ran
    control.work_clock = lambda: flushed[0]
    TimedInput(chat_that_flushes, control)()
    assert 0.005 <= control.input_time < 0.03
