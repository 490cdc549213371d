"""protocol = rfc2217 with real peers.

sertcp as the server (it owns the device), used by pyserial's own
rfc2217:// client and by gensio's `telnet(rfc2217)`; sertcp as the client
(a virtual port whose settings the local program sets), against ser2net's
telnet(rfc2217) accepter and against sredird behind socat.  Several
clients on one port, the configured settings coming back when the last
leaves, and a client that meets a server that does not speak RFC 2217.

Peers run on loopback only and are killed in finally blocks.  Where a
kernel's ptys refuse a setting (some sandboxes refuse CS7 and PARENB),
the answer sertcp gives must be the value the kernel kept."""
import os
import re
import signal
import socket
import subprocess
import termios
import threading
import time

import pytest
import serial

from conftest import free_port, need_programs, wait_for
from test_telnet import OPENING, TelnetPeer, keeps_cs7, keeps_parodd, sb, scratch_pty_keeps

EVERY_BYTE = bytes(range(256))
# what serve() is given for an RFC 2217 server port; debug logs the requests
RFC2217_PORT = ("--protocol", "rfc2217", "--max-clients", "2", "--log-level", "debug")


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(5)


def read_exact(fd, n, timeout=10.0):
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, "got %d of %d bytes: %r" % (len(out), n, bytes(out[-32:]))
        try:
            chunk = os.read(fd, n - len(out))
        except BlockingIOError:
            time.sleep(0.01)
            continue
        out += chunk
    return bytes(out)


def baud_of(fd):
    return termios.tcgetattr(fd)[4]


# --- pyserial's rfc2217:// client against sertcp --------------------------------

def test_pyserial_opens_fast_and_changes_every_setting(serve, pty):
    s, port = serve(pty.path, *RFC2217_PORT)
    started = time.monotonic()
    ser = serial.serial_for_url("rfc2217://127.0.0.1:%d" % port, baudrate=115200, timeout=5)
    try:
        assert time.monotonic() - started < 3.0
        assert baud_of(pty.master) == termios.B115200
        ser.baudrate = 57600
        assert baud_of(pty.master) == termios.B57600
        ser.stopbits = serial.STOPBITS_TWO
        assert termios.tcgetattr(pty.master)[2] & termios.CSTOPB
        # byte size and parity: applied where the kernel lets a pty have
        # them; otherwise sertcp answers with the value in force and
        # pyserial reports the refusal
        for attr, value, kept, check in (
                ("bytesize", serial.SEVENBITS, scratch_pty_keeps(keeps_cs7),
                 lambda cflag: cflag & termios.CSIZE == termios.CS7),
                ("parity", serial.PARITY_ODD, scratch_pty_keeps(keeps_parodd),
                 lambda cflag: cflag & termios.PARENB and cflag & termios.PARODD)):
            if kept:
                setattr(ser, attr, value)
                assert check(termios.tcgetattr(pty.master)[2])
            else:
                previous = getattr(ser, attr)
                with pytest.raises(ValueError, match="remote rejected"):
                    setattr(ser, attr, value)
                assert not check(termios.tcgetattr(pty.master)[2])
                s.wait_log(r"cannot set %s" % attr)
                setattr(ser, attr, previous)   # pyserial resends every setting: all in force again
        ser.write(EVERY_BYTE)
        assert pty.read(256) == EVERY_BYTE
        pty.write(EVERY_BYTE)
        assert ser.read(256) == EVERY_BYTE
    finally:
        ser.close()
    # the last client left: the configured 9600 8N1 comes back
    wait_for(lambda: baud_of(pty.master) == termios.B9600, 5, message="the configured rate back")
    assert not termios.tcgetattr(pty.master)[2] & termios.CSTOPB


def test_pyserial_lines_through_a_loop_device(serve):
    s, port = serve("loop://", *RFC2217_PORT)
    ser = serial.serial_for_url("rfc2217://127.0.0.1:%d" % port, timeout=5)
    poller = None
    try:
        # loop:// mirrors DTR to DSR and RTS to CTS; sertcp notifies the
        # change before it answers, so pyserial knows by the time the
        # setter returns
        ser.dtr = False
        assert not ser.dsr
        ser.rts = False
        assert not ser.cts
        ser.dtr = True
        assert ser.dsr and not ser.cts
        ser.rts = True
        assert ser.cts
        assert ser.cd and not ser.ri
        ser.send_break(0.05)
        s.wait_log(r"set BREAK on")
        s.wait_log(r"set BREAK off")
        poller = serial.serial_for_url("rfc2217://127.0.0.1:%d?poll_modem" % port, timeout=5)
        ser.rts = False
        wait_for(lambda: not poller.cts, 5, message="a polling client sees CTS drop")
        assert poller.dsr
        ser.write(b"\xffecho\xff")
        assert ser.read(6) == b"\xffecho\xff"
    finally:
        ser.close()
        if poller is not None:
            poller.close()


