// fanout JavaScript client (wire protocol v1 over WebSocket, docs/protocol.md).
// Modelled on the Python SDK, fanout/client/sdk.py: same reconnect, resume,
// cursor, token and weak-network rules (adaptive heartbeat, racing); README.md
// documents the API.
import {
  FrameType, MAX_SERVER_FRAME, DICTIONARIES, WireError,
  decodeFrames, decodeMessage, encodeFrame, kindName, reasonName, toNumber, pb,
} from "./src/wire.js";
import { DEFAULT_STORE, HeartbeatTuner } from "./src/heartbeat.js";
import { dropWebSocket, raceWebSockets } from "./src/race.js";

export { HeartbeatStore, HeartbeatTuner, localStorageHeartbeatStore } from "./src/heartbeat.js";
export { FrameType, WireError, reasonName, kindName } from "./src/wire.js";
export { decodeFrames, decodeMessage, encodeFrame, DICTIONARIES } from "./src/wire.js";

export const VERSION = "0.1.0";
/** Reason codes by name and names by code (fanout.proto `Reason`). */
export const Reason = pb.Reason;

const R = pb.Reason;
// Reasons after which reconnecting cannot help (sdk.py _FATAL_REASONS).
// AUTH_TIMEOUT is left out on purpose: a Hello delayed by a bad network
// deserves a retry.
const FATAL = new Set([
  R.AUTH_REQUIRED, R.AUTH_MISSING, R.AUTH_INVALID, R.AUTH_EXPIRED,
  R.ALREADY_AUTHENTICATED, R.DUPLICATE_LOGIN, R.ADMIN_DISCONNECT,
  R.TOKEN_EXPIRED, R.TOKEN_REVOKED,
]);
// Fatal unless getToken can get a new token.
const EXPIRED = new Set([R.AUTH_EXPIRED, R.TOKEN_EXPIRED]);
const AUTH_REASONS = new Set([10, 11, 12, 13, 14, 15, R.TOKEN_REVOKED]);
// Error reasons after which the node closes the connection.
const CLOSING_ERRORS = new Set([1, 2, 3, 4, 5, 6, ...AUTH_REASONS,
  R.CONNECTION_LIMIT, R.CONNECTION_RATE_LIMITED, R.ADDRESS_LIMIT, R.TOO_MANY_REQUESTS,
  R.INTERNAL_ERROR]);

// Token refresh at this fraction of the remaining lifetime, +- the jitter.
const REFRESH_AT = 0.8;
const REFRESH_JITTER = 0.05;
const REFRESH_RETRY_MIN_MS = 1000;
// Used only if a node's AuthOk leaves the heartbeat fields at 0.
const DEFAULT_PING_INTERVAL_MS = 15000;
const IDLE_PER_PING = 3;
// A Ping after this share of the interval in silence (both ways) is a probe
// of the adaptive heartbeat: pinging on the node's schedule, the last Pong's
// round trip eats into the silence.
const PROBE_SILENCE = 0.8;
const WS_OPEN = 1;

const now = () => performance.now();
const utf8 = new TextEncoder();
const textDecoder = new TextDecoder();

// ------------------------------------------------------------------ errors

/** Base of the SDK's errors: `reason` is a fanout Reason code (0: not from the node). */
export class FanoutError extends Error {
  constructor(reason, message = "", extra = {}) {
    super(message || reasonName(reason));
    this.name = "FanoutError";
    this.reason = reason;
    this.reasonName = reason ? reasonName(reason) : "";
    Object.assign(this, extra);
  }
}
/** The node refused the Hello (bad, expired or missing token, ...). */
export class AuthError extends FanoutError {
  constructor(reason, message, extra) { super(reason, message, extra); this.name = "AuthError"; }
}
/** The node answered join/leave/say/refresh with an Error; `room` is the request's. */
export class RequestError extends FanoutError {
  constructor(reason, message, extra) { super(reason, message, extra); this.name = "RequestError"; }
}
/** The node ended the session for good (duplicate login, auth failure, admin). */
export class KickedError extends FanoutError {
  constructor(reason, message, extra) { super(reason, message, extra); this.name = "KickedError"; }
}
/** The connection ended (before a reply, or for good when not reconnecting).
 * `reconnectAfterMs`: what the node's Kick asked the client to wait. */
export class ConnectionLostError extends FanoutError {
  constructor(reason, message, extra) {
    super(reason, message, { reconnectAfterMs: 0, ...extra });
    this.name = "ConnectionLostError";
  }
}
/** No reply (or no AuthOk) in time. */
export class FanoutTimeoutError extends FanoutError {
  constructor(message) { super(0, message); this.name = "FanoutTimeoutError"; }
}

// ------------------------------------------------------------------ events

