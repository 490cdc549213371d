"""Faults and limits: devices that vanish and come back, devices missing at
start, clients that never read, read slowly, flood, or vanish, and local
programs that close and reopen a virtual port.  The rest of the process
keeps working through each of them."""
import fcntl
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import Background, closing_factory, free_port, http_get, log_count, need_programs, random_bytes, wait_for

CONNECTED = r"\[cli\] client \S+ connected"
DISCONNECTED = r"\[cli\] client \S+ disconnected"
OPENED = r"\[cli\] device \S+ opened"


# --- helpers ---------------------------------------------------------------

def join(s, clients, port, **kw):
    before = log_count(s, CONNECTED)
    c = clients(port, **kw)
    s.wait_log(CONNECTED, count=before + 1)
    return c


def repoint(link, target):
    """Point the symlink at target in one step, as udev would."""
    fresh = link.with_name(link.name + ".new")
    if os.path.lexists(fresh):
        os.unlink(fresh)
    os.symlink(target, fresh)
    os.replace(fresh, link)


def payload(n, seed):
    return random_bytes(random.Random(seed), n)


class LazyClient:
    """A client that does not read: a small receive buffer so that the
    backlog piles up in sertcp quickly instead of in the kernel."""

    def __init__(self, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.local = self.sock.getsockname()[1]

    def drain(self, quiet=0.3):
        out = bytearray()
        self.sock.settimeout(quiet)
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def recv_exact(self, n, timeout=30.0):
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            assert left > 0, "got %d of %d bytes" % (len(out), n)
            self.sock.settimeout(left)
            chunk = self.sock.recv(min(1 << 20, n - len(out)))
            assert chunk, "connection closed after %d of %d bytes" % (len(out), n)
            out += chunk
        return bytes(out)

    def closed_by_peer(self, timeout=10.0):
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 20):
                pass
            return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self):
        self.sock.close()


@pytest.fixture
def lazy_clients():
    yield from closing_factory(LazyClient)


# --- the device goes away and comes back --------------------------------------

def test_device_unplugged_and_plugged_back(sertcp, clients, pty_factory, tmp_path):
    link = tmp_path / "ttyUSB0"
    first = pty_factory()
    link.symlink_to(first.path)
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--reopen-interval", "0.2", link, wait_port=port)
    s.wait_log(OPENED)
    c = join(s, clients, port)
    first.write(b"before")
    assert c.recv(6) == b"before"
    c.send(b"up")
    assert first.read(2) == b"up"

    repoint(link, link.with_name("unplugged"))  # before the pty number is free for another test
    first.close()  # unplugged
    s.wait_log(r"\[cli\] device %s lost: .*; reopening every 0.2s" % re.escape(str(link)))
    c.send(b"void")  # nowhere to go: dropped and said so, never kept for later
    s.wait_log(r"\[cli\] dropped 4 bytes: device \S+ is not open")
    assert c.recv_available(0.3) == b""  # nothing invented meanwhile

    second = pty_factory()
    repoint(link, second.path)  # plugged back
    s.wait_log(OPENED, count=2)
    assert second.read_available(0.3) == b""
    second.write(b"after")
    assert c.recv(5) == b"after"
    c.send(b"again")
    assert second.read(5) == b"again"
    assert log_count(s, DISCONNECTED) == 0  # the same connection all along


def test_device_unplugged_twice_and_clients_come_and_go_meanwhile(sertcp, clients, pty_factory, tmp_path):
    link = tmp_path / "ttyACM0"
    device = pty_factory()
    link.symlink_to(device.path)
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--reopen-interval", "0.2", link, wait_port=port)
    s.wait_log(OPENED)
    for round_ in (1, 2):
        repoint(link, link.with_name("unplugged"))  # before the pty number is free for another test
        device.close()
        s.wait_log(r"\[cli\] device \S+ lost", count=round_)
        c = join(s, clients, port)  # the listener stays up while the device is gone
        c.close()
        s.wait_log(DISCONNECTED, count=round_)
        device = pty_factory()
        repoint(link, device.path)
        s.wait_log(OPENED, count=round_ + 1)
    c = join(s, clients, port)
    device.write(b"still here")
    assert c.recv(10) == b"still here"


def test_device_missing_at_start_appears_later(sertcp, clients, pty_factory, tmp_path):
    link = tmp_path / "ttyLATE"
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--reopen-interval", "0.2", link,
               "--status", "127.0.0.1:%d" % status, wait_port=port)
    s.wait_log(r"\[cli\] device %s cannot be opened: " % re.escape(str(link)))
    s.wait_log("status endpoint on")
    state = port_status(status)
    assert not state["open"] and state["device_state"] == "missing"
    c = join(s, clients, port)  # clients are accepted while the device is missing
    c.send(b"early")
    s.wait_log(r"dropped 5 bytes: device \S+ is not open")
    pty = pty_factory()
    link.symlink_to(pty.path)
    s.wait_log(OPENED)
    assert pty.read_available(0.3) == b""
    pty.write(b"hello")
    assert c.recv(5) == b"hello"
    c.send(b"world")
    assert pty.read(5) == b"world"


