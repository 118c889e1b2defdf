"""Decision ids: UUIDv7 (RFC 9562), written as 32 lowercase hex characters like `uuid4().hex`.

Clients treat an id as opaque. Its first 48 bits are the Unix time in milliseconds at which it was
made, so that a replica asked about a decision it cannot find yet can tell one made moments ago (by
another replica, whose background writer has not reached the store yet: retry) from one that will
never come (NOT_FOUND); see router/serving/feedback.py. Ids made before this scheme are uuid4s,
whose version nibble (4) is never read as a time.

Layout (RFC 9562, section 5.7): unix_ts_ms (48 bits, big-endian) | version 7 (4) | rand_a (12) |
variant 0b10 (2) | rand_b (62). The 74 random bits come from `secrets`, so ids cannot be guessed.
"""

from __future__ import annotations

import secrets
import time

_RANDOM_BITS = 74  # rand_a (12) and rand_b (62)
_HEX_DIGITS = frozenset("0123456789abcdef")


def new_decision_id(unix_ms: int | None = None) -> str:
    """A fresh UUIDv7 as 32 lowercase hex characters; `unix_ms`: the time to put in it (now)."""
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"a UUIDv7 holds a Unix time in milliseconds from 0 to 2**48 - 1, got {ms}")
    random = secrets.randbits(_RANDOM_BITS)
    rand_a, rand_b = random >> 62, random & ((1 << 62) - 1)
    value = ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return f"{value:032x}"


def minted_at(decision_id: str) -> float | None:
    """The Unix time (seconds) at which `decision_id` was made, if it is a UUIDv7 written as
    `new_decision_id` writes it; None for anything else (a uuid4, a malformed or foreign id)."""
    if (
        len(decision_id) != 32
        or decision_id[12] != "7"
        or decision_id[16] not in "89ab"
        or not _HEX_DIGITS.issuperset(decision_id)
    ):
        return None
    return int(decision_id[:12], 16) / 1000.0
