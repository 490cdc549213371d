"""Hostile peers: floods, half-open and idle connections, slow trickles,
clients that never read, malformed bytes, garbage where a password belongs,
junk where a TLS ClientHello belongs, and more handshakes than a listener
keeps.

Every test runs one attack against the real sertcp.py while a well-behaved
client on the same port (the bystander) receives a stream from the device;
afterwards the bystander must have every byte, unchanged and in order, the
process must still be up, its memory must have stayed under RSS_LIMIT_MIB,
and the log must hold only a rate-limited handful of lines about the
attacking address.  Attackers use their own loopback addresses (127.0.0.x)
so that the log lines about them can be counted; every loop is bounded in
count and in time."""
import os
import signal
import subprocess
import sys
import random
import re
import select
import socket
import ssl
import threading
import time

from certs import TlsClient, certs  # noqa: F401 (fixture)
from conftest import Client, free_port, random_bytes, wait_for

# The sertcp process (CPython, ~27 MiB resident at rest here) must stay under
# this while attacked.  Tests whose attackers are clients that receive device
# data set client_buffer so that attackers x client_buffer stays well inside.
RSS_LIMIT_MIB = 64
STREAM = 2 << 20          # bytes the device streams to the bystander during an attack
PEER_LOG_BURST, PEER_LOG_WINDOW = 10, 10.0   # the SPEC's "about 10 lines per 10 s per address"


# --- helpers ---------------------------------------------------------------

class Background(threading.Thread):
    """fn(*args) in a thread; result() re-raises what it raised."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error, self.value = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # handed to the test thread
            self.error = e

    def result(self, timeout=60.0):
        self.join(timeout)
        assert not self.is_alive(), "background %s still running" % self.fn
        if self.error:
            raise self.error
        return self.value


def payload(n, seed):
    return bytes(range(256)) + random_bytes(random.Random(seed), n - 256)


class Bystander:
    """A well-behaved client reading a stream from the device while the test
    attacks; check() says it got every byte."""

    def __init__(self, client, pty, size=STREAM, seed=0):
        self.data = payload(size, seed)
        self.reader = Background(client.recv, size, 60.0)
        self.writer = Background(pty.write, self.data, 60.0)

    def check(self):
        self.writer.result()
        got = self.reader.result()
        assert got == self.data, "the bystander's stream was changed"


class DeviceSink:
    """Reads everything the port writes to the device (the pty master), so
    that attackers' data never backs up; `data` is what arrived."""

    def __init__(self, pty):
        self.pty = pty
        self.data = bytearray()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            r, _, _ = select.select([self.pty.master], [], [], 0.05)
            if r:
                try:
                    self.data += os.read(self.pty.master, 65536)
                except (BlockingIOError, OSError):
                    pass

    def wait(self, n, timeout=20.0):
        wait_for(lambda: len(self.data) >= n, timeout, message="%d bytes at the device" % n)
        return bytes(self.data)

    def stop(self):
        self.stopping.set()
        self.thread.join(5)