def test_sigterm_while_the_device_is_missing_exits_0(sertcp, clients, tmp_path):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--reopen-interval", "0.2",
               tmp_path / "ttyGONE", wait_port=port)
    s.wait_log(r"\[cli\] device \S+ cannot be opened")
    c = join(s, clients, port)
    assert s.stop() == 0
    assert c.closed_by_peer(5)


def test_one_missing_device_does_not_stop_another_port(sertcp, clients, pty, tmp_path):
    good, bad = free_port(), free_port()
    s = sertcp(config="""
[good]
device = %s
listen = 127.0.0.1:%d
[bad]
device = %s
listen = 127.0.0.1:%d
reopen_interval = 0.2
""" % (pty.path, good, tmp_path / "absent", bad))
    s.wait_log(r"\[good\] device \S+ opened")
    s.wait_log(r"\[bad\] device \S+ cannot be opened")
    c = clients(good)
    s.wait_log(r"\[good\] client \S+ connected")
    pty.write(b"fine")
    assert c.recv(4) == b"fine"


def beside_a_url_device(good_path, good, name, far_port, extra):
    """(INI, the listen port of [name]): two ports, [good] on a pty and
    [name] on rfc2217:// to far_port."""
    port = free_port()
    return """
[good]
device = %s
listen = 127.0.0.1:%d
[%s]
device = rfc2217://127.0.0.1:%d
listen = 127.0.0.1:%d
%s
""" % (good_path, good, name, far_port, port, extra), port


def slowest_round_trip(client, pty, going_on, bound=20.0):
    """Round trips client -> pty -> client while going_on(); the slowest."""
    slowest, i = 0.0, 0
    deadline = time.monotonic() + bound
    while going_on():
        assert time.monotonic() < deadline, "still going after %gs" % bound
        data = b"%06d" % i
        t0 = time.monotonic()
        client.send(data)
        assert pty.read(6) == data
        pty.write(data)
        assert client.recv(6) == data
        slowest = max(slowest, time.monotonic() - t0)
        i += 1
    return slowest


