"""Watching a port: monitors (read-only listeners that stream a copy of
both directions), traces that roll over and reopen at SIGHUP, and listen
addresses that cannot be bound yet at start."""
import json
import os
import random
import re
import select
import signal
import socket
import time

from conftest import Client, free_port, http_get, random_bytes, wait_for


def status_of(status_port, name="cli"):
    ports = json.loads(http_get(status_port, "/status")[1])["ports"]
    return next(p for p in ports if p["name"] == name)


def start_with_monitor(sertcp, pty, *flags):
    """sertcp on pty with a listen port, a monitor port and a status port;
    returns (process, listen, monitor, status) once all three listen."""
    listen, monitor, status = free_port(), free_port(), free_port()
    s = sertcp("--listen", "127.0.0.1:%d" % listen, "--monitor", "127.0.0.1:%d" % monitor,
               "--status", "127.0.0.1:%d" % status, *flags, pty.path)
    s.wait_log(r"\[cli\] monitor \(\w+\) listening on 127\.0\.0\.1:%d" % monitor)
    s.wait_listening(listen)
    s.wait_log(r"status endpoint on")
    s.wait_log(r"\[cli\] device \S+ opened")
    return s, listen, monitor, status


def watch(monitor_port, s, source=None):
    """A monitor connected and seen by the port."""
    m = Client(monitor_port, source=source)
    s.wait_log(r"\] monitor 127\.0\.0\.\d+:%d connected" % m.sock.getsockname()[1])
    return m


def exchange(c, pty, to_device, from_device):
    """One round: the client's bytes reach the device, then the device's
    bytes reach the client (so the order on the wire is known)."""
    c.send(to_device)
    assert pty.read(len(to_device)) == to_device
    pty.write(from_device)
    assert c.recv(len(from_device)) == from_device


# --- what a monitor shows ---------------------------------------------------

HEX_HEAD = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}) ([<>]) (\S+) (\d+) bytes$")


def hex_records(text):
    """[(stamp, direction, peer, bytes)] from hexdump lines."""
    records = []
    for line in text.splitlines():
        head = HEX_HEAD.match(line)
        if head:
            records.append([head.group(1), head.group(2), head.group(3), bytearray()])
            continue
        direction, offset, rest = line[0], line[2:6], line[8:]
        assert direction == records[-1][1] and int(offset, 16) == len(records[-1][3]), line
        records[-1][3] += bytes.fromhex(rest[:47])
    return [(stamp, d, peer, bytes(data)) for stamp, d, peer, data in records]


def test_a_hex_monitor_sees_both_directions_marked_and_timestamped(sertcp, pty):
    s, listen, monitor, _ = start_with_monitor(sertcp, pty)
    m = watch(monitor, s)
    c = Client(listen)
    peer = "127.0.0.1:%d" % c.sock.getsockname()[1]
    before = time.time()
    exchange(c, pty, b"ATI\r\n", b"modem 1.0 \x00\xff\r\n")
    exchange(c, pty, b"x" * 40, b"OK")
    text = b""
    while text.count(b" bytes\n") < 4:
        text += m.sock.recv(65536)
    records = hex_records(text.decode())
    assert [(d, p, data) for _, d, p, data in records] == [
        (">", peer, b"ATI\r\n"), ("<", peer, b"modem 1.0 \x00\xff\r\n"), (">", peer, b"x" * 40), ("<", peer, b"OK")]
    stamps = [time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) for stamp, *_ in records]
    assert all(before - 2 <= t <= time.time() + 1 for t in stamps) and stamps == sorted(stamps)
    assert "|modem 1.0 .." in text.decode()      # the printable column, as the trace writes it
    m.close()
    c.close()


def test_a_raw_monitor_gets_the_bytes_of_both_directions_exactly_in_order(sertcp, pty):
    s, listen, monitor, _ = start_with_monitor(sertcp, pty, "--monitor-format", "raw")
    m = watch(monitor, s)
    c = Client(listen)
    rnd = random.Random(7)
    expected = b""
    for n in range(20):
        to_device, from_device = random_bytes(rnd, rnd.randint(1, 3000)), random_bytes(rnd, rnd.randint(1, 3000))
        exchange(c, pty, to_device, from_device)
        expected += to_device + from_device
    assert m.recv(len(expected)) == expected
    assert m.recv_available(0.2) == b""
    m.close()
    c.close()


