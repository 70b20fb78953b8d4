#!/usr/bin/env python3
"""Write tests/vectors/frames.json: wire protocol v1 test vectors.

Every value is fixed, so running this twice gives the same file (as long as
the lz4 library compresses the same way; the compressed vector stays valid
either way, only its bytes could differ).

Usage::

    python scripts/make_vectors.py          # (re)write the file
    python scripts/make_vectors.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import struct
import sys

from generated import ROOT, write_or_check

sys.path.insert(0, str(ROOT))

from google.protobuf import json_format  # noqa: E402

from fanout.protocol import wire  # noqa: E402
from fanout.protocol import fanout_pb2 as pb  # noqa: E402
from fanout.protocol.wire import FrameType  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "frames.json"

#: The limit the invalid vectors are checked against (the node's default
#: client->server max_frame).
INVALID_MAX_BODY = 65536

TS = 1_700_000_000_000  # fixed "now" (unix ms) for every timestamp


def chat_message(seq: int, text: str, sender: str = "u1001") -> pb.RoomMessage:
    return pb.RoomMessage(
        room="live:42",
        seq=seq,
        kind=pb.CHAT,
        sender=sender,
        payload=json.dumps({"text": text}, separators=(",", ":")).encode(),
        server_ts_ms=TS + seq,
    )


def mixed_batch() -> pb.Batch:
    """Three messages of two kinds, one with non-ASCII text."""
    return pb.Batch(
        messages=[
            chat_message(1001, "hello"),
            pb.RoomMessage(
                room="live:42",
                seq=1002,
                kind=pb.GIFT,
                priority=2,
                sender="u2002",
                payload=b'{"gift":"rocket","count":1}',
                server_ts_ms=TS + 1002,
            ),
            chat_message(1003, "\u4f60\u597d", sender="u3003"),
        ]
    )


def gift_message() -> pb.RoomMessage:
    """One message alone, as a quiet room sends it: with the dictionary it
    compresses even by itself."""
    return pb.RoomMessage(
        room="live:42",
        seq=77,
        kind=pb.GIFT,
        sender="gift-svc",
        payload="星星 sent rocket x10 lol 😂😂".encode(),
        server_ts_ms=TS + 77,
    )


#: Vectors compressed with a pre-shared dictionary, by name: the dictionary id.
DICT_VECTORS = {"batch_lz4_dict": 1, "batch_one_dict": 1}


def busy_batch() -> pb.Batch:
    """40 similar chat lines, as a busy room produces them: compresses well."""
    return pb.Batch(
        messages=[
            chat_message(2000 + i, f"gg wp {i % 7}", sender=f"u{5000 + i % 9}") for i in range(40)
        ]
    )


def valid_messages() -> list[tuple[str, FrameType, object]]:
    """(name, frame type, message) of every valid vector, in file order."""
    return [
        (
            "hello_resume",
            FrameType.HELLO,
            pb.Hello(
                token="eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MTAwMSJ9.c2lnbmF0dXJl",
                device_id="dev-7f3a",
                device_class="mobile",
                resume=[
                    pb.ResumePoint(room="live:42", last_seq=1003, epoch="e1"),
                    pb.ResumePoint(room="live:7"),
                ],
                client="fanout-py/1.0",
                ping_interval_ms=30000,
            ),
        ),
        ("join_fresh", FrameType.JOIN, pb.Join(req_id=1, room="live:42")),
        (
            "join_resume",
            FrameType.JOIN,
            pb.Join(req_id=2, room="live:42", last_seq=1003, epoch="e1"),
        ),
        ("leave", FrameType.LEAVE, pb.Leave(req_id=3, room="live:42")),
        ("chat", FrameType.CHAT, pb.Chat(req_id=4, room="live:42", payload=b'{"text":"hi"}')),
        ("ping", FrameType.PING, pb.Ping(nonce=7)),
        ("refresh", FrameType.REFRESH, pb.Refresh(req_id=5, token="eyJhbGciOiJIUzI1NiJ9.e30.sig")),
        (
            "auth_ok",
            FrameType.AUTH_OK,
            pb.AuthOk(
                user="u1001",
                session="n1-000001",
                ping_interval_ms=15000,
                idle_timeout_ms=45000,
                server_time_ms=TS,
                token_expires_ms=TS + 3_600_000,
                compress_dict=1,
                ping_interval_min_ms=5000,
                ping_interval_max_ms=120000,
            ),
        ),
        (
            "hello_channel",
            FrameType.HELLO,
            pb.Hello(
                token="eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MTAwMSJ9.c2lnbmF0dXJl",
                device_class="web",
                channel_last_seq=12,
                channel_epoch="e9",
            ),
        ),
        (
            "auth_ok_channel",
            FrameType.AUTH_OK,
            pb.AuthOk(
                user="u1001",
                session="n1-000002",
                ping_interval_ms=15000,
                idle_timeout_ms=45000,
                server_time_ms=TS,
                token_expires_ms=TS + 3_600_000,
                compress_dict=1,
                ping_interval_min_ms=5000,
                ping_interval_max_ms=120000,
                channel="@u1001",
                channel_seq=12,
                channel_epoch="e9",
            ),
        ),
        (
            "error_room_forbidden",
            FrameType.ERROR,
            pb.Error(reason=pb.ROOM_FORBIDDEN, message="room not allowed", req_id=1, room="vip:1"),
        ),
        (
            "error_already_joined",
            FrameType.ERROR,
            pb.Error(reason=pb.ALREADY_JOINED, message="already in room", req_id=6, room="live:42"),
        ),
        ("ack_join", FrameType.ACK, pb.Ack(req_id=1, room="live:42", seq=1000, epoch="e1")),
        ("ack_chat", FrameType.ACK, pb.Ack(req_id=4, room="live:42", seq=1004)),
        ("gap", FrameType.GAP, pb.Gap(room="live:42", from_seq=1004, to_seq=1999, epoch="e1")),
        ("batch_mixed", FrameType.BATCH, mixed_batch()),
        ("batch_lz4", FrameType.BATCH, busy_batch()),
        ("batch_lz4_dict", FrameType.BATCH, busy_batch()),
        ("batch_one_dict", FrameType.BATCH, pb.Batch(messages=[gift_message()])),
        (
            "batch_sampled",
            FrameType.BATCH,
            pb.Batch(messages=mixed_batch().messages[:1], sampled=True),
        ),
        ("pong", FrameType.PONG, pb.Pong(nonce=7, server_time_ms=TS + 15)),
        ("presence", FrameType.PRESENCE, pb.Presence(room="live:42", online=10000)),
        (
            "kick_shutdown",
            FrameType.KICK,
            pb.Kick(reason=pb.SERVER_SHUTDOWN, message="node draining", reconnect_after_ms=3000),
        ),
    ]


def invalid_frames() -> list[tuple[str, bytes, str]]:
    """(name, frame bytes, expected Reason name) of every invalid vector."""
    ping = pb.Ping(nonce=7).SerializeToString()
    header = struct.Struct(">BBBBI")
    # A compressible body whose LZ4 block is cut short: the size prefix
    # promises more than the block can produce.
    packed = wire.encode_frame(FrameType.BATCH, busy_batch())[wire.HEADER_SIZE :]
    broken = packed[:-8]
    # With a dictionary: an id no receiver holds, and a block cut short.
    with_dict = wire.encode_frame(FrameType.BATCH, busy_batch(), dict_id=1)[wire.HEADER_SIZE :]
    unknown = with_dict[:4] + bytes([200]) + with_dict[5:]
    dict_broken = with_dict[:-8]
    lz4_dict = wire.FLAG_LZ4 | wire.FLAG_DICT
    return [
        (
            "bad_version",
            header.pack(2, FrameType.PING, 0, 0, len(ping)) + ping,
            "UNSUPPORTED_VERSION",
        ),
        (
            "undefined_flag_bit",
            header.pack(1, FrameType.PING, 0x80, 0, len(ping)) + ping,
            "BAD_FRAME",
        ),
        ("reserved_byte_set", header.pack(1, FrameType.PING, 0, 1, len(ping)) + ping, "BAD_FRAME"),
        # Rejected from the header alone; no body needs to follow.
        (
            "length_over_limit",
            header.pack(1, FrameType.CHAT, 0, 0, INVALID_MAX_BODY + 1),
            "FRAME_TOO_LARGE",
        ),
        (
            "corrupt_lz4",
            header.pack(1, FrameType.BATCH, wire.FLAG_LZ4, 0, len(broken)) + broken,
            "BAD_COMPRESSION",
        ),
        # The dictionary flag means nothing without the LZ4 flag.
        (
            "dict_flag_without_lz4",
            header.pack(1, FrameType.PING, wire.FLAG_DICT, 0, len(ping)) + ping,
            "BAD_FRAME",
        ),
        (
            "unknown_dictionary",
            header.pack(1, FrameType.BATCH, lz4_dict, 0, len(unknown)) + unknown,
            "BAD_COMPRESSION",
        ),
        (
            "corrupt_lz4_dict",
            header.pack(1, FrameType.BATCH, lz4_dict, 0, len(dict_broken)) + dict_broken,
            "BAD_COMPRESSION",
        ),
    ]


def build() -> dict:
    vectors = []
    for name, ftype, msg in valid_messages():
        dict_id = DICT_VECTORS.get(name, 0)
        frame = wire.encode_frame(ftype, msg, compress_min=1 if dict_id else
                                  wire.DEFAULT_COMPRESS_MIN, dict_id=dict_id)
        vectors.append(
            {
                "name": name,
                "direction": (
                    "client_to_server" if ftype in wire.CLIENT_TO_SERVER else "server_to_client"
                ),
                "type": ftype.name,
                "type_code": int(ftype),
                "message_type": msg.DESCRIPTOR.full_name,
                "compressed": bool(frame[2] & wire.FLAG_LZ4),
                "dictionary": frame[wire.HEADER_SIZE + 4] if frame[2] & wire.FLAG_DICT else 0,
                "frame_hex": frame.hex(),
                "message": json_format.MessageToDict(msg, preserving_proto_field_name=True),
            }
        )
    invalid = [
        {"name": name, "frame_hex": frame.hex(), "max_body": INVALID_MAX_BODY, "reason": reason}
        for name, frame, reason in invalid_frames()
    ]
    assert any(v["compressed"] for v in vectors), "batch_lz4 did not compress"
    assert all(v["dictionary"] == DICT_VECTORS[v["name"]] for v in vectors
               if v["name"] in DICT_VECTORS), "a dictionary vector did not compress"
    return {
        "protocol_version": wire.VERSION,
        "dictionaries": [
            {"id": i, "file": f"fanout/protocol/lz4dict-{i}.bin", "size": len(wire.DICTIONARIES[i]),
             "sha256": wire.DICT_SHA256[i]}
            for i in sorted(wire.DICTIONARIES)
        ],
        "description": (
            "fanout wire protocol v1 test vectors (docs/protocol.md). "
            "Generated by scripts/make_vectors.py; do not edit by hand. "
            "'message' is protobuf JSON (proto field names; bytes in base64; "
            "64-bit integers as strings; default values omitted). 'dictionary' is "
            "the pre-shared LZ4 dictionary a compressed body uses (0: none), one "
            "of 'dictionaries'."
        ),
        "valid": vectors,
        "invalid": invalid,
        "websocket": websocket(),
    }


# RFC 6455 mapping (docs/protocol.md section 1.1): the lengths where the
# server's header changes form, one complete message, one masked client
# message with a fixed key, and the Close after an Error.
WS_LENGTHS = [8, 125, 126, 65535, 65536, 1 << 20]
WS_MASK_KEY = bytes.fromhex("37fa213d")


def ws_header(n: int) -> bytes:
    if n < 126:
        return bytes([0x82, n])
    if n <= 0xFFFF:
        return bytes([0x82, 126]) + n.to_bytes(2, "big")
    return bytes([0x82, 127]) + n.to_bytes(8, "big")


def websocket() -> dict:
    pong = wire.encode_frame(FrameType.PONG, pb.Pong(nonce=7))
    ping = wire.encode_frame(FrameType.PING, pb.Ping(nonce=7))
    masked = bytes(b ^ WS_MASK_KEY[i & 3] for i, b in enumerate(ping))
    code = 4000 + pb.AUTH_INVALID
    return {
        "description": (
            "The WebSocket mapping (RFC 6455): 'server_headers' is the header of the "
            "binary message carrying a wire frame of 'frame_length' bytes; "
            "'server_message' is a whole message; 'client_message' is a wire frame "
            "masked with 'mask_key_hex'; 'close' is the Close after an Error with "
            "'reason' (code 4000 + reason, then the Reason's name)."),
        "server_headers": [{"frame_length": n, "header_hex": ws_header(n).hex()}
                           for n in WS_LENGTHS],
        "server_message": {"frame_hex": pong.hex(),
                           "message_hex": (ws_header(len(pong)) + pong).hex()},
        "client_message": {"frame_hex": ping.hex(), "mask_key_hex": WS_MASK_KEY.hex(),
                           "message_hex": (bytes([0x82, 0x80 | len(ping)]) + WS_MASK_KEY
                                           + masked).hex()},
        "close": {"reason": "AUTH_INVALID", "code": code,
                  "message_hex": (bytes([0x88, 2 + len("AUTH_INVALID")]) + code.to_bytes(2, "big")
                                  + b"AUTH_INVALID").hex()},
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    return write_or_check(OUT, render, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