class SilentServer:
    """A TCP server that accepts and never says a word: an RFC 2217 far end
    that is hung, or a gateway with nothing behind it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self.thread = Background(self._accept)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_url_device_whose_far_end_hangs_does_not_stall_another_port(sertcp, clients, pty, tmp_path):
    """pyserial waits seconds for an RFC 2217 server to negotiate; sertcp
    opens URL devices in a thread, so the other port answers meanwhile."""
    far = SilentServer()
    try:
        good = free_port()
        config, _ = beside_a_url_device(pty.path, good, "hung", far.port, "reopen_interval = 0.5")
        s = sertcp(config=config)
        s.wait_listening(good)
        c = clients(good)
        s.wait_log(r"\[good\] client \S+ connected")
        wait_for(lambda: far.accepted, message="the far end dialled")
        # two open attempts take pyserial's 3 s negotiation wait each; a
        # round trip on the other port never waits for them
        started = time.monotonic()
        slowest = slowest_round_trip(c, pty, lambda: time.monotonic() < started + 7.0 or log_count(
            s, r"\[hung\] device \S+ cannot be opened") < 1)
        assert slowest < 1.5, "a round trip on [good] took %.2fs" % slowest
        s.wait_log(r"\[hung\] device rfc2217://\S+ cannot be opened: .*RFC ?2217")
        # tried again and again (a third try means the second one failed),
        # and said once, not at every retry
        wait_for(lambda: len(far.accepted) >= 3, 15, message="a third try")
        assert log_count(s, r"cannot be opened") == 1
    finally:
        far.close()


class Proxy:
    """Relays one TCP connection to `target`: held until release() (a far
    end slow to answer), and from freeze() on, nothing more is passed
    either way (a far end that hangs with the connection open)."""

    def __init__(self, target, held=False):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.released = threading.Event()
        if not held:
            self.released.set()
        self.frozen = False
        self.conns = []
        self.thread = Background(self._serve)

    def release(self):
        self.released.set()

    def freeze(self):
        self.frozen = True

    def _serve(self):
        try:
            a, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(a)
        self.released.wait(30)
        b = socket.create_connection(("127.0.0.1", self.target))
        self.conns.append(b)
        pumps = [Background(self._pump, a, b), Background(self._pump, b, a)]
        for pump in pumps:
            pump.join()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.frozen:
                    dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_data_sent_while_a_url_device_opens_reaches_it_once_open(sertcp, clients, pty, tmp_path):
    """A client may connect and send while an rfc2217:// device is still
    negotiating: its bytes wait in the device queue instead of being
    dropped, and go out once the device is open."""
    far_port = free_port()
    far = sertcp(pty.path, "--listen", "127.0.0.1:%d" % far_port, "--protocol", "rfc2217",
                 wait_port=far_port)
    proxy = Proxy(far_port, held=True)
    try:
        near, status = free_port(), free_port()
        s = sertcp("rfc2217://127.0.0.1:%d" % proxy.port, "--listen", "127.0.0.1:%d" % near,
                   "--status", "127.0.0.1:%d" % status, wait_port=near)
        c = clients(near)
        c.send(b"early bytes")

        def read_by_sertcp():
            port = port_status(status)
            return port["clients"] and port["clients"][0]["bytes_in"] == 11
        wait_for(read_by_sertcp, message="sertcp read the client's bytes")
        state = port_status(status)
        assert not state["open"] and state["device_state"] == "opening"   # the far end has not answered
        proxy.release()
        assert pty.read(11) == b"early bytes"
        s.wait_log(r"device rfc2217://\S+ opened")
        state = port_status(status)
        assert state["open"] and state["device_state"] == "open"
        pty.write(b"and back")
        assert c.recv(8) == b"and back"
        assert "dropped" not in s.log()
    finally:
        proxy.close()
        far.stop()


def test_lines_set_on_connect_wait_for_a_url_device_without_stalling_another_port(
        sertcp, clients, pty_factory, tmp_path):
    """pyserial's rfc2217:// waits for the far end to acknowledge each DTR
    or RTS change (3 s when it hangs); the lines a client's arrival sets
    are changed by the device's own thread, so the other port keeps
    answering."""
    far_pty, good_pty = pty_factory(), pty_factory()
    far_port = free_port()
    far = sertcp(far_pty.path, "--listen", "127.0.0.1:%d" % far_port, "--protocol", "rfc2217",
                 wait_port=far_port)
    proxy = Proxy(far_port)
    try:
        good = free_port()
        config, chain = beside_a_url_device(good_pty.path, good, "chain", proxy.port,
                                            "dtr_active = on\nrts_active = on")
        s = sertcp(config=config)
        s.wait_log(r"\[chain\] device \S+ opened")
        c = clients(good)
        s.wait_log(r"\[good\] client \S+ connected")
        proxy.freeze()
        started = time.monotonic()
        joined = clients(chain)
        s.wait_log(r"\[chain\] client \S+ connected")
        slowest = slowest_round_trip(c, good_pty, lambda: time.monotonic() < started + 4.0)
        # pyserial gives up after 3 s, and that is worth a warning
        s.wait_log(r"WARNING \[chain\] DTR on, RTS on: cannot set lines: .*timeout")
        assert slowest < 1.5, "a round trip on [good] took %.2fs" % slowest
        joined.close()
    finally:
        proxy.close()
        far.stop()


def port_status(status_port):
    code, body = http_get(status_port, "/status")
    assert code == 200
    return json.loads(body)["ports"][0]


# --- clients that do not keep up --------------------------------------------------

EIGHT_MB = 8 << 20


def test_client_that_never_reads_is_disconnected_while_another_gets_everything(
        sertcp, pty, clients, lazy_clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--max-clients", "2", "--client-buffer", "64k",
               pty.path, wait_port=port)
    s.wait_log(OPENED)
    lazy = lazy_clients(port)
    s.wait_log(CONNECTED)
    reader = join(s, clients, port)
    data = payload(EIGHT_MB, seed=10)
    writer = Background(pty.write, data)
    assert reader.recv(EIGHT_MB, timeout=60) == data
    writer.join()
    s.wait_log(r"\[cli\] client 127.0.0.1:%d disconnected: slow client: client_buffer" % lazy.local)
    assert lazy.closed_by_peer(5)
    assert reader.recv_available(0.2) == b""


def test_slow_client_drop_keeps_it_connected_and_drops_only_its_data(
        sertcp, pty, clients, lazy_clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--max-clients", "2", "--client-buffer", "64k",
               "--slow-client", "drop", pty.path, wait_port=port)
    s.wait_log(OPENED)
    lazy = lazy_clients(port)
    s.wait_log(CONNECTED)
    reader = join(s, clients, port)
    data = payload(EIGHT_MB, seed=11)
    writer = Background(pty.write, data)
    assert reader.recv(EIGHT_MB, timeout=60) == data
    writer.join()
    s.wait_log(r"\[cli\] dropped \d+ bytes: client 127.0.0.1:%d is not reading" % lazy.local)
    got = lazy.drain()
    assert 0 < len(got) < EIGHT_MB
    assert got[:4096] == data[:4096]
    assert log_count(s, DISCONNECTED) == 0
    pty.write(b"END")  # its queue has room again: it is served as before
    assert reader.recv(3) == b"END"
    assert lazy.recv_exact(3) == b"END"
    assert lazy.drain() == b""


class CountingWriter(Background):
    """Writes data to the pty in chunks, counting what the device took."""

    def __init__(self, pty, data):
        self.done = 0
        self.total = len(data)

        def write():
            for at in range(0, len(data), 4096):
                pty.write(data[at:at + 4096])
                self.done = at + len(data[at:at + 4096])
        super().__init__(write)

    def stalled(self, window=0.3):
        """True if the device took nothing for `window` seconds with data left."""
        before = self.done
        time.sleep(window)  # the observation window, not a wait for sertcp
        return self.done == before < self.total


def test_a_lone_client_that_stops_reading_pauses_the_device_and_loses_nothing(
        sertcp, pty, lazy_clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--client-buffer", "64k", pty.path, wait_port=port)
    s.wait_log(OPENED)
    c = lazy_clients(port)
    s.wait_log(CONNECTED)
    data = payload(EIGHT_MB, seed=12)
    writer = CountingWriter(pty, data)
    # the only recipient is behind: sertcp stops reading the device (so the
    # writer blocks) instead of disconnecting the client or dropping data
    wait_for(writer.stalled, 20, interval=0, message="the device to be paused")
    assert c.recv_exact(len(data), timeout=60) == data
    writer.join()
    assert log_count(s, DISCONNECTED) == 0
    assert "dropped" not in s.log()


def unread_on_master(pty):
    """Bytes sertcp wrote to the device that the test has not read yet."""
    return struct.unpack("i", fcntl.ioctl(pty.master, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_client_flood_waits_for_a_device_that_is_not_read(sertcp, pty, clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, pty.path, wait_port=port)
    s.wait_log(OPENED)
    c = join(s, clients, port)
    data = payload(4 << 20, seed=13)
    sender = Background(c.send, data)
    # nobody reads the device until its buffer is full; sertcp must hold
    # the rest back (and the sender with it), not drop it
    wait_for(lambda: unread_on_master(pty) >= 4000, 5, message="the device's buffer to fill")
    assert pty.read(len(data), timeout=30) == data
    sender.join()
    assert "dropped" not in s.log()


def test_a_client_that_resets_leaves_the_others_alone(sertcp, pty, clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--max-clients", "2", pty.path, wait_port=port)
    s.wait_log(OPENED)
    gone = join(s, clients, port)
    stays = join(s, clients, port)
    data = payload(1 << 20, seed=14)
    writer = Background(pty.write, data)
    assert stays.recv(4096) == data[:4096]
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()  # an RST, mid-stream
    assert stays.recv(len(data) - 4096, timeout=30) == data[4096:]
    writer.join()
    s.wait_log(DISCONNECTED)
    stays.send(b"alive")
    assert pty.read(5) == b"alive"


def test_a_burst_of_rejected_connections_leaves_the_port_working(sertcp, pty, clients):
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, pty.path, wait_port=port)
    s.wait_log(OPENED)
    kept = join(s, clients, port)
    for _ in range(30):
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        extra.close()
    s.wait_log(r"rejected", count=1)
    pty.write(b"ok")
    assert kept.recv(2) == b"ok"
    kept.send(b"ok")
    assert pty.read(2) == b"ok"


# --- the local program behind a virtual port ------------------------------------

def test_virtual_port_closed_and_reopened_by_the_local_program(sertcp, clients, tmp_path):
    import serial
    path = tmp_path / "ttyV0"
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--virtual", path, wait_port=port)
    s.wait_log(OPENED)
    c = join(s, clients, port)
    for round_ in (1, 2):
        program = serial.Serial(str(path), timeout=5)
        try:
            s.wait_log(r"virtual port \S+ opened by a local program", count=round_)
            program.write(b"round %d" % round_)
            assert c.recv(7) == b"round %d" % round_
            c.send(b"reply")
            assert program.read(5) == b"reply"
        finally:
            program.close()
        s.wait_log(r"virtual port \S+ closed by a local program", count=round_)
    assert log_count(s, DISCONNECTED) == 0


# --- a recipient that leaves while the device is paused for it ------------------

class SteadyWriter(Background):
    """Writes `chunk` to the pty over and over until stop(), never blocking
    for long; `done` counts what the device took."""

    def __init__(self, pty, chunk=b"." * 4096):
        self.done = 0
        self.stopping = threading.Event()

        def write():
            while not self.stopping.is_set():
                try:
                    self.done += os.write(pty.master, chunk)
                except BlockingIOError:
                    select.select([], [pty.master], [], 0.05)
        super().__init__(write)

    def stalled(self, window=0.3):
        """True if the device took nothing for `window` seconds."""
        before = self.done
        time.sleep(window)  # the observation window, not a wait for sertcp
        return self.done == before

    def stop(self):
        self.stopping.set()
        self.join(5)


def read_until(sock, marker, timeout):
    """Everything sock receives up to and including marker, within timeout."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while not out.endswith(marker):
        left = deadline - time.monotonic()
        assert left > 0, "no %r within %gs; got %d bytes ending %r" % (marker, timeout, len(out), bytes(out[-32:]))
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        assert chunk, "closed after %d bytes without %r: %r" % (len(out), marker, bytes(out[-32:]))
        out += chunk
        if marker in out and not out.endswith(marker):
            del out[out.index(marker) + len(marker):]
    return bytes(out)


