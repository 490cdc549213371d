"""The device side of real installations: RS-485 mode, USB adapters found
by identity in sysfs, pacing and break, notices to the device, the
heartbeat of dialed connections, modem lines that drive connections, and
devices that are not ttys."""
import json
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

import sertcp as sertcp_module
from conftest import Client, SimulatedUart, free_port, http_get, run_sertcp, wait_for



# --- RS-485: struct serial_rs485 --------------------------------------------

def test_rs485_struct_is_32_bytes_with_enabled_and_rts_on_send_by_default():
    packed = sertcp_module.rs485_pack()
    assert len(packed) == 32
    assert struct.unpack("=III", packed[:12]) == (0b11, 0, 0)
    assert packed[12:] == bytes(20)             # padding (or addr_recv/addr_dest) zero


def test_rs485_flags_follow_the_kernel_header():
    def flags(**kw):
        return struct.unpack("=I", sertcp_module.rs485_pack(**kw)[:4])[0]
    assert flags(rts="after_send") == 1 | 4
    assert flags(rx_during_tx=True) == 1 | 2 | 16
    assert flags(terminate=True) == 1 | 2 | 32
    assert flags(rts="after_send", rx_during_tx=True, terminate=True) == 1 | 4 | 16 | 32


def test_rs485_delays_are_the_second_and_third_words():
    packed = sertcp_module.rs485_pack(delay_before_ms=3, delay_after_ms=700)
    assert struct.unpack("=III", packed[:12])[1:] == (3, 700)


def test_rs485_read_back_unpacks_what_the_driver_reports():
    reported = struct.pack("=III", 1 | 4 | 32, 0, 100) + bytes(20)
    assert sertcp_module.rs485_unpack(reported) == {
        "enabled": True, "rts_on_send": False, "rts_after_send": True, "rx_during_tx": False,
        "terminate_bus": True, "delay_before_ms": 0, "delay_after_ms": 100}


def test_rs485_ioctl_numbers_per_architecture():
    assert sertcp_module.rs485_ioctls("x86_64") == (0x542E, 0x542F)
    assert sertcp_module.rs485_ioctls("armv7l") == (0x542E, 0x542F)
    assert sertcp_module.rs485_ioctls("mips") == (0x4020542E, 0xC020542F)       # _IOR/_IOWR('T', 0x2E/0x2F, 32)
    assert sertcp_module.rs485_ioctls("alpha") == (0x4020542E, 0xC020542F)
    assert sertcp_module.rs485_ioctls("sparc64") == (0x40205441, 0xC0205442)


def test_rs485_keys_need_rs485_and_a_device(tmp_path):
    r = run_sertcp(["--check", "--listen", "7000", "--rs485-delay-after-ms", "5", "/dev/ttyS0"])
    assert r.returncode == 2 and "rs485: is off, but an rs485_* key is set" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--rs485", "yes", "--virtual", str(tmp_path / "v")])
    assert r.returncode == 2 and "a virtual port has no RS-485 mode" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--rs485", "yes", "rfc2217://127.0.0.1:4000"])
    assert r.returncode == 2 and "--rs485: needs a tty (a device path or usb: spec), not the URL rfc2217://" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--rs485", "yes", "--rs485-delay-before-ms", "1001", "/dev/ttyS0"])
    assert r.returncode == 2 and "allowed range is 0-1000" in r.stderr


def test_rs485_refused_by_a_pty_is_one_log_line_and_shown_in_status(sertcp, pty, clients):
    """A pty has no RS-485 mode (ENOTTY): the port serves data without it,
    says so once per open, and /status shows what was refused."""
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--rs485", "yes",
               "--rs485-delay-after-ms", "2", pty.path)
    s.wait_log(r"RS-485 mode refused: .* by %s; serving the port without it" % pty.path)
    _, body = http_get(status, "/status")
    shown = json.loads(body)["ports"][0]
    assert shown["rs485"].startswith("refused: ") and shown["device_state"] == "open"
    c = clients(port)
    pty.write(b"data")
    assert c.recv(4) == b"data"
    c.send(b"back")
    assert pty.read(4) == b"back"
    assert s.log().count("RS-485 mode refused") == 1


