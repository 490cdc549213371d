"""UDP: udp_listen (datagrams to the device), udp_send_to (each packet of
device data one datagram to each peer: unicast, broadcast, multicast),
udp_reply (answers to the latest sender), with the real process on a pty,
socat and ncat as peers, and the multicast test inside a network namespace
of its own so that no datagram can leave the machine."""
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import (SERTCP, closing_factory, free_port, http_get, need_ipv6_loopback, need_programs, run_sertcp,
                      wait_for)


def udp_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Receiver:
    """A loopback UDP socket that keeps datagram boundaries."""

    def __init__(self, host="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.address = "%s:%d" % (host, self.port)

    def datagram(self, timeout=10.0):
        """(data, source) of the next datagram, or fail."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recvfrom(65536)
        except socket.timeout:
            raise AssertionError("no datagram within %gs" % timeout)

    def datagrams(self, n, timeout=10.0):
        return [self.datagram(timeout)[0] for _ in range(n)]

    def nothing(self, wait=0.5):
        """True if no datagram arrives within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            self.sock.recvfrom(65536)
        except socket.timeout:
            return True
        return False

    def sendto(self, data, port, host="127.0.0.1"):
        self.sock.sendto(data, (host, port))

    def close(self):
        self.sock.close()


@pytest.fixture
def receivers():
    yield from closing_factory(Receiver)


@pytest.fixture
def programs():
    """Popen for peer programs; every one is ended (by its pid) after the test."""
    started = []

    def start(argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(argv, **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_udp(sertcp, pty, *flags):
    """sertcp on pty with these flags; returns it once the device is open
    and the UDP side is up."""
    s = sertcp(*flags, pty.path)
    s.wait_log(r"\[cli\] device \S+ opened")
    if "--udp-listen" in flags:
        s.wait_log(r"\[cli\] listening for UDP on")
    return s


def port_status(status_port, name="cli"):
    _, body = http_get(status_port, "/status")
    return next(p for p in json.loads(body)["ports"] if p["name"] == name)


def file_grows_to(path, size):
    return lambda: os.path.exists(path) and os.path.getsize(path) >= size


# --- configuration ------------------------------------------------------

def test_a_port_with_only_udp_sides_is_valid_and_checked(tmp_path):
    result = run_sertcp(["--check", "/dev/ttyUSB0", "--udp-listen", "10110"])
    assert result.returncode == 0, result.stderr
    assert "udp_listen = 10110" in result.stdout
    result = run_sertcp(["--check", "/dev/ttyUSB0", "--udp-send-to", "127.255.255.255:10110, 239.1.2.3:5000",
                         "--udp-multicast-ttl", "4"])
    assert result.returncode == 0, result.stderr
    assert "udp_send_to = 127.255.255.255:10110, 239.1.2.3:5000" in result.stdout
    assert "udp_multicast_ttl = 4" in result.stdout
    assert "udp_reply = no" in result.stdout


def test_udp_cross_key_rules(tmp_path):
    ini = tmp_path / "udp.ini"
    ini.write_text(textwrap.dedent("""
        [a]
        device = /dev/ttyUSB0
        udp_send_to = 127.0.0.1:9000
        udp_reply = yes
        open_on_demand = yes

        [b]
        device = /dev/ttyUSB1
        udp_listen = 127.0.0.1:9001
        udp_multicast_ttl = 5

        [c]
        device = /dev/ttyUSB2
        udp_listen = 127.0.0.1:9001
        listen = 127.0.0.1:9001

        [d]
        device = /dev/ttyUSB3
        udp_send_to = 9002
    """).lstrip())
    result = run_sertcp(["--check", "-c", ini])
    assert result.returncode == 2
    err = result.stderr
    assert "%s:4: udp_reply: answers datagrams received on udp_listen, which is not set" % ini in err
    assert "%s:5: open_on_demand: opens the device while a TCP client is connected" % ini in err
    assert "%s:10: udp_multicast_ttl: applies to udp_send_to, which is not set" % ini in err
    assert "%s:14: udp_listen: 127.0.0.1:9001 is already port [b]'s udp_listen" % ini in err
    assert "%s:19: udp_send_to: bad value '9002': expected HOST:PORT" % ini in err
    assert "port [d] needs listen or connect (or both), or udp_listen or udp_send_to" in err  # its one side is bad
    assert "6 configuration errors" in err
    # TCP and UDP on the same number are two different ports: no error about [c]'s listen
    assert ":15: listen" not in err
    modbus = run_sertcp(["--check", "/dev/ttyUSB0", "--listen", "502", "--protocol", "modbus", "--udp-listen", "502"])
    assert modbus.returncode == 2 and "UDP carries raw device bytes: remove udp_listen and udp_send_to" in modbus.stderr
    neither = run_sertcp(["--check", "/dev/ttyUSB0"])
    assert neither.returncode == 2 and "needs listen or connect (or both), or udp_listen or udp_send_to" in neither.stderr


# --- unicast, both ways, with socat and ncat -------------------------------

def test_unicast_both_ways_with_socat(sertcp, pty, programs, tmp_path):
    need_programs("socat")
    listen, peer = udp_port(), udp_port()
    out = tmp_path / "recv.out"
    recv = programs(["socat", "-u", "UDP4-RECV:%d,bind=127.0.0.1" % peer, "OPEN:%s,creat,trunc" % out])
    # socat opens its addresses in order: once the file is there, the socket is bound
    wait_for(lambda: os.path.exists(out), message="socat receiving")
    s = start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--udp-send-to", "127.0.0.1:%d" % peer)
    sentence = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
    pty.write(sentence)
    wait_for(file_grows_to(out, len(sentence)), message="the sentence")
    assert out.read_bytes() == sentence
    # UDP -> device
    sender = subprocess.run(["socat", "-u", "-", "UDP4-SENDTO:127.0.0.1:%d" % listen],
                            input=b"to the device\r\n", capture_output=True, timeout=10)
    assert sender.returncode == 0, sender.stderr
    assert pty.read(15) == b"to the device\r\n"
    assert recv.poll() is None and s.proc.poll() is None


def test_ncat_u_gets_the_answer_from_the_port_it_sent_to(sertcp, pty, programs):
    """ncat -u connects its socket: it hears only datagrams from the address
    it sent to, so the answer must leave from udp_listen's socket."""
    need_programs("ncat")
    listen = udp_port()
    start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--udp-reply", "yes")
    nc = programs(["ncat", "-u", "127.0.0.1", str(listen)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    nc.stdin.write(b"AT\r\n")
    nc.stdin.flush()
    assert pty.read(4) == b"AT\r\n"
    pty.write(b"OK\r\n")
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        if select.select([nc.stdout], [], [], 0.2)[0]:
            chunk = os.read(nc.stdout.fileno(), 4 - len(got))
            assert chunk, "ncat ended: %r" % nc.stderr.read()
            got += chunk
    assert got == b"OK\r\n"


# --- every byte value, both ways -----------------------------------------

def test_all_256_byte_values_both_ways(sertcp, pty, programs, tmp_path):
    need_programs("socat")
    listen, peer = udp_port(), udp_port()
    every = bytes(range(256)) * 4
    out = tmp_path / "recv.bin"
    programs(["socat", "-u", "UDP4-RECV:%d,bind=127.0.0.1" % peer, "OPEN:%s,creat,trunc" % out])
    wait_for(lambda: os.path.exists(out), message="socat receiving")
    s = start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--udp-send-to", "127.0.0.1:%d" % peer,
                  "--pack-size", "1024")
    pty.write(every)
    wait_for(file_grows_to(out, 1024), message="1024 bytes")
    assert out.read_bytes() == every
    data = tmp_path / "every.bin"
    data.write_bytes(every)
    sent = subprocess.run(["socat", "-u", "OPEN:%s" % data, "UDP4-SENDTO:127.0.0.1:%d" % listen],
                          capture_output=True, timeout=10)
    assert sent.returncode == 0, sent.stderr
    assert pty.read(1024) == every
    assert s.proc.poll() is None


# --- packing decides the datagrams ----------------------------------------

def test_packing_rules_make_exact_datagram_boundaries(sertcp, pty, receivers):
    r = receivers()
    status = free_port()
    start_udp(sertcp, pty, "--udp-send-to", r.address, "--pack-delimiter", r"\n", "--pack-size", "8",
              "--status", "127.0.0.1:%d" % status)
    pty.write(b"a\nbb\nccc\n0123456789ABCDEF\nxy")
    assert r.datagrams(6) == [b"a\n", b"bb\n", b"ccc\n", b"01234567", b"89ABCDEF", b"\n"]
    assert r.nothing(0.3)       # "xy" waits for its delimiter
    pty.write(b"z\n")
    assert r.datagram()[0] == b"xyz\n"
    st = port_status(status)
    assert st["udp_datagrams_out"] == 7 and st["udp_bytes_out"] == 30
    assert st["bytes_dropped"] == 0


def test_a_packet_longer_than_a_datagram_is_split_and_counted(sertcp, pty, receivers):
    r = receivers()
    status = free_port()
    start_udp(sertcp, pty, "--udp-send-to", r.address, "--pack-size", "100000", "--status", "127.0.0.1:%d" % status)
    data = bytes(i * 7 % 251 for i in range(100000))
    pty.write(data)
    first, second = r.datagrams(2)
    assert (len(first), len(second)) == (65507, 100000 - 65507)
    assert first + second == data
    st = port_status(status)
    assert st["udp_packets_split"] == 1 and st["udp_datagrams_out"] == 2


def test_without_packing_each_device_read_is_one_datagram(sertcp, pty, receivers):
    r = receivers()
    start_udp(sertcp, pty, "--udp-send-to", r.address)
    for line in (b"one", b"two", b"three"):
        pty.write(line)
        assert r.datagram()[0] == line      # each written alone, read alone


# --- broadcast and multicast -----------------------------------------------

def test_broadcast_to_127_255_255_255_reaches_two_receivers(sertcp, pty, programs, tmp_path):
    need_programs("socat")
    peer = udp_port()
    outs = [tmp_path / "b1.out", tmp_path / "b2.out"]
    for out in outs:
        programs(["socat", "-u", "UDP4-RECV:%d,bind=127.255.255.255,reuseaddr" % peer, "OPEN:%s,creat,trunc" % out])
    wait_for(lambda: all(os.path.exists(o) for o in outs), message="both receivers")
    start_udp(sertcp, pty, "--udp-send-to", "127.255.255.255:%d" % peer, "--pack-delimiter", r"\n")
    sentence = b"$GPRMC,081836,A,3751.65,S,14507.36,E*62\r\n"
    pty.write(sentence)
    for out in outs:
        wait_for(file_grows_to(out, len(sentence)), message="the sentence at %s" % out.name)
        assert out.read_bytes() == sentence


NETNS_HELPER = r"""
# runs as the first process of a fresh network namespace: only its own lo,
# with a multicast route, so nothing sent here can leave the machine
import os, signal, socket, subprocess, sys, threading, time
group, port, out1, out2, ttl_out, ready = sys.argv[1:7]
sertcp = sys.argv[7:]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "route", "add", "224.0.0.0/4", "dev", "lo"], check=True)
# a third member of the group reports the hop limit the datagrams carry
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
probe.bind((group, int(port)))
probe.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
probe.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVTTL", 12), 1)  # Linux: 12
def report_ttl():
    _, ancillary, _, _ = probe.recvmsg(65536, 64)
    with open(ttl_out, "w") as f:
        f.write(" ".join(str(data[0]) for level, kind, data in ancillary if kind == socket.IP_TTL))
threading.Thread(target=report_ttl, daemon=True).start()
receivers = [subprocess.Popen(["socat", "-u", "UDP4-RECV:%s,bind=%s,reuseaddr,ip-add-membership=%s:127.0.0.1"
                               % (port, group, group), "OPEN:%s,creat,trunc" % out]) for out in (out1, out2)]
hexgroup = "".join("%02X" % int(x) for x in reversed(group.split(".")))
deadline = time.monotonic() + 10
def members():
    for line in open("/proc/net/igmp"):
        fields = line.split()
        if fields and fields[0] == hexgroup:
            return int(fields[1])
    return 0
while members() < 3:
    assert time.monotonic() < deadline, "receivers did not join %s" % group
    time.sleep(0.02)
server = subprocess.Popen(sertcp)
signal.signal(signal.SIGTERM, lambda *a: server.terminate())
open(ready, "w").close()
code = server.wait()
for r in receivers:
    r.terminate()
    r.wait()
sys.exit(code)
"""


def test_multicast_to_a_group_with_two_receivers_in_a_namespace_of_its_own(pty, tmp_path):
    need_programs("socat", "ip", "unshare")
    assert os.geteuid() == 0, "the multicast test makes a network namespace (unshare --net), which needs root"
    helper = tmp_path / "netns.py"
    helper.write_text(NETNS_HELPER)
    outs = [tmp_path / "m1.out", tmp_path / "m2.out"]
    ttl = tmp_path / "ttl"
    ready = tmp_path / "ready"
    log = tmp_path / "sertcp.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["unshare", "--net", sys.executable, str(helper), "239.1.2.3", "5000",
                                 str(outs[0]), str(outs[1]), str(ttl), str(ready), sys.executable, str(SERTCP),
                                 pty.path, "--udp-send-to", "239.1.2.3:5000", "--udp-multicast-ttl", "3",
                                 "--pack-delimiter", r"\n"], stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, message="namespace ready")
        assert proc.poll() is None, log.read_text()
        wait_for(lambda: "opened" in log.read_text(), message="device opened")
        sentence = b"$GPGLL,4916.45,N,12311.12,W,225444,A\r\n"
        pty.write(sentence)
        for out in outs:
            wait_for(file_grows_to(out, len(sentence)), message="%s hears the group" % out.name)
            assert out.read_bytes() == sentence
        wait_for(lambda: ttl.exists() and ttl.read_text(), message="the probe's report")
        assert ttl.read_text() == "3"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    assert "UDP peer" not in log.read_text()


# --- udp_reply ---------------------------------------------------------------

def test_udp_reply_follows_the_latest_sender_and_expires(sertcp, pty, receivers):
    listen = udp_port()
    status = free_port()
    s = start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--udp-reply", "yes", "--timeout", "2",
                  "--status", "127.0.0.1:%d" % status)
    a, b = receivers(), receivers()
    a.sendto(b"from a\n", listen)
    assert pty.read(7) == b"from a\n"
    pty.write(b"to a\n")
    data, source = a.datagram()
    assert data == b"to a\n" and source == ("127.0.0.1", listen)
    b.sendto(b"from b\n", listen)
    assert pty.read(7) == b"from b\n"
    assert port_status(status)["udp"]["reply_to"]["peer"] == "127.0.0.1:%d" % b.port
    pty.write(b"to b\n")
    assert b.datagram()[0] == b"to b\n"
    assert a.nothing(0.3)
    # b falls silent for `timeout`: answered no more
    wait_for(lambda: port_status(status)["udp"]["reply_to"] is None, timeout=10, message="udp_reply expired")
    s.wait_log(r"udp_reply: 127\.0\.0\.1:%d silent for 2s, no longer answered" % b.port)
    pty.write(b"nobody\n")
    assert b.nothing(0.5) and a.nothing(0.1)
    # a UDP-only port with nobody to send to counts what it could not send
    wait_for(lambda: port_status(status)["bytes_dropped"] == 7, message="counted as dropped")
    st = port_status(status)
    assert st["udp_datagrams_in"] == 2 and st["udp_datagrams_out"] == 2


# --- a gone peer does not stop the others -----------------------------------

def test_a_peer_that_is_gone_is_counted_while_another_keeps_receiving(sertcp, pty, receivers):
    live = receivers()
    gone = udp_port()           # nobody listens there: ICMP port unreachable
    status = free_port()
    s = start_udp(sertcp, pty, "--udp-send-to", "127.0.0.1:%d, %s" % (gone, live.address),
                  "--pack-delimiter", r"\n", "--status", "127.0.0.1:%d" % status)
    lines = [b"line %03d\n" % i for i in range(200)]
    for line in lines:
        pty.write(line)
        assert live.datagram()[0] == line
    st = port_status(status)
    gone_peer, live_peer = st["udp"]["send_to"]
    assert gone_peer["peer"] == "127.0.0.1:%d" % gone
    assert gone_peer["errors"] >= 100 and gone_peer["last_error"] == "Connection refused"
    assert live_peer["errors"] == 0 and live_peer["datagrams_out"] == 200 and live_peer["bytes_out"] == 1800
    assert st["udp_send_errors"] >= 100
    assert s.proc.poll() is None
    # the same counters in /metrics, as promtool wants them
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus"
    _, text = http_get(status, "/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert (check.returncode, check.stdout + check.stderr) == (0, ""), text
    assert 'sertcp_udp_datagrams_out_total{port="cli"} 400' in text
    assert re.search(r'^sertcp_udp_send_errors_total\{port="cli"\} [1-9]\d\d', text, re.M), text
    # logged, but at most PEER_LOG_BURST lines per 10 s for that address
    refused = len(re.findall(r"UDP peer 127\.0\.0\.1:%d: Connection refused" % gone, s.log()))
    assert 1 <= refused <= 10, s.log()


# --- IPv6, and a listener on every address -------------------------------

def test_ipv6_both_ways(sertcp, pty):
    need_ipv6_loopback()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as r:
        r.bind(("::1", 0))
        r.settimeout(10)
        listen = udp_port()
        start_udp(sertcp, pty, "--udp-listen", "[::1]:%d" % listen, "--udp-send-to", "[::1]:%d" % r.getsockname()[1],
                  "--udp-reply", "yes")
        pty.write(b"v6 out")
        data, source = r.recvfrom(100)
        assert data == b"v6 out" and source[:2] == ("::1", listen)
        r.sendto(b"v6 in", ("::1", listen))
        assert pty.read(5) == b"v6 in"
        pty.write(b"answer")
        # the sender is also the reply peer: one copy, not two
        assert r.recvfrom(100)[0] == b"answer"
        r.settimeout(0.3)
        with pytest.raises(socket.timeout):
            r.recvfrom(100)


def test_a_listener_on_every_address_answers_ipv4_peers_from_its_own_port(sertcp, pty, receivers):
    """No host: one dual-stack socket; IPv4 peers are reached through it
    (as IPv4-mapped addresses), so the answer comes from udp_listen."""
    need_ipv6_loopback()
    listen = udp_port()
    r = receivers()
    start_udp(sertcp, pty, "--udp-listen", str(listen), "--udp-send-to", r.address, "--udp-reply", "yes")
    pty.write(b"hello")
    data, source = r.datagram()
    assert data == b"hello" and source == ("127.0.0.1", listen)
    other = receivers()
    other.sendto(b"ask", listen)
    assert pty.read(3) == b"ask"
    pty.write(b"reply")
    assert other.datagram() == (b"reply", ("127.0.0.1", listen))
    assert r.datagram()[0] == b"reply"


# --- allow, receive_from, device limits --------------------------------------

def test_allow_applies_to_each_datagram_and_refusals_are_counted(sertcp, pty, receivers):
    listen = udp_port()
    status = free_port()
    s = start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--allow", "127.0.0.1",
                  "--status", "127.0.0.1:%d" % status)
    stranger = receivers("127.0.0.2")
    stranger.sendto(b"intruder", listen)
    s.wait_log(r"datagram from 127\.0\.0\.2:\d+ refused: address not allowed")
    friend = receivers()
    friend.sendto(b"friend", listen)
    assert pty.read(6) == b"friend"
    assert pty.read_available(0.2) == b""
    st = port_status(status)
    assert st["udp_datagrams_in"] == 2 and st["udp_datagrams_refused"] == 1
    assert st["bytes_dropped"] == 8 and st["bytes_to_device"] == 6
    assert [x["peer"] for x in st["udp"]["sources"]] == ["127.0.0.1:%d" % friend.port, "127.0.0.2:%d" % stranger.port]


def test_receive_from_first_lets_the_first_source_hold_the_device(sertcp, pty, receivers):
    listen = udp_port()
    s = start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--receive-from", "first",
                  "--timeout", "1")
    a, b = receivers(), receivers()
    a.sendto(b"a1", listen)
    assert pty.read(2) == b"a1"
    b.sendto(b"b1", listen)
    s.wait_log(r"datagram from 127\.0\.0\.1:%d refused: receive_from = first ignores it" % b.port)
    a.sendto(b"a2", listen)
    assert pty.read(2) == b"a2"
    # a silent for `timeout`: the next source holds it
    wait_for(lambda: b.sendto(b"b2", listen) or pty.read_available(0.2) == b"b2", timeout=10,
             message="b holds the device after a's silence")


