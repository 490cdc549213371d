"""Roles and modes: the server, client and mixed (ezTCP "TCP server/client")
roles, failover and back-off between peers, shared listeners that route by
identity ("Common") or by source address ("Fix IP"), virtual ports that dial
out (Real COM style), and sertcp dialing sertcp.

Every test starts the real sertcp.py on pseudo-terminals and talks to it over
loopback.  The remote host that sertcp dials is a listening socket the test
owns (PeerServer), so the test sees exactly what arrives on each connection.
"""
import datetime
import os
import re
import select
import socket
import time
import tty

import pytest

from conftest import Client, closing_factory, free_port, need_ipv6_loopback, Pty

LOCALHOST = "127.0.0.1"


# ---------------------------------------------------------------------------
# helpers: the remote host sertcp dials, and a local program on a virtual port
# ---------------------------------------------------------------------------

class Accepted(Client):
    """A connection sertcp made to a PeerServer; the Client read helpers."""

    def __init__(self, sock, timeout=10.0):
        self.sock = sock
        self.sock.settimeout(timeout)


class PeerServer:
    """A listening socket standing in for the host sertcp dials."""

    def __init__(self, host=LOCALHOST, port=0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = []

    def accept(self, timeout=10.0):
        """The next connection sertcp made, or fail after timeout."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise AssertionError("sertcp did not connect to %s:%d within %.1fs" % (self.host, self.port, timeout))
        sock, _ = self.sock.accept()
        conn = Accepted(sock)
        self.accepted.append(conn)
        return conn

    def no_connection_within(self, seconds):
        """True if no connection arrives within `seconds` (a bounded check)."""
        ready, _, _ = select.select([self.sock], [], [], seconds)
        return not ready

    def close(self):
        for conn in self.accepted:
            conn.close()
        self.sock.close()


class LocalProgram(Pty):
    """A program that opened a virtual port sertcp created: the same
    read/write helpers as a pty master, on the path local programs open."""

    def __init__(self, path):
        self.path = str(path)
        self.master = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.slave = None
        tty.setraw(self.master)

    def close(self):
        try:
            os.close(self.master)
        except OSError:
            pass


@pytest.fixture
def peer_server():
    """peer_server(host=LOCALHOST, port=0): a listener sertcp dials."""
    yield from closing_factory(PeerServer)


@pytest.fixture
def local_programs():
    yield from closing_factory(LocalProgram)


def local_port(client):
    return client.sock.getsockname()[1]


def log_time(line):
    """The timestamp of a log line (logging's asctime, millisecond precision)."""
    stamp = " ".join(line.split(" ", 2)[:2])
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


# ---------------------------------------------------------------------------
# mixed role: the ezTCP "TCP server/client" time chart
# ---------------------------------------------------------------------------

def test_eztcp_time_chart_server_then_client_on_event_bytes(pty, sertcp, clients, peer_server):
    """The application note's chart with Event Byte 10 and the 25 s timeout
    scaled down to 2 s: serve a host, time it out, gather 10 device bytes,
    dial and send them first, refuse a second host, time out, gather again."""
    peer = peer_server()
    port = free_port()
    s = sertcp("--listen", "%s:%d" % (LOCALHOST, port), "--connect", "%s:%d" % (LOCALHOST, peer.port),
               "--event-bytes", "10", "--timeout", "2", pty.path, wait_port=port)
    s.wait_log(r"\[cli\] gathering: dialing once 10 bytes")

    # (1) a remote host connects to sertcp, the TCP server
    host = clients(port)
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:%d connected" % local_port(host))
    host.send(b"host->dev")
    assert pty.read(9) == b"host->dev"
    pty.write(b"dev->host 0123456789")      # more than event_bytes: goes to the host, no dial
    assert host.recv(20) == b"dev->host 0123456789"
    last_data = time.monotonic()

    # (2)-(4) no data for `timeout` seconds: sertcp closes the connection
    assert host.closed_by_peer(timeout=6.0)
    assert time.monotonic() - last_data >= 1.7
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:%d disconnected: idle timeout" % local_port(host))
    assert not re.search(r"\] dialing ", s.log())

    # (5) 9 bytes from the device are not enough to dial ...
    pty.write(b"EVENT-123")
    assert peer.no_connection_within(0.5)
    assert not re.search(r"\] dialing ", s.log())
    # ... the 10th makes sertcp dial, and the peer gets exactly those 10 first
    pty.write(b"4")
    conn = peer.accept()
    assert conn.recv(10) == b"EVENT-1234"
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % peer.port)
    assert conn.recv_available(0.2) == b""

    # (6) data in both directions
    conn.send(b"peer->dev")
    assert pty.read(9) == b"peer->dev"
    pty.write(b"dev->peer")
    assert conn.recv(9) == b"dev->peer"

    # one connection at a time: a host connecting meanwhile is refused
    intruder = clients(port)
    assert intruder.closed_by_peer(timeout=5.0)
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:%d rejected: 1 of 1 clients connected" % local_port(intruder))
    conn.send(b"still up")
    assert pty.read(8) == b"still up"

    # the dialed connection times out as well, and the port gathers again
    assert conn.closed_by_peer(timeout=6.0)
    s.wait_log(r"\[cli\] peer 127\.0\.0\.1:%d disconnected: idle timeout" % peer.port)
    s.wait_log(r"\[cli\] gathering: dialing again once 10 bytes")
    # ... and serves again
    host2 = clients(port)
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:%d connected" % local_port(host2))
    host2.send(b"again")
    assert pty.read(5) == b"again"
    assert len(re.findall(r"\] dialing ", s.log())) == 1


def test_event_bytes_burst_longer_than_event_bytes_arrives_whole(pty, sertcp, peer_server):
    """ezTCP sends the data that made it dial ("Data #3"); a 15-byte message
    with event_bytes 10 must reach the peer whole, not cut after 10 bytes."""
    peer = peer_server()
    s = sertcp("--connect", "%s:%d" % (LOCALHOST, peer.port), "--event-bytes", "10", pty.path)
    s.wait_log(r"\[cli\] gathering: dialing once 10 bytes")
    pty.write(b"ALARM zone 7 !!")
    conn = peer.accept()
    assert conn.recv(15, timeout=2.0) == b"ALARM zone 7 !!"


@pytest.mark.parametrize("direction", [
    "net->device",
    "device->net",
])
def test_timeout_counts_data_in_either_direction(direction, pty, sertcp, clients):
    """`timeout` closes a connection with no data in *either* direction: a
    steady trickle one way keeps it open past the timeout."""
    port = free_port()
    s = sertcp("--listen", "%s:%d" % (LOCALHOST, port), "--timeout", "1", pty.path, wait_port=port)
    host = clients(port)
    s.wait_log(r"\[cli\] client .* connected")
    end = time.monotonic() + 2.2          # more than twice the timeout
    while time.monotonic() < end:
        if direction == "net->device":
            host.send(b".")
            assert pty.read(1) == b"."
        else:
            pty.write(b".")
            assert host.recv(1) == b"."
        time.sleep(0.2)                   # the pacing of the traffic, not a wait for sertcp
    assert "idle timeout" not in s.log()
    host.send(b"alive")
    assert pty.read(5) == b"alive"


# ---------------------------------------------------------------------------
# client role
# ---------------------------------------------------------------------------

def test_client_role_dials_at_start_sends_connect_id_and_redials(pty, sertcp, peer_server):
    peer = peer_server()
    s = sertcp("--connect", "%s:%d" % (LOCALHOST, peer.port), "--connect-id", r"dev-7\r\n",
               "--reconnect-min", "0.2", "--reconnect-max", "0.4", "--buffer", "1k", pty.path)

    # event_bytes 0: dial at start, connect_id first
    conn = peer.accept()
    assert conn.recv(7) == b"dev-7\r\n"
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % peer.port)
    conn.send(b"peer->dev")
    assert pty.read(9) == b"peer->dev"
    pty.write(b"dev->peer")
    assert conn.recv(9) == b"dev->peer"
    # stays connected (timeout 0 = never)
    assert not conn.closed_by_peer(timeout=0.5)

    # the peer closes: sertcp redials after reconnect_min and sends its id again
    conn.close()
    s.wait_log(r"\[cli\] peer 127\.0\.0\.1:%d disconnected: closed by peer" % peer.port)
    s.wait_log(r"\[cli\] redialing in 0\.2s")
    conn2 = peer.accept()
    assert conn2.recv(7) == b"dev-7\r\n"
    assert conn2.recv_available(0.2) == b""
    pty.write(b"second")
    assert conn2.recv(6) == b"second"

    # the peer goes away: device data is kept under `buffer` meanwhile ...
    address = peer.port
    peer.close()
    s.wait_log(r"\[cli\] peer 127\.0\.0\.1:%d disconnected" % address, count=2)
    s.wait_log(r"\[cli\] every peer failed")
    pty.write(b"held while offline")
    # ... and delivered after connect_id on the next connection
    peer = peer_server(port=address)
    conn3 = peer.accept(timeout=5.0)
    assert conn3.recv(7 + 18) == b"dev-7\r\nheld while offline"
    conn3.send(b"back")
    assert pty.read(4) == b"back"


