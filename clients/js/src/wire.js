// Wire protocol v1 codec (docs/protocol.md sections 2-4): frame header,
// lz4 bodies (plain and with the pre-shared dictionary), protobuf bodies.
import { fanout } from "./proto.js";
import { decodeBlock, Lz4Error } from "./lz4.js";
import * as dict1 from "./lz4dict-1.js";

export const pb = fanout.v1;
export const VERSION = 1;
export const HEADER_SIZE = 8;
export const FLAG_LZ4 = 0x01;
export const FLAG_DICT = 0x02;
/** Largest server->client body a client must accept (section 9). */
export const MAX_SERVER_FRAME = 16 * 1024 * 1024;

/** The pre-shared dictionaries this codec holds, by id. */
export const DICTIONARIES = new Map([[1, dict1.BYTES]]);
export const DICT_SHA256 = new Map([[1, dict1.SHA256]]);

export const FrameType = Object.freeze({
  HELLO: 0x01, JOIN: 0x02, LEAVE: 0x03, CHAT: 0x04, PING: 0x05, REFRESH: 0x06,
  AUTH_OK: 0x41, ERROR: 0x42, BATCH: 0x43, KICK: 0x44, PONG: 0x45, GAP: 0x46,
  ACK: 0x47, PRESENCE: 0x48,
});

/** Frame type -> protobuf message class. */
export const MESSAGE_TYPES = new Map([
  [FrameType.HELLO, pb.Hello], [FrameType.JOIN, pb.Join], [FrameType.LEAVE, pb.Leave],
  [FrameType.CHAT, pb.Chat], [FrameType.PING, pb.Ping], [FrameType.REFRESH, pb.Refresh],
  [FrameType.AUTH_OK, pb.AuthOk], [FrameType.ERROR, pb.Error], [FrameType.BATCH, pb.Batch],
  [FrameType.KICK, pb.Kick], [FrameType.PONG, pb.Pong], [FrameType.GAP, pb.Gap],
  [FrameType.ACK, pb.Ack], [FrameType.PRESENCE, pb.Presence],
]);

/** Reason code -> name (fanout.proto's `Reason`). */
export const Reason = pb.Reason;
export function reasonName(code) {
  const name = pb.Reason[code];
  return typeof name === "string" ? name : `REASON_${code}`;
}
const KIND_NAMES = { 1: "chat", 2: "gift", 3: "system" };
/** Kind code -> lower-case name ("chat", "gift", "system"); unknown kinds stay numbers. */
export function kindName(code) {
  return KIND_NAMES[code] ?? code;
}

/** A frame the receiver must refuse; `reason` is a Reason code. */
export class WireError extends Error {
  constructor(reason, message) {
    super(message);
    this.name = "WireError";
    this.reason = reason;
    this.reasonName = reasonName(reason);
  }
}

/**
 * A protobuf 64-bit integer (protobufjs gives a Long when the `long` package
 * is loaded, else a number) as a number. Seqs and times fit in 2^53 for
 * ages; a value past it would lose precision silently, so it is refused.
 */
export function toNumber(v) {
  if (typeof v === "number") return v;
  if (v == null) return 0;
  const hi = v.high >>> 0;
  const lo = v.low >>> 0;
  if (hi > 0x1fffff) throw new WireError(pb.Reason.BAD_PROTOBUF, "64-bit value past 2^53");
  return hi * 0x100000000 + lo;
}

/**
 * Encode one frame; bodies are sent uncompressed (the node accepts every
 * form, and a client's frames are small).
 * @param {number} type a FrameType
 * @param {object} fields the message's fields (camelCase)
 */
export function encodeFrame(type, fields) {
  const cls = MESSAGE_TYPES.get(type);
  if (!cls) throw new TypeError(`unknown frame type ${type}`);
  const body = cls.encode(fields).finish();
  const out = new Uint8Array(HEADER_SIZE + body.length);
  out[0] = VERSION;
  out[1] = type;
  new DataView(out.buffer).setUint32(4, body.length, false);
  out.set(body, HEADER_SIZE);
  return out;
}

/**
 * Check a frame header (section 2, in the section's order) and return the
 * body length.
 * @throws {WireError}
 */
