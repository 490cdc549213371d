"""Modem emulation (modem = yes): the Hayes AT core as unit tests (one per
command and result code, the escape's guard times, a property test of
online data), then the real process on a pty dialing and answering over
loopback, the device's DTR on the simulated UART, and a virtual port a
program dials from."""
import json
import os
import re
import select
import socket
import time
import tty

import pytest
from hypothesis import given, settings, strategies as st

import sertcp as sertcp_module
from certs import TlsClient, certs  # noqa: F401 (fixture)
from conftest import Client, EchoServer, SimulatedUart, free_port, http_get, run_sertcp, wait_for

ModemCore = sertcp_module.ModemCore


def sent(actions):
    """What the actions write to the device."""
    return b"".join(a[1] for a in actions if a[0] == "send")


def data(actions):
    """What the actions send to the remote end."""
    return b"".join(a[1] for a in actions if a[0] == "data")


def kinds(actions):
    return [a[0] for a in actions if a[0] not in ("send", "data")]


def no_echo():
    """A core in command mode that does not echo (its answers alone)."""
    core = ModemCore()
    core.echo = False
    return core


def online(now=0.0, **kw):
    """A core with a call up since `now` (dialed), echo off."""
    core = ModemCore(**kw)
    core.feed(b"ATE0D127.0.0.1:23\r", now)
    core.event("up", now)
    assert core.mode == "online"
    return core


def escaped():
    """A core in online command mode: +++ at 2 s, guard time over at 3 s."""
    core = online(0)
    core.feed(b"+++", 2)
    core.expire(3)
    assert core.mode == "online_command"
    return core


# --- commands and result codes ------------------------------------------------

def test_at_answers_ok_with_echo_by_default():
    assert sent(ModemCore().feed(b"AT\r", 0)) == b"AT\r\r\nOK\r\n"


def test_commands_are_case_insensitive_and_several_go_on_one_line():
    core = ModemCore()
    assert sent(core.feed(b"aTe0v1S0=2\r", 0)) == b"aTe0v1S0=2\r\r\nOK\r\n"
    assert not core.echo and core.verbose and core.registers[0] == 2


def test_a_line_that_does_not_start_with_at_is_ignored():
    assert sent(ModemCore().feed(b"ATE0\rhello\r", 0)).endswith(b"OK\r\n")
    core = no_echo()
    assert sent(core.feed(b"hello\r\r\n", 0)) == b""


def test_an_unknown_command_is_error_and_stops_the_line():
    core = no_echo()
    assert sent(core.feed(b"ATE1G7V0\r", 0)) == b"\r\nERROR\r\n"
    assert core.echo and core.verbose          # E1 ran, V0 did not


def test_ate0_stops_the_echo():
    core = ModemCore()
    assert sent(core.feed(b"ATE0\r", 0)) == b"ATE0\r\r\nOK\r\n"
    assert sent(core.feed(b"AT\r", 0)) == b"\r\nOK\r\n"


def test_atv0_gives_numeric_result_codes():
    core = no_echo()
    assert sent(core.feed(b"ATV0\r", 0)) == b"0\r"
    assert sent(core.feed(b"ATX\r", 0)) == b"0\r"          # X is taken and ignored
    assert sent(core.feed(b"ATG\r", 0)) == b"4\r"


@pytest.mark.parametrize("name, code", [("OK", 0), ("CONNECT", 1), ("RING", 2), ("NO CARRIER", 3),
                                        ("ERROR", 4), ("BUSY", 7), ("NO ANSWER", 8)])
def test_result_codes_in_words_and_digits(name, code):
    core = ModemCore()
    assert core._result(name) == b"\r\n" + name.encode() + b"\r\n"
    core.verbose = False
    assert core._result(name) == b"%d\r" % code


def test_atq1_silences_result_codes_but_not_information():
    core = no_echo()
    assert sent(core.feed(b"ATQ1\r", 0)) == b""
    assert sent(core.feed(b"ATS7?\r", 0)) == b"\r\n050\r\n"
    assert sent(core.feed(b"ATQ0\r", 0)) == b"\r\nOK\r\n"


def test_ati_identifies_the_program():
    core = no_echo()
    assert sent(core.feed(b"ATI\r", 0)) == b"\r\nsertcp %s\r\n\r\nOK\r\n" % sertcp_module.__version__.encode()
    assert sent(core.feed(b"ATI3\r", 0)).startswith(b"\r\nsertcp")