# --- USB adapters by identity ------------------------------------------------

class FakeSysfs:
    """A sysfs tree with USB serial adapters as the kernel lays them out:
    the USB device's directory (named by its location, holding idVendor,
    idProduct and serial), an interface directory, the tty below it, and
    the link /sys/bus/usb-serial/devices/ttyUSBn (/sys/class/tty/ttyACMn
    for CDC ACM) pointing at it."""

    def __init__(self, root):
        self.root = Path(root)
        (self.root / "bus/usb-serial/devices").mkdir(parents=True, exist_ok=True)
        (self.root / "class/tty").mkdir(parents=True, exist_ok=True)

    def plug(self, name, vendor, product, serial, location):
        usb = self.root / "devices/pci0000:00/0000:00:14.0/usb1" / location
        usb.mkdir(parents=True, exist_ok=True)
        (usb / "idVendor").write_text(vendor + "\n")
        (usb / "idProduct").write_text(product + "\n")
        if serial is not None:
            (usb / "serial").write_text(serial + "\n")
        interface = usb / ("%s:1.0" % location)
        if name.startswith("ttyACM"):
            tty = interface / "tty" / name
            link = self.root / "class/tty" / name
        else:
            tty = interface / name
            link = self.root / "bus/usb-serial/devices" / name
        tty.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(tty, link.parent), link)

    def unplug(self, name):
        for link in (self.root / "bus/usb-serial/devices" / name, self.root / "class/tty" / name):
            if os.path.lexists(link):
                os.unlink(link)


def adapters(tmp_path, *plugged):
    sysfs = FakeSysfs(tmp_path / "sys")
    for adapter in plugged:
        sysfs.plug(*adapter)
    return sertcp_module.usb_serial_adapters(str(sysfs.root))


def names(spec, found):
    return [a["name"] for a in sertcp_module.match_usb(sertcp_module.parse_usb_spec(spec), found)]


def test_usb_spec_parsing():
    parse = sertcp_module.parse_usb_spec
    assert parse("usb:0403:6001") == ("id", "0403", "6001", "*")
    assert parse("usb:0403:6001:A10K1B2C") == ("id", "0403", "6001", "A10K1B2C")
    assert parse("usb:*:*:A1") == ("id", "*", "*", "A1")
    assert parse("usb:1A86:7523") == ("id", "1a86", "7523", "*")
    assert parse("usb@1-1.4") == ("location", "1-1.4")
    for bad in ("usb:0403", "usb:403:6001", "usb:0403:60g1", "usb:0403:6001:a:b", "usb@", "usb@1-1/4"):
        with pytest.raises(sertcp_module.ValueProblem):
            parse(bad)


def test_usb_matcher_tells_adapters_apart_by_serial(tmp_path):
    found = adapters(tmp_path, ("ttyUSB0", "0403", "6001", "A10K1B2C", "1-1.2"),
                     ("ttyUSB1", "0403", "6001", "FT9ZZ001", "1-1.3"),
                     ("ttyUSB2", "10c4", "ea60", "0001", "1-1.4"),
                     ("ttyACM0", "2341", "0043", "85735313", "1-1.1"))
    assert {a["name"]: a["location"] for a in found} == {"ttyUSB0": "1-1.2", "ttyUSB1": "1-1.3",
                                                          "ttyUSB2": "1-1.4", "ttyACM0": "1-1.1"}
    assert names("usb:0403:6001:FT9ZZ001", found) == ["ttyUSB1"]
    assert names("usb:10c4:ea60", found) == ["ttyUSB2"]
    assert names("usb:2341:*", found) == ["ttyACM0"]             # CDC ACM, found under class/tty
    assert names("usb:0403:6001", found) == ["ttyUSB0", "ttyUSB1"]    # the same VID:PID twice
    assert names("usb:*:*:85735313", found) == ["ttyACM0"]
    assert names("usb:0403:6015", found) == []


