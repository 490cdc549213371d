"""Running unattended: /status and /metrics, SIGHUP reload, SIGUSR1,
traces, log files, pidfile, service files, and what is imported."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SERTCP, Client, Sertcp, free_port, http_get, need_programs, run_sertcp, wait_for


def raw_http(port, request, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_status_and_metrics_count_the_bytes_moved(sertcp, pty, clients):
    port, status = free_port(), free_port()
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status,
               "--max-clients", "2", wait_port=port)
    s.wait_log("status endpoint on")
    a, b = clients(port), clients(port)
    s.wait_log("connected \\(2 of 2\\)")
    pty.write(b"x" * 1000)
    assert a.recv(1000) == b"x" * 1000 and b.recv(1000) == b"x" * 1000
    a.send(b"y" * 300)
    assert pty.read(300) == b"y" * 300

    code, body = http_get(status, "/status")
    assert code == 200
    doc = json.loads(body)
    (p,) = doc["ports"]
    assert p["name"] == "cli" and p["device"] == pty.path and p["open"] is True
    assert p["device_state"] == "open" and doc["internal_errors"] == 0
    assert p["settings"] == {"baudrate": 9600, "bytesize": 8, "parity": "none", "stopbits": "1", "flow": "none"}
    assert p["bytes_from_device"] == 1000 and p["bytes_to_device"] == 300
    assert p["connections_total"] == 2 and p["connections_rejected"] == 0
    assert p["bytes_dropped"] == p["dials_failed"] == p["device_errors"] == 0
    assert sorted(c["bytes_out"] for c in p["clients"]) == [1000, 1000]
    assert sorted(c["bytes_in"] for c in p["clients"]) == [0, 300]
    for c in p["clients"]:
        assert set(c) >= {"peer", "since", "bytes_in", "bytes_out", "last_active"}

    code, text = http_get(status, "/metrics")
    assert code == 200
    assert 'sertcp_bytes_from_device_total{port="cli"} 1000' in text
    assert 'sertcp_bytes_to_device_total{port="cli"} 300' in text
    assert 'sertcp_connections_total{port="cli"} 2' in text
    assert 'sertcp_clients{port="cli"} 2' in text
    # both clients read everything, nothing dials, the pty never failed
    for counter in ("bytes_dropped", "connections_rejected", "dials_failed", "device_errors"):
        assert re.search(r"^sertcp_%s_total\{port=\"cli\"\} 0$" % counter, text, re.M), counter


def test_metrics_count_ignored_bytes_failed_dials_and_device_errors(sertcp, pty_factory, clients, tmp_path):
    """Each counter moves by what moved it, exactly: the bytes a
    receive_from = first port ignores, one dial round that found nobody
    listening, one failed open of a missing device (the minute-long pauses
    keep the last two from repeating during the test)."""
    ignoring, dialing = pty_factory(), pty_factory()
    port, status, nobody, other = free_port(), free_port(), free_port(), free_port()
    s = sertcp(config="""
[global]
status = 127.0.0.1:%d
[ignoring]
device = %s
listen = 127.0.0.1:%d
receive_from = first
max_clients = 2
[dialing]
device = %s
connect = 127.0.0.1:%d
reconnect_min = 60
reconnect_max = 60
[missing]
device = %s
listen = 127.0.0.1:%d
reopen_interval = 60
""" % (status, ignoring.path, port, dialing.path, nobody, tmp_path / "no-such-device", other), wait_port=port)
    s.wait_log("status endpoint on")

    def counters():
        text = http_get(status, "/metrics")[1]
        found = re.findall(r'^sertcp_(bytes_dropped|dials_failed|device_errors)_total\{port="(\w+)"\} (\d+)$', text, re.M)
        return {(name, counter): int(value) for counter, name, value in found}

    def clients_of(name):
        (p,) = [p for p in json.loads(http_get(status, "/status")[1])["ports"] if p["name"] == name]
        return len(p["clients"])
    first = clients(port)
    wait_for(lambda: clients_of("ignoring") == 1, message="the first client admitted")
    second = clients(port)
    wait_for(lambda: clients_of("ignoring") == 2, message="the second client admitted")
    second.send(b"ignored")
    first.send(b"heard")
    assert ignoring.read(5) == b"heard"
    expected = {("ignoring", "bytes_dropped"): 7, ("dialing", "dials_failed"): 1, ("missing", "device_errors"): 1}
    expected = {(name, counter): expected.get((name, counter), 0) for name in ("ignoring", "dialing", "missing")
                for counter in ("bytes_dropped", "dials_failed", "device_errors")}
    try:
        wait_for(lambda: counters() == expected, message="the counters")
    except AssertionError:
        assert counters() == expected           # shows which one is off
    assert ignoring.read_available() == b""


def test_shared_listener_counts_its_refusals(sertcp, pty_factory, clients):
    """A shared listener refuses before it knows the port (an unknown id):
    /status and /metrics count that per listener."""
    a, b = pty_factory(), pty_factory()
    port, status = free_port(), free_port()
    s = sertcp(config="""
