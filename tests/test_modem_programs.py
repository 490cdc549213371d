"""Modem emulation with the programs that dial modems: `chat` (ppp), picocom
and minicom under tmux on a virtual port, and a device that drops DTR on the
suite's simulated UART.  The far end is a TCP echo server of the test's own."""
import os
import select
import subprocess
import time
import tty

import pytest

from conftest import Client, EchoServer, SimulatedUart, free_port, need_programs, wait_for

GUARD = 0.2            # S12=10: the escape's guard time, in seconds
PAUSE = GUARD * 3      # silence well beyond the guard time around +++


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def modem_port(sertcp, tmp_path, extra="", init="ATS12=10"):
    """A virtual port with modem emulation; returns (process, tty path)."""
    path = tmp_path / "ttyModem"
    config = "[modem]\nvirtual = %s\nmodem = yes\nmodem_init = %s\n%s" % (path, init, extra)
    s = sertcp(config=config)
    s.wait_log(r"device %s opened" % path)
    return s, path


def open_raw(path):
    """The program's side of the port, raw: no echo of the modem's answers."""
    fd = os.open(str(path), os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    return fd


def read_until(fd, wanted, timeout=10.0):
    got = b""
    deadline = time.monotonic() + timeout
    while wanted not in got:
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting for %r; got %r" % (wanted, got)
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 4096)
    return got


def run_chat(fd, *script, timeout=20):
    """chat on the port (stdin and stdout), as pppd runs it; its exit code."""
    need_programs("chat")
    done = subprocess.run(["chat", "-s", "-v", "-t", "10"] + list(script), stdin=fd, stdout=fd,
                          stderr=subprocess.PIPE, timeout=timeout)
    return done.returncode, done.stderr.decode(errors="replace")


# --- chat (Debian's ppp) ------------------------------------------------------

def test_chat_dials_a_tcp_echo_server_and_the_call_carries_data(sertcp, tmp_path, echo):
    s, path = modem_port(sertcp, tmp_path)
    fd = open_raw(path)
    try:
        code, log = run_chat(fd, "ABORT", "BUSY", "ABORT", "NO CARRIER", "", "ATDT127.0.0.1:%d" % echo.port,
                             "CONNECT", "")
        assert code == 0, log
        wait_for(lambda: echo.accepted, message="the call at the echo server")
        os.write(fd, b"over the modem\r\n")
        assert read_until(fd, b"over the modem\r\n").endswith(b"over the modem\r\n")
    finally:
        os.close(fd)


def test_chat_sees_busy_for_a_refused_number(sertcp, tmp_path):
    refused = free_port()
    s, path = modem_port(sertcp, tmp_path)
    fd = open_raw(path)
    try:
        code, log = run_chat(fd, "ABORT", "BUSY", "ABORT", "NO CARRIER", "", "ATD127.0.0.1:%d" % refused,
                             "CONNECT", "")
        assert code == 4, log           # 4: the first ABORT string, BUSY, came
    finally:
        os.close(fd)


def test_chat_answers_a_ring_with_ata(sertcp, tmp_path):
    listen = free_port()
    s, path = modem_port(sertcp, tmp_path, "listen = 127.0.0.1:%d\n" % listen)
    s.wait_listening(listen)
    fd = open_raw(path)
    caller = None
    try:
        caller = Client(listen)
        code, log = run_chat(fd, "RING", "ATA", "CONNECT")     # no send after it: a '' would send CR to the caller
        assert code == 0, log
        caller.send(b"from the caller\r\n")
        assert read_until(fd, b"from the caller\r\n").endswith(b"from the caller\r\n")
        os.write(fd, b"from the answerer\r\n")
        assert caller.recv(19) == b"from the answerer\r\n"
    finally:
        if caller:
            caller.close()
        os.close(fd)


def test_s0_2_answers_after_two_rings(sertcp, tmp_path):
    listen = free_port()
    s, path = modem_port(sertcp, tmp_path, "listen = 127.0.0.1:%d\n" % listen, init="ATS12=10 S0=2")
    s.wait_listening(listen)
    fd = open_raw(path)
    caller = Client(listen)
    try:
        got = read_until(fd, b"CONNECT", timeout=15)
        assert got.count(b"RING") == 2, got
        caller.send(b"x")
        assert read_until(fd, b"x").endswith(b"x")
    finally:
        caller.close()
        os.close(fd)


# --- terminal programs under tmux --------------------------------------------

