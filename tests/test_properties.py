"""Properties of the sans-I/O cores, checked on random and mutated input
with hypothesis: the packer, the identity matcher, the config reader, the
byte-string syntax, and the Telnet / RFC 2217 codecs.  No processes, no
sockets: sertcp.py is imported."""
import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sertcp  # noqa: E402

# The suite's budget; SERTCP_HYPOTHESIS=thorough searches 30 times longer.
settings.register_profile("sertcp", deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=5000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SERTCP_HYPOTHESIS", "sertcp"))

# Pieces that make delimiters, CR/LF, IAC and NUL common in random input.
PIECES = st.one_of(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b"\xff\xff", b"a", b"aa", b"\xfe"]),
    st.binary(max_size=12),
)


@st.composite
def chunked(draw, pieces=PIECES, max_chunks=24):
    """Input as the list of chunks it arrives in (reads of any size)."""
    data = b"".join(draw(st.lists(pieces, max_size=40)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_chunks)))
    chunks, at = [], 0
    for cut in cuts + [len(data)]:
        chunks.append(data[at:cut])
        at = cut
    return chunks


# --- packer ------------------------------------------------------------------

DELIMITERS = st.one_of(st.none(), st.sampled_from([b"\n", b"\r\n", b"\x00", b"aa", b"\xff\xfe"]),
                       st.binary(min_size=1, max_size=2))


@st.composite
def packers(draw, strip=None):
    delimiter = draw(DELIMITERS)
    return dict(size=draw(st.integers(0, 40)),
                delimiter=delimiter,
                trailing=draw(st.integers(0, 2)) if delimiter else 0,
                strip=(draw(st.booleans()) if strip is None else strip) if delimiter else False,
                idle=draw(st.sampled_from([0.0, 0.01, 0.05])),
                max_hold=draw(st.sampled_from([0.0, 0.02, 0.1])),
                limit=draw(st.integers(1, 200)))


def run_packer(packer, chunks, gaps):
    """Feed chunks with gaps of time between them, expiring the timers when
    they are due; returns (packets, final flush)."""
    packets, now = [], 100.0
    for i, chunk in enumerate(chunks):
        packets += packer.feed(chunk, now)
        now += gaps[i % len(gaps)] if gaps else 0.0
        due = packer.deadline()
        if due is not None and now >= due:
            expired = packer.expire(now)
            assert expired and expired[0], "expire at its deadline flushed nothing"
            packets += expired
        else:
            assert packer.expire(now) == []
    return packets, packer.flush()


GAPS = st.lists(st.sampled_from([0.0, 0.001, 0.015, 0.06, 0.2]), max_size=5)


@given(packers(strip=False), chunked(), GAPS)
def test_packer_loses_and_reorders_nothing(config, chunks, gaps):
    packets, rest = run_packer(sertcp.Packer(**config), chunks, gaps)
    assert b"".join(packets) + rest == b"".join(chunks)


@given(packers(), chunked())
@example(dict(size=0, delimiter=b"\n", trailing=0, strip=False, idle=0.0, max_hold=0.0, limit=16), [b"x" * 100])
def test_packer_never_emits_more_than_its_limit(config, chunks):
    packer = sertcp.Packer(**config)
    limit = max(config["limit"], config["size"])
    packets, rest = run_packer(packer, chunks, [0.0])
    assert all(len(p) <= limit for p in packets), [len(p) for p in packets]
    assert len(rest) <= limit


@given(st.integers(1, 40), chunked())
def test_packer_by_size_cuts_exactly_that_size(size, chunks):
    packer = sertcp.Packer(size=size, limit=size)
    packets, rest = run_packer(packer, chunks, [0.0])
    assert all(len(p) == size for p in packets)
    assert len(rest) < size


def delimiter_model(data, delimiter, trailing, strip):
    """What delimiter packing means, written out plainly: cut after each
    delimiter and its trailing bytes (left to right, not overlapping);
    strip drops the delimiter itself.  The tail is left over."""
    packets = []
    while True:
        at = data.find(delimiter)
        if at < 0 or at + len(delimiter) + trailing > len(data):
            return packets, data
        end = at + len(delimiter) + trailing
        packet = data[:end]
        if strip:
            packet = packet[:at] + packet[at + len(delimiter):]
        packets.append(packet)
        data = data[end:]