export function checkHeader(buf, pos, maxBody) {
  const version = buf[pos];
  const flags = buf[pos + 2];
  if (version !== VERSION) {
    throw new WireError(pb.Reason.UNSUPPORTED_VERSION, `unsupported frame version ${version}`);
  }
  if (flags & ~(FLAG_LZ4 | FLAG_DICT) || (flags & FLAG_DICT && !(flags & FLAG_LZ4))) {
    throw new WireError(pb.Reason.BAD_FRAME, `undefined frame flags 0x${flags.toString(16).padStart(2, "0")}`);
  }
  if (buf[pos + 3] !== 0) throw new WireError(pb.Reason.BAD_FRAME, "reserved header byte is not 0");
  const length = ((buf[pos + 4] << 24) >>> 0) + (buf[pos + 5] << 16) + (buf[pos + 6] << 8) + buf[pos + 7];
  if (length > maxBody) {
    throw new WireError(pb.Reason.FRAME_TOO_LARGE, `frame body of ${length} bytes, limit is ${maxBody}`);
  }
  return length;
}

/** The body of an lz4 frame, inflated (section 3). */
export function inflate(body, flags, maxBody) {
  const prefix = flags & FLAG_DICT ? 5 : 4;
  if (body.length < prefix) {
    throw new WireError(pb.Reason.BAD_COMPRESSION, `lz4 body of ${body.length} bytes has no size prefix`);
  }
  const size = (body[0] | (body[1] << 8) | (body[2] << 16) | (body[3] << 24)) >>> 0;
  // Checked before inflating, so a tiny frame cannot make us allocate 4 GiB.
  if (size > maxBody) {
    throw new WireError(pb.Reason.BAD_COMPRESSION, `lz4 body inflates to ${size} bytes, limit is ${maxBody}`);
  }
  let dict;
  if (flags & FLAG_DICT) {
    dict = DICTIONARIES.get(body[4]);
    if (!dict) throw new WireError(pb.Reason.BAD_COMPRESSION, `unknown lz4 dictionary id ${body[4]}`);
  }
  try {
    return decodeBlock(body.subarray(prefix), size, dict);
  } catch (e) {
    if (e instanceof Lz4Error) throw new WireError(pb.Reason.BAD_COMPRESSION, `corrupt lz4 body: ${e.message}`);
    throw e;
  }
}

/**
 * Split bytes holding whole frames (one WebSocket message) into frames.
 * A frame cut short is BAD_FRAME: over WebSocket a frame never spans
 * messages.
 * @param {Uint8Array} buf
 * @returns {{type: number, flags: number, body: Uint8Array}[]} bodies inflated
 * @throws {WireError}
 */
export function decodeFrames(buf, maxBody = MAX_SERVER_FRAME) {
  const frames = [];
  let pos = 0;
  while (pos < buf.length) {
    if (buf.length - pos < HEADER_SIZE) {
      throw new WireError(pb.Reason.BAD_FRAME, `${buf.length - pos} bytes left, less than a frame header`);
    }
    const length = checkHeader(buf, pos, maxBody);
    const start = pos + HEADER_SIZE;
    if (buf.length - start < length) {
      throw new WireError(pb.Reason.BAD_FRAME, `frame body of ${length} bytes, only ${buf.length - start} in the message`);
    }
    const type = buf[pos + 1];
    const flags = buf[pos + 2];
    let body = buf.subarray(start, start + length);
    if (flags & FLAG_LZ4) body = inflate(body, flags, maxBody);
    frames.push({ type, flags, body });
    pos = start + length;
  }
  return frames;
}

/**
 * Decode a frame body as its type's message.
 * @returns {object|null} the protobufjs message, or null for a type this
 *   codec does not know (to be ignored: section 10)
 * @throws {WireError} BAD_PROTOBUF
 */
export function decodeMessage(type, body) {
  const cls = MESSAGE_TYPES.get(type);
  if (!cls) return null;
  try {
    return cls.decode(body);
  } catch (e) {
    throw new WireError(pb.Reason.BAD_PROTOBUF, `bad ${cls.name || "message"} body: ${e.message}`);
  }
}