class Tmux:
    """A terminal program in a detached tmux session on a server of our own."""

    def __init__(self, tmp_path, command):
        need_programs("tmux")
        self.base = ["tmux", "-L", "sertcp-%d-%d" % (os.getpid(), id(self)), "-f", "/dev/null"]
        subprocess.run(self.base + ["new-session", "-d", "-x", "120", "-y", "40", "-s", "t"] + command,
                       check=True, env=dict(os.environ, TERM="xterm"), cwd=str(tmp_path))
        self.wait_raw()

    def wait_raw(self):
        """Wait until the program has put its terminal in raw mode: keys
        typed before that are echoed by the tty itself and then flushed
        when the program sets raw mode, so they never reach the port."""
        import termios
        pane = subprocess.run(self.base + ["display-message", "-p", "-t", "t", "#{pane_tty}"],
                              stdout=subprocess.PIPE, check=True).stdout.decode().strip()

        def raw():
            fd = os.open(pane, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                return not termios.tcgetattr(fd)[3] & termios.ICANON
            finally:
                os.close(fd)
        wait_for(raw, 15, message="the program's terminal in raw mode")

    def screen(self):
        done = subprocess.run(self.base + ["capture-pane", "-p", "-S", "-200", "-t", "t"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return done.stdout.decode(errors="replace")

    def type(self, text, enter=False):
        subprocess.run(self.base + ["send-keys", "-t", "t", "-l", text], check=True)
        if enter:
            subprocess.run(self.base + ["send-keys", "-t", "t", "C-m"], check=True)

    def wait_screen(self, text, count=1, timeout=15.0):
        return wait_for(lambda: self.screen().count(text) >= count, timeout,
                        message="%r on the screen:\n%s" % (text, self.screen()))

    def close(self):
        subprocess.run(self.base + ["kill-server"], stderr=subprocess.DEVNULL)


def dial_and_talk(term, first, echo, text):
    """Type a first command and see OK, dial the echo server, see CONNECT,
    and see typed text come back from the far end."""
    term.type(first, enter=True)
    term.wait_screen("OK")
    term.type("ATDT127.0.0.1:%d" % echo.port, enter=True)
    term.wait_screen("CONNECT")
    term.type(text)
    term.wait_screen(text)


def escape_and_hang_up(term, echo):
    time.sleep(PAUSE)                   # the guard time before +++ is silence
    term.type("+++")
    term.wait_screen("OK", count=2)     # the dial's OK is not printed: ATD ends in CONNECT
    assert len(echo.closed) == 0         # command mode, call still up
    term.type("ATH", enter=True)
    term.wait_screen("OK", count=3)
    wait_for(lambda: len(echo.closed) == 1, message="the echo server to see the hang-up")


def test_picocom_dials_talks_escapes_and_hangs_up(sertcp, tmp_path, echo):
    need_programs("picocom")
    s, path = modem_port(sertcp, tmp_path)
    term = Tmux(tmp_path, ["picocom", "-q", "--noreset", "-b", "115200", str(path)])
    try:
        dial_and_talk(term, "AT", echo, "echoed by the far end")
        escape_and_hang_up(term, echo)
        # the far end hangs up the next call: NO CARRIER
        term.type("ATD127.0.0.1:%d" % echo.port, enter=True)
        term.wait_screen("CONNECT", count=2)
        wait_for(lambda: len(echo.accepted) == 2, message="the second call")
        echo.hang_up()
        term.wait_screen("NO CARRIER")
    finally:
        term.close()


def test_minicom_dials_and_sees_no_carrier(sertcp, tmp_path, echo):
    need_programs("minicom")
    s, path = modem_port(sertcp, tmp_path)
    # -o: no init string and no lock file games; its own config directory
    home = tmp_path / "home"
    home.mkdir()
    term = Tmux(tmp_path, ["env", "HOME=%s" % home, "minicom", "-o", "-w", "-D", str(path), "-b", "115200"])
    try:
        dial_and_talk(term, "ATE1", echo, "minicom over tcp")
        echo.hang_up()
        term.wait_screen("NO CARRIER")
    finally:
        term.close()


# --- DTR on a UART -----------------------------------------------------------

def test_a_device_dropping_dtr_hangs_up(sertcp, tmp_path, echo):
    uart = SimulatedUart(tmp_path / "uart")
    uart.set("DSR")                     # the device's DTR, through a null-modem cable
    s = sertcp(config="[modem]\ndevice = %s\nmodem = yes\nmodem_init = ATE0\n" % uart.url, env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")
    uart.receive(b"ATDT127.0.0.1:%d\r" % echo.port)
    wait_for(lambda: b"CONNECT" in uart.sent(), message="CONNECT to the device")
    wait_for(lambda: echo.accepted, message="the call at the echo server")
    uart.set()                          # the device drops DTR: AT&D2, the default, hangs up
    wait_for(lambda: len(echo.closed) == 1, message="the far end to see the hang-up")
    wait_for(lambda: uart.sent().endswith(b"NO CARRIER\r\n"), message="NO CARRIER to the device")
