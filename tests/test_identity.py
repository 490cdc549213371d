"""Unit tests for two sans-I/O cores of the modes: IdentityMatcher (the id a
client sends first on a shared listener) and next_backoff (the pause between
failed dial rounds).  Time is passed in; nothing here opens a socket."""
import sys

import pytest
from hypothesis import given, strategies as st

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from sertcp import IDENTITY_PAUSE, IdentityMatcher, next_backoff  # noqa: E402

IDS = (b"c0001", b"c0002", b"c0003")


def matcher(ids=IDS, started=100.0, timeout=10.0):
    return IdentityMatcher(ids, started, timeout)


# ---------------------------------------------------------------------------
# IdentityMatcher: how an id ends
# ---------------------------------------------------------------------------

def test_id_ended_by_lf():
    assert matcher().feed(b"c0001\n", 100.0) == ("match", b"c0001", b"")


def test_id_ended_by_cr_lf():
    assert matcher().feed(b"c0002\r\n", 100.0) == ("match", b"c0002", b"")


def test_id_ended_by_a_pause():
    m = matcher()
    assert m.feed(b"c0003", 100.5) is None
    assert m.deadline() == pytest.approx(100.5 + IDENTITY_PAUSE)
    assert m.expire(100.5 + IDENTITY_PAUSE - 0.01) is None
    assert m.expire(100.5 + IDENTITY_PAUSE) == ("match", b"c0003", b"")


def test_id_and_cr_ended_by_a_pause():
    m = matcher()
    assert m.feed(b"c0003\r", 100.0) is None
    assert m.expire(100.0 + IDENTITY_PAUSE) == ("match", b"c0003", b"")


def test_bytes_after_the_id_belong_to_the_device():
    assert matcher().feed(b"c0001\nhello\n\x00\xff", 100.0) == ("match", b"c0001", b"hello\n\x00\xff")
    assert matcher().feed(b"c0002\r\n\r\nX", 100.0) == ("match", b"c0002", b"\r\nX")


def test_id_split_across_segments():
    m = matcher()
    assert m.feed(b"c00", 100.0) is None
    assert m.feed(b"02", 100.1) is None
    assert m.feed(b"\nrest", 100.2) == ("match", b"c0002", b"rest")


def test_cr_and_lf_in_different_segments():
    m = matcher()
    assert m.feed(b"c0001\r", 100.0) is None
    assert m.feed(b"\ndata", 100.05) == ("match", b"c0001", b"data")


def test_each_segment_restarts_the_pause():
    m = matcher()
    m.feed(b"c0", 100.0)
    m.feed(b"00", 100.15)
    assert m.expire(100.0 + IDENTITY_PAUSE) is None
    assert m.deadline() == pytest.approx(100.15 + IDENTITY_PAUSE)
    m.feed(b"1", 100.3)
    assert m.expire(100.3 + IDENTITY_PAUSE) == ("match", b"c0001", b"")


def test_large_segment_after_id_is_kept_whole():
    rest = bytes(range(256)) * 16
    assert matcher().feed(b"c0003\n" + rest, 100.0) == ("match", b"c0003", rest)


# ---------------------------------------------------------------------------
# IdentityMatcher: refusals
# ---------------------------------------------------------------------------

def test_unknown_id():
    assert matcher().feed(b"c0009\n", 100.0) == ("unknown", b"c0009", b"")


def test_unknown_id_ended_by_a_pause():
    m = matcher()
    assert m.feed(b"c0009", 100.0) is None
    assert m.expire(100.0 + IDENTITY_PAUSE) == ("unknown", b"c0009", b"")


def test_empty_line_is_not_an_id():
    assert matcher().feed(b"\r\n", 100.0)[0] == "unknown"


def test_id_is_case_and_byte_exact():
    assert matcher().feed(b"C0001\n", 100.0)[0] == "unknown"
    assert matcher().feed(b" c0001\n", 100.0)[0] == "unknown"
    assert matcher().feed(b"c00011\n", 100.0)[0] == "unknown"
    assert matcher().feed(b"c000\n", 100.0)[0] == "unknown"


def test_nothing_sent_is_late_at_the_timeout():
    m = matcher(started=100.0, timeout=1.0)
    assert m.deadline() == pytest.approx(101.0)
    assert m.expire(100.99) is None
    assert m.expire(101.0) == ("late", b"", b"")


def test_a_trickle_within_the_pause_ends_at_the_timeout():
    m = matcher(started=100.0, timeout=0.5)
    now = 100.0
    for byte in b"c00":  # one byte every 0.19 s: never a 0.2 s pause, never a newline
        assert m.feed(bytes([byte]), now) is None
        now += 0.19
    assert m.deadline() == pytest.approx(100.5)
    assert m.expire(100.5) == ("late", b"c00", b"")


