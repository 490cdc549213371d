"""Packing device data into network packets: pack_size, pack_delimiter (one
or two bytes, C escapes), pack_trailing, pack_strip, pack_idle_ms,
pack_max_ms, and their combinations.

First the Packer core itself (bytes and times in, packets and deadlines
out), then each rule through the real process: a TCP client sees packet
boundaries as the moments bytes arrive."""
import re
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, Background, free_port, run_sertcp

sys.path.insert(0, str(ROOT))
import sertcp as sertcp_module  # noqa: E402  (the module under test, not the fixture)

Packer = sertcp_module.Packer


# =====================================================================
# The Packer core
# =====================================================================

def test_no_rule_means_no_packing():
    assert not Packer(0, None, 0, False, 0, 0).enabled
    for packer in (Packer(4, None, 0, False, 0, 0), Packer(0, b"\n", 0, False, 0, 0),
                   Packer(0, None, 0, False, 0.1, 0), Packer(0, None, 0, False, 0, 0.1)):
        assert packer.enabled


def test_size_cuts_every_n_bytes_and_holds_the_rest():
    p = Packer(4, None, 0, False, 0, 0)
    assert p.feed(b"0123456789", 0.0) == [b"0123", b"4567"]
    assert p.deadline() is None  # no timer rule: the 2 bytes wait for more
    assert p.feed(b"ab", 1.0) == [b"89ab"]
    assert p.feed(b"", 2.0) == []


def test_size_gathers_across_small_feeds():
    p = Packer(3, None, 0, False, 0, 0)
    assert p.feed(b"a", 0) == []
    assert p.feed(b"b", 0) == []
    assert p.feed(b"cd", 0) == [b"abc"]


def test_delimiter_of_one_byte():
    p = Packer(0, b"\n", 0, False, 0, 0)
    assert p.feed(b"one\ntwo\nthr", 0) == [b"one\n", b"two\n"]
    assert p.feed(b"ee\n", 0) == [b"three\n"]
    assert p.feed(b"\n\n", 0) == [b"\n", b"\n"]


def test_delimiter_of_two_bytes_split_across_feeds():
    p = Packer(0, b"\r\n", 0, False, 0, 0)
    assert p.feed(b"ab\r", 0) == []
    assert p.feed(b"\ncd\r", 0) == [b"ab\r\n"]
    assert p.feed(b"x\r\n", 0) == [b"cd\rx\r\n"]  # a lone \r is data


def test_delimiter_from_a_c_escape():
    assert sertcp_module.parse_bytes(r"\x03") == b"\x03"
    assert sertcp_module.parse_bytes(r"\r\n") == b"\r\n"
    p = Packer(0, sertcp_module.parse_bytes(r"\x00\xff"), 0, False, 0, 0)
    assert p.feed(b"a\x00b\x00\xffc", 0) == [b"a\x00b\x00\xff"]


def test_trailing_bytes_belong_to_the_packet():
    p = Packer(0, b"\x03", 2, False, 0, 0)
    assert p.feed(b"AB\x03", 0) == []
    assert p.feed(b"\x10", 0) == []
    assert p.feed(b"\x20CD\x03\x01\x02EF", 0) == [b"AB\x03\x10\x20", b"CD\x03\x01\x02"]


def test_trailing_bytes_may_equal_the_delimiter():
    p = Packer(0, b"\x03", 1, False, 0, 0)
    assert p.feed(b"A\x03\x03B\x03", 0) == [b"A\x03\x03"]
    assert p.feed(b"C", 0) == [b"B\x03C"]


def test_strip_drops_the_delimiter():
    p = Packer(0, b"\r\n", 0, True, 0, 0)
    assert p.feed(b"one\r\ntwo\r\n\r\n", 0) == [b"one", b"two", b""]


def test_strip_keeps_the_trailing_bytes():
    p = Packer(0, b"\x03", 2, True, 0, 0)
    assert p.feed(b"AB\x03\x12\x34", 0) == [b"AB\x12\x34"]