def test_usb_adapters_without_a_serial_number_are_matched_by_location(tmp_path):
    """Two CH340s have the same ids and no serial number: only the USB
    port they are plugged into tells them apart."""
    found = adapters(tmp_path, ("ttyUSB0", "1a86", "7523", None, "1-1.2"),
                     ("ttyUSB1", "1a86", "7523", None, "1-1.4"))
    assert names("usb:1a86:7523", found) == ["ttyUSB0", "ttyUSB1"]
    assert names("usb:1a86:7523:ABC", found) == []
    assert names("usb@1-1.4", found) == ["ttyUSB1"]
    assert names("usb@1-1.2", found) == ["ttyUSB0"]


def test_usb_adapter_re_enumerated_under_a_new_name_is_still_found(tmp_path):
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.plug("ttyUSB0", "0403", "6001", "A10K1B2C", "1-1.2")
    assert names("usb:0403:6001:A10K1B2C", sertcp_module.usb_serial_adapters(str(sysfs.root))) == ["ttyUSB0"]
    sysfs.unplug("ttyUSB0")
    assert sertcp_module.usb_serial_adapters(str(sysfs.root)) == []
    sysfs.plug("ttyUSB3", "0403", "6001", "A10K1B2C", "1-1.2")
    assert names("usb:0403:6001:A10K1B2C", sertcp_module.usb_serial_adapters(str(sysfs.root))) == ["ttyUSB3"]


def test_a_platform_uart_is_not_a_usb_adapter(tmp_path):
    sysfs = FakeSysfs(tmp_path / "sys")
    tty = sysfs.root / "devices/platform/serial8250/tty/ttyS0"
    tty.mkdir(parents=True)
    os.symlink(os.path.relpath(tty, sysfs.root / "class/tty"), sysfs.root / "class/tty/ttyS0")
    assert sertcp_module.usb_serial_adapters(str(sysfs.root)) == []


def test_two_matches_are_an_error_naming_both(tmp_path, monkeypatch):
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.plug("ttyUSB0", "0403", "6001", "A1", "1-1.2")
    sysfs.plug("ttyUSB1", "0403", "6001", "B2", "1-1.3")
    monkeypatch.setenv("SERTCP_SYSFS", str(sysfs.root))
    monkeypatch.setenv("SERTCP_DEVROOT", str(tmp_path / "dev"))
    with pytest.raises(OSError, match=r"usb:0403:6001 matches 2 adapters: ttyUSB0 \(usb:0403:6001:A1 at "
                                      r"usb@1-1.2\), ttyUSB1 \(usb:0403:6001:B2 at usb@1-1.3\)"):
        sertcp_module.resolve_usb_device("usb:0403:6001")
    assert sertcp_module.resolve_usb_device("usb:0403:6001:B2")[0] == str(tmp_path / "dev" / "ttyUSB1")
    with pytest.raises(OSError, match="no USB serial adapter matches usb:0403:6001:C3"):
        sertcp_module.resolve_usb_device("usb:0403:6001:C3")


def usb_env(tmp_path):
    """A fake sysfs and a directory standing in for /dev, as the
    environment of a sertcp process (SERTCP_SYSFS, SERTCP_DEVROOT)."""
    sysfs = FakeSysfs(tmp_path / "sys")
    devroot = tmp_path / "dev"
    devroot.mkdir()
    env = dict(os.environ, SERTCP_SYSFS=str(sysfs.root), SERTCP_DEVROOT=str(devroot))
    return sysfs, devroot, env


def test_check_shows_what_a_usb_spec_resolves_to_now(tmp_path):
    import subprocess
    sysfs, devroot, env = usb_env(tmp_path)
    sysfs.plug("ttyUSB2", "0403", "6001", "A10K1B2C", "1-1.4")
    argv = [sys.executable, str(sertcp_module.__file__), "--check", "--listen", "7000"]
    r = subprocess.run(argv + ["usb:0403:6001:A10K1B2C"], capture_output=True, text=True, env=env, timeout=20)
    assert r.returncode == 0, r.stderr
    assert "# [cli] usb:0403:6001:A10K1B2C resolves now to %s/ttyUSB2: ttyUSB2 (usb:0403:6001:A10K1B2C at " \
           "usb@1-1.4)" % devroot in r.stdout
    r = subprocess.run(argv + ["usb@1-1.9"], capture_output=True, text=True, env=env, timeout=20)
    assert r.returncode == 0 and "# [cli] usb@1-1.9 resolves to nothing now: no USB serial adapter matches" in r.stdout


