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

The servers' rounds are interleaved (sertcp, socat, ser2net, sertcp, ...) so
that changes in the machine's load hit them alike; throughput is the best
round (the median is in --json), round trips are taken in blocks likewise.
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

    def __init__(self, size=16 * MiB, rounds=5, echo_count=2000, echo_warmup=20,
                 fanout_clients=8, budget=15.0, stall_size=16 * MiB, stall_bound=6.0,
                 startup_runs=5, ready_timeout=10.0):
        self.size = int(size)              # bytes per throughput round
        self.rounds = int(rounds)          # throughput rounds per server (at most)
        self.echo_count = int(echo_count)  # timed 1-byte round trips
        self.echo_warmup = int(echo_warmup)
        self.fanout_clients = int(fanout_clients)
        self.budget = float(budget)        # seconds one measurement may use per server
        self.stall_size = int(stall_size)  # bytes written in the stalled-client run;
        # larger than what the kernel buffers for the stalled client plus
        # sertcp's client_buffer, so that the stall does take effect
        self.stall_bound = float(stall_bound)  # seconds the stalled-client run may use
        self.startup_runs = int(startup_runs)
        self.ready_timeout = float(ready_timeout)

    @classmethod
    def full(cls):
        return cls()

    @classmethod
    def quick(cls):
        return cls(size=4 * MiB, rounds=2, echo_count=500, budget=4.0,
                   stall_bound=2.5, startup_runs=3)

    def as_dict(self):
        return dict(vars(self))


# ---------------------------------------------------------------- processes

_LIVE = set()   # every server process started and not yet reaped


def _kill_leftovers():
    for proc in list(_LIVE):
        stop_process(proc)


atexit.register(_kill_leftovers)


def _die_with_parent():
    """preexec_fn: have the kernel SIGTERM the server if the bench dies
    (Linux prctl PR_SET_PDEATHSIG); silently nothing elsewhere."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


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


def proc_status_kib(pid, key):
    """A size field of /proc/PID/status (VmHWM: peak RSS, VmRSS: RSS now), in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def proc_hwm_kib(pid):
    """Peak resident set size (VmHWM) of a process, in KiB."""
    return proc_status_kib(pid, "VmHWM")