def test_idle_sends_after_the_device_falls_silent():
    p = Packer(0, None, 0, False, 0.2, 0)
    assert p.deadline() is None
    assert p.feed(b"abc", 10.0) == []
    assert p.deadline() == pytest.approx(10.2)
    assert p.expire(10.1) == []
    assert p.feed(b"d", 10.15) == []  # more data restarts the gap
    assert p.deadline() == pytest.approx(10.35)
    assert p.expire(10.3) == []
    assert p.expire(10.35) == [b"abcd"]
    assert p.deadline() is None
    assert p.expire(11.0) == []


def test_max_hold_sends_even_while_data_keeps_coming():
    p = Packer(0, None, 0, False, 0.3, 1.0)
    t = 0.0
    for _ in range(9):  # a byte every 0.1 s: never idle for 0.3 s
        assert p.feed(b"x", t) == []
        assert p.expire(t) == []
        t += 0.1
    assert p.deadline() == pytest.approx(1.0)
    assert p.expire(1.0) == [b"x" * 9]
    assert p.feed(b"y", 1.05) == []
    assert p.deadline() == pytest.approx(1.35)


def test_max_hold_alone():
    p = Packer(0, None, 0, False, 0, 0.5)
    p.feed(b"a", 0.0)
    p.feed(b"b", 0.4)
    assert p.deadline() == pytest.approx(0.5)
    assert p.expire(0.5) == [b"ab"]


def test_size_or_delimiter_whichever_comes_first():
    p = Packer(4, b"\n", 0, False, 0, 0)
    assert p.feed(b"ab\ncdefgh\n", 0) == [b"ab\n", b"cdef", b"gh\n"]


def test_size_with_idle_flushes_the_remainder():
    p = Packer(4, None, 0, False, 0.2, 0)
    assert p.feed(b"0123456789", 5.0) == [b"0123", b"4567"]
    assert p.deadline() == pytest.approx(5.2)
    assert p.expire(5.2) == [b"89"]


def test_delimiter_with_idle_flushes_an_unterminated_line():
    p = Packer(0, b"\n", 0, False, 0.2, 0)
    assert p.feed(b"line\npartial", 1.0) == [b"line\n"]
    assert p.expire(1.2) == [b"partial"]


def test_delimiter_with_strip_and_idle():
    p = Packer(0, b"\n", 0, True, 0.2, 0)
    assert p.feed(b"a\nb", 0) == [b"a"]
    assert p.expire(0.2) == [b"b"]


def test_waiting_for_trailing_bytes_is_bounded_by_idle():
    p = Packer(0, b"\x03", 2, False, 0.2, 0)
    assert p.feed(b"AB\x03\x01", 0) == []
    assert p.expire(0.2) == [b"AB\x03\x01"]


def test_a_packer_never_holds_more_than_its_limit():
    p = Packer(0, b"\n", 0, False, 0, 0, limit=1000)
    packets = p.feed(b"x" * 2500, 0)
    assert b"".join(packets) + p.flush() == b"x" * 2500
    assert len(p.pending) < 1000


chunks = st.lists(st.binary(min_size=0, max_size=40), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks, st.integers(0, 9), st.sampled_from([None, b"\n", b"\r\n", b"\x00"]),
       st.integers(0, 2))
def test_without_strip_packets_are_the_stream_in_order(parts, size, delimiter, trailing):
    if delimiter is None:
        trailing = 0
    p = Packer(size, delimiter, trailing, False, 0, 0)
    out = []
    for part in parts:
        out += p.feed(part, 0)
    assert b"".join(out) + p.flush() == b"".join(parts)
    for packet in out:
        assert packet
        if size:
            assert len(packet) <= size


@settings(max_examples=300, deadline=None)
@given(chunks, st.sampled_from([b"\n", b"\r\n", b"\x00"]))
def test_delimiter_packets_end_at_the_first_delimiter(parts, delimiter):
    p = Packer(0, delimiter, 0, False, 0, 0)
    out = []
    for part in parts:
        out += p.feed(part, 0)
    for packet in out:
        assert packet.endswith(delimiter)
        assert packet.find(delimiter) == len(packet) - len(delimiter)