def test_receive_from_none_refuses_every_datagram(sertcp, pty, receivers):
    listen = udp_port()
    s = start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--receive-from", "none")
    receivers().sendto(b"no", listen)
    s.wait_log(r"refused: receive_from = none ignores it")
    assert pty.read_available(0.2) == b""


# --- TCP and UDP on one port --------------------------------------------------

def test_tcp_and_udp_sides_on_one_port(sertcp, pty, receivers, clients):
    tcp, listen = free_port(), udp_port()
    status = free_port()
    r = receivers()
    s = start_udp(sertcp, pty, "--listen", "127.0.0.1:%d" % tcp, "--udp-listen", "127.0.0.1:%d" % listen,
                  "--udp-send-to", r.address, "--status", "127.0.0.1:%d" % status)
    s.wait_listening(tcp)
    # no TCP client and buffer = 0: the UDP peer has the data, nothing is counted as dropped
    pty.write(b"before\n")
    assert r.datagram()[0] == b"before\n"
    c = clients(tcp)
    s.wait_log("connected")
    pty.write(b"both\n")
    assert r.datagram()[0] == b"both\n"
    assert c.recv(5) == b"both\n"
    c.send(b"tcp>")
    assert pty.read(4) == b"tcp>"
    r.sendto(b"udp>", listen)
    assert pty.read(4) == b"udp>"
    st = port_status(status)
    assert st["bytes_dropped"] == 0
    assert st["udp_datagrams_in"] == 1 and st["udp_datagrams_out"] == 2
    assert len(st["clients"]) == 1


