// Adaptive heartbeat: the longest ping interval a network tolerates.
//
// A port of the Python SDK's fanout/client/heartbeat.py, with the same rules
// and defaults (docs/protocol.md section 5.6, "Client guidance"). A carrier's
// NAT forgets a silent TCP mapping after anything from 30 s to 30 min, then
// drops the connection's packets without a word: pinging at the shortest
// interval every network tolerates keeps a phone's radio awake far more than
// most networks need, pinging too rarely loses the connection silently.
//
// 1. Start safe: an unknown network starts at startMs (20 s, the node's
//    default), within the node's bounds.
// 2. Probe: a Ping after a full interval of silence both ways (80% of it:
//    the last Pong's round trip eats into it) is a probe; its Pong, if it is
//    the first frame after the Ping, is a success.
// 3. Step up: after stepAfter successes in a row the interval grows by
//    stepFactor, up to the node's maximum and to the connection's grant.
//    While searching the Hello asks for the next step (the current interval
//    times stepFactor) and the client pings at its current interval, more
//    often than granted: one step needs no reconnect, and the node's idle
//    timeout follows what the client may do next rather than the node's
//    maximum (with the defaults, a searching client's dead connection is cut
//    after 2.25 x 1.5 = 3.4 current intervals, not the 675 s of a 300 s
//    maximum). A step past the grant waits for the next connection, whose
//    Hello asks for it: a connection climbs one step. Once locked, the Hello
//    asks for the interval itself.
// 4. Back off and lock: a dead link (a Ping unanswered, or the idle timeout;
//    not a reset, not a Kick) steps back to the last interval that held and
//    locks; a dead link while locked steps back once more (to the node's
//    minimum at most).
// 5. Remember: the state is kept per network key in a store.

const UINT32_MAX = 0xffffffff;

/** What the tuners learnt, per network key, in memory: `{intervalMs, goodMs, locked}`. */
export class HeartbeatStore {
  constructor() {
    this._networks = new Map();
  }

  get(network) {
    const state = this._networks.get(network);
    return state ? { ...state } : null;
  }

  set(network, state) {
    this._networks.set(network, { ...state });
  }
}

/**
 * A store kept in a Web Storage object (`localStorage` by default) under
 * one key, as JSON, so a page remembers what it learnt across visits.
 * Without a storage (Node, a worker, storage disabled) it keeps the state
 * in memory only; a storage that throws (quota, private mode) or holds
 * something unreadable costs a new search, never the connection.
 */
export function localStorageHeartbeatStore({ key = "fanout.heartbeat", storage } = {}) {
  if (storage === undefined) {
    try {
      storage = globalThis.localStorage; // a getter that throws where storage is blocked
    } catch {
      storage = undefined;
    }
  }
  let networks = {};
  const load = () => {
    if (!storage) return;
    try {
      const data = JSON.parse(storage.getItem(key) ?? "{}");
      networks = data && typeof data === "object" && !Array.isArray(data) ? data : {};
    } catch {
      networks = {};
    }
  };
  return {
    storage: storage ?? null,
    get(network) {
      load(); // another tab may have learnt something since
      const state = networks[network];
      return state && typeof state === "object" ? { ...state } : null;
    },
    set(network, state) {
      load();
      networks[network] = { ...state };
      if (!storage) return;
      try {
        storage.setItem(key, JSON.stringify(networks));
      } catch { /* kept in memory for this page */ }
    },
  };
}

/** The store clients share when given none: in memory, per JavaScript realm. */
export const DEFAULT_STORE = new HeartbeatStore();

const int = (v) => (Number.isFinite(Number(v)) && Number(v) > 0 ? Math.floor(Number(v)) : 0);

