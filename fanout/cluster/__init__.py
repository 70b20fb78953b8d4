"""The cluster's shared plumbing on NATS: subject and stream names
(:mod:`.subjects`), connecting and provisioning (:mod:`.connect`), reading
room history from JetStream (:mod:`.history`) and running nats-server
processes (:mod:`.natsproc`). The node's side is :mod:`fanout.bus.nats` and
:mod:`fanout.logic.remote`; the router's is :mod:`fanout.router`.
"""
