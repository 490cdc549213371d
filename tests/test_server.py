"""The server role: one serial device shared by TCP clients.

Each test starts the real sertcp.py on a pseudo-terminal (or a pyserial
loop:// URL, or a virtual port) and talks to it over loopback: bytes both
ways, the send_to / receive_from policies, max_clients, the banner, the
buffer for the next client, the idle timeout, IPv6, modem lines, the
virtual port and a clean shutdown."""
import fcntl
import os
import random
import re
import signal
import socket
import struct
import termios
import time

import pytest

from conftest import Background, free_port, log_count, need_ipv6_loopback, random_bytes, wait_for

CONNECTED = r"\[cli\] client \S+ connected"
DISCONNECTED = r"\[cli\] client \S+ disconnected"


# --- helpers ---------------------------------------------------------------

def join(s, clients, port, n=1, **kw):
    """Connect n clients one after another, each admitted before the next
    connects, so that oldest/newest are known."""
    joined = []
    for _ in range(n):
        before = log_count(s, CONNECTED)
        joined.append(clients(port, **kw))
        s.wait_log(CONNECTED, count=before + 1)
    return joined


def leave(s, client):
    before = log_count(s, DISCONNECTED)
    client.close()
    s.wait_log(DISCONNECTED, count=before + 1)


def unread(pty):
    """Bytes written to the device that nobody has read from it yet."""
    return struct.unpack("i", fcntl.ioctl(pty.slave, termios.FIONREAD, b"\0\0\0\0"))[0]


def consumed(s, pty, pattern):
    """Wait until sertcp logged `pattern` about the data just written to the
    pty and has read everything from it.  (The log line proves the write
    reached the line discipline, where FIONREAD can see it.)"""
    s.wait_log(pattern)
    wait_for(lambda: unread(pty) == 0, 5, message="sertcp to read the device")


def payload(n, seed=0):
    """n bytes holding every byte value (for n >= 256) in a random order."""
    if n >= 256:
        base = bytes(range(256))
        return base + random_bytes(random.Random(seed), n - 256)
    return random_bytes(random.Random(seed), n)


def nothing_for(*who, wait=0.2):
    """None of the clients received anything within `wait` seconds."""
    return all(c.recv_available(wait) == b"" for c in who)


# --- bytes both ways, unchanged ---------------------------------------------

