"""Faults found by attacking the modem emulation, the monitors and the
trace rollover as a broken peer or an unlucky operator would: each test
failed before its fix."""
import json
import os
import random
import re
import shutil
import threading
import time

import sertcp as sertcp_module
from conftest import Client, free_port, http_get, wait_for


def status_of(status_port, name="cli"):
    ports = json.loads(http_get(status_port, "/status")[1])["ports"]
    return next(p for p in ports if p["name"] == name)


def random_stream(seed, n):
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little")


def write_unread(pty, total, limit=30.0):
    """Write `total` bytes to the device side without reading what comes
    back; bounded in time as well as in count."""
    chunk = b"x" * 65536
    sent, deadline = 0, time.monotonic() + limit
    while sent < total and time.monotonic() < deadline:
        try:
            sent += os.write(pty.master, chunk[:total - sent])
        except BlockingIOError:
            time.sleep(0.001)
    return sent


# --- modem: a device that types without reading its echo ---------------------------

def test_modem_echo_to_a_device_that_does_not_read_is_bounded(sertcp, pty):
    """16 MiB typed in command mode by a device that never reads used to sit
    in the device's write queue as echo (RSS +17 MB, all of it queued, none
    of it counted);
    now what does not fit is dropped and counted, and the modem still
    answers once the device reads again."""
    status = free_port()
    s = sertcp("--modem", "yes", "--status", "127.0.0.1:%d" % status, pty.path)
    s.wait_log(r"device \S+ opened")
    total = 2 << 20
    assert write_unread(pty, total) == total
    wait_for(lambda: status_of(status)["bytes_from_device"] == total, 30, message="all typed bytes read")
    dropped = status_of(status)["bytes_dropped"]
    assert dropped >= total - 4 * sertcp_module.DEVICE_HIGH_WATER
    pty.read_available()                                 # the device reads again
    pty.write(b"\rATE0\r")
    assert pty.read_available(1.0).endswith(b"OK\r\n")
    pty.write(b"AT\r")
    assert pty.read(6) == b"\r\nOK\r\n"


# --- traces: tiny trace_max_size, a directory that goes away -------------------------

def test_a_raw_trace_with_a_tiny_max_size_renames_at_most_twice_per_write(tmp_path, monkeypatch):
    """trace_max_size = 7 with a 1 MiB chunk renamed the file 150,000 times
    (the port stalled: 3 KB/s through it); the generations in between are
    replaced at once, so only the last two are written."""
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append(a), real_replace(a, b)))
    path = str(tmp_path / "t")
    rolling = sertcp_module.RollingFile(path, 7, sertcp_module.open_trace_file, strict=True)
    stream = random_stream(3, 1 << 20) + b"tail"
    rolling.write(stream[:5], divisible=True)
    rolling.write(stream[5:], divisible=True)
    rolling.close()
    assert len(renames) <= 3
    kept = (tmp_path / "t.1").read_bytes() + (tmp_path / "t").read_bytes()
    assert len((tmp_path / "t.1").read_bytes()) == 7 and len(kept) < 14
    assert stream.endswith(kept)


def test_a_raw_trace_of_one_byte_keeps_up_with_the_port(serve, pty, tmp_path):
    trace = tmp_path / "t"
    s, port = serve(pty, "--trace", trace, "--trace-format", "raw", "--trace-max-size", "1")
    c = Client(port)
    data = random_stream(4, 1 << 20)
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(pty.read(len(data), timeout=60)))
    reader.start()
    started = time.monotonic()
    c.sock.sendall(data)
    reader.join(70)
    assert bytes(got) == data
    assert time.monotonic() - started < 20            # was minutes: a rename per byte
    assert (tmp_path / "t.1").read_bytes() == data[-1:]


