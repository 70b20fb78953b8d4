# cython: language_level=3
# fanout._core: see fanout/_core.pxd for the data flow.
#
# One extension module, split into files by job (as uvloop does), so the
# cdef classes call each other directly without cross-module imports.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from wireformat cimport *

include "frame.pyx"
include "tls.pyx"
include "connection.pyx"
include "tcp.pyx"
include "prefixed.pyx"
include "websocket.pyx"
include "rounds.pyx"
include "room.pyx"
include "hub.pyx"