/** The search of one network. */
export class HeartbeatTuner {
  /**
   * @param store where the state of `network` is kept ({get, set}).
   * @param network the key of the network the device is on ("wifi:home"); "" is one too.
   * @param options stepAfter (3) successful probes in a row before a step up,
   *   stepFactor (1.5, > 1) of a step, startMs (20000) on an unknown network.
   */
  constructor(store, network = "", { stepAfter = 3, stepFactor = 1.5, startMs = 20000 } = {}) {
    if (!(Number.isInteger(stepAfter) && stepAfter >= 1 && stepFactor > 1)) {
      throw new RangeError("need heartbeatStepAfter >= 1 (an integer) and heartbeatStep > 1");
    }
    if (!(startMs > 0)) throw new RangeError("need heartbeatStartMs > 0");
    if (!store || typeof store.get !== "function" || typeof store.set !== "function") {
      throw new TypeError("heartbeatStore needs get(network) and set(network, state)");
    }
    this.store = store;
    this.network = network;
    this.stepAfter = stepAfter;
    this.stepFactor = stepFactor;
    this.startMs = Math.floor(startMs);
    let state = null;
    try {
      state = store.get(network);
    } catch { /* a broken store costs a new search */ }
    state = state && typeof state === "object" ? state : {};
    /** Current interval in ms; 0 until the first AuthOk. */
    this.intervalMs = int(state.intervalMs);
    /** The longest interval with a successful probe (0: none yet). */
    this.goodMs = int(state.goodMs);
    this.locked = state.locked === true;
    this.successes = 0; // probes in a row at intervalMs
    this._minMs = 0;
    this._maxMs = 0;
  }

  /** What the next Hello asks for: the interval found, once locked; while
   * searching, the next step from the current interval (from startMs on a
   * new network), within the node's maximum once known (the node clamps a
   * request to its bounds anyway). */
  requestMs() {
    if (this.locked && this.intervalMs) return this.intervalMs;
    return Math.min(this._step(this.intervalMs || this.startMs), UINT32_MAX);
  }

  /** Take a connection's AuthOk; returns the ms to ping at (the current
   * interval, never above the grant). */
  granted(intervalMs, minMs, maxMs) {
    this._minMs = minMs || 0;
    this._maxMs = maxMs || 0;
    const clamp = (v) => Math.min(Math.max(v, minMs), maxMs);
    if (!this.intervalMs) {
      this.intervalMs = minMs && maxMs ? clamp(this.startMs) : this.startMs;
      this._save();
    } else if (minMs && maxMs && !(minMs <= this.intervalMs && this.intervalMs <= maxMs)) {
      this.intervalMs = clamp(this.intervalMs);
      this._save();
    }
    this.successes = 0;
    return Math.min(this.intervalMs, intervalMs);
  }

  /** A probe at `intervalMs` was answered; returns the (maybe longer) ms
   * to ping at from now on, within `grantMs`. */
  probeAnswered(intervalMs, grantMs) {
    this.goodMs = Math.max(this.goodMs, intervalMs);
    if (this.locked || intervalMs < this.intervalMs) {
      this._save();
      return Math.min(this.intervalMs, grantMs);
    }
    this.successes++;
    if (this.successes >= this.stepAfter) {
      // Never past this connection's grant: the node would cut a client
      // pinging more rarely. The next Hello asks for the step.
      const stepped = Math.min(this._step(this.intervalMs), grantMs);
      if (stepped > this.intervalMs) this.intervalMs = stepped;
      this.successes = 0;
    }
    this._save();
    return Math.min(this.intervalMs, grantMs);
  }

  /** A dead link was detected: back off and lock. */
  deadLink() {
    let backed;
    if (!this.locked && this.goodMs && this.goodMs < this.intervalMs) backed = this.goodMs;
    else backed = Math.floor(this.intervalMs / this.stepFactor);
    if (this._minMs) backed = Math.max(backed, this._minMs);
    this.intervalMs = Math.max(1, backed);
    this.goodMs = Math.min(this.goodMs, this.intervalMs);
    this.locked = true;
    this.successes = 0;
    this._save();
  }

  _step(intervalMs) {
    const stepped = Math.floor(intervalMs * this.stepFactor);
    return this._maxMs ? Math.min(stepped, this._maxMs) : stepped;
  }

  _save() {
    try {
      this.store.set(this.network, { intervalMs: this.intervalMs, goodMs: this.goodMs, locked: this.locked });
    } catch { /* a store that fails costs the memory of the search, not the connection */ }
  }
}