def test_s_registers_have_the_modem_defaults_and_can_be_set_and_read():
    core = no_echo()
    assert [core.registers[n] for n in (0, 2, 3, 4, 5, 7, 12)] == [0, 43, 13, 10, 8, 50, 50]
    assert sent(core.feed(b"ATS7=5S12=25\r", 0)) == b"\r\nOK\r\n"
    assert sent(core.feed(b"ATS7?S12?\r", 0)) == b"\r\n005\r\n\r\n025\r\n\r\nOK\r\n"
    assert core.guard() == 0.5


@pytest.mark.parametrize("line", [b"ATS100=1\r", b"ATS0=256\r", b"ATS1=3\r", b"ATS=1\r", b"ATS0=\r"])
def test_s_register_mistakes_are_errors(line):
    core = no_echo()
    assert sent(core.feed(line, 0)) == b"\r\nERROR\r\n"


def test_s3_and_s5_change_end_of_line_and_backspace():
    core = no_echo()
    core.feed(b"ATS3=10\r", 0)
    assert sent(core.feed(b"ATX\n", 0)) == b"\n\nOK\n\n"
    core.feed(b"ATS3=13S5=35\n", 0)
    assert sent(core.feed(b"ATG#E1\r", 0)) == b"\r\nOK\r\n"    # '#' erased the G


def test_a_line_also_ends_with_lf_and_cr_lf_gives_one_result():
    core = no_echo()
    assert sent(core.feed(b"AT\n", 0)) == b"\r\nOK\r\n"
    assert sent(core.feed(b"AT\r\n", 0)) == b"\r\nOK\r\n"


def test_backspace_edits_the_line_and_is_echoed():
    assert sent(ModemCore().feed(b"ATX\x08E0\r", 0)) == b"ATX\x08E0\r\r\nOK\r\n"


def test_a_slash_repeats_the_last_line_without_cr():
    core = no_echo()
    core.feed(b"ATS7?\r", 0)
    assert sent(core.feed(b"A/", 0)) == b"\r\n050\r\n\r\nOK\r\n"


def test_a_line_too_long_is_an_error():
    core = no_echo()
    assert sent(core.feed(b"AT" + b"X" * 300 + b"\r", 0)) == b"\r\nERROR\r\n"


def test_atz_applies_modem_init_and_amp_f_does_not():
    core = ModemCore(init=("ATE0 V0", "ATS0=3"))
    assert not core.echo and not core.verbose and core.registers[0] == 3
    core.feed(b"ATE1V1S0=0\r", 0)
    assert sent(core.feed(b"ATZ\r", 0)) == b"ATZ\r0\r"        # answered in the settings ATZ restored
    assert not core.echo and core.registers[0] == 3
    core.feed(b"AT&F\r", 0)
    assert core.echo and core.verbose and core.registers[0] == 0


def test_amp_d_sets_what_dtr_does():
    core = ModemCore()
    assert core.dtr_mode == 2
    for n in b"013":
        core.feed(b"AT&D%c\r" % n, 0)
        assert core.dtr_mode == n - 48
    assert sent(core.feed(b"AT&D7\r", 0)).endswith(b"ERROR\r\n")


def test_common_init_string_commands_are_taken():
    core = no_echo()
    assert sent(core.feed(b"AT&FE0V1&C1&D2&K3L0M1X4&W\r", 0)) == b"\r\nOK\r\n"


# --- dialing --------------------------------------------------------------------

@pytest.mark.parametrize("line, target", [
    (b"ATD example.com:23\r", ("example.com", 23)),
    (b"ATDT10.0.0.1:4001\r", ("10.0.0.1", 4001)),
    (b"ATDP host:99\r", ("host", 99)),
    (b"ATD[::1]:7000\r", ("::1", 7000)),
    (b"atdt Host.Example:23;\r", ("Host.Example", 23)),
])
def test_atd_dials_host_port(line, target):
    core = ModemCore()
    actions = core.feed(line, 5.0)
    assert ("dial", [target]) in actions and core.mode == "dialing"
    assert core.deadline() == 5.0 + 50        # S7


def test_atd_dials_phonebook_numbers_with_or_without_punctuation():
    core = ModemCore(phonebook={"5551234": ("bbs.example", 23)})
    assert ("dial", [("bbs.example", 23)]) in core.feed(b"ATDT555-1234\r", 0)
    core = ModemCore(phonebook={"5551234": ("bbs.example", 23)})
    assert ("dial", [("bbs.example", 23)]) in core.feed(b"ATD 555 1234\r", 0)