/** A room message (`type: "message"`). */
export class RoomMessage {
  constructor(m, epoch, sampled) {
    this.type = "message";
    this.room = m.room;
    this.seq = toNumber(m.seq);
    this.epoch = epoch;
    this.kind = kindName(m.kind);
    this.priority = m.priority;
    this.sender = m.sender;
    this.payload = m.payload;
    this.serverTsMs = toNumber(m.serverTsMs);
    this.sampled = sampled;
  }
  /** The payload decoded as UTF-8. */
  get text() {
    return textDecoder.decode(this.payload);
  }
}

/** The `exp` of a JWT in unix ms, read without checking it, or null. */
function tokenExpMs(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return Number.isInteger(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------ connection

/** One WebSocket connection (the open winner of a race); a Client goes
 * through many. It sends the Hello at once. */
class Connection {
  constructor(client, ws, url) {
    this.client = client;
    this.url = url;
    this.auth = null;
    this.started = now();
    this.lastRecv = this.started;
    this.lastSent = this.started;
    this.pong = 0;        // nonce of the last Pong
    this.pongFrames = 0;  // the client's frame count at it
    this.error = null;
    this.timers = new Set();
    this.ended = new Promise((resolve) => { this._resolveEnded = resolve; });
    this.ws = ws;
    this._on = {
      message: (ev) => this._message(ev.data),
      close: (ev) => this._closed(ev),
      error: () => this.fail(new ConnectionLostError(0, `WebSocket error on ${url}`)),
    };
    for (const [name, fn] of Object.entries(this._on)) this.ws.addEventListener(name, fn);
    this.send(FrameType.HELLO, client._hello());
  }

  send(type, fields) {
    if (this.error || this.ws.readyState !== WS_OPEN) return false;
    try {
      this.ws.send(encodeFrame(type, fields));
      this.lastSent = now();
      return true;
    } catch (e) {
      this.fail(new ConnectionLostError(0, `send failed: ${e.message}`));
      return false;
    }
  }

  timer(fn, ms) {
    const t = setTimeout(() => { this.timers.delete(t); fn(); }, Math.max(0, ms));
    this.timers.add(t);
    return t;
  }

  /** Record why the connection ends (first cause wins) and drop it at once:
   * a dead link's close handshake could take minutes. */
  fail(error) {
    if (this.error) return;
    this.error = error;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    dropWebSocket(this.ws, this._on);
    this._resolveEnded(error);
  }

  _message(data) {
    this.lastRecv = now();
    if (typeof data === "string") {
      this.fail(new ConnectionLostError(R.BAD_FRAME, "text WebSocket message from the node"));
      return;
    }
    const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
      : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    let frames;
    try {
      frames = decodeFrames(bytes, MAX_SERVER_FRAME);
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      this.fail(new ConnectionLostError(e.reason, `bad frame from the node: ${e.message}`));
      return;
    }
    for (const { type, body } of frames) {
      if (this.error) return;
      const error = this.client._dispatch(this, type, body);
      if (error) this.fail(error);
    }
  }

  _closed(ev) {
    // A closing Error or Kick ends the connection before the Close; the
    // close code matters only if that frame was lost (4000 + Reason).
    const code = ev.code;
    if (code >= 4000 && code < 4100) {
      const reason = code - 4000;
      const msg = `node closed the connection: ${ev.reason || reasonName(reason)} (${code})`;
      if (!this.auth) {
        this.fail(AUTH_REASONS.has(reason) ? new AuthError(reason, msg) : new ConnectionLostError(reason, msg));
      } else {
        this.fail(FATAL.has(reason) ? new KickedError(reason, msg) : new ConnectionLostError(reason, msg));
      }
      return;
    }
    this.fail(new ConnectionLostError(0, this.auth
      ? `node closed the connection (${code})`
      : `connection closed before AuthOk (${code}${ev.reason ? " " + ev.reason : ""})`));
  }
}

// ------------------------------------------------------------------ client

/**
 * A connection to a fanout node that survives disconnects. See README.md.
 */
export class Client {
  constructor(options = {}) {
    const o = options;
    const urls = o.urls ?? o.url;
    this.urls = [...new Set((Array.isArray(urls) ? urls : [urls]).filter(Boolean))];
    if (!this.urls.length) throw new TypeError("need url (a ws:// or wss:// URL, or a list)");
    this._urlIndex = 0;
    this.token = o.token ?? null;
    this.getToken = o.getToken ?? null;
    if (!this.token && !this.getToken) throw new TypeError("need token or getToken");
    this.deviceId = o.deviceId ?? "";
    this.deviceClass = o.deviceClass ?? "web";
    this.clientName = o.clientName ?? `fanout-js/${VERSION}`;
    this.reconnect = o.reconnect ?? true;
    this.backoffMinMs = o.backoffMinMs ?? 200;
    this.backoffMaxMs = o.backoffMaxMs ?? 10000;
    if (!(this.backoffMinMs > 0 && this.backoffMinMs <= this.backoffMaxMs)) {
      throw new RangeError("need 0 < backoffMinMs <= backoffMaxMs");
    }
    this.connectTimeoutMs = o.connectTimeoutMs ?? 5000;
    this.requestTimeoutMs = o.requestTimeoutMs ?? 10000;
    this.race = o.race ?? 3;
    this.raceStaggerMs = o.raceStaggerMs ?? 2500;
    this.pongTimeoutMs = o.pongTimeoutMs ?? 5000;
    if (!(Number.isInteger(this.race) && this.race >= 1 && this.raceStaggerMs >= 0 && this.pongTimeoutMs > 0)) {
      throw new RangeError("need race >= 1 (an integer), raceStaggerMs >= 0 and pongTimeoutMs > 0");
    }
    /** The heartbeat search of `network` (null: adaptiveHeartbeat off). */
    this.heartbeat = (o.adaptiveHeartbeat ?? true)
      ? new HeartbeatTuner(o.heartbeatStore ?? DEFAULT_STORE, o.network ?? "", {
        stepAfter: o.heartbeatStepAfter ?? 3,
        stepFactor: o.heartbeatStep ?? 1.5,
        startMs: o.heartbeatStartMs ?? 20000,
      })
      : null;
    this.protocols = o.protocols ?? ["fanout.v1"];
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this.wsOptions = o.wsOptions ?? null;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no global WebSocket: pass the WebSocket option (e.g. the ws package's)");
    }
    this._iterate = o.iterate ?? true;
    /** Counters, as the Python SDK's. */
    this.stats = {
      frames: 0, messages: 0, duplicates: 0, gaps: 0, reconnects: 0, sampledBatches: 0, refreshes: 0,
      deadLinks: 0, probes: 0,
    };
    this._cursors = new Map(); // room -> {epoch, seq}: joined rooms, last seq accounted for
    // The user's channel as the node named it in AuthOk: resumed through
    // the Hello's channel fields, not as a resume point.
    this._channel = null;
    this._online = new Map();
    this._pending = new Map(); // req_id -> {type, room, resolve, reject}
    this._lastReqId = 0;
    this._listeners = new Map();
    this._queue = [];
    this._waiters = [];
    this._conn = null;       // the authenticated connection, if any
    this._readyWaiters = []; // requests waiting for a connection
    this._clockOffsetMs = 0;
    this._started = false;
    this._closed = false;
    this._ended = false;
    this._endError = null;
    this._wake = null;       // cuts a reconnect sleep short on close()
    this._dial = null;       // the race in progress, if any
  }

  // ---------------------------------------------------------------- public API

  /** Connect, authenticate and resume the joined rooms. One attempt: a
   * failure rejects (FanoutError); reconnecting starts after a first success.
   * @returns the connection's AuthOk fields */
  async connect() {
    if (this._closed) throw new Error("client is closed");
    if (this._started) throw new Error("connect() was already called");
    this._started = true;
    let conn;
    try {
      if (!this.token) this.token = await this._newToken();
      conn = await this._open();
    } catch (e) {
      this._started = false;
      throw e;
    }
    if (this._closed) { // close() was called while connecting
      conn.fail(new ConnectionLostError(0, "client closed"));
      this._conn = null;
      throw new ConnectionLostError(0, "client closed while connecting");
    }
    this._run(conn);
    return this.auth;
  }

  /** Stop reconnecting, close the connection, end iteration. Queued events
   * are discarded; pending requests fail with ConnectionLostError. */
  async close() {
    if (this._closed) return;
    this._closed = true;
    if (this._wake) this._wake();
    this._dial?.cancel(new ConnectionLostError(0, "client closed while connecting"));
    const conn = this._conn;
    if (conn) conn.fail(new ConnectionLostError(0, "client closed"));
    this._disconnected(new ConnectionLostError(0, "client closed"));
    this._finish(null, true);
  }

  /** Join a room, or resume it after `lastSeq` of `epoch`. Resolves with the
   * Ack ({room, seq, epoch}); `seq` becomes the room's cursor. */
  join(room, { lastSeq = 0, epoch = "" } = {}) {
    return this._request(FrameType.JOIN, { room, lastSeq, epoch });
  }

  /** Leave a room; its messages are dropped from the moment of the call. */
  leave(room) {
    return this._request(FrameType.LEAVE, { room });
  }

  /** Publish to a joined room; a string is sent as UTF-8. Resolves with the
   * Ack whose `seq` is the message's. */
  say(room, payload) {
    if (typeof payload === "string") payload = utf8.encode(payload);
    return this._request(FrameType.CHAT, { room, payload });
  }

  /** Give the live connection a new token (default: from getToken). */
  async refresh(token) {
    if (token == null) token = await this._newToken();
    await this._waitConnected(now() + this.requestTimeoutMs);
    if (!this._conn.auth.tokenExpiresMs) {
      throw new RequestError(0, "this node does not take Refresh (AuthOk.token_expires_ms is 0)");
    }
    const ack = await this._request(FrameType.REFRESH, { token });
    this.token = token;
    this.stats.refreshes++;
    return ack;
  }

  /** The room's online count from the last Presence frame, or undefined. */
  online(room) {
    return this._online.get(room);
  }

  /** {epoch, seq} of the last message accounted for in `room`, or undefined if not joined. */
  cursor(room) {
    const c = this._cursors.get(room);
    return c ? { epoch: c.epoch, seq: c.seq } : undefined;
  }

  /** The joined rooms (the ones resumed on reconnect); the user's channel is `channel`. */
  get rooms() {
    return [...this._cursors.keys()].filter((room) => room !== this._channel);
  }

  /** The user's channel ("@" + user) once connected to a node with user
   * channels, else null. Pushes to this user (the admin API's publish with
   * "user") arrive as messages of this room, with seqs, and resume like a
   * room's. Every connection of the user is a member from its AuthOk on;
   * leave() of it lasts until the next connection. */
  get channel() {
    return this._channel;
  }

  /** Whether a connection is authenticated right now. */
  get connected() {
    return this._conn !== null;
  }

  /** The current connection's AuthOk fields, or null. */
  get auth() {
    return this._conn ? authInfo(this._conn) : null;
  }

  /** The URL of the current (or next) connection. */
  get url() {
    return this.urls[this._urlIndex];
  }

  /** Listen to events of `type` ("message", "gap", "presence", "error",
   * "connected", "reconnecting", "kicked", "closed", or "*" for all).
   * @returns a function that removes the listener */
  on(type, fn) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /** The next queued event; undefined once the client was closed. Rejects
   * with the FanoutError that ended the client, or a FanoutTimeoutError. */
  nextEvent(timeoutMs) {
    if (!this._iterate) throw new Error("constructed with iterate: false");
    if (this._queue.length) return this._take();
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      if (timeoutMs != null) {
        waiter.timer = setTimeout(() => {
          this._waiters.splice(this._waiters.indexOf(waiter), 1);
          reject(new FanoutTimeoutError(`no event within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this._waiters.push(waiter);
    });
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      const ev = await this.nextEvent();
      if (ev === undefined) return;
      yield ev;
    }
  }

  // ---------------------------------------------------------------- events

  _emit(ev, queue = true) {
    if (queue && this._iterate && !this._ended) {
      this._queue.push(ev);
      while (this._waiters.length && this._queue.length) {
        const w = this._waiters.shift();
        clearTimeout(w.timer);
        this._take().then(w.resolve, w.reject);
      }
    }
    for (const key of [ev.type, "*"]) {
      const set = this._listeners.get(key);
      if (!set) continue;
      for (const fn of [...set]) {
        try {
          fn(ev);
        } catch (e) {
          // A listener's bug must not break the connection; surface it.
          setTimeout(() => { throw e; });
        }
      }
    }
  }

  _take() {
    const item = this._queue[0];
    if (item === END) {
      return this._endError ? Promise.reject(this._endError) : Promise.resolve(undefined);
    }
    this._queue.shift();
    return Promise.resolve(item);
  }

  /** End iteration with `error` (null: cleanly), after the events queued
   * unless `discard`. */
  _finish(error, discard = false) {
    if (this._ended && !discard) return;
    const first = !this._ended;
    if (discard) this._queue.length = 0;
    this._ended = true;
    this._endError = error;
    this._queue.push(END);
    for (const w of this._waiters.splice(0)) {
      clearTimeout(w.timer);
      this._take().then(w.resolve, w.reject);
    }
    for (const w of this._readyWaiters.splice(0)) w();
    if (!first) return;
    if (error) {
      this._emit({ type: "kicked", reason: error.reason, reasonName: error.reasonName,
        message: error.message, error }, false);
    }
    this._emit({ type: "closed", error }, false);
  }

  // ---------------------------------------------------------------- lifecycle

  /** Race up to `race` URLs from the current one; the Hello goes to the
   * winner only. Resolves with the connection at its AuthOk. */
  async _open() {
    const deadline = now() + this.connectTimeoutMs;
    const rotation = [...this.urls.slice(this._urlIndex), ...this.urls.slice(0, this._urlIndex)];
    const dial = raceWebSockets(rotation, {
      fan: this.race,
      staggerMs: this.raceStaggerMs,
      open: (url) => this._webSocket(url),
      onError: (url, message) => new ConnectionLostError(0, message),
    });
    this._dial = dial;
    const timer = setTimeout(() => dial.cancel(new FanoutTimeoutError(
      `no WebSocket of ${rotation.slice(0, this.race).join(", ")} opened within ${this.connectTimeoutMs} ms`)),
    this.connectTimeoutMs);
    let won;
    try {
      won = await dial.promise;
    } finally {
      clearTimeout(timer);
      if (this._dial === dial) this._dial = null;
    }
    this._urlIndex = this.urls.indexOf(won.url);
    const conn = new Connection(this, won.ws, won.url);
    conn.timer(() => conn.fail(new FanoutTimeoutError(
      `no AuthOk from ${won.url} within ${this.connectTimeoutMs} ms`)), deadline - now());
    return new Promise((resolve, reject) => {
      conn.onAuth = () => resolve(conn);
      conn.ended.then((error) => { if (!conn.auth) reject(error); });
    });
  }

  _webSocket(url) {
    const WS = this._WebSocket;
    const protocols = this.protocols.length ? this.protocols : undefined;
    // The third argument is for Node's `ws` (e.g. {ca} for a development
    // CA over wss://); browsers' WebSocket takes two.
    const ws = this.wsOptions ? new WS(url, protocols, this.wsOptions) : new WS(url, protocols);
    ws.binaryType = "arraybuffer";
    return ws;
  }

  /** Called from dispatch, in stream order, when the AuthOk arrives. */
  _authenticated(conn) {
    for (const t of conn.timers) clearTimeout(t); // the connect timeout
    conn.timers.clear();
    if (conn.auth.serverTimeMs) this._clockOffsetMs = conn.auth.serverTimeMs - Date.now();
    this._conn = conn;
    const reconnect = this._everConnected === true;
    this._everConnected = true;
    if (reconnect) this.stats.reconnects++;
    for (const w of this._readyWaiters.splice(0)) w();
    this._keepalive(conn);
    this._scheduleRefresh(conn);
    this._emit({ type: "connected", reconnect, url: conn.url, ...authInfo(conn) });
    conn.onAuth();
  }

  async _run(conn) {
    let attempt = 0;
    try {
      for (;;) {
        let error = await conn.ended;
        this._disconnected(error);
        if (this._closed) return;
        if (!this.reconnect || !this._retryable(error)) {
          this._finish(error);
          return;
        }
        let needToken = this._tokenSpent(error);
        // Only a connection that stayed up resets the backoff, so a node
        // that accepts and kicks at once does not get hammered.
        if (now() - conn.started >= this.backoffMaxMs) attempt = 0;
        for (;;) {
          const delayMs = (error.reconnectAfterMs || 0) + this._backoff(attempt);
          attempt++;
          this._emit({ type: "reconnecting", attempt, delayMs: Math.round(delayMs),
            reason: error.reason, reasonName: error.reasonName, message: error.message, url: this.url });
          await new Promise((resolve) => {
            const t = setTimeout(resolve, delayMs);
            this._wake = () => { clearTimeout(t); resolve(); };
          });
          this._wake = null;
          if (this._closed) return;
          try {
            if (needToken) {
              this.token = await this._newToken();
              needToken = false;
            }
            conn = await this._open();
            if (this._closed) { conn.fail(new ConnectionLostError(0, "client closed")); return; }
            break;
          } catch (e) {
            if (this._closed) return;
            const err = e instanceof FanoutError ? e : new ConnectionLostError(0, String(e?.message ?? e));
            if (!this._retryable(err)) {
              this._finish(err);
              return;
            }
            this._nextUrl();
            needToken = needToken || this._tokenSpent(err);
            error = err;
          }
        }
      }
    } catch (e) {
      // A bug: end iteration with it instead of hanging.
      this._disconnected(e);
      this._finish(e);
    }
  }

  _retryable(error) {
    if (!(error instanceof KickedError || error instanceof AuthError) || !FATAL.has(error.reason)) return true;
    return this._tokenSpent(error);
  }

  _tokenSpent(error) {
    return this.getToken != null && error instanceof FanoutError && EXPIRED.has(error.reason);
  }

  _backoff(attempt) {
    // Full jitter: spreads a crowd of clients that lost the same node.
    return Math.random() * Math.min(this.backoffMaxMs, this.backoffMinMs * 2 ** Math.min(attempt, 32));
  }

  _nextUrl() {
    this._urlIndex = (this._urlIndex + 1) % this.urls.length;
  }

  /** Forget the connection; fail the requests it carried (their outcome
   * is unknown). The next attempt goes to the next URL. */
  _disconnected(error) {
    if (this._conn) {
      this._conn = null;
      this._nextUrl();
    }
    for (const p of this._pending.values()) {
      p.reject(new ConnectionLostError(error?.reason ?? 0,
        `connection lost before the reply (${error?.message ?? error})`, { room: p.room }));
    }
    this._pending.clear();
  }

  _hello() {
    const channel = this._channel ? this._cursors.get(this._channel) : undefined;
    return {
      token: this.token,
      deviceId: this.deviceId,
      deviceClass: this.deviceClass,
      client: this.clientName,
      pingIntervalMs: this.heartbeat ? this.heartbeat.requestMs() : 0,
      resume: [...this._cursors]
        .filter(([room]) => room !== this._channel)
        .map(([room, c]) => ({ room, lastSeq: c.seq, epoch: c.epoch })),
      channelLastSeq: channel ? channel.seq : 0,
      channelEpoch: channel ? channel.epoch : "",
    };
  }

  async _newToken() {
    if (!this.getToken) throw new FanoutError(0, "no getToken to get a new token from");
    let token;
    try {
      token = await this.getToken();
    } catch (e) {
      throw new FanoutError(0, `getToken failed: ${e?.message ?? e}`);
    }
    if (typeof token !== "string") throw new FanoutError(0, `getToken returned ${typeof token}, not a string`);
    return token;
  }

  /** Ping after an interval of silence; declare the link dead when a Ping
   * goes unanswered for pongTimeoutMs with nothing else received, or nothing
   * at all arrived for the idle timeout. Feeds the heartbeat search: probes
   * answered, dead links (sdk.py's _keepalive, step for step). */
  _keepalive(conn) {
    const auth = conn.auth;
    const grant = auth.pingIntervalMs || DEFAULT_PING_INTERVAL_MS;
    const idle = auth.idleTimeoutMs || grant * IDLE_PER_PING;
    const tuner = this.heartbeat;
    let interval = tuner ? tuner.granted(grant, auth.pingIntervalMinMs, auth.pingIntervalMaxMs) : grant;
    const pongTimeout = Math.min(this.pongTimeoutMs, Math.max(idle - grant, 50));
    let nonce = 0;
    let sentAt = 0;       // of the outstanding Ping (0: none)
    let probe = 0;        // nonce of the outstanding probe (0: none)
    let probeMs = 0;
    let probeFrames = 0;  // frames received before the probe
    const tick = () => {
      if (conn.error) return;
      const t = now();
      if (sentAt && conn.pong >= nonce) sentAt = 0;
      if (probe && conn.pong >= probe) {
        // Only a Pong that came alone counts: a frame before it was already
        // on its way, and broke the silence at the NAT.
        if (conn.pong === probe && conn.pongFrames === probeFrames + 1) {
          this.stats.probes++;
          if (tuner) interval = tuner.probeAnswered(probeMs, grant);
        }
        probe = 0;
      }
      const quiet = t - conn.lastRecv;
      if (quiet >= idle || (sentAt && t - Math.max(sentAt, conn.lastRecv) >= pongTimeout)) {
        const why = quiet >= idle ? `nothing received from the node for ${idle} ms`
          : `a ping unanswered for ${pongTimeout} ms`;
        this.stats.deadLinks++;
        if (tuner) tuner.deadLink();
        conn.fail(new ConnectionLostError(R.HEARTBEAT_TIMEOUT, `dead link: ${why}`));
        return;
      }
      // A Ping is due after an interval of silence both ways (what a NAT
      // times), and at the latest a granted interval after the last frame
      // sent (what the node requires).
      const silentSince = Math.max(conn.lastSent, conn.lastRecv);
      let due = Math.min(silentSince + interval, conn.lastSent + grant);
      if (t >= due) {
        nonce++;
        if (!probe && t - silentSince >= interval * PROBE_SILENCE) {
          probe = nonce;
          probeMs = interval;
          probeFrames = this.stats.frames;
        }
        if (!conn.send(FrameType.PING, { nonce })) return;
        // The oldest unanswered Ping counts: pinging more often than the
        // pong timeout must not keep postponing the verdict.
        if (!sentAt) sentAt = t;
        due = t + interval;
      }
      let wake = Math.min(due, conn.lastRecv + idle);
      if (sentAt) wake = Math.min(wake, Math.max(sentAt, conn.lastRecv) + pongTimeout);
      conn.timer(tick, wake - t + 1);
    };
    tick();
  }

  _scheduleRefresh(conn) {
    let expires = conn.auth.tokenExpiresMs;
    if (!this.getToken || !expires) return;
    const serverNow = () => Date.now() + this._clockOffsetMs;
    const schedule = () => {
      const left = expires - serverNow();
      const jitter = (Math.random() * 2 - 1) * REFRESH_JITTER;
      conn.timer(attemptRefresh, left * (REFRESH_AT + jitter));
    };
    const attemptRefresh = async () => {
      if (conn.error) return;
      try {
        await this.refresh();
      } catch (e) {
        if (conn.error || e instanceof ConnectionLostError) return; // the run loop handles it
        if (e.reason === R.TOKEN_REVOKED) return;                  // the node's Kick follows
        const left = expires - serverNow();
        if (left < REFRESH_RETRY_MIN_MS) return;                   // refresh after Kick(TOKEN_EXPIRED)
        conn.timer(attemptRefresh, left / 2);
        return;
      }
      const left = expires - serverNow();
      // An opaque token: assume it lives as long as the last one did.
      expires = tokenExpMs(this.token) ?? serverNow() + Math.max(left, 1000);
      schedule();
    };
    schedule();
  }

  // ---------------------------------------------------------------- requests

  async _waitConnected(deadline) {
    while (!this._conn) {
      if (this._ended || this._closed) {
        throw new ConnectionLostError(0, `client is not connected (${this._endError?.message ?? "closed"})`);
      }
      if (!this._started) throw new Error("call connect() first");
      const left = deadline - now();
      if (left <= 0) throw new FanoutTimeoutError("not connected within the request timeout");
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this._readyWaiters.push(() => { clearTimeout(t); resolve(); });
      });
    }
  }

  async _request(type, fields) {
    const deadline = now() + this.requestTimeoutMs;
    // While reconnecting, requests wait for the next connection.
    await this._waitConnected(deadline);
    const conn = this._conn;
    let reqId = this._lastReqId;
    do { reqId = (reqId % 0xffffffff) + 1; } while (this._pending.has(reqId));
    this._lastReqId = reqId;
    const room = fields.room ?? "";
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(reqId);
        reject(new FanoutTimeoutError(`no reply to ${typeName(type)} within ${this.requestTimeoutMs} ms`));
      }, Math.max(0, deadline - now()));
      const done = (fn) => (v) => { clearTimeout(timer); this._pending.delete(reqId); fn(v); };
      this._pending.set(reqId, { type, room, resolve: done(resolve), reject: done(reject) });
      if (type === FrameType.LEAVE) {
        // Left from now on: later messages are dropped, and the room is not
        // resumed even if the reply is lost with the connection.
        this._cursors.delete(room);
        this._online.delete(room);
      }
      conn.send(type, { ...fields, reqId });
    });
  }

  // ---------------------------------------------------------------- frames

  /** Decode and handle one frame; returns an error if the connection must end. */
  _dispatch(conn, type, body) {
    this.stats.frames++;
    let msg;
    try {
      msg = decodeMessage(type, body);
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      return new ConnectionLostError(e.reason, `bad frame from the node: ${e.message}`);
    }
    if (msg === null) return null; // a newer node's frame type: ignored (section 10)
    try {
      switch (type) {
        case FrameType.AUTH_OK: return this._onAuthOk(conn, msg);
        case FrameType.ERROR: return this._onError(conn, msg);
        case FrameType.BATCH: return this._onBatch(msg);
        case FrameType.KICK: return this._onKick(msg);
        case FrameType.PONG: return this._onPong(conn, msg);
        case FrameType.PRESENCE: return this._onPresence(msg);
        case FrameType.GAP: return this._onGap(msg);
        case FrameType.ACK: return this._onAck(msg);
        default:
          return new ConnectionLostError(R.UNKNOWN_FRAME_TYPE, `client frame type 0x${type.toString(16)} from the node`);
      }
    } catch (e) {
      if (!(e instanceof WireError)) throw e;
      return new ConnectionLostError(e.reason, `bad frame from the node: ${e.message}`);
    }
  }

  _onAuthOk(conn, msg) {
    if (conn.auth) return null; // a second AuthOk: ignored
    if (msg.compressDict && !DICTIONARIES.has(msg.compressDict)) {
      return new ConnectionLostError(R.BAD_COMPRESSION,
        `the node compresses with lz4 dictionary ${msg.compressDict}, which this client does not hold`);
    }
    conn.auth = {
      user: msg.user,
      session: msg.session,
      pingIntervalMs: msg.pingIntervalMs,
      idleTimeoutMs: msg.idleTimeoutMs,
      pingIntervalMinMs: msg.pingIntervalMinMs,
      pingIntervalMaxMs: msg.pingIntervalMaxMs,
      serverTimeMs: toNumber(msg.serverTimeMs),
      tokenExpiresMs: toNumber(msg.tokenExpiresMs),
      compressDict: msg.compressDict,
      channel: msg.channel,
    };
    if (msg.channel) {
      // The channel's cursor, read like a resume point's Ack: the Gap and
      // replay that follow in this read must see it.
      this._channel = msg.channel;
      const epoch = msg.channelEpoch;
      const seq = toNumber(msg.channelSeq);
      if (!this._cursors.has(msg.channel)) this._cursors.set(msg.channel, { epoch, seq });
      this._resumed(msg.channel, epoch, seq);
    } else if (this._channel !== null) {
      // This node has no user channels: nothing comes through it here.
      this._cursors.delete(this._channel);
      this._channel = null;
    }
    this._authenticated(conn);
    return null;
  }

  _onError(conn, err) {
    const reason = err.reason;
    if (!conn.auth) { // the answer to the Hello
      const Cls = AUTH_REASONS.has(reason) ? AuthError : ConnectionLostError;
      return new Cls(reason, err.message);
    }
    const pending = err.reqId ? this._pending.get(err.reqId) : undefined;
    if (pending) {
      pending.reject(new RequestError(reason, err.message, { room: pending.room }));
      return null;
    }
    if (!err.reqId && CLOSING_ERRORS.has(reason)) {
      const Cls = FATAL.has(reason) ? KickedError : ConnectionLostError;
      return new Cls(reason, err.message);
    }
    if (!err.reqId && this._cursors.has(err.room)) {
      // A resume point was refused, or a refreshed token no longer allows
      // the room: it is no longer joined, and the application is told.
      this._cursors.delete(err.room);
      this._online.delete(err.room);
      this._emit({ type: "error", room: err.room, reason, reasonName: reasonName(reason), message: err.message });
    }
    return null;
  }

  _onKick(kick) {
    if (FATAL.has(kick.reason)) return new KickedError(kick.reason, kick.message);
    return new ConnectionLostError(kick.reason, kick.message, { reconnectAfterMs: kick.reconnectAfterMs });
  }

  _onPong(conn, pong) {
    // Receiving it already counted as activity; the keepalive matches the
    // nonce to its Ping.
    const nonce = toNumber(pong.nonce);
    if (nonce > (conn.pong ?? 0)) {
      conn.pong = nonce;
      conn.pongFrames = this.stats.frames;
    }
    return null;
  }

  _onPresence(p) {
    if (!this._cursors.has(p.room)) return null;
    this._online.set(p.room, p.online);
    this._emit({ type: "presence", room: p.room, online: p.online });
    return null;
  }

  /** The node's answer to a resume of `room` (a resume point's Ack, the
   * AuthOk for the channel): its cursor, unless in the same epoch it is
   * behind ours. Then this node is behind the one left (a cluster): the
   * seqs up to the cursor come again and are dropped as duplicates. */
  _resumed(room, epoch, seq) {
    const cur = this._cursors.get(room);
    if (cur && (epoch !== cur.epoch || seq > cur.seq)) {
      cur.epoch = epoch;
      cur.seq = seq;
    }
  }

  _onAck(ack) {
    if (!ack.reqId) {
      // A Hello resume point, matched by room.
      this._resumed(ack.room, ack.epoch, toNumber(ack.seq));
      return null;
    }
    const pending = this._pending.get(ack.reqId);
    if (!pending) return null; // timed out
    const result = { room: ack.room || pending.room, seq: toNumber(ack.seq), epoch: ack.epoch };
    if (pending.type === FrameType.JOIN) {
      // Set here, in stream order: the Gap and replay that follow the Ack
      // must see the new cursor.
      this._cursors.set(pending.room, { epoch: ack.epoch, seq: result.seq });
    }
    pending.resolve(result);
    return null;
  }

  _onGap(g) {
    const cur = this._cursors.get(g.room);
    if (!cur) return null;
    const toSeq = toNumber(g.toSeq);
    if (toSeq <= cur.seq) return null; // stale: already accounted for
    // The reported Gap always starts right after the cursor, whatever
    // from_seq says, so the accounting stays contiguous.
    if (g.epoch) cur.epoch = g.epoch;
    this._emitGap(cur, g.room, cur.seq + 1, toSeq, g.epoch || cur.epoch);
    return null;
  }

  _onBatch(batch) {
    const sampled = !!batch.sampled;
    if (sampled) this.stats.sampledBatches++;
    for (const m of batch.messages) {
      const cur = this._cursors.get(m.room);
      if (!cur) continue; // not joined, or just left
      const seq = toNumber(m.seq);
      if (seq <= cur.seq) {
        this.stats.duplicates++; // e.g. a replay overlapping live delivery
        continue;
      }
      if (seq > cur.seq + 1) {
        // The node skipped seqs without a Gap: report them, never lose silently.
        this._emitGap(cur, m.room, cur.seq + 1, seq - 1, cur.epoch);
      }
      cur.seq = seq;
      this.stats.messages++;
      this._emit(new RoomMessage(m, cur.epoch, sampled));
    }
    return null;
  }

  _emitGap(cur, room, fromSeq, toSeq, epoch) {
    cur.seq = toSeq;
    this.stats.gaps++;
    this._emit({ type: "gap", room, fromSeq, toSeq, epoch });
  }
}

const END = Symbol("end");

function authInfo(conn) {
  return { ...conn.auth };
}

function typeName(type) {
  for (const [k, v] of Object.entries(FrameType)) if (v === type) return k;
  return `0x${type.toString(16)}`;
}

export { pb as proto };