def test_failover_to_next_peer_and_first_peer_again_on_next_dial(pty, sertcp, peer_server):
    refusing = free_port()                 # nothing listens here yet
    second = peer_server()
    s = sertcp("--connect", "%s:%d, %s:%d" % (LOCALHOST, refusing, LOCALHOST, second.port),
               "--reconnect-min", "0.1", "--reconnect-max", "0.8", pty.path)
    conn = second.accept()
    # the address is named once: the one configured is the one dialled
    s.wait_log(r"(?m)\[cli\] dial to 127\.0\.0\.1:%d failed: Connection refused$" % refusing)
    s.wait_log(r"\[cli\] dialing 127\.0\.0\.1:%d \(peer 2 of 2\)" % second.port)
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % second.port)
    conn.send(b"via P2")
    assert pty.read(6) == b"via P2"
    pty.write(b"to P2")
    assert conn.recv(5) == b"to P2"

    # the first peer comes up; when the connection to the second ends, the
    # next dial starts from the first peer again
    first = peer_server(port=refusing)
    conn.close()
    conn1 = first.accept()
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % refusing)
    assert s.log().count("dialing 127.0.0.1:%d (peer 1 of 2)" % refusing) == 2
    conn1.send(b"via P1")
    assert pty.read(6) == b"via P1"
    pty.write(b"to P1")
    assert conn1.recv(5) == b"to P1"
    assert second.no_connection_within(0.3)