@pytest.mark.parametrize("line", [b"ATD\r", b"ATDT\r", b"ATD5550000\r", b"ATDhost\r", b"ATDhost:0\r"])
def test_atd_without_a_number_or_host_port_is_an_error(line):
    core = ModemCore(phonebook={"1": ("h", 1)})
    assert sent(core.feed(line, 0)).endswith(b"\r\nERROR\r\n") and core.mode == "command"


@pytest.mark.parametrize("event, result, mode", [
    ("up", b"\r\nCONNECT\r\n", "online"),            # connected
    ("refused", b"\r\nBUSY\r\n", "command"),         # every address refused the connection
    ("failed", b"\r\nNO CARRIER\r\n", "command"),    # any other failure (name, network)
])
def test_how_a_dial_ends(event, result, mode):
    core = ModemCore()
    core.feed(b"ATD h:1\r", 0)
    assert sent(core.event(event, 1)) == result and core.mode == mode


def test_dial_no_answer_after_s7_seconds():
    core = ModemCore()
    core.feed(b"ATS7=3D h:1\r", 10)
    assert core.deadline() == 13
    assert core.expire(12.9) == []
    actions = core.expire(13)
    assert sent(actions) == b"\r\nNO ANSWER\r\n" and "cancel_dial" in kinds(actions)
    assert core.mode == "command" and core.deadline() is None


def test_a_key_while_dialing_aborts_the_dial_but_the_lf_of_cr_lf_does_not():
    core = ModemCore()
    core.feed(b"ATD h:1\r\n", 0)
    assert core.mode == "dialing"
    actions = core.feed(b"x", 1)
    assert sent(actions) == b"\r\nNO CARRIER\r\n" and "cancel_dial" in kinds(actions)


def test_atd_while_a_call_is_up_is_an_error():
    core = online()
    core.feed(b"+++", 5)
    core.expire(6)
    assert sent(core.feed(b"ATD h:2\r", 7)) == b"\r\nERROR\r\n" and core.mode == "online_command"


# --- incoming calls -----------------------------------------------------------

def test_incoming_call_rings_every_two_seconds_until_ata():
    core = no_echo()
    actions = core.event("incoming", 100)
    assert sent(actions) == b"\r\nRING\r\n" and kinds(actions) == ["ring"] and core.mode == "ringing"
    assert core.deadline() == 102
    assert sent(core.expire(102)) == b"\r\nRING\r\n" and core.registers[1] == 2
    actions = core.feed(b"ATA\r", 103)
    assert sent(actions) == b"\r\nCONNECT\r\n" and kinds(actions) == ["take_call"] and core.mode == "online"
    assert core.deadline() is None and core.registers[1] == 0


def test_s0_answers_after_that_many_rings():
    core = ModemCore()
    core.feed(b"ATS0=2\r", 0)
    assert "take_call" not in kinds(core.event("incoming", 0))
    actions = core.expire(2)
    assert sent(actions) == b"\r\nRING\r\n\r\nCONNECT\r\n" and "take_call" in kinds(actions)


def test_a_caller_who_hangs_up_stops_the_ringing_silently():
    core = ModemCore()
    core.event("incoming", 0)
    assert core.event("caller_gone", 1) == [] and core.mode == "command" and core.deadline() is None


def test_ath_while_ringing_refuses_the_call():
    core = no_echo()
    core.event("incoming", 0)
    actions = core.feed(b"ATH\r", 1)
    assert kinds(actions) == ["refuse_call"] and sent(actions) == b"\r\nOK\r\n" and core.mode == "command"


@pytest.mark.parametrize("line", [b"ATA\r", b"ATO\r"])
def test_ata_and_ato_without_a_call_are_no_carrier(line):
    assert sent(no_echo().feed(line, 0)) == b"\r\nNO CARRIER\r\n"


def test_a_second_call_is_not_an_event_while_busy():
    core = ModemCore()
    core.event("incoming", 0)
    assert core.event("incoming", 1) == [] and core.mode == "ringing"


# --- escape, online command mode, hang-up ---------------------------------------

def test_escape_with_guard_time_before_and_after_gives_ok_and_keeps_the_call():
    core = online(0)
    assert data(core.feed(b"data", 1)) == b"data"
    assert core.feed(b"+++", 2.5) == []                  # held: it may be the escape
    assert core.deadline() == 3.5
    assert core.expire(3.4) == []
    actions = core.expire(3.5)
    assert sent(actions) == b"\r\nOK\r\n" and kinds(actions) == ["hold"] and core.mode == "online_command"


