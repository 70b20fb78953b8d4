// The client against a scripted WebSocket server on 127.0.0.1 that sends
// what a correct node never does (bad frames, a close code without its
// frame, text), to check the client refuses it clearly and reacts as the
// protocol says. The real node is in e2e.test.js.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { createServer as createHttpsServer } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket, { WebSocketServer } from "ws";
import {
  Client, FrameType, HeartbeatStore, encodeFrame, decodeFrames, decodeMessage, proto as pb,
} from "../fanout.js";

const servers = [];
after(() => Promise.all(servers.map((s) => new Promise((r) => { for (const c of s.clients) c.terminate(); s.close(r); }))));

/** A server running `script(ws, hello, n)` for the n-th connection, after its Hello. */
async function scripted(script, tls = null) {
  const handleProtocols = (p) => (p.has("fanout.v1") ? "fanout.v1" : false);
  let wss;
  if (tls) {
    const https = createHttpsServer(tls);
    wss = new WebSocketServer({ server: https, handleProtocols });
    await new Promise((r) => https.listen(0, "127.0.0.1", r));
    wss.address = () => https.address();
    const close = wss.close.bind(wss);
    wss.close = (cb) => close(() => https.close(cb));
  } else {
    wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols });
    await new Promise((r) => wss.once("listening", r));
  }
  servers.push(wss);
  let n = 0;
  wss.hellos = [];
  wss.on("connection", (ws) => {
    const k = n++;
    ws.once("message", (data) => {
      const [f] = decodeFrames(new Uint8Array(data));
      assert.equal(f.type, FrameType.HELLO);
      const hello = decodeMessage(f.type, f.body);
      wss.hellos.push(hello);
      script(ws, hello, k);
    });
  });
  return { wss, url: `${tls ? "wss" : "ws"}://127.0.0.1:${wss.address().port}/ws` };
}
const authOk = (ws) => ws.send(encodeFrame(FrameType.AUTH_OK, {
  user: "u", session: "s", pingIntervalMs: 10000, idleTimeoutMs: 30000, serverTimeMs: Date.now(), compressDict: 1,
}));
const frame = (hexHeader, body = "") => Buffer.from(hexHeader + body, "hex");
const client = (url, extra = {}) => new Client({ url, token: "t", WebSocket, backoffMinMs: 20, backoffMaxMs: 50, ...extra });
const nextOf = async (c, type) => { for (;;) { const ev = await c.nextEvent(5000); if (ev.type === type) return ev; } };

for (const [name, bytes, reasonName] of [
  ["an undefined flag bit", frame("0145800000000002", "0807"), "BAD_FRAME"],
  ["a bad version", frame("0245000000000002", "0807"), "UNSUPPORTED_VERSION"],
  ["a nonzero reserved byte", frame("0145000100000002", "0807"), "BAD_FRAME"],
  ["a frame cut short", frame("0145000000000009", "0807"), "BAD_FRAME"],
  ["a corrupt lz4 body", frame("0143010000000006", "ff000000ffff"), "BAD_COMPRESSION"],
  ["an lz4 body naming an unknown dictionary", frame("0143030000000006", "0a000000c800"), "BAD_COMPRESSION"],
  ["a body that is not protobuf", frame("0147000000000002", "12c8"), "BAD_PROTOBUF"],
  ["a text message", "hello", "BAD_FRAME"],
]) {
  test(`a node sending ${name} is dropped (${reasonName}) and the client reconnects`, async () => {
    const { url } = await scripted((ws, hello, k) => { authOk(ws); if (k === 0) ws.send(bytes); });
    const c = client(url);
    await c.connect();
    const ev = await nextOf(c, "reconnecting");
    assert.equal(ev.reasonName, reasonName, ev.message);
    assert.equal((await nextOf(c, "connected")).reconnect, true);
    await c.close();
  });
}

test("a frame type the client does not know is ignored", async () => {
  const { url } = await scripted((ws) => {
    authOk(ws);
    ws.send(frame("0160000000000002", "0807"));
    ws.send(encodeFrame(FrameType.PRESENCE, { room: "x", online: 3 }));
  });
  const c = client(url);
  c._cursors.set("x", { epoch: "", seq: 0 });
  await c.connect();
  assert.deepEqual({ ...(await nextOf(c, "presence")) }, { type: "presence", room: "x", online: 3 });
  assert.equal(c.connected, true);
  await c.close();
});

test("the close code stands for a lost Kick: 4032 ends the client with DUPLICATE_LOGIN", async () => {
  const { url } = await scripted((ws) => { authOk(ws); setTimeout(() => ws.close(4032, "DUPLICATE_LOGIN"), 50); });
  const c = client(url);
  await c.connect();
  await assert.rejects(nextOf(c, "never"), (e) => e.name === "KickedError" && e.reasonName === "DUPLICATE_LOGIN");
});

test("a close code 4012 before AuthOk rejects connect() with AUTH_INVALID", async () => {
  const { url } = await scripted((ws) => ws.close(4012, "AUTH_INVALID"));
  await assert.rejects(client(url).connect(), (e) => e.name === "AuthError" && e.reasonName === "AUTH_INVALID");
});

