"""Security: TLS (server, mutual, client role, sertcp to sertcp), the
password line, allow lists, and the order in which a listener admits a
client (allow -> TLS -> password -> identity -> banner).

Every test starts the real sertcp.py on pseudo-terminals and talks to it
over loopback with Python's ssl module; certificates are made at test time
(tests/certs.py)."""
import json
import re
import socket
import ssl
import time
import warnings

import pytest

from certs import TlsClient, TlsServer, certs, recv_exactly, refused_in_tls  # noqa: F401 (fixture)
from conftest import free_port, http_get, need_ipv6_loopback, run_sertcp

EVERY_BYTE = bytes(range(256))
SECRET = "Sw0rdf1sh-7f3a"          # distinctive, so that a leak is easy to find


# --- helpers ---------------------------------------------------------------

def log_count(s, pattern):
    return len(re.findall(pattern, s.log()))


def refused(s, why, source=r"127\.0\.0\.1", count=1, timeout=10.0):
    s.wait_log(r"\[cli\] client %s:\d+ refused: %s" % (source, why), timeout=timeout, count=count)


def closed_quickly(c, timeout=5.0):
    """(closed?, seconds it took)."""
    started = time.monotonic()
    closed = c.closed_by_peer(timeout)
    return closed, time.monotonic() - started


def both_ways(c, pty, data=EVERY_BYTE):
    """data device -> client and client -> device, unchanged."""
    pty.write(data)
    assert c.recv(len(data)) == data
    c.send(data)
    assert pty.read(len(data)) == data


# --- TLS server --------------------------------------------------------------

def test_tls_round_trip_of_every_byte_value(serve, pty, certs):
    s, port = serve(pty.path, *certs.server_flags())
    c = TlsClient(port, certs.client_context())
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    both_ways(c, pty, EVERY_BYTE * 64)
    c.close()


def test_tls_1_2_is_served_and_older_versions_are_refused(serve, pty, certs):
    s, port = serve(pty.path, *certs.server_flags())
    tls12 = certs.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    c = TlsClient(port, tls12)
    assert c.sock.version() == "TLSv1.2"
    both_ways(c, pty)
    old = certs.client_context()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # that is the point
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    assert refused_in_tls(port, old)
    refused(s, "TLS handshake failed")


def test_a_stalled_tls_handshake_times_out_without_holding_up_others(serve, pty, certs, clients):
    s, port = serve(pty.path, *certs.server_flags(), "--identity-timeout", "1", "--max-clients", "2")
    started = time.monotonic()
    stalled = clients(port)                  # TCP only: never says ClientHello
    c = TlsClient(port, certs.client_context())
    both_ways(c, pty)                        # served while the other one stalls
    closed = stalled.closed_by_peer(5)
    assert closed and 0.8 <= time.monotonic() - started <= 4
    refused(s, r"no TLS handshake within 1s")


def test_tls_with_rfc2217_round_trip(serve, pty, certs):
    s, port = serve(pty.path, *certs.server_flags(), "--protocol", "rfc2217")
    c = TlsClient(port, certs.client_context())
    telnet = TelnetData(c.sock)
    telnet.agree()
    pty.write(EVERY_BYTE)
    assert telnet.read(256) == EVERY_BYTE
    c.send(EVERY_BYTE.replace(b"\xff", b"\xff\xff"))   # IAC doubled, RFC 854
    assert pty.read(256) == EVERY_BYTE
    c.close()