# --- gensio's telnet(rfc2217) client against sertcp ------------------------------

def test_gensiot_moves_every_byte_and_sets_the_baud_rate(serve, pty):
    need_programs("gensiot")
    s, port = serve(pty.path, *RFC2217_PORT)
    escape = 0x1c      # gensiot's escape character: doubled in the data, then "s<rate>\n" sets the rate
    g = subprocess.Popen(["gensiot", "-e", "0x1c", "telnet(rfc2217),tcp,127.0.0.1,%d" % port],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        os.set_blocking(g.stdout.fileno(), False)
        s.wait_log(r"client \S+: speaks RFC 2217")
        g.stdin.write(EVERY_BYTE.replace(bytes((escape,)), bytes((escape, escape))))
        g.stdin.flush()
        assert pty.read(256) == EVERY_BYTE
        pty.write(EVERY_BYTE)
        assert read_exact(g.stdout.fileno(), 256) == EVERY_BYTE
        g.stdin.write(bytes((escape,)) + b"s19200\n")
        g.stdin.flush()
        wait_for(lambda: baud_of(pty.master) == termios.B19200, 5, message="gensiot's rate on the pty")
    finally:
        stop(g)


# --- sertcp as the client ---------------------------------------------------------

def local_program_sets(path, baudrate):
    """A local program opens the virtual port and sets its rate."""
    return serial.Serial(path, baudrate, timeout=5)


def client_round_trip(sertcp, tmp_path, remote_port, remote_pty, expect_log):
    virtual = str(tmp_path / "ttyV0")
    s = sertcp("--virtual", virtual, "--connect", "127.0.0.1:%d" % remote_port, "--protocol", "rfc2217",
               "--reconnect-min", "0.2", "--log-level", "debug")
    s.wait_log(r"speaks RFC 2217; asking for 9600 8N1")
    s.wait_log(expect_log)
    local = local_program_sets(virtual, 115200)
    try:
        wait_for(lambda: baud_of(remote_pty.master) == termios.B115200, 5, message="the remote pty at 115200")
        s.wait_log(r"local program set baudrate 115200")
        local.write(EVERY_BYTE * 4)
        assert remote_pty.read(1024) == EVERY_BYTE * 4
        remote_pty.write(EVERY_BYTE * 4)
        assert local.read(1024) == EVERY_BYTE * 4
        local.baudrate = 38400
        wait_for(lambda: baud_of(remote_pty.master) == termios.B38400, 5, message="the remote pty at 38400")
    finally:
        local.close()
    return s


def test_virtual_port_drives_a_ser2net_port(sertcp, pty_factory, tmp_path):
    need_programs("ser2net")
    remote = pty_factory()
    port = free_port()
    config = tmp_path / "ser2net.yaml"
    config.write_text("connection: &sertcp\n"
                      "  accepter: telnet(rfc2217),tcp,127.0.0.1,%d\n"
                      "  connector: serialdev,%s,9600n81,local\n" % (port, remote.path))
    peer = subprocess.Popen(["ser2net", "-n", "-d", "-u", "-c", str(config), "-P", str(tmp_path / "ser2net.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: can_connect(port), 10, message="ser2net listening")
        client_round_trip(sertcp, tmp_path, port, remote, r"server signature 'ser2net'")
    finally:
        stop(peer)


def test_virtual_port_drives_sredird(sertcp, pty_factory, tmp_path):
    need_programs("sredird", "socat")
    remote = pty_factory()
    port = free_port()
    # sredird runs from inetd: socat plays inetd, one sredird per connection
    peer = subprocess.Popen(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                             "EXEC:sredird 5 %s %s" % (remote.path, tmp_path / "LCK..sredird")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: can_connect(port), 10, message="socat listening")
        client_round_trip(sertcp, tmp_path, port, remote, r"server signature 'SRedird")
    finally:
        try:
            os.killpg(peer.pid, signal.SIGKILL)   # socat and the sredird it forked
        except ProcessLookupError:
            pass
        stop(peer)


def can_connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --- several clients, and the way back -------------------------------------------

def test_two_clients_one_change_both_hear_it_and_the_last_one_out_restores(serve, pty):
    s, port = serve(pty.path, *RFC2217_PORT, "--dtr-idle", "on")
    first, second = TelnetPeer(port), TelnetPeer(port, source="127.0.0.2")
    try:
        first.agree()
        second.agree()
        first.send(sb(1, 0, 1, 0xc2, 0) + sb(4, 2))
        first.expect(sb(101, 0, 1, 0xc2, 0) + sb(104, 2))
        second.expect(sb(101, 0, 1, 0xc2, 0) + sb(104, 2))    # heard, not asked for
        assert baud_of(pty.master) == termios.B115200
        assert s.log().count("set baudrate 115200") == 1
        second.send(sb(1, 0, 1, 0xc2, 0))                    # the same value: answered, not broadcast
        second.expect(sb(101, 0, 1, 0xc2, 0))
        first.quiet(0.2)
        first.close()
        s.wait_log(r"client 127\.0\.0\.1:\d+ disconnected")
        assert baud_of(pty.master) == termios.B115200        # one client still there
        second.close()
        wait_for(lambda: baud_of(pty.master) == termios.B9600, 5, message="9600 again")
        s.wait_log(r"last client left: baudrate back to 9600")
        assert not termios.tcgetattr(pty.master)[2] & termios.CSTOPB
    finally:
        first.close()
        second.close()


def test_a_raw_telnet_client_without_binary_gets_cr_nul(serve, pty):
    s, port = serve(pty.path, *RFC2217_PORT)
    p = TelnetPeer(port)
    try:
        p.expect(OPENING)
        # DONT BINARY, WONT BINARY (a text terminal), then its line: in
        # one stream, so sertcp reads the refusal first
        p.send(bytes((255, 254, 0, 255, 252, 0)))
        p.send(b"ls\r\0-l\r\n")
        assert pty.read(7) == b"ls\r-l\r\n"
        pty.write(b"a\rb\r\n")
        p.expect(b"a\r\0b\r\n")
    finally:
        p.close()


# --- a client that meets something else ---------------------------------------------

def test_client_facing_a_plain_tcp_server_says_so_and_carries_on_raw(sertcp, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    virtual = str(tmp_path / "ttyV1")
    s = sertcp("--virtual", virtual, "--connect", "127.0.0.1:%d" % port, "--protocol", "rfc2217")
    try:
        wait_for(lambda: accepted, 5, message="sertcp dialing")
        conn = accepted[0]
        conn.settimeout(5)
        assert conn.recv(64).startswith(b"\xff")             # our opening, unanswered
        s.wait_log(r"sent no Telnet negotiation within 5s: not an RFC 2217 server; carrying on as raw TCP",
                   timeout=10)
        local = serial.Serial(virtual, 9600, timeout=5)
        try:
            conn.sendall(b"\xff raw \xff")
            assert local.read(7) == b"\xff raw \xff"
            local.write(b"\xffback")
            got = b""
            while len(got) < 5:
                got += conn.recv(64)
            assert got == b"\xffback"
        finally:
            local.close()
        conn.close()
    finally:
        listener.close()


def test_client_facing_a_telnet_server_without_com_port_option(sertcp, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    virtual = str(tmp_path / "ttyV2")
    s = sertcp("--virtual", virtual, "--connect", "127.0.0.1:%d" % port, "--protocol", "rfc2217")
    try:
        listener.settimeout(5)
        conn, _ = listener.accept()
        conn.settimeout(5)
        opening = b""
        while bytes((255, 251, 44)) not in opening:
            opening += conn.recv(64)
        conn.sendall(bytes((255, 254, 44)))                    # DONT COM-PORT-OPTION
        s.wait_log(r"refuses COM-PORT-OPTION \(DONT 44\): it is a plain Telnet server")
        local = serial.Serial(virtual, 9600, timeout=5)
        try:
            conn.sendall(b"a\xff\xffb")
            assert local.read(3) == b"a\xffb"
        finally:
            local.close()
        conn.close()
    finally:
        listener.close()
    assert not re.search(r"Traceback", s.log())
