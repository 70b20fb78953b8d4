# fanout._core: the compiled fan-out core (sources in pyx/). This file is the
# module's C-level API; the pieces it includes live beside their .pyx in pyx/.
#
# Data flow of one broadcast (nothing per recipient happens in Python):
#
#   logic (Python, once per message)
#     encode_room_message()  -> one `Batch.messages` record, encoded once
#   Hub.publish(room, epoch, seq, record)                     [hub.pyx]
#     Room.append(): copy the record into the room's pending batch buffer and
#                    keep a reference in the room's resume ring  [room.pyx]
#     schedule a flush: quiet room -> end of this loop iteration,
#                       hot room   -> max_delay after its last flush,
#                       full batch -> now
#   Room.flush()
#     build_frame(): header + body, lz4 when it pays -> ONE bytes object  [frame.pyx]
#     for every member: Connection.send_frame(frame)          [connection.pyx]
#        empty backlog -> send() straight from the frame's buffer
#        partial/EAGAIN -> keep a reference + offset, writev when writable
#        backlog over its bound -> SEND_SLOW, the control layer cuts it
#
# Reads go the other way: Connection.read() drains the socket into a shared
# scratch buffer, splits complete frames in C and hands only their bodies to
# the Python control layer (fanout/session.py).

include "frame.pxd"
include "connection.pxd"
include "room.pxd"
include "hub.pxd"
