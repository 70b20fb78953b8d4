"""What a run's result claims, checked: the deliveries expected from what
the node accepted, the workers' verification summed and cross-checked, the
reasons viewers were refused or ended by name, and the pass/fail verdict.
The per-viewer checking itself happens in the workers, in C
(``fanout/_loadgen.pxd`` describes it; :data:`CHECK_METHOD` summarizes it).
"""

from __future__ import annotations

import errno as errno_mod

from ..protocol import fanout_pb2 as pb

__all__ = ["CHECK_METHOD", "decoded_viewers", "end_counts", "error_counts",
           "expected_deliveries", "passed", "reason_name", "verification"]

#: How the result's ``gaps``, ``reorders`` and ``divergences`` were found.
CHECK_METHOD = (
    "Sampled viewers (every decode_every-th, and the first of each room in each "
    "process) inflate every Batch and check that each room's seq goes up by exactly "
    "1 from the join Ack (gaps: holes, reorders: seq <= last); they also build the "
    "room's reference, a rolling hash of its Batch frames. The node writes one frame "
    "object to every member of a room, so every other viewer must have received an "
    "exact run of the reference's frames: each keeps a rolling hash "
    "(chain = chain*P + h(frame)) and is aligned by the first seq of its first Batch "
    "(inflated once per viewer, which also checks its join point). A mismatch is a "
    "divergence; cut viewers must hold an exact prefix. Viewers the reference cannot "
    "cover are counted as unverified, not as passed."
)


def reason_name(code: int) -> str:
    """A ``fanout.v1.Reason`` by name; the number when this build does not know it."""
    try:
        return pb.Reason.Name(code)
    except ValueError:
        return str(code)


def error_counts(final: dict) -> dict[str, int]:
    """Refusals and errors of merged worker stats, by name: ``"kick:REASON"``,
    ``"error:REASON"``, ``"connect:ERRNO"``, ``"eof"``, ... (retried ones included)."""
    out: dict[str, int] = {}

    def add(key: str, n: int) -> None:
        if n:
            out[key] = out.get(key, 0) + n

    for code, n in final.get("kicks", {}).items():
        add(f"kick:{reason_name(code)}", n)
    for code, n in final.get("errors", {}).items():
        add(f"error:{reason_name(code)}", n)
    for key, n in final.get("errnos", {}).items():
        where, _, num = key.partition(":")
        name = errno_mod.errorcode.get(int(num), num) if num != "0" else "timeout"
        add(f"{where}:{name}", n)
    for why, n in final.get("tls_errors", {}).items():
        add(f"tls:{why}", n)
    add("eof", final.get("eofs", 0))
    add("protocol", final.get("protocol_errors", 0))
    add("bad_body", final.get("bad_bodies", 0))
    add("join_refused", final.get("join_failed", 0))
    return out


def end_counts(finals: list[dict]) -> dict[str, int]:
    """How the viewers that ended did, over all workers, with reasons and
    errnos by name (``"kick:SLOW_CONSUMER"``, ``"connect:ECONNREFUSED"``)."""
    ends: dict[str, int] = {}
    for f in finals:
        for k, n in f["ends"].items():
            how, _, code = k.partition(":")
            if how in ("kick", "error", "join"):
                k = f"{how}:{reason_name(int(code))}"
            elif how in ("connect", "socket") and code != "0":
                k = f"{how}:{errno_mod.errorcode.get(int(code), code)}"
            ends[k] = ends.get(k, 0) + n
    return ends


def verification(finals: list[dict]) -> dict[str, int]:
    """The workers' verify() counts summed, plus two checks across them:
    ``reference_mismatches`` (frames a room's second decoded viewer saw
    differently) and ``cross_process_mismatches`` (the processes' references
    of a room disagree). ``divergences`` counts all three kinds."""
    verify = {"divergences": 0, "verified": 0, "unverified": 0, "silent": 0, "cut": 0}
    for f in finals:
        for key in verify:
            verify[key] += f["verify"][key]
    # The processes' references of a room must agree with each other too.
    ref_mismatch = 0
    by_room: dict[str, set] = {}
    for f in finals:
        for room in f["verify"]["rooms"]:
            ref_mismatch += room["mismatches"]
            if room["frames"]:
                by_room.setdefault(room["room"], set()).add(
                    (room["frames"], room["chain"], room["first_seq"]))
    cross = sum(len(v) - 1 for v in by_room.values())
    verify["divergences"] += ref_mismatch + cross
    verify["reference_mismatches"] = ref_mismatch
    verify["cross_process_mismatches"] = cross
    return verify


def expected_deliveries(accepted_by_room: list[int], members: list[int]) -> int:
    """Messages the viewers should have received: per room, accepted
    messages x live members."""
    return sum(a * m for a, m in zip(accepted_by_room, members))


def decoded_viewers(specs: list[dict]) -> int:
    """Viewers that inflated and checked every Batch (the rule of
    ``fanout._loadgen.Viewers``: every decode_every-th, and each process's
    first viewer of each room)."""
    decoded = 0
    for spec in specs:
        seen: set[int] = set()
        for i in range(spec["count"]):
            room = (spec["start"] + i) % spec["rooms"]
            if i % spec["decode_every"] == 0 or room not in seen:
                decoded += 1
            seen.add(room)
    return decoded


def passed(result: dict, viewers: int, publishing: bool) -> bool:
    """A run passes with no gap, reorder or divergence, every viewer joined
    and, when publishing, every expected delivery made."""
    return (result["gaps"] == 0 and result["reorders"] == 0
            and result["divergences"] == 0 and result["viewers_joined"] == viewers
            and (not publishing or result["deliveries"] >= result["expected_deliveries"]))
