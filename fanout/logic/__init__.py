"""The logic layer: sequence numbers, room budgets, per-user rate limits and
the one-login-per-device-class rule."""

from .local import KINDS, LocalLogic, Logic, Rejected, check_room_name

__all__ = ["KINDS", "LocalLogic", "Logic", "Rejected", "check_room_name"]