IAC_SB, IAC_SE = b"\xff\xfa", b"\xff\xf0"
WILL_COM_PORT = b"\xff\xfb\x2c"
FLOWCONTROL_SUSPEND = IAC_SB + b"\x2c\x08" + IAC_SE     # RFC 2217: client -> server, code 8


@pytest.mark.parametrize("how", ["closes", "kicked", "idle_timeout", "rfc2217_suspended_then_closes"])
def test_the_device_is_read_again_once_the_client_it_was_paused_for_has_gone(
        sertcp, pty, clients, lazy_clients, how):
    """A lone client that stops reading pauses the device; when that client
    goes (whichever way), the device is read again: its data is counted,
    dropped while nobody is there (buffer = 0), and the next client gets
    what the device sends from then on."""
    port, status = free_port(), free_port()
    extra = {"closes": [], "kicked": ["--when-full", "kick_oldest"], "idle_timeout": ["--timeout", "1"],
             "rfc2217_suspended_then_closes": ["--protocol", "rfc2217"]}[how]
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--client-buffer", "64k", "--slow-client", "drop",
               "--status", "127.0.0.1:%d" % status, pty.path, *extra, wait_port=port)
    s.wait_log(OPENED)
    first = lazy_clients(port)
    s.wait_log(CONNECTED)
    if how == "rfc2217_suspended_then_closes":
        first.sock.sendall(WILL_COM_PORT + FLOWCONTROL_SUSPEND)
    writer = SteadyWriter(pty)
    try:
        wait_for(writer.stalled, 20, interval=0, message="the device to be paused")
        newcomer = None
        if how == "kicked":
            newcomer = clients(port)
            s.wait_log(r"disconnected: kicked by newer client")
        elif how == "idle_timeout":
            s.wait_log(r"disconnected: idle timeout", timeout=5)
        else:
            first.close()
            s.wait_log(DISCONNECTED, timeout=5)
        # nobody is paused for any more: the device is read, the writer goes on
        read_so_far = port_status(status)["bytes_from_device"]
        wait_for(lambda: port_status(status)["bytes_from_device"] > read_so_far, 5,
                 message="bytes_from_device to grow past %d after the client left" % read_so_far,
                 interval=0.05)
        if newcomer is None:
            newcomer = join(s, clients, port)
        got = Background(read_until, newcomer.sock, b"<MARKER>", 10)
        writer.stop()
        pty.write(b"<MARKER>")
        got.join(15)
    finally:
        writer.stop()