def test_usb_adapter_unplugged_and_back_under_another_name_with_a_client_connected(sertcp, pty_factory, tmp_path):
    """The adapter is ttyUSB0, then unplugged (its pty hangs up), then back
    as ttyUSB1: sertcp finds it in sysfs again and the client, connected
    all along, talks to it."""
    sysfs, devroot, env = usb_env(tmp_path)
    first = pty_factory()
    sysfs.plug("ttyUSB0", "0403", "6001", "A10K1B2C", "1-1.2")
    sysfs.plug("ttyUSB1", "0403", "6001", "OTHER001", "1-1.3")     # another adapter, same ids
    os.symlink(first.path, devroot / "ttyUSB0")
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--reopen-interval", "0.2",
               "usb:0403:6001:A10K1B2C", env=env)
    s.wait_log(r"device usb:0403:6001:A10K1B2C \(%s/ttyUSB0\) opened" % devroot)
    c = Client(port)
    try:
        first.write(b"one")
        assert c.recv(3) == b"one"
        c.send(b"ONE")
        assert first.read(3) == b"ONE"

        # unplugged: the tty hangs up, its sysfs entry and node go away
        sysfs.unplug("ttyUSB0")
        os.unlink(devroot / "ttyUSB0")
        first.close()
        s.wait_log(r"device usb:0403:6001:A10K1B2C .* lost")
        wait_for(lambda: json.loads(http_get(status, "/status")[1])["ports"][0]["device_state"] == "missing",
                 message="the device missing")
        assert s.log().count(" opened") == 1            # nothing else matched meanwhile

        # back as ttyUSB2 (ttyUSB1 is the other adapter)
        second = pty_factory()
        os.symlink(second.path, devroot / "ttyUSB2")
        sysfs.plug("ttyUSB2", "0403", "6001", "A10K1B2C", "1-1.2")
        s.wait_log(r"device usb:0403:6001:A10K1B2C \(%s/ttyUSB2\) opened" % devroot)
        second.write(b"two")
        assert c.recv(3) == b"two"
        c.send(b"TWO")
        assert second.read(3) == b"TWO"
        shown = json.loads(http_get(status, "/status")[1])["ports"][0]
        assert shown["device_path"] == str(devroot / "ttyUSB2") and shown["device_state"] == "open"
        assert len(shown["clients"]) == 1
    finally:
        c.close()


def test_usb_spec_matching_two_adapters_is_logged_naming_both(sertcp, tmp_path):
    sysfs, devroot, env = usb_env(tmp_path)
    sysfs.plug("ttyUSB0", "1a86", "7523", None, "1-1.2")
    sysfs.plug("ttyUSB1", "1a86", "7523", None, "1-1.4")
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "usb:1a86:7523", env=env)
    s.wait_log(r"usb:1a86:7523 matches 2 adapters: ttyUSB0 \(usb:1a86:7523:- at usb@1-1.2\), "
               r"ttyUSB1 \(usb:1a86:7523:- at usb@1-1.4\); add the serial number or use usb@LOCATION")


# --- pacing and break --------------------------------------------------------

