// Every vector of tests/vectors/frames.json (docs/protocol.md section 11):
// valid frames decode to the stated message (and client->server ones
// re-encode byte for byte), invalid ones are refused with the stated reason.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import protobuf from "protobufjs";
import {
  decodeFrames, decodeMessage, encodeFrame, FrameType, WireError, DICT_SHA256, DICTIONARIES,
  FLAG_LZ4, FLAG_DICT,
} from "../src/wire.js";
import { REPO, hex, toHex } from "../testlib/helpers.js";

const vectors = JSON.parse(readFileSync(join(REPO, "tests", "vectors", "frames.json"), "utf8"));
// Reflection from the .proto itself, independent of the generated static
// code under test, turns decoded messages into protobuf JSON.
const root = protobuf.loadSync(join(REPO, "fanout", "protocol", "fanout.proto"));

const snake = (k) => k.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());
function protoJson(value) {
  if (Array.isArray(value)) return value.map(protoJson);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [snake(k), protoJson(v)]));
  }
  return value;
}
function toJson(messageType, msg) {
  const type = root.lookupType(messageType);
  // Default values are omitted as in the vectors (defaults: false);
  // 64-bit as strings, enums as names, bytes as base64.
  return protoJson(type.toObject(msg, { longs: String, enums: String, bytes: String }));
}

test("the vector file covers every frame type", () => {
  const seen = new Set(vectors.valid.map((v) => v.type));
  for (const name of Object.keys(FrameType)) assert.ok(seen.has(name), `no vector for ${name}`);
  assert.ok(vectors.invalid.length >= 8);
});

test("dictionary 1 is the one the vectors name", () => {
  for (const d of vectors.dictionaries) {
    assert.equal(DICT_SHA256.get(d.id), d.sha256);
    const bytes = DICTIONARIES.get(d.id);
    assert.equal(bytes.length, d.size);
    assert.equal(createHash("sha256").update(bytes).digest("hex"), d.sha256);
    assert.deepEqual(Buffer.from(bytes), readFileSync(join(REPO, d.file)));
  }
});

for (const v of vectors.valid) {
  test(`valid vector ${v.name}`, () => {
    const frames = decodeFrames(hex(v.frame_hex));
    assert.equal(frames.length, 1);
    const [frame] = frames;
    assert.equal(frame.type, v.type_code);
    assert.equal(Boolean(frame.flags & FLAG_LZ4), v.compressed);
    assert.equal(frame.flags & FLAG_DICT ? hex(v.frame_hex)[12] : 0, v.dictionary);
    const msg = decodeMessage(frame.type, frame.body);
    assert.deepEqual(toJson(v.message_type, msg), v.message);
    if (!v.compressed) {
      // An encoder reproduces every uncompressed vector exactly.
      assert.equal(toHex(encodeFrame(frame.type, msg)), v.frame_hex);
    }
  });
}

for (const v of vectors.invalid) {
  test(`invalid vector ${v.name} is refused with ${v.reason}`, () => {
    assert.throws(() => decodeFrames(hex(v.frame_hex), v.max_body), (e) => {
      assert.ok(e instanceof WireError, `not a WireError: ${e}`);
      assert.equal(e.reasonName, v.reason, e.message);
      return true;
    });
  });
}

test("a message holding several whole frames decodes them all, in order", () => {
  const ping = vectors.valid.find((v) => v.name === "ack_join").frame_hex;
  const gap = vectors.valid.find((v) => v.name === "gap").frame_hex;
  const frames = decodeFrames(hex(ping + gap));
  assert.deepEqual(frames.map((f) => f.type), [FrameType.ACK, FrameType.GAP]);
});

test("a frame cut short in a message is BAD_FRAME", () => {
  const ack = vectors.valid.find((v) => v.name === "ack_join").frame_hex;
  for (const cut of [3, 8, ack.length / 2 - 1]) {
    assert.throws(() => decodeFrames(hex(ack.slice(0, cut * 2))), (e) => e.reasonName === "BAD_FRAME");
  }
});

test("a body that is not the type's message is BAD_PROTOBUF", () => {
  // An Ack whose room field claims 200 bytes.
  const frame = hex("0147000000000004" + "12c80161");
  const [f] = decodeFrames(frame);
  assert.throws(() => decodeMessage(f.type, f.body), (e) => e instanceof WireError && e.reasonName === "BAD_PROTOBUF");
});

test("an unknown server frame type decodes to null (ignored, section 10)", () => {
  const [f] = decodeFrames(hex("0160000000000002" + "0807"));
  assert.equal(decodeMessage(f.type, f.body), null);
});