class TelnetData:
    """Just enough of an RFC 2217 client to move data: IAC IAC is a data
    byte 0xFF, negotiations are answered (BINARY, SGA and COM-PORT-OPTION
    accepted, the rest refused), subnegotiations are collected."""
    IAC, SB, SE, WILL, WONT, DO, DONT = 255, 250, 240, 251, 252, 253, 254
    ACCEPTED = (0, 3, 44)

    def __init__(self, sock):
        self.sock = sock
        self.pending = bytearray()
        self.data = bytearray()
        self.heard = set()              # (verb, option) the server sent
        self.subnegotiations = []

    def agree(self, timeout=10.0):
        """Wait until the server offered BINARY both ways and asked for
        COM-PORT-OPTION, then send SET-BAUDRATE and wait for its answer: the
        server read our answers before that one, so BINARY is in force."""
        self._pump(lambda: {(self.WILL, 0), (self.DO, 0), (self.DO, 44)} <= self.heard, timeout)
        self.sock.sendall(bytes([self.IAC, self.SB, 44, 1, 0, 0, 0x25, 0x80, self.IAC, self.SE]))
        self._pump(lambda: any(sb[:2] == bytes([44, 101]) for sb in self.subnegotiations), timeout)
        assert not self.data, "data before any was written: %r" % bytes(self.data)

    def read(self, n, timeout=10.0):
        self._pump(lambda: len(self.data) >= n, timeout)
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def _pump(self, done, timeout):
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "telnet: timed out (heard %s, %d data bytes)" % (
                sorted(self.heard), len(self.data))
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            assert chunk, "closed by the server"
            self.pending += chunk
            self._decode()

    def _decode(self):
        buf = self.pending
        i = 0
        while i < len(buf):
            b = buf[i]
            if b != self.IAC:
                self.data.append(b)
                i += 1
                continue
            if i + 1 >= len(buf):
                break
            cmd = buf[i + 1]
            if cmd == self.IAC:
                self.data.append(0xFF)
                i += 2
            elif cmd in (self.WILL, self.WONT, self.DO, self.DONT):
                if i + 2 >= len(buf):
                    break
                option = buf[i + 2]
                self.heard.add((cmd, option))
                if cmd in (self.WILL, self.DO):
                    ok = option in self.ACCEPTED
                    answer = {self.WILL: (self.DO if ok else self.DONT),
                              self.DO: (self.WILL if ok else self.WONT)}[cmd]
                    self.sock.sendall(bytes([self.IAC, answer, option]))
                i += 3
            elif cmd == self.SB:
                end = buf.find(bytes([self.IAC, self.SE]), i + 2)
                if end < 0:
                    break
                self.subnegotiations.append(bytes(buf[i + 2:end]).replace(b"\xff\xff", b"\xff"))
                i = end + 2
            else:
                i += 2
        del buf[:i]


# --- mutual TLS --------------------------------------------------------------

def test_mutual_tls_accepts_a_client_certificate_from_the_ca(serve, pty, certs):
    s, port = serve(pty.path, *certs.server_flags(mutual=True))
    c = TlsClient(port, certs.client_context(cert=certs.client))
    both_ways(c, pty)


@pytest.mark.parametrize("which", ["none", "other_ca"])
def test_mutual_tls_refuses_a_client_without_a_good_certificate(serve, pty, certs, which):
    s, port = serve(pty.path, *certs.server_flags(mutual=True))
    cert = None if which == "none" else certs.other_client
    assert refused_in_tls(port, certs.client_context(cert=cert))
    refused(s, "TLS handshake failed: .+")
    assert pty.read_available(0.1) == b""
    # the port still serves a good client afterwards
    c = TlsClient(port, certs.client_context(cert=certs.client))
    both_ways(c, pty)


def test_plain_tcp_to_a_tls_port_is_refused(serve, pty, certs, clients):
    s, port = serve(pty.path, *certs.server_flags())
    c = clients(port)
    c.send(b"GET / HTTP/1.0\r\n\r\n")
    assert c.closed_by_peer(5)
    refused(s, "TLS handshake failed")
    assert pty.read_available(0.1) == b""


# --- TLS client role ---------------------------------------------------------

