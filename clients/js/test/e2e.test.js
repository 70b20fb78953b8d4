// End to end against real fanout nodes over WebSocket (127.0.0.1 only):
// the client as an application uses it, the node started with
// `python -m fanout node`, messages published through its admin API.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client, AuthError, KickedError, FanoutError, Reason } from "../fanout.js";
import { Node, Proxy, mintToken, LOOP } from "../testlib/node.js";

const FAST = [
  "--presence-interval-ms", "300", "--drain-jitter-ms", "100", "--drain-grace-ms", "2000",
  "--log-level", "WARNING",
];
const nodes = [];
const clients = [];
async function startNode(flags = []) {
  const node = await Node.start({ flags: [...FAST, ...flags] });
  nodes.push(node);
  return node;
}
function client(options) {
  const c = new Client({ WebSocket, backoffMinMs: 50, backoffMaxMs: 500, ...options });
  clients.push(c);
  return c;
}
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
});

/** The next `n` events accepted by `keep` (others skipped), within `timeoutMs`. */
async function take(c, n, keep = (ev) => ev.type === "message" || ev.type === "gap", timeoutMs = 10000) {
  const out = [];
  const deadline = Date.now() + timeoutMs;
  while (out.length < n) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`got ${out.length} of ${n} events: ${JSON.stringify(out.map(brief))}`);
    const ev = await c.nextEvent(left).catch((e) => {
      if (e instanceof FanoutError && e.name !== "FanoutTimeoutError") throw e; // what ended the client
      throw new Error(`${e.message} after ${out.length} of ${n} events: ${JSON.stringify(out.map(brief))}`);
    });
    if (ev === undefined) throw new Error("client closed");
    if (keep(ev)) out.push(ev);
  }
  return out;
}
const brief = (ev) => (ev.type === "message" ? `${ev.seq}:${ev.text}` : `${ev.type}:${ev.fromSeq ?? ""}..${ev.toSeq ?? ""}`);

test(`connect, join, receive a gift and chat in order, chat, presence (${LOOP})`, async () => {
  const node = await startNode();
  const a = client({ url: node.wsUrl, token: mintToken({ user: "alice" }) });
  const auth = await a.connect();
  assert.equal(auth.user, "alice");
  assert.ok(auth.pingIntervalMs > 0 && auth.idleTimeoutMs > auth.pingIntervalMs);
  assert.equal(auth.compressDict, 1);
  const ack = await a.join("live:1");
  assert.equal(ack.seq, 0);
  assert.deepEqual(a.cursor("live:1"), { epoch: ack.epoch, seq: 0 });

  const s1 = await node.publish("live:1", "gift", "rocket x10", { sender: "gift-svc", priority: 5 });
  const s2 = await node.publish("live:1", "chat", "hello from the api", { sender: "bob" });
  const [gift, chat] = await take(a, 2);
  assert.equal(gift.type, "message");
  assert.deepEqual([gift.seq, gift.kind, gift.sender, gift.priority, gift.text], [s1, "gift", "gift-svc", 5, "rocket x10"]);
  assert.deepEqual([chat.seq, chat.kind, chat.sender, chat.text], [s2, "chat", "bob", "hello from the api"]);
  assert.equal(chat.epoch, ack.epoch);
  assert.ok(chat.serverTsMs > Date.now() - 60000);

  // Our own chat comes back with the seq the Ack gave it; a Uint8Array too.
  const mine = await a.say("live:1", "hi there ✓");
  const bin = await a.say("live:1", new Uint8Array([0, 1, 2, 255]));
  const [m1, m2] = await take(a, 2);
  assert.deepEqual([m1.seq, m1.sender, m1.text], [mine.seq, "alice", "hi there ✓"]);
  assert.deepEqual([m2.seq, [...m2.payload]], [bin.seq, [0, 1, 2, 255]]);

  // A second member: presence counts both.
  const b = client({ url: node.wsUrl, token: mintToken({ user: "bob" }) });
  await b.connect();
  await b.join("live:1");
  const [p] = await take(a, 1, (ev) => ev.type === "presence" && ev.online === 2);
  assert.equal(p.room, "live:1");
  assert.equal(a.online("live:1"), 2);

  // A big batch: the node lz4-compresses it with dictionary 1.
  const payloads = Array.from({ length: 50 }, (_, i) => `{"text":"message number ${i} in a burst"}`);
  const res = await node.admin("POST", "/v1/publish", {
    messages: payloads.map((payload) => ({ room: "live:1", kind: "chat", payload, sender: "u9" })),
  });
  assert.equal(res.status, 200);
  const burst = await take(b, 50);
  assert.deepEqual(burst.map((m) => m.text), payloads);
  assert.ok(b.stats.frames < 40, `${b.stats.frames} frames: the burst was not batched`);

  await a.leave("live:1");
  assert.equal(a.cursor("live:1"), undefined);
  await assert.rejects(a.say("live:1", "gone"), (e) => e.reasonName === "NOT_A_MEMBER" && e.room === "live:1");
  await a.close();
  assert.equal(await a.nextEvent(), undefined);
});