def test_several_monitors_see_the_same_traffic_and_none_is_a_client(sertcp, pty):
    # max_clients = 1 and send_to = first: three monitors take no client's place
    s, listen, monitor, status = start_with_monitor(sertcp, pty, "--monitor-format", "raw", "--send-to", "first")
    monitors = [watch(monitor, s) for _ in range(3)]
    c = Client(listen)
    exchange(c, pty, b"to the device", b"from the device")
    for m in monitors:
        assert m.recv(28) == b"to the devicefrom the device"
    st = status_of(status)
    assert len(st["clients"]) == 1 and st["connections_rejected"] == 0
    assert len(st["monitor"]["monitors"]) == 3 and st["monitor"]["error"] is None
    monitors[1].close()
    wait_for(lambda: len(status_of(status)["monitor"]["monitors"]) == 2, message="a monitor gone")
    exchange(c, pty, b"on", b"off")
    assert monitors[0].recv(5) == monitors[2].recv(5) == b"onoff"
    c.close()


def test_at_most_eight_monitors_watch_a_port(sertcp, pty):
    s, listen, monitor, status = start_with_monitor(sertcp, pty, "--monitor-format", "raw")
    monitors = [watch(monitor, s) for _ in range(8)]
    ninth = Client(monitor)
    assert ninth.closed_by_peer()
    s.wait_log(r"\[cli\] monitor 127\.0\.0\.1:%d refused: 8 monitors already watch" % ninth.sock.getsockname()[1])
    c = Client(listen)
    exchange(c, pty, b"eight", b" see it")
    assert [m.recv(12) for m in monitors] == [b"eight see it"] * 8


def test_what_a_monitor_sends_is_read_and_ignored(sertcp, pty):
    s, listen, monitor, status = start_with_monitor(sertcp, pty, "--monitor-format", "raw")
    m = watch(monitor, s)
    m.send(b"AT+RESET\r\n" * 100)
    wait_for(lambda: status_of(status)["monitor_bytes_ignored"] == 1000, message="the monitor's bytes counted")
    assert pty.read_available(0.2) == b""
    c = Client(listen)
    exchange(c, pty, b"real", b"reply")
    assert m.recv(9) == b"realreply"
    st = status_of(status)
    assert st["bytes_to_device"] == 4 and st["bytes_dropped"] == 0
    metrics = http_get(status, "/metrics")[1]
    assert 'sertcp_monitor_bytes_ignored_total{port="cli"} 1000' in metrics
    assert 'sertcp_monitor_bytes_dropped_total{port="cli"} 0' in metrics


def test_allow_applies_to_monitors(sertcp, pty):
    s, listen, monitor, _ = start_with_monitor(sertcp, pty, "--allow", "127.0.0.2", "--monitor-format", "raw")
    refused = Client(monitor, source="127.0.0.1")
    assert refused.closed_by_peer()
    s.wait_log(r"\[cli\] monitor 127\.0\.0\.1:\d+ refused: address not allowed")
    m = watch(monitor, s, source="127.0.0.2")
    c = Client(listen, source="127.0.0.2")
    exchange(c, pty, b"q", b"a")
    assert m.recv(2) == b"qa"


def test_a_reload_keeps_a_watched_port_and_its_monitors_and_moves_a_changed_monitor(sertcp, pty, tmp_path):
    listen, monitor, other = free_port(), free_port(), free_port()
    trace = tmp_path / "both.trace"
    ini = ("[p]\ndevice = %s\nlisten = 127.0.0.1:%d\nmonitor = 127.0.0.1:%%d\nmonitor_format = raw\n"
           "trace = %s\ntrace_format = raw\n" % (pty.path, listen, trace))
    s = sertcp(config=ini % monitor)
    s.wait_log(r"\[p\] monitor \(raw\) listening on 127\.0\.0\.1:%d" % monitor)
    s.wait_log(r"\[p\] device \S+ opened")
    m = Client(monitor)
    s.wait_log(r"\[p\] monitor 127\.0\.0\.1:\d+ connected")
    c = Client(listen)
    exchange(c, pty, b"one", b"two")
    assert m.recv(6) == b"onetwo"
    s.signal(signal.SIGHUP)
    s.wait_log(r"reloaded: kept p")
    exchange(c, pty, b"three", b"four")
    assert m.recv(9) == b"threefour"                 # the trace and the monitor, both
    wait_for(lambda: trace.read_bytes() == b"onetwothreefour", message="the trace")
    s.config.write_text(ini % other)
    s.signal(signal.SIGHUP)
    s.wait_log(r"\[p\] monitor \(raw\) listening on 127\.0\.0\.1:%d" % other)
    assert m.closed_by_peer()
    moved = watch(other, s)
    c = Client(listen)
    exchange(c, pty, b"five", b"six")
    assert moved.recv(7) == b"fivesix"


# --- a monitor that falls behind --------------------------------------------

