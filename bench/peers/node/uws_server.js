'use strict';
const DOC = `uWebSockets.js pub/sub as a fan-out server: the uWS peer of bench/scenarios/.

    node bench/peers/node/uws_server.js --stream FILE --port 0 --viewers N --rate MSGS
         [--duration S] [--linger S] [--host 127.0.0.1] [--burst N]

Viewers open ws://HOST:PORT/ROOM and are subscribed to the topic ROOM. Once
--viewers are connected, the server sends the stream of common.js (the
Python peers' stream, rate and stamps) with one app.publish(room, line) per
message: uWS frames the message once and writes it to every subscriber
(what a subscriber got in one loop turn goes out in one send: --burst). As
in ws_server.py: compression off, no keepalive pings, no idle timeout, and
no backpressure in the way (maxBackpressure 256 MiB a socket, where uWS
would otherwise skip a slow subscriber; any message it skips anyway is
counted in "dropped" and shows as a seq gap in c_reader). Prints
"uws listening on HOST:PORT" and, after the stream, one JSON line.`;

const uWS = require('uwebsockets');
const { parseArgs, loadStream, runStream } = require('./common');

const args = parseArgs(process.argv.slice(2), DOC);
const stream = loadStream(args.stream);
const members = new Map();      // room -> subscriber count
let joined = 0, started = false, dropped = 0, listenSocket = null;

const app = uWS.App();
app.ws('/*', {
  compression: uWS.DISABLED,
  idleTimeout: 0,
  sendPingsAutomatically: false,
  maxBackpressure: 256 * 1024 * 1024,
  closeOnBackpressureLimit: false,
  upgrade: (res, req, context) => {
    const room = req.getUrl().slice(1) || 'room-0';
    res.upgrade({ room }, req.getHeader('sec-websocket-key'),
                req.getHeader('sec-websocket-protocol'),
                req.getHeader('sec-websocket-extensions'), context);
  },
  open: (ws) => {
    const { room } = ws.getUserData();
    ws.subscribe(room);
    members.set(room, (members.get(room) || 0) + 1);
    joined += 1;
    if (joined >= args.viewers && !started) {
      started = true;
      const names = [...members.keys()].sort();
      runStream(args, stream, names, (r) => members.get(r) || 0,
                (room, buf) => { app.publish(room, buf, false, false); return members.get(room); },
                'uwebsockets', () => ({ dropped }), finish);
    }
  },
  dropped: () => { dropped += 1; },
  close: (ws) => {
    const { room } = ws.getUserData();
    members.set(room, members.get(room) - 1);
    joined -= 1;
  },
});

function finish() {
  if (listenSocket) uWS.us_listen_socket_close(listenSocket);
  process.exit(0);
}

app.listen(args.host, args.port, (token) => {
  if (!token) {
    process.stderr.write(`uws: cannot listen on ${args.host}:${args.port}\n`);
    process.exit(1);
  }
  listenSocket = token;
  console.log(`uws listening on ${args.host}:${uWS.us_socket_local_port(token)}`);
});
process.on('SIGTERM', () => process.exit(0));
