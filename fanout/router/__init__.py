"""The router: the cluster's logic layer (``fanout router``), reached by
nodes with NATS request/reply. It assigns each room's seqs and encodes each
message once (:mod:`fanout.logic.sequencer`), applies the rate limits and
room budgets, holds the one-login-per-device-class rule, and stores every
message in JetStream before anyone sees it. Rooms and users are spread over
routers by partition (:mod:`.leases`); :mod:`.service` answers the calls.
"""