STREAM = 16 << 20


def stream_to_device(listen, pty):
    """A client sends STREAM bytes while the test reads them from the
    device; returns the seconds it took, checking every byte."""
    payload = random_bytes(random.Random(3), STREAM)
    c = Client(listen)
    c.sock.setblocking(False)
    got = bytearray()
    sent = 0
    started = time.monotonic()
    deadline = started + 120
    while len(got) < STREAM:
        assert time.monotonic() < deadline, "stalled at %d of %d bytes" % (len(got), STREAM)
        want_write = [c.sock] if sent < STREAM else []
        readable, writable, _ = select.select([pty.master], want_write, [], 1.0)
        if writable:
            try:
                sent += c.sock.send(payload[sent:sent + (1 << 18)])
            except BlockingIOError:
                pass
        if readable:
            try:
                got += os.read(pty.master, 1 << 16)
            except BlockingIOError:
                pass
    took = time.monotonic() - started
    assert bytes(got) == payload
    c.close()
    return took


def test_a_monitor_that_never_reads_neither_slows_the_client_nor_grows(sertcp, pty):
    s, listen, monitor, status = start_with_monitor(sertcp, pty, "--monitor-format", "raw")
    alone = stream_to_device(listen, pty)
    m = socket.socket()
    m.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)      # fills at once
    m.connect(("127.0.0.1", monitor))
    s.wait_log(r"\[cli\] monitor 127\.0\.0\.1:%d connected" % m.getsockname()[1])
    watched = stream_to_device(listen, pty)
    st = status_of(status)
    dropped = st["monitor_bytes_dropped"]
    assert dropped > STREAM // 2, st
    assert st["bytes_dropped"] == 0 and st["bytes_to_device"] == 2 * STREAM
    assert st["monitor"]["monitors"][0]["queued"] <= 256 * 1024 + 65536
    # full speed: the same run with the monitor attached, with a wide margin
    assert watched < 4 * alone + 1.5, (alone, watched)
    # what the monitor did get, and what it lost, make up the stream exactly
    m.settimeout(5)
    received = 0
    while received + dropped < STREAM:
        chunk = m.recv(1 << 16)
        assert chunk, "monitor closed after %d bytes" % received
        received += len(chunk)
    assert received + dropped == STREAM
    m.close()
    print("16 MiB to the device: %.2fs alone, %.2fs with a monitor that does not read" % (alone, watched))


def test_a_hex_monitor_is_told_how_much_it_missed(sertcp, pty):
    s, listen, monitor, status = start_with_monitor(sertcp, pty)
    m = socket.socket()
    m.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    m.connect(("127.0.0.1", monitor))
    s.wait_log(r"\[cli\] monitor 127\.0\.0\.1:%d connected" % m.getsockname()[1])
    c = Client(listen)
    chunk = b"\x55" * 65536
    for _ in range(64):                 # 4 MiB, far more than the monitor's backlog
        c.send(chunk)
        assert pty.read(len(chunk)) == chunk
    dropped = status_of(status)["monitor_bytes_dropped"]
    assert dropped > 0
    m.settimeout(5)
    text = b""
    while status_of(status)["monitor"]["monitors"][0]["queued"]:
        text += m.recv(1 << 16)         # the backlog drains...
    exchange(c, pty, b"after", b"the flood")
    while not text.endswith(b"|the flood|\n"):
        text += m.recv(1 << 16)         # ...and the next record says what was lost before it
    said = [int(n) for n in re.findall(rb"^! (\d+) bytes not shown: this monitor fell behind$", text, re.M)]
    assert said and sum(said) == dropped == status_of(status)["monitor_bytes_dropped"]
    m.close()


# --- traces: rollover and SIGHUP --------------------------------------------

def test_a_raw_trace_rolls_over_at_exactly_trace_max_size(serve, pty, tmp_path):
    trace = tmp_path / "port.trace"
    s, port = serve(pty, "--trace", trace, "--trace-format", "raw", "--trace-max-size", "1000")
    c = Client(port)
    data = random_bytes(random.Random(5), 2500)
    for offset in range(0, 2500, 300):       # chunks that do not line up with 1000
        exchange(c, pty, data[offset:offset + 150], data[offset + 150:offset + 300])
    wait_for(lambda: trace.stat().st_size == 500, message="the last 500 bytes in the new file")
    assert (tmp_path / "port.trace.1").read_bytes() == data[1000:2000]
    assert trace.read_bytes() == data[2000:]