# --- a client that leaves while the device is not taking data -------------------

def send_until_stalled(sock, quiet=0.5, limit=256 << 20):
    """Send to sock until it has taken nothing for `quiet` seconds; the
    number of bytes it took."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    while sent < limit:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            if not select.select([], [sock], [], quiet)[1]:
                return sent
    raise AssertionError("%d bytes sent and still taking more" % sent)


def pty_read_until(pty, marker, timeout):
    """Everything read from the pty master up to and including marker."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while not out.endswith(marker):
        left = deadline - time.monotonic()
        assert left > 0, "no %r on the device within %gs; got %d bytes ending %r" % (
            marker, timeout, len(out), bytes(out[-32:]))
        if select.select([pty.master], [], [], min(left, 0.2))[0]:
            try:
                out += os.read(pty.master, 65536)
            except (BlockingIOError, OSError):
                pass
    return bytes(out)


def test_a_client_that_leaves_while_the_device_takes_nothing_frees_its_place(sertcp, pty, clients):
    """The device is not read (sertcp holds 64 KiB for it and stops reading
    the client); the only client goes away meanwhile, with device data it
    never read, so that its kernel resets the connection.  (A plain FIN
    would wait behind the bytes sertcp has not read.)  Its place is free
    again within seconds: a newcomer is admitted, listed alone in /status,
    and its data reaches the device once the device takes data again."""
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, pty.path,
               wait_port=port)
    s.wait_log(OPENED)
    first = join(s, clients, port)
    pty.write(b"never read")
    wait_for(lambda: port_status(status)["clients"][0]["bytes_out"] == 10, 5, interval=0.05,
             message="the device's bytes sent to the client")
    sent = send_until_stalled(first.sock, quiet=1.0)
    first.close()

    def admitted():
        c = clients(port)
        if c.closed_by_peer(0.3):
            return None     # turned away: the departed client may not be noticed yet
        return c
    newcomer = wait_for(admitted, 5, interval=0.1, message="a newcomer to be admitted (max_clients = 1)")
    listed = [c["peer"] for c in port_status(status)["clients"]]
    assert listed == ["127.0.0.1:%d" % newcomer.sock.getsockname()[1]]
    newcomer.send(b"<NEWCOMER>")
    got = pty_read_until(pty, b"<NEWCOMER>", 20)
    assert len(got) <= sent + 10


# --- a URL device whose far end hangs while a client changes a setting --------------