def test_plus_signs_typed_one_by_one_within_guard_time_escape():
    core = online(0)
    for t in (2.0, 2.4, 2.8):
        assert core.feed(b"+", t) == []
    assert sent(core.expire(3.8)) == b"\r\nOK\r\n"


def test_no_escape_without_guard_time_before():
    core = online(0)
    assert data(core.feed(b"x+++", 5)) == b"x+++"
    assert core.deadline() is None and core.mode == "online"


def test_no_escape_when_data_follows_within_guard_time():
    core = online(0)
    core.feed(b"+++", 5)
    assert data(core.feed(b"y", 5.5)) == b"+++y" and core.mode == "online"
    assert core.deadline() is None


def test_four_plus_signs_are_data():
    core = online(0)
    assert data(core.feed(b"++++", 5)) == b"++++" and core.deadline() is None


def test_plus_signs_too_far_apart_are_data():
    core = online(0)
    core.feed(b"++", 5)
    assert data(core.expire(6)) == b"++"          # no third one within guard time
    assert core.feed(b"+", 6.1) == []             # held again: it came after a second of silence
    assert data(core.expire(7.1)) == b"+" and core.mode == "online"


def test_the_escape_character_is_s2_and_above_127_there_is_none():
    core = online(0)
    core.feed(b"+++", 2)   # (echo off) set S2 from online command mode
    core.expire(3)
    core.feed(b"ATS2=33O\r", 3)
    assert data(core.feed(b"+++", 5)) == b"+++"
    core.feed(b"!!!", 7)
    assert sent(core.expire(8)) == b"\r\nOK\r\n"
    core.feed(b"ATS2=200O\r", 9)
    assert data(core.feed(b"!!!", 12)) == b"!!!" and core.deadline() is None


def test_s12_sets_the_guard_time():
    core = escaped()
    core.feed(b"ATS12=10O\r", 3)           # 0.2 s
    core.feed(b"+++", 3.3)
    assert core.deadline() == pytest.approx(3.5)
    assert sent(core.expire(3.5)) == b"\r\nOK\r\n"


def test_the_guard_time_after_connect_counts_as_silence_before():
    core = online(10)
    assert data(core.feed(b"+++", 10.5)) == b"+++"


def test_ato_goes_back_online_and_releases_the_remote_data():
    core = escaped()
    actions = core.feed(b"ATO\r", 4)
    assert sent(actions) == b"\r\nCONNECT\r\n" and kinds(actions) == ["resume"] and core.mode == "online"
    assert data(core.feed(b"more", 4.1)) == b"more"


def test_ath_in_online_command_mode_hangs_up():
    core = escaped()
    actions = core.feed(b"ATH\r", 4)
    assert kinds(actions) == ["hang_up"] and sent(actions) == b"\r\nOK\r\n" and core.mode == "command"


def test_atz_with_a_call_up_hangs_up():
    core = escaped()
    assert kinds(core.feed(b"ATZ\r", 4)) == ["hang_up"] and core.mode == "command"


def test_remote_close_gives_no_carrier_online_and_in_command_mode():
    core = online(0)
    assert sent(core.event("carrier_lost", 1)) == b"\r\nNO CARRIER\r\n" and core.mode == "command"
    core = escaped()
    assert sent(core.event("carrier_lost", 4)) == b"\r\nNO CARRIER\r\n" and core.mode == "command"
    assert core.event("carrier_lost", 5) == []      # after ATH it is no news


def test_held_escape_characters_lost_with_the_call_are_counted():
    core = online(0)
    core.feed(b"++", 2)
    assert ("dropped", 2) in core.event("carrier_lost", 2.1)


def test_dtr_drop_follows_amp_d():
    core = online(0)                                   # &D2: hang up
    actions = core.event("dtr_off", 1)
    assert kinds(actions) == ["hang_up"] and sent(actions) == b"\r\nNO CARRIER\r\n"
    core = escaped()
    core.feed(b"AT&D1O\r", 4)
    actions = core.event("dtr_off", 5)                 # &D1: command mode, call kept
    assert kinds(actions) == ["hold"] and core.mode == "online_command"
    core.feed(b"AT&D0O\r", 6)
    assert core.event("dtr_off", 7) == [] and core.mode == "online"
    assert ModemCore().event("dtr_off", 0) == []       # no call: nothing to do


# --- online data is never lost or altered ---------------------------------------