class Discard(threading.Thread):
    """Reads and throws away what a socket receives until it closes, so
    that an attacker that sends to the device is not also a slow client
    of the device's stream (which sertcp would rightly drop)."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.start()

    def run(self):
        while True:
            try:
                if not self.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return


def rss_mib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no %s for pid %d" % (field, pid))


class RssWatch:
    """Samples the process's resident memory every 20 ms; `peak` is the
    highest sample and VmHWM (the kernel's own peak) is checked too."""

    def __init__(self, proc):
        self.pid = proc.pid
        self.samples = [rss_mib(self.pid)]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.wait(0.02):
            try:
                self.samples.append(rss_mib(self.pid))
            except (OSError, AssertionError):
                return

    def check(self, limit=RSS_LIMIT_MIB):
        self.stopping.set()
        self.thread.join(5)
        peak = max(max(self.samples), rss_mib(self.pid, "VmHWM"))
        print("sertcp memory: %.1f MiB at start, peak %.1f MiB (limit %d MiB)"
              % (self.samples[0], peak, limit))
        assert peak < limit, "sertcp used %.1f MiB, more than %d MiB" % (peak, limit)
        return peak


class Attack:
    """Bookkeeping for one attacking address: when it started, and whether
    the log about it stayed rate-limited."""

    def __init__(self, s, source):
        self.s = s
        self.source = source
        self.started = time.monotonic()

    def lines(self):
        rx = re.compile(r"\b%s\b" % re.escape(self.source))
        return [line for line in self.s.log().splitlines() if rx.search(line)]

    def check_log(self, at_least=1):
        lines = self.lines()
        windows = int((time.monotonic() - self.started) // PEER_LOG_WINDOW) + 1
        limit = windows * (PEER_LOG_BURST + 1)   # each window: a burst, and one "suppressed" line
        assert at_least <= len(lines) <= limit, "%d log lines about %s (limit %d):\n%s" % (
            len(lines), self.source, limit, "\n".join(lines[:40]))
        return lines


def alive(s):
    assert s.proc.poll() is None, "sertcp exited (%s):\n%s" % (s.proc.returncode, s.log()[-4000:])


def connect(port, source, host="127.0.0.1", timeout=10.0, rcvbuf=None):
    """A TCP connection from source; rcvbuf (set before connecting, so the
    window stays small) makes a non-reader's kernel take little."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def all_closed_by_peer(socks, timeout):
    """Wait until the server has closed every socket (EOF or reset); data
    arriving meanwhile is discarded.  True if all were closed in time."""
    open_ = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        r, _, _ = select.select(list(open_), [], [], min(0.1, max(0, deadline - time.monotonic())))
        for fd in r:
            s = open_[fd]
            try:
                s.setblocking(False)
                if not s.recv(65536):
                    del open_[fd]
            except BlockingIOError:
                pass
            except OSError:
                del open_[fd]
    return not open_


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


# A listen backlog of 256: attackers connect faster than any Python loop
# accepts, and a SYN dropped by a full kernel queue would only cost the test
# a 1 s retransmission.
BACKLOG = ("--backlog", "256")


def admitted(s, count=1):
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected", count=count)


# --- floods and idle connections ---------------------------------------------

def test_connection_flood(serve, pty, clients):
    s, port = serve(pty, *BACKLOG, "--max-clients", "1000")
    bystander = clients(port)
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.5")
    stream = Bystander(bystander, pty)
    made, deadline = 0, time.monotonic() + 20
    while made < 500 and time.monotonic() < deadline:
        sock = connect(port, attack.source)
        if made % 2:   # every other one ends in a reset instead of a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()
        made += 1
    assert made == 500
    stream.check()
    alive(s)
    memory.check()
    assert len(attack.check_log(at_least=PEER_LOG_BURST)) <= PEER_LOG_BURST + 1
    # the bystander still works both ways
    bystander.send(b"still here")
    assert pty.read(10) == b"still here"
    # when the window is over, one line says how many were held back (no
    # new line about that address is needed to bring it out)
    s.wait_log(r"suppressed \d+ log lines about 127\.0\.0\.5", timeout=PEER_LOG_WINDOW + 10)
    suppressed = int(re.search(r"suppressed (\d+) log lines about 127\.0\.0\.5", s.log()).group(1))
    assert suppressed >= 500 - PEER_LOG_BURST   # at least one line per connection was held back


def test_half_open_connections_left_idle(serve, pty, clients):
    # 200 idle clients that get device data and never read: each costs at
    # most client_buffer (64 KiB here) before it is dropped as a slow client
    s, port = serve(pty, *BACKLOG, "--max-clients", "1000", "--client-buffer", "64k")
    bystander = clients(port)
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.6")
    idle = [connect(port, attack.source, rcvbuf=4096) for _ in range(200)]
    try:
        stream = Bystander(bystander, pty)
        stream.check()
        alive(s)
        memory.check()
        attack.check_log(at_least=1)
        # 2 MiB is far more than client_buffer and a socket's send buffer:
        # every idle client was dropped as a slow client
        assert all_closed_by_peer(idle, timeout=5), "idle clients were kept past client_buffer"
    finally:
        close_all(idle)
    bystander.send(b"still here")
    assert pty.read(10) == b"still here"


def test_half_open_connections_on_a_password_port_time_out(serve, pty, clients):
    s, port = serve(pty, *BACKLOG, "--password", "letmein", "--identity-timeout", "1", "--max-clients", "4")
    bystander = clients(port)
    bystander.send(b"letmein\n")
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.7")
    idle = [connect(port, attack.source) for _ in range(200)]
    try:
        stream = Bystander(bystander, pty)
        assert all_closed_by_peer(idle, timeout=6), "idle connections outlived identity_timeout"
        stream.check()
        alive(s)
        memory.check()
        lines = attack.check_log(at_least=PEER_LOG_BURST)
        assert any("refused: no password within 1s" in line for line in lines)
    finally:
        close_all(idle)


def test_more_pending_handshakes_than_a_listener_keeps(serve, pty, clients):
    # MAX_PENDING_HANDSHAKES is 1024: the oldest pending ones give way
    s, port = serve(pty, *BACKLOG, "--password", "letmein", "--backlog", "1024")  # the last flag wins
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.8")
    idle, deadline = [], time.monotonic() + 20
    try:
        while len(idle) < 1100 and time.monotonic() < deadline:
            idle.append(connect(port, attack.source))
        assert len(idle) == 1100
        s.wait_log(r"127\.0\.0\.8:\d+ refused: too many connections still in their handshake")
        bystander = clients(port)      # the newest: admitted although the listener is crowded
        bystander.send(b"letmein\n")
        admitted(s)
        stream = Bystander(bystander, pty)
        stream.check()
        assert all_closed_by_peer(idle[:50], timeout=5), "the oldest handshakes were kept"
        alive(s)
        memory.check()
        attack.check_log(at_least=1)
    finally:
        close_all(idle)


# --- slow, silent and sloppy clients -----------------------------------------

def test_slow_trickle(sertcp, pty_factory, clients):
    """1 byte every 50 ms for 2 s: on a plain port every byte arrives; on a
    password port the trickle is cut at identity_timeout although it never
    stops (the deadline is for the whole line, not per byte)."""
    plain_pty, locked_pty = pty_factory(), pty_factory()
    plain, locked = free_port(), free_port()
    s = sertcp(config="[plain]\ndevice = %s\nlisten = 127.0.0.1:%d\nmax_clients = 2\n\n"
                      "[locked]\ndevice = %s\nlisten = 127.0.0.1:%d\nmax_clients = 30\n"
                      "password = letmein\nidentity_timeout = 1\n" % (plain_pty.path, plain, locked_pty.path, locked))
    s.wait_log(r"\[locked\] device \S+ opened")
    s.wait_log(r"\[plain\] device \S+ opened")
    bystander = clients(locked)
    bystander.send(b"letmein\n")
    s.wait_log(r"\[locked\] client 127\.0\.0\.1:\d+ connected")
    memory = RssWatch(s.proc)
    sink = DeviceSink(plain_pty)
    stream = Bystander(bystander, locked_pty)
    attack = Attack(s, "127.0.0.9")
    trickler = connect(plain, attack.source)
    slowloris = [connect(locked, attack.source) for _ in range(20)]
    cut_after = {}
    sent = bytearray()
    started = time.monotonic()
    for tick in range(40):   # 40 x 50 ms = 2 s
        byte = bytes([0x30 + tick % 10])
        trickler.send(byte)
        sent += byte
        for i, sock in enumerate(slowloris):
            if i in cut_after:
                continue
            try:
                sock.send(byte)
            except OSError:
                cut_after[i] = time.monotonic() - started
        time.sleep(0.05)   # the pace is the attack
    assert sink.wait(len(sent)) == bytes(sent)
    sink.stop()
    assert all_closed_by_peer(slowloris, timeout=3)
    stream.check()
    alive(s)
    memory.check()
    assert all(t <= 2.0 for t in cut_after.values()), cut_after
    attack.check_log(at_least=1)
    close_all(slowloris + [trickler])


def test_client_that_never_reads_while_the_device_streams(serve, pty, clients):
    s, port = serve(pty, *BACKLOG, "--max-clients", "2")
    bystander = clients(port)
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.10")
    sleeper = connect(port, attack.source, rcvbuf=4096)
    s.wait_log(r"client 127\.0\.0\.10:\d+ connected")
    try:
        stream = Bystander(bystander, pty, size=8 << 20)
        stream.check()
        alive(s)
        memory.check()
        # client_buffer (256 KiB) filled up: the sleeper was dropped, nobody was slowed
        s.wait_log(r"client 127\.0\.0\.10:\d+ disconnected: slow client")
        attack.check_log(at_least=2)
    finally:
        sleeper.close()


def test_a_client_flooding_a_device_that_does_not_drain(serve, pty, clients):
    """16 MiB towards a device nobody reads: sertcp stops reading that
    client instead of queueing, the bystander's stream from the device goes
    on, and once the device drains every byte arrives in order."""
    s, port = serve(pty, *BACKLOG, "--max-clients", "2", "--send-to", "first")  # the flooder never reads: only the bystander hears the device
    bystander = clients(port)
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.17")
    flooder = connect(port, attack.source)
    Discard(flooder)
    flood = junk(16 << 20, 7)
    progress = [0]

    def pour():
        view = memoryview(flood)
        while progress[0] < len(flood):
            progress[0] += flooder.send(view[progress[0]:progress[0] + 65536])
    pourer = Background(pour)
    stream = Bystander(bystander, pty)
    stream.check()

    def stalled():
        before = progress[0]
        time.sleep(0.3)   # "no progress for 0.3 s" is the condition
        return progress[0] == before and progress[0] < len(flood)
    wait_for(stalled, 10, interval=0, message="the flooder to be held back")
    held_at = progress[0]
    alive(s)
    memory.check()
    sink = DeviceSink(pty)
    assert sink.wait(len(flood), timeout=60) == flood
    sink.stop()
    pourer.result()
    print("flooder held back after %.1f MiB of 16 MiB" % (held_at / 1048576.0))
    attack.check_log(at_least=1)
    flooder.close()


def test_a_non_reader_is_dropped_soon_after_client_buffer_fills(serve, pty, clients):
    """client_buffer is what a stalled client may cost: it is dropped once
    about that much is waiting for it, not after megabytes more sit in the
    kernel on its behalf (4 MiB per socket here; on a 64 MiB router, a
    dozen idle clients would hold most of the RAM)."""
    s, port = serve(pty, *BACKLOG, "--max-clients", "2", "--client-buffer", "64k")
    bystander = clients(port)
    admitted(s)
    sleeper = connect(port, "127.0.0.16", rcvbuf=4096)
    s.wait_log(r"client 127\.0\.0\.16:\d+ connected")
    try:
        Bystander(bystander, pty, size=6 << 20).check()
        s.wait_log(r"client 127\.0\.0\.16:\d+ disconnected: slow client", timeout=5)
        sent = int(re.search(r"127\.0\.0\.16:\d+ disconnected: .*; 0 bytes in, (\d+) bytes out", s.log()).group(1))
        assert sent <= (64 << 10) + (1 << 20), "%d bytes went to a client that never read" % sent
    finally:
        sleeper.close()


def junk(n, seed, avoid=b""):
    data = random_bytes(random.Random(seed), n)
    for b in avoid:
        data = data.replace(bytes([b]), b"x")
    return data


MALFORMED = [
    b"\xff" * 4096,                                        # lone IACs
    bytes(range(256)) * 16,
    b"\xff\xfa\x2c" + b"\x01" * 70000,                     # a subnegotiation that never ends
    b"\xff\xfa\x2c\xff\xf0\xff\xfa\xff\xf0\xff\xf0",       # empty and stray SB / SE
    b"".join(bytes([255, verb, option]) for verb in (251, 252, 253, 254) for option in range(256)),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 500,  # a ClientHello to a plain port
    b"\r\0\r\n\n\r\x00\x00\r",
    "ünïcødé \u202e\ufeff".encode("utf-8") + b"\xc3\x28\xa0\xa1\xf0\x28\x8c\xbc",  # and invalid UTF-8
]


def test_malformed_bytes_on_a_raw_port_are_just_data(serve, pty, clients):
    s, port = serve(pty, *BACKLOG, "--max-clients", "2", "--send-to", "first")  # the attacker never reads: only the bystander hears the device
    bystander = clients(port)
    admitted(s)
    memory = RssWatch(s.proc)
    sink = DeviceSink(pty)
    stream = Bystander(bystander, pty)
    attack = Attack(s, "127.0.0.11")
    sock = connect(port, attack.source)
    Discard(sock)
    sent = b"".join(MALFORMED) + junk(1 << 20, 1)
    Background(sock.sendall, sent).result()
    assert sink.wait(len(sent)) == sent      # raw means raw: every byte reaches the device
    sink.stop()
    stream.check()
    sock.close()
    alive(s)
    memory.check()
    attack.check_log(at_least=1)


def test_malformed_telnet_on_an_rfc2217_port(serve, pty):
    import serial
    s, port = serve(pty, *BACKLOG, "--protocol", "rfc2217", "--max-clients", "20")
    bystander = serial.serial_for_url("rfc2217://127.0.0.1:%d" % port, timeout=5)  # pyserial's own client
    try:
        admitted(s)
        memory = RssWatch(s.proc)
        sink = DeviceSink(pty)
        stream = Bystander(_SerialReader(bystander), pty, size=256 << 10)  # pyserial reads slowly
        attack = Attack(s, "127.0.0.12")
        com_port = [b"\x01", b"\x01\xff\xff\xff\xff\xff\xff", b"\x02\x63", b"\x03\xc8", b"\x04\x00",
                    b"\x05\xff\xff", b"\x0c\x07", b"\x63\x01\x02", b"", b"\x0a\xff\xff" * 300]
        for n, piece in enumerate(MALFORMED + [b"\xff\xfb\x2c\xff\xfd\x2c" + b"".join(
                b"\xff\xfa\x2c" + body + b"\xff\xf0" for body in com_port)]):
            sock = connect(port, attack.source)
            try:
                sock.sendall(piece + junk(4096, n))
            except OSError:
                pass
            if n % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
        stream.check()
        bystander.write(b"still here")
        wait_for(lambda: b"still here" in bytes(sink.data), 10, message="the bystander's bytes at the device")
        sink.stop()
        alive(s)
        memory.check()
        attack.check_log(at_least=1)
    finally:
        bystander.close()


class _SerialReader:
    """A pyserial port with the Client.recv(n, timeout) shape."""

    def __init__(self, port):
        self.port = port

    def recv(self, n, timeout=10.0):
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += self.port.read(n - len(out))
        return bytes(out)


# --- where a password or a TLS handshake belongs -----------------------------

def test_megabytes_of_garbage_before_a_newline_on_a_password_port(serve, pty, clients):
    s, port = serve(pty, *BACKLOG, "--password", "letmein", "--max-clients", "2")
    bystander = clients(port)
    bystander.send(b"letmein\n")
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.13")
    stream = Bystander(bystander, pty)
    socks = [connect(port, attack.source) for _ in range(8)]

    def pour(sock, seed):
        garbage = junk(4 << 20, seed, avoid=b"\n")
        try:
            sock.sendall(garbage)
        except OSError:
            pass   # reset by sertcp: that is the expected end
    pourers = [Background(pour, sock, n) for n, sock in enumerate(socks)]
    for p in pourers:
        p.result(30)
    assert all_closed_by_peer(socks, timeout=5)
    stream.check()
    alive(s)
    memory.check()
    lines = attack.check_log(at_least=1)
    assert any("refused: password line too long" in line for line in lines)
    assert pty.read_available(0.1) == b""   # none of it reached the device
    close_all(socks)


def test_junk_instead_of_a_tls_client_hello(serve, pty, certs):
    s, port = serve(pty, *BACKLOG, *certs.server_flags(), "--identity-timeout", "1", "--max-clients", "2")
    bystander = TlsClient(port, certs.client_context())
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.14")
    stream = Bystander(bystander, pty)
    hellos = [
        b"\x16\x03\x01\x00\xff" + junk(255, 1),                    # a handshake record of garbage
        b"\x16\x03\x03\xff\xff" + junk(65535, 2),                  # the largest record, all garbage
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + junk(508, 3),  # a ClientHello with a junk body
        b"\x15\x03\x03\x00\x02\x02\x28",                           # an alert before anything
        junk(4096, 4),
        b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + junk(37, 5),    # SSLv2-style hello
        b"\x16\x03\x01",                                           # a header cut short, then silence
    ]
    socks = []
    for round_ in range(15):
        for n, hello in enumerate(hellos):
            sock = connect(port, attack.source)
            try:
                sock.sendall(hello)
            except OSError:
                pass
            socks.append(sock)
    try:
        assert all_closed_by_peer(socks, timeout=6), "a junk handshake outlived identity_timeout"
        stream.check()
        alive(s)
        memory.check()
        lines = attack.check_log(at_least=PEER_LOG_BURST)
        assert any("refused: TLS handshake failed" in line for line in lines)
    finally:
        close_all(socks)
    bystander.send(b"still here")
    assert pty.read(10) == b"still here"


def test_tls_clients_that_never_finish_the_handshake(serve, pty, certs):
    """A real ClientHello, then silence, many times over: each costs one
    socket until identity_timeout, and the bystander is served meanwhile."""
    s, port = serve(pty, *BACKLOG, *certs.server_flags(), "--identity-timeout", "1", "--max-clients", "2")
    bystander = TlsClient(port, certs.client_context())
    admitted(s)
    memory = RssWatch(s.proc)
    attack = Attack(s, "127.0.0.15")
    stream = Bystander(bystander, pty)
    context = certs.client_context()
    stalled = []
    for _ in range(100):
        sock = connect(port, attack.source)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(outgoing.read())      # a genuine ClientHello, and nothing after it
        stalled.append(sock)
    try:
        assert all_closed_by_peer(stalled, timeout=5)
        stream.check()
        alive(s)
        memory.check()
        lines = attack.check_log(at_least=PEER_LOG_BURST)
        assert any("no TLS handshake within 1s" in line for line in lines)
    finally:
        close_all(stalled)


def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning(pty, tmp_path):
    """With the descriptor limit nearly reached, accept() fails with EMFILE:
    sertcp logs it, stops accepting for a moment (no busy loop on the
    still-readable listener) and serves again once descriptors are free."""
    import resource
    from conftest import SERTCP

    port = free_port()
    log_path = tmp_path / "emfile.log"

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(SERTCP), pty.path, "--listen", "127.0.0.1:%d" % port,
                                 "--max-clients", "200", "--backlog", "256"],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    socks = []
    try:
        wait_for(lambda: "listening on" in log_path.read_text(), message="listening")
        for _ in range(80):  # more than the limit: the kernel queues what sertcp cannot accept
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        wait_for(lambda: "cannot accept" in log_path.read_text(), message="EMFILE logged")
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu():
            fields = open("/proc/%d/stat" % proc.pid).read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks
        before, started = cpu(), time.monotonic()
        deadline = started + 2.0
        while time.monotonic() < deadline:
            time.sleep(0.1)  # measuring a span of time, not waiting for a condition
        spent = cpu() - before
        assert spent < 0.5 * (time.monotonic() - started), "sertcp spun: %.2f CPU s in 2 s" % spent
        for s in socks:
            s.close()
        socks = []
        c = Client(port)
        c.send(b"served again")
        assert pty.read(12, timeout=15) == b"served again"
        c.close()
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


PLANTED = """\
import sys
sys.path.insert(0, %r)
import sertcp

def planted(original):
    def client_payload(port, conn, data):
        if b"BOOM" in data:
            raise RuntimeError("a planted bug")
        return original(port, conn, data)
    return client_payload

sertcp.Port.client_payload = planted(sertcp.Port.client_payload)
sys.exit(sertcp.main(sys.argv[1:]))
"""


def test_a_bug_met_on_one_connection_closes_only_that_connection(pty, tmp_path):
    """sertcp with a bug planted in its client-data path (the real process,
    patched by a wrapper): the client that meets it is disconnected with
    the traceback logged, while the bystander's stream, the device and the
    process go on; /status and /metrics count it."""
    from conftest import ROOT, http_get
    wrapper = tmp_path / "planted.py"
    wrapper.write_text(PLANTED % str(ROOT))
    port, status = free_port(), free_port()
    log_path = tmp_path / "planted.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(wrapper), pty.path, "--listen", "127.0.0.1:%d" % port,
                                 "--max-clients", "3", "--send-to", "first",   # the victim never reads
                                 "--status", "127.0.0.1:%d" % status],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "listening on" in log_path.read_text(), message="listening")
        bystander = Client(port)
        sink = DeviceSink(pty)
        wait_for(lambda: "(1 of 3)" in log_path.read_text(), message="the bystander admitted")
        stream = Bystander(bystander, pty)
        victim = Client(port)
        wait_for(lambda: "(2 of 3)" in log_path.read_text(), message="the victim admitted")
        victim.send(b"BOOM")
        assert victim.closed_by_peer()
        stream.check()
        log = log_path.read_text()
        assert "internal error in Connection, which is closed" in log
        assert "RuntimeError: a planted bug" in log and "Traceback" in log
        assert re.search(r"disconnected: internal error: RuntimeError: a planted bug", log)
        bystander.send(b"still heard")
        assert sink.wait(11) == b"still heard"
        sink.stop()
        code, body = http_get(status, "/status")
        assert '"internal_errors": 1' in body
        code, body = http_get(status, "/metrics")
        assert "sertcp_internal_errors_total 1" in body
        bystander.close()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