def test_a_baud_change_waiting_on_a_hung_url_device_does_not_stall_another_port(sertcp, clients, pty_factory):
    """An RFC 2217 client of a port whose device is rfc2217:// asks for a
    new baud rate while that device's far end hangs: pyserial waits 3 s
    for it.  Meanwhile another port's round trips and /status answer
    within 1.5 s each (a second, with room for a busy machine)."""
    import serial
    far_pty, good_pty = pty_factory(), pty_factory()
    far_port = free_port()
    far = sertcp(far_pty.path, "--listen", "127.0.0.1:%d" % far_port, "--protocol", "rfc2217",
                 wait_port=far_port)
    asking = None
    try:
        good, status = free_port(), free_port()
        config, chain = beside_a_url_device(good_pty.path, good, "chain", far_port, "protocol = rfc2217")
        s = sertcp(config=config + "[global]\nstatus = 127.0.0.1:%d\n" % status)
        s.wait_log(r"\[chain\] device \S+ opened")
        s.wait_log("status endpoint on")
        c = clients(good)
        s.wait_log(r"\[good\] client \S+ connected")
        remote = serial.serial_for_url("rfc2217://127.0.0.1:%d" % chain, timeout=1)  # while the far end answers
        s.wait_log(r"\[chain\] client \S+ connected")
        far.signal(signal.SIGSTOP)  # hung, with its connection open

        def ask():
            try:
                remote.baudrate = 19200
            except serial.SerialException:
                pass    # no answer in time: what it is told is not the point here
        asking = Background(ask)
        started = time.monotonic()
        slowest_status = []

        def poll_status():
            worst = 0.0
            while time.monotonic() < started + 4.5:
                t0 = time.monotonic()
                assert http_get(status, "/status", timeout=10)[0] == 200
                worst = max(worst, time.monotonic() - t0)
            slowest_status.append(worst)
        poller = Background(poll_status)
        slowest = slowest_round_trip(c, good_pty, lambda: time.monotonic() < started + 4.5)
        poller.join(20)
        # the far end did hang: the change could not be made
        s.wait_log(r"\[chain\] .*19200", timeout=10)
        assert slowest < 1.5, "a round trip on [good] took %.2fs" % slowest
        assert slowest_status[0] < 1.5, "/status took %.2fs" % slowest_status[0]
    finally:
        far.signal(signal.SIGCONT)
        if asking is not None:
            asking.join(20)
            remote.close()
        far.stop()


# --- a socket:// device that sends fast ---------------------------------------------

def test_a_socket_url_device_is_read_in_chunks_not_byte_by_byte(sertcp, clients):
    """A socket:// device's far end sends 4 MiB as fast as it can: a client
    gets it all, byte-exact, at 2 MB/s at least (reading one byte per call
    manages some 30 KB/s).  Read faster than the client takes it, the
    device must wait for the client as a tty does, not overflow its
    client_buffer."""
    data = payload(4 << 20, seed=40)
    far = socket.create_server(("127.0.0.1", 0))
    far_conns = []
    go = threading.Event()

    def serve():
        conn, _ = far.accept()
        far_conns.append(conn)
        go.wait(20)
        conn.sendall(data)
    server = Background(serve)
    try:
        port = free_port()
        s = sertcp("socket://127.0.0.1:%d" % far.getsockname()[1], "--listen", "127.0.0.1:%d" % port,
                   wait_port=port)
        s.wait_log(r"device socket://\S+ opened")
        c = join(s, clients, port)
        started = time.monotonic()
        go.set()
        assert c.recv(len(data), timeout=4.0) == data
        took = time.monotonic() - started
        assert len(data) / took >= 2e6, "%.0f bytes/s" % (len(data) / took)
        server.join(5)
    finally:
        go.set()
        for conn in far_conns:
            conn.close()
        far.close()


# --- client data in hand when the device goes ---------------------------------------

def unplug(pty):
    """Close both sides of the pty for good (the fixture's close() later
    must not close descriptors that have been reused meanwhile)."""
    pty.close()
    pty.master = pty.slave = -1


def test_client_bytes_that_meet_an_unplugged_device_are_counted_as_dropped(sertcp, pty, lazy_clients, tmp_path):
    """Every byte read from a client is written to the device or counted in
    bytes_dropped.  Here the device is paused (its lone client lags behind)
    and has nothing queued, so nothing watches it when it is unplugged;
    the client's next bytes meet the failing write."""
    link = tmp_path / "ttyUSB0"
    link.symlink_to(pty.path)
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--client-buffer", "64k", "--status", "127.0.0.1:%d" % status,
               link, wait_port=port)
    s.wait_log(OPENED)
    c = lazy_clients(port)
    s.wait_log(CONNECTED)
    writer = SteadyWriter(pty)
    try:
        wait_for(writer.stalled, 20, interval=0, message="the device to be paused")
    finally:
        writer.stop()
    state = port_status(status)
    assert state["bytes_to_device"] == state["bytes_dropped"] == 0
    link.unlink()
    unplug(pty)
    c.sock.sendall(b"z" * 1000)
    wait_for(lambda: port_status(status)["clients"][0]["bytes_in"] == 1000, 5, interval=0.05,
             message="sertcp to read the client's 1000 bytes")
    s.wait_log(r"\[cli\] device \S+ lost")
    state = port_status(status)
    assert state["bytes_to_device"] + state["bytes_dropped"] == 1000, \
        "of 1000 bytes from the client, %d written and %d counted as dropped" % (
            state["bytes_to_device"], state["bytes_dropped"])