def test_a_trace_whose_directory_is_removed_is_disabled_once_and_the_port_goes_on(serve, pty, tmp_path):
    """The directory removed under a rolling trace: the rollover failed at
    every write and the trace went on, silently, into the deleted file far
    past trace_max_size (4 MB into a 4 KiB trace on a router's RAM disk)."""
    folder = tmp_path / "traces"
    folder.mkdir()
    s, port = serve(pty, "--trace", folder / "t", "--trace-format", "raw", "--trace-max-size", "4k")
    c = Client(port)
    c.send(b"before")
    assert pty.read(6) == b"before"
    shutil.rmtree(str(folder))
    data = b"y" * (1 << 20)
    reader = threading.Thread(target=lambda: got.extend(pty.read(len(data), timeout=30)))
    got = bytearray()
    reader.start()
    c.sock.sendall(data)
    reader.join(40)
    assert len(got) == len(data)                       # the bridge went on
    s.wait_log(r"trace \S+ disabled")
    assert len(re.findall(r"trace \S+ disabled", s.log())) == 1
    held = [os.readlink("/proc/%d/fd/%s" % (s.proc.pid, fd)) for fd in os.listdir("/proc/%d/fd" % s.proc.pid)]
    assert not [h for h in held if str(folder) in h], held


# --- modem: the device unplugged while a call rings ------------------------------

def test_a_call_ringing_when_the_device_is_unplugged_is_refused(sertcp, pty):
    """The pty closed (a USB adapter pulled) while a call rang: the modem
    went on ringing at nobody for as long as the caller waited (or
    answered by S0 into a missing device), and took new calls while the
    device was missing."""
    listen, status = free_port(), free_port()
    s = sertcp("--modem", "yes", "--listen", listen, "--status", "127.0.0.1:%d" % status, pty.path)
    s.wait_listening(listen)
    s.wait_log(r"device \S+ opened")
    caller = Client(listen)
    assert pty.read(8) == b"\r\nRING\r\n"
    pty.close()
    assert caller.closed_by_peer()
    wait_for(lambda: status_of(status)["modem"]["state"] == "command", message="back in command mode")
    assert status_of(status)["device_state"] != "open"
    late = Client(listen)
    assert late.closed_by_peer()
    s.wait_log(r"refused: device \S+ is not open")


# --- modem: a device that dials a slow name in a loop ----------------------------

SLOW_RESOLVER = '''
import _socket, time
_real = _socket.getaddrinfo
def _slow(host, *args, **kw):
    name = host.decode() if isinstance(host, bytes) else host
    if name and name.endswith(".slow"):       # a name server that does not answer
        time.sleep(30)
        raise _socket.gaierror(-2, "no answer")
    return _real(host, *args, **kw)
_socket.getaddrinfo = _slow
'''


def test_dials_given_up_while_a_name_resolves_do_not_pile_up_threads(sertcp, pty, tmp_path):
    """ATD to a name whose lookup hangs, a key (NO CARRIER), again: each
    dial started a lookup thread that lingered until the resolver gave up
    (200 dials in 2 s: 201 threads); now at most MODEM_LOOKUPS run, and a
    dial beyond them fails at once."""
    (tmp_path / "slowdns").mkdir()
    (tmp_path / "slowdns" / "sitecustomize.py").write_text(SLOW_RESOLVER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "slowdns"))
    s = sertcp("--modem", "yes", pty.path, env=env)
    s.wait_log(r"device \S+ opened")
    lookups = getattr(sertcp_module, "MODEM_LOOKUPS", 4)
    pty.write(b"ATE0\r")
    assert pty.read(11) == b"ATE0\r\r\nOK\r\n"
    for n in range(12):
        pty.write(b"ATDhost.slow:1\r")
        s.wait_log(r"modem dialing host\.slow:1", count=n + 1)
        if n < lookups:
            pty.write(b"x")             # a key gives the dial up; the lookup goes on
        assert pty.read(14) == b"\r\nNO CARRIER\r\n"
    threads = len(os.listdir("/proc/%d/task" % s.proc.pid))
    assert threads <= 1 + lookups
    s.wait_log(r"name lookups still under way")
