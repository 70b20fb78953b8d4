// The weak-network rules against real listeners on 127.0.0.1 (the Python
// SDK's tests/test_weak_network.py, for WebSockets): the adaptive heartbeat
// against a real node through a proxy that forgets silent connections as a
// NAT does, and racing URLs (a node behind a dead path, a refused port).
// Times are scaled down: a NAT timeout of 0.85 s, intervals from 300 ms.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket, { WebSocketServer } from "ws";
import { Client, HeartbeatStore, FanoutTimeoutError, FrameType, decodeFrames, encodeFrame } from "../fanout.js";
import { Node, Proxy, SilentListener, mintToken, refusedPort, LOOP } from "../testlib/node.js";

// A node with short heartbeats: 300 ms default, idle 900 ms, requests
// granted from 200 ms to 5 s (NODE in test_weak_network.py, with a minimum
// whose pong timeout, idle - grant = 400 ms, a busy machine can meet).
const HEARTBEAT = ["--ping-interval-ms", "300", "--idle-timeout-ms", "900",
  "--ping-interval-min-ms", "200", "--ping-interval-max-ms", "5000", "--log-level", "WARNING"];
const cleanups = [];
const clients = [];
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  for (const fn of cleanups.reverse()) await fn();
});
let node = null;
async function sharedNode() {
  if (!node) {
    node = await Node.start({ flags: HEARTBEAT });
    cleanups.push(() => node.stop("SIGKILL"));
  }
  return node;
}
function client(options) {
  const c = new Client({ WebSocket, backoffMinMs: 50, backoffMaxMs: 200, ...options });
  clients.push(c);
  return c;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(predicate, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await sleep(10);
  }
}

test(`heartbeat search through a NAT: one step per connection, each Hello asking for the next; backs off to the last good interval, locks, and the Hello asks for it (${LOOP})`, async () => {
  // 300 -> 450 -> 675 -> 1012 ms (two answered probes per step). Each Hello
  // asks for the next step, never the node's maximum, so the node's idle cut
  // follows the search, and a connection climbs one step: the test cuts the
  // link when one is done (as a network change would), and the next
  // connection asks for the next. At 1012 ms the NAT (850 ms) has forgotten
  // the connection: the probe goes unanswered, the client backs off to
  // 675 ms (the longest that held) and locks; its next Hello asks for 675 ms
  // and the node grants it.
  const n = await sharedNode();
  const proxy = await Proxy.start(n.wsPort, { natTimeoutMs: 850 });
  cleanups.push(() => proxy.close());
  const store = new HeartbeatStore();
  const c = client({ url: proxy.url(n.wsPath), token: mintToken({ user: "nat" }), network: "wifi:test",
    heartbeatStore: store, heartbeatStepAfter: 2, heartbeatStartMs: 300, pongTimeoutMs: 300 });
  const connected = [];
  const reasons = [];
  c.on("connected", (ev) => connected.push(ev));
  c.on("reconnecting", (ev) => reasons.push(ev.reasonName));
  const auth = await c.connect();
  assert.deepEqual([auth.pingIntervalMinMs, auth.pingIntervalMaxMs], [200, 5000]);
  const tuner = c.heartbeat;
  for (const [i, step] of [450, 675].entries()) {
    // Asked for the step (the node's maximum is 5000 ms), and the idle cut
    // in the node's ratio of it (900 : 300).
    await waitFor(() => connected.length === i + 1 && c.connected, 5000, `connection ${i + 1}`);
    assert.deepEqual([connected[i].pingIntervalMs, connected[i].idleTimeoutMs], [step, 3 * step]);
    // Two probes below the grant, a step to it, two there: held, it climbs
    // no further on this connection.
    const probes = c.stats.probes;
    await waitFor(() => c.stats.probes >= probes + 4, 10000, `four probes on connection ${i + 1}`);
    assert.deepEqual([tuner.intervalMs, tuner.goodMs, tuner.locked], [step, step, false]);
    assert.equal(c.stats.reconnects, i);
    proxy.cut();
  }
  await waitFor(() => connected.length === 3, 5000, "the third connection");
  assert.deepEqual([connected[2].pingIntervalMs, connected[2].idleTimeoutMs], [1012, 3036]); // the next step
  await waitFor(() => tuner.locked, 15000, "the search to lock");
  assert.ok(proxy.blackholed >= 1, "the NAT never forgot the connection");
  assert.equal(c.stats.deadLinks, 1);
  assert.deepEqual([tuner.intervalMs, tuner.goodMs], [675, 675]);
  await waitFor(() => c.stats.reconnects === 3 && c.connected, 5000, "the reconnect");
  assert.equal(reasons[2], "HEARTBEAT_TIMEOUT");
  // Locked: the Hello asks for the interval itself, and it holds.
  assert.equal(connected[3].pingIntervalMs, 675);
  assert.equal(connected[3].idleTimeoutMs, 2025);                  // the node's 900 : 300 ratio
  const probes = c.stats.probes;
  await sleep(2000);
  assert.ok(c.stats.probes > probes, "no probe answered while locked");
  assert.equal(tuner.intervalMs, 675);
  assert.equal(c.stats.deadLinks, 1);
  assert.equal(c.stats.reconnects, 3);
  assert.deepEqual(store.get("wifi:test"), { intervalMs: 675, goodMs: 675, locked: true });
  // A new client on the same network starts there, locked; another network
  // searches, its Hello asking for the first step (20 s x 1.5 by default).
  const again = new Client({ url: n.wsUrl, token: "t", WebSocket, network: "wifi:test", heartbeatStore: store });
  assert.deepEqual([again.heartbeat.locked, again._hello().pingIntervalMs], [true, 675]);
  const other = new Client({ url: n.wsUrl, token: "t", WebSocket, network: "cell:1", heartbeatStore: store });
  assert.deepEqual([other.heartbeat.intervalMs, other.heartbeat.locked, other._hello().pingIntervalMs], [0, false, 30000]);
});