[global]
status = 127.0.0.1:%d
[DEFAULT]
listen = 127.0.0.1:%d
[a]
device = %s
identity = id-a
[b]
device = %s
identity = id-b
""" % (status, port, a.path, b.path), wait_port=port)
    for _ in range(3):
        c = clients(port)
        c.send(b"nobody\n")
        assert c.closed_by_peer(timeout=5.0)
    ok = clients(port)
    ok.send(b"id-b\nhi")
    assert b.read(2) == b"hi"
    s.wait_log(r"refused: unknown id 'nobody'", count=3)
    listeners = json.loads(http_get(status, "/status")[1])["listeners"]
    assert listeners == [{"listen": "127.0.0.1:%d" % port, "ports": ["a", "b"], "connections_rejected": 3,
                          "error": None}]  # (why it is not bound yet, while retried)
    metrics = http_get(status, "/metrics")[1]
    assert 'sertcp_listener_connections_rejected_total{listen="127.0.0.1:%d"} 3\n' % port in metrics


def test_status_endpoint_answers_bad_requests_and_survives(sertcp, pty):
    port, status = free_port(), free_port()
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, wait_port=port)
    s.wait_log("status endpoint on")
    assert raw_http(status, b"GET /nothing HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
    assert raw_http(status, b"garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw_http(status, b"POST /status HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405")
    assert raw_http(status, b"GET /" + b"a" * 20000).startswith(b"HTTP/1.0 431")
    assert raw_http(status, b"\xff\xfe\x00\r\n\r\n").startswith(b"HTTP/1.0 400")
    # a client that connects and says nothing does not block the others
    idle = socket.create_connection(("127.0.0.1", status))
    try:
        assert http_get(status, "/status")[0] == 200
    finally:
        idle.close()


def test_sigusr1_writes_status_to_the_log(sertcp, pty):
    port = free_port()
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, wait_port=port)
    s.signal(signal.SIGUSR1)
    s.wait_log(r"status \{")
    line = [l for l in s.log().splitlines() if "status {" in l][0]
    doc = json.loads(line.split("status ", 1)[1])
    assert doc["ports"][0]["name"] == "cli"


def write_ini(path, ports, extra_global=""):
    text = "[global]\n" + extra_global
    for name, keys in ports.items():
        text += "\n[%s]\n" % name + "".join("%s = %s\n" % kv for kv in keys.items())
    path.write_text(text)


def test_sighup_keeps_unchanged_port_mid_stream_and_restarts_changed(tmp_path, pty_factory):
    keep_pty, change_pty, new_pty = pty_factory(), pty_factory(), pty_factory()
    keep_port, change_port, change_port2, new_port = free_port(), free_port(), free_port(), free_port()
    ini = tmp_path / "ports.ini"
    write_ini(ini, {"keep": {"device": keep_pty.path, "listen": "127.0.0.1:%d" % keep_port},
                    "change": {"device": change_pty.path, "listen": "127.0.0.1:%d" % change_port}})
    s = Sertcp(["-c", ini], tmp_path)
    try:
        s.wait_listening(keep_port)
        s.wait_listening(change_port)
        kept = Client(keep_port)
        changed = Client(change_port)
        s.wait_log("connected", count=2)

        # a stream flows through `keep` while the file changes and SIGHUP lands
        total = 2 * 1024 * 1024
        data = bytes(range(256)) * (total // 256)
        writer = threading.Thread(target=keep_pty.write, args=(data,))
        writer.start()
        write_ini(ini, {"keep": {"device": keep_pty.path, "listen": "127.0.0.1:%d" % keep_port},
                        "change": {"device": change_pty.path, "listen": "127.0.0.1:%d" % change_port2},
                        "new": {"device": new_pty.path, "listen": "127.0.0.1:%d" % new_port}})
        s.signal(signal.SIGHUP)
        assert kept.recv(total, timeout=30) == data
        writer.join()
        s.wait_log(r"reloaded: kept keep; restarted change; started new; stopped none")
        assert changed.closed_by_peer(5)
        s.wait_listening(change_port2)
        s.wait_listening(new_port)
        kept.send(b"still here")
        assert keep_pty.read(10) == b"still here"
        fresh = Client(new_port)
        new_pty.write(b"hello new")
        assert fresh.recv(9) == b"hello new"
        # the old address of the changed port is closed
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", change_port), timeout=2).close()
        # removing a port closes it
        write_ini(ini, {"keep": {"device": keep_pty.path, "listen": "127.0.0.1:%d" % keep_port}})
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded: kept keep; restarted none; started none; stopped change, new")
        assert fresh.closed_by_peer(5)
    finally:
        assert s.stop() == 0, s.log()


def test_invalid_reload_is_refused_whole(tmp_path, pty):
    port = free_port()
    ini = tmp_path / "ports.ini"
    write_ini(ini, {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}})
    s = Sertcp(["-c", ini], tmp_path)
    try:
        s.wait_listening(port)
        c = Client(port)
        s.wait_log("connected")
        ini.write_text(ini.read_text() + "baudrate = fast\nnonsense = 1\n")
        s.signal(signal.SIGHUP)
        s.wait_log(r"reload refused: .*baudrate")
        s.wait_log(r"reload refused: .*nonsense")
        s.wait_log(r"reload refused: 2 errors")
        c.send(b"abc")
        assert pty.read(3) == b"abc"
        pty.write(b"def")
        assert c.recv(3) == b"def"
    finally:
        assert s.stop() == 0


def test_trace_hex_records_both_directions(sertcp, pty, clients, tmp_path):
    port = free_port()
    trace = tmp_path / "trace.txt"
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--trace", trace, wait_port=port)
    c = clients(port)
    s.wait_log("connected")
    c.send(b"AT\r\n")
    assert pty.read(4) == b"AT\r\n"
    pty.write(b"OK\x00\xff")
    assert c.recv(4) == b"OK\x00\xff"
    peer = "127.0.0.1:%d" % c.sock.getsockname()[1]
    text = wait_for(lambda: trace.exists() and trace.read_text().count("|") >= 4 and trace.read_text())
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6} > %s 4 bytes$" % re.escape(peer), text, re.M)
    assert "> 0000  41 54 0d 0a" in text and "|AT..|" in text
    assert re.search(r"< %s 4 bytes$" % re.escape(peer), text, re.M)
    assert "< 0000  4f 4b 00 ff" in text and "|OK..|" in text


def test_trace_raw_and_a_failing_trace_never_stops_the_bridge(sertcp, pty, clients, tmp_path):
    port = free_port()
    trace = tmp_path / "raw.bin"
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--trace", trace, "--trace-format", "raw",
               wait_port=port)
    c = clients(port)
    s.wait_log("connected")
    c.send(b"abc")
    assert pty.read(3) == b"abc"
    wait_for(lambda: trace.read_bytes() == b"abc")

    assert os.path.exists("/dev/full"), "Linux's /dev/full (every write fails with ENOSPC) is missing"
    port2 = free_port()
    pty2_master, pty2_slave = os.openpty()
    import tty
    tty.setraw(pty2_slave)
    try:
        s2 = sertcp(os.ttyname(pty2_slave), "--listen", "127.0.0.1:%d" % port2, "--trace", "/dev/full",
                    wait_port=port2)
        c2 = clients(port2)
        s2.wait_log("connected")
        for _ in range(3):
            c2.send(b"z" * 10)
        s2.wait_log(r"trace /dev/full disabled")
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < 30 and time.monotonic() < deadline:
            try:
                got += os.read(pty2_master, 100)
            except BlockingIOError:
                time.sleep(0.01)
        assert got == b"z" * 30
        assert len(re.findall("disabled", s2.log())) == 1
    finally:
        os.close(pty2_master)
        os.close(pty2_slave)


def test_log_file_is_reopened_on_sighup(tmp_path, pty):
    port = free_port()
    log = tmp_path / "sertcp.log"
    s = Sertcp([pty.path, "--listen", "127.0.0.1:%d" % port, "--log", log], tmp_path)
    try:
        wait_for(lambda: log.exists() and "listening on" in log.read_text())
        log.rename(tmp_path / "sertcp.log.1")
        s.signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "SIGHUP received" in log.read_text(), message="new log file")
        c = Client(port)
        wait_for(lambda: "connected" in log.read_text())
        c.close()
        wait_for(lambda: re.search(r"disconnected: closed by peer; 0 bytes in, 0 bytes out, \d+\.\ds",
                                   log.read_text()))
    finally:
        assert s.stop() == 0


def test_pidfile_lifecycle(tmp_path, pty):
    port = free_port()
    pidfile = tmp_path / "sertcp.pid"
    s = Sertcp([pty.path, "--listen", "127.0.0.1:%d" % port, "--pidfile", pidfile], tmp_path)
    try:
        s.wait_listening(port)
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() == str(s.proc.pid))
    finally:
        assert s.stop() == 0
    assert not pidfile.exists()


# what the service files run: sertcp imported (bytecode cached), without runpy
LAUNCH = "'import sys, sertcp; sys.exit(sertcp.main())'"


def test_print_service_systemd_unit_verifies(tmp_path):
    need_programs("systemd-analyze")
    ini = tmp_path / "a.ini"
    ini.write_text("[a]\nvirtual = /tmp/sertcp-test-v\nlisten = 7000\n")
    r = run_sertcp(["-c", ini, "--print-service", "systemd"])
    assert r.returncode == 0, r.stderr
    # the module form, so that Python loads cached bytecode at each start
    assert "ExecStart=%s -c %s -c %s" % (sys.executable, LAUNCH, ini) in r.stdout
    assert "Environment=PYTHONPATH=%s\n" % SERTCP.parent in r.stdout
    unit = tmp_path / "sertcp.service"
    unit.write_text(r.stdout)
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.parametrize("kind", ["openwrt", "sysv"])
def test_print_service_scripts_parse(kind, tmp_path):
    r = run_sertcp(["--virtual", "/tmp/sertcp-v", "--listen", "7000", "--print-service", kind])
    assert r.returncode == 0, r.stderr
    script = tmp_path / "script"
    script.write_text(r.stdout)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert "PYTHONPATH=%s" % SERTCP.parent in r.stdout
    assert sys.executable in r.stdout and "-c %s" % LAUNCH in r.stdout.replace("command -c\n\tprocd_append_param command ", "-c ")
    assert "--print-service" not in r.stdout
    if kind == "openwrt":
        assert r.stdout.startswith("#!/bin/sh /etc/rc.common") and "USE_PROCD=1" in r.stdout
        assert "procd_set_param respawn" in r.stdout
    else:
        assert "### BEGIN INIT INFO" in r.stdout
        for action in ("start)", "stop)", "reload)", "status)"):
            assert action in r.stdout


def test_service_command_starts_from_cached_bytecode(tmp_path):
    """The command the service files hold really starts sertcp, from a
    directory that is not the file's own, and Python caches its bytecode
    so the next start need not compile the file again."""
    port = free_port()
    virtual = tmp_path / "ttyV0"
    r = run_sertcp(["--virtual", virtual, "--listen", "127.0.0.1:%d" % port, "--print-service", "cron"])
    line = r.stdout.strip().replace("/tmp/sertcp.", str(tmp_path / "sertcp."))
    command = re.sub(r"flock -n \S+ ", "", line.split(None, 5)[5])
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path / "cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    for start in range(2):
        proc = subprocess.Popen(["sh", "-c", "exec env " + command], cwd="/", env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            c = wait_for(lambda: _try_connect(port), timeout=20, message="the service command listening")
            c.close()
            wait_for(virtual.is_symlink, message="the virtual port")  # opened just after listening
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "listening on" in (tmp_path / "sertcp.log").read_text()   # the cron line's bounded log
        cached = list((tmp_path / "cache").rglob("sertcp.*.pyc"))
        assert len(cached) == 1, "no bytecode cached after start %d" % (start + 1)


def _try_connect(port):
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return None


def test_print_service_cron_line():
    r = run_sertcp(["--virtual", "/tmp/sertcp-v", "--listen", "7000", "--print-service", "cron"])
    assert r.returncode == 0
    line = r.stdout.strip()
    assert len(line.splitlines()) == 1
    fields = line.split()
    assert fields[:5] == ["*"] * 5
    assert line.startswith("* * * * * PYTHONPATH=%s flock -n " % SERTCP.parent)
    assert "%s -c %s --virtual /tmp/sertcp-v --listen 7000 " % (sys.executable, LAUNCH) in line
    # /tmp is RAM on a router: a log of bounded size, not an appended stderr
    assert line.endswith(" --log /tmp/sertcp.log --log-max-size 256k") and ">>" not in line
    assert "exec \"$0\" \"$@\" >/tmp/sertcp.out 2>&1" in line
    bad = run_sertcp(["--virtual", "/tmp/v", "--listen", "7000", "--print-service", "launchd"])
    assert bad.returncode == 2 and "systemd, openwrt, sysv, cron" in bad.stderr


IMPORT_PROBE = """
import runpy, sys
before = set(sys.modules)
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(set(sys.modules) - before)))
"""


def imported_modules(args, tmp_path, port, extra_wait=None, netns=None):
    """Start the real sertcp.py (through runpy, so that the interpreter's
    own start-up imports are not counted), wait until it serves, stop it and
    return the top-level names of every module sertcp imported; in the
    network namespace `netns` if given."""
    log = tmp_path / "probe.log"
    out = tmp_path / "modules.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", IMPORT_PROBE, str(out), str(SERTCP)] + [str(a) for a in args],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=netns.enter if netns else None)
    try:
        wait_for(lambda: "listening on" in log.read_text(), message="listening")
        if extra_wait:
            extra_wait()
        if netns:
            netns.call(lambda: Client(port).close())
        else:
            c = Client(port)
            c.close()
        wait_for(lambda: "disconnected" in log.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    return {name.split(".")[0] for name in out.read_text().split()}


HEAVY = {"ssl", "http", "email", "urllib", "asyncio", "multiprocessing", "xml", "ctypes", "json",
         "logging"}  # python3-logging is a package of its own on OpenWrt


def test_nothing_heavy_is_imported_with_optional_features_off(pty, tmp_path):
    port = free_port()
    names = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port], tmp_path, port)
    assert "serial" in names and "_socket" in names
    assert not (names & HEAVY), sorted(names & HEAVY)
    # socket.py and signal.py build enums of their constants (1.5 MiB with enum): the C modules do
    assert not (names & {"enum", "socket", "selectors", "signal"}), sorted(names & {"enum", "socket", "selectors", "signal"})


def test_nothing_heavy_is_imported_by_the_modem_emulation(pty, tmp_path):
    port = free_port()
    names = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--modem", "yes", "--modem-init", "ATS0=1"],
                             tmp_path, port)
    assert not (names & HEAVY), sorted(names & HEAVY)
    assert not (names & {"enum", "socket", "selectors", "signal", "threading"}), \
        sorted(names & {"enum", "socket", "selectors", "signal", "threading"})


def test_monitors_and_trace_rollover_import_nothing(pty, tmp_path):
    """The keys of watching a port (monitor, trace_max_size) cost no
    module: the same set as with them off."""
    port = free_port()
    plain = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port], tmp_path, port)
    port, monitor = free_port(), free_port()
    watched = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--monitor", "127.0.0.1:%d" % monitor,
                                "--trace", tmp_path / "trace", "--trace-max-size", "1k"], tmp_path, port)
    assert watched == plain, sorted(watched ^ plain)


def test_mdns_imports_nothing_that_a_port_without_it_does_not(pty, tmp_path, netns):
    """The responder is in the file and needs only _socket and fcntl
    (which pyserial imports anyway): announcing a port costs no module."""
    port = free_port()
    plain = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port], tmp_path, port, netns=netns)
    log = tmp_path / "probe.log"
    announced = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--mdns", "yes"], tmp_path, port,
                                 extra_wait=lambda: wait_for(lambda: "mdns: announced" in log.read_text()),
                                 netns=netns)
    assert "fcntl" in plain
    assert announced == plain, sorted(announced ^ plain)


def test_status_endpoint_works_without_http_server_modules(pty, tmp_path):
    port, status = free_port(), free_port()

    def ask():
        assert json.loads(raw_http(status, b"GET /status HTTP/1.0\r\n\r\n").split(b"\r\n\r\n", 1)[1])
        assert b"<html" in raw_http(status, b"GET / HTTP/1.0\r\n\r\n")
    names = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status],
                             tmp_path, port, extra_wait=ask)
    assert "json" in names
    assert not (names & {"ssl", "http", "email", "urllib"}), sorted(names & {"ssl", "http", "email", "urllib"})
    # the web page is a constant; the control API (hmac) and status_allow
    # (ipaddress) are imported only when their keys are set
    assert not (names & {"hmac", "hashlib", "ipaddress"}), sorted(names & {"hmac", "hashlib", "ipaddress"})


def test_user_drops_root_after_opening_and_binding(sertcp, pty, clients):
    assert os.geteuid() == 0, "dropping privileges needs root (CI runs as root)"
    import pwd
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--user", "nobody", wait_port=port)
    s.wait_log("running as user nobody")

    def ids(field):
        for line in open("/proc/%d/status" % s.proc.pid):
            if line.startswith(field + ":"):
                return [int(x) for x in line.split()[1:]]
    assert set(ids("Uid")) == {nobody.pw_uid} and set(ids("Gid")) == {nobody.pw_gid}
    c = clients(port)
    c.send(b"as nobody")
    assert pty.read(9) == b"as nobody"
    pty.write(b"ok")
    assert c.recv(2) == b"ok"


def test_unknown_user_is_a_fatal_error(tmp_path, pty):
    port = free_port()
    s = Sertcp([pty.path, "--listen", "127.0.0.1:%d" % port, "--user", "no-such-user-here"], tmp_path)
    assert s.proc.wait(10) == 1
    assert "no such user" in s.log()
    s.stop()


def test_sertcp_stays_valid_for_python_3_8():
    """OpenWrt and older Raspberry Pi OS ship Python 3.8: no newer syntax
    or library calls in the one file users copy."""
    beside = os.path.join(os.path.dirname(sys.executable), "vermin")  # pip puts it there
    command = beside if os.path.exists(beside) else shutil.which("vermin")
    assert command, "vermin is not installed (tests/requirements.txt has it)"
    r = subprocess.run([command, "--target=3.8-", "--violations", "--no-tips", str(SERTCP)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_fifo_in_place_of_the_password_file_is_refused_at_sighup(tmp_path, pty):
    """Reading it used to wait for a writer: every port froze at SIGHUP."""
    port = free_port()
    password = tmp_path / "password"
    password.write_text("letmein\n")
    ini = tmp_path / "ports.ini"
    write_ini(ini, {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port, "password_file": password}})
    s = Sertcp(["-c", ini], tmp_path)
    try:
        s.wait_listening(port)
        c = Client(port)
        c.send(b"letmein\nabc")
        assert pty.read(3) == b"abc"
        password.unlink()
        os.mkfifo(password)
        s.signal(signal.SIGHUP)
        s.wait_log(r"reload refused: .*password_file: %s is a FIFO, not a regular file" % re.escape(str(password)))
        s.wait_log(r"reload refused: 1 error")
        c.send(b"def")
        assert pty.read(3) == b"def"
        pty.write(b"ghi")
        assert c.recv(3) == b"ghi"
    finally:
        assert s.stop() == 0, s.log()


# --- SIGHUP applies the global keys too --------------------------------------

def refused_to_connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_sighup_moves_the_status_endpoint_and_keeps_the_ports(tmp_path, pty):
    port, status, status2 = free_port(), free_port(), free_port()
    ini = tmp_path / "ports.ini"
    ports = {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}}
    write_ini(ini, ports, "status = 127.0.0.1:%d\n" % status)
    s = Sertcp(["-c", ini], tmp_path)
    try:
        s.wait_listening(port)
        s.wait_log("status endpoint on")
        assert http_get(status, "/status")[0] == 200
        c = Client(port)
        s.wait_log("connected")
        write_ini(ini, ports, "status = 127.0.0.1:%d\n" % status2)
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded: kept one")
        assert json.loads(http_get(status2, "/status")[1])["ports"][0]["name"] == "one"
        assert refused_to_connect(status)
        c.send(b"kept")
        assert pty.read(4) == b"kept"
        # no status key: the endpoint closes
        write_ini(ini, ports)
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded: kept one", count=2)
        assert refused_to_connect(status2)
    finally:
        assert s.stop() == 0, s.log()


def test_sighup_refuses_a_status_address_it_cannot_bind(tmp_path, pty):
    port, status, other = free_port(), free_port(), free_port()
    ini = tmp_path / "ports.ini"
    write_ini(ini, {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}}, "status = 127.0.0.1:%d\n" % status)
    s = Sertcp(["-c", ini], tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        try:
            s.wait_listening(port)
            write_ini(ini, {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % other}},
                      "status = 127.0.0.1:%d\n" % busy)
            s.signal(signal.SIGHUP)
            s.wait_log(r"reload refused: status: cannot listen on 127.0.0.1:%d: .*; the running configuration stays"
                       % busy)
            assert http_get(status, "/status")[0] == 200
            c = Client(port)                # the port did not change either
            c.send(b"same")
            assert pty.read(4) == b"same"
            assert "reloaded" not in s.log()
        finally:
            assert s.stop() == 0, s.log()


def test_sighup_moves_the_log_to_its_new_file(tmp_path, pty):
    port = free_port()
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    ini = tmp_path / "ports.ini"
    ports = {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}}
    write_ini(ini, ports, "log = %s\n" % first)
    s = Sertcp(["-c", ini], tmp_path)
    try:
        wait_for(lambda: first.exists() and "listening on" in first.read_text(), message="the first log")
        write_ini(ini, ports, "log = %s\n" % second)
        s.signal(signal.SIGHUP)
        wait_for(lambda: second.exists() and "reloaded: kept one" in second.read_text(), message="the second log")
        assert "log continues here from %s" % first in second.read_text()
        assert "log moves to %s" % second in first.read_text()
        c = Client(port)
        wait_for(lambda: "connected" in second.read_text(), message="a connection logged in the second log")
        c.close()
        assert "connected" not in first.read_text()
        assert "reloaded" not in first.read_text()
    finally:
        assert s.stop() == 0, s.log()
    assert "stopped" in second.read_text()


def test_sighup_refuses_a_log_file_it_cannot_open(tmp_path, pty):
    port = free_port()
    log = tmp_path / "sertcp.log"
    ini = tmp_path / "ports.ini"
    ports = {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}}
    write_ini(ini, ports, "log = %s\n" % log)
    s = Sertcp(["-c", ini], tmp_path)
    try:
        wait_for(lambda: log.exists() and "listening on" in log.read_text(), message="the log")
        write_ini(ini, ports, "log = %s\n" % (tmp_path / "no-such-dir" / "x.log"))
        s.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused: log: cannot open %s" % (tmp_path / "no-such-dir" / "x.log")
                 in log.read_text(), message="the refusal in the log")
    finally:
        assert s.stop() == 0, s.log()


def test_sighup_writes_the_new_pidfile_and_removes_the_old(tmp_path, pty):
    port = free_port()
    first, second = tmp_path / "first.pid", tmp_path / "second.pid"
    ini = tmp_path / "ports.ini"
    ports = {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}}
    write_ini(ini, ports, "pidfile = %s\n" % first)
    s = Sertcp(["-c", ini], tmp_path)
    try:
        wait_for(lambda: first.exists() and first.read_text() == "%d\n" % s.proc.pid, message="the first pidfile")
        write_ini(ini, ports, "pidfile = %s\n" % second)
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded: kept one")
        assert second.read_text() == "%d\n" % s.proc.pid
        assert not first.exists()
    finally:
        assert s.stop() == 0, s.log()
    assert not second.exists()


def test_sighup_refuses_a_change_of_user_naming_the_key(tmp_path, pty):
    port, port2 = free_port(), free_port()
    ini = tmp_path / "ports.ini"
    write_ini(ini, {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port}})
    s = Sertcp(["-c", ini], tmp_path)
    try:
        s.wait_listening(port)
        write_ini(ini, {"one": {"device": pty.path, "listen": "127.0.0.1:%d" % port2}}, "user = nobody\n")
        s.signal(signal.SIGHUP)
        s.wait_log(r"reload refused: user: cannot change from \(none\) to nobody .*restart")
        assert "reloaded" not in s.log()
        c = Client(port)
        c.send(b"same")
        assert pty.read(4) == b"same"
    finally:
        assert s.stop() == 0, s.log()


def test_metrics_pass_promtool_check(tmp_path, pty_factory):
    """/metrics as Prometheus wants it: counters end in _total, gauges do
    not, every family has HELP and TYPE.  promtool comes with Debian's
    prometheus package (.ci/run installs it)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus"
    a, b = pty_factory(), pty_factory()
    port, status = free_port(), free_port()
    ini = tmp_path / "ports.ini"
    ini.write_text("[global]\nstatus = 127.0.0.1:%d\n"
                   "[server]\ndevice = %s\nlisten = 127.0.0.1:%d\nmax_clients = 2\n"
                   '[dialer "quoted" \\ name]\ndevice = %s\nconnect = 127.0.0.1:%d\nreconnect_min = 0.1\n'
                   % (status, a.path, port, b.path, free_port()))
    s = Sertcp(["-c", ini], tmp_path)
    try:
        s.wait_listening(port)
        s.wait_log("status endpoint on")
        c = Client(port)
        s.wait_log("connected")
        a.write(b"x" * 100)
        assert c.recv(100) == b"x" * 100
        s.wait_log("every peer failed")
        code, text = http_get(status, "/metrics")
        assert code == 200
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert (check.returncode, check.stdout + check.stderr) == (0, ""), text
        assert 'sertcp_bytes_from_device_total{port="server"} 100' in text
        assert re.search(r'^sertcp_dials_failed_total\{port="dialer \\"quoted\\" \\\\ name"\} [1-9]', text, re.M), text
        assert 'sertcp_clients{port="server"} 1' in text
        assert "# TYPE sertcp_clients gauge" in text
        assert "sertcp_internal_errors_total 0" in text
    finally:
        assert s.stop() == 0, s.log()


def test_a_trace_to_a_fifo_nobody_reads_never_holds_up_the_bridge(sertcp, pty, clients, tmp_path):
    """Opening it used to wait for a reader, before the port listened."""
    port = free_port()
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--trace", fifo, wait_port=port)
    s.wait_log(r"trace %s disabled" % re.escape(str(fifo)))
    c = clients(port)
    c.send(b"through")
    assert pty.read(7) == b"through"


def test_the_udp_side_imports_nothing_more(pty, tmp_path):
    """UDP needs only socket, already loaded: a port with udp_listen and
    udp_send_to (addresses, so no resolver thread) imports what a plain one
    does."""
    port, plain_port = free_port(), free_port()
    plain = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % plain_port], tmp_path, plain_port)
    udp = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--udp-listen", "127.0.0.1:%d" % free_port(),
                            "--udp-send-to", "127.0.0.1:9, 127.255.255.255:10110"], tmp_path, port)
    assert udp - plain == set(), sorted(udp - plain)