@settings(max_examples=200, deadline=None)
@given(chunks, st.sampled_from([b"\n", b"\r\n"]))
def test_strip_removes_exactly_the_delimiters(parts, delimiter):
    p = Packer(0, delimiter, 0, True, 0, 0)
    out = []
    for part in parts:
        out += p.feed(part, 0)
    rest = p.flush()
    stream = b"".join(parts)
    assert delimiter.join(out + [rest]) == stream


# =====================================================================
# Each rule through the real process
# =====================================================================

def with_a_client(serve, clients, pty, *flags):
    """sertcp on the pty with packing flags, one client admitted:
    (process, client)."""
    s, port = serve(pty, *flags)
    c = clients(port)
    s.wait_log(r"\[cli\] client \S+ connected")
    return s, c


def held(c, wait=0.3):
    """Nothing reaches the client for `wait` seconds."""
    got = c.recv_available(wait)
    assert got == b"", "expected the bytes to be held, got %r" % got
    return True


def test_pack_size_sends_full_packets_and_holds_the_rest(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-size", "4")
    pty.write(b"0123456789")
    assert c.recv(8) == b"01234567"
    assert held(c)
    pty.write(b"ab")
    assert c.recv(4) == b"89ab"
    assert held(c, 0.1)


def test_pack_delimiter_sends_whole_lines(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\n")
    pty.write(b"first\nsec")
    assert c.recv(6) == b"first\n"
    assert held(c)
    pty.write(b"ond\n")
    assert c.recv(7) == b"second\n"


def test_pack_delimiter_of_two_bytes_split_between_writes(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\r\n")
    pty.write(b"ab\r")
    assert held(c)
    pty.write(b"\ncd")
    assert c.recv(4) == b"ab\r\n"
    assert held(c)


def test_pack_trailing_waits_for_the_bytes_after_the_delimiter(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\x03", "--pack-trailing", "2")
    pty.write(b"AB\x03")
    assert held(c)
    pty.write(b"\x01")
    assert held(c)
    pty.write(b"\x02CD")
    assert c.recv(5) == b"AB\x03\x01\x02"
    assert held(c)


def test_pack_strip_drops_the_delimiter(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\r\n", "--pack-strip", "yes")
    pty.write(b"one\r\ntwo\r\nthree")
    assert c.recv(6) == b"onetwo"
    assert held(c)


def test_pack_strip_with_trailing_keeps_the_trailing_bytes(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\x03", "--pack-trailing", "1",
                 "--pack-strip", "yes")
    pty.write(b"AB\x03\x7fCD")
    assert c.recv(3) == b"AB\x7f"
    assert held(c)


def test_pack_idle_sends_after_a_silence(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-idle-ms", "200")
    written = time.monotonic()
    pty.write(b"abc")
    assert c.recv_available(0.05) == b""
    assert c.recv(3, timeout=2) == b"abc"
    assert time.monotonic() - written >= 0.15


def test_pack_idle_restarts_with_each_byte(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-idle-ms", "400")
    started = time.monotonic()
    for byte in b"abcde":
        pty.write(bytes([byte]))
        # each gap (~0.1 s) is shorter than the idle time: nothing is sent
        assert c.recv_available(0.1) == b""
    assert time.monotonic() - started > 0.45  # longer than one idle time in all
    assert c.recv(5, timeout=2) == b"abcde"
    assert held(c)


def test_pack_max_sends_during_a_continuous_stream(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-idle-ms", "400", "--pack-max-ms", "300")
    started = time.monotonic()
    got = bytearray()
    arrivals = []
    sent = 0
    while time.monotonic() - started < 1.5:
        pty.write(b"x")  # a byte about every 50 ms: never idle for 400 ms
        sent += 1
        chunk = c.recv_available(0.05)
        if chunk:
            arrivals.append(time.monotonic() - started)
            got += chunk
    assert len(arrivals) >= 2, "expected packets while the device kept sending, got %r" % arrivals
    assert 0.2 <= arrivals[0] < 1.0
    got += c.recv(sent - len(got), timeout=3)
    assert bytes(got) == b"x" * sent


def test_pack_size_with_idle_flushes_the_remainder(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-size", "4", "--pack-idle-ms", "200")
    pty.write(b"0123456789")
    assert c.recv(8) == b"01234567"
    assert c.recv_available(0.05) == b""
    assert c.recv(2, timeout=2) == b"89"


def test_pack_delimiter_with_size_cuts_long_lines(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\n", "--pack-size", "5")
    pty.write(b"ab\nlonglongline")
    assert c.recv(13) == b"ab\nlonglongli"
    assert held(c)
    pty.write(b"\nxy")
    assert c.recv(3) == b"ne\n"
    assert held(c)


def test_pack_delimiter_with_idle_flushes_an_unterminated_line(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\n", "--pack-idle-ms", "200")
    pty.write(b"whole\npart")
    assert c.recv(6) == b"whole\n"
    assert c.recv_available(0.05) == b""
    assert c.recv(4, timeout=2) == b"part"


def test_pack_delimiter_strip_trailing_and_max_together(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\x03", "--pack-trailing", "1",
                 "--pack-strip", "yes", "--pack-max-ms", "300")
    pty.write(b"AB\x03\x01CD")
    assert c.recv(3) == b"AB\x01"
    assert c.recv_available(0.05) == b""
    assert c.recv(2, timeout=2) == b"CD"


def test_packing_applies_to_every_client(sertcp, pty, clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--max-clients", "2", "--pack-size", "3",
               pty.path, wait_port=port)
    s.wait_log(r"\[cli\] device \S+ opened")
    a = clients(port)
    s.wait_log(r"\[cli\] client \S+ connected")
    b = clients(port)
    s.wait_log(r"\[cli\] client \S+ connected", count=2)
    pty.write(b"abcde")
    assert a.recv(3) == b"abc"
    assert b.recv(3) == b"abc"
    assert held(a) and held(b, 0.05)


def test_packing_leaves_client_to_device_data_alone(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-size", "64", "--pack-delimiter", r"\n")
    c.send(b"abc")
    assert pty.read(3, timeout=1) == b"abc"


def test_packed_data_survives_a_large_stream(serve, pty, clients):
    s, c = with_a_client(serve, clients, pty, "--pack-delimiter", r"\n", "--pack-strip", "yes")
    lines = [b"line %06d %s" % (i, b"z" * (i % 50)) for i in range(20000)]
    # write while reading: a client that reads nothing until 1.2 MB were
    # written would rightly pause the device once its queue is full
    writer = Background(pty.write, b"\n".join(lines) + b"\n")
    expected = b"".join(lines)
    assert c.recv(len(expected), timeout=20) == expected
    writer.join()


# --- configuration of packing ---------------------------------------------------

@pytest.mark.parametrize("flags, key", [
    (["--pack-delimiter", "abc"], "pack_delimiter"),
    (["--pack-delimiter", r"\x"], "pack_delimiter"),
    (["--pack-trailing", "1"], "pack_trailing"),
    (["--pack-strip", "yes"], "pack_strip"),
    (["--pack-delimiter", r"\n", "--pack-trailing", "3"], "pack_trailing"),
    (["--pack-idle-ms", "-1"], "pack_idle_ms"),
    (["--pack-max-ms", "soon"], "pack_max_ms"),
    (["--pack-size", "-4"], "pack_size"),
])
def test_bad_packing_settings_are_refused(flags, key):
    result = run_sertcp(["--check", "--listen", "7000"] + flags + ["/dev/ttyUSB0"])
    assert result.returncode == 2, result.stdout
    flag = "--" + key.replace("_", "-")
    assert flag in result.stderr or re.search(r"\b%s\b" % key, result.stderr), result.stderr


def test_packing_settings_in_check_output():
    result = run_sertcp(["--check", "--listen", "7000", "--pack-size", "1k", "--pack-delimiter", r"\r\n",
                         "--pack-trailing", "2", "--pack-strip", "on", "--pack-idle-ms", "20",
                         "--pack-max-ms", "500", "/dev/ttyUSB0"])
    assert result.returncode == 0, result.stderr
    for line in ("pack_size = 1024", r"pack_delimiter = \r\n", "pack_trailing = 2",
                 "pack_strip = yes", "pack_idle_ms = 20", "pack_max_ms = 500"):
        assert "\n%s\n" % line in result.stdout, line
