"""The adaptive heartbeat's rules (fanout/client/heartbeat.py), step by
step, without a network: the search itself runs against a node through an
impaired link in tests/test_weak_network.py."""

from __future__ import annotations

import json

from fanout.client.heartbeat import HeartbeatStore, HeartbeatTuner


def test_steps_up_backs_off_to_the_last_good_and_locks():
    tuner = HeartbeatTuner(HeartbeatStore(), "wifi", step_after=2, step_factor=2, start_ms=1000)
    assert tuner.request_ms() == 0xFFFFFFFF           # searching, bounds unknown: ask the most
    assert tuner.granted(60_000, 500, 60_000) == 1.0  # starts at start_ms, not the grant
    assert tuner.request_ms() == 60_000
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
