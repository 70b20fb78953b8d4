"""End-to-end scenarios of the "Measurement" issue, one command each.

    .venv/bin/python -m bench.scenarios SCENARIO [--quick] [--out DIR]

SCENARIO is one of reference-room, quiet-rooms, idle-connections,
connect-storm, wire-bytes, sweep (deliveries/s against viewers, for the
plot), profile (py-spy of the node at the reference load), node-peers (the
engine against the Node peers alone), websocket (the engine over WebSocket
against itself over TCP and against the Node peers), tls-reference (the
reference room on the TCP, TLS, WebSocket and WSS ports), user-channels
(connect-storm and idle-connections with users' channels on and off, in
alternating pairs), reconnect-storm-channels (the cluster's reconnect-storm
with them on, then off), stalls-quiet (the stall tracer,
bench/stalltrace.py, in the node under the quiet-rooms load), or all. Each
starts its own node process
(``fanout node --port 0 --admin-port 0 ...`` with the settings it needs), its
load generator (``fanout load``, a separate process: the open-file limit is
20,000 per process) and, where the issue asks for them, its peers in the same
run on the same message stream:

* ``c-reference``: bench/peers/c_tcp_reference.c, the physical limit: the
  same Batch frames (same corpus, same messages per frame as the engine's
  run) written with writev to the same number of sockets, flat out;
* ``naive``: bench/peers/naive_server.py, V1 style, one transport.write(json)
  per message per viewer, read by bench/peers/c_reader.c;
* ``websockets``: bench/peers/ws_server.py, websockets.broadcast() of the same
  JSON lines, read by c_reader in WebSocket mode.
* ``uws`` and ``node_ws``: bench/peers/node/, uWebSockets.js pub/sub
  (``app.publish``) and the ws package's broadcast loop on Debian's Node.js,
  the same JSON lines read by c_reader in WebSocket mode, at the reference
  load and flat out (``node_peers``; ``make node-peers`` installs them),
  against the engine read over its WebSocket port (``fanout load
  --transport ws``): WebSocket against WebSocket.

Results go to bench/results/SCENARIO.json (``--quick``: SCENARIO.quick.json)
with the machine and the exact command, and a summary is printed. Every
comparison is a ratio of figures measured in that one run.

Measure under the machine-wide lock, one scenario at a time::

    flock /tmp/fanout-bench.lock .venv/bin/python -m bench.scenarios reference-room

``--quick`` runs scaled-down variants (each well under 20 s) for smoke tests;
their figures are not results.

The modules: ``harness`` (paths, the node, C builds, the machine), ``load``
(``fanout load``: running it, its flags, its figures), ``peers`` (the runs of
bench/peers/), one module per scenario or group (``reference_room``,
``quiet_rooms``, ``connections``, ``wire_bytes``, ``sweep``, ``profiles``,
``node_peers``, ``websocket``, ``tls_reference``),
``report`` (targets, summaries) and ``cli``.
"""