test("a refused token rejects connect() with AUTH_INVALID, and does not reconnect", async () => {
  const node = await startNode();
  const c = client({ url: node.wsUrl, token: mintToken({ secret: "not-the-node-secret" }) });
  await assert.rejects(c.connect(), (e) => {
    assert.ok(e instanceof AuthError && e instanceof FanoutError);
    assert.equal(e.reason, Reason.AUTH_INVALID);
    assert.equal(e.reasonName, "AUTH_INVALID");
    return true;
  });
  assert.equal(c.connected, false);
  const expired = client({ url: node.wsUrl, token: mintToken({ exp: Math.floor(Date.now() / 1000) - 60 }) });
  await assert.rejects(expired.connect(), (e) => e.reasonName === "AUTH_EXPIRED");
  const forbidden = client({ url: node.wsUrl, token: mintToken({ rooms: ["only:this"] }) });
  await forbidden.connect();
  await assert.rejects(forbidden.join("other:room"), (e) => e.reasonName === "ROOM_FORBIDDEN");
});

test("resume after the socket is cut: no loss, no duplicate", async () => {
  const node = await startNode();
  const proxy = await Proxy.start(node.wsPort);
  try {
    const c = client({ url: proxy.url(node.wsPath), token: mintToken({ user: "carol" }) });
    const events = [];
    c.on("reconnecting", (ev) => events.push(ev));
    await c.connect();
    const { epoch } = await c.join("live:cut");
    for (let i = 1; i <= 3; i++) await node.publish("live:cut", "chat", `m${i}`);
    const first = await take(c, 3);
    proxy.hold();
    proxy.cut();
    // Published while the client is away: the resume replays them.
    for (let i = 4; i <= 6; i++) await node.publish("live:cut", "chat", `m${i}`);
    await new Promise((r) => setTimeout(r, 300));
    proxy.release();
    const [connected] = await take(c, 1, (ev) => ev.type === "connected");
    assert.equal(connected.reconnect, true);
    await node.publish("live:cut", "gift", "m7");
    const rest = await take(c, 4);
    const all = [...first, ...rest];
    assert.deepEqual(all.map((m) => m.type), Array(7).fill("message"));
    assert.deepEqual(all.map((m) => m.seq), [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(all.map((m) => m.text), ["m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
    assert.ok(all.every((m) => m.epoch === epoch));
    assert.ok(events.length >= 1 && events[0].attempt === 1 && events[0].reason === 0, JSON.stringify(events));
    assert.equal(c.stats.reconnects, 1);
    assert.equal(c.stats.gaps, 0);
    // Requests work on the new connection.
    const ack = await c.say("live:cut", "back");
    assert.equal((await take(c, 1))[0].seq, ack.seq);
  } finally {
    await proxy.close();
  }
});

test("pushes to the user's channel reach every device, and resume after a cut", async () => {
  const node = await startNode();
  const proxy = await Proxy.start(node.wsPort);
  const push = async (text) => {
    const res = await node.admin("POST", "/v1/publish", { user: "dana", kind: "gift", payload: text });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body.seq;
  };
  try {
    const phone = client({ url: proxy.url(node.wsPath), token: mintToken({ user: "dana" }), deviceClass: "phone" });
    const web = client({ url: node.wsUrl, token: mintToken({ user: "dana" }), deviceClass: "web" });
    await phone.connect();
    await web.connect();
    assert.equal(phone.channel, "@dana");
    assert.equal(web.auth.channel, "@dana");
    assert.deepEqual(phone.rooms, []);
    assert.deepEqual(phone.cursor("@dana"), { epoch: "", seq: 0 });
    assert.equal(await push("receipt 1"), 1);
    for (const c of [phone, web]) {
      const [m] = await take(c, 1);
      assert.deepEqual([m.room, m.seq, m.text, m.kind], ["@dana", 1, "receipt 1", "gift"]);
    }
    proxy.hold();
    proxy.cut();
    await push("receipt 2");  // while the phone is away: its Hello resumes the channel
    await push("receipt 3");
    await new Promise((r) => setTimeout(r, 300));
    proxy.release();
    const got = await take(phone, 2);
    assert.deepEqual(got.map((m) => [m.seq, m.text]), [[2, "receipt 2"], [3, "receipt 3"]]);
    assert.equal(phone.stats.gaps, 0);
    assert.equal(phone.stats.reconnects, 1);
    assert.deepEqual((await take(web, 2)).map((m) => m.seq), [2, 3]);
  } finally {
    await proxy.close();
  }
});

test("a Gap when the ring no longer holds the missed messages", async () => {
  const node = await startNode(["--ring-size", "4"]);
  const proxy = await Proxy.start(node.wsPort);
  try {
    const c = client({ url: proxy.url(node.wsPath), token: mintToken({ user: "dave" }) });
    await c.connect();
    const { epoch } = await c.join("live:gap");
    await node.publish("live:gap", "chat", "m1");
    assert.equal((await take(c, 1))[0].seq, 1);
    proxy.hold();
    proxy.cut();
    for (let i = 2; i <= 11; i++) await node.publish("live:gap", "chat", `m${i}`);
    proxy.release();
    // The ring (a few messages) no longer holds 2..k: they are reported
    // as one gap, then k+1..11 are replayed, each seq accounted for once.
    const [gap] = await take(c, 1);
    assert.equal(gap.type, "gap");
    assert.deepEqual([gap.room, gap.fromSeq, gap.epoch], ["live:gap", 2, epoch]);
    assert.ok(gap.toSeq >= 2 && gap.toSeq < 11, `gap ${gap.fromSeq}..${gap.toSeq}`);
    const replayed = await take(c, 11 - gap.toSeq);
    assert.deepEqual(replayed.map((m) => [m.seq, m.text]),
      Array.from({ length: 11 - gap.toSeq }, (_, i) => [gap.toSeq + 1 + i, `m${gap.toSeq + 1 + i}`]));
    assert.equal(c.stats.gaps, 1);
    assert.deepEqual(c.cursor("live:gap"), { epoch, seq: 11 });
  } finally {
    await proxy.close();
  }
});

test("resume after the node restarts: a new epoch from seq 1, nothing lost or doubled", async () => {
  const node = await startNode();
  const c = client({ url: node.wsUrl, token: mintToken({ user: "erin" }) });
  const reasons = [];
  c.on("reconnecting", (ev) => reasons.push(ev.reasonName));
  await c.connect();
  const { epoch } = await c.join("live:restart");
  await node.publish("live:restart", "chat", "before-1");
  await node.publish("live:restart", "chat", "before-2");
  const before = await take(c, 2);
  await node.restart();
  const [connected] = await take(c, 1, (ev) => ev.type === "connected", 20000);
  assert.equal(connected.reconnect, true);
  await node.publish("live:restart", "gift", "after-1");
  await node.publish("live:restart", "chat", "after-2");
  const after = await take(c, 2);
  // The restarted node lost the room's history: a new epoch, from seq 1.
  const cur = c.cursor("live:restart");
  assert.notEqual(cur.epoch, epoch);
  assert.deepEqual(before.map((m) => [m.seq, m.text, m.epoch]), [[1, "before-1", epoch], [2, "before-2", epoch]]);
  assert.deepEqual(after.map((m) => [m.seq, m.text, m.epoch]), [[1, "after-1", cur.epoch], [2, "after-2", cur.epoch]]);
  assert.deepEqual(cur, { epoch: cur.epoch, seq: 2 });
  assert.equal(reasons[0], "SERVER_SHUTDOWN");
  assert.equal(c.stats.duplicates, 0);
});

test("a newer login of the same device class ends the older client (DUPLICATE_LOGIN)", async () => {
  const node = await startNode();
  const token = mintToken({ user: "frank" });
  const old = client({ url: node.wsUrl, token, deviceClass: "web" });
  const kicked = [];
  old.on("kicked", (ev) => kicked.push(ev));
  await old.connect();
  await old.join("live:dup");
  const newer = client({ url: node.wsUrl, token, deviceClass: "web" });
  await newer.connect();
  await assert.rejects(take(old, 1), (e) => e instanceof KickedError && e.reasonName === "DUPLICATE_LOGIN");
  assert.equal(kicked.length, 1);
  assert.equal(old.connected, false);
  await assert.rejects(old.join("live:dup"), (e) => e.name === "ConnectionLostError");
});

test("the token is refreshed before it expires, and the connection outlives the first token", async () => {
  const node = await startNode(["--token-grace-ms", "200"]);
  let issued = 0;
  const c = client({
    url: node.wsUrl,
    getToken: () => { issued++; return mintToken({ user: "gina", ttlS: 5 }); },
  });
  const auth = await c.connect();
  assert.ok(auth.tokenExpiresMs - auth.serverTimeMs <= 5000);
  await c.join("live:tok");
  // Past the first token's exp plus the grace, and the node's once-a-second check.
  await new Promise((r) => setTimeout(r, 6500));
  assert.ok(c.stats.refreshes >= 1, `refreshes: ${c.stats.refreshes}`);
  assert.ok(issued >= 2);
  assert.equal(c.connected, true);
  assert.equal(c.stats.reconnects, 0);
  const seq = await node.publish("live:tok", "chat", "still here");
  const [m] = await take(c, 1);
  assert.deepEqual([m.seq, m.text], [seq, "still here"]);
  // A refused refresh leaves the connection as it was.
  await assert.rejects(c.refresh(mintToken({ user: "someone-else" })), (e) => e.reasonName === "AUTH_INVALID");
  assert.equal(c.connected, true);
});

test("heartbeat: a link that goes silent is declared dead and resumed", async () => {
  const node = await startNode(["--ping-interval-ms", "250", "--idle-timeout-ms", "1200"]);
  const proxy = await Proxy.start(node.wsPort);
  try {
    // The node's interval, not a search (weak.test.js has the search).
    const c = client({ url: proxy.url(node.wsPath), token: mintToken({ user: "hank" }), adaptiveHeartbeat: false });
    const reasons = [];
    c.on("reconnecting", (ev) => reasons.push(ev.reasonName));
    await c.connect();
    await c.join("live:hb");
    // Idle for several idle timeouts: the pings keep the connection up.
    await new Promise((r) => setTimeout(r, 2500));
    assert.deepEqual(reasons, []);
    // Stop forwarding without closing: a half-open link.
    for (const [client_, upstream] of proxy.pairs) { client_.pause(); upstream.pause(); }
    const [ev] = await take(c, 1, (e) => e.type === "reconnecting", 5000);
    assert.equal(ev.reasonName, "HEARTBEAT_TIMEOUT");
    await take(c, 1, (e) => e.type === "connected", 5000);
    const seq = await node.publish("live:hb", "chat", "after");
    assert.equal((await take(c, 1))[0].seq, seq);
  } finally {
    await proxy.close();
  }
});

test("large frames: a burst of 1000 messages of 1-3 KB each arrives whole and in order", async () => {
  const node = await startNode();
  const c = client({ url: node.wsUrl, token: mintToken({ user: "ivy" }) });
  await c.connect();
  await c.join("live:big");
  // Varied, poorly compressible payloads so batches cross the 16- and 64-bit
  // WebSocket length encodings.
  const payload = (i) => `${i}:` + Buffer.from(Array.from({ length: 1000 + (i % 7) * 300 }, (_, j) => (i * 31 + j * j) & 0xff)).toString("base64");
  const res = await node.admin("POST", "/v1/publish", {
    messages: Array.from({ length: 1000 }, (_, i) => ({ room: "live:big", kind: "gift", payload: payload(i) })),
  });
  assert.equal(res.status, 200);
  const got = await take(c, 1000, undefined, 20000);
  assert.deepEqual(got.map((m) => m.seq), Array.from({ length: 1000 }, (_, i) => i + 1));
  assert.ok(got.every((m, i) => m.text === payload(i)), "a payload differs");
});

test("an operator's disconnect (ADMIN_DISCONNECT) ends the client without a reconnect", async () => {
  const node = await startNode();
  const c = client({ url: node.wsUrl, token: mintToken({ user: "jack" }) });
  const seen = [];
  c.on("*", (ev) => seen.push(ev.type));
  await c.connect();
  await c.join("live:adm");
  const res = await node.admin("POST", "/v1/disconnect", { user: "jack", reason: "account suspended" });
  assert.deepEqual(res.body, { disconnected: 1 });
  await assert.rejects(take(c, 1), (e) => e instanceof KickedError && e.reasonName === "ADMIN_DISCONNECT"
    && e.message === "account suspended");
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(!seen.includes("reconnecting"), seen.join(","));
  assert.deepEqual(seen.slice(-2), ["kicked", "closed"]);
  assert.equal(c.stats.reconnects, 0);
});