# --- out of descriptors, then a reload ------------------------------------------------

def test_a_listener_paused_for_lack_of_descriptors_and_then_removed_by_a_reload(
        sertcp, clients, pty_factory):
    """A listener that met EMFILE pauses accepting for 1 s.  A SIGHUP that
    removes its port meanwhile closes it; when the pause ends, nothing
    breaks, and the other port goes on serving."""
    import resource
    kept_pty, gone_pty = pty_factory(), pty_factory()
    kept, gone = free_port(), free_port()
    both = """
[kept]
device = %s
listen = 127.0.0.1:%d
[gone]
device = %s
listen = 127.0.0.1:%d
max_clients = 100
""" % (kept_pty.path, kept, gone_pty.path, gone)

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))  # both limits: sertcp cannot raise it
    s = sertcp(config=both, preexec_fn=few_descriptors)
    s.wait_listening(kept)
    s.wait_listening(gone)
    s.wait_log(r"\[gone\] device \S+ opened")
    callers = []
    for i in range(64):
        # each from an address of its own: sertcp limits log lines per address
        callers.append(clients(gone, source="127.0.1.%d" % (i + 1)))
        wait_for(lambda: log_count(s, r"\[gone\] client \S+ connected") > i or "pausing accepts" in s.log(),
                 5, message="client %d accepted or accepting paused" % (i + 1))
        if "pausing accepts" in s.log():
            break
    s.wait_log(r"\[gone\] cannot accept: .*; pausing accepts for 1s")
    # two descriptors back, so that the reload can read the file
    for caller in callers[:2]:
        caller.close()
    s.wait_log(r"\[gone\] client \S+ disconnected", count=2, timeout=2)
    s.config.write_text(both[:both.index("[gone]")])
    s.signal(signal.SIGHUP)
    s.wait_log(r"reloaded: kept kept; restarted none; started none; stopped gone", timeout=2)
    time.sleep(1.5)  # the pause runs out (nothing to see from outside when it does)
    assert "internal error" not in s.log() and "Traceback" not in s.log(), s.log()
    c = clients(kept)
    s.wait_log(r"\[kept\] client \S+ connected")
    c.send(b"still")
    assert kept_pty.read(5) == b"still"
    kept_pty.write(b"here")
    assert c.recv(4) == b"here"


# --- strict_baud from the first byte --------------------------------------------------

def test_strict_baud_paces_what_a_program_writes_the_moment_it_opens_the_port(sertcp, clients, tmp_path):
    """A program opens the virtual port and at once writes 1901 bytes: at
    9600 baud 8N1 that is 1.98 s on a real line, and the client gets them
    at that pace, not in one go."""
    path = tmp_path / "ttyV0"
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--virtual", path, "--strict-baud", "yes",
               "--baudrate", "9600", wait_port=port)
    s.wait_log(OPENED)
    c = join(s, clients, port)
    data = payload(1901, seed=50)
    program = os.open(str(path), os.O_RDWR | os.O_NOCTTY)
    try:
        assert os.write(program, data) == len(data)
        first = c.recv(1, timeout=6)
        first_at = time.monotonic()
        rest = c.recv(len(data) - 1, timeout=6)
        took = time.monotonic() - first_at
    finally:
        os.close(program)
    assert first + rest == data
    assert took >= 1.5, "1901 bytes at 9600 baud arrived within %.2fs" % took


# --- listen_on_open with connect: the hang-up is sertcp's own ----------------------------

def test_listen_on_open_dials_again_at_once_after_hanging_up_for_the_local_program(sertcp, tmp_path):
    """A virtual port that dials only while a local program has it open:
    each open dials, each close hangs up.  That hang-up is sertcp's own
    doing, not a failed dial: the next open dials at once, without the
    back-off that a peer closing on it would earn."""
    far = socket.create_server(("127.0.0.1", 0))
    try:
        path = tmp_path / "ttyV0"
        status = free_port()
        s = sertcp("--virtual", path, "--listen-on-open", "yes", "--connect", "127.0.0.1:%d" % far.getsockname()[1],
                   "--reconnect-min", "2", "--reconnect-max", "4", "--status", "127.0.0.1:%d" % status)
        s.wait_log(OPENED)
        s.wait_log("status endpoint on")
        for round_ in (1, 2, 3):
            program = os.open(str(path), os.O_RDWR | os.O_NOCTTY)
            try:
                far.settimeout(1.5)   # the back-off would be 2 s at least
                try:
                    conn, _ = far.accept()
                except socket.timeout:
                    raise AssertionError("open number %d: no dial within 1.5s:\n%s" % (round_, s.log())) from None
            finally:
                os.close(program)
            with conn:
                conn.settimeout(5)
                assert conn.recv(1) == b""  # sertcp hangs up as the program closes
            s.wait_log(r"virtual port \S+ closed by a local program", count=round_)
        assert "failed" not in s.log()
        assert port_status(status)["dials_failed"] == 0
    finally:
        far.close()