def test_tx_char_delay_spaces_every_byte(serve, pty, clients):
    """20 ms after every byte: ten bytes sent in one write reach the pty
    one at a time, about 20 ms apart.  (The reader here may wake late and
    see two bytes close together, so the bounds are on the median gap,
    the whole span and the number of separate arrivals; without pacing
    the ten bytes come in one read.)"""
    s, port = serve(pty, "--tx-char-delay-ms", "20")
    c = clients(port)
    c.send(b"0123456789")
    arrivals = []
    reads = 0
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < deadline:
        r, _, _ = select.select([pty.master], [], [], 0.5)
        if r:
            chunk = os.read(pty.master, 100)
            now = time.monotonic()
            reads += 1
            for b in chunk:
                arrivals.append(now)
            got += chunk
    assert bytes(got) == b"0123456789"
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert gaps[len(gaps) // 2] >= 0.015, gaps
    assert 0.15 <= arrivals[-1] - arrivals[0] < 5.0, arrivals
    assert reads >= 6, reads


def test_tx_char_delay_takes_fractions_of_a_millisecond(serve, pty, clients):
    s, port = serve(pty, "--tx-char-delay-ms", "0.5")
    c = clients(port)
    data = bytes(range(200))
    c.send(data)
    started = time.monotonic()
    assert pty.read(200) == data
    assert time.monotonic() - started >= 199 * 0.0005 * 0.9


def test_break_on_connect_holds_the_break_that_long(sertcp, tmp_path):
    """On the simulated UART (a pty takes TIOCSBRK and does nothing):
    one break per connection, 0.5 s long."""
    uart = SimulatedUart(tmp_path / "uart")
    port = free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--break-on-connect", "0.5", uart.url, env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")
    for round in (1, 2):
        c = Client(port)
        s.wait_log(r"\[cli\] break for 0.5s \(break_on_connect\)", count=round)
        wait_for(lambda: [k for k, _ in uart.breaks()].count("off") == round, message="the break ended")
        c.close()
    breaks = uart.breaks()
    assert [kind for kind, _ in breaks] == ["on", "off", "on", "off"]
    for (_, start), (_, end) in (breaks[0:2], breaks[2:4]):
        assert 0.45 <= end - start < 3.0, breaks


def test_break_on_connect_leaves_the_data_alone(serve, pty, clients):
    s, port = serve(pty, "--break-on-connect", "0.2")
    c = clients(port)
    s.wait_log(r"\[cli\] break for 0.2s \(break_on_connect\)|break_on_connect: %s refused the break" % pty.path)
    pty.write(b"still served")
    assert c.recv(12) == b"still served"
    c.send(b"and back")
    assert pty.read(8) == b"and back"


# --- notices to the device ---------------------------------------------------

def test_notices_around_a_client_connecting_and_leaving(serve, pty, clients):
    s, port = serve(pty, "--device-connect-msg", r"CONNECT\r\n", "--device-disconnect-msg", r"NO CARRIER\r\n")
    c = clients(port)
    assert pty.read(9) == b"CONNECT\r\n"
    c.send(b"ATI\r")
    assert pty.read(4) == b"ATI\r"
    c.close()
    assert pty.read(12) == b"NO CARRIER\r\n"
    c2 = clients(port)
    assert pty.read(9) == b"CONNECT\r\n"
    c2.close()
    assert pty.read(12) == b"NO CARRIER\r\n"
    assert pty.read_available(0.3) == b""


def test_notices_around_dialing_failing_and_succeeding(sertcp, pty):
    """Client role: every failed round is UNREACHABLE; once the peer
    listens, CONNECT; when the peer hangs up, DISCONNECT, and the
    next failed round UNREACHABLE again."""
    peer_port = free_port()
    s = sertcp("--connect", "127.0.0.1:%d" % peer_port, "--reconnect-min", "0.2", "--reconnect-max", "0.2",
               "--device-connect-msg", "C;", "--device-disconnect-msg", "D;", "--device-unreachable-msg", "U;",
               pty.path)
    s.wait_log(r"every peer failed", count=2)
    assert pty.read(4) == b"U;U;"
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", peer_port))
    listener.listen(1)
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        s.wait_log(r"connected to 127.0.0.1:%d" % peer_port)
        got = pty.read_available(0.5)
        # rounds that failed before the listener was up, then CONNECT
        assert got.endswith(b"C;") and set(got[:-2].split(b";")) <= {b"U", b""}, got
        listener.close()
        conn.sendall(b"hello")
        assert pty.read(5) == b"hello"
        conn.close()
        s.wait_log(r"peer 127.0.0.1:%d disconnected" % peer_port)
        assert pty.read(4) == b"D;U;"   # (and U; again every 0.2 s)
    finally:
        listener.close()