chunks = st.lists(st.tuples(st.binary(max_size=12) | st.sampled_from([b"+", b"++", b"+++", b"AT", b"ATH\r", b"+++ATH\r"]),
                            st.floats(0, 2.5)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(chunks, st.sampled_from([50, 10, 0]))
def test_online_data_is_never_lost_or_altered(pieces, s12):
    """Whatever the device sends and whenever, at any guard time (S12=0
    included): the remote end gets every byte, in order, except the three
    + of an escape the core answered with OK (the test then goes back
    online with ATO)."""
    core = no_echo()
    core.feed(b"ATS12=%dD127.0.0.1:23\r" % s12, 0)
    core.event("up", 0)
    now, expected, got = 0.0, bytearray(), bytearray()

    def run(actions):
        got.extend(data(actions))
        if core.mode == "online_command":
            assert sent(actions).endswith(b"\r\nOK\r\n")
            assert expected.endswith(b"+++")
            del expected[-3:]
            core.feed(b"ATO\r", now)
    for chunk, pause in pieces:
        due = core.deadline()
        if due is not None and due <= now + pause:
            run(core.expire(due))
        now += pause
        expected += chunk
        run(core.feed(chunk, now))
    run(core.expire(now + 10))
    assert bytes(got) == bytes(expected)


# --- configuration ---------------------------------------------------------------

def test_modem_port_needs_no_network_side_and_listen_is_optional(tmp_path):
    r = run_sertcp(["--check", "--modem", "yes", "--virtual", str(tmp_path / "m")])
    assert r.returncode == 0, r.stderr
    assert "modem = yes" in r.stdout
    r = run_sertcp(["--check", "--modem", "yes", "--listen", "7000", "--modem-phonebook", "555-1234=bbs.example:23, 42=[::1]:7",
                    "--modem-init", "ATE0 S0=1", "/dev/ttyS0"])
    assert r.returncode == 0, r.stderr
    assert "modem_phonebook = 5551234=bbs.example:23, 42=[::1]:7" in r.stdout
    assert "modem_init = ATE0 S0=1" in r.stdout


@pytest.mark.parametrize("flags, key", [
    (["--connect", "127.0.0.1:23"], "connect"),
    (["--protocol", "modbus"], "protocol"),
    (["--protocol", "rfc2217"], "protocol"),
    (["--max-clients", "2"], "max-clients"),
    (["--open-on-demand", "yes"], "open-on-demand"),
    (["--device-connect-msg", "hi"], "device-connect-msg"),
    (["--buffer", "4k"], "buffer"),
    (["--disconnect-on-line", "dsr"], "disconnect-on-line"),
    (["--udp-send-to", "127.0.0.1:9"], "udp-send-to"),
])
def test_keys_that_make_no_sense_with_modem_are_refused(flags, key):
    r = run_sertcp(["--check", "--modem", "yes", "--listen", "7000"] + flags + ["/dev/ttyS0"])
    assert r.returncode == 2 and "--%s: cannot go with modem = yes" % key in r.stderr, r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--modem-phonebook", "555=bbs.example:23"], "modem: is off, but modem_phonebook or modem_init is set"),
    (["--modem", "yes", "--modem-phonebook", "555"], "expected NUMBER=HOST:PORT"),
    (["--modem", "yes", "--modem-phonebook", "555=bbs.example"], "expected HOST:PORT"),
    (["--modem", "yes", "--modem-phonebook", "1=a:1, 1=b:2"], "number 1 appears twice"),
    (["--modem", "yes", "--modem-init", "ATE0 ATD555"], "ATD555: not understood"),
    (["--modem", "yes", "--modem-init", "ATS0=300"], "not understood"),
    (["--modem", "yes", "--modem-init", "E0"], "does not start with AT"),
])
def test_modem_key_mistakes_are_refused(flags, message):
    r = run_sertcp(["--check", "--listen", "7000"] + flags + ["/dev/ttyS0"])
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_a_port_without_a_network_side_still_names_modem():
    r = run_sertcp(["--check", "/dev/ttyS0"])
    assert r.returncode == 2 and "or modem" in r.stderr


# --- the real process: a pty as the device, loopback as the telephone network ---

