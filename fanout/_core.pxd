# fanout._core: the compiled fan-out core (sources in pyx/core/). This file is
# the module's C-level API; the pieces it includes live beside their .pyx.
# Wire constants and helpers come from pyx/includes/wireformat.pxd (generated
# constants), socket externs from pyx/includes/system.pxd.
#
# Data flow of one broadcast (nothing per recipient happens in Python):
#
#   logic (Python, once per message; fanout/logic/sequencer.py)
#     encode_room_message()  -> one `Batch.messages` record, encoded once [frame.pyx]
#   bus (fanout/bus/): the record reaches every node holding the room
#   Hub.publish(room, epoch, seq, record)                     [hub.pyx]
#     Room.append(): copy the record into the room's pending batch buffer and
#                    keep a reference in the room's resume ring  [room.pyx]
#     schedule a flush from the room's token bucket of flushes:
#                       a token left (quiet room) -> end of this loop iteration,
#                       none left (hot room)      -> when the next token is due,
#                       full batch                -> now
#   Room.flush()
#     build_frame(): headroom + header + body, lz4 when it pays
#                    -> ONE bytes object                       [frame.pyx]
#     for every member: Connection.send_frame(frame)          [connection.pyx]
#        a prefixed kind: its header written once into the frame's headroom
#        empty backlog -> send() straight from the frame's buffer
#        partial/EAGAIN -> keep a reference + offset, writev when writable
#        backlog over its bound -> SEND_SLOW, the control layer cuts it
#
# Reads go the other way: Connection.read(max_frames) reads a bounded share
# of the socket into a shared scratch buffer, the kind splits complete frames
# in C (tcp.pyx) and hands only their bodies, at most max_frames of them (the
# session's request budget), to the Python control layer
# (fanout/server/session.py). Bad input never raises there: the frames before
# it are returned and the error waits in read_error (connection.pxd).

include "frame.pxd"
include "tls.pxd"
include "connection.pxd"
include "tcp.pxd"
include "prefixed.pxd"
include "websocket.pxd"
include "rounds.pxd"
include "room.pxd"
include "hub.pxd"