def test_notice_keys_are_checked():
    r = run_sertcp(["--check", "--listen", "7000", "--device-unreachable-msg", "X", "/dev/ttyS0"])
    assert r.returncode == 2 and "--device-unreachable-msg: needs connect" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--protocol", "modbus", "--device-connect-msg", "X", "/dev/ttyS0"])
    assert r.returncode == 2 and "a notice would corrupt the RTU bus" in r.stderr


# --- heartbeat ---------------------------------------------------------------

def test_heartbeat_on_an_idle_dialed_connection(sertcp, pty):
    """Every 0.3 s of silence the peer gets the heartbeat; traffic resets
    the count, so a connection that carries data gets none."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer_port = listener.getsockname()[1]
    s = sertcp("--connect", "127.0.0.1:%d" % peer_port, "--heartbeat-interval", "0.3",
               "--heartbeat-data", r"\xfe", pty.path)
    listener.settimeout(10)
    conn, _ = listener.accept()
    listener.close()
    try:
        conn.settimeout(5)
        assert conn.recv(1) == b"\xfe"
        first = time.monotonic()
        assert conn.recv(1) == b"\xfe"
        assert time.monotonic() - first >= 0.2        # 0.3 s, less what this reader was late for the first
        # traffic every 0.1 s for a second: no heartbeat among it
        got = bytearray()
        for i in range(10):
            pty.write(b"d")
            deadline = time.monotonic() + 0.1
            while time.monotonic() < deadline:
                r, _, _ = select.select([conn], [], [], max(0, deadline - time.monotonic()))
                if r:
                    got += conn.recv(100)
        got += b"".join(iter(lambda: conn.recv(1) if select.select([conn], [], [], 0.05)[0] else b"", b""))
        # at most one heartbeat already on its way when traffic began
        assert got.count(b"d") == 10 and got.replace(b"d", b"") in (b"", b"\xfe"), got
    finally:
        conn.close()


def test_heartbeat_keys_are_checked():
    r = run_sertcp(["--check", "--connect", "127.0.0.1:7000", "--heartbeat-interval", "30", "/dev/ttyS0"])
    assert r.returncode == 2 and "heartbeat_data: heartbeat_interval is set" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--heartbeat-interval", "30", "--heartbeat-data", "x", "/dev/ttyS0"])
    assert r.returncode == 2 and "--heartbeat-interval: needs connect" in r.stderr


# --- modem lines that drive connections --------------------------------------

def test_server_role_accepts_only_while_dsr_is_on_and_closes_when_dcd_drops(sertcp, tmp_path):
    uart = SimulatedUart(tmp_path / "uart")
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--connect-on-line", "dsr",
               "--disconnect-on-line", "dcd", "--max-clients", "4", uart.url, env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")
    refused = Client(port)
    assert refused.closed_by_peer(5)
    s.wait_log(r"client 127.0.0.1:\d+ rejected: DSR is off \(connect_on_line\)")
    uart.set("DSR", "CD")
    s.wait_log(r"DSR on \(connect_on_line\): connections allowed")
    a, b = Client(port), Client(port)
    try:
        a.send(b"to the device")
        wait_for(lambda: uart.sent() == b"to the device", message="data through the simulated UART")
        lines = json.loads(http_get(status, "/status")[1])["ports"][0]["modem_lines"]
        assert lines["dsr"] and lines["cd"] and not lines["cts"]
        uart.set("DSR")                  # carrier lost
        s.wait_log(r"CD went off \(disconnect_on_line\): closing 2 connections")
        assert a.closed_by_peer(5) and b.closed_by_peer(5)
        c = Client(port)                 # DSR is still on: accepted
        c.send(b"!")
        wait_for(lambda: uart.sent().endswith(b"!"), message="the new client's byte")
        c.close()
    finally:
        a.close()
        b.close()
        refused.close()


def test_client_role_dials_only_while_dcd_is_on_and_hangs_up_when_it_drops(sertcp, tmp_path):
    uart = SimulatedUart(tmp_path / "uart")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    peer_port = listener.getsockname()[1]
    s = sertcp("--connect", "127.0.0.1:%d" % peer_port, "--connect-on-line", "dcd", "--disconnect-on-line", "dcd",
               "--reconnect-min", "0.1", uart.url, env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")
    with pytest.raises(socket.timeout):
        listener.accept()               # DCD off: no dial (for the half second the accept waits)
    assert "dialing" not in s.log()
    uart.set("CD")
    listener.settimeout(10)
    conn, _ = listener.accept()
    try:
        conn.sendall(b"hi")
        wait_for(lambda: uart.sent() == b"hi", message="peer data on the UART")
        uart.set()
        s.wait_log(r"CD went off \(disconnect_on_line\): closing 1 connection")
        conn.settimeout(5)
        assert conn.recv(10) == b""
        listener.settimeout(0.5)
        with pytest.raises(socket.timeout):
            listener.accept()           # and no redial while DCD stays off
        uart.set("CD")
        listener.settimeout(10)
        again, _ = listener.accept()
        again.close()
    finally:
        conn.close()
        listener.close()


def test_line_keys_are_checked(tmp_path):
    r = run_sertcp(["--check", "--listen", "7000", "--connect-on-line", "ri", "/dev/ttyS0"])
    assert r.returncode == 2 and "expected one of: none, dsr, dcd, cts" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--connect-on-line", "dsr", "--open-on-demand", "yes", "/dev/ttyS0"])
    assert r.returncode == 2 and "cannot go with open_on_demand" in r.stderr
    r = run_sertcp(["--check", "--listen", "7000", "--disconnect-on-line", "cts", "--virtual", str(tmp_path / "v")])
    assert r.returncode == 2 and "a virtual port has no RS-485 mode, modem lines or break" in r.stderr


# --- devices that are not ttys -----------------------------------------------

def test_a_fifo_is_served_as_a_byte_stream(sertcp, tmp_path, clients):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    port, status = free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--baudrate", "115200",
               str(fifo))
    s.wait_log(r"device %s opened" % fifo)
    c = clients(port)
    s.wait_log(r"client 127.0.0.1:\d+ connected")
    writer = os.open(str(fifo), os.O_WRONLY)
    try:
        os.write(writer, b"line one\n")
        assert c.recv(9) == b"line one\n"
    finally:
        os.close(writer)                # a writer leaving is no end of the device
    writer = os.open(str(fifo), os.O_WRONLY)
    try:
        os.write(writer, b"line two\n")
        assert c.recv(9) == b"line two\n"
    finally:
        os.close(writer)
    c.send(b"not echoed")
    wait_for(lambda: json.loads(http_get(status, "/status")[1])["ports"][0]["bytes_dropped"] == 10,
             message="client data to a FIFO counted as dropped")
    assert c.recv_available(0.3) == b""
    shown = json.loads(http_get(status, "/status")[1])["ports"][0]
    assert shown["settings"] == "not applicable (not a tty)" and shown["device_state"] == "open"
    r = run_sertcp(["--check", "--listen", "7000", str(fifo)])
    assert "# [cli] %s is not a tty: served as a byte stream; baudrate, bytesize, parity, stopbits, flow " \
           "and rs485 do not apply" % fifo in r.stdout


def test_a_character_device_that_is_no_tty_is_a_stream_and_a_pty_is_not(pty):
    assert sertcp_module.is_stream_device("/dev/null")           # sysfs: devices/virtual/mem/null
    assert not sertcp_module.is_stream_device(pty.path)          # a pty: not in sysfs, a tty as before
    assert not sertcp_module.is_stream_device("/dev/tty")        # sysfs: devices/virtual/tty/tty
    assert not sertcp_module.is_stream_device("/nonexistent/ttyUSB9")
    assert not sertcp_module.is_stream_device("usb:0403:6001")


def test_the_device_keys_import_nothing_heavy(pty, tmp_path):
    """RS-485, pacing, notices and break use what a tty port already has
    (fcntl, struct through pyserial): the start-up budget stays."""
    from test_ops import HEAVY, imported_modules
    port = free_port()
    names = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--rs485", "yes", "--tx-char-delay-ms",
                              "0.5", "--device-connect-msg", "C", "--break-on-connect", "0.1"], tmp_path, port)
    assert not (names & HEAVY), sorted(names & HEAVY)
