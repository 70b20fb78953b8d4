// The LZ4 block decoder: hand-made blocks for each rule of the format,
// corrupt blocks, and blocks made by the reference implementation
// (python-lz4, the library the node uses) with and without dictionary 1.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { decodeBlock, Lz4Error } from "../src/lz4.js";
import { DICTIONARIES } from "../src/wire.js";
import { python, hex, REPO } from "../testlib/helpers.js";

const bytes = (...a) => new Uint8Array(a.flat());
const ascii = (s) => [...Buffer.from(s, "latin1")];
const dict = DICTIONARIES.get(1);

test("literals only", () => {
  assert.deepEqual(Buffer.from(decodeBlock(bytes(0x50, ascii("hello")), 5)).toString(), "hello");
});

test("an empty input is one zero token", () => {
  assert.equal(decodeBlock(bytes(0x00), 0).length, 0);
});

test("long literal length: 15 + 255 + n", () => {
  const lit = new Uint8Array(15 + 255 + 3).map((_, i) => i & 0xff);
  const out = decodeBlock(bytes(0xf0, 255, 3, [...lit]), lit.length);
  assert.deepEqual(out, lit);
});

test("a match copies earlier output, overlapping runs included", () => {
  // "ab" then a match of offset 2, length 4+6=10: "ababababab", then literal "c".
  const out = decodeBlock(bytes(0x26, ascii("ab"), 0x02, 0x00, 0x10, ascii("c")), 13);
  assert.equal(Buffer.from(out).toString(), "ababababababc");
  // Offset 1: a run of one byte.
  const run = decodeBlock(bytes(0x1f, ascii("x"), 0x01, 0x00, 20, 0x00), 1 + 4 + 15 + 20);
  assert.equal(Buffer.from(run).toString(), "x".repeat(40));
});

test("a long match length: 4 + 15 + 255 + n", () => {
  const out = decodeBlock(bytes(0x1f, ascii("z"), 0x01, 0x00, 255, 7, 0x00), 1 + 4 + 15 + 255 + 7);
  assert.equal(out.length, 282);
  assert.ok(out.every((b) => b === 0x7a));
});

test("a match reaching into the dictionary, and across its end into the output", () => {
  const d = new Uint8Array(ascii("0123456789"));
  // Offset 4 from output position 0: dictionary bytes "6789".
  assert.equal(Buffer.from(decodeBlock(bytes(0x00, 0x04, 0x00, 0x00), 4, d)).toString(), "6789");
  // Literal "ab", then offset 4 length 6: "89ab" from the dictionary's
  // tail and the output, then "89" again from the output (overlap).
  const out = decodeBlock(bytes(0x22, ascii("ab"), 0x04, 0x00, 0x00), 8, d);
  assert.equal(Buffer.from(out).toString(), "ab89ab89");
});

test("corrupt blocks are refused", () => {
  const cases = {
    "empty block": [bytes(), 0],
    "offset 0": [bytes(0x10, ascii("a"), 0x00, 0x00, 0x00), 6],
    "offset before the data": [bytes(0x10, ascii("a"), 0x05, 0x00, 0x00), 6],
    "literals past the block": [bytes(0x50, ascii("abc")), 5],
    "literals past the size": [bytes(0x50, ascii("hello")), 4],
    "match past the size": [bytes(0x1f, ascii("x"), 0x01, 0x00, 20, 0x00), 30],
    "shorter than stated": [bytes(0x50, ascii("hello")), 6],
    "truncated offset": [bytes(0x10, ascii("a"), 0x01), 6],
    "truncated literal length": [bytes(0xf0, 255), 300],
    "truncated match length": [bytes(0x1f, ascii("x"), 0x01, 0x00, 255), 300],
  };
  for (const [name, [block, size]] of Object.entries(cases)) {
    assert.throws(() => decodeBlock(block, size), Lz4Error, name);
  }
  // A match into a dictionary that is not given.
  assert.throws(() => decodeBlock(bytes(0x00, 0x04, 0x00, 0x00), 4), Lz4Error);
});

// Blocks from python-lz4, the node's compressor: plain, with the whole
// dictionary 1, with its last 16 KiB (what the node uses for small bodies),
// high-compression mode, sizes from 0 to 200 KB.
const MAKE = String.raw`
import json, random, sys
import lz4.block
from fanout.protocol import wire
d = wire.DICTIONARIES[1]
rnd = random.Random(11)
samples = []
words = [b"gg", b"lol", b"rocket", b"\xe6\x98\x9f", b"{\"text\":\"", b"live:42", b"u1001"]
for size in (0, 1, 5, 13, 64, 300, 4096, 70000, 200000):
    text = b" ".join(rnd.choice(words) for _ in range(size // 3 + 1))[:size]
    noise = bytes(rnd.getrandbits(8) for _ in range(min(size, 5000)))
    samples += [text, noise, d[1000:1000 + size] + text[:size // 4]]
out = []
for data in samples:
    out.append(["plain", lz4.block.compress(data, store_size=False).hex(), len(data), data.hex()])
    out.append(["hc", lz4.block.compress(data, store_size=False, mode="high_compression").hex(), len(data), data.hex()])
    out.append(["dict", lz4.block.compress(data, store_size=False, dict=d).hex(), len(data), data.hex()])
    out.append(["dict16k", lz4.block.compress(data, store_size=False, dict=d[-16384:]).hex(), len(data), data.hex()])
json.dump(out, sys.stdout)
`;

test("blocks made by python-lz4 (the node's compressor) inflate to their input", () => {
  const out = execFileSync(python(), ["-c", MAKE], { maxBuffer: 256 * 1024 * 1024, encoding: "utf8", cwd: REPO });
  const cases = JSON.parse(out);
  assert.ok(cases.length >= 100);
  let matchesIntoDict = 0;
  for (const [mode, block, size, data] of cases) {
    const d = mode.startsWith("dict") ? dict : undefined;
    const got = decodeBlock(hex(block), size, d);
    assert.equal(Buffer.from(got).toString("hex"), data, `${mode} ${size}`);
    if (d && block.length < data.length / 2) matchesIntoDict++;
  }
  assert.ok(matchesIntoDict > 0, "no case used the dictionary");
});

test("a dictionary block does not inflate without its dictionary", () => {
  const out = execFileSync(python(), ["-c",
    "import lz4.block, sys; from fanout.protocol import wire; d = wire.DICTIONARIES[1];"
    + "data = d[500:900]; sys.stdout.write(lz4.block.compress(data, store_size=False, dict=d).hex() + ' ' + data.hex())"],
  { encoding: "utf8", cwd: REPO });
  const [block, data] = out.split(" ");
  assert.equal(Buffer.from(decodeBlock(hex(block), data.length / 2, dict)).toString("hex"), data);
  assert.throws(() => decodeBlock(hex(block), data.length / 2), Lz4Error);
});