def test_failover_from_unresolvable_name_to_named_peer(pty, sertcp, peer_server):
    """Names are resolved without blocking the loop; a name that does not
    resolve is a failed peer like a refused one."""
    peer = peer_server()
    s = sertcp("--connect", "no-such-host.invalid:%d, localhost:%d" % (peer.port, peer.port),
               "--connect-id", "named", pty.path)
    conn = peer.accept(timeout=15.0)
    assert conn.recv(5) == b"named"
    s.wait_log(r"\[cli\] dial to no-such-host\.invalid:%d failed: cannot resolve" % peer.port)
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % peer.port)
    pty.write(b"by name")
    assert conn.recv(7) == b"by name"


def test_backoff_doubles_up_to_reconnect_max_and_restarts_after_success(pty, sertcp, peer_server):
    low, high = 0.1, 0.8
    address = free_port()                  # nothing listens here yet
    s = sertcp("--connect", "%s:%d" % (LOCALHOST, address),
               "--reconnect-min", str(low), "--reconnect-max", str(high), pty.path)
    s.wait_log(r"every peer failed \(6 rounds in a row\)", timeout=10.0)

    failed = re.compile(r"\[cli\] every peer failed \((\d+) rounds? in a row\); next dial in ([\d.]+)s")
    rounds = [(int(m.group(1)), float(m.group(2))) for m in failed.finditer(s.log())]
    assert [r for r, _ in rounds[:6]] == [1, 2, 3, 4, 5, 6]
    for failures, delay in rounds[:6]:
        base = min(high, low * 2 ** (failures - 1))
        # doubling, capped, with up to 20% jitter taken off, never below reconnect_min
        assert max(low, base * 0.8) - 0.005 <= delay <= base + 0.005, (failures, delay)
    assert rounds[0][1] == pytest.approx(low, abs=0.005)
    assert rounds[4][1] >= high * 0.8 - 0.005

    # the pause really is kept before the next dial
    lines = s.log().splitlines()
    for i, line in enumerate(lines):
        m = failed.search(line)
        if not m or int(m.group(1)) >= 6:
            continue
        following = next(x for x in lines[i + 1:] if "] dialing " in x)
        assert log_time(following) - log_time(line) >= float(m.group(2)) - 0.02, (line, following)

    # a success resets the back-off: the next failure waits reconnect_min again
    peer = peer_server(port=address)
    conn = peer.accept(timeout=5.0)
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % address)
    conn.send(b"hello")                    # a peer that speaks: a real session
    assert pty.read(5) == b"hello"
    peer.close()
    conn.close()
    s.wait_log(r"\[cli\] redialing in 0\.1s")
    s.wait_log(r"every peer failed \(1 round in a row\); next dial in 0\.10s")