test("Kick(SERVER_SHUTDOWN) is honoured: the reconnect waits reconnect_after_ms, and resumes the rooms", async () => {
  const { wss, url } = await scripted((ws, hello, k) => {
    authOk(ws);
    if (k === 0) ws.send(encodeFrame(FrameType.KICK, { reason: pb.Reason.SERVER_SHUTDOWN, reconnectAfterMs: 400 }));
  });
  const c = client(url);
  c._cursors.set("live:1", { epoch: "e7", seq: 41 });
  await c.connect();
  const t0 = Date.now();
  const ev = await nextOf(c, "reconnecting");
  assert.equal(ev.reasonName, "SERVER_SHUTDOWN");
  assert.ok(ev.delayMs >= 400 && ev.delayMs <= 400 + 20, `delay ${ev.delayMs}`);
  await nextOf(c, "connected");
  assert.ok(Date.now() - t0 >= 390);
  const resume = wss.hellos[1].resume.map((r) => [r.room, Number(r.lastSeq), r.epoch]);
  assert.deepEqual(resume, [["live:1", 41, "e7"]]);
  await c.close();
});

test("a closing Error that a new token cannot fix ends the client; AUTH_TIMEOUT is retried", async () => {
  const { url } = await scripted((ws, hello, k) => {
    if (k === 0) { authOk(ws); ws.close(1000); return; }
    ws.send(encodeFrame(FrameType.ERROR, { reason: k === 1 ? pb.Reason.AUTH_TIMEOUT : pb.Reason.TOKEN_REVOKED }));
  });
  const c = client(url);
  await c.connect();
  const reasons = [];
  c.on("reconnecting", (ev) => reasons.push(ev.reasonName));
  await assert.rejects(nextOf(c, "never"), (e) => e.name === "AuthError" && e.reasonName === "TOKEN_REVOKED");
  assert.deepEqual(reasons, ["", "AUTH_TIMEOUT"]);
});

test("requests in flight when the connection drops fail with ConnectionLostError", async () => {
  const { url } = await scripted((ws, hello, k) => {
    authOk(ws);
    if (k === 0) ws.once("message", () => ws.terminate()); // the Join is never answered
  });
  const c = client(url);
  await c.connect();
  await assert.rejects(c.join("r"), (e) => e.name === "ConnectionLostError");
  assert.equal(c.cursor("r"), undefined);
  await c.close();
});

test("wss:// with the ws package: wsOptions carries the CA that signed the node's certificate", async () => {
  const dir = mkdtempSync(join(tmpdir(), "fanout-js-tls-"));
  execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
    "-addext", "subjectAltName=IP:127.0.0.1"], { stdio: "ignore" });
  const cert = readFileSync(join(dir, "cert.pem"));
  const { url } = await scripted((ws) => authOk(ws), { cert, key: readFileSync(join(dir, "key.pem")) });
  assert.ok(url.startsWith("wss://"));
  // Not trusted without the CA: a connection error, not an AuthOk.
  await assert.rejects(client(url).connect(), (e) => e.name === "ConnectionLostError");
  const c = client(url, { wsOptions: { ca: cert } });
  assert.equal((await c.connect()).user, "u");
  await c.close();
});

test("heartbeat: the Hello asks for the search's interval, Pings never come rarer than granted, an unanswered one is a dead link", async () => {
  // A node without bounds in its AuthOk (an older node): the search keeps
  // its 20 s start, yet the client pings at the 200 ms grant. From the
  // third Ping on the first connection nothing is answered: the pong
  // timeout (300 ms) runs from the first unanswered Ping, though Pings go
  // out every 200 ms; the link is dead, the search locks, the client
  // reconnects.
  const pings = [[], []];
  const { wss, url } = await scripted((ws, hello, k) => {
    ws.send(encodeFrame(FrameType.AUTH_OK, { user: "u", session: "s", pingIntervalMs: 200, idleTimeoutMs: 5000 }));
    ws.on("message", (data) => {
      for (const f of decodeFrames(new Uint8Array(data))) {
        if (f.type !== FrameType.PING) continue;
        const { nonce } = decodeMessage(f.type, f.body);
        pings[Math.min(k, 1)].push(performance.now());
        if (k > 0 || pings[0].length < 3) ws.send(encodeFrame(FrameType.PONG, { nonce, serverTimeMs: Date.now() }));
      }
    });
  });
  const c = client(url, { network: "t:1", heartbeatStore: new HeartbeatStore(), pongTimeoutMs: 300 });
  await c.connect();
  assert.equal(wss.hellos[0].pingIntervalMs, 30000);        // searching: asks for the step, 20 s x 1.5
  let deadAt = 0;
  c.on("reconnecting", () => { deadAt ||= performance.now(); });
  const ev = await nextOf(c, "reconnecting");
  assert.equal(ev.reasonName, "HEARTBEAT_TIMEOUT");
  assert.match(ev.message, /ping unanswered for 300 ms/);
  const detected = deadAt - pings[0][2];
  assert.ok(detected >= 250 && detected < 500, `dead link noticed ${detected.toFixed(0)} ms after the unanswered Ping`);
  const gaps = pings[0].slice(1).map((t, i) => t - pings[0][i]);
  assert.ok(gaps.every((g) => g > 150 && g < 400), `ping gaps ${gaps.map(Math.round)}`);
  assert.equal(c.stats.deadLinks, 1);
  assert.equal(c.stats.probes, 2);                           // the two Pongs that came alone
  // Back to the longest interval that held (the grant's), locked.
  assert.deepEqual([c.heartbeat.intervalMs, c.heartbeat.goodMs, c.heartbeat.locked], [200, 200, true]);
  await nextOf(c, "connected");
  assert.equal(wss.hellos[1].pingIntervalMs, 200);            // locked: asks for it
  await c.close();
});