@pytest.mark.parametrize("server_name", [None, "localhost"])
def test_client_role_dials_tls_and_verifies_the_server(sertcp, pty, certs, server_name):
    server = TlsServer(certs.server_context())
    try:
        flags = ["--connect", "127.0.0.1:%d" % server.port, "--tls", "yes", "--tls-ca", certs.ca]
        if server_name:
            flags += ["--tls-server-name", server_name]
        s = sertcp(*flags, pty.path)
        conn = server.wait_connection()
        s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % server.port)
        pty.write(EVERY_BYTE)
        assert recv_exactly(conn, 256) == EVERY_BYTE
        conn.sendall(EVERY_BYTE)
        assert pty.read(256) == EVERY_BYTE
    finally:
        server.close()


@pytest.mark.parametrize("case", ["server_from_other_ca", "wrong_server_name", "system_store"])
def test_client_role_refuses_a_server_that_does_not_verify(sertcp, pty, certs, case):
    server = TlsServer(certs.server_context(certs.other_server if case == "server_from_other_ca" else None))
    try:
        flags = ["--connect", "127.0.0.1:%d" % server.port, "--tls", "yes",
                 "--reconnect-min", "0.2", "--reconnect-max", "0.4"]
        if case != "system_store":      # without tls_ca: the system store, which knows no test CA
            flags += ["--tls-ca", certs.ca]
        if case == "wrong_server_name":
            flags += ["--tls-server-name", "wrong.example"]
        s = sertcp(*flags, pty.path)
        # the dial fails, and is retried after a back-off like any failed dial
        s.wait_log(r"\[cli\] dial to 127\.0\.0\.1:%d failed: .*TLS" % server.port, count=2)
        assert "connected to" not in s.log()
        assert not server.connections
        if case == "wrong_server_name":
            assert "wrong.example" in s.log()
    finally:
        server.close()


def test_sertcp_dials_sertcp_over_tls_with_a_password(sertcp, serve, pty_factory, certs):
    near, far = pty_factory(), pty_factory()
    server, port = serve(near.path, *certs.server_flags(), "--password", SECRET)
    client = sertcp("--connect", "127.0.0.1:%d" % port, "--tls", "yes", "--tls-ca", certs.ca,
                    "--tls-server-name", "localhost", "--password", SECRET, far.path)
    server.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    client.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % port)
    near.write(EVERY_BYTE)
    assert far.read(256) == EVERY_BYTE
    far.write(EVERY_BYTE[::-1])
    assert near.read(256) == EVERY_BYTE[::-1]
    assert SECRET not in server.log() and SECRET not in client.log()


# --- password ----------------------------------------------------------------

def test_right_password_then_banner_then_data_both_ways(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET, "--banner", r"HELLO\r\n")
    c = clients(port)
    assert c.recv_available(0.3) == b"", "nothing is sent before the password (no prompt)"
    c.send(SECRET.encode() + b"\nfirst bytes")    # the rest of the segment goes to the device
    assert c.recv(7) == b"HELLO\r\n"
    assert pty.read(11) == b"first bytes"
    both_ways(c, pty)


def test_password_line_may_end_in_cr_lf(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET)
    c = clients(port)
    c.send(SECRET.encode() + b"\r\n")
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    both_ways(c, pty)


def test_wrong_password_is_closed_after_a_pause(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET)
    c = clients(port)
    c.send(b"not-the-password\nsome data")
    closed, took = closed_quickly(c)
    assert closed and 0.5 <= took <= 4, took
    refused(s, "wrong password")
    assert pty.read_available(0.1) == b""
    # near misses, at once and each from its own address (five from one would block it)
    near_misses = [SECRET[:-1], SECRET + "x", SECRET.upper(), " " + SECRET, ""]
    tries = [clients(port, source="127.0.0.%d" % (20 + i)) for i in range(len(near_misses))]
    for c, near_miss in zip(tries, near_misses):
        c.send(near_miss.encode() + b"\n")
    assert all(c.closed_by_peer(5) for c in tries)
    assert log_count(s, r"refused: wrong password") == 1 + len(near_misses)
    assert pty.read_available(0.1) == b""


