"""Telnet and RFC 2217, byte for byte.

The first half feeds the sans-I/O cores directly (import sertcp): IAC
doubling, RFC 1143 negotiation without loops, subnegotiations (bounded,
cut short, stray ends), CR NUL, and the RFC 2217 encoders and decoders,
including the quirks real servers send.

The second half is a conformance run against the real process on a
pseudo-terminal: each RFC 2217 command 0-12 and each malformed case is
sent as exact bytes by a fresh client, and the exact answer and the effect
on the device are checked, while a second client on the same port (the
bystander) keeps working throughout -- after every test its data must
still cross both ways intact."""
import os
import random
import re
import socket
import sys
import termios
import time

import pytest

from conftest import ROOT, Pty, Sertcp, free_port, random_bytes

sys.path.insert(0, str(ROOT))
import sertcp as core  # noqa: E402  (the module under test)

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
NOP, DM, BRK, AYT, GA = 241, 242, 243, 246, 249
BINARY, ECHO, SGA, COM_PORT = 0, 1, 3, 44


def sb(*body):
    """IAC SB COM-PORT-OPTION body IAC SE, IAC in the body doubled."""
    raw = bytes(body[0]) if len(body) == 1 and isinstance(body[0], (bytes, bytearray)) else bytes(body)
    return bytes((IAC, SB, COM_PORT)) + raw.replace(b"\xff", b"\xff\xff") + bytes((IAC, SE))


def payload_of(items):
    return b"".join(i for i in items if isinstance(i, bytes))


def events_of(items):
    return [i for i in items if not isinstance(i, bytes)]


def server_codec():
    """A codec set up as sertcp's server role sets it up, opening already taken."""
    c = core.TelnetCodec(local=(BINARY, SGA, ECHO, COM_PORT), remote=(BINARY, SGA, COM_PORT),
                         ask_local=(BINARY, SGA, ECHO), ask_remote=(BINARY, COM_PORT))
    c.data_to_send()
    return c


def agreed_codec():
    c = server_codec()
    c.feed(bytes((IAC, DO, BINARY, IAC, WILL, BINARY, IAC, DO, SGA, IAC, DO, ECHO, IAC, WILL, COM_PORT)))
    assert c.data_to_send() == b""
    return c


# =====================================================================
# The sans-I/O codec
# =====================================================================

def test_opening_asks_for_what_the_server_role_offers():
    c = core.TelnetCodec(local=(BINARY, SGA, ECHO, COM_PORT), remote=(BINARY, SGA, COM_PORT),
                         ask_local=(BINARY, SGA, ECHO), ask_remote=(BINARY, COM_PORT))
    assert c.data_to_send() == bytes((IAC, WILL, BINARY, IAC, WILL, SGA, IAC, WILL, ECHO,
                                      IAC, DO, BINARY, IAC, DO, COM_PORT))
    assert c.data_to_send() == b""


def test_answers_to_our_requests_enable_without_a_reply():
    c = server_codec()
    items = c.feed(bytes((IAC, DO, BINARY, IAC, WILL, BINARY, IAC, WILL, COM_PORT)))
    assert events_of(items) == [("enabled", "us", BINARY), ("enabled", "him", BINARY), ("enabled", "him", COM_PORT)]
    assert c.data_to_send() == b""
    assert c.binary_in and c.binary_out
    assert c.enabled("him", COM_PORT) and not c.enabled("us", COM_PORT)


def test_peer_request_for_a_supported_option_is_accepted_once():
    c = server_codec()
    c.feed(bytes((IAC, DO, COM_PORT)))
    assert c.data_to_send() == bytes((IAC, WILL, COM_PORT))
    # RFC 1143: a repeated request for an enabled option gets no answer (no loop)
    for _ in range(3):
        c.feed(bytes((IAC, DO, COM_PORT)))
    assert c.data_to_send() == b""


def test_disabling_an_enabled_option_is_acknowledged_once():
    c = agreed_codec()
    items = c.feed(bytes((IAC, DONT, BINARY)))
    assert events_of(items) == [("disabled", "us", BINARY)]
    assert c.data_to_send() == bytes((IAC, WONT, BINARY))
    assert not c.binary_out
    c.feed(bytes((IAC, DONT, BINARY)))
    assert c.data_to_send() == b""


@pytest.mark.parametrize("verb,answer", [(WILL, DONT), (DO, WONT)])
def test_unknown_options_are_refused_and_refusals_not_answered(verb, answer):
    c = agreed_codec()
    c.feed(bytes((IAC, verb, 24)))          # TERMINAL-TYPE, not supported
    assert c.data_to_send() == bytes((IAC, answer, 24))
    c.feed(bytes((IAC, verb + 1, 24)))      # WONT / DONT for a disabled option: silence
    assert c.data_to_send() == b""
    c.feed(bytes((IAC, verb, 24)))          # asked again: refused again, nothing remembered
    assert c.data_to_send() == bytes((IAC, answer, 24))