def test_peer_that_accepts_and_closes_at_once_gets_backoff(pty, sertcp, peer_server):
    """A peer that accepts and hangs up without a word (a full server, a
    gateway with nothing behind it) is not redialed every reconnect_min."""
    peer = peer_server()
    s = sertcp("--connect", "%s:%d" % (LOCALHOST, peer.port),
               "--reconnect-min", "0.1", "--reconnect-max", "0.8", pty.path)
    for _ in range(4):
        peer.accept(timeout=10.0).close()
    s.wait_log(r"every peer failed \(4 rounds in a row\); next dial in", timeout=10.0)
    # (after the half-close grace: the peer might still have been reading)
    assert re.search(r"closed the connection after 0\.[0-6]s without sending anything", s.log())
    delays = [float(m) for m in re.findall(r"every peer failed \(\d+ rounds? in a row\); next dial in ([\d.]+)s", s.log())]
    assert delays[0] == pytest.approx(0.1, abs=0.005) and delays[3] >= 0.8 * 0.8 - 0.005, delays
    assert s.proc.poll() is None


def test_ipv6_connect(pty, sertcp, peer_server):
    need_ipv6_loopback()
    peer = peer_server(host="::1")
    s = sertcp("--connect", "[::1]:%d" % peer.port, "--connect-id", "v6", pty.path)
    conn = peer.accept()
    assert conn.recv(2) == b"v6"
    s.wait_log(r"\[cli\] connected to \[::1\]:%d" % peer.port)
    conn.send(b"over v6")
    assert pty.read(7) == b"over v6"
    pty.write(b"back over v6")
    assert conn.recv(12) == b"back over v6"


# ---------------------------------------------------------------------------
# shared listeners: IOT-Tree "Common" (identity) and "Fix IP" (source address)
# ---------------------------------------------------------------------------

def test_common_identity_routes_each_client_to_its_port(pty_factory, sertcp, clients):
    ptys = [pty_factory() for _ in range(3)]
    port = free_port()
    listener = r"\[listen 127\.0\.0\.1:%d\]" % port
    s = sertcp(config="""
[DEFAULT]
listen = 127.0.0.1:%d
identity_timeout = 1

[dev1]
device = %s
identity = c0001

[dev2]
device = %s
identity = c0002

[dev3]
device = %s
identity = c0003
""" % (port, ptys[0].path, ptys[1].path, ptys[2].path))
    s.wait_log(r"listening on .*:%d \(shared with" % port, count=3)

    # LF-ended id; bytes after it in the same segment go to the device
    c1 = clients(port)
    c1.send(b"c0001\nhello dev1")
    assert ptys[0].read(10) == b"hello dev1"
    s.wait_log(r"\[dev1\] client 127\.0\.0\.1:%d connected" % local_port(c1))
    # CR LF-ended id
    c2 = clients(port)
    c2.send(b"c0002\r\n")
    s.wait_log(r"\[dev2\] client 127\.0\.0\.1:%d connected" % local_port(c2))
    c2.send(b"hello dev2")
    assert ptys[1].read(10) == b"hello dev2"
    # an id ended by a pause, no newline
    c3 = clients(port)
    c3.send(b"c0003")
    s.wait_log(r"\[dev3\] client 127\.0\.0\.1:%d connected" % local_port(c3))
    c3.send(b"hello dev3")
    assert ptys[2].read(10) == b"hello dev3"

    # each device answers its own client only, and no id reached a device
    for i, (p, c) in enumerate(zip(ptys, (c1, c2, c3)), 1):
        p.write(b"from dev%d" % i)
        assert c.recv(9) == b"from dev%d" % i
    for p in ptys:
        assert p.read_available(0.1) == b""
    for c in (c1, c2, c3):
        assert c.recv_available(0.1) == b""

    # an unknown id is refused
    c9 = clients(port)
    c9.send(b"c0009\n")
    assert c9.closed_by_peer(timeout=5.0)
    s.wait_log(listener + r" client 127\.0\.0\.1:%d refused: unknown id 'c0009'" % local_port(c9))

    # an id split across two TCP segments
    c2_port = local_port(c2)
    c2.close()
    s.wait_log(r"\[dev2\] client 127\.0\.0\.1:%d disconnected" % c2_port)
    split = clients(port)
    split.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    split.send(b"c00")
    time.sleep(0.05)                      # shapes the traffic into two segments (< the 200 ms pause)
    split.send(b"02\nsplit")
    assert ptys[1].read(5) == b"split"
    ptys[1].write(b"ok")
    assert split.recv(2) == b"ok"

    # a client that sends nothing is closed after identity_timeout
    silent = clients(port)
    started = time.monotonic()
    assert silent.closed_by_peer(timeout=5.0)
    assert 0.8 <= time.monotonic() - started <= 3.0
    s.wait_log(listener + r" client 127\.0\.0\.1:%d refused: no id within 1s \(identity_timeout\)"
               % local_port(silent))
    # the ports are unaffected
    c1.send(b"still")
    assert ptys[0].read(5) == b"still"


