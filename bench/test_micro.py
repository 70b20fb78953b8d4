"""pytest-benchmark of the hot functions the pyperf suite measures
(bench/pyperf_suite.py), inside pytest. Opt-in: it lives in bench/, not
tests/, so `make test` never collects it.

    make bench-micro          # .venv/bin/python -m pytest bench/test_micro.py --benchmark-only

Every test also checks the result it timed, so a broken hot path fails here
rather than producing a fast wrong number. None asserts on speed: speed is
judged by ratios in the same run (make perf-check), never by a timed test.
"""

from __future__ import annotations

import pytest
import uvloop

try:        # as part of the bench package (pytest, python -m bench....)
    from bench import fanout_socketpairs as fs, workloads as w
except ImportError:  # as a script: bench/ is sys.path[0]
    import fanout_socketpairs as fs
    import workloads as w
from fanout import _core
from fanout.protocol.auth import AuthError
from fanout.protocol.wire import FrameType, decode_message

MEMBERS = 1000
FRAME_BYTES = 2048
# A fan-out round is ~1,000 syscalls; a fixed count keeps the test short.
FANOUT_ROUNDS = 60


@pytest.fixture(scope="module")
def stream() -> tuple[bytes, int]:
    return w.batch_stream()


def test_batch_build_compress(benchmark):
    msgs = w.corpus()
    frame = benchmark(w.build_batch, msgs)
    frames, used = _core.parse_frames(frame, 1 << 24)
    assert used == len(frame) and len(frames) == 1
    ftype, flags, body = frames[0]
    assert ftype == FrameType.BATCH and flags & 1, "a 200-message batch is lz4-compressed"
    batch = decode_message(ftype, body)
    assert [m.payload for m in batch.messages] == [m.payload for m in msgs]


def test_fanout_1000_socketpairs(benchmark):
    loop = uvloop.new_event_loop()
    eng = fs.EngineFanout(loop, MEMBERS, FRAME_BYTES)
    try:
        loop.run_until_complete(eng.run(1))       # warm-up; checks the frame bytes
        pending: list[bytes] = []

        def setup():
            # Untimed between rounds: drain the peers of the previous round.
            if pending:
                loop.run_until_complete(eng.settle(pending.pop()))
            return (eng.next_record(),), {}

        def one_round(record: bytes) -> None:
            eng.publish_flush(record)
            pending.append(record)

        benchmark.pedantic(one_round, setup=setup, rounds=FANOUT_ROUNDS, warmup_rounds=1)
        if pending:
            loop.run_until_complete(eng.settle(pending.pop()))
        eng.check_sent()
        assert not eng.failures
    finally:
        eng.close()
        loop.close()
    benchmark.extra_info["writes_per_round"] = MEMBERS


def test_naive_fanout_1000_socketpairs(benchmark):
    naive = fs.NaiveFanout(MEMBERS, FRAME_BYTES)
    try:
        naive.run(1)
        first = [True]

        def setup():
            if not first[0]:
                naive.settle()
            first[0] = False
            return (), {}

        benchmark.pedantic(naive.send_all, setup=setup, rounds=FANOUT_ROUNDS, warmup_rounds=1)
        naive.settle()
        assert naive.short_writes == naive.eagain == 0
    finally:
        naive.close()
    benchmark.extra_info["writes_per_round"] = MEMBERS


def test_frame_decode(benchmark, stream):
    data, count = stream
    frames = benchmark(w.decode_core, data)
    assert len(frames) == count
    assert all(f[0] == FrameType.BATCH for f in frames)


def test_frame_decode_wire(benchmark, stream):
    data, count = stream
    frames = benchmark(w.decode_wire, data)
    assert frames == w.decode_core(data)
    assert len(frames) == count


def test_frame_decode_chat(benchmark):
    data, count = w.chat_stream()
    frames = benchmark(w.decode_core, data)
    assert frames == w.decode_wire(data) and len(frames) == count


def test_frame_decode_chat_wire(benchmark):
    data, count = w.chat_stream()
    frames = benchmark(w.decode_wire, data)
    assert len(frames) == count
    assert {f[0] for f in frames} == {FrameType.CHAT, FrameType.PING}


def test_auth_verify(benchmark):
    token = w.auth_token()
    claims = benchmark(w.verify, token)
    assert claims.user == "u48213377" and claims.may_join(w.ROOM)
    # The token timed above is really checked: a changed signature is refused.
    bad = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(AuthError):
        w.verify(bad)