test("a remembered interval below the node's minimum: the node grants its minimum and the client pings at it", async () => {
  const n = await sharedNode();
  const store = new HeartbeatStore();
  store.set("cell:x", { intervalMs: 50, goodMs: 50, locked: true });
  const c = client({ url: n.wsUrl, token: mintToken({ user: "low" }), network: "cell:x", heartbeatStore: store });
  const auth = await c.connect();
  // Asked for 50 ms, clamped to the node's 200 ms; idle 600 ms: only a
  // client pinging at the grant stays connected.
  assert.deepEqual([auth.pingIntervalMs, auth.idleTimeoutMs], [200, 600]);
  assert.equal(c.heartbeat.intervalMs, 200);
  assert.deepEqual(store.get("cell:x"), { intervalMs: 200, goodMs: 50, locked: true });
  await sleep(2000);
  assert.equal(c.stats.reconnects, 0);
  assert.equal(c.stats.deadLinks, 0);
  assert.equal(c.connected, true);
  assert.ok(c.stats.probes >= 5, `probes in 2 s at 200 ms: ${c.stats.probes}`);
  const { seq } = await c.join("live:low");
  assert.equal(seq, 0);
});

test("racing: a URL whose handshake never answers costs the stagger, then the next wins; the loser is closed", async () => {
  const n = await sharedNode();
  const silent = await SilentListener.start();
  cleanups.push(() => silent.close());
  const c = client({ urls: [silent.url(), n.wsUrl], token: mintToken({ user: "race1" }), raceStaggerMs: 300 });
  const t0 = performance.now();
  await c.connect();
  const took = performance.now() - t0;
  assert.ok(took >= 295 && took < 1000, `connected after ${took.toFixed(0)} ms`);
  assert.equal(c.url, n.wsUrl);
  assert.equal(silent.sockets.length, 1);
  await waitFor(() => silent.closed === 1, 2000, "the losing attempt to be closed");
  // The winner carries the session.
  assert.equal((await c.join("live:race")).seq, 0);
});

test("racing: a refused URL starts the next at once", async () => {
  const n = await sharedNode();
  const refused = `ws://127.0.0.1:${await refusedPort()}/ws`;
  const c = client({ urls: [refused, n.wsUrl], token: mintToken({ user: "race2" }), raceStaggerMs: 2000 });
  const t0 = performance.now();
  await c.connect();
  const took = performance.now() - t0;
  assert.ok(took < 1000, `connected after ${took.toFixed(0)} ms: waited for the stagger`);
  assert.equal(c.url, n.wsUrl);
});

test("racing: at most `race` URLs, and a connect timeout closes every attempt", async () => {
  const listeners = [];
  for (let i = 0; i < 4; i++) {
    const l = await SilentListener.start();
    cleanups.push(() => l.close());
    listeners.push(l);
  }
  const c = client({ urls: listeners.map((l) => l.url()), token: "t", race: 3, raceStaggerMs: 100,
    connectTimeoutMs: 800 });
  const t0 = performance.now();
  await assert.rejects(c.connect(), (e) => e instanceof FanoutTimeoutError);
  const took = performance.now() - t0;
  assert.ok(took >= 790 && took < 2000, `gave up after ${took.toFixed(0)} ms`);
  assert.deepEqual(listeners.map((l) => l.sockets.length), [1, 1, 1, 0]);
  await waitFor(() => listeners.every((l) => l.closed === l.sockets.length), 2000, "every attempt to be closed");
});

test("racing: when two open, only the first gets a Hello; the other is closed", async () => {
  // Two servers that both answer the handshake, dialled at once (stagger 0).
  const servers = [];
  for (let i = 0; i < 2; i++) {
    const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "fanout.v1" });
    await new Promise((r) => wss.once("listening", r));
    wss.hellos = 0;
    wss.on("connection", (ws) => ws.on("message", (data) => {
      const [f] = decodeFrames(new Uint8Array(data));
      if (f.type !== FrameType.HELLO) return;
      wss.hellos++;
      ws.send(encodeFrame(FrameType.AUTH_OK, { user: "u", session: `s${i}`, pingIntervalMs: 10000, idleTimeoutMs: 30000 }));
    }));
    cleanups.push(() => new Promise((r) => { for (const ws of wss.clients) ws.terminate(); wss.close(r); }));
    servers.push(wss);
  }
  const urls = servers.map((s) => `ws://127.0.0.1:${s.address().port}/ws`);
  const c = client({ urls, token: "t", raceStaggerMs: 0 });
  const auth = await c.connect();
  const winner = Number(auth.session.slice(1));
  assert.equal(c.url, urls[winner]);
  await sleep(300);
  assert.deepEqual(servers.map((s) => s.hellos), winner === 0 ? [1, 0] : [0, 1]);
  assert.equal(servers[1 - winner].clients.size, 0, "the loser is still open");
  assert.equal(servers[winner].clients.size, 1);
});