class Terminal:
    """The device's side of the modem: a pty master, read until a pattern."""

    def __init__(self, pty):
        self.pty = pty
        self.seen = bytearray()

    def send(self, data):
        self.pty.write(data)

    def expect(self, pattern, timeout=10.0):
        """Wait until `pattern` (bytes, a regex) is in what came since the
        last expect; returns the match, and keeps what followed it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.seen)
            if m:
                del self.seen[:m.end()]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for %r; got %r" % (pattern, bytes(self.seen)))
            r, _, _ = select.select([self.pty.master], [], [], min(left, 0.2))
            if r:
                try:
                    self.seen += os.read(self.pty.master, 65536)
                except (BlockingIOError, OSError):
                    time.sleep(0.01)

    def command(self, line, result=rb"\r\nOK\r\n", timeout=10.0):
        self.send(line + b"\r")
        return self.expect(re.escape(line + b"\r") + rb".*?" + result, timeout)

    def quiet_for(self, seconds):
        """Nothing arrives for `seconds` (the guard time's silence)."""
        self.expect(rb"", 0)
        time.sleep(seconds)


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.close()


def guard():
    """Past the default guard time (S12=50: one second) with a margin."""
    time.sleep(1.3)


@pytest.fixture
def modem(sertcp, pty):
    """modem(*flags) starts sertcp with modem = yes on a pty; returns
    (process, Terminal, listen port)."""
    def start(*flags, listen=True):
        port = free_port()
        args = (["--listen", "127.0.0.1:%d" % port] if listen else []) + ["--modem", "yes"] + list(flags)
        s = sertcp(*args, pty.path)
        s.wait_log(r"device \S+ opened")
        if listen:
            s.wait_log(r"listening on 127.0.0.1:%d" % port)
        return s, Terminal(pty), port
    return start


def test_dial_exchange_escape_ato_and_ath(modem, echo_server):
    s, term, _ = modem(listen=False)
    term.command(b"AT")
    term.command(b"ATDT127.0.0.1:%d" % echo_server.port, rb"\r\nCONNECT\r\n")
    wait_for(lambda: echo_server.accepted, message="the echo server's connection")
    term.send(b"hello, +++ and AT inside data")
    term.expect(re.escape(b"hello, +++ and AT inside data"))
    guard()
    term.send(b"+++")
    term.expect(rb"^\r\nOK\r\n", timeout=5)             # the +++ did not reach the echo server
    assert not echo_server.closed
    term.command(b"ATO", rb"\r\nCONNECT\r\n")
    term.send(b"back online")
    term.expect(rb"^back online")
    guard()
    term.send(b"+++")
    term.expect(rb"^\r\nOK\r\n", timeout=5)
    term.command(b"ATH")
    wait_for(lambda: echo_server.closed, message="the call hung up at the echo server")
    s.wait_log(r"hung up by the device \(modem\); 40 bytes in, 40 bytes out")


def test_escape_sequence_needs_the_guard_time_after(modem, echo_server):
    s, term, _ = modem(listen=False)
    term.command(b"ATD127.0.0.1:%d" % echo_server.port, rb"\r\nCONNECT\r\n")
    guard()
    term.send(b"+++")
    time.sleep(0.3)
    term.send(b"x")                                  # within guard time: it was data
    term.expect(rb"^\+\+\+x")
    guard()
    term.send(b"ATH\r")                              # still online: data for the echo server
    term.expect(rb"^ATH\r")


def test_remote_close_gives_no_carrier(modem, echo_server):
    s, term, _ = modem(listen=False)
    term.command(b"ATD127.0.0.1:%d" % echo_server.port, rb"\r\nCONNECT\r\n")
    wait_for(lambda: echo_server.accepted, message="the echo server's connection")
    echo_server.accepted[0].shutdown(socket.SHUT_RDWR)
    term.expect(rb"\r\nNO CARRIER\r\n")
    term.command(b"AT")                             # back in command mode


def test_refused_port_gives_busy(modem):
    s, term, _ = modem(listen=False)
    term.command(b"ATD127.0.0.1:%d" % free_port(), rb"\r\nBUSY\r\n")
    term.command(b"AT")


def test_unknown_number_is_error_and_phonebook_numbers_dial(modem, echo_server):
    s, term, _ = modem("--modem-phonebook", "555-1234=127.0.0.1:%d, 7=127.0.0.1:1" % echo_server.port, listen=False)
    term.command(b"ATDT5550000", rb"\r\nERROR\r\n")
    term.command(b"ATDT7", rb"\r\nBUSY\r\n")
    term.command(b"ATDT555 1234", rb"\r\nCONNECT\r\n")
    term.send(b"via the phonebook")
    term.expect(b"via the phonebook")


def test_a_host_name_is_resolved_and_each_address_tried(modem, echo_server):
    """localhost may be ::1 first, where nothing listens: the next address
    (127.0.0.1) answers, within the one call."""
    s, term, _ = modem(listen=False)
    term.command(b"ATD no-such-host.invalid:23", rb"\r\nNO CARRIER\r\n", timeout=20)
    term.command(b"ATDT localhost:%d" % echo_server.port, rb"\r\nCONNECT\r\n")
    term.send(b"by name")
    term.expect(b"by name")


def test_a_peer_that_never_accepts_gives_no_answer_after_s7(modem):
    """A listening socket with a backlog of 0 and one connection queued:
    Linux drops the next SYN, so that connect() waits."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = socket.create_connection(full.getsockname(), timeout=5)
    try:
        s, term, _ = modem(listen=False)
        term.command(b"ATS7=1")
        started = time.monotonic()
        term.command(b"ATD127.0.0.1:%d" % full.getsockname()[1], rb"\r\nNO ANSWER\r\n", timeout=10)
        assert 0.8 < time.monotonic() - started < 5
        term.command(b"AT")
    finally:
        queued.close()
        full.close()


def test_incoming_call_rings_every_two_seconds_and_ata_answers(modem, clients):
    s, term, port = modem()
    caller = clients(port)
    term.expect(rb"\r\nRING\r\n")
    first = time.monotonic()
    term.expect(rb"\r\nRING\r\n", timeout=6)
    gap = time.monotonic() - first
    assert 1.4 < gap < 3.5, gap
    caller.send(b"sent before the answer")
    term.command(b"ATA", rb"\r\nCONNECT\r\n")
    term.expect(rb"^sent before the answer")
    term.send(b"to the caller")
    assert caller.recv(13) == b"to the caller"
    caller.close()
    term.expect(rb"\r\nNO CARRIER\r\n")


def test_s0_answers_after_two_rings(modem, clients):
    s, term, port = modem()
    term.command(b"ATS0=2")
    caller = clients(port)
    term.expect(rb"^\r\nRING\r\n")
    term.expect(rb"^\r\nRING\r\n\r\nCONNECT\r\n", timeout=6)
    caller.send(b"answered")
    term.expect(rb"^answered")


def test_a_second_call_while_busy_is_refused(modem, clients, echo_server):
    s, term, port = modem("--modem-init", "ATS0=1")
    first = clients(port)
    term.expect(rb"\r\nRING\r\n\r\nCONNECT\r\n")
    second = clients(port)
    assert second.closed_by_peer(5)
    s.wait_log(r"client 127.0.0.1:\d+ refused: modem busy \(online\)")
    first.send(b"still here")
    term.expect(rb"still here")
    guard()
    term.send(b"+++")
    term.expect(rb"\r\nOK\r\n", timeout=5)
    third = clients(port)                         # busy in online command mode too
    assert third.closed_by_peer(5)
    term.command(b"ATD127.0.0.1:%d" % echo_server.port, rb"\r\nERROR\r\n")
    term.command(b"ATH")
    assert first.closed_by_peer(5)


def test_a_caller_who_hangs_up_while_ringing_frees_the_modem(modem, clients):
    s, term, port = modem()
    caller = clients(port)
    term.expect(rb"\r\nRING\r\n")
    caller.close()
    s.wait_log(r"ended before it was answered: caller hung up")
    term.command(b"ATA", rb"\r\nNO CARRIER\r\n")
    again = clients(port)
    term.expect(rb"\r\nRING\r\n")
    again.close()


def test_the_caller_passes_the_gate_first(modem, clients):
    """allow, TLS and the password come before the modem rings."""
    s, term, port = modem("--password", "sesame")
    wrong = clients(port)
    wrong.send(b"guess\n")
    assert wrong.closed_by_peer(5)
    s.wait_log(r"refused: wrong password")
    caller = clients(port)
    caller.send(b"sesame\nfirst words")
    term.expect(rb"^\r\nRING\r\n")                 # the first RING is the right caller's
    term.command(b"ATA", rb"\r\nCONNECT\r\n")
    term.expect(rb"^first words")


def test_a_call_over_tls_rings_after_the_handshake(modem, certs):
    s, term, port = modem(*certs.server_flags())
    caller = TlsClient(port, certs.client_context())
    try:
        term.expect(rb"^\r\nRING\r\n")
        term.command(b"ATA", rb"\r\nCONNECT\r\n")
        caller.send(b"encrypted call")
        term.expect(rb"^encrypted call")
        term.send(b"answer")
        assert caller.recv(6) == b"answer"
    finally:
        caller.close()


def test_modem_init_is_applied_at_start_and_after_atz(modem):
    s, term, _ = modem("--modem-init", "ATE0 V0", listen=False)
    term.send(b"AT\r")
    term.expect(rb"^0\r")
    term.send(b"ATE1V1\r")
    term.expect(rb"^\r\nOK\r\n")                  # the line was not echoed: E1 came with it
    term.command(b"ATZ", rb"0\r")
    term.send(b"ATS0?\r")
    term.expect(rb"^000\r\n0\r")


def test_status_and_metrics_show_the_modem(sertcp, pty, echo_server):
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--modem", "yes",
               "--modem-init", "ATS0=1", pty.path)
    s.wait_log(r"device \S+ opened")
    s.wait_log(r"listening on 127.0.0.1:%d" % port)
    term = Terminal(pty)

    def modem_status():
        return json.loads(http_get(status, "/status")[1])["ports"][0]
    assert modem_status()["modem"]["state"] == "command"
    caller = Client(port)
    term.expect(rb"CONNECT\r\n")
    shown = modem_status()
    assert shown["modem"]["state"] == "online" and shown["modem_calls_in"] == 1 and shown["modem_rings"] == 1
    assert shown["modem"]["registers"] == {"S0": 1, "S2": 43, "S7": 50, "S12": 50}
    caller.close()
    term.expect(rb"NO CARRIER\r\n")
    term.command(b"ATD127.0.0.1:%d" % echo_server.port, rb"\r\nCONNECT\r\n")
    metrics = http_get(status, "/metrics")[1]
    assert 'sertcp_modem_calls_in_total{port="cli"} 1' in metrics
    assert 'sertcp_modem_calls_out_total{port="cli"} 1' in metrics
    assert 'sertcp_modem_rings_total{port="cli"} 1' in metrics


# --- a virtual port: a program on this machine dials -----------------------------

def test_a_program_dials_from_a_virtual_port(sertcp, tmp_path, echo_server):
    path = tmp_path / "ttyModem"
    s = sertcp("--modem", "yes", "--virtual", str(path))
    s.wait_log(r"device \S+ opened")
    fd = os.open(str(path), os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)

        class Slave:
            master = fd

            def write(self, data):
                os.write(fd, data)
        term = Terminal(Slave())
        term.command(b"ATDT127.0.0.1:%d" % echo_server.port, rb"\r\nCONNECT\r\n")
        term.send(b"over the virtual modem")
        term.expect(b"over the virtual modem")
    finally:
        os.close(fd)                                  # closing the port drops its DTR: hang up
    wait_for(lambda: echo_server.closed, message="the call ended with the program")


# --- the device's DTR on a UART with modem lines ---------------------------------

def wait_sent(uart, pattern, timeout=10.0):
    """What sertcp wrote to the simulated UART matches `pattern`."""
    return wait_for(lambda: re.search(pattern, uart.sent()), timeout, message="%r on the UART" % pattern)


def dtr(uart):
    return "DTR" in uart.outputs()


def test_device_dtr_drop_hangs_up_with_amp_d2_and_our_dtr_follows_carrier(sertcp, tmp_path):
    uart = SimulatedUart(tmp_path / "uart")
    uart.set("DSR")
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--modem", "yes", "--modem-init", "ATS0=1", uart.url, env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")
    wait_for(lambda: not dtr(uart), message="DTR off without a call")
    caller = Client(port)
    try:
        wait_sent(uart, rb"CONNECT\r\n")
        wait_for(lambda: dtr(uart), message="DTR on while the call is up")
        uart.set()                                  # the device drops its DTR
        wait_sent(uart, rb"CONNECT\r\n\r\nNO CARRIER\r\n")
        assert caller.closed_by_peer(5)
        wait_for(lambda: not dtr(uart), message="DTR off after the call")
    finally:
        caller.close()


def test_device_dtr_drop_with_amp_d1_returns_to_command_mode(sertcp, tmp_path):
    uart = SimulatedUart(tmp_path / "uart")
    uart.set("DSR")
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--modem", "yes", "--modem-init", "ATE0 S0=1 &D1", uart.url,
               env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")
    caller = Client(port)
    try:
        wait_sent(uart, rb"CONNECT\r\n")
        uart.set()
        wait_sent(uart, rb"CONNECT\r\n\r\nOK\r\n")
        uart.set("DSR")
        uart.receive(b"ATO\r")
        wait_sent(uart, rb"OK\r\n\r\nCONNECT\r\n")
        caller.send(b"still up")
        wait_sent(uart, rb"CONNECT\r\nstill up$")
    finally:
        caller.close()
