#!/usr/bin/env python3
"""Benchmark sertcp against socat and ser2net.

    python3 tests/bench.py [--json OUT.json] [--quick] [--only NAME[,NAME...]]

Every server runs on its own pseudo-terminal (os.openpty(), slave set raw at
once, the bench keeps the master) and listens on 127.0.0.1 on a free port.
The bench plays both the device (the pty master) and the TCP clients, in one
thread, with poll() and non-blocking descriptors.  Each server gets a fresh
process for each measurement:

  dev2net  bytes written into the master, received by one TCP client (MB/s)
  net2dev  bytes sent by one TCP client, read from the master (MB/s)
  echo     1-byte round trip client -> device -> client (median, p99 in us)
  fanout   8 clients, each receives everything written into the master
           (aggregate MB/s; not socat, which serves one client per device)
  stalled  2 clients, one never reads: the other one's dev2net MB/s, and
           that as a fraction of the dev2net figure (not socat)
  startup  spawn to the listening port accepting a connection (ms), beside
           the wall time of `python3 -c pass`

CPU seconds per MB (utime+stime of the server from /proc/PID/stat) are taken
over the timed part of the throughput runs, peak RSS from VmHWM in
/proc/PID/status; a bare python3 is measured the same way for reference.
MB means 10**6 bytes.  Every transfer is bounded in bytes and time; a
transfer that hits its time bound is reported with what it achieved and
marked "partial".

--only takes measurement names and/or server names (sertcp, socat, ser2net),
comma separated.  Linux only (/proc); standard library only.  socat and
ser2net are used if found on PATH and skipped otherwise.
"""

import argparse
import atexit
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
import zlib
from pathlib import Path

SERTCP = Path(__file__).resolve().parent.parent / "sertcp.py"
HOST = "127.0.0.1"
MiB = 1 << 20
MB = 1e6
SERVERS = ("sertcp", "socat", "ser2net")
MEASUREMENTS = ("dev2net", "net2dev", "echo", "fanout", "stalled", "startup")
# socat joins one client to one device; the shared-device tests skip it.
SHARED_ONLY = ("fanout", "stalled")
PRIME = b"\x00"          # priming byte; the payload never contains it
PATTERN = bytes(range(1, 256))
STALLED_RCVBUF = 64 * 1024  # receive buffer of the client that never reads
CHUNK = 256 * 1024


class BenchError(Exception):
    """A measurement could not be completed."""


class Settings:
    """Sizes and time bounds of one bench run."""

    def __init__(self, size=16 * MiB, rounds=3, echo_count=2000, echo_warmup=20,
                 fanout_clients=8, budget=20.0, stall_bound=8.0, startup_runs=5,
                 ready_timeout=10.0):
        self.size = int(size)            # bytes per transfer round
        self.rounds = int(rounds)        # throughput rounds (median reported)
        self.echo_count = int(echo_count)
        self.echo_warmup = int(echo_warmup)
        self.fanout_clients = int(fanout_clients)
        self.budget = float(budget)      # seconds one throughput measurement may use
        self.stall_bound = float(stall_bound)  # seconds the stalled-client run may use
        self.startup_runs = int(startup_runs)
        self.ready_timeout = float(ready_timeout)

    @classmethod
    def full(cls):
        return cls()

    @classmethod
    def quick(cls):
        return cls(size=4 * MiB, rounds=1, echo_count=500, budget=6.0,
                   stall_bound=3.0, startup_runs=3)

    def as_dict(self):
        return dict(vars(self))


# ---------------------------------------------------------------- processes

_LIVE = set()   # every server process started and not yet reaped


def _kill_leftovers():
    for proc in list(_LIVE):
        stop_process(proc)


atexit.register(_kill_leftovers)


def stop_process(proc, grace=3.0):
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; always reaps."""
    try:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    finally:
        _LIVE.discard(proc)


def proc_cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_kib(pid):
    """Peak resident set size (VmHWM) of a process, in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tool_version(kind):
    try:
        if kind == "sertcp":
            argv = [sys.executable, str(SERTCP), "--version"]
        elif kind == "socat":
            argv = ["socat", "-V"]
        else:
            argv = ["ser2net", "-v"]
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=10).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "version" in line.lower() or kind == "sertcp":
            return line.strip()
    return out.strip().splitlines()[0] if out.strip() else None


