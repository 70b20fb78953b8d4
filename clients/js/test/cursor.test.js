// The cursor algorithm (docs/protocol.md section 7) on frames handed to the
// client's dispatcher in stream order, as they would come off a connection:
// duplicates dropped, skipped seqs reported as a gap, stale gaps dropped,
// resume Acks, refused resume points, and unknown frame types ignored.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, FrameType, proto as pb } from "../fanout.js";

function fixture() {
  const c = new Client({ url: "ws://127.0.0.1:1/ws", token: "t", WebSocket: function () {} });
  const conn = { auth: { user: "u" } };
  const events = [];
  c.on("*", (ev) => events.push(ev));
  const feed = (type, cls, fields) => c._dispatch(conn, type, cls.encode(fields).finish());
  const batch = (room, ...seqs) => feed(FrameType.BATCH, pb.Batch, {
    messages: seqs.map((seq) => ({ room, seq, kind: 1, payload: new TextEncoder().encode(`m${seq}`) })),
  });
  return { c, conn, events, feed, batch };
}

test("duplicates are dropped, skipped seqs become a gap, and every seq is accounted for once", () => {
  const { c, events, feed, batch } = fixture();
  c._cursors.set("r", { epoch: "e1", seq: 10 });
  batch("r", 9, 10, 11, 12, 12, 15, 16);
  feed(FrameType.GAP, pb.Gap, { room: "r", fromSeq: 14, toSeq: 16, epoch: "e1" }); // stale
  feed(FrameType.GAP, pb.Gap, { room: "r", fromSeq: 17, toSeq: 20, epoch: "e1" });
  batch("r", 21);
  batch("other", 1); // not joined
  const got = events.map((e) => (e.type === "gap" ? `gap ${e.fromSeq}..${e.toSeq}` : `${e.type} ${e.seq}`));
  assert.deepEqual(got, ["message 11", "message 12", "gap 13..14", "message 15", "message 16",
    "gap 17..20", "message 21"]);
  assert.equal(c.stats.duplicates, 3);
  assert.equal(c.stats.gaps, 2);
  assert.deepEqual(c.cursor("r"), { epoch: "e1", seq: 21 });
  assert.equal(events[0].text, "m11");
});

test("a node gap is reported from the cursor on, and takes the gap's epoch", () => {
  const { c, events, feed } = fixture();
  c._cursors.set("r", { epoch: "e1", seq: 5 });
  feed(FrameType.GAP, pb.Gap, { room: "r", fromSeq: 3, toSeq: 9, epoch: "e2" });
  assert.deepEqual({ ...events[0] }, { type: "gap", room: "r", fromSeq: 6, toSeq: 9, epoch: "e2" });
  assert.deepEqual(c.cursor("r"), { epoch: "e2", seq: 9 });
});

test("resume Acks: a new epoch restarts the cursor, a node behind keeps it", () => {
  const { c, events, feed, batch } = fixture();
  c._cursors.set("a", { epoch: "e1", seq: 7 });
  c._cursors.set("b", { epoch: "e1", seq: 7 });
  feed(FrameType.ACK, pb.Ack, { reqId: 0, room: "a", seq: 0, epoch: "e2" });
  feed(FrameType.ACK, pb.Ack, { reqId: 0, room: "b", seq: 4, epoch: "e1" });
  assert.deepEqual(c.cursor("a"), { epoch: "e2", seq: 0 });
  assert.deepEqual(c.cursor("b"), { epoch: "e1", seq: 7 });
  batch("b", 5, 6, 7, 8);
  assert.deepEqual(events.map((e) => e.seq), [8]);
});

test("a refused resume point leaves the room and tells the application", () => {
  const { c, events, feed } = fixture();
  c._cursors.set("vip", { epoch: "e1", seq: 3 });
  const err = feed(FrameType.ERROR, pb.Error, { reqId: 0, room: "vip", reason: pb.Reason.ROOM_FORBIDDEN, message: "no" });
  assert.equal(err, null);
  assert.equal(c.cursor("vip"), undefined);
  assert.deepEqual({ ...events[0] }, { type: "error", room: "vip", reason: 20, reasonName: "ROOM_FORBIDDEN", message: "no" });
});

test("closing errors and kicks end the connection; fatal ones for good", () => {
  const { c, feed } = fixture();
  const bad = feed(FrameType.ERROR, pb.Error, { reason: pb.Reason.BAD_FRAME });
  assert.equal(bad.name, "ConnectionLostError");
  assert.equal(c._retryable(bad), true);
  const kick = feed(FrameType.KICK, pb.Kick, { reason: pb.Reason.SERVER_SHUTDOWN, reconnectAfterMs: 1500 });
  assert.deepEqual([kick.name, kick.reasonName, kick.reconnectAfterMs], ["ConnectionLostError", "SERVER_SHUTDOWN", 1500]);
  for (const reason of ["DUPLICATE_LOGIN", "ADMIN_DISCONNECT", "TOKEN_REVOKED", "TOKEN_EXPIRED"]) {
    const e = feed(FrameType.KICK, pb.Kick, { reason: pb.Reason[reason] });
    assert.equal(e.name, "KickedError");
    assert.equal(c._retryable(e), false, reason);
  }
  // With getToken, an expired token is retryable: a new one is fetched.
  c.getToken = () => "new";
  assert.equal(c._retryable(feed(FrameType.KICK, pb.Kick, { reason: pb.Reason.TOKEN_EXPIRED })), true);
  assert.equal(c._retryable(feed(FrameType.KICK, pb.Kick, { reason: pb.Reason.TOKEN_REVOKED })), false);
});

test("unknown frame types and unknown reasons are tolerated", () => {
  const { c, feed } = fixture();
  assert.equal(c._dispatch({ auth: {} }, 0x60, new Uint8Array([8, 1])), null);
  const e = feed(FrameType.KICK, pb.Kick, { reason: 99 });
  assert.deepEqual([e.name, e.reasonName], ["ConnectionLostError", "REASON_99"]);
  assert.equal(c._retryable(e), true);
});

test("an AuthOk naming a dictionary the client does not hold ends the connection", () => {
  const c = new Client({ url: "ws://127.0.0.1:1/ws", token: "t", WebSocket: function () {} });
  const e = c._dispatch({ auth: null }, FrameType.AUTH_OK, pb.AuthOk.encode({ user: "u", compressDict: 9 }).finish());
  assert.equal(e.reasonName, "BAD_COMPRESSION");
});

test("backoff has full jitter under an exponential cap", () => {
  const c = new Client({ url: "ws://127.0.0.1:1/ws", token: "t", WebSocket: function () {}, backoffMinMs: 100, backoffMaxMs: 1000 });
  for (const [attempt, cap] of [[0, 100], [1, 200], [3, 800], [10, 1000]]) {
    const draws = Array.from({ length: 200 }, () => c._backoff(attempt));
    assert.ok(draws.every((d) => d >= 0 && d <= cap), `attempt ${attempt}`);
    assert.ok(Math.min(...draws) < cap * 0.2 && Math.max(...draws) > cap * 0.8, `attempt ${attempt} not spread`);
  }
});
