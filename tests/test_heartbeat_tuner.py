"""The adaptive heartbeat's rules (fanout/client/heartbeat.py), step by
step, without a network: the search itself runs against a node through an
impaired link in tests/test_weak_network.py."""

from __future__ import annotations

import json

from fanout.client.heartbeat import HeartbeatStore, HeartbeatTuner


def test_steps_up_backs_off_to_the_last_good_and_locks():
    tuner = HeartbeatTuner(HeartbeatStore(), "wifi", step_after=2, step_factor=2, start_ms=1000)
    assert tuner.request_ms() == 2000                 # searching: the step after start_ms
    assert tuner.granted(60_000, 500, 60_000) == 1.0  # starts at start_ms, not the grant
    assert tuner.request_ms() == 2000
    assert tuner.probe_answered(1000, 60_000) == 1.0
    assert tuner.probe_answered(1000, 60_000) == 2.0  # two answered: one step up
    assert tuner.probe_answered(1000, 60_000) == 2.0  # a late probe of the old level: no count
    tuner.probe_answered(2000, 60_000)
    tuner.probe_answered(2000, 60_000)
    assert tuner.interval_ms == 4000 and tuner.good_ms == 2000
    tuner.dead_link()
    assert (tuner.interval_ms, tuner.locked) == (2000, True)
    assert tuner.request_ms() == 2000                 # locked: ask for what was found
    for _ in range(5):
        tuner.probe_answered(2000, 60_000)
    assert tuner.interval_ms == 2000                  # no more stepping up
    tuner.dead_link()                                 # the network changed its mind
    assert tuner.interval_ms == 1000
    tuner.dead_link()
    assert tuner.interval_ms == 500                   # never below the node's minimum
    tuner.dead_link()
    assert tuner.interval_ms == 500


def test_start_and_steps_stay_within_the_node_bounds():
    tuner = HeartbeatTuner(HeartbeatStore(), "", step_after=1, step_factor=10, start_ms=20_000)
    assert tuner.granted(10_000, 1000, 30_000) == 10.0     # pings no rarer than granted
    assert tuner.interval_ms == 20_000
    tuner.probe_answered(20_000, 30_000)
    assert tuner.interval_ms == 30_000                     # capped at the maximum
    low = HeartbeatTuner(HeartbeatStore(), "", start_ms=100)
    low.granted(20_000, 5000, 300_000)
    assert low.interval_ms == 5000                         # raised to the minimum


def test_the_store_keeps_each_network_in_a_json_file(tmp_path):
    path = tmp_path / "hb.json"
    store = HeartbeatStore(str(path))
    home = HeartbeatTuner(store, "wifi:home", step_after=1, start_ms=1000)
    home.granted(1000, 100, 10_000)
    home.probe_answered(1000, 10_000)
    home.dead_link()
    assert json.loads(path.read_text()) == {
        "wifi:home": {"interval_ms": 1000, "good_ms": 1000, "locked": True}}
    again = HeartbeatTuner(HeartbeatStore(str(path)), "wifi:home")
    assert (again.interval_ms, again.good_ms, again.locked) == (1000, 1000, True)
    assert HeartbeatTuner(HeartbeatStore(str(path)), "cell").interval_ms == 0
    path.write_text("{not json")
    assert HeartbeatStore(str(path)).get("wifi:home") is None   # unreadable: start afresh


def test_a_searching_hello_asks_for_the_next_step_and_a_step_stops_at_the_grant():
    """The node's idle cut follows what a searching client may do next: the
    Hello asks for the current interval times the step (not the node's
    maximum), the search never pings more rarely than granted, and the
    next connection asks for the step this one could not take."""
    tuner = HeartbeatTuner(HeartbeatStore(), "cell", step_after=1, step_factor=1.5,
                           start_ms=20_000)
    assert tuner.request_ms() == 30_000                # 20 s x 1.5, bounds unknown
    # The node grants what was asked (within 5 s .. 300 s).
    assert tuner.granted(30_000, 5000, 300_000) == 20.0
    assert tuner.probe_answered(20_000, 30_000) == 30.0     # one step: up to the grant
    assert tuner.probe_answered(30_000, 30_000) == 30.0     # the next (45 s) waits
    assert (tuner.interval_ms, tuner.good_ms) == (30_000, 30_000)
    assert tuner.request_ms() == 45_000                # ... for the next connection's Hello
    assert tuner.granted(45_000, 5000, 300_000) == 30.0
    assert tuner.probe_answered(30_000, 45_000) == 45.0
    # Near the maximum the request stops there, and a dead link locks at
    # the last interval that held, which the Hello then asks for.
    tuner.interval_ms = 250_000
    assert tuner.request_ms() == 300_000
    tuner.dead_link()
    assert tuner.locked and tuner.request_ms() == tuner.interval_ms == 30_000