def test_missing_password_is_closed_after_identity_timeout(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET, "--identity-timeout", "1")
    c = clients(port)
    c.send(SECRET.encode())          # no newline: not a password line yet
    closed, took = closed_quickly(c)
    assert closed and 0.8 <= took <= 4, took
    refused(s, r"no password within 1s")


def test_slow_password_byte_by_byte_still_works(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET, "--identity-timeout", "2")
    c = clients(port)
    line = SECRET.encode() + b"\n"
    for i in range(len(line)):
        c.send(line[i:i + 1])
        time.sleep(0.5 / len(line))  # the trickle is the point of the test
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    both_ways(c, pty)


def test_password_line_too_long_is_refused(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET)
    c = clients(port)
    try:
        c.send(b"A" * 300)
    except OSError:
        pass
    closed, took = closed_quickly(c)
    assert closed and took < 3, took
    refused(s, "password line too long")


def test_five_wrong_passwords_block_the_address(serve, pty, clients):
    s, port = serve(pty.path, "--password", SECRET, "--max-clients", "2")
    guessers = [clients(port, source="127.0.0.7") for _ in range(5)]
    for i, g in enumerate(guessers):
        g.send(b"guess-%d\n" % i)
    assert all(g.closed_by_peer(5) for g in guessers)
    refused(s, "wrong password", source=r"127\.0\.0\.7", count=5)
    # the right password no longer helps from that address, and the answer is at once
    late = clients(port, source="127.0.0.7")
    late.send(SECRET.encode() + b"\n")
    closed, took = closed_quickly(late)
    assert closed and took < 0.5, took
    refused(s, r"too many wrong passwords from 127\.0\.0\.7 \(blocked for 60s\)", source=r"127\.0\.0\.7")
    # other addresses are not blocked
    c = clients(port)
    c.send(SECRET.encode() + b"\n")
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    both_ways(c, pty)


