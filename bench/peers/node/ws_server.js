'use strict';
const DOC = `The ws package's broadcast idiom as a fan-out server: the Node ws peer of
bench/scenarios/.

    node bench/peers/node/ws_server.js --stream FILE --port 0 --viewers N --rate MSGS
         [--duration S] [--linger S] [--host 127.0.0.1] [--burst N]

Viewers open ws://HOST:PORT/ROOM. Once --viewers are connected, the server
sends the stream of common.js (the Python peers' stream, rate and stamps):
per message, the line is made a Buffer once and client.send(buf) is called
for every open member of the room (the README's broadcast loop; ws frames
it per client). As in ws_server.py: compression off (perMessageDeflate
false), no keepalive pings, and no backpressure (ws buffers what the socket
does not take). Prints "ws listening on HOST:PORT" and, after the stream,
one JSON line.`;

const { WebSocketServer, WebSocket } = require('ws');
const { parseArgs, loadStream, runStream } = require('./common');

const args = parseArgs(process.argv.slice(2), DOC);
const stream = loadStream(args.stream);
const rooms = new Map();        // room -> Set of clients
let joined = 0, started = false;

const wss = new WebSocketServer({ host: args.host, port: args.port, backlog: 4096,
                                  perMessageDeflate: false, clientTracking: false });
wss.on('connection', (ws, req) => {
  const room = req.url.slice(1) || 'room-0';
  if (!rooms.has(room)) rooms.set(room, new Set());
  const set = rooms.get(room);
  set.add(ws);
  joined += 1;
  ws.on('close', () => { set.delete(ws); joined -= 1; });
  ws.on('error', () => {});
  if (joined >= args.viewers && !started) {
    started = true;
    const names = [...rooms.keys()].sort();
    runStream(args, stream, names, (r) => rooms.get(r).size, (r, buf) => {
      let n = 0;
      for (const client of rooms.get(r)) {
        if (client.readyState === WebSocket.OPEN) {
          client.send(buf, { binary: false });
          n += 1;
        }
      }
      return n;
    }, 'ws', () => ({}), () => process.exit(0));
  }
});
wss.on('listening', () => {
  const { address, port } = wss.address();
  console.log(`ws listening on ${address}:${port}`);
});
wss.on('error', (e) => { process.stderr.write(`ws: ${e}\n`); process.exit(1); });
process.on('SIGTERM', () => process.exit(0));
