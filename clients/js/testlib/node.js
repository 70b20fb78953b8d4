// A real fanout node for the end-to-end tests: `python -m fanout node` on
// free ports of 127.0.0.1, its admin API for publishing, tokens minted with
// its secret, and a TCP proxy in front of its WebSocket port that a test can
// cut, to drop connections as a network would.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { createServer, connect as tcpConnect } from "node:net";
import { createInterface } from "node:readline";
import { python, REPO } from "./helpers.js";

export const SECRET = "js-sdk-test-secret-" + randomBytes(8).toString("hex");
const API_KEY = randomBytes(24).toString("hex");
const ADMIN_RE = /fanout admin API listening on (\S+):(\d+)/;
const WS_RE = /fanout node WebSocket on ws:\/\/(\S+):(\d+)(\/\S*)/;
const LISTEN_RE = /fanout node listening on (\S+):(\d+)/;
/** Which event loop the nodes run ($FANOUT_TEST_LOOP, default uvloop). */
export const LOOP = process.env.FANOUT_TEST_LOOP || "uvloop";

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 JWT as the platform's auth service would issue it. */
export function mintToken({ user = "u1", rooms = "*", ttlS = 3600, secret = SECRET, exp } = {}) {
  const iat = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = b64url(JSON.stringify({ sub: user, iat, exp: exp ?? iat + ttlS, rooms }));
  const sig = b64url(createHmac("sha256", secret).update(`${header}.${claims}`).digest());
  return `${header}.${claims}.${sig}`;
}

export class Node {
  /** Start a node; resolves once its client, WebSocket and admin ports listen.
   * `ports`: {port, wsPort, adminPort} to restart on the same ones. */
  static async start({ flags = [], ports = null, timeoutMs = 30000 } = {}) {
    const node = new Node();
    await node._spawn(flags, ports, timeoutMs);
    return node;
  }

  async _spawn(flags, ports, timeoutMs) {
    this.flags = flags;
    const argv = ["-m", "fanout", "node", "--host", "127.0.0.1",
      "--port", String(ports?.port ?? 0), "--ws-port", String(ports?.wsPort ?? 0),
      "--admin-port", String(ports?.adminPort ?? 0), "--api-key", API_KEY,
      "--secret", SECRET, "--loop", LOOP, ...flags];
    this.stderr = [];
    // The worktree first on sys.path: `-m` from the repository root.
    this.proc = spawn(python(), argv, {
      cwd: process.env.FANOUT_NODE_CWD || REPO,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PYTHONUNBUFFERED: "1" },
    });
    this.exited = new Promise((resolve) => this.proc.once("exit", (code, sig) => resolve(code ?? sig)));
    createInterface({ input: this.proc.stderr }).on("line", (l) => this.stderr.push(l));
    const lines = createInterface({ input: this.proc.stdout });
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => fail(new Error(`node did not start in ${timeoutMs} ms`)), timeoutMs);
      const fail = (e) => {
        clearTimeout(timer);
        this.proc.kill("SIGKILL");
        reject(new Error(`${e.message}\n${this.stderr.slice(-20).join("\n")}`));
      };
      const early = (code) => fail(new Error(`node exited (${code}) before listening`));
      this.proc.once("exit", early);
      lines.on("line", (line) => {
        let m;
        if ((m = ADMIN_RE.exec(line))) this.adminPort = Number(m[2]);
        if ((m = WS_RE.exec(line))) { this.wsPort = Number(m[2]); this.wsPath = m[3]; }
        if ((m = LISTEN_RE.exec(line))) {
          this.port = Number(m[2]);
          clearTimeout(timer);
          this.proc.off("exit", early);
          if (!this.wsPort) reject(new Error("the node printed no WebSocket endpoint"));
          else resolve();
        }
      });
    });
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.wsPort}${this.wsPath}`;
  }

  get ports() {
    return { port: this.port, wsPort: this.wsPort, adminPort: this.adminPort };
  }

  /** POST /v1/publish; resolves with the seq. */
  async publish(room, kind, payload, { sender = "api", priority = 0 } = {}) {
    const res = await fetch(`http://127.0.0.1:${this.adminPort}/v1/publish`, {
      method: "POST",
      headers: { "X-API-Key": API_KEY, "Content-Type": "application/json" },
      body: JSON.stringify({ room, kind, payload, sender, priority }),
    });
    const body = await res.json();
    if (res.status !== 200) throw new Error(`publish: ${res.status} ${JSON.stringify(body)}`);
    return body.seq;
  }

  /** Any admin API call (JSON). */
  async admin(method, path, body) {
    const res = await fetch(`http://127.0.0.1:${this.adminPort}${path}`, {
      method,
      headers: { "X-API-Key": API_KEY, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, body: await res.json().catch(() => null) };
  }

  /** Stop the node (SIGTERM: it drains and kicks with SERVER_SHUTDOWN). */
  async stop(signal = "SIGTERM", timeoutMs = 15000) {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return this.exited;
    this.proc.kill(signal);
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), timeoutMs);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }

  /** Stop, then start again on the same ports (a restart loses history: new epochs). */
  async restart(signal = "SIGTERM") {
    await this.stop(signal);
    await this._spawn(this.flags, this.ports, 30000);
  }

  log() {
    return this.stderr.join("\n");
  }
}

