'use strict';
/*
 * What the two Node peers share with each other and with the Python peers
 * (bench/peers/ws_server.py): the flags, the message stream, its pacing and
 * the result line.
 *
 * The stream is bench/peers/stream.py's seeded corpus, written to a file by
 * the harness (stream.write_node_stream: one JSON array [kind, priority,
 * sender, payload] a line), because Node cannot replay Python's seeded
 * random. Each line sent is JSON.stringify of the same fields in the same
 * order as stream.v1_json, so the bytes on the wire are the Python peers'
 * (tests/test_bench_smoke.py checks it). The file is read in a loop when a
 * run needs more messages than it holds; the seqs never repeat.
 */
const fs = require('fs');
const { performance } = require('perf_hooks');

function parseArgs(argv, doc) {
  const a = { host: '127.0.0.1', port: 0, viewers: 1, rate: 2000, duration: 10, linger: 30,
              stream: null, burst: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in a) || i + 1 >= argv.length) {
      process.stderr.write(`${doc}\nunknown or incomplete option ${argv[i]}\n`);
      process.exit(2);
    }
    a[key] = key === 'host' || key === 'stream' ? argv[i + 1] : Number(argv[i + 1]);
  }
  if (!a.stream) {
    process.stderr.write(`${doc}\n--stream FILE is required\n`);
    process.exit(2);
  }
  return a;
}

function loadStream(path) {
  const lines = fs.readFileSync(path, 'utf8').split('\n').filter((l) => l.length);
  const head = JSON.parse(lines[0]);           // {"corpus": ..., "messages": N}
  const msgs = lines.slice(1).map((l) => JSON.parse(l));
  if (!msgs.length) throw new Error(`${path}: no messages`);
  return { corpus: head.corpus, msgs };
}

// The V1 JSON line of stream.v1_json: the same keys in the same order.
function v1Line(room, seq, m, tsMs) {
  return JSON.stringify({ room, seq, kind: m[0], priority: m[1], sender: m[2], payload: m[3],
                          ts: tsMs }) + '\n';
}

function cpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/*
 * The Python peers' pacing: message i is due at t0 + i / rate (now, when
 * rate is 0: flat out), stamped with its due time in unix ms, and goes to
 * room i mod rooms. After a message to a room of more than 100 members (or
 * every 4th message) the loop is given back to the event loop
 * (setImmediate, ws_server.py's sleep(0)) so sockets are served between
 * messages, as in the Python peers.
 *
 * --burst N instead publishes every message due, up to N, before giving the
 * loop back. uWS's pub/sub writes what a subscriber got in one loop turn
 * with one send, so this is how uWS batches when messages come faster than
 * its loop turns; with N 200, the engine's batch at the reference load.
 *
 * publish(room, buf) sends one message to the room's members and returns
 * how many it was handed to; extra() adds the peer's own fields to the
 * result line.
 */
function runStream(args, stream, roomNames, membersOf, publish, peer, extra, onDone) {
  const wall0 = performance.timeOrigin + performance.now();
  const t0 = performance.now();
  const deadline = t0 + args.duration * 1000;
  const seqs = new Map(roomNames.map((r) => [r, 0]));
  const cpu0 = cpuSeconds();
  let i = 0, writes = 0, nbytes = 0;
  const step = () => {
    let turn = 0;
    for (;;) {
      const now = performance.now();
      if (now >= deadline) break;
      const due = args.rate > 0 ? t0 + (i * 1000) / args.rate : now;
      if (due > now) {
        setTimeout(step, due - now);
        return;
      }
      const room = roomNames[i % roomNames.length];
      const seq = seqs.get(room) + 1;
      seqs.set(room, seq);
      const m = stream.msgs[i % stream.msgs.length];
      const buf = Buffer.from(v1Line(room, seq, m, Math.floor(wall0 + (due - t0))));
      const n = publish(room, buf);
      writes += n;
      nbytes += buf.length * n;
      i += 1;
      turn += 1;
      if (args.burst ? turn >= args.burst : i % 4 === 0 || membersOf(room) > 100) {
        setImmediate(step);
        return;
      }
    }
    const secs = (performance.now() - t0) / 1000;
    const viewers = roomNames.reduce((s, r) => s + membersOf(r), 0);
    process.stdout.write(JSON.stringify({
      peer, viewers, rooms: roomNames.length, messages_published: i, writes,
      payload_bytes_written: nbytes, seconds: Math.round(secs * 1000) / 1000,
      writes_per_s: Math.round((writes / secs) * 10) / 10,
      cpu_seconds: Math.round((cpuSeconds() - cpu0) * 1000) / 1000,
      corpus: stream.corpus, node: process.version, burst: args.burst, ...extra(),
    }) + '\n');
    setTimeout(onDone, args.linger * 1000);
  };
  step();
}

module.exports = { parseArgs, loadStream, v1Line, runStream };