def device_openers(path, exclude=()):
    """Processes other than `exclude` that have `path` open (diagnostics:
    another program reading the same pty steals the bench's bytes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % entry)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%s/fd/%s" % (entry, fd)) == path:
                    break
            except OSError:
                continue
        else:
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        found.append("%s (%s)" % (entry, cmd[:100]))
    return found


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
                                         stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
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

    def rss_kib(self):
        try:
            return proc_status_kib(self.pid, "VmRSS")
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
#
# A measurement is an object with start() (server up, clients attached),
# step() (one timed round; returns whether another round is wanted),
# result() and close().  run() starts one per server and calls their steps
# in turn -- sertcp, socat, ser2net, sertcp, ... -- so that a change in the
# machine's load during the run affects every server alike.

def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    k = int(math.ceil(fraction * len(sorted_values))) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


class Measurement:
    name = None
    clients = 1
    max_clients = 1
    stalled = 0

    def __init__(self, kind, settings, workdir):
        self.kind = kind
        self.settings = settings
        self.workdir = workdir
        self.session = None
        self.spent = 0.0     # seconds used by steps so far
        self.steps = 0

    def start(self):
        self.session = Session(self.kind, self.settings, self.workdir, clients=self.clients,
                               max_clients=self.max_clients, stalled=self.stalled).__enter__()
        self.prepare()

    def prepare(self):
        pass

    def step(self):
        t0 = time.monotonic()
        try:
            return self.run_step(t0 + max(0.5, self.settings.budget - self.spent))
        except BenchError as e:
            raise BenchError(str(e) + self.intruders())
        finally:
            self.spent += time.monotonic() - t0
            self.steps += 1

    def run_step(self, deadline):
        raise NotImplementedError

    def result(self):
        raise NotImplementedError

    def close(self):
        if self.session is not None:
            self.session.__exit__(None, None, None)
            self.session = None

    def intruders(self):
        if self.session is None or self.session.pty is None:
            return ""
        others = device_openers(self.session.pty.path,
                                exclude=(os.getpid(), self.session.server.pid))
        if not others:
            return ""
        return "; other processes have %s open: %s" % (self.session.pty.path, ", ".join(others))

    @property
    def server(self):
        return self.session.server

    @property
    def pty(self):
        return self.session.pty


class Throughput(Measurement):
    """Rounds of one transfer; reports the best and the median round."""

    def prepare(self):
        self.payload = make_payload(self.settings.size)
        self.rounds = []
        self.attach(time.monotonic() + self.settings.ready_timeout)
        self.cpu0 = self.server.cpu()

    def run_step(self, deadline):
        r = self.one_round(deadline)
        self.rounds.append(r)
        if not r["complete"] or len(self.rounds) >= self.settings.rounds:
            return False
        # Another round only if one more of the same length fits the budget.
        return self.spent + r["seconds"] * 2 <= self.settings.budget

    def result(self):
        cpu = self.server.cpu() - self.cpu0
        mbps = [r["mbps"] for r in self.rounds]
        device_mb = sum(r["device_bytes"] for r in self.rounds) / MB
        out = {
            "mbps": max(mbps) if mbps else None,
            "median_mbps": statistics.median(mbps) if mbps else None,
            "rounds": self.rounds,
            "partial": any(not r["complete"] for r in self.rounds),
            "cpu_s": cpu,
            "mb": device_mb,
            "cpu_s_per_mb": cpu / device_mb if device_mb else None,
            "rss_kib": self.server.hwm_kib(),
            "rss_end_kib": self.server.rss_kib(),
        }
        out.update(self.extra())
        return out

    def extra(self):
        return {}

    def check_clients_crc(self):
        if self.rounds and all(r["complete"] for r in self.rounds):
            expect = 0
            for _ in self.rounds:
                expect = zlib.crc32(self.payload, expect)
            if any(c.crc != expect for c in self.session.clients):
                raise BenchError("device->network data corrupted (CRC mismatch)")
            return {"data_ok": True}
        return {}


class Dev2Net(Throughput):
    name = "dev2net"

    def attach(self, deadline):
        prime(self.pty, self.session.clients, deadline)

    def one_round(self, deadline):
        clients = self.session.clients
        before = [c.payload for c in clients]
        secs, complete = device_to_clients(self.pty, self.payload, clients, deadline)
        each = [c.payload - b for c, b in zip(clients, before)]
        got = sum(each)
        return {"bytes": got, "device_bytes": min(each), "seconds": secs,
                "mbps": got / secs / MB, "complete": complete}

    def extra(self):
        return self.check_clients_crc()


class FanOut(Dev2Net):
    name = "fanout"

    def __init__(self, kind, settings, workdir):
        Dev2Net.__init__(self, kind, settings, workdir)
        self.clients = self.max_clients = settings.fanout_clients

    def extra(self):
        out = self.check_clients_crc()
        out["clients"] = self.clients
        return out


class Net2Dev(Throughput):
    name = "net2dev"

    def attach(self, deadline):
        # One byte end to end first: then the server has the device open.
        c = self.session.clients[0]
        c.sock.setblocking(True)
        try:
            c.sock.sendall(PRIME)
        finally:
            c.sock.setblocking(False)
        read_master_exact(self.pty, 1, deadline)
        self.want_crc = zlib.crc32(self.payload)

    def one_round(self, deadline):
        secs, got, crc, complete = client_to_device(self.pty, self.session.clients[0],
                                                    self.payload, deadline)
        if complete and (got != len(self.payload) or crc != self.want_crc):
            raise BenchError("network->device data corrupted (%d bytes, CRC %s)"
                             % (got, "ok" if crc == self.want_crc else "mismatch"))
        return {"bytes": got, "device_bytes": got, "seconds": secs,
                "mbps": got / secs / MB, "complete": complete}

    def extra(self):
        return {"data_ok": True} if self.rounds and not any(
            not r["complete"] for r in self.rounds) else {}


class Echo(Measurement):
    """1-byte round trips, in blocks taken in turn with the other servers."""
    name = "echo"
    BLOCKS = 10

    def prepare(self):
        self.rtts = []
        self.done = 0
        self.total = self.settings.echo_warmup + self.settings.echo_count
        self.block = max(1, int(math.ceil(self.settings.echo_count / float(self.BLOCKS))))
        c = self.session.clients[0]
        self.dev_poll = select.poll()
        self.dev_poll.register(self.pty.master, select.POLLIN)
        self.net_poll = select.poll()
        self.net_poll.register(c.fd, select.POLLIN)

    def run_step(self, deadline):
        sock, master = self.session.clients[0].sock, self.pty.master
        clock = time.perf_counter
        warmup = self.settings.echo_warmup
        end = min(self.total, self.done + self.block + (warmup if self.done == 0 else 0))
        while self.done < end:
            i = self.done
            if time.monotonic() > deadline:
                return False
            byte = bytes((i % 255 + 1,))
            wait_ms = int(self.settings.ready_timeout * 1000) if i == 0 else 2000
            t0 = clock()
            sock.send(byte)
            if not self.dev_poll.poll(wait_ms):
                raise BenchError("round trip %d: the byte never reached the device" % i)
            got = os.read(master, 16)
            if got != byte:
                raise BenchError("round trip %d: device got %r, expected %r" % (i, got, byte))
            os.write(master, got)
            if not self.net_poll.poll(wait_ms):
                raise BenchError("round trip %d: the byte never came back" % i)
            back = sock.recv(16)
            t1 = clock()
            if back != byte:
                raise BenchError("round trip %d: client got %r, expected %r" % (i, back, byte))
            if i >= warmup:
                self.rtts.append((t1 - t0) * 1e6)
            self.done += 1
        return self.done < self.total

    def result(self):
        rtts = sorted(self.rtts)
        return {
            "count": len(rtts),
            "partial": len(rtts) < self.settings.echo_count,
            "median_us": statistics.median(rtts) if rtts else None,
            "p99_us": percentile(rtts, 0.99),
            "min_us": rtts[0] if rtts else None,
            "max_us": rtts[-1] if rtts else None,
            "rss_kib": self.server.hwm_kib(),
            "rss_end_kib": self.server.rss_kib(),
        }


class Stalled(Measurement):
    """Two clients, one never reads: how fast does the other one get data?
    Each round is a fresh server (the stall changes its state); rounds go on
    while they complete within the bound, like the dev2net rounds; the
    median is compared with the median dev2net round."""
    name = "stalled"
    clients = 2
    max_clients = 2
    stalled = 1

    def start(self):
        self.payload = make_payload(self.settings.stall_size)
        self.rounds = []
        self.open_round()

    def open_round(self):
        self.close()
        self.session = Session(self.kind, self.settings, self.workdir, clients=2,
                               max_clients=2, stalled=1).__enter__()
        # Both clients read the priming bytes; after that one never reads.
        prime(self.pty, self.session.clients, time.monotonic() + self.settings.ready_timeout)

    def run_step(self, deadline):
        began = time.monotonic()
        if self.session is None:
            self.open_round()
        good, stalled = self.session.clients
        cpu0 = self.server.cpu()
        deadline = min(deadline, time.monotonic() + self.settings.stall_bound)
        secs, complete = device_to_clients(self.pty, self.payload, [good], deadline)
        out = {
            "bytes": good.payload,
            "seconds": secs,
            "mbps": good.payload / secs / MB,
            "complete": complete,
            "cpu_s": self.server.cpu() - cpu0,
            "rss_kib": self.server.hwm_kib(),
            "rss_end_kib": self.server.rss_kib(),
        }
        # What became of the stalled client (bounded drain): cut off or not?
        got, cut = 0, False
        end = time.monotonic() + 1.0
        poller = select.poll()
        poller.register(stalled.fd, select.POLLIN)
        while time.monotonic() < end and got < 2 * len(self.payload):
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
            got += len(data)
        out["stalled_client_bytes"] = got
        out["stalled_client_cut"] = cut
        self.rounds.append(out)
        self.close()
        if not complete or len(self.rounds) >= self.settings.rounds:
            return False
        # Another round only if one more of the same length fits the budget.
        return self.spent + 2 * (time.monotonic() - began) <= self.settings.budget

    def result(self):
        best = max(self.rounds, key=lambda r: r["mbps"])
        out = dict(best)
        out.update({
            "payload_bytes": len(self.payload),
            "median_mbps": statistics.median(r["mbps"] for r in self.rounds),
            "partial": not best["complete"],
            "rss_kib": max(r["rss_kib"] or 0 for r in self.rounds) or None,
            "rss_end_kib": max(r["rss_end_kib"] or 0 for r in self.rounds) or None,
            "stalled_client_cut": all(r["stalled_client_cut"] for r in self.rounds),
            "rounds": self.rounds,
        })
        return out


class Startup(Measurement):
    """Spawn to the first accepted connection; one spawn per step."""
    name = "startup"

    def start(self):
        self.times = []
        self.bare = []   # `python3 -c pass`, timed beside each sertcp spawn

    def run_step(self, deadline):
        if self.kind == "sertcp":
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", "pass"], timeout=30)
            self.bare.append(time.monotonic() - t0)
        pty = Pty()
        server = client = None
        try:
            server = Server(self.kind, pty.path, free_port(), 1, self.workdir)
            t0 = time.monotonic()
            server.start()
            client = connect(server, t0 + self.settings.ready_timeout)
            self.times.append(time.monotonic() - t0)
        finally:
            if client is not None:
                client.close()
            if server is not None:
                server.stop()
            pty.close()
        return len(self.times) < self.settings.startup_runs

    def result(self):
        out = {"ms": statistics.median(self.times) * 1000,
               "runs_ms": [t * 1000 for t in self.times]}
        if self.bare:
            out["python_pass_ms"] = statistics.median(self.bare) * 1000
        return out


MEASURE = {cls.name: cls for cls in (Dev2Net, Net2Dev, Echo, FanOut, Stalled, Startup)}


def measure(name, kinds, settings, workdir, errors, progress=None):
    """Run measurement `name` for each server in `kinds`, steps interleaved.
    Returns {kind: result}; failures go to errors["kind.name"]."""
    progress = progress or (lambda _msg: None)
    running, results = {}, {}
    t0 = time.monotonic()
    try:
        for kind in kinds:
            m = running[kind] = MEASURE[name](kind, settings, workdir)
            try:
                m.start()
            except (BenchError, OSError) as e:
                running.pop(kind).close()
                errors["%s.%s" % (kind, name)] = str(e)
                progress("%-8s %-8s ERROR %s" % (kind, name, e))
        active = list(running)
        while active:
            for kind in list(active):
                try:
                    more = running[kind].step()
                except (BenchError, OSError) as e:
                    errors["%s.%s" % (kind, name)] = str(e)
                    progress("%-8s %-8s ERROR %s" % (kind, name, e))
                    active.remove(kind)
                    running.pop(kind).close()
                    continue
                if not more:
                    active.remove(kind)
        for kind, m in running.items():
            try:
                results[kind] = m.result()
            except (BenchError, OSError) as e:
                errors["%s.%s" % (kind, name)] = str(e)
                progress("%-8s %-8s ERROR %s" % (kind, name, e))
                continue
            progress("%-8s %-8s %s" % (kind, name, _brief(name, results[kind])))
    finally:
        for m in running.values():
            m.close()
    progress("%-17s(%.1fs)" % (name, time.monotonic() - t0))
    return results


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
        rss = proc_status_kib(proc.pid, "VmRSS")
    finally:
        proc.stdout.close()
        stop_process(proc)
    return {"pass_ms": statistics.median(walls) * 1000, "rss_kib": hwm, "rss_end_kib": rss}


# ---------------------------------------------------------------- run & report

def run(settings, servers=SERVERS, measurements=MEASUREMENTS, progress=None):
    """Run the chosen measurements; returns the result dictionary."""
    progress = progress or (lambda _msg: None)
    started = time.monotonic()
    report = {
        "meta": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "settings": settings.as_dict(),
            "versions": {},
            "mb": "10**6 bytes",
            "throughput": "mbps = best round, median_mbps = median round; servers' rounds interleaved",
            "cpu_clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
            "stalled_client_rcvbuf": STALLED_RCVBUF,
            "ser2net_options": "defaults (chardelay on: >= 1000 us before sending device data)",
        },
        "bare_python": None,
        "results": {},
        "skipped": {},
        "errors": {},
    }
    kinds = []
    for kind in servers:
        if available(kind):
            kinds.append(kind)
            report["meta"]["versions"][kind] = tool_version(kind)
            report["results"][kind] = {}
        else:
            report["skipped"][kind] = "not found"
            progress("%s: not found, skipped" % kind)
    workdir = tempfile.mkdtemp(prefix="sertcp-bench-")
    try:
        report["bare_python"] = bare_python(settings)
        for name in measurements:
            these = [k for k in kinds if not (k == "socat" and name in SHARED_ONLY)]
            for kind, result in measure(name, these, settings, workdir,
                                        report["errors"], progress).items():
                report["results"][kind][name] = result
        for res in report["results"].values():
            stalled, plain = res.get("stalled"), res.get("dev2net")
            # median against median (both run in rounds), or noise in one
            # best round reads as a loss or a gain
            reference = plain and (plain.get("median_mbps") or plain.get("mbps"))
            if stalled and reference:
                stalled["fraction"] = (stalled.get("median_mbps") or stalled["mbps"]) / reference
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


def _rss(report, kind, field="rss_kib"):
    values = [r.get(field) for r in report["results"].get(kind, {}).values()
              if isinstance(r, dict) and r.get(field)]
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
    if key in ("rss_kib", "rss_end_kib"):
        return _rss(report, kind, key)
    if key == "rss_above_python_kib":
        if kind != "sertcp":   # the only server that is a Python program
            return None
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
    ("stalled.fraction", "stalled / unstalled (medians)", "%.2f", "high", ("self", ">=", 0.8)),
    ("cpu_s_per_mb", "CPU s/MB (dev2net+net2dev)", "%.4f", "low", None),
    ("dev2net.cpu_s_per_mb", "CPU s/MB device->network", "%.4f", "low", None),
    ("net2dev.cpu_s_per_mb", "CPU s/MB network->device", "%.4f", "low", None),
    ("fanout.cpu_s_per_mb", "CPU s/MB fan-out (per dev MB)", "%.4f", "low", None),
    ("rss_kib", "peak RSS (VmHWM) MiB", "%.1f", "low", None),
    ("rss_end_kib", "RSS at end (VmRSS) MiB", "%.1f", "low", None),
    ("rss_above_python_kib", "RSS above bare python MiB", "%.1f", "low", None),
    ("startup.ms", "start-up ms", "%.0f", "low", None),
]


def compare(report):
    ratios, targets = {}, {}
    for key, _label, _fmt, _better, target in ROWS:
        mine = metric(report, "sertcp", key)
        for peer in (() if key == "stalled.fraction" else ("socat", "ser2net")):
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
    bare = (_get(report, "sertcp", "startup", "python_pass_ms")
            or (report.get("bare_python") or {}).get("pass_ms"))
    if startup and bare:
        ratios["startup.ms"] = dict(ratios.get("startup.ms", {}), python_pass=startup / bare)
    return ratios, targets


def format_table(report):
    kinds = [k for k in SERVERS if k in report["results"]]
    s = report["meta"]["settings"]
    lines = []
    lines.append("sertcp bench: %g MiB x up to %d rounds, %d round trips, %d fan-out clients;"
                 " python %s, %d CPUs, %.0f s"
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
            bare = (_get(report, "sertcp", "startup", "python_pass_ms")
                    or report["bare_python"]["pass_ms"])
            line += "  python3 -c pass %.0f ms (%.2fx)" % (bare, r["python_pass"])
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
    lines.append("MB/s: best round (servers' rounds interleaved; medians in --json);"
                 " MB = 10^6 bytes; CPU in %d Hz clock ticks" % os.sysconf("SC_CLK_TCK"))
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
    p.add_argument("--size-mib", type=float, help="MiB per transfer round (and stalled-client run)")
    p.add_argument("--rounds", type=int, help="throughput rounds per server (best reported)")
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
        settings.size = settings.stall_size = max(1, int(args.size_mib * MiB))
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
    if "sertcp" in args.servers and {"dev2net", "net2dev"} & set(args.measurements):
        try:
            report["rfc2217"] = rfc2217_throughput(settings, progress)
            print(format_rfc2217(report["rfc2217"]))
        except (BenchError, OSError) as e:
            report["errors"]["sertcp.rfc2217"] = str(e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return 1 if report["errors"] else 0


# ---------------------------------------------------------------- rfc2217
# (a separate measurement, added with protocol = rfc2217; it uses only the
# helpers above and reports beside the main table)

def rfc2217_payload(size, every=2):
    """Data in which every `every`-th byte is 0xFF (which travels as IAC
    IAC in rfc2217 mode) and the rest cycle through 0x01-0xFE; no 0x00,
    the priming byte."""
    block = bytearray()
    for b in range(1, 255):
        if len(block) % every == every - 1:
            block.append(0xFF)
        block.append(b)
    reps = size // len(block) + 1
    return bytes((bytes(block) * reps)[:size])


def _rfc2217_session(protocol, workdir, deadline):
    """sertcp on a fresh pty with `protocol`; a client that has agreed
    BINARY both ways (rfc2217) and waits for nothing else."""
    pty = Pty()
    port = free_port()
    log = open(os.path.join(workdir, "sertcp-%s-%d.log" % (protocol, port)), "wb")
    proc = subprocess.Popen([sys.executable, str(SERTCP), pty.path, "--listen", "%s:%d" % (HOST, port),
                             "--baudrate", "115200", "--protocol", protocol],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    log.close()
    _LIVE.add(proc)
    server = Server("sertcp", pty.path, port, 1, workdir)
    server.proc = proc
    client = None
    try:
        client = connect(server, deadline)
        _rfc2217_attach(protocol, pty, server, client, deadline)
    except BaseException:
        if client is not None:
            client.close()
        server.stop()
        pty.close()
        raise
    return pty, server, client


def _rfc2217_attach(protocol, pty, server, client, deadline):
    if protocol == "rfc2217":
        sock = client.sock
        sock.setblocking(True)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        # DO/WILL BINARY and COM-PORT-OPTION, then a NOTIFY-MODEMSTATE
        # question: its answer means sertcp has read all of ours
        sock.sendall(bytes((255, 253, 0, 255, 251, 0, 255, 251, 44)))
        sock.sendall(bytes((255, 250, 44, 7, 255, 240)))
        seen = b""
        while seen.count(bytes((255, 250, 44, 107))) < 2:   # the first notification, then the answer
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError("sertcp closed the rfc2217 client; log:\n%s" % server.log_tail())
            seen += chunk
        sock.setblocking(False)
    prime(pty, [client], deadline)
    drain_until = time.monotonic() + 0.1   # priming bytes still on their way
    while time.monotonic() < drain_until:
        try:
            client.sock.recv(CHUNK)
        except BlockingIOError:
            time.sleep(0.005)


def _pump(out_fd, write, data, in_fd, read, expected, deadline):
    """Write `data` through write() as out_fd takes it while read() gathers
    from in_fd; (seconds, whether exactly `expected` arrived)."""
    view, off, got, crc = memoryview(data), 0, 0, 0
    poller = select.poll()
    poller.register(in_fd, select.POLLIN)
    poller.register(out_fd, select.POLLOUT)
    start = time.monotonic()
    while got < len(expected) and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            try:
                if fd == out_fd:
                    off += write(view[off:off + CHUNK])
                    if off >= len(data):
                        poller.unregister(out_fd)
                    continue
                chunk = read()
            except BlockingIOError:
                continue
            if not chunk:
                raise BenchError("the connection closed during the transfer")
            got += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return time.monotonic() - start, got == len(expected) and crc == zlib.crc32(expected)


def _rfc2217_round(direction, protocol, payload, workdir, bound):
    deadline = time.monotonic() + bound
    pty, server, client = _rfc2217_session(protocol, workdir, deadline)
    try:
        wire = payload.replace(b"\xff", b"\xff\xff") if protocol == "rfc2217" else payload
        cpu0 = server.cpu()
        client_send = lambda chunk: client.sock.send(chunk)  # noqa: E731
        client_recv = lambda: client.sock.recv(CHUNK)  # noqa: E731
        pty_write = lambda chunk: os.write(pty.master, chunk)  # noqa: E731
        pty_read = lambda: os.read(pty.master, 65536)  # noqa: E731
        if direction == "dev2net":
            # the device side writes the payload; the client reads it framed
            seconds, ok = _pump(pty.master, pty_write, payload, client.fd, client_recv, wire, deadline)
        else:
            seconds, ok = _pump(client.fd, client_send, wire, pty.master, pty_read, payload, deadline)
        cpu = server.cpu() - cpu0
        return {"mbps": len(payload) / seconds / MB if ok else None, "cpu_s_per_mb": cpu / (len(payload) / MB),
                "complete": ok}
    finally:
        client.close()
        server.stop()
        pty.close()


def rfc2217_throughput(settings, progress):
    """dev2net and net2dev through sertcp in raw and in rfc2217 mode, with
    0xFF-rich payloads (half and a quarter of the bytes 0xFF) and a plain
    one (1 in 64); payload MB/s
    (best of the rounds), and rfc2217 as a fraction of raw."""
    size = min(settings.size, 8 * MiB)
    rounds = max(1, min(settings.rounds, 3))
    out = {"size": size, "rounds": rounds, "results": {}}
    workdir = tempfile.mkdtemp(prefix="sertcp-bench-rfc2217-")
    try:
        for every in (2, 4, 64):
            payload = rfc2217_payload(size, every)
            density = payload.count(b"\xff") / len(payload)
            for direction in ("dev2net", "net2dev"):
                best = {}
                for _ in range(rounds):          # raw and rfc2217 rounds interleaved
                    for protocol in ("raw", "rfc2217"):
                        r = _rfc2217_round(direction, protocol, payload, workdir, max(10.0, settings.budget))
                        if r["mbps"] is not None and r["mbps"] > best.get(protocol, {}).get("mbps", 0):
                            best[protocol] = r
                key = "%s %.3g%% 0xFF" % (direction, density * 100)
                raw, telnet = best.get("raw"), best.get("rfc2217")
                ratio = telnet["mbps"] / raw["mbps"] if raw and telnet else None
                out["results"][key] = {"raw": raw, "rfc2217": telnet, "ratio": ratio}
                progress("rfc2217: %s: raw %s, rfc2217 %s MB/s" % (
                    key, "%.1f" % raw["mbps"] if raw else "-", "%.1f" % telnet["mbps"] if telnet else "-"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def format_rfc2217(result):
    lines = ["", "protocol = rfc2217 beside raw (payload MB/s, best of %d rounds of %g MiB; target: >= 0.80x raw)"
             % (result["rounds"], result["size"] / MiB),
             "%-22s%10s%10s%8s%16s" % ("transfer", "raw", "rfc2217", "ratio", "cpu s/MB r/t")]
    for key, r in result["results"].items():
        raw, telnet = r["raw"], r["rfc2217"]
        lines.append("%-22s%10s%10s%8s%16s" % (
            key, "%.1f" % raw["mbps"] if raw else "-", "%.1f" % telnet["mbps"] if telnet else "-",
            "%.2fx" % r["ratio"] if r["ratio"] else "-",
            "%.3f/%.3f" % (raw["cpu_s_per_mb"], telnet["cpu_s_per_mb"]) if raw and telnet else "-"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