def test_fix_ip_routes_by_source_address_with_per_port_policies(pty_factory, sertcp, clients):
    two, three = pty_factory(), pty_factory()
    port = free_port()
    s = sertcp(config="""
[from2]
device = %s
listen = 127.0.0.1:%d
allow = 127.0.0.2
max_clients = 1

[from3]
device = %s
listen = 127.0.0.1:%d
allow = 127.0.0.3
max_clients = 2
""" % (two.path, port, three.path, port))
    s.wait_log(r"listening on .*:%d \(shared with .*by source address\)" % port, count=2)

    a = clients(port, source="127.0.0.2")
    s.wait_log(r"\[from2\] client 127\.0\.0\.2:%d connected \(1 of 1\)" % local_port(a))
    b1 = clients(port, source="127.0.0.3")
    b2 = clients(port, source="127.0.0.3")
    s.wait_log(r"\[from3\] client 127\.0\.0\.3:%d connected \(2 of 2\)" % local_port(b2))

    a.send(b"from .2")
    assert two.read(7) == b"from .2"
    b1.send(b"from .3")
    assert three.read(7) == b"from .3"
    assert two.read_available(0.1) == b""
    three.write(b"to both .3")
    assert b1.recv(10) == b"to both .3"
    assert b2.recv(10) == b"to both .3"
    two.write(b"to .2")
    assert a.recv(5) == b"to .2"
    assert b1.recv_available(0.1) == b""

    # each port keeps its own max_clients
    a2 = clients(port, source="127.0.0.2")
    assert a2.closed_by_peer(timeout=5.0)
    s.wait_log(r"\[from2\] client 127\.0\.0\.2:%d rejected: 1 of 1 clients connected" % local_port(a2))

    # an address no port allows is refused by the listener
    stranger = clients(port, source="127.0.0.4")
    assert stranger.closed_by_peer(timeout=5.0)
    s.wait_log(r"\[listen 127\.0\.0\.1:%d\] client 127\.0\.0\.4:%d refused: address not allowed"
               % (port, local_port(stranger)))
    a.send(b"ok")
    assert two.read(2) == b"ok"


def test_fix_ip_port_reachable_beside_a_common_port(pty_factory, sertcp, clients):
    """A listener shared by a Fix IP port (allow) and a Common port
    (identity, any address): a client from the fixed address belongs to its
    port at once, as IOT-Tree's Fix IP does, with no id to send."""
    fixed, common = pty_factory(), pty_factory()
    port = free_port()
    s = sertcp(config="""
[fixed]
device = %s
listen = 127.0.0.1:%d
allow = 127.0.0.2

[common]
device = %s
listen = 127.0.0.1:%d
identity = c0001
identity_timeout = 1
""" % (fixed.path, port, common.path, port))
    s.wait_log(r"listening on .*:%d \(shared with" % port, count=2)
    by_id = clients(port, source="127.0.0.3")
    by_id.send(b"c0001\nvia id")
    assert common.read(6) == b"via id"
    by_address = clients(port, source="127.0.0.2")
    by_address.send(b"modbus frame")
    assert fixed.read(12, timeout=2.0) == b"modbus frame"


