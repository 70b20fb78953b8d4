"""The connector: the client port, sessions, the broadcast hub, overload
control, the admin API and metrics of one node."""
