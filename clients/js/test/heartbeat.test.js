// The adaptive heartbeat's rules (src/heartbeat.js), step by step, without
// a network: the same cases as tests/test_heartbeat_tuner.py for the Python
// SDK, plus the stores. The search against a real node through a NAT-like
// proxy is in weak.test.js.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client, HeartbeatStore, HeartbeatTuner, localStorageHeartbeatStore } from "../fanout.js";

test("steps up, backs off to the last good interval and locks", () => {
  const tuner = new HeartbeatTuner(new HeartbeatStore(), "wifi", { stepAfter: 2, stepFactor: 2, startMs: 1000 });
  assert.equal(tuner.requestMs(), 2000);                       // searching: the step after startMs
  assert.equal(tuner.granted(60000, 500, 60000), 1000);        // starts at startMs, not the grant
  assert.equal(tuner.requestMs(), 2000);
  assert.equal(tuner.probeAnswered(1000, 60000), 1000);
  assert.equal(tuner.probeAnswered(1000, 60000), 2000);        // two answered: one step up
  assert.equal(tuner.probeAnswered(1000, 60000), 2000);        // a late probe of the old level: no count
  tuner.probeAnswered(2000, 60000);
  tuner.probeAnswered(2000, 60000);
  assert.deepEqual([tuner.intervalMs, tuner.goodMs], [4000, 2000]);
  tuner.deadLink();
  assert.deepEqual([tuner.intervalMs, tuner.locked], [2000, true]);
  assert.equal(tuner.requestMs(), 2000);                       // locked: ask for what was found
  for (let i = 0; i < 5; i++) tuner.probeAnswered(2000, 60000);
  assert.equal(tuner.intervalMs, 2000);                        // no more stepping up
  tuner.deadLink();                                            // the network changed its mind
  assert.equal(tuner.intervalMs, 1000);
  tuner.deadLink();
  assert.equal(tuner.intervalMs, 500);                         // never below the node's minimum
  tuner.deadLink();
  assert.equal(tuner.intervalMs, 500);
});

test("the start and the steps stay within the node's bounds", () => {
  const tuner = new HeartbeatTuner(new HeartbeatStore(), "", { stepAfter: 1, stepFactor: 10, startMs: 20000 });
  assert.equal(tuner.granted(10000, 1000, 30000), 10000);      // pings no rarer than granted
  assert.equal(tuner.intervalMs, 20000);
  tuner.probeAnswered(20000, 30000);
  assert.equal(tuner.intervalMs, 30000);                       // capped at the maximum
  const low = new HeartbeatTuner(new HeartbeatStore(), "", { startMs: 100 });
  low.granted(20000, 5000, 300000);
  assert.equal(low.intervalMs, 5000);                          // raised to the minimum
  // A remembered interval outside a node's bounds is brought inside them.
  const store = new HeartbeatStore();
  store.set("cell", { intervalMs: 900000, goodMs: 900000, locked: true });
  const far = new HeartbeatTuner(store, "cell");
  assert.equal(far.granted(300000, 5000, 300000), 300000);
  assert.deepEqual(store.get("cell"), { intervalMs: 300000, goodMs: 900000, locked: true });
});

test("a searching Hello asks for the next step, and a step stops at the grant", () => {
  // The node's idle cut follows what a searching client may do next: the
  // Hello asks for the current interval times the step (not the node's
  // maximum), the search never pings more rarely than granted, and the next
  // connection asks for the step this one could not take.
  const tuner = new HeartbeatTuner(new HeartbeatStore(), "cell", { stepAfter: 1, stepFactor: 1.5, startMs: 20000 });
  assert.equal(tuner.requestMs(), 30000);                      // 20 s x 1.5, bounds unknown
  // The node grants what was asked (within 5 s .. 300 s).
  assert.equal(tuner.granted(30000, 5000, 300000), 20000);
  assert.equal(tuner.probeAnswered(20000, 30000), 30000);      // one step: up to the grant
  assert.equal(tuner.probeAnswered(30000, 30000), 30000);      // the next (45 s) waits
  assert.deepEqual([tuner.intervalMs, tuner.goodMs], [30000, 30000]);
  assert.equal(tuner.requestMs(), 45000);                      // ... for the next connection's Hello
  assert.equal(tuner.granted(45000, 5000, 300000), 30000);
  assert.equal(tuner.probeAnswered(30000, 45000), 45000);
  // Near the maximum the request stops there, and a dead link locks at the
  // last interval that held, which the Hello then asks for.
  tuner.intervalMs = 250000;
  assert.equal(tuner.requestMs(), 300000);
  tuner.deadLink();
  assert.equal(tuner.locked, true);
  assert.deepEqual([tuner.requestMs(), tuner.intervalMs], [30000, 30000]);
});

test("the defaults are the Python SDK's: 20 s start, x1.5 after 3 answered probes", () => {
  const tuner = new HeartbeatTuner(new HeartbeatStore(), "");
  assert.deepEqual([tuner.startMs, tuner.stepFactor, tuner.stepAfter], [20000, 1.5, 3]);
  tuner.granted(300000, 5000, 300000);
  for (let i = 0; i < 3; i++) tuner.probeAnswered(20000, 300000);
  assert.equal(tuner.intervalMs, 30000);
  assert.throws(() => new HeartbeatTuner(new HeartbeatStore(), "", { stepFactor: 1 }), RangeError);
  assert.throws(() => new HeartbeatTuner(new HeartbeatStore(), "", { stepAfter: 0 }), RangeError);
  assert.throws(() => new HeartbeatTuner({}, ""), TypeError);
});