# ---------------------------------------------------------------------------
# virtual ports on the client side; sertcp dialing sertcp
# ---------------------------------------------------------------------------

def test_virtual_port_dials_out_real_com_style(tmp_path, sertcp, peer_server, local_programs):
    peer = peer_server()
    path = tmp_path / "ttyREALCOM0"
    s = sertcp("--virtual", path, "--connect", "%s:%d" % (LOCALHOST, peer.port))
    conn = peer.accept()
    s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % peer.port)
    s.wait_log(r"\[cli\] device .*ttyREALCOM0 opened")
    program = local_programs(path)
    s.wait_log(r"\[cli\] virtual port .* opened by a local program")
    program.write(b"AT+PING\r")
    assert conn.recv(8) == b"AT+PING\r"
    conn.send(b"\r\nPONG\r\n")
    assert program.read(8) == b"\r\nPONG\r\n"
    every_byte = bytes(range(256))
    program.write(every_byte)
    assert conn.recv(256) == every_byte
    conn.send(every_byte[::-1])
    assert program.read(256) == every_byte[::-1]


def test_sertcp_dials_sertcp_shared_listener_with_virtual_ports(tmp_path, pty_factory, sertcp, local_programs):
    """A central sertcp whose listener routes by id to virtual ports, and
    device-side sertcps that dial it with connect_id: end to end, each
    device's serial line reaches its own virtual port, every byte value."""
    port = free_port()
    central = sertcp(config="""
[site1]
virtual = %s
listen = 127.0.0.1:%d
identity = site-1

[site2]
virtual = %s
listen = 127.0.0.1:%d
identity = site-2
""" % (tmp_path / "ttySITE1", port, tmp_path / "ttySITE2", port))
    central.wait_log(r"listening on .*:%d" % port, count=2)
    central.wait_log(r"device .*ttySITE\d opened", count=2)
    site1 = local_programs(tmp_path / "ttySITE1")
    site2 = local_programs(tmp_path / "ttySITE2")

    line1, line2 = pty_factory(), pty_factory()
    device1 = sertcp("--connect", "127.0.0.1:%d" % port, "--connect-id", r"site-1\n", line1.path)
    device2 = sertcp("--connect", "127.0.0.1:%d" % port, "--connect-id", r"site-2\r\n", line2.path)
    device1.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % port)
    device2.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % port)
    central.wait_log(r"\[site1\] client 127\.0\.0\.1:\d+ connected")
    central.wait_log(r"\[site2\] client 127\.0\.0\.1:\d+ connected")

    every_byte = bytes(range(256)) * 4
    line1.write(every_byte)
    assert site1.read(len(every_byte)) == every_byte
    site1.write(every_byte[::-1])
    assert line1.read(len(every_byte)) == every_byte[::-1]
    line2.write(b"\x00\xffsite two\r\n")
    assert site2.read(12) == b"\x00\xffsite two\r\n"
    site2.write(b"\x11\x13\x7f\x03")      # XON, XOFF, DEL, ^C pass through raw
    assert line2.read(4) == b"\x11\x13\x7f\x03"
    assert site1.read_available(0.1) == b""
    assert line1.read_available(0.1) == b""


def test_virtual_port_dials_only_while_a_program_has_it_open(tmp_path, sertcp, peer_server, local_programs):
    """Real COM with listen_on_open: opening the virtual port makes the
    connection, closing it hangs up, opening it again dials again."""
    peer = peer_server()
    path = tmp_path / "ttyONDEMAND"
    s = sertcp("--virtual", path, "--connect", "%s:%d" % (LOCALHOST, peer.port), "--connect-id", "rc\n",
               "--listen-on-open", "yes", "--reconnect-min", "0.1")
    s.wait_log(r"\[cli\] device .*ttyONDEMAND opened")
    assert peer.no_connection_within(0.5)
    for round in (1, 2):
        program = local_programs(path)
        conn = peer.accept()
        assert conn.recv(3) == b"rc\n"
        program.write(b"open %d" % round)
        assert conn.recv(6) == b"open %d" % round
        conn.send(b"ack")
        assert program.read(3) == b"ack"
        program.close()
        assert conn.closed_by_peer(timeout=5.0)
        s.wait_log(r"\[cli\] peer 127\.0\.0\.1:%d disconnected: virtual port closed" % peer.port, count=round)
    assert peer.no_connection_within(0.5)
