"""The protocol shared by the node and every client: the wire codec
(:mod:`.wire`), token authentication (:mod:`.auth`), the reason-carrying
error base (:mod:`.errors`) and the protobuf bodies (``fanout.proto``,
compiled to ``fanout_pb2``)."""
