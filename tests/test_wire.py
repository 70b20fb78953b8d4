"""Tests of the pure-Python reference codec (fanout/protocol/wire.py) against the
shared test vectors and with property-based fuzzing."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import lz4.block
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.protocol import wire
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.wire import FrameDecoder, FrameType, WireError, decode_message, encode_frame

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "frames.json").read_text(encoding="utf-8")
)
VALID = VECTORS["valid"]
INVALID = VECTORS["invalid"]
HEADER = struct.Struct(">BBBBI")


def by_name(vectors):
    return pytest.mark.parametrize("vec", vectors, ids=[v["name"] for v in vectors])



def decode_one(frame: bytes, max_body: int = wire.MAX_SERVER_FRAME):
    frames = FrameDecoder(max_body).feed(frame)
    assert len(frames) == 1
    return frames[0]


def feed_in_chunks(data: bytes, cuts, max_body: int = wire.MAX_SERVER_FRAME):
    """Feed `data` split at the sorted offsets `cuts`; return all frames."""
    dec = FrameDecoder(max_body)
    frames = []
    start = 0
    for cut in list(cuts) + [len(data)]:
        frames += dec.feed(data[start:cut])
        start = cut
    assert dec.buffered == 0
    return frames


# ------------------------------------------------------------------ vectors


def test_vectors_cover_every_frame_type():
    assert {v["type"] for v in VALID} == {t.name for t in FrameType}
    assert any(v["compressed"] for v in VALID)
    assert {v["reason"] for v in INVALID} >= {
        "UNSUPPORTED_VERSION",
        "BAD_FRAME",
        "FRAME_TOO_LARGE",
        "BAD_COMPRESSION",
    }


@by_name(VALID)
def test_valid_vector_decodes(vec):
    frame = bytes.fromhex(vec["frame_hex"])
    ftype, flags, body = decode_one(frame)
    assert ftype == vec["type_code"] == FrameType[vec["type"]]
    assert bool(flags & wire.FLAG_LZ4) == vec["compressed"]
    assert bool(flags & wire.FLAG_DICT) == bool(vec["dictionary"])
    assert len(frame) == wire.HEADER_SIZE + HEADER.unpack_from(frame)[4]
    msg = decode_message(ftype, body)
    assert msg.DESCRIPTOR.full_name == vec["message_type"]
    assert json_format.MessageToDict(msg, preserving_proto_field_name=True) == vec["message"]
    expected_dir = (
        wire.CLIENT_TO_SERVER if vec["direction"] == "client_to_server" else wire.SERVER_TO_CLIENT
    )
    assert ftype in expected_dir


@by_name(VALID)
def test_valid_vector_reencodes(vec):
    frame = bytes.fromhex(vec["frame_hex"])
    msg = json_format.ParseDict(vec["message"], wire.MESSAGE_TYPES[FrameType[vec["type"]]]())
    ftype = FrameType[vec["type"]]
    if vec["compressed"]:
        # Compressed bytes depend on the lz4 implementation; the inflated
        # body must still be the canonical encoding.
        _, flags, body = decode_one(frame)
        assert body == msg.SerializeToString()
        again = encode_frame(ftype, msg, compress_min=1, dict_id=vec["dictionary"])
        assert again[2] == flags
        assert decode_one(again)[2] == body
    else:
        assert encode_frame(ftype, msg) == frame
        assert encode_frame(ftype, msg.SerializeToString()) == frame


@by_name([v for v in VALID if v["type"] == "BATCH"])
def test_batch_body_is_concatenated_records(vec):
    """A Batch body is nothing but `0x0A varint(len) RoomMessage` records,
    which is what lets the node encode each message once."""
    _, _, body = decode_one(bytes.fromhex(vec["frame_hex"]))
    batch = pb.Batch.FromString(body)
    assert len(batch.messages) >= 3 or batch.sampled or vec["name"] == "batch_one_dict"
    records = b"".join(
        b"\x0a" + wire.encode_varint(len(rec)) + rec for rec in (m.SerializeToString() for m in batch.messages)
    )
    # A sampled batch ends with the flag (field 2 = 1) after the records.
    assert body == records + (b"\x10\x01" if batch.sampled else b"")
    assert {m.kind for m in pb.Batch.FromString(body).messages} >= (
        {pb.CHAT, pb.GIFT} if vec["name"] == "batch_mixed" else {pb.CHAT} if vec["name"].startswith("batch_lz4") else set()
    )


@by_name(INVALID)
def test_invalid_vector_raises(vec):
    dec = FrameDecoder(vec["max_body"])
    with pytest.raises(WireError) as err:
        dec.feed(bytes.fromhex(vec["frame_hex"]))
    assert err.value.reason == pb.Reason.Value(vec["reason"])
    assert vec["reason"] in str(err.value)
    # The decoder stays broken, whatever comes next.
    ping = encode_frame(FrameType.PING, pb.Ping(nonce=1))
    with pytest.raises(WireError) as again:
        dec.feed(ping)
    assert again.value.reason == err.value.reason


@by_name(INVALID)
def test_invalid_vector_raises_byte_by_byte(vec):
    dec = FrameDecoder(vec["max_body"])
    data = bytes.fromhex(vec["frame_hex"])
    with pytest.raises(WireError) as err:
        for i in range(len(data)):
            assert dec.feed(data[i : i + 1]) == []
    assert err.value.reason == pb.Reason.Value(vec["reason"])


# ------------------------------------------------------------------ stream splitting

STREAM_FRAMES = [bytes.fromhex(v["frame_hex"]) for v in VALID]
STREAM = b"".join(STREAM_FRAMES)
EXPECTED = [decode_one(f) for f in STREAM_FRAMES]


def test_many_frames_in_one_feed():
    assert FrameDecoder().feed(STREAM) == EXPECTED


def test_split_at_every_byte_boundary():
    for cut in range(len(STREAM) + 1):
        assert feed_in_chunks(STREAM, [cut]) == EXPECTED, f"split at {cut}"


def test_byte_by_byte():
    assert feed_in_chunks(STREAM, range(1, len(STREAM))) == EXPECTED


def test_partial_frame_is_kept():
    dec = FrameDecoder()
    frame = STREAM_FRAMES[0]
    assert dec.feed(frame[:-1]) == []
    assert dec.buffered == len(frame) - 1
    assert dec.feed(b"") == []
    assert dec.feed(frame[-1:] + frame) == [EXPECTED[0], EXPECTED[0]]
    assert dec.buffered == 0


# ------------------------------------------------------------------ encoder


def test_small_bodies_are_not_compressed():
    body = b"x" * (wire.DEFAULT_COMPRESS_MIN - 1)
    assert encode_frame(FrameType.BATCH, body)[2] == 0
    assert encode_frame(FrameType.BATCH, body + b"x")[2] == wire.FLAG_LZ4


def test_compression_disabled_and_threshold():
    body = b"y" * 10_000
    assert (
        encode_frame(FrameType.BATCH, body, compress_min=0)
        == HEADER.pack(1, 0x43, 0, 0, 10_000) + body
    )
    assert encode_frame(FrameType.BATCH, b"abab", compress_min=1)[2] == 0  # would grow


def test_incompressible_body_is_sent_plain():
    body = random.Random(1).randbytes(1000)  # lz4 would only add overhead
    frame = encode_frame(FrameType.BATCH, body)
    assert frame == HEADER.pack(1, 0x43, 0, 0, 1000) + body


def test_compressed_body_format():
    body = b"gift " * 100
    frame = encode_frame(FrameType.BATCH, body)
    version, ftype, flags, reserved, length = HEADER.unpack_from(frame)
    assert (version, ftype, flags, reserved) == (1, 0x43, wire.FLAG_LZ4, 0)
    payload = frame[wire.HEADER_SIZE :]
    assert len(payload) == length < len(body)
    assert struct.unpack_from("<I", payload)[0] == len(body)
    assert lz4.block.decompress(payload[4:], uncompressed_size=len(body)) == body


def test_encode_rejects_wrong_message_and_type():
    with pytest.raises(TypeError, match="Ping"):
        encode_frame(FrameType.HELLO, pb.Ping())
    with pytest.raises(ValueError):
        encode_frame(256, b"")
    with pytest.raises(ValueError):
        encode_frame(-1, b"")


# ------------------------------------------------------------------ decoder limits


def test_length_at_limit_is_accepted():
    body = b"z" * 100
    assert FrameDecoder(100).feed(encode_frame(0x43, body, compress_min=0)) == [(0x43, 0, body)]
    with pytest.raises(WireError) as err:
        FrameDecoder(99).feed(encode_frame(0x43, body, compress_min=0))
    assert err.value.reason == pb.FRAME_TOO_LARGE


def test_inflated_size_over_limit():
    frame = encode_frame(FrameType.BATCH, b"a" * 5000)
    assert frame[2] == wire.FLAG_LZ4 and len(frame) < 200
    with pytest.raises(WireError) as err:
        FrameDecoder(4999).feed(frame)
    assert err.value.reason == pb.BAD_COMPRESSION
    assert FrameDecoder(5000).feed(frame)[0][2] == b"a" * 5000


@pytest.mark.parametrize(
    "payload", [b"", b"\x01", b"\x01\x00\x00", b"\x00\x00\x00\x00", b"\x05\x00\x00\x00\xff"]
)
def test_short_or_broken_lz4_body(payload):
    frame = HEADER.pack(1, FrameType.BATCH, wire.FLAG_LZ4, 0, len(payload)) + payload
    with pytest.raises(WireError) as err:
        FrameDecoder().feed(frame)
    assert err.value.reason == pb.BAD_COMPRESSION


def test_unknown_frame_type_passes_the_decoder():
    frame = HEADER.pack(1, 0x7F, 0, 0, 3) + b"abc"
    assert FrameDecoder().feed(frame) == [(0x7F, 0, b"abc")]
    with pytest.raises(WireError) as err:
        decode_message(0x7F, b"abc")
    assert err.value.reason == pb.UNKNOWN_FRAME_TYPE


@pytest.mark.parametrize(
    "body",
    [
        b"\x0a\x05ab",  # length-delimited field runs past the end
        b"\x12\x02\xff\xfe",  # string field (device_id) that is not UTF-8
        b"\x08",  # varint field without its value
    ],
)
def test_bad_protobuf(body):
    with pytest.raises(WireError) as err:
        decode_message(FrameType.HELLO, body)
    assert err.value.reason == pb.BAD_PROTOBUF


@settings(max_examples=300, deadline=None)
@given(n=st.one_of(st.integers(1, 300), st.integers(1, 2**64 - 1)))
def test_encode_varint_matches_protobuf(n):
    # Ping.nonce is field 1, a uint64: tag 0x08 then protobuf's own varint.
    assert b"\x08" + wire.encode_varint(n) == pb.Ping(nonce=n).SerializeToString()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2**63, 2**64 - 1])
def test_encode_varint_edges(n):
    data = wire.encode_varint(n)
    assert len(data) == max(1, -(-n.bit_length() // 7))
    assert pb.Ping.FromString(b"\x08" + data).nonce == n


@pytest.mark.parametrize("n", [-1, 2**64])
def test_encode_varint_range(n):
    with pytest.raises(ValueError):
        wire.encode_varint(n)


def test_unknown_fields_are_ignored():
    body = pb.Ping(nonce=9).SerializeToString() + b"\xf8\x07\x01"  # field 127, varint 1
    assert decode_message(FrameType.PING, body).nonce == 9


# ------------------------------------------------------------------ properties

frame_specs = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=1500), st.sampled_from([0, 1, 64, 256])),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(specs=frame_specs, data=st.data())
def test_roundtrip_property(specs, data):
    stream = b"".join(encode_frame(t, b, compress_min=c) for t, b, c in specs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    frames = feed_in_chunks(stream, cuts)
    assert [(t, b) for t, _, b in frames] == [(t, b) for t, b, _ in specs]
    for (_, flags, _), (_, body, cmin) in zip(frames, specs, strict=True):
        assert flags in (0, wire.FLAG_LZ4)
        if flags:
            assert cmin and len(body) >= cmin


# Random data that often looks like a header, so the fuzzer gets past byte 0.
headerish = st.builds(
    lambda v, t, f, r, n, tail: HEADER.pack(v, t, f, r, n) + tail,
    st.sampled_from([1, 1, 1, 0, 2, 255]),
    st.integers(0, 255),
    st.sampled_from([0, 0, 1, 1, 2, 0x81]),
    st.sampled_from([0, 0, 0, 1]),
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    st.binary(max_size=80),
)


@settings(max_examples=500, deadline=None)
@given(
    chunks=st.lists(st.one_of(st.binary(max_size=200), headerish), max_size=6),
    max_body=st.sampled_from([0, 16, 65536, wire.MAX_SERVER_FRAME]),
)
def test_random_bytes_never_crash(chunks, max_body):
    dec = FrameDecoder(max_body)
    for chunk in chunks:
        try:
            frames = dec.feed(chunk)
        except WireError as exc:
            assert exc.reason in (
                pb.UNSUPPORTED_VERSION,
                pb.BAD_FRAME,
                pb.FRAME_TOO_LARGE,
                pb.BAD_COMPRESSION,
            )
            return
        for ftype, flags, body in frames:
            assert 0 <= ftype <= 255 and flags in (0, 1) and isinstance(body, bytes)
            assert len(body) <= max_body
            try:
                decode_message(ftype, body)
            except WireError as exc:
                assert exc.reason in (pb.UNKNOWN_FRAME_TYPE, pb.BAD_PROTOBUF)


@settings(max_examples=300, deadline=None)
@given(ftype=st.sampled_from(list(FrameType)), body=st.binary(max_size=100))
def test_decode_message_random_bodies(ftype, body):
    try:
        msg = decode_message(ftype, body)
    except WireError as exc:
        assert exc.reason == pb.BAD_PROTOBUF
    else:
        assert isinstance(msg, wire.MESSAGE_TYPES[ftype])