@given(st.sampled_from([b"\n", b"\r\n", b"\x00", b"aa", b"\xff\xfe"]) | st.binary(min_size=1, max_size=2),
       st.integers(0, 2), st.booleans(), chunked())
def test_packer_by_delimiter_matches_the_model_however_the_input_is_cut(delimiter, trailing, strip, chunks):
    packer = sertcp.Packer(delimiter=delimiter, trailing=trailing, strip=strip, limit=1 << 30)
    packets, rest = run_packer(packer, chunks, [0.0])
    expected, tail = delimiter_model(b"".join(chunks), delimiter, trailing, strip)
    assert packets == expected
    assert rest == tail
    if strip and trailing == 0 and len(delimiter) == 1:
        # stripped output is the input minus its delimiters
        assert b"".join(packets) + rest == b"".join(chunks).replace(delimiter, b"")


# --- identity matcher ----------------------------------------------------------

IDS = st.sets(st.binary(min_size=1, max_size=8), max_size=4)
CLEAN_IDS = st.sets(st.binary(min_size=1, max_size=8).filter(lambda b: b"\r" not in b and b"\n" not in b),
                    min_size=1, max_size=4)


@given(IDS, chunked(), st.lists(st.sampled_from([0.0, 0.05, 0.19, 0.21, 1.0]), max_size=8),
       st.floats(0.05, 3.0))
def test_identity_matcher_decides_sanely_on_anything(ids, chunks, gaps, timeout):
    started = 50.0
    matcher = sertcp.IdentityMatcher(ids, started, timeout)
    now, fed = started, b""
    result = None
    for i, chunk in enumerate(chunks):
        fed += chunk
        result = matcher.feed(chunk, now)
        if result is None:
            now += gaps[i % len(gaps)] if gaps else 0.0
            assert matcher.deadline() is not None
            result = matcher.expire(now)
        if result is not None:
            break
    if result is None:
        result = matcher.expire(started + timeout)   # the deadline always ends it
        assert result is not None
    outcome, identity, rest = result
    assert outcome in ("match", "unknown", "late")
    if outcome == "match":
        assert identity in ids
        assert fed.startswith(identity)
    assert fed.endswith(rest)


@given(CLEAN_IDS, st.data(), st.sampled_from([b"\n", b"\r\n"]), chunked())
def test_identity_matcher_finds_a_known_id_however_it_is_cut(ids, data, ending, after):
    identity = data.draw(st.sampled_from(sorted(ids)))
    stream = identity + ending + b"".join(after)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    matcher = sertcp.IdentityMatcher(ids, 0.0, 10.0)
    at = 0
    for cut in cuts + [len(stream)]:
        result = matcher.feed(stream[at:cut], 0.01)
        if result is not None:
            outcome, got, rest = result
            assert (outcome, got) == ("match", identity)
            assert rest + stream[cut:] == b"".join(after)   # the caller forwards what follows
            return
        at = cut
    raise AssertionError("no decision on %r" % stream)


# --- configuration -------------------------------------------------------------

KEY_NAMES = sorted(set(k.name for k in sertcp.PORT_KEYS + sertcp.GLOBAL_KEYS))
VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "yes", "no", "maybe", "64k", "1m", "9g", "1e309", "nan", "inf",
                     "-inf", "1.5", "0x10", "1_000", "9" * 5000, "\\x", "\\xZZ", "\\q", "\\", "%(x)s",
                     "[::1]:7000", "[::1]", "[:7000", "host:", ":7000", "*:7000", "a:b:c", "h:0", "h:65536",
                     "127.0.0.1/33", "::/129", "10.0.0.0/8, ::1", ",", "60,10,3", "0,0,0", "1,2",
                     "loop://", "/dev/null", "rfc2217://localhost:1", "settings,dtr", "none", "all",
                     "\u202e\ufeff", "é", "\t", "7000", "1;2", "x # comment"]),
    st.text(max_size=20),
)
LINES = st.one_of(
    st.sampled_from(["[global]", "[DEFAULT]", "[p1]", "[p2]", "[cli]", "[", "[]", "[ x ]", "[p1",
                     "# comment", "; comment", "", "   ", "=", "= value", "key", "\ufeff[p1]"]),
    st.tuples(st.sampled_from(KEY_NAMES) | st.text(max_size=8), st.sampled_from([" = ", "=", ": ", " : "]),
              VALUES).map("".join),
    st.tuples(st.sampled_from(["  ", "\t"]), VALUES).map("".join),   # continuation lines
    st.text(max_size=30),
)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def check_config_text(path):
    """read_ini and build_config on a file: only ConfigError(s) may escape,
    and an accepted configuration can be printed (--check)."""
    try:
        sections, errors = sertcp.read_ini(str(path))
    except sertcp.ConfigError:
        pass
    else:
        assert all(isinstance(e, sertcp.ConfigError) for e in errors)
        for e in errors:
            str(e)
    try:
        config = sertcp.build_config(str(path), {}, {}, None)
    except sertcp.ConfigErrors as e:
        assert e.errors and all(isinstance(x, sertcp.ConfigError) for x in e.errors)
        return str(e)
    return sertcp.format_config(config)