def test_password_file_first_line_is_the_password(serve, pty, clients, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-the-file\nsecond line is not it\n")
    s, port = serve(pty.path, "--password-file", secret_file)
    wrong = clients(port)
    wrong.send(b"second line is not it\n")
    assert wrong.closed_by_peer(5)
    c = clients(port)
    c.send(b"from-the-file\n")
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    both_ways(c, pty)
    assert "from-the-file" not in s.log()


def test_password_never_appears_in_log_check_or_status(serve, pty, clients, tmp_path):
    checked = run_sertcp(["--check", "--listen", "7000", "--password", SECRET, pty.path], tmpdir=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert re.search(r"^password = \*{8}$", checked.stdout, re.M), checked.stdout
    assert SECRET not in checked.stdout + checked.stderr
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    checked = run_sertcp(["--check", "--listen", "7000", "--password-file", secret_file, pty.path], tmpdir=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert SECRET not in checked.stdout + checked.stderr

    status = free_port()
    s, port = serve(pty.path, "--password", SECRET, "--status", "127.0.0.1:%d" % status,
                    "--log-level", "debug")
    s.wait_log("status endpoint on")
    bad = clients(port)
    bad.send(SECRET.encode()[:-1] + b"\n")      # a near miss must not be echoed either
    good = clients(port)
    good.send(SECRET.encode() + b"\n")
    s.wait_log(r"\[cli\] client 127\.0\.0\.1:\d+ connected")
    both_ways(good, pty)
    assert bad.closed_by_peer(5)
    body = http_get(status, "/status")[1]
    json.loads(body)
    metrics = http_get(status, "/metrics")[1]
    for text in (body, metrics, s.log()):
        assert SECRET not in text and SECRET[:-1] not in text


# --- allow -------------------------------------------------------------------

def test_allow_ipv4_address(serve, pty, clients):
    s, port = serve(pty.path, "--allow", "127.0.0.2", "--max-clients", "2")
    stranger = clients(port, source="127.0.0.3")
    try:
        stranger.send(b"let me in")
    except OSError:
        pass
    assert stranger.closed_by_peer(5)
    refused(s, "address not allowed", source=r"127\.0\.0\.3")
    assert pty.read_available(0.1) == b""
    friend = clients(port, source="127.0.0.2")
    s.wait_log(r"\[cli\] client 127\.0\.0\.2:\d+ connected")
    both_ways(friend, pty)


def test_allow_cidr_and_lists(serve, pty, clients):
    s, port = serve(pty.path, "--allow", "10.0.0.0/8, 127.0.0.8/29, ::1", "--max-clients", "4")
    inside = [clients(port, source="127.0.0.%d" % n) for n in (8, 15)]
    for n in (7, 16):
        outside = clients(port, source="127.0.0.%d" % n)
        assert outside.closed_by_peer(5)
        refused(s, "address not allowed", source=r"127\.0\.0\.%d" % n)
    s.wait_log(r"\[cli\] client 127\.0\.0\.15:\d+ connected")
    for c in inside:
        pty.write(b"hi")
        for d in inside:
            assert d.recv(2) == b"hi"
        c.send(b"ok")
        assert pty.read(2) == b"ok"


def test_allow_ipv6(serve, pty_factory, clients):
    need_ipv6_loopback()
    yes, no = pty_factory(), pty_factory()
    s, port = serve(yes.path, "--allow", "::1/128", host="::1")
    c = clients(port, host="::1")
    s.wait_log(r"\[cli\] client \[::1\]:\d+ connected")
    both_ways(c, yes)

    s2, port2 = serve(no.path, "--allow", "127.0.0.1", host="::1")
    c = clients(port2, host="::1")
    assert c.closed_by_peer(5)
    s2.wait_log(r"\[cli\] client \[::1\]:\d+ refused: address not allowed")


def test_allow_is_checked_before_tls_and_password(serve, pty, certs, clients):
    s, port = serve(pty.path, "--allow", "127.0.0.2", *certs.server_flags(), "--password", SECRET)
    assert refused_in_tls(port, certs.client_context(), source="127.0.0.3")
    refused(s, "address not allowed", source=r"127\.0\.0\.3")
    assert not re.search(r"127\.0\.0\.3:\d+ refused: (TLS|wrong|no password)", s.log())
    c = TlsClient(port, certs.client_context(), source="127.0.0.2")
    c.send(SECRET.encode() + b"\n")
    s.wait_log(r"\[cli\] client 127\.0\.0\.2:\d+ connected")
    both_ways(c, pty)


# --- order of admission on a shared listener ----------------------------------

def shared_config(port, a, b, extra_a="", extra_b=""):
    return ("[a]\ndevice = %s\nlisten = 127.0.0.1:%d\nidentity = A\nidentity_timeout = 2\n%s\n"
            "[b]\ndevice = %s\nlisten = 127.0.0.1:%d\nidentity = B\nidentity_timeout = 2\n%s\n"
            % (a, port, extra_a, b, port, extra_b))


def test_password_line_comes_before_the_id(sertcp, pty_factory, clients):
    a, b = pty_factory(), pty_factory()
    port = free_port()
    s = sertcp(config=shared_config(port, a.path, b.path, "password = %s" % SECRET, "password = %s" % SECRET))
    s.wait_log(r"listening on 127\.0\.0\.1:%d" % port, count=2)
    s.wait_log(r"\[b\] device \S+ opened")
    c = clients(port)
    c.send(SECRET.encode() + b"\nB\nto b")
    s.wait_log(r"\[b\] client 127\.0\.0\.1:\d+ connected")
    assert b.read(4) == b"to b"
    b.write(EVERY_BYTE)
    assert c.recv(256) == EVERY_BYTE
    assert a.read_available(0.1) == b""

    swapped = clients(port, source="127.0.0.2")
    swapped.send(b"A\n" + SECRET.encode() + b"\n")
    assert swapped.closed_by_peer(5)
    s.wait_log(r"client 127\.0\.0\.2:\d+ refused: wrong password")
    assert a.read_available(0.1) == b""


def test_shared_tls_listener_routes_by_id_after_the_handshake(sertcp, pty_factory, certs, clients):
    a, b = pty_factory(), pty_factory()
    port = free_port()
    tls = "tls_cert = %s\ntls_key = %s" % certs.server
    s = sertcp(config=shared_config(port, a.path, b.path, tls, tls))
    s.wait_log(r"listening on 127\.0\.0\.1:%d .*with TLS" % port, count=2)
    s.wait_log(r"\[b\] device \S+ opened")
    c = TlsClient(port, certs.client_context())
    c.send(b"B\nto b")
    s.wait_log(r"\[b\] client 127\.0\.0\.1:\d+ connected")
    assert b.read(4) == b"to b"
    b.write(EVERY_BYTE)
    assert c.recv(256) == EVERY_BYTE
    plain = clients(port, source="127.0.0.2")
    plain.send(b"B\nhello, in the clear\n")   # an id without TLS first
    assert plain.closed_by_peer(5)
    # a shared listener is named by its address in the log
    s.wait_log(r"\[listen 127\.0\.0\.1:%d\] client 127\.0\.0\.2:\d+ refused: TLS handshake failed" % port)
    assert a.read_available(0.1) == b"" and b.read_available(0.1) == b""


@pytest.mark.parametrize("key", ["password", "tls_cert"])
def test_ports_sharing_a_listener_must_agree_on_tls_and_password(key, certs, tmp_path):
    extra = {"password": "password = %s" % SECRET,
             "tls_cert": "tls_cert = %s\ntls_key = %s" % certs.server}[key]
    r = run_sertcp(["--check"], config=shared_config(7000, "/dev/null", "/dev/null", extra_a=extra), tmpdir=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert key in r.stderr
    assert SECRET not in r.stdout + r.stderr


# --- TLS files are configuration ----------------------------------------------

TLS_FILE_CASES = {
    "missing tls_cert": (["--listen", "7000", "--tls-cert", "{missing}", "--tls-key", "{key}"], "tls_cert"),
    "tls_key not a key": (["--listen", "7000", "--tls-cert", "{cert}", "--tls-key", "{garbage}"], "tls_key"),
    "missing tls_ca": (["--connect", "127.0.0.1:7000", "--tls", "yes", "--tls-ca", "{missing}"], "tls_ca"),
}


def tls_file_args(case, certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    names = dict(missing=tmp_path / "missing.pem", key=certs.server[1], cert=certs.server[0], garbage=garbage)
    args, key = TLS_FILE_CASES[case]
    return [a.format(**names) for a in args], key


@pytest.mark.parametrize("case", sorted(TLS_FILE_CASES))
def test_check_refuses_unusable_tls_files(case, certs, tmp_path, pty):
    args, key = tls_file_args(case, certs, tmp_path)
    r = run_sertcp(["--check"] + args + [pty.path], tmpdir=tmp_path)
    flag = "--" + key.replace("_", "-")  # a flag is named as the flag (SPEC: "or the flag")
    assert r.returncode == 2 and (key in r.stderr or flag in r.stderr), (r.returncode, r.stderr)


@pytest.mark.parametrize("case", ["missing tls_cert", "tls_key not a key"])
def test_unusable_tls_files_are_a_configuration_error_at_start(case, certs, tmp_path, pty):
    args, key = tls_file_args(case, certs, tmp_path)
    args[1] = str(free_port())
    r = run_sertcp(args + [pty.path], timeout=10, tmpdir=tmp_path)
    flag = "--" + key.replace("_", "-")  # a flag is named as the flag (SPEC: "or the flag")
    assert r.returncode == 2 and (key in r.stderr or flag in r.stderr), (r.returncode, r.stderr)