test("the store keeps each network apart, and a new tuner resumes from it", () => {
  const store = new HeartbeatStore();
  const home = new HeartbeatTuner(store, "wifi:home", { stepAfter: 1, startMs: 1000 });
  home.granted(1000, 100, 10000);
  home.probeAnswered(1000, 10000);
  home.deadLink();
  assert.deepEqual(store.get("wifi:home"), { intervalMs: 1000, goodMs: 1000, locked: true });
  const again = new HeartbeatTuner(store, "wifi:home");
  assert.deepEqual([again.intervalMs, again.goodMs, again.locked], [1000, 1000, true]);
  assert.equal(new HeartbeatTuner(store, "cell").intervalMs, 0);
  // What get() returns is a copy: changing it does not change the store.
  store.get("wifi:home").intervalMs = 5;
  assert.equal(store.get("wifi:home").intervalMs, 1000);
});

/** A Web Storage object as browsers have it (getItem/setItem of strings). */
class Storage {
  constructor() { this.items = new Map(); }
  getItem(k) { return this.items.has(k) ? this.items.get(k) : null; }
  setItem(k, v) { this.items.set(k, String(v)); }
}

test("localStorageHeartbeatStore keeps the state as JSON under one key, across pages", () => {
  const storage = new Storage();
  const store = localStorageHeartbeatStore({ storage });
  const tuner = new HeartbeatTuner(store, "wifi:home", { stepAfter: 1, startMs: 1000 });
  tuner.granted(1000, 100, 10000);
  tuner.probeAnswered(1000, 10000);
  tuner.deadLink();
  assert.deepEqual(JSON.parse(storage.getItem("fanout.heartbeat")),
    { "wifi:home": { intervalMs: 1000, goodMs: 1000, locked: true } });
  // Another page (a new store on the same storage) starts where this one is.
  const next = new HeartbeatTuner(localStorageHeartbeatStore({ storage }), "wifi:home");
  assert.deepEqual([next.intervalMs, next.locked, next.requestMs()], [1000, true, 1000]);
  // Unreadable JSON costs a new search, not an exception.
  storage.setItem("fanout.heartbeat", "{not json");
  assert.equal(localStorageHeartbeatStore({ storage }).get("wifi:home"), null);
  assert.equal(new HeartbeatTuner(localStorageHeartbeatStore({ storage }), "wifi:home").intervalMs, 0);
  const named = localStorageHeartbeatStore({ storage, key: "app.hb" });
  named.set("cell", { intervalMs: 3, goodMs: 0, locked: false });
  assert.deepEqual(Object.keys(JSON.parse(storage.getItem("app.hb"))), ["cell"]);
});

test("localStorageHeartbeatStore without localStorage (Node) or with a failing one keeps memory", () => {
  assert.equal(globalThis.localStorage, undefined, "this Node has a localStorage: the case below needs none");
  const store = localStorageHeartbeatStore();
  assert.equal(store.storage, null);
  store.set("wifi", { intervalMs: 42, goodMs: 0, locked: false });
  assert.deepEqual(store.get("wifi"), { intervalMs: 42, goodMs: 0, locked: false });
  const full = { getItem: () => null, setItem: () => { throw new Error("QuotaExceededError"); } };
  const quota = localStorageHeartbeatStore({ storage: full });
  quota.set("wifi", { intervalMs: 7, goodMs: 0, locked: false }); // does not throw
  const tuner = new HeartbeatTuner(quota, "wifi", { startMs: 1000 });
  assert.equal(tuner.granted(5000, 100, 10000), 1000);            // nor does the tuner
});

test("the client's options: network, store and search parameters reach the tuner; off means no request", () => {
  const opts = { url: "ws://127.0.0.1:1/ws", token: "t", WebSocket };
  const store = new HeartbeatStore();
  store.set("wifi:x", { intervalMs: 7000, goodMs: 7000, locked: true });
  const c = new Client({ ...opts, network: "wifi:x", heartbeatStore: store, heartbeatStartMs: 3000,
    heartbeatStep: 2, heartbeatStepAfter: 4 });
  assert.deepEqual([c.heartbeat.network, c.heartbeat.startMs, c.heartbeat.stepFactor, c.heartbeat.stepAfter],
    ["wifi:x", 3000, 2, 4]);
  assert.equal(c._hello().pingIntervalMs, 7000);                 // locked: the interval found
  const other = new Client({ ...opts, network: "cell:1", heartbeatStore: store });
  assert.equal(other._hello().pingIntervalMs, 30000);             // unknown: searching, asks for 20 s x 1.5
  const off = new Client({ ...opts, adaptiveHeartbeat: false });
  assert.equal(off.heartbeat, null);
  assert.equal(off._hello().pingIntervalMs, 0);                   // the node's default
  assert.deepEqual([off.race, off.raceStaggerMs, off.pongTimeoutMs], [3, 2500, 5000]);
  assert.throws(() => new Client({ ...opts, race: 0 }), RangeError);
  assert.throws(() => new Client({ ...opts, pongTimeoutMs: 0 }), RangeError);
  assert.throws(() => new Client({ ...opts, heartbeatStep: 1 }), RangeError);
});