@given(st.lists(LINES, max_size=25), st.sampled_from(["\n", "\r\n", "\r"]))
def test_config_reader_only_ever_reports_config_errors(scratch, lines, newline):
    path = scratch / "random.ini"
    path.write_bytes(newline.join(lines).encode("utf-8", "surrogatepass"))
    check_config_text(path)


@given(st.binary(max_size=300))
def test_config_reader_on_random_bytes(scratch, data):
    path = scratch / "random.bin"
    path.write_bytes(data)
    check_config_text(path)


VALID_PORT = "[p1]\ndevice = /dev/null\nlisten = 127.0.0.1:7000\n"


@given(st.lists(LINES, max_size=8))
def test_config_reader_on_a_valid_file_mutated(scratch, extra):
    path = scratch / "mutated.ini"
    path.write_text(VALID_PORT + "\n".join(extra) + "\n", encoding="utf-8")
    check_config_text(path)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=16),
       st.lists(LINES, max_size=8))
def test_the_password_is_never_in_config_errors_or_check_output(scratch, tail, extra):
    password = "\u00a7pw\u00a7" + tail          # the marker makes any leak findable
    assume(password not in "\n".join(extra))
    path = scratch / "secret.ini"
    path.write_text(VALID_PORT + "password = %s\n" % password + "\n".join(extra) + "\n", encoding="utf-8")
    assert password not in check_config_text(path)


# --- byte strings --------------------------------------------------------------

@given(st.binary(max_size=64))
def test_show_bytes_then_parse_bytes_is_the_identity(value):
    shown = sertcp.show_bytes(value)
    assert shown.isprintable() or shown == ""
    assert sertcp.parse_bytes(shown) == value


@given(st.text(max_size=40))
def test_parse_bytes_accepts_or_explains(text):
    try:
        value = sertcp.parse_bytes(text)
    except sertcp.ValueProblem:
        return
    assert sertcp.parse_bytes(sertcp.show_bytes(value)) == value


# --- Telnet and RFC 2217 ---------------------------------------------------------

OPTIONS = (0, 1, 3, 44)


def codec(binary=False):
    """A server-side codec like the RFC 2217 port makes; binary: the peer
    has agreed to send BINARY (so CR NUL is not undone)."""
    c = sertcp.TelnetCodec(local=OPTIONS, remote=(0, 3, 44), ask_local=(0, 3, 1), ask_remote=(0, 44))
    c.data_to_send()
    if binary:
        c.feed(b"\xff\xfb\x00")   # IAC WILL BINARY
        assert c.binary_in
    return c


def payload_of(items):
    return b"".join(i for i in items if isinstance(i, bytes))


TELNET_PIECES = st.one_of(
    st.sampled_from([b"\xff", b"\xff\xff", b"\xff\xfa", b"\xff\xf0", b"\xff\xfa\x2c\x01", b"\xff\xfb",
                     b"\xff\xfd\x00", b"\xff\xfe\x00", b"\xff\xfc\x2c", b"\xff\xf3", b"\r", b"\r\x00",
                     b"\x00", b"\n", b"\xff\xfa" + b"\x01" * 600]),
    st.binary(max_size=16),
)


@given(st.booleans(), chunked(TELNET_PIECES))
def test_telnet_codec_takes_anything(binary, chunks):
    c = codec(binary)
    answers = 0
    for chunk in chunks:
        for item in c.feed(chunk):
            assert isinstance(item, bytes) or (isinstance(item, tuple) and item and isinstance(item[0], str))
        answers += len(c.data_to_send())
        assert len(c.sb) <= sertcp.TELNET_SB_LIMIT
        escaped = c.escape(chunk)
        assert isinstance(escaped, bytes)
    # loop-free negotiation (RFC 1143): never more answers than commands heard
    commands = b"".join(chunks).count(b"\xff")
    assert answers <= 3 * commands