SIZES = [1, 255, 4096, 65536, 1 << 20, 4 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_device_to_client_unchanged(serve, pty, clients, size):
    s, port = serve(pty.path)
    c, = join(s, clients, port)
    data = payload(size)
    writer = Background(pty.write, data)
    assert c.recv(size, timeout=30) == data
    writer.join()
    assert nothing_for(c)


@pytest.mark.parametrize("size", SIZES)
def test_client_to_device_unchanged(serve, pty, clients, size):
    s, port = serve(pty.path)
    c, = join(s, clients, port)
    data = payload(size, seed=1)
    sender = Background(c.send, data)
    assert pty.read(size, timeout=30) == data
    sender.join()
    assert pty.read_available(0.2) == b""


def test_every_byte_value_alone_both_ways(serve, pty, clients):
    s, port = serve(pty.path)
    c, = join(s, clients, port)
    for value in range(256):
        byte = bytes([value])
        pty.write(byte)
        assert c.recv(1) == byte
        c.send(byte)
        assert pty.read(1) == byte


def test_both_directions_at_once(serve, pty, clients):
    s, port = serve(pty.path)
    c, = join(s, clients, port)
    down, up = payload(1 << 20, seed=2), payload(1 << 20, seed=3)
    writer = Background(pty.write, down)
    sender = Background(c.send, up)
    received = []
    from_device = Background(lambda: received.append(c.recv(len(down), timeout=30)))
    assert pty.read(len(up), timeout=30) == up
    from_device.join()
    writer.join()
    sender.join()
    assert received == [down]


# --- send_to: which clients get device data ------------------------------------

def test_send_to_all(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--send-to", "all")
    a, b, c = join(s, clients, port, 3)
    pty.write(b"to everyone")
    for client in (a, b, c):
        assert client.recv(11) == b"to everyone"


def test_send_to_first_is_the_oldest_client(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--send-to", "first")
    a, b, c = join(s, clients, port, 3)
    pty.write(b"one")
    assert a.recv(3) == b"one"
    assert nothing_for(b, c)
    leave(s, a)  # b is now the oldest
    pty.write(b"two")
    assert b.recv(3) == b"two"
    assert nothing_for(c)


def test_send_to_last_is_the_newest_client(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--send-to", "last")
    a, b, c = join(s, clients, port, 3)
    pty.write(b"one")
    assert c.recv(3) == b"one"
    assert nothing_for(a, b)
    leave(s, c)  # b is now the newest
    pty.write(b"two")
    assert b.recv(3) == b"two"
    assert nothing_for(a)


def test_send_to_last_active_is_the_client_that_sent_last(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--send-to", "last_active")
    a, b, c = join(s, clients, port, 3)
    pty.write(b"1")  # nobody has sent yet: the newest
    assert c.recv(1) == b"1"
    assert nothing_for(a, b)
    b.send(b"b")
    assert pty.read(1) == b"b"
    pty.write(b"2")
    assert b.recv(1) == b"2"
    assert nothing_for(a, c)
    a.send(b"a")
    assert pty.read(1) == b"a"
    pty.write(b"3")
    assert a.recv(1) == b"3"
    assert nothing_for(b, c)
    leave(s, a)  # the active client left: back to the newest
    pty.write(b"4")
    assert c.recv(1) == b"4"
    assert nothing_for(b)


def test_send_to_none_drops_device_data_and_says_so(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "2", "--send-to", "none")
    a, b = join(s, clients, port, 2)
    pty.write(b"nobody")
    s.wait_log(r"\[cli\] dropped 6 bytes: send_to = none")
    assert nothing_for(a, b)
    a.send(b"still heard")
    assert pty.read(11) == b"still heard"


# --- receive_from: whose data goes to the device --------------------------------

def three_send(a, b, c):
    for client, data in ((a, b"from a;"), (b, b"from b;"), (c, b"from c;")):
        client.send(data)


def test_receive_from_all(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--receive-from", "all")
    a, b, c = join(s, clients, port, 3)
    for client, data in ((a, b"from a;"), (b, b"from b;"), (c, b"from c;")):
        client.send(data)
        assert pty.read(len(data)) == data


def test_receive_from_first_hears_only_the_oldest_client(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--receive-from", "first")
    a, b, c = join(s, clients, port, 3)
    three_send(a, b, c)
    assert pty.read(7) == b"from a;"
    s.wait_log(r"dropped \d+ bytes: receive_from = first ignores")
    assert pty.read_available(0.3) == b""
    pty.write(b"all hear")  # send_to is still all
    for client in (a, b, c):
        assert client.recv(8) == b"all hear"
    leave(s, a)  # b is now the oldest
    c.send(b"from c;")
    b.send(b"from b;")
    assert pty.read(7) == b"from b;"
    assert pty.read_available(0.3) == b""


def test_receive_from_last_hears_only_the_newest_client(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--receive-from", "last")
    a, b, c = join(s, clients, port, 3)
    three_send(a, b, c)
    assert pty.read(7) == b"from c;"
    assert pty.read_available(0.3) == b""
    leave(s, c)  # b is now the newest
    a.send(b"from a;")
    b.send(b"from b;")
    assert pty.read(7) == b"from b;"
    assert pty.read_available(0.3) == b""
    d, = join(s, clients, port)  # and now d
    three_send(a, b, d)
    assert pty.read(7) == b"from c;"  # three_send's third sender is d
    assert pty.read_available(0.3) == b""


def test_receive_from_last_active_accepts_every_sender(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--receive-from", "last_active")
    a, b, c = join(s, clients, port, 3)
    for client, data in ((b, b"b first;"), (a, b"then a;"), (c, b"then c;"), (b, b"b again;")):
        client.send(data)
        assert pty.read(len(data)) == data


def test_last_active_both_ways_answers_whoever_asked(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3",
                    "--receive-from", "last_active", "--send-to", "last_active")
    a, b, c = join(s, clients, port, 3)
    for asker, others in ((b, (a, c)), (a, (b, c)), (c, (a, b)), (b, (a, c))):
        asker.send(b"?")
        assert pty.read(1) == b"?"
        pty.write(b"answer")
        assert asker.recv(6) == b"answer"
        assert nothing_for(*others)


def test_receive_from_none_ignores_every_client(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "3", "--receive-from", "none")
    a, b, c = join(s, clients, port, 3)
    three_send(a, b, c)
    s.wait_log(r"dropped \d+ bytes: receive_from = none")
    assert pty.read_available(0.3) == b""
    pty.write(b"still sent")
    for client in (a, b, c):
        assert client.recv(10) == b"still sent"


# --- max_clients and when_full ---------------------------------------------------

def test_max_clients_reject_closes_the_newest(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "2", "--when-full", "reject")
    a, b = join(s, clients, port, 2)
    late = clients(port)
    assert late.closed_by_peer(5)
    s.wait_log(r"\[cli\] client \S+ rejected: 2 of 2 clients connected")
    pty.write(b"kept")
    assert a.recv(4) == b"kept"
    assert b.recv(4) == b"kept"
    b.send(b"ok")
    assert pty.read(2) == b"ok"
    leave(s, a)
    d, = join(s, clients, port)  # room again
    pty.write(b"new")
    assert d.recv(3) == b"new"
    assert b.recv(3) == b"new"


def test_max_clients_kick_oldest_makes_room_for_the_newest(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "2", "--when-full", "kick_oldest")
    a, b, c = join(s, clients, port, 3)
    assert a.closed_by_peer(5)
    s.wait_log(r"\[cli\] client \S+ disconnected: kicked by newer client")
    pty.write(b"data")
    assert b.recv(4) == b"data"
    assert c.recv(4) == b"data"
    c.send(b"up")
    assert pty.read(2) == b"up"


def test_max_clients_default_is_one(serve, pty, clients):
    s, port = serve(pty.path)
    a, = join(s, clients, port)
    assert clients(port).closed_by_peer(5)
    pty.write(b"x")
    assert a.recv(1) == b"x"


# --- banner -----------------------------------------------------------------------

def test_banner_greets_every_client_first(serve, pty, clients):
    s, port = serve(pty.path, "--max-clients", "2", "--banner", r"Welcome\r\n\x00\xff")
    banner = b"Welcome\r\n\x00\xff"
    a, = join(s, clients, port)
    assert a.recv(len(banner)) == banner
    b, = join(s, clients, port)
    assert b.recv(len(banner)) == banner
    pty.write(b"data")
    assert a.recv(4) == b"data"
    assert b.recv(4) == b"data"


# --- buffer: device data held for the next client ----------------------------------

def test_no_buffer_discards_data_while_nobody_is_connected(serve, pty, clients):
    s, port = serve(pty.path)
    pty.write(b"lost")
    consumed(s, pty, r"dropped 4 bytes: no client connected")
    c, = join(s, clients, port)
    pty.write(b"kept")
    assert c.recv(4) == b"kept"


def test_buffer_drop_newest_keeps_the_first_bytes_for_the_next_client(serve, pty, clients):
    s, port = serve(pty.path, "--buffer", "10", "--buffer-drop", "newest",
                    "--banner", r"hi\n", "--max-clients", "2")
    pty.write(b"0123456789ABCDEF")
    consumed(s, pty, r"dropped \d+ bytes: buffer of 10 bytes full \(buffer_drop = newest\)")
    a, = join(s, clients, port)
    assert a.recv(13) == b"hi\n0123456789"
    assert a.recv_available() == b""            # ABCDEF were the newest: dropped
    s.wait_log(r"delivering 10 buffered bytes")
    b, = join(s, clients, port)  # the buffer went to the first client only
    assert b.recv(3) == b"hi\n"
    assert b.recv_available() == b""


def test_buffer_drop_oldest_keeps_the_last_bytes_for_the_next_client(serve, pty, clients):
    s, port = serve(pty.path, "--buffer", "10", "--buffer-drop", "oldest", "--banner", r"hi\n")
    pty.write(b"0123456789ABCDEF")
    consumed(s, pty, r"dropped \d+ bytes: buffer of 10 bytes full \(buffer_drop = oldest\)")
    c, = join(s, clients, port)
    assert c.recv(13) == b"hi\n6789ABCDEF"
    pty.write(b"live")
    assert c.recv(4) == b"live"


def test_buffer_of_a_megabyte_is_delivered_intact(serve, pty, clients):
    s, port = serve(pty.path, "--buffer", "1m")
    data = payload((1 << 20) + 1, seed=4)
    pty.write(data)
    consumed(s, pty, r"dropped 1 bytes: buffer of 1048576 bytes full")
    c, = join(s, clients, port)
    assert c.recv(1 << 20, timeout=20) == data[:1 << 20]
    assert nothing_for(c)


def test_buffer_fills_again_after_the_client_leaves(serve, pty, clients):
    s, port = serve(pty.path, "--buffer", "64k")
    a, = join(s, clients, port)
    leave(s, a)
    pty.write(b"while away" + b"x" * 65536)
    consumed(s, pty, r"dropped 10 bytes: buffer of 65536 bytes full")
    b, = join(s, clients, port)
    assert b.recv(65536) == b"while away" + b"x" * (65536 - 10)


# --- timeout: idle connections are closed ------------------------------------------

def test_idle_client_is_closed_after_timeout(serve, pty, clients):
    s, port = serve(pty.path, "--timeout", "0.5")
    started = time.monotonic()
    c, = join(s, clients, port)
    assert c.closed_by_peer(5)
    assert time.monotonic() - started >= 0.45
    s.wait_log(r"disconnected: idle timeout")
    again, = join(s, clients, port)  # the port accepts again
    pty.write(b"x")
    assert again.recv(1) == b"x"


def test_client_data_keeps_the_connection_open(serve, pty, clients):
    s, port = serve(pty.path, "--timeout", "0.6")
    c, = join(s, clients, port)
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        c.send(b".")
        assert pty.read(1) == b"."
        time.sleep(0.15)  # the pace of a chatty client, not a wait for sertcp
    assert "idle timeout" not in s.log()
    assert c.closed_by_peer(5)
    s.wait_log(r"disconnected: idle timeout")


def test_device_data_keeps_the_connection_open(serve, pty, clients):
    s, port = serve(pty.path, "--timeout", "0.6")
    c, = join(s, clients, port)
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        pty.write(b".")
        assert c.recv(1) == b"."
        time.sleep(0.15)  # the pace of a chatty device, not a wait for sertcp
    assert "idle timeout" not in s.log()


# --- IPv6 -------------------------------------------------------------------------

def test_listen_on_ipv6_loopback(sertcp, pty, clients):
    need_ipv6_loopback()
    port = free_port("::1")
    s = sertcp("--listen", "[::1]:%d" % port, pty.path)
    s.wait_log(r"\[cli\] listening on \[::1\]:%d" % port)
    s.wait_log(r"\[cli\] device \S+ opened")
    c = clients(port, host="::1")
    s.wait_log(r"\[cli\] client \[::1\]:\d+ connected")
    pty.write(b"over v6")
    assert c.recv(7) == b"over v6"
    c.send(b"back")
    assert pty.read(4) == b"back"


def test_a_bare_port_listens_on_ipv4_and_ipv6(sertcp, pty, clients):
    need_ipv6_loopback()
    with socket.socket(socket.AF_INET6) as probe:  # a port free on every address
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    s = sertcp("--listen", str(port), "--max-clients", "2", pty.path)
    s.wait_log(r"\[cli\] listening on .*:%d" % port)
    s.wait_log(r"\[cli\] device \S+ opened")
    v4 = clients(port)
    s.wait_log(CONNECTED)
    v6 = clients(port, host="::1")
    s.wait_log(CONNECTED, count=2)
    pty.write(b"both")
    assert v4.recv(4) == b"both"
    assert v6.recv(4) == b"both"


# --- DTR / RTS ------------------------------------------------------------------

def test_dtr_and_rts_follow_clients_on_a_loop_device(serve, clients):
    s, port = serve("loop://", "--dtr-active", "on", "--rts-active", "off",
                    "--dtr-idle", "off", "--rts-idle", "on")
    # loop:// reports DSR = DTR and CTS = RTS, so the read-back proves the lines
    idle = r"\[cli\] lines DTR=off RTS=on; device reports CTS=on, DSR=off"
    active = r"\[cli\] lines DTR=on RTS=off; device reports CTS=off, DSR=on"
    s.wait_log(idle)
    c, = join(s, clients, port)
    s.wait_log(active)
    c.send(b"echo")
    assert c.recv(4) == b"echo"  # loop:// sends back what it is given
    leave(s, c)
    s.wait_log(idle, count=2)
    c, = join(s, clients, port)
    s.wait_log(active, count=2)


# --- the virtual port -------------------------------------------------------------

def test_virtual_port_opened_by_another_program(sertcp, clients, tmp_path):
    import serial
    path = tmp_path / "ttyV0"
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--virtual", path, wait_port=port)
    s.wait_log(r"\[cli\] device \S+ opened")
    assert path.is_symlink()
    program = serial.Serial(str(path), 115200, timeout=5)
    try:
        s.wait_log(r"\[cli\] virtual port \S+ opened by a local program")
        c, = join(s, clients, port)
        c.send(b"to the program")
        assert program.read(14) == b"to the program"
        data = payload(65536, seed=5)
        program.write(data)
        assert c.recv(len(data)) == data
        up = payload(65536, seed=6)
        sender = Background(c.send, up)
        got = bytearray()
        while len(got) < len(up):
            chunk = program.read(len(up) - len(got))
            assert chunk, "virtual port read timed out after %d bytes" % len(got)
            got += chunk
        sender.join()
        assert bytes(got) == up
    finally:
        program.close()


def test_virtual_port_with_plain_os_open(sertcp, clients, tmp_path):
    path = tmp_path / "ttyV1"
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--virtual", path, wait_port=port)
    s.wait_log(r"\[cli\] device \S+ opened")
    fd = os.open(str(path), os.O_RDWR | os.O_NOCTTY)
    try:
        s.wait_log(r"virtual port \S+ opened by a local program")
        c, = join(s, clients, port)
        os.write(fd, b"hello")
        assert c.recv(5) == b"hello"
    finally:
        os.close(fd)


def _cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_strict_baud_paces_both_ways_without_spinning(sertcp, clients, tmp_path):
    """strict_baud: bytes cross a virtual port no faster than the baud rate
    the local program set (9600: 960 bytes/s), both ways, and sertcp sleeps
    while it waits for the line (it once spun a core the whole time)."""
    import serial
    path = tmp_path / "ttyVB"
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--virtual", path, "--strict-baud", "yes",
               "--baudrate", "115200", wait_port=port)
    s.wait_log(r"\[cli\] device \S+ opened")
    program = serial.Serial(str(path), 9600, timeout=10)
    try:
        s.wait_log(r"virtual port \S+ opened by a local program")
        c, = join(s, clients, port)
        n = 1440                              # 1.5 s at 9600 baud, 8N1
        for direction in ("to the program", "from the program"):
            data = payload(n, seed=len(direction))
            cpu0, t0 = _cpu_seconds(s.proc.pid), time.monotonic()
            if direction == "to the program":
                c.send(data)
                assert program.read(n) == data
            else:
                program.write(data)
                assert c.recv(n, timeout=20) == data
            took, cpu = time.monotonic() - t0, _cpu_seconds(s.proc.pid) - cpu0
            assert took >= 1.2, "%s: %d bytes in %.2fs, faster than 9600 baud" % (direction, n, took)
            assert cpu < 0.5 * took, "%s: sertcp used %.2f CPU s in %.2fs" % (direction, cpu, took)
    finally:
        program.close()


def test_sigterm_removes_the_virtual_symlink_and_exits_0(sertcp, clients, tmp_path):
    path = tmp_path / "ttyV2"
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--virtual", path, wait_port=port)
    s.wait_log(r"\[cli\] device \S+ opened")
    assert path.is_symlink()
    c, = join(s, clients, port)
    assert s.stop() == 0
    assert not os.path.lexists(path)
    assert c.closed_by_peer(5)


# --- shutdown --------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_clients_and_exits_0(serve, pty, clients, sig):
    s, port = serve(pty.path)
    c, = join(s, clients, port)
    s.signal(sig)
    assert s.proc.wait(10) == 0
    assert c.closed_by_peer(5)
    assert "stopped" in s.log()


def test_sigterm_writes_out_what_is_queued_for_the_device(serve, pty, clients):
    s, port = serve(pty.path)
    c, = join(s, clients, port)
    data = payload(1 << 20, seed=7)

    def flood():
        try:
            c.send(data)
        except OSError:
            pass  # sertcp stopped reading and closed: expected
    sender = Background(flood)
    # nobody reads the device, so sertcp's queue for it fills up
    wait_for(lambda: struct.unpack("i", fcntl.ioctl(pty.master, termios.FIONREAD, b"\0" * 4))[0] > 0,
             5, message="data waiting on the device")
    s.signal(signal.SIGTERM)
    got = bytearray()
    deadline = time.monotonic() + 10
    while s.proc.poll() is None and time.monotonic() < deadline:
        got += pty.read_available(0.05)        # the device drains while sertcp flushes to it
    assert s.proc.wait(5) == 0
    sender.join()
    accepted = int(re.search(r"disconnected: shutdown; (\d+) bytes in", s.log()).group(1))
    assert accepted > 0
    got += pty.read(max(0, accepted - len(got)))  # what the pty still holds
    assert len(got) == accepted and bytes(got) == data[:accepted]
    assert pty.read_available() == b""
    assert bytes(got) == data[:accepted]