def test_buffer_still_holds_device_data_for_the_next_tcp_client(sertcp, pty, receivers, clients):
    tcp = free_port()
    r = receivers()
    s = start_udp(sertcp, pty, "--listen", "127.0.0.1:%d" % tcp, "--udp-send-to", r.address, "--buffer", "64")
    s.wait_listening(tcp)
    pty.write(b"held\n")
    assert r.datagram()[0] == b"held\n"
    c = clients(tcp)
    assert c.recv(5) == b"held\n"


# --- binding ------------------------------------------------------------------

def test_a_udp_listen_address_in_use_is_retried_until_free(sertcp, pty):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    listen = holder.getsockname()[1]
    status = free_port()
    s = sertcp("--udp-listen", "127.0.0.1:%d" % listen, "--reopen-interval", "0.2",
               "--status", "127.0.0.1:%d" % status, pty.path)
    s.wait_log(r"cannot listen for UDP on 127\.0\.0\.1:%d: Address already in use; retrying every 0.2s" % listen)
    wait_for(lambda: port_status(status)["udp"]["listen_error"] == "Address already in use", message="status")
    holder.close()
    s.wait_log(r"listening for UDP on 127\.0\.0\.1:%d" % listen)
    assert port_status(status)["udp"]["listen_error"] is None
    assert s.log().count("cannot listen for UDP") == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"bound", ("127.0.0.1", listen))
    assert pty.read(5) == b"bound"


