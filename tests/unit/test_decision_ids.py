"""Decision ids are UUIDv7s (RFC 9562) written as uuid4().hex is: 32 lowercase hex characters that
carry the millisecond they were made, and nothing else is read as one."""

from __future__ import annotations

import time
import uuid

import pytest

from router.core.decision_ids import minted_at, new_decision_id


def test_an_id_is_a_uuid7_in_the_old_format_and_carries_its_time() -> None:
    before = time.time_ns() // 1_000_000
    decision_id = new_decision_id()
    after = time.time_ns() // 1_000_000
    assert len(decision_id) == 32 and decision_id == decision_id.lower()
    parsed = uuid.UUID(hex=decision_id)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert parsed.hex == decision_id
    made = minted_at(decision_id)
    assert made is not None and before / 1000 <= made <= after / 1000


def test_the_time_round_trips_to_the_millisecond() -> None:
    for ms in (0, 1, 1_700_000_000_123, 2**48 - 1):
        decision_id = new_decision_id(ms)
        assert int(decision_id[:12], 16) == ms
        assert minted_at(decision_id) == ms / 1000
    for ms in (-1, 2**48):
        with pytest.raises(ValueError):
            new_decision_id(ms)


def test_ids_are_unique() -> None:
    same_ms = [new_decision_id(1_700_000_000_000) for _ in range(100_000)]
    assert len(set(same_ms)) == len(same_ms)  # 74 random bits within one millisecond
    now = [new_decision_id() for _ in range(100_000)]
    assert len(set(now)) == len(now)


def test_ids_sort_by_the_time_they_were_made() -> None:
    ms = [1_700_000_000_000 + step for step in range(0, 5000, 7)]
    ids = [new_decision_id(m) for m in ms]
    assert sorted(ids) == ids
    first = new_decision_id()
    time.sleep(0.002)
    later = new_decision_id()
    assert first < later


def test_anything_else_has_no_time() -> None:
    fresh = new_decision_id()
    others = [
        uuid.uuid4().hex,  # the ids made before UUIDv7
        "f" * 32,
        "",
        fresh[:31],
        fresh + "0",
        fresh.upper(),
        fresh[:16] + "c" + fresh[17:],  # variant bits not 10
        fresh[:12] + "4" + fresh[13:],
        str(uuid.UUID(hex=fresh)),  # with dashes
        fresh[:20] + "g" + fresh[21:],
    ]
    assert [minted_at(other) for other in others] == [None] * len(others)