@given(st.booleans(), chunked(st.binary(max_size=16).map(lambda b: b.replace(b"\xff", b""))))
def test_telnet_data_without_iac_passes_unchanged(binary, chunks):
    data = b"".join(chunks)
    if not binary:
        # in NVT mode CR NUL means CR (RFC 854): only CR-free data is untouched
        chunks = [chunk.replace(b"\r", b"") for chunk in chunks]
        data = b"".join(chunks)
    c = codec(binary)
    got = b"".join(payload_of(c.feed(chunk)) for chunk in chunks)
    assert got == data
    assert c.data_to_send() == b""


@given(st.booleans(), chunked(), st.lists(st.integers(0, 64), max_size=6))
def test_telnet_escape_then_feed_round_trips(binary, chunks, splits):
    sender = sertcp.TelnetCodec(local=OPTIONS, remote=OPTIONS)
    receiver = sertcp.TelnetCodec(local=OPTIONS, remote=OPTIONS)
    if binary:
        sender.feed(b"\xff\xfd\x00")      # DO BINARY: the sender sends binary
        receiver.feed(b"\xff\xfb\x00")    # WILL BINARY: the receiver expects it
        assert sender.binary_out and receiver.binary_in
    wire = b"".join(sender.escape(chunk) for chunk in chunks)
    cuts = sorted(min(s, len(wire)) for s in splits)
    got, at = b"", 0
    for cut in cuts + [len(wire)]:
        got += payload_of(receiver.feed(wire[at:cut]))
        at = cut
    assert got == b"".join(chunks)


def test_telnet_server_and_client_codecs_agree_and_go_quiet():
    server = sertcp.TelnetCodec(local=OPTIONS, remote=(0, 3, 44), ask_local=(0, 3, 1), ask_remote=(0, 44))
    client = sertcp.TelnetCodec(local=(0, 3, 44), remote=OPTIONS, ask_local=(0, 3, 44), ask_remote=(0, 3))
    for _ in range(10):
        to_client, to_server = server.data_to_send(), client.data_to_send()
        if not to_client and not to_server:
            break
        client.feed(to_client)
        server.feed(to_server)
    else:
        raise AssertionError("negotiation did not settle in 10 rounds")
    assert server.binary_in and server.binary_out and client.binary_in and client.binary_out
    assert server.enabled("him", 44)


COM_PORT_SETTINGS = st.one_of(
    st.tuples(st.just("baudrate"), st.integers(1, 20000000)),
    st.tuples(st.just("bytesize"), st.integers(5, 8)),
    st.tuples(st.just("parity"), st.sampled_from(["none", "odd", "even", "mark", "space"])),
    st.tuples(st.just("stopbits"), st.sampled_from(["1", "1.5", "2"])),
    st.tuples(st.just("flow"), st.sampled_from(["none", "xonxoff", "rtscts", "dsrdtr"])),
    st.tuples(st.just("flow_in"), st.sampled_from(["none", "xonxoff", "rtscts", "dsrdtr"])),
    st.tuples(st.sampled_from(["dtr", "rts", "break"]), st.booleans()),
    st.tuples(st.sampled_from(["linemask", "modemmask"]), st.integers(0, 255)),
    st.tuples(st.just("purge"), st.integers(1, 3)),
)


@given(st.binary(max_size=12))
def test_com_port_decoders_take_anything(body):
    code, what, wanted, problem = sertcp.decode_com_port_request(body)
    assert problem is None or isinstance(problem, str)
    sertcp.decode_com_port_reply(body)


@given(COM_PORT_SETTINGS)
def test_com_port_requests_and_replies_round_trip(setting):
    what, value = setting
    code, got_what, wanted, problem = sertcp.decode_com_port_request(sertcp.com_port_request(what, value))
    assert (got_what, wanted, problem) == (what, value, None)
    assert sertcp.decode_com_port_reply(sertcp.com_port_reply(what, value)) == (what, value)


def test_a_delimiter_straddling_the_limit_is_cut_at_the_limit():
    # found by the property above: the limit holds even against a delimiter
    assert sertcp.Packer(delimiter=b"aa", limit=1).feed(b"aa", 0.0) == [b"a", b"a"]