def test_a_reload_keeps_an_unchanged_udp_port_and_rebinds_a_changed_one(sertcp, pty, receivers, tmp_path):
    listen, other = udp_port(), udp_port()
    r = receivers()
    ini = "[u]\ndevice = %s\nudp_listen = 127.0.0.1:%%d\nudp_send_to = %s\n" % (pty.path, r.address)
    s = sertcp(config=ini % listen)
    s.wait_log(r"\[u\] listening for UDP on 127\.0\.0\.1:%d" % listen)
    s.config.write_text(ini % other)
    s.signal(signal.SIGHUP)
    s.wait_log(r"\[u\] listening for UDP on 127\.0\.0\.1:%d" % other)
    r.sendto(b"moved", other)
    assert pty.read(5) == b"moved"
    # the old address is free again
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", listen))


def test_datagrams_past_a_full_device_queue_are_dropped_and_counted_never_queued_without_bound(sertcp, pty, receivers):
    """Nobody reads the device: once the pty and 64 KiB of sertcp's queue
    are full, datagrams are dropped whole and counted; what the device
    gets afterwards is whole datagrams in order, and with the dropped ones
    it adds up to everything sent."""
    listen = udp_port()
    status = free_port()
    start_udp(sertcp, pty, "--udp-listen", "127.0.0.1:%d" % listen, "--status", "127.0.0.1:%d" % status)
    sender = receivers()
    datagrams = [bytes([65 + i % 26]) * 4000 for i in range(100)]
    for i, d in enumerate(datagrams, 1):
        sender.sendto(d, listen)
        if i % 10 == 0:     # let sertcp read them: a socket buffer overflow would be the kernel's loss, not ours
            wait_for(lambda: port_status(status)["udp_datagrams_in"] == i, message="%d datagrams read" % i)
    st = port_status(status)
    assert st["udp_datagrams_refused"] > 0, st
    assert st["bytes_dropped"] == 4000 * st["udp_datagrams_refused"]
    got = pty.read(4000 * (100 - st["udp_datagrams_refused"]), timeout=20)
    assert pty.read_available(0.3) == b""
    pieces = [got[i:i + 4000] for i in range(0, len(got), 4000)]
    assert all(p == p[:1] * 4000 for p in pieces)                   # whole datagrams only
    letters = [p[0] for p in pieces]
    assert letters[:10] == [65 + i for i in range(10)]              # the first ones, in order
    assert len(pieces) + st["udp_datagrams_refused"] == 100