def test_a_slow_id_that_pauses_before_the_timeout_matches():
    m = matcher(started=100.0, timeout=1.0)
    now = 100.0
    for byte in b"c0001":
        assert m.feed(bytes([byte]), now) is None
        now += 0.19
    # the last byte came at 100.76; the pause after it ends at 100.96 < 101.0
    assert m.expire(m.deadline()) == ("match", b"c0001", b"")


def test_too_long_without_newline_is_refused_at_once():
    m = matcher()  # longest id 5 bytes: at most 7 with CR LF
    assert m.feed(b"c0001\r", 100.0) is None
    result = m.feed(b"xy", 100.01)
    assert result is not None and result[0] == "unknown"
    assert len(result[1]) <= 7


def test_memory_is_bounded_by_the_longest_id():
    m = matcher()
    result = m.feed(b"G" * 4096, 100.0)
    assert result[0] == "unknown"
    assert len(result[1]) <= len(b"c0001") + 2


def test_ids_of_different_lengths():
    ids = (b"a", b"long-identity-0042")
    assert IdentityMatcher(ids, 0.0, 5.0).feed(b"a\n", 0.0) == ("match", b"a", b"")
    assert IdentityMatcher(ids, 0.0, 5.0).feed(b"long-identity-0042\r\nX", 0.0) == \
        ("match", b"long-identity-0042", b"X")
    m = IdentityMatcher(ids, 0.0, 5.0)
    assert m.feed(b"long-ident", 0.0) is None  # a prefix of the long id is not refused early


# property: however the id, its end and the data after it are cut into
# segments (each within the pause), the port gets exactly the data after it.

@given(identity=st.sampled_from(IDS),
       ending=st.sampled_from([b"\n", b"\r\n"]),
       rest=st.binary(max_size=64),
       cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_any_segmentation_gives_the_same_answer(identity, ending, rest, cuts):
    stream = identity + ending + rest
    points = sorted(set(c for c in cuts if 0 < c < len(stream)))
    segments = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    m = matcher()
    now = 100.0
    result = None
    sent = 0
    for segment in segments:
        result = m.feed(segment, now)
        sent += len(segment)
        now += IDENTITY_PAUSE / 2
        if result is not None:
            break
    assert result is not None
    outcome, got, after = result
    assert (outcome, got) == ("match", identity)
    # what came after the id in the segments fed so far, and the rest later
    assert after + stream[sent:] == rest


@given(data=st.binary(min_size=1, max_size=32).filter(lambda b: b"\n" not in b))
def test_garbage_never_matches(data):
    m = matcher()
    result = m.feed(data, 100.0)
    if result is None:
        result = m.expire(100.0 + IDENTITY_PAUSE)
    line = data[:-1] if data.endswith(b"\r") else data
    assert (result[0] == "match") == (line in IDS)


# ---------------------------------------------------------------------------
# next_backoff: doubling from reconnect_min to reconnect_max, 20% jitter off
# ---------------------------------------------------------------------------

def test_no_failure_waits_reconnect_min():
    assert next_backoff(0, 0.1, 0.8, 0.5) == 0.1


def test_doubles_up_to_the_maximum_without_jitter():
    assert [next_backoff(k, 0.1, 0.8, 0.0) for k in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8, 0.8])
    assert [next_backoff(k, 1, 60, 0.0) for k in range(1, 9)] == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60])


def test_first_failure_is_never_shortened_below_the_minimum():
    assert next_backoff(1, 0.1, 0.8, 1.0) == pytest.approx(0.1)


def test_full_jitter_takes_off_twenty_percent():
    assert next_backoff(3, 0.1, 0.8, 1.0) == pytest.approx(0.32)
    assert next_backoff(20, 0.1, 0.8, 1.0) == pytest.approx(0.64)


def test_many_failures_do_not_overflow():
    assert next_backoff(10 ** 6, 1.0, 60.0, 0.0) == pytest.approx(60.0)


def test_equal_bounds_give_a_fixed_pause():
    assert {next_backoff(k, 2.0, 2.0, e) for k in range(1, 10) for e in (0.0, 0.5, 1.0)} == {2.0}


@given(failures=st.integers(min_value=1, max_value=200),
       low=st.floats(min_value=0.01, max_value=10.0),
       span=st.floats(min_value=1.0, max_value=100.0),
       entropy=st.floats(min_value=0.0, max_value=1.0))
def test_always_within_bounds(failures, low, span, entropy):
    high = low * span
    delay = next_backoff(failures, low, high, entropy)
    base = min(high, low * 2 ** (failures - 1))
    assert low - 1e-9 <= delay <= high + 1e-9
    assert base * 0.8 - 1e-9 <= delay <= base + 1e-9


@given(low=st.floats(min_value=0.01, max_value=10.0),
       span=st.floats(min_value=1.0, max_value=100.0),
       entropy=st.floats(min_value=0.0, max_value=1.0))
def test_never_shrinks_as_failures_grow(low, span, entropy):
    high = low * span
    delays = [next_backoff(k, low, high, entropy) for k in range(1, 40)]
    assert delays == sorted(delays)
