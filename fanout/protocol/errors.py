"""The one exception base of fanout: every refusal carries a wire reason code.

A malformed frame (:class:`fanout.protocol.wire.WireError`, and the compiled
core's ``FrameError``, the same class), a refused token
(:class:`fanout.protocol.auth.AuthError`), a request the logic layer refuses
(:class:`fanout.logic.base.Rejected`) and an error a client SDK raises
(:class:`fanout.client.ClientError`) all derive from :class:`ReasonError`,
so one ``except ReasonError as exc`` can answer with ``exc.reason``.
"""

from __future__ import annotations


class ReasonError(Exception):
    """An error with a ``fanout.v1.Reason`` code.

    :ivar reason: the ``Reason`` value (an ``int``) sent in the Error or Kick.
    :ivar message: human-readable detail.
    """

    def __init__(self, reason: int, message: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        if not self.reason:
            return self.message
        return f"{self.reason_name}: {self.message}" if self.message else self.reason_name

    @property
    def reason_name(self) -> str:
        # Imported here: the compiled core imports this module before
        # protobuf may be wanted.
        from . import fanout_pb2 as pb
        try:
            return pb.Reason.Name(self.reason)
        except ValueError:
            return f"REASON_{self.reason}"