# --- the once-a-second line about dropped data ------------------------------------------

def test_the_dropped_bytes_log_lines_add_up_to_bytes_dropped(sertcp, pty):
    """Lines about dropped data come at most once a second; bytes dropped
    during the quiet second are still logged once it is over, so the lines
    add up to bytes_dropped."""
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, pty.path, wait_port=port)
    s.wait_log(OPENED)
    pty.write(b"12345")  # no client and buffer = 0: dropped
    s.wait_log(r"\[cli\] dropped 5 bytes: no client connected")
    pty.write(b"1234567")  # within the second the first line opened
    wait_for(lambda: port_status(status)["bytes_dropped"] == 12, 5, interval=0.05,
             message="bytes_dropped to reach 12")

    def logged():
        return sum(int(n) for n in re.findall(r"\[cli\] dropped (\d+) bytes", s.log()))
    wait_for(lambda: logged() >= 12, 3, interval=0.05, message="the dropped lines to add up to 12")
    assert logged() == port_status(status)["bytes_dropped"] == 12


# --- a client that half-closes: sends FIN, waits for the answer ----------------------------

def answer(pty, question, reply):
    """The device: read `question`, answer `reply` at once."""
    assert pty.read(len(question), timeout=5) == question
    pty.write(reply)


def test_a_client_that_half_closes_still_gets_the_reply(sertcp, pty, clients):
    """A client sends a command and shuts down its sending side (FIN), as
    `nc -N` does, then reads.  The device's prompt reply reaches it, and
    then sertcp closes (a short grace without data, no timeout set)."""
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, pty.path, wait_port=port)
    s.wait_log(OPENED)
    c = join(s, clients, port)
    c.send(b"cmd\r")
    c.sock.shutdown(socket.SHUT_WR)
    answer(pty, b"cmd\r", b"reply\r\n")
    assert c.recv(7, timeout=5) == b"reply\r\n"
    assert c.closed_by_peer(5)
    s.wait_log(DISCONNECTED)


@pytest.mark.parametrize("tool", [["socat", "-t", "5", "-", "TCP:127.0.0.1:{port}"],
                                  ["nc.openbsd", "-N", "127.0.0.1", "{port}"]], ids=["socat", "nc -N"])
def test_a_command_piped_through_a_tool_gets_the_reply(sertcp, pty, tool):
    """The same with real tools: `printf 'cmd\\r' | socat -t 5 - TCP:...`
    and `printf 'cmd\\r' | nc -N host port` (netcat-openbsd) half-close at
    the end of their input and print what comes back; nc waits for
    sertcp to close, which it does after the 0.5 s grace."""
    need_programs(tool[0])
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, pty.path, wait_port=port)
    s.wait_log(OPENED)
    device = Background(answer, pty, b"cmd\r", b"reply\r\n")
    tool = subprocess.run([arg.format(port=port) for arg in tool], input=b"cmd\r",
                          capture_output=True, timeout=20)
    device.join(10)
    assert tool.returncode == 0, tool.stderr
    assert tool.stdout == b"reply\r\n"


# --- found in review: the recipient changing under a pause; a talkative device and a half-close

def test_the_device_is_read_again_when_send_to_last_active_moves_on(sertcp, pty, clients, lazy_clients):
    """send_to = last_active: the stalled client A pauses the device; once
    B sends, B is the one device data goes to, and B is not behind, so the
    device is read again and B gets what follows."""
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--client-buffer", "64k", "--slow-client", "drop",
               "--send-to", "last_active", "--max-clients", "2", pty.path, wait_port=port)
    s.wait_log(OPENED)
    stalled = lazy_clients(port)
    s.wait_log(CONNECTED)
    stalled.sock.sendall(b"A")
    assert pty.read(1) == b"A"
    writer = SteadyWriter(pty)
    try:
        wait_for(writer.stalled, 20, interval=0, message="the device to be paused")
        b = join(s, clients, port)
        b.send(b"B")
        assert pty.read(1) == b"B"
        got = Background(read_until, b.sock, b"<MARKER>", 10)
        writer.stop()
        pty.write(b"<MARKER>")
        got.join(15)
    finally:
        writer.stop()


def test_a_half_closed_client_is_closed_though_the_device_keeps_talking(sertcp, pty, clients):
    """The grace runs from the FIN, as socat's -t does: a device that talks
    every 0.1 s does not keep a half-closed client (and `nc -N`) for ever."""
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, pty.path, wait_port=port)
    s.wait_log(OPENED)
    c = join(s, clients, port)
    c.sock.shutdown(socket.SHUT_WR)
    stop = threading.Event()

    def talk():
        while not stop.is_set():
            pty.write(b"tick\r\n")
            stop.wait(0.1)
    talker = Background(talk)
    try:
        started = time.monotonic()
        assert c.closed_by_peer(timeout=5.0)
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        talker.join(5)
    s.wait_log(r"disconnected: closed by peer")