/**
 * A TCP proxy on 127.0.0.1 in front of `port`: `cut()` resets every
 * connection through it (a network failure), `hold()` refuses new ones
 * until `release()`. With `natTimeoutMs` it behaves like a carrier's NAT:
 * a connection silent both ways that long is forgotten, and from then on
 * nothing passes either way and nobody is told (`blackholed` counts them).
 */
export class Proxy {
  static async start(port, options = {}) {
    const p = new Proxy(port, options);
    await new Promise((resolve) => p.server.listen(0, "127.0.0.1", resolve));
    p.port = p.server.address().port;
    return p;
  }

  constructor(target, { natTimeoutMs = 0 } = {}) {
    this.target = target;
    this.natTimeoutMs = natTimeoutMs;
    this.held = false;
    this.pairs = new Set();
    this.accepted = 0;
    this.blackholed = 0;
    this.server = createServer((client) => {
      if (this.held) { client.resetAndDestroy(); return; }
      this.accepted++;
      const upstream = tcpConnect(this.target, "127.0.0.1");
      const pair = [client, upstream];
      this.pairs.add(pair);
      const drop = () => { this.pairs.delete(pair); client.destroy(); upstream.destroy(); };
      client.on("error", drop).on("close", drop);
      upstream.on("error", drop).on("close", drop);
      // The mapping is forgotten lazily, as a NAT does: the first packet
      // after the silence finds it gone.
      let last = Date.now();
      let forgotten = false;
      const forward = (from, to) => from.on("data", (data) => {
        const t = Date.now();
        if (!forgotten && this.natTimeoutMs && t - last >= this.natTimeoutMs) {
          forgotten = true;
          this.blackholed++;
        }
        if (forgotten) return;
        last = t;
        if (!to.write(data)) { from.pause(); to.once("drain", () => from.resume()); }
      });
      forward(client, upstream);
      forward(upstream, client);
    });
  }

  url(path = "/ws") {
    return `ws://127.0.0.1:${this.port}${path}`;
  }

  /** Reset every open connection. */
  cut() {
    for (const [client, upstream] of this.pairs) {
      client.resetAndDestroy();
      upstream.resetAndDestroy();
    }
    this.pairs.clear();
  }

  hold() { this.held = true; }
  release() { this.held = false; }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * A TCP listener on 127.0.0.1 that accepts and never answers: a WebSocket
 * to it never opens (its HTTP upgrade stays unanswered), as to a node on a
 * dead path. `sockets` holds what it accepted; `closed` counts the ones the
 * other side closed.
 */
export class SilentListener {
  static async start() {
    const l = new SilentListener();
    await new Promise((resolve) => l.server.listen(0, "127.0.0.1", resolve));
    l.port = l.server.address().port;
    return l;
  }

  constructor() {
    this.sockets = [];
    this.closed = 0;
    this.server = createServer((s) => {
      this.sockets.push(s);
      s.resume(); // read (and ignore) the upgrade request, so its end is seen
      s.on("error", () => {});
      s.on("close", () => { this.closed++; });
    });
  }

  url(path = "/ws") {
    return `ws://127.0.0.1:${this.port}${path}`;
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** A port of 127.0.0.1 nothing listens on (connects are refused). */
export async function refusedPort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}