def test_peer_refusing_our_request_is_reported_and_not_answered():
    c = core.TelnetCodec(local=(COM_PORT,), ask_local=(COM_PORT,))
    c.data_to_send()
    items = c.feed(bytes((IAC, DONT, COM_PORT)))
    assert events_of(items) == [("refused", "us", COM_PORT)]
    assert c.data_to_send() == b""


def test_q_method_queues_the_opposite_request_while_one_is_pending():
    c = core.TelnetCodec(local=(SGA,))
    c.request("us", SGA, True)
    assert c.data_to_send() == bytes((IAC, WILL, SGA))
    c.request("us", SGA, False)             # changed our mind before the answer: queued
    assert c.data_to_send() == b""
    c.feed(bytes((IAC, DO, SGA)))           # the answer to WILL; now the queued WONT goes
    assert c.data_to_send() == bytes((IAC, WONT, SGA))
    c.feed(bytes((IAC, DONT, SGA)))
    assert c.data_to_send() == b"" and not c.enabled("us", SGA)


def test_peer_answering_dont_with_will_does_not_start_a_loop():
    c = agreed_codec()
    c.request("him", BINARY, False)
    assert c.data_to_send() == bytes((IAC, DONT, BINARY))
    c.feed(bytes((IAC, WILL, BINARY)))      # RFC 1143: an error; settle, answer nothing
    assert c.data_to_send() == b""


def test_iac_doubling_both_ways():
    c = agreed_codec()
    assert c.escape(bytes(range(256))) == bytes(range(255)) + b"\xff\xff"
    assert payload_of(c.feed(b"a\xff\xffb\xff\xff\xff\xffc")) == b"a\xffb\xff\xffc"


def test_every_split_of_a_doubled_stream_decodes_the_same():
    data = bytes(range(256)) + b"\xff" * 7 + b"\x00\xff"
    wire = data.replace(b"\xff", b"\xff\xff")
    for cut in range(len(wire) + 1):
        c = agreed_codec()
        got = payload_of(c.feed(wire[:cut]) + c.feed(wire[cut:]))
        assert got == data, cut


def test_random_splits_with_commands_mixed_in():
    rnd = random.Random(2217)
    commands = [bytes((IAC, NOP)), sb(1, 0, 0, 0x25, 0xff), bytes((IAC, WILL, 24)), bytes((IAC, AYT))]
    for _ in range(400):
        data = bytes(rnd.choice((0xff, 0xff, 13, 0, rnd.randrange(256))) for _ in range(rnd.randrange(60)))
        wire = data.replace(b"\xff", b"\xff\xff")
        at = rnd.randrange(len(wire) + 1)
        while wire[:at].count(b"\xff") % 2:   # not inside an IAC IAC pair
            at -= 1
        wire = wire[:at] + rnd.choice(commands) + wire[at:]
        c = agreed_codec()
        items, i = [], 0
        while i < len(wire):
            step = rnd.randrange(1, 9)
            items += c.feed(wire[i:i + step])
            i += step
        assert payload_of(items) == data


