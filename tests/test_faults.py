"""Faults and limits: devices that vanish and come back, devices missing at
start, clients that never read, read slowly, flood, or vanish, and local
programs that close and reopen a virtual port.  The rest of the process
keeps working through each of them."""
import fcntl
import json
import os
import random
import re
import socket
import struct
import termios
import threading
import time

import pytest

from conftest import Background, closing_factory, free_port, http_get, log_count, random_bytes, wait_for

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