def test_a_hex_trace_rolls_over_after_whole_records(serve, pty, tmp_path):
    trace = tmp_path / "port.trace"
    s, port = serve(pty, "--trace", trace, "--trace-max-size", "1k")
    c = Client(port)
    for n in range(12):
        exchange(c, pty, b"request %d" % n, b"reply %d" % n)
    rolled = tmp_path / "port.trace.1"
    wait_for(rolled.exists, message="a rollover")
    older = rolled.read_text()
    assert 1024 <= len(older) < 1024 + 200           # one record past the size at most
    assert HEX_HEAD.match(older.splitlines()[0]) and older.endswith("|\n")
    records = hex_records(older) + hex_records(trace.read_text())
    assert records[-1][3] == b"reply 11" and trace.stat().st_size < 1024


def test_a_trace_is_reopened_at_sighup_after_logrotate_moved_it(serve, pty, tmp_path):
    trace = tmp_path / "port.trace"
    s, port = serve(pty, "--trace", trace, "--trace-format", "raw")
    c = Client(port)
    exchange(c, pty, b"before", b" rotation")
    wait_for(lambda: trace.stat().st_size == 15, message="traced")
    moved = tmp_path / "port.trace.2026"
    trace.rename(moved)
    s.signal(signal.SIGHUP)
    s.wait_log("SIGHUP received")
    wait_for(trace.exists, message="a new trace file")
    exchange(c, pty, b"after", b" it")
    wait_for(lambda: trace.stat().st_size == 8, message="traced")
    assert moved.read_bytes() == b"before rotation" and trace.read_bytes() == b"after it"


# --- listen addresses not there yet, or in use, at start --------------------

def test_an_address_not_on_this_machine_yet_is_retried_and_shown_in_status(sertcp, pty):
    # 10.255.255.1 is on no interface here: bind() fails locally with
    # EADDRNOTAVAIL, as for an interface not up yet at boot
    listen, status = free_port(), free_port()
    s = sertcp("--listen", "10.255.255.1:%d" % listen, "--reopen-interval", "0.2",
               "--status", "127.0.0.1:%d" % status, pty.path)
    s.wait_log(r"\[cli\] cannot listen on 10\.255\.255\.1:%d: .*; retrying every 0.2s" % listen)
    s.wait_log(r"\[cli\] device \S+ opened")     # the rest of the port works meanwhile
    st = status_of(status)
    assert st["listen_error"] == "Cannot assign requested address" and st["open"]
    listener = json.loads(http_get(status, "/status")[1])["listeners"][0]
    assert listener["error"] == "Cannot assign requested address"
    # several retries later: still up, and said once
    wait_for(lambda: json.loads(http_get(status, "/status")[1])["uptime"] > 1.0, message="a few retries")
    assert s.proc.poll() is None and s.log().count("retrying") == 1


def test_addresses_in_use_at_start_are_retried_until_free(sertcp, pty):
    """listen, monitor and status each held by another program at start:
    the process stays up and each comes up within a few reopen_intervals
    of being freed."""
    holders = []
    for _ in range(3):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        holders.append(holder)
    listen, monitor, status = (h.getsockname()[1] for h in holders)
    s = sertcp("--listen", "127.0.0.1:%d" % listen, "--monitor", "127.0.0.1:%d" % monitor,
               "--monitor-format", "raw", "--status", "127.0.0.1:%d" % status, "--reopen-interval", "0.2", pty.path)
    for name, number in (("cli", listen), ("cli", monitor), ("status", status)):
        s.wait_log(r"\[%s\] cannot listen on 127\.0\.0\.1:%d: Address already in use; retrying every [\d.]+s"
                   % (name, number))    # (status: every 2s, reopen_interval's default)
    holders[2].close()
    s.wait_log("status endpoint on")
    st = status_of(status)
    assert st["listen_error"] == st["monitor"]["error"] == "Address already in use"
    holders[0].close()
    s.wait_listening(listen)
    wait_for(lambda: status_of(status)["listen_error"] is None, message="listening")
    c = Client(listen)
    exchange(c, pty, b"up", b"at last")
    holders[1].close()
    s.wait_log(r"\[cli\] monitor \(raw\) listening on 127\.0\.0\.1:%d" % monitor)
    m = watch(monitor, s)
    exchange(c, pty, b"and", b" watched")
    assert m.recv(11) == b"and watched"
    assert s.log().count("cannot listen") == 3           # said once each, not at every retry


def test_a_monitor_on_the_listen_address_is_a_configuration_error(tmp_path):
    from conftest import run_sertcp
    result = run_sertcp(["--check", "--listen", "7000", "--monitor", "7000", str(tmp_path / "tty")])
    assert result.returncode == 2
    assert "monitor" in result.stderr and "needs one of its own" in result.stderr