def test_long_chunks_with_rare_iac_decode_like_dense_ones():
    """Chunks where IAC is rare take the split-on-IAC way to undouble (and
    dense ones the replace way): split anywhere, a command anywhere, lone
    IAC at a chunk's end, both give exactly the data and the command."""
    rnd = random.Random(854)
    for _ in range(150):
        size = rnd.randrange(2000, 20000)
        data = bytearray(random_bytes(rnd, size).replace(b"\xff", b"\x00"))
        for _ in range(size // rnd.choice((13, 40, 200, 1000))):
            data[rnd.randrange(size)] = 0xff
        data = bytes(data)
        wire = data.replace(b"\xff", b"\xff\xff")
        at = rnd.randrange(len(wire) + 1)
        while wire[:at].count(b"\xff") % 2:   # not inside an IAC IAC pair
            at -= 1
        wire = wire[:at] + bytes((IAC, NOP)) + wire[at:]
        c = agreed_codec()
        items, i = [], 0
        while i < len(wire):
            end = i + rnd.randrange(1, 8000)
            iac = wire.find(b"\xff", i + 1000)
            if rnd.random() < 0.5 and iac >= 0:
                end = iac + 1              # just after an IAC: often between a pair's two
            items += c.feed(wire[i:end])
            i = end
        assert payload_of(items) == data
        assert events_of(items) == [("command", NOP)]


def test_subnegotiation_values_keep_a_doubled_iac():
    c = agreed_codec()
    items = c.feed(sb(11, 0xff) + b"after")
    assert events_of(items) == [("sb", COM_PORT, bytes((11, 0xff)))]
    assert payload_of(items) == b"after"
    assert core.TelnetCodec.subnegotiation(COM_PORT, b"\x65\x00\x00\x00\xff") == \
        bytes((IAC, SB, COM_PORT, 0x65, 0, 0, 0, 0xff, 0xff, IAC, SE))


def test_subnegotiation_split_into_single_bytes():
    c = agreed_codec()
    items = []
    for byte in sb(1, 0, 0, 0x4b, 0) + b"x":
        items += c.feed(bytes((byte,)))
    assert events_of(items) == [("sb", COM_PORT, bytes((1, 0, 0, 0x4b, 0)))]
    assert payload_of(items) == b"x"


@pytest.mark.parametrize("command", [NOP, DM, AYT, GA, 244, 245, 247, 248, 239, 0, 17])
def test_other_commands_never_reach_the_device(command):
    c = agreed_codec()
    items = c.feed(b"a" + bytes((IAC, command)) + b"b")
    assert payload_of(items) == b"ab"
    assert ("command", command) in events_of(items)


def test_iac_brk_is_a_break_event():
    c = agreed_codec()
    items = c.feed(b"a\xff\xf3b")
    assert payload_of(items) == b"ab" and ("break",) in events_of(items)


def test_oversized_subnegotiation_is_discarded_whole():
    c = agreed_codec()
    items = c.feed(bytes((IAC, SB, COM_PORT)) + b"\x00" * (core.TELNET_SB_LIMIT + 100) + bytes((IAC, SE)) + b"ok")
    assert payload_of(items) == b"ok"
    assert [e[0] for e in events_of(items)] == ["malformed"]
    assert len(c.sb) == 0   # nothing kept


def test_subnegotiation_cut_short_by_a_command_is_dropped_and_the_command_kept():
    c = agreed_codec()
    items = c.feed(bytes((IAC, SB, COM_PORT, 1, 0, IAC, WILL, 24)) + b"rest")
    assert [e[0] for e in events_of(items)] == ["malformed"]
    assert c.data_to_send() == bytes((IAC, DONT, 24))
    assert payload_of(items) == b"rest"


@pytest.mark.parametrize("wire", [bytes((IAC, SE)), bytes((IAC, SB, IAC, SE))])
def test_stray_ends_and_empty_subnegotiations_are_ignored(wire):
    c = agreed_codec()
    items = c.feed(b"a" + wire + b"b")
    assert payload_of(items) == b"ab"
    assert [e[0] for e in events_of(items)] == ["malformed"]


def test_unterminated_subnegotiation_swallows_until_its_end():
    c = agreed_codec()
    assert payload_of(c.feed(bytes((IAC, SB, COM_PORT, 1)) + b"lost" * 10)) == b""
    assert payload_of(c.feed(bytes((IAC, SE)) + b"back")) == b"back"


def test_cr_nul_is_undone_while_the_peer_is_not_binary():
    c = core.TelnetCodec(local=(SGA,), remote=(SGA,))
    assert payload_of(c.feed(b"a\r\0b\r\nc\r")) == b"a\rb\r\nc\r"
    assert payload_of(c.feed(b"\0d")) == b"d"          # CR | NUL across two reads
    assert c.escape(b"x\ry\r\nz") == b"x\r\0y\r\nz"
    c.feed(bytes((IAC, WILL, BINARY)))                  # refused here (not in remote): stays text
    assert c.data_to_send() == bytes((IAC, DONT, BINARY))
    assert payload_of(c.feed(b"\r\0")) == b"\r"


def test_cr_nul_is_data_once_binary():
    c = agreed_codec()
    assert payload_of(c.feed(b"a\r\0b")) == b"a\r\0b"
    assert c.escape(b"\r") == b"\r"


# =====================================================================
# RFC 2217 encoders and decoders
# =====================================================================

@pytest.mark.parametrize("body,expected", [
    (b"\x00", (0, "signature", None, None)),
    (b"\x00hello", (0, "signature", b"hello", None)),
    (b"\x01\x00\x00\x4b\x00", (1, "baudrate", 19200, None)),
    (b"\x01\x00\x00\x00\x00", (1, "baudrate", None, None)),
    (b"\x02\x07", (2, "bytesize", 7, None)),
    (b"\x02\x00", (2, "bytesize", None, None)),
    (b"\x03\x03", (3, "parity", "even", None)),
    (b"\x03\x05", (3, "parity", "space", None)),
    (b"\x04\x03", (4, "stopbits", "1.5", None)),
    (b"\x05\x00", (5, "flow", None, None)),
    (b"\x05\x03", (5, "flow", "rtscts", None)),
    (b"\x05\x05", (5, "break", True, None)),
    (b"\x05\x09", (5, "dtr", False, None)),
    (b"\x05\x0a", (5, "rts", None, None)),
    (b"\x05\x10", (5, "flow_in", "rtscts", None)),
    (b"\x06", (6, "linestate", None, None)),
    (b"\x07", (7, "modemstate", None, None)),
    (b"\x08", (8, "suspend", None, None)),
    (b"\x09", (9, "resume", None, None)),
    (b"\x0a\x60", (10, "linemask", 0x60, None)),
    (b"\x0b\xff", (11, "modemmask", 255, None)),
    (b"\x0c\x03", (12, "purge", 3, None)),
])
def test_every_client_command_decodes(body, expected):
    assert core.decode_com_port_request(body) == expected


@pytest.mark.parametrize("body,what", [
    (b"\x01\xff\xff\xff\xff", "baudrate"), (b"\x01\x00", "baudrate"), (b"\x01\x00\x00\x25\x80\x00", "baudrate"),
    (b"\x02\x09", "bytesize"), (b"\x02\x04", "bytesize"), (b"\x02", "bytesize"), (b"\x03\x06", "parity"),
    (b"\x04\x04", "stopbits"), (b"\x05\x14", "flow"), (b"\x05\x11", "flow"), (b"\x05", "flow"),
    (b"\x0a", "linemask"), (b"\x0b\x01\x02", "modemmask"), (b"\x0c\x00", "purge"), (b"\x0c\x04", "purge"),
])
def test_values_out_of_range_become_questions(body, what):
    code, got_what, wanted, problem = core.decode_com_port_request(body)
    assert (got_what, wanted) == (what, None) and problem


@pytest.mark.parametrize("body", [b"", b"\x0d", b"\x65\x00\x00\x25\x80", b"\xff"])
def test_codes_that_are_not_client_commands_are_ignored(body):
    assert core.decode_com_port_request(body)[1] is None


def test_replies_carry_code_plus_100():
    assert core.com_port_reply("baudrate", 115200) == bytes((101, 0, 1, 0xc2, 0))
    assert core.com_port_reply("parity", "odd") == bytes((103, 2))
    assert core.com_port_reply("stopbits", "1.5") == bytes((104, 3))
    assert core.com_port_reply("flow", "xonxoff") == bytes((105, 2))
    assert core.com_port_reply("flow_in", "none") == bytes((105, 14))
    assert core.com_port_reply("dtr", False) == bytes((105, 9))
    assert core.com_port_reply("modemmask", 0x30) == bytes((111, 0x30))
    assert core.com_port_reply("linemask", 0) == bytes((110, 0))
    assert core.com_port_reply("purge", 2) == bytes((112, 2))


@pytest.mark.parametrize("body,expected", [
    (bytes((101, 0, 1, 0xc2, 0)), ("baudrate", 115200)),
    (bytes((101, 0, 1, 0xc2, 0, 0, 0, 0, 0)), ("baudrate", 115200)),   # sredird: 8 bytes
    (bytes((1, 0, 0, 0x25, 0x80)), ("baudrate", 9600)),                # the client's code
    (bytes((101, 14)), None),                                         # ser2net's 1-byte "Cisco" rate
    (bytes((102, 7)), ("bytesize", 7)),
    (bytes((103, 3)), ("parity", "even")),
    (bytes((4, 2)), ("stopbits", "2")),
    (bytes((105, 3)), ("flow", "rtscts")),
    (bytes((105, 8)), ("dtr", True)),
    (bytes((108,)), ("suspend", None)),
    (bytes((8,)), ("suspend", None)),
    (bytes((109,)), ("resume", None)),
    (bytes((107, 0x30)), ("modemstate", 0x30)),
    (bytes((100,)) + b"ser2net", ("signature", b"ser2net")),
    (bytes((103, 9)), None),
    (b"", None),
])
def test_server_replies_decode_with_real_servers_quirks(body, expected):
    assert core.decode_com_port_reply(body) == expected


def test_modem_notifications_follow_the_mask():
    cp = core.ComPortServer()
    assert cp.modem_notification(0x30, None) == bytes((107, 0x30))
    assert cp.modem_notification(0x20, 0x30) == bytes((107, 0x21))    # CTS dropped: delta CTS
    assert cp.modem_notification(0x00, 0x40) == bytes((107, 0x04))    # RI trailing edge
    cp.modem_mask = 0x80                                              # CD only
    assert cp.modem_notification(0x20, 0x30) is None
    assert cp.modem_notification(0x80, 0x00) == bytes((107, 0x80))
    cp.line_mask = 0x60
    assert cp.line_notification(0x60, 0x00) == bytes((106, 0x60))
    assert cp.line_notification(0x61, 0x60) is None


def test_client_state_asks_only_for_what_changed():
    cp = core.ComPortClient()
    settings = {"baudrate": 9600, "bytesize": 8, "parity": "none", "stopbits": "1", "flow": "none"}
    assert cp.update(settings) == [bytes((1, 0, 0, 0x25, 0x80)), bytes((2, 8)), bytes((3, 1)), bytes((4, 1)),
                                   bytes((5, 1))]
    assert cp.update(settings) == []
    assert cp.update(dict(settings, baudrate=115200)) == [bytes((1, 0, 1, 0xc2, 0))]
    assert cp.update(dict(settings, baudrate=0)) == []               # B0: hang-up, not a rate
    assert cp.reply(bytes((101, 0, 0, 0x25, 0x80))) == ("baudrate", 9600, 115200)


# =====================================================================
# Conformance against the real process
# =====================================================================

OPENING = bytes((IAC, WILL, BINARY, IAC, WILL, SGA, IAC, WILL, ECHO, IAC, DO, BINARY, IAC, DO, COM_PORT))
ANSWERS = bytes((IAC, DO, BINARY, IAC, DO, SGA, IAC, DO, ECHO, IAC, WILL, BINARY, IAC, WILL, COM_PORT))


class TelnetPeer:
    """A scripted Telnet client: sends exact bytes, checks exact bytes.

    Besides exact reads it can parse what arrives into payload and
    subnegotiations, for a client that must cope with notifications it
    did not ask for (the bystander hears other clients' changes)."""

    def __init__(self, port, host="127.0.0.1", source=None):
        self.sock = socket.create_connection((host, port), timeout=10,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = bytearray()
        self.payload = bytearray()
        self.subnegotiations = []

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        assert chunk, "closed by sertcp"
        self.raw += chunk
        return True

    def expect(self, wanted, timeout=5.0):
        """The next bytes are exactly `wanted`."""
        deadline = time.monotonic() + timeout
        while len(self.raw) < len(wanted) and time.monotonic() < deadline:
            self._fill(deadline)
        got = bytes(self.raw[:len(wanted)])
        del self.raw[:len(wanted)]
        assert got == wanted, "expected %s, got %s" % (wanted.hex(" "), got.hex(" "))

    def quiet(self, wait=0.3):
        """Nothing arrives for `wait` seconds."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self._fill(deadline)
        assert not self.raw, "unexpected bytes: %s" % bytes(self.raw).hex(" ")

    def agree(self):
        """The opening: the server's offers, our answers, and the first
        NOTIFY-MODEMSTATE (0: a pty has no modem lines)."""
        self.expect(OPENING)
        self.send(ANSWERS)
        self.expect(sb(107, 0))

    def data(self, n, timeout=10.0):
        """n payload bytes, with any subnegotiations set aside."""
        deadline = time.monotonic() + timeout
        while len(self.payload) < n:
            self._parse()
            if len(self.payload) >= n:
                break
            assert time.monotonic() < deadline, "got %d of %d payload bytes" % (len(self.payload), n)
            self._fill(deadline)
        out = bytes(self.payload[:n])
        del self.payload[:n]
        return out

    def heard(self, body, timeout=5.0):
        """Wait until a subnegotiation `body` (after the option) has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            self._parse()
            if body in self.subnegotiations:
                return
            assert time.monotonic() < deadline, "never heard %s" % body.hex(" ")
            self._fill(deadline)

    def _parse(self):
        buf, i = self.raw, 0
        while i < len(buf):
            if buf[i] != IAC:
                j = buf.find(b"\xff", i)
                j = len(buf) if j < 0 else j
                self.payload += buf[i:j]
                i = j
                continue
            if i + 1 >= len(buf):
                break
            if buf[i + 1] == IAC:
                self.payload.append(IAC)
                i += 2
            elif buf[i + 1] == SB:
                end = buf.find(bytes((IAC, SE)), i)
                if end < 0:
                    break
                self.subnegotiations.append(bytes(buf[i + 2:end]).replace(b"\xff\xff", b"\xff"))
                i = end + 2
            elif buf[i + 1] in (WILL, WONT, DO, DONT):
                if i + 2 >= len(buf):
                    break
                i += 3
            else:
                i += 2
        del buf[:i]

    def close(self):
        self.sock.close()


def scratch_pty_keeps(change):
    """Whether this kernel's ptys keep a termios change at all (some
    sandboxed kernels refuse CS7 and PARENB on ptys with EINVAL); the value
    in force that sertcp reports must match what the kernel kept."""
    m, s = os.openpty()
    try:
        attrs = termios.tcgetattr(s)
        change(attrs)
        try:
            termios.tcsetattr(s, termios.TCSANOW, attrs)
        except termios.error:
            return False
        return termios.tcgetattr(s)[2] == attrs[2]
    finally:
        os.close(m)
        os.close(s)


def keeps_cs7(attrs):
    attrs[2] = (attrs[2] & ~termios.CSIZE) | termios.CS7


def keeps_parenb(attrs):
    attrs[2] |= termios.PARENB


def keeps_parodd(attrs):
    attrs[2] |= termios.PARENB | termios.PARODD


class Conformance:
    def __init__(self, tmpdir):
        self.pty = Pty()
        self.port = free_port()
        self.sertcp = Sertcp(["--listen", "127.0.0.1:%d" % self.port, "--protocol", "rfc2217",
                              "--max-clients", "8", "--log-level", "debug", self.pty.path], tmpdir)
        self.sertcp.wait_listening(self.port)
        self.sertcp.wait_log(r"device \S+ opened")
        self.bystander = TelnetPeer(self.port)
        self.bystander.agree()
        self.rounds = 0
        self.peers = []
        self.sources = 0

    def peer(self, agree=True):
        # each peer from its own loopback address: sertcp rate-limits log lines per address
        self.sources += 1
        p = TelnetPeer(self.port, source="127.0.%d.%d" % (1 + self.sources // 250, 1 + self.sources % 250))
        self.peers.append(p)
        if agree:
            p.agree()
        return p

    def termios(self):
        return termios.tcgetattr(self.pty.master)

    def bystander_still_works(self):
        """All 256 byte values both ways through the bystander."""
        self.rounds += 1
        marker = b"round %d:" % self.rounds
        self.pty.write(marker + bytes(range(256)))
        assert self.bystander.data(len(marker) + 256) == marker + bytes(range(256))
        self.bystander.send((marker + bytes(range(256))).replace(b"\xff", b"\xff\xff"))
        assert self.pty.read(len(marker) + 256) == marker + bytes(range(256))

    def close(self):
        for p in self.peers + [self.bystander]:
            p.close()
        code = self.sertcp.stop()
        self.pty.close()
        assert code == 0, self.sertcp.log()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Conformance(tmp_path_factory.mktemp("conformance"))
    yield s
    s.close()


@pytest.fixture
def port(server):
    """A fresh scripted client per test; afterwards the bystander must still work."""
    yield server
    for p in server.peers:
        p.close()
    server.peers = []
    assert server.sertcp.proc.poll() is None, server.sertcp.log()
    server.bystander_still_works()
    # each test starts from the configured settings (the bystander stays, so undo by hand)
    fixer = server.peer()
    fixer.send(sb(1, 0, 0, 0x25, 0x80) + sb(2, 8) + sb(3, 1) + sb(4, 1) + sb(5, 1))
    fixer.expect(sb(101, 0, 0, 0x25, 0x80) + sb(102, 8) + sb(103, 1) + sb(104, 1) + sb(105, 1))
    fixer.close()
    server.peers = []


def test_the_opening_and_the_first_modem_state(port):
    port.peer()   # agree() checks every byte


def test_signature_request_names_sertcp(port):
    p = port.peer()
    p.send(sb(0))
    p.expect(sb(100, *("sertcp %s" % core.__version__).encode()))
    p.send(sb(0, *b"pyserial"))    # the client's own signature: noted, not answered
    p.quiet()


def test_set_baudrate_applies_answers_and_tells_the_bystander(port):
    p = port.peer()
    p.send(sb(1, 0, 0, 0x4b, 0))
    p.expect(sb(101, 0, 0, 0x4b, 0))
    assert port.termios()[4] == termios.B19200
    port.bystander.heard(bytes((COM_PORT, 101, 0, 0, 0x4b, 0)))
    p.send(sb(1, 0, 0, 0, 0))      # 0: a question
    p.expect(sb(101, 0, 0, 0x4b, 0))


@pytest.mark.parametrize("value", [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x01", b"\x00\x00", b"\x00\x00\x25",
                                   b"\x00\x00\x25\x80\x00"])
def test_bad_baud_rates_change_nothing_and_get_the_rate_in_force(port, value):
    p = port.peer()
    before = port.termios()
    p.send(sb(bytes((1,)) + value))
    p.expect(sb(101, 0, 0, 0x25, 0x80))       # 9600, in four bytes, never a "Cisco" one
    assert port.termios() == before
    p.send(sb(1, 0, 0, 0x96, 0))              # a good one afterwards: still four bytes
    p.expect(sb(101, 0, 0, 0x96, 0))


def test_set_datasize(port):
    p = port.peer()
    kept = scratch_pty_keeps(keeps_cs7)
    p.send(sb(2, 7))
    p.expect(sb(102, 7 if kept else 8))
    assert (port.termios()[2] & termios.CSIZE) == (termios.CS7 if kept else termios.CS8)
    for bad in (9, 4, 0):                     # out of range, out of range, a question
        p.send(sb(2, bad))
        p.expect(sb(102, 7 if kept else 8))


def test_set_parity(port):
    p = port.peer()
    kept = scratch_pty_keeps(keeps_parenb)
    p.send(sb(3, 3))                          # even
    p.expect(sb(103, 3 if kept else 1))
    assert bool(port.termios()[2] & termios.PARENB) == kept
    for bad in (6, 0xff, 0):
        p.send(sb(3, bad))
        p.expect(sb(103, 3 if kept else 1))


def test_set_stopsize(port):
    p = port.peer()
    p.send(sb(4, 2))
    p.expect(sb(104, 2))
    assert port.termios()[2] & termios.CSTOPB
    p.send(sb(4, 4))
    p.expect(sb(104, 2))
    p.send(sb(4, 1))
    p.expect(sb(104, 1))
    assert not port.termios()[2] & termios.CSTOPB


def test_set_control_flow_settings(port):
    p = port.peer()
    p.send(sb(5, 0))
    p.expect(sb(105, 1))                      # no flow control
    p.send(sb(5, 3))
    p.expect(sb(105, 3))
    assert port.termios()[2] & termios.CRTSCTS
    p.send(sb(5, 13))                         # inbound, asked: hardware
    p.expect(sb(105, 16))
    p.send(sb(5, 2))
    p.expect(sb(105, 2))
    assert port.termios()[0] & termios.IXON and not port.termios()[2] & termios.CRTSCTS
    p.send(sb(5, 14))                         # inbound none: the one flow setting is none
    p.expect(sb(105, 14))
    p.send(sb(5, 0))
    p.expect(sb(105, 1))
    for unsupported in (17, 20, 0xff):        # DCD flow, beyond the table: the flow in force
        p.send(sb(5, unsupported))
        p.expect(sb(105, 1))


@pytest.mark.parametrize("query,on,off", [(7, 8, 9), (10, 11, 12), (4, 5, 6)], ids=["dtr", "rts", "break"])
def test_set_control_lines_are_answered_with_their_state(port, query, on, off):
    p = port.peer()
    p.send(sb(5, query))
    initial = on if query != 4 else off       # DTR/RTS on while a client is connected; no break
    p.expect(sb(105, initial))
    p.send(sb(5, off))
    p.expect(sb(105, off))
    p.send(sb(5, query))
    p.expect(sb(105, off))
    p.send(sb(5, on))
    p.expect(sb(105, on))
    if query == 4:
        p.send(sb(5, off))
        p.expect(sb(105, off))


def test_notify_linestate_and_its_mask(port):
    p = port.peer()
    p.send(sb(6))
    p.expect(sb(106, 0))                      # the default mask selects nothing
    p.send(sb(10, 0x60))
    p.expect(sb(110, 0x60))
    p.send(sb(6))
    p.expect(sb(106, 0x60))                   # nothing waits for the line: both registers empty


def test_notify_modemstate_and_its_mask(port):
    p = port.peer()
    p.send(sb(7))
    p.expect(sb(107, 0))
    p.send(sb(11, 0xff))                      # 255 must travel as IAC IAC both ways
    p.expect(sb(111, 0xff))
    p.send(sb(11, 0x10))
    p.expect(sb(111, 0x10))
    p.send(sb(11))                            # no value: the mask in force
    p.expect(sb(111, 0x10))
    p.send(sb(10))
    p.expect(sb(110, 0))


def test_purge_data(port):
    p = port.peer()
    for kind in (1, 2, 3):
        p.send(sb(12, kind))
        p.expect(sb(112, kind))
    for bad in (0, 4):
        p.send(sb(12, bad))
        p.expect(sb(112, 0))


def test_flowcontrol_suspend_holds_this_client_only(port):
    p = port.peer()
    p.send(sb(8))
    p.quiet(0.2)                              # no answer to SUSPEND
    port.pty.write(b"held\xff")
    assert port.bystander.data(5) == b"held\xff"
    p.quiet(0.3)
    p.send(sb(9))
    p.expect(b"held\xff\xff")


def test_a_command_in_one_byte_segments(port):
    p = port.peer()
    for byte in sb(1, 0, 0, 0x4b, 0) + sb(0):
        p.send(bytes((byte,)))
        time.sleep(0.005)   # pacing: one TCP segment per byte is the point
    p.expect(sb(101, 0, 0, 0x4b, 0) + sb(100, *("sertcp %s" % core.__version__).encode()))


def test_data_both_ways_with_iac_doubled(port):
    p = port.peer()
    p.send(bytes(range(256)).replace(b"\xff", b"\xff\xff"))
    assert port.pty.read(256) == bytes(range(256))
    port.pty.write(bytes(range(256)))
    p.expect(bytes(range(255)) + b"\xff\xff")
    assert port.bystander.data(256) == bytes(range(256))


@pytest.mark.parametrize("command", [NOP, DM, AYT, GA, SE])
def test_telnet_commands_never_reach_the_device(port, command):
    p = port.peer()
    p.send(b"<" + bytes((IAC, command)) + b">")
    assert port.pty.read(2) == b"<>"
    p.quiet(0.1)


def test_iac_brk_sends_a_break(port):
    p = port.peer()
    p.send(bytes((IAC, BRK)))
    port.sertcp.wait_log(r"IAC BRK: break for 0\.25s")
    p.quiet(0.1)


def test_unknown_options_are_refused(port):
    p = port.peer()
    p.send(bytes((IAC, WILL, 24, IAC, DO, 31, IAC, DO, BINARY)))    # already on: no answer
    p.expect(bytes((IAC, DONT, 24, IAC, WONT, 31)))
    p.quiet(0.2)


@pytest.mark.parametrize("wire", [
    bytes((IAC, SB, 24, 1, IAC, SE)),                               # another option's subnegotiation
    bytes((IAC, SE)),                                               # a stray end
    bytes((IAC, SB, IAC, SE)),                                      # empty
    bytes((IAC, SB, COM_PORT)) + b"\x00" * 600 + bytes((IAC, SE)),  # oversized
    bytes((IAC, SB, COM_PORT, 1, 0, IAC, NOP)),                     # cut short
    sb(13, 1), sb(101, 0, 0, 0x25, 0x80), sb(),                     # not client commands
], ids=["wrong-option", "stray-se", "empty", "oversized", "cut-short", "code-13", "server-code", "no-code"])
def test_malformed_subnegotiations_are_dropped_quietly(port, wire):
    p = port.peer()
    p.send(wire + b"after")
    assert port.pty.read(5) == b"after"
    p.quiet(0.2)
    p.send(sb(2, 0))                          # the connection still answers
    p.expect(sb(102, 8))


def test_unterminated_subnegotiation_costs_only_its_own_bytes(port):
    p = port.peer()
    p.send(bytes((IAC, SB, COM_PORT, 1, 0, 0)) + b"swallowed" * 10)
    assert port.pty.read_available(0.2) == b""
    p.send(bytes((IAC, SE)) + b"free")
    assert port.pty.read(4) == b"free"
    p.send(sb(1, 0, 0, 0, 0))
    p.expect(sb(101, 0, 0, 0x25, 0x80))


def test_com_port_subnegotiation_before_agreement_is_ignored(port):
    p = port.peer(agree=False)
    p.expect(OPENING)
    p.send(sb(1, 0, 0, 0x4b, 0))
    p.quiet(0.3)
    assert port.termios()[4] == termios.B9600


def test_remote_control_no_answers_with_the_values_in_force(tmp_path):
    pty = Pty()
    port = free_port()
    s = Sertcp(["--listen", "127.0.0.1:%d" % port, "--protocol", "rfc2217", "--remote-control", "no",
                pty.path], tmp_path)
    try:
        s.wait_listening(port)
        s.wait_log(r"device \S+ opened")
        p = TelnetPeer(port)
        p.agree()
        p.send(sb(1, 0, 1, 0xc2, 0) + sb(4, 2) + sb(5, 3) + sb(5, 9) + sb(5, 12) + sb(5, 5) + sb(12, 3))
        p.expect(sb(101, 0, 0, 0x25, 0x80) + sb(104, 1) + sb(105, 1) + sb(105, 8) + sb(105, 11)
                 + sb(105, 6) + sb(112, 0))
        assert termios.tcgetattr(pty.master)[4] == termios.B9600
        p.send(bytes((IAC, BRK)))
        s.wait_log(r"IAC BRK refused")
        p.close()
    finally:
        assert s.stop() == 0, s.log()
        pty.close()
    assert not re.search(r"Traceback", s.log())