def available(kind):
    if kind == "sertcp":
        return SERTCP.is_file()
    return shutil.which(kind) is not None


# ---------------------------------------------------------------- device

class Pty:
    """A pseudo-terminal standing in for a serial device.

    The server opens `path` (the slave); the bench reads and writes `master`.
    The slave is made raw at once (nothing echoed before the server sets it
    up) and kept open until close(), so the pty outlives servers such as
    socat and ser2net that open the device only when a client connects."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        try:
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            self.path = os.ttyname(self.slave)
        except BaseException:
            self.close()
            raise

    def close(self):
        for fd in (self.master, self.slave):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = self.slave = -1


# ---------------------------------------------------------------- servers

class Server:
    """One server process (sertcp, socat or ser2net) on one pty and port."""

    def __init__(self, kind, device, port, max_clients, workdir):
        self.kind = kind
        self.device = device
        self.port = port
        self.max_clients = max_clients
        self.workdir = workdir
        self.proc = None
        self.logpath = os.path.join(workdir, "%s-%d.log" % (kind, port))
        self.argv = self._argv()

    def _argv(self):
        if self.kind == "sertcp":
            argv = [sys.executable, str(SERTCP), self.device,
                    "--listen", "%s:%d" % (HOST, self.port), "--baudrate", "115200"]
            if self.max_clients > 1:
                argv += ["--max-clients", str(self.max_clients)]
            return argv
        if self.kind == "socat":
            return ["socat",
                    "TCP-LISTEN:%d,bind=%s,reuseaddr" % (self.port, HOST),
                    "FILE:%s,rawer,echo=0,b115200" % self.device]
        if self.kind == "ser2net":
            config = os.path.join(self.workdir, "ser2net-%d.yaml" % self.port)
            with open(config, "w") as f:
                f.write("%%YAML 1.1\n---\n"
                        "connection: &bench\n"
                        "  accepter: tcp,%s,%d\n"
                        "  connector: serialdev,%s,115200n81,local\n"
                        "  options:\n"
                        "    max-connections: %d\n"
                        % (HOST, self.port, self.device, self.max_clients))
            pidfile = os.path.join(self.workdir, "ser2net-%d.pid" % self.port)
            # -n: stay in the foreground (Popen's pid is ser2net itself);
            # -d: log to stdout; -u: no UUCP lock files.
            return ["ser2net", "-n", "-d", "-u", "-c", config, "-P", pidfile]
        raise ValueError(self.kind)

    def start(self):
        log = open(self.logpath, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        _LIVE.add(self.proc)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        return proc_cpu_seconds(self.pid)

    def hwm_kib(self):
        try:
            return proc_hwm_kib(self.pid)
        except OSError:
            return None

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError("%s exited with status %s; log:\n%s"
                             % (self.kind, self.proc.returncode, self.log_tail()))

    def log_tail(self, lines=15):
        try:
            with open(self.logpath, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)


class Client:
    """A TCP client of the server, counting what arrives after the priming bytes."""

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.primed = False     # received at least one byte
        self.in_payload = False  # received the first payload byte
        self.payload = 0        # payload bytes received
        self.crc = 0
        self.closed = False

    def feed(self, data):
        self.primed = True
        if not self.in_payload:
            data = data.lstrip(PRIME)
            if not data:
                return
            self.in_payload = True
        self.payload += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def connect(server, deadline, rcvbuf=None):
    """Connect to the server, retrying while the port is not yet listening."""
    while True:
        server.check_alive()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(max(0.05, min(2.0, deadline - time.monotonic())))
            sock.connect((HOST, server.port))
        except (ConnectionRefusedError, socket.timeout):
            sock.close()
            if time.monotonic() > deadline:
                raise BenchError("%s: port %d never accepted a connection; log:\n%s"
                                 % (server.kind, server.port, server.log_tail()))
            time.sleep(0.002)
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return Client(sock)


class Session:
    """A pty, a server on it, and its clients; closes everything on exit."""

    def __init__(self, kind, settings, workdir, clients=1, max_clients=1, stalled=0):
        self.kind = kind
        self.settings = settings
        self.workdir = workdir
        self.nclients = clients
        self.max_clients = max_clients
        self.nstalled = stalled
        self.pty = None
        self.server = None
        self.clients = []

    def __enter__(self):
        try:
            self.pty = Pty()
            self.server = Server(self.kind, self.pty.path, free_port(),
                                 self.max_clients, self.workdir).start()
            deadline = time.monotonic() + self.settings.ready_timeout
            for i in range(self.nclients):
                stalled = i >= self.nclients - self.nstalled
                self.clients.append(connect(self.server, deadline,
                                            rcvbuf=STALLED_RCVBUF if stalled else None))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for c in self.clients:
            c.close()
        if self.server is not None:
            self.server.stop()
        if self.pty is not None:
            self.pty.close()
        return False


# ---------------------------------------------------------------- transfers

def make_payload(size):
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


def _recv_into_client(client, required):
    """Read what is waiting on one client; returns False on EOF or reset."""
    try:
        data = client.sock.recv(CHUNK)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        data = b""
    if not data:
        client.closed = True
        if required:
            raise BenchError("server closed a reading client (after %d payload bytes)"
                             % client.payload)
        return False
    client.feed(data)
    return True


def prime(pty, clients, deadline):
    """Write single priming bytes into the device until every client has
    received something: then the server has accepted all clients and has the
    device open.  The payload contains no priming byte, so stragglers are
    told apart from it."""
    poller = select.poll()
    by_fd = {}
    for c in clients:
        poller.register(c.fd, select.POLLIN)
        by_fd[c.fd] = c
    last = 0.0
    while not all(c.primed for c in clients):
        now = time.monotonic()
        if now > deadline:
            missing = sum(1 for c in clients if not c.primed)
            raise BenchError("%d of %d clients never received device data" % (missing, len(clients)))
        if now - last >= 0.005:
            try:
                os.write(pty.master, PRIME)
            except BlockingIOError:
                pass
            last = now
        for fd, _ in poller.poll(5):
            _recv_into_client(by_fd[fd], True)


def device_to_clients(pty, payload, readers, deadline):
    """Write payload into the device; return (seconds, complete) once every
    reader has received all of it, or at the deadline."""
    targets = [(c, c.payload + len(payload)) for c in readers]
    view = memoryview(payload)
    off = 0
    poller = select.poll()
    by_fd = {}
    for c in readers:
        poller.register(c.fd, select.POLLIN)
        by_fd[c.fd] = c
    poller.register(pty.master, select.POLLOUT)
    master = pty.master
    total = len(payload)
    start = time.monotonic()
    complete = False
    while True:
        if all(c.payload >= t for c, t in targets):
            complete = True
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(min(100, max(1, int(left * 1000)))):
            if fd == master:
                try:
                    off += os.write(master, view[off:off + CHUNK])
                except BlockingIOError:
                    continue
                if off >= total:
                    poller.unregister(master)
            else:
                _recv_into_client(by_fd[fd], True)
    return time.monotonic() - start, complete


def read_master_exact(pty, n, deadline):
    """Read exactly n bytes from the device side (or until the deadline)."""
    out = bytearray()
    poller = select.poll()
    poller.register(pty.master, select.POLLIN)
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("device got %d of %d bytes" % (len(out), n))
        if poller.poll(min(100, max(1, int(left * 1000)))):
            try:
                out += os.read(pty.master, n - len(out))
            except BlockingIOError:
                pass
    return bytes(out)


def client_to_device(pty, client, payload, deadline):
    """Send payload from a client; return (seconds, bytes_read, crc, complete)
    once the device side has read all of it, or at the deadline."""
    view = memoryview(payload)
    off = 0
    total = len(payload)
    got = 0
    crc = 0
    master = pty.master
    sock = client.sock
    poller = select.poll()
    poller.register(client.fd, select.POLLOUT)
    poller.register(master, select.POLLIN)
    start = time.monotonic()
    complete = False
    while True:
        if got >= total:
            complete = True
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(min(100, max(1, int(left * 1000)))):
            if fd == master:
                try:
                    data = os.read(master, 65536)
                except BlockingIOError:
                    continue
                got += len(data)
                crc = zlib.crc32(data, crc)
            else:
                try:
                    off += sock.send(view[off:off + CHUNK])
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise BenchError("sending to the server failed: %s" % e)
                if off >= total:
                    poller.unregister(client.fd)
    return time.monotonic() - start, got, crc, complete


# ---------------------------------------------------------------- measurements

def _rounds(settings, one_round):
    """Run up to settings.rounds rounds within settings.budget seconds."""
    results = []
    begin = time.monotonic()
    for _ in range(settings.rounds):
        deadline = begin + settings.budget
        if results and time.monotonic() + results[-1]["seconds"] > deadline:
            break
        r = one_round(deadline)
        results.append(r)
        if not r["complete"]:
            break
    return results


def _summarise(results, nbytes_key, server, cpu0):
    mbps = [r["mbps"] for r in results]
    cpu = server.cpu() - cpu0
    device_mb = sum(r[nbytes_key] for r in results) / MB
    out = {
        "mbps": statistics.median(mbps) if mbps else None,
        "rounds": results,
        "partial": any(not r["complete"] for r in results),
        "cpu_s": cpu,
        "mb": device_mb,
        "cpu_s_per_mb": cpu / device_mb if device_mb else None,
        "rss_kib": server.hwm_kib(),
    }
    return out


def measure_dev2net(kind, settings, workdir):
    payload = make_payload(settings.size)
    with Session(kind, settings, workdir) as s:
        c = s.clients[0]
        prime(s.pty, s.clients, time.monotonic() + settings.ready_timeout)
        cpu0 = s.server.cpu()

        def one(deadline):
            before = c.payload
            secs, complete = device_to_clients(s.pty, payload, [c], deadline)
            got = c.payload - before
            if complete and got != len(payload):
                raise BenchError("client received %d bytes, expected %d" % (got, len(payload)))
            return {"bytes": got, "seconds": secs, "mbps": got / secs / MB,
                    "complete": complete}

        results = _rounds(settings, one)
        out = _summarise(results, "bytes", s.server, cpu0)
        if all(r["complete"] for r in results):
            expect = 0
            for _ in results:
                expect = zlib.crc32(payload, expect)
            out["data_ok"] = (c.crc == expect)
            if not out["data_ok"]:
                raise BenchError("device->network data corrupted (CRC mismatch)")
        return out


def measure_net2dev(kind, settings, workdir):
    payload = make_payload(settings.size)
    want_crc = zlib.crc32(payload)
    with Session(kind, settings, workdir) as s:
        c = s.clients[0]
        # One byte end to end first: the server has the device open.
        c.sock.setblocking(True)
        c.sock.sendall(PRIME)
        c.sock.setblocking(False)
        read_master_exact(s.pty, 1, time.monotonic() + settings.ready_timeout)
        cpu0 = s.server.cpu()

        def one(deadline):
            secs, got, crc, complete = client_to_device(s.pty, c, payload, deadline)
            if complete and (got != len(payload) or crc != want_crc):
                raise BenchError("network->device data corrupted (%d bytes, CRC %s)"
                                 % (got, "ok" if crc == want_crc else "mismatch"))
            return {"bytes": got, "seconds": secs, "mbps": got / secs / MB,
                    "complete": complete}

        results = _rounds(settings, one)
        out = _summarise(results, "bytes", s.server, cpu0)
        if not out["partial"]:
            out["data_ok"] = True
        return out


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(math.ceil(fraction * len(sorted_values))) - 1))
    return sorted_values[k]


def measure_echo(kind, settings, workdir):
    with Session(kind, settings, workdir) as s:
        c = s.clients[0]
        sock, master = c.sock, s.pty.master
        dev_poll = select.poll()
        dev_poll.register(master, select.POLLIN)
        net_poll = select.poll()
        net_poll.register(c.fd, select.POLLIN)
        clock = time.perf_counter
        rtts = []
        deadline = time.monotonic() + settings.budget
        total = settings.echo_warmup + settings.echo_count
        first_timeout = int(settings.ready_timeout * 1000)
        for i in range(total):
            if time.monotonic() > deadline:
                break
            byte = bytes((i % 255 + 1,))
            wait_ms = first_timeout if i == 0 else 2000
            t0 = clock()
            sock.send(byte)
            if not dev_poll.poll(wait_ms):
                raise BenchError("round trip %d: byte never reached the device" % i)
            got = os.read(master, 16)
            if got != byte:
                raise BenchError("round trip %d: device got %r, expected %r" % (i, got, byte))
            os.write(master, got)
            if not net_poll.poll(wait_ms):
                raise BenchError("round trip %d: byte never came back" % i)
            back = sock.recv(16)
            t1 = clock()
            if back != byte:
                raise BenchError("round trip %d: client got %r, expected %r" % (i, back, byte))
            if i >= settings.echo_warmup:
                rtts.append((t1 - t0) * 1e6)
        rtts.sort()
        return {
            "count": len(rtts),
            "partial": len(rtts) < settings.echo_count,
            "median_us": statistics.median(rtts) if rtts else None,
            "p99_us": percentile(rtts, 0.99),
            "min_us": rtts[0] if rtts else None,
            "max_us": rtts[-1] if rtts else None,
            "rss_kib": s.server.hwm_kib(),
        }


def measure_fanout(kind, settings, workdir):
    n = settings.fanout_clients
    payload = make_payload(settings.size)
    with Session(kind, settings, workdir, clients=n, max_clients=n) as s:
        prime(s.pty, s.clients, time.monotonic() + settings.ready_timeout)
        cpu0 = s.server.cpu()

        def one(deadline):
            before = sum(c.payload for c in s.clients)
            secs, complete = device_to_clients(s.pty, payload, s.clients, deadline)
            got = sum(c.payload for c in s.clients) - before
            return {"device_bytes": len(payload), "bytes": got, "seconds": secs,
                    "mbps": got / secs / MB, "complete": complete}

        results = _rounds(settings, one)
        out = _summarise(results, "device_bytes", s.server, cpu0)
        out["clients"] = n
        if not out["partial"]:
            expect = 0
            for _ in results:
                expect = zlib.crc32(payload, expect)
            out["data_ok"] = all(c.crc == expect for c in s.clients)
            if not out["data_ok"]:
                raise BenchError("fan-out data corrupted (CRC mismatch on some client)")
        return out


def measure_stalled(kind, settings, workdir):
    payload = make_payload(settings.size)
    with Session(kind, settings, workdir, clients=2, max_clients=2, stalled=1) as s:
        good, stalled = s.clients
        prime(s.pty, s.clients, time.monotonic() + settings.ready_timeout)
        # From here on the stalled client is never read.
        cpu0 = s.server.cpu()
        secs, complete = device_to_clients(s.pty, payload, [good],
                                           time.monotonic() + settings.stall_bound)
        got = good.payload
        out = {
            "bytes": got,
            "seconds": secs,
            "mbps": got / secs / MB,
            "complete": complete,
            "partial": not complete,
            "cpu_s": s.server.cpu() - cpu0,
            "rss_kib": s.server.hwm_kib(),
        }
        # What became of the stalled client (bounded drain): cut off or not?
        stalled_bytes, cut = 0, False
        end = time.monotonic() + 1.0
        poller = select.poll()
        poller.register(stalled.fd, select.POLLIN)
        while time.monotonic() < end and stalled_bytes < 2 * len(payload):
            if not poller.poll(100):
                continue
            try:
                data = stalled.sock.recv(CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                cut = True
                break
            stalled_bytes += len(data)
        out["stalled_client_bytes"] = stalled_bytes
        out["stalled_client_cut"] = cut
        return out


def measure_startup(kind, settings, workdir):
    times = []
    for _ in range(settings.startup_runs):
        pty = Pty()
        server = None
        client = None
        try:
            server = Server(kind, pty.path, free_port(), 1, workdir)
            t0 = time.monotonic()
            server.start()
            client = connect(server, t0 + settings.ready_timeout)
            times.append(time.monotonic() - t0)
        finally:
            if client is not None:
                client.close()
            if server is not None:
                server.stop()
            pty.close()
    return {"ms": statistics.median(times) * 1000, "runs_ms": [t * 1000 for t in times]}


MEASURE = {
    "dev2net": measure_dev2net,
    "net2dev": measure_net2dev,
    "echo": measure_echo,
    "fanout": measure_fanout,
    "stalled": measure_stalled,
    "startup": measure_startup,
}


def bare_python(settings):
    """Reference figures for a bare interpreter: `python3 -c pass` wall time
    (median) and the peak RSS of an interpreter that only sleeps."""
    walls = []
    for _ in range(max(1, settings.startup_runs)):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], timeout=30)
        walls.append(time.monotonic() - t0)
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; sys.stdout.write('ready\\n'); "
                             "sys.stdout.flush(); time.sleep(30)"],
                            stdout=subprocess.PIPE)
    _LIVE.add(proc)
    try:
        proc.stdout.readline()
        hwm = proc_hwm_kib(proc.pid)
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
        _LIVE.discard(proc)
    return {"pass_ms": statistics.median(walls) * 1000, "rss_kib": hwm}


# ---------------------------------------------------------------- run & report

def run(settings, servers=SERVERS, measurements=MEASUREMENTS, progress=None):
    """Run the chosen measurements; returns the result dictionary."""
    if progress is None:
        def progress(_msg):
            pass
    started = time.monotonic()
    report = {
        "meta": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "settings": settings.as_dict(),
            "versions": {},
            "mb": "10**6 bytes",
            "stalled_client_rcvbuf": STALLED_RCVBUF,
            "ser2net_options": "defaults (chardelay on, 1000 us minimum; max-connections as needed)",
        },
        "bare_python": None,
        "results": {},
        "skipped": {},
        "errors": {},
    }
    workdir = tempfile.mkdtemp(prefix="sertcp-bench-")
    try:
        report["bare_python"] = bare_python(settings)
        for kind in servers:
            if not available(kind):
                report["skipped"][kind] = "not found"
                progress("%s: not found, skipped" % kind)
                continue
            report["meta"]["versions"][kind] = tool_version(kind)
            res = report["results"].setdefault(kind, {})
            for name in measurements:
                if kind == "socat" and name in SHARED_ONLY:
                    continue
                t0 = time.monotonic()
                try:
                    res[name] = MEASURE[name](kind, settings, workdir)
                except (BenchError, OSError) as e:
                    report["errors"]["%s.%s" % (kind, name)] = str(e)
                    progress("%-8s %-8s ERROR %s" % (kind, name, e))
                    continue
                progress("%-8s %-8s %s  (%.1fs)" % (kind, name, _brief(name, res[name]),
                                                    time.monotonic() - t0))
            stalled = res.get("stalled")
            if stalled and res.get("dev2net") and res["dev2net"]["mbps"]:
                stalled["fraction"] = stalled["mbps"] / res["dev2net"]["mbps"]
    finally:
        _kill_leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
    report["ratios"], report["targets"] = compare(report)
    report["meta"]["seconds"] = time.monotonic() - started
    return report


def _brief(name, r):
    if name == "echo":
        return "median %.0f us, p99 %.0f us" % (r["median_us"] or 0, r["p99_us"] or 0)
    if name == "startup":
        return "%.0f ms" % r["ms"]
    return "%.1f MB/s%s" % (r["mbps"] or 0, " (partial)" if r.get("partial") else "")


def _get(report, kind, *path):
    value = report["results"].get(kind)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _rss(report, kind):
    values = [r.get("rss_kib") for r in report["results"].get(kind, {}).values()
              if isinstance(r, dict) and r.get("rss_kib")]
    return max(values) if values else None


def _cpu_throughput(report, kind):
    """CPU seconds per MB over the two single-client throughput runs."""
    parts = [_get(report, kind, m) for m in ("dev2net", "net2dev")]
    parts = [p for p in parts if p]
    mb = sum(p["mb"] for p in parts)
    if not parts or not mb:
        return None
    return sum(p["cpu_s"] for p in parts) / mb


def metric(report, kind, key):
    if key == "rss_kib":
        return _rss(report, kind)
    if key == "rss_above_python_kib":
        rss, bare = _rss(report, kind), (report.get("bare_python") or {}).get("rss_kib")
        return rss - bare if rss and bare else None
    if key == "cpu_s_per_mb":
        return _cpu_throughput(report, kind)
    name, field = key.split(".")
    return _get(report, kind, name, field)


# (key, label, unit format, better: "high"/"low"/None, target: (peer, op, value) or None)
ROWS = [
    ("dev2net.mbps", "device->network MB/s", "%.1f", "high", ("socat", ">=", 0.9)),
    ("net2dev.mbps", "network->device MB/s", "%.1f", "high", ("socat", ">=", 0.9)),
    ("echo.median_us", "round trip median us", "%.0f", "low", ("socat", "<=", 1.2)),
    ("echo.p99_us", "round trip p99 us", "%.0f", "low", None),
    ("fanout.mbps", "8-client fan-out MB/s", "%.1f", "high", ("ser2net", ">=", 3.0)),
    ("stalled.mbps", "stalled: other client MB/s", "%.1f", "high", None),
    ("stalled.fraction", "stalled / unstalled", "%.2f", "high", ("self", ">=", 0.8)),
    ("cpu_s_per_mb", "CPU s/MB (dev2net+net2dev)", "%.4f", "low", None),
    ("dev2net.cpu_s_per_mb", "CPU s/MB device->network", "%.4f", "low", None),
    ("net2dev.cpu_s_per_mb", "CPU s/MB network->device", "%.4f", "low", None),
    ("fanout.cpu_s_per_mb", "CPU s/MB fan-out (per dev MB)", "%.4f", "low", None),
    ("rss_kib", "peak RSS MiB", "%.1f", "low", None),
    ("rss_above_python_kib", "RSS above bare python MiB", "%.1f", "low", None),
    ("startup.ms", "start-up ms", "%.0f", "low", None),
]


def compare(report):
    ratios, targets = {}, {}
    for key, _label, _fmt, _better, target in ROWS:
        mine = metric(report, "sertcp", key)
        for peer in ("socat", "ser2net"):
            theirs = metric(report, peer, key)
            if mine is not None and theirs:
                ratios.setdefault(key, {})[peer] = mine / theirs
        if target and mine is not None:
            peer, op, value = target
            got = mine if peer == "self" else ratios.get(key, {}).get(peer)
            if got is not None:
                ok = got >= value if op == ">=" else got <= value
                targets[key] = {"value": got, "target": "%s %s%s" % (op, value, "" if peer == "self" else "x " + peer),
                                "ok": ok}
    startup = _get(report, "sertcp", "startup", "ms")
    bare = (report.get("bare_python") or {}).get("pass_ms")
    if startup and bare:
        ratios["startup.ms"] = dict(ratios.get("startup.ms", {}), python_pass=startup / bare)
    return ratios, targets


def format_table(report):
    kinds = [k for k in SERVERS if k in report["results"]]
    s = report["meta"]["settings"]
    lines = []
    lines.append("sertcp bench: %.0f MiB x %d rounds, %d round trips, %d fan-out clients; python %s, %d CPUs, %.0f s"
                 % (s["size"] / MiB, s["rounds"], s["echo_count"], s["fanout_clients"],
                    report["meta"]["python"], report["meta"]["cpus"] or 0,
                    report["meta"].get("seconds", 0)))
    for kind, version in sorted(report["meta"]["versions"].items()):
        lines.append("  %-8s %s" % (kind, version))
    lines.append("")
    header = "%-30s" % "measurement" + "".join("%11s" % k for k in kinds)
    header += "%14s%16s  %s" % ("sertcp/socat", "sertcp/ser2net", "target")
    lines.append(header)
    lines.append("-" * len(header))
    for key, label, fmt, better, _target in ROWS:
        cells = []
        any_value = False
        for kind in kinds:
            v = metric(report, kind, key)
            if key.startswith("rss") and v is not None:
                v = v / 1024.0
            if v is None:
                err = any(e.startswith(kind + "." + key.split(".")[0]) for e in report["errors"])
                cells.append("%11s" % ("error" if err else "-"))
            else:
                any_value = True
                cells.append("%11s" % (fmt % v))
        if not any_value:
            continue
        r = report["ratios"].get(key, {})
        line = "%-30s" % label + "".join(cells)
        line += "%14s%16s" % (("%.2fx" % r["socat"]) if "socat" in r else "-",
                              ("%.2fx" % r["ser2net"]) if "ser2net" in r else "-")
        t = report["targets"].get(key)
        if t:
            line += "  %s: %s" % (t["target"], "ok" if t["ok"] else "MISS")
        elif key == "startup.ms" and "python_pass" in r:
            bare = report["bare_python"]["pass_ms"]
            line += "  python -c pass %.0f ms (%.2fx)" % (bare, r["python_pass"])
        lines.append(line)
    bare = report.get("bare_python") or {}
    if bare.get("rss_kib"):
        lines.append("")
        lines.append("bare python: peak RSS %.1f MiB, `python3 -c pass` %.0f ms"
                     % (bare["rss_kib"] / 1024.0, bare["pass_ms"]))
    partial = ["%s.%s" % (k, m) for k, res in report["results"].items()
               for m, r in res.items() if isinstance(r, dict) and r.get("partial")]
    if partial:
        lines.append("partial (hit the time bound): " + ", ".join(partial))
    for kind in kinds:
        st = _get(report, kind, "stalled")
        if st:
            lines.append("%s stalled client: %s after %d bytes"
                         % (kind, "cut off" if st["stalled_client_cut"] else "still connected",
                            st["stalled_client_bytes"]))
    if "ser2net" in kinds:
        lines.append("ser2net runs with its defaults (chardelay: waits >= 1 ms before sending device data)")
    lines.append("ratios are sertcp/peer: throughput higher is better; time, CPU, RSS lower is better")
    for name, err in sorted(report["errors"].items()):
        lines.append("ERROR %s: %s" % (name, err.splitlines()[0] if err else ""))
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark sertcp against socat and ser2net on ptys over loopback.")
    p.add_argument("--json", metavar="OUT.json", help="write every number to this file")
    p.add_argument("--quick", action="store_true", help="small sizes, one round (about 40 s)")
    p.add_argument("--only", metavar="NAME", action="append", default=[],
                   help="measurement (%s) and/or server (%s); comma separated, repeatable"
                        % (", ".join(MEASUREMENTS), ", ".join(SERVERS)))
    p.add_argument("--size-mib", type=float, help="MiB per transfer round")
    p.add_argument("--rounds", type=int, help="throughput rounds (median reported)")
    p.add_argument("--echo-count", type=int, help="timed 1-byte round trips")
    args = p.parse_args(argv)
    servers, measurements = [], []
    for item in ",".join(args.only).split(","):
        item = item.strip()
        if not item:
            continue
        if item in SERVERS:
            servers.append(item)
        elif item in MEASUREMENTS:
            measurements.append(item)
        else:
            p.error("--only: unknown name %r" % item)
    args.servers = [k for k in SERVERS if k in servers] or list(SERVERS)
    args.measurements = [m for m in MEASUREMENTS if m in measurements] or list(MEASUREMENTS)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.quick() if args.quick else Settings.full()
    if args.size_mib:
        settings.size = max(1, int(args.size_mib * MiB))
    if args.rounds:
        settings.rounds = args.rounds
    if args.echo_count:
        settings.echo_count = args.echo_count

    def progress(msg):
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    if argv is None:
        signal.signal(signal.SIGTERM, on_term)
    try:
        report = run(settings, args.servers, args.measurements, progress)
    finally:
        if argv is None:
            signal.signal(signal.SIGTERM, previous)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
