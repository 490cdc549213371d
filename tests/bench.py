#!/usr/bin/env python3
"""Benchmark sertcp against socat and ser2net.

    python3 tests/bench.py [--json OUT.json] [--quick | --smoke] [--list]
                           [--only NAME[,NAME...]] [--soak SECONDS]

Every measurement is in one registry (REGISTRY, near the end): its name,
one line on what it measures, how it runs, and each figure it gives beside
its target, written as a check on the result.  `--list` prints it; the
report ends with one table of every figure, its target and ok / MISS.
`--smoke` runs every measurement with tiny sizes (well under 30 s) to show
that each one runs and reports; its speeds mean nothing and its targets are
not judged (tests/test_bench.py runs it).

Every server runs on its own pseudo-terminal (os.openpty(), slave set raw at
once, the bench keeps the master) and listens on 127.0.0.1 on a free port.
The bench plays both the device (the pty master) and the TCP clients, in one
thread, with poll() and non-blocking descriptors.  Each server gets a fresh
process for each measurement.  Run on each server, side by side:

  dev2net  bytes written into the master, received by one TCP client (MB/s)
  net2dev  bytes sent by one TCP client, read from the master (MB/s)
  echo     1-byte round trip client -> device -> client (median, p99 in us)
  fanout   8 clients, each receives everything written into the master
           (aggregate MB/s; not socat, which serves one client per device)
  stalled  2 clients, one never reads: the other one's dev2net MB/s, and
           that as a fraction of the same client alone, in rounds taken
           in turn with the stalled ones (not socat)
  startup  spawn to the listening port accepting a connection (ms), beside
           the wall time of `python3 -c pass`; sertcp also as a script

Ports side by side ("--only ports" runs just these):

  isolation  two ports in one sertcp: port B's 1-byte round trips (p50,
             p99) alone and while port A streams device -> client at full
             speed (from a forked child), in blocks taken in turn
  load32     32 ports in one process, one client each, every port moving
             115,200 baud's worth (11,520 bytes/s) both ways, paced by one
             thread for all ptys and one for all sockets: the server's CPU
             seconds, sertcp's beside ser2net's on the same load

Protocol: rfc2217  dev2net and net2dev in raw and in rfc2217 mode, with
payloads where 1 byte in 2, 4 and 64 is 0xFF.

Protocol: modbus  four Modbus TCP masters polling through one RTU bus
(the bench plays the device, answering at once): requests/s, and sertcp's
cost per request -- the time per request (the bus never idles while
four masters wait) minus the bus round trip.
Nothing runs beside it: pymodbus 3.16 ships no TCP-to-serial forwarder
(no RemoteDeviceContext for its old serial_forwarder example), and mbusd
is not packaged by Debian.

UDP: udp  device -> UDP: what is written into the master, received by one
UDP socket from sertcp's udp_send_to and from socat's UDP-SENDTO, each read
one datagram (MB/s) and in 1 KiB datagrams (datagrams/s; sertcp's
pack_size, socat's -b), with the bytes lost (UDP has no back-pressure).

Footprint and scale (sertcp only -- socat and ser2net have no
shared listeners, identity routing or packing timers; "--only scale" runs
just these):

  memory      peak RSS of one port with one idle client above a bare python3
              (sertcp imported as the service files start it, and python3
              sertcp.py for reference); RSS
              and descriptors at 1, 100 and 1,000 clients that all receive a
              broadcast, and the KiB each further client costs
  accept      1,000 connections at once until sertcp has answered each one
              (its banner), with the default backlog (1024) and with 16
  fanout1000  1,000 clients, send_to = all, each receives all of a 1 MiB
              burst (byte count and CRC per client)
  ports200    2,000 clients on 200 ports behind 4 shared listeners
              (identity routing), each gets its own port's marker
  packtimer   pack_idle_ms = 20 and pack_max_ms = 50: when a packet arrives
              against the last / first byte written (error in ms)
  soak        connect/disconnect churn at 100 connections per second
              (--soak SECONDS; 600 s, --quick 20 s): RSS and descriptors
  soaktimers  the same churn where each connection arms timers: an id sent
              first (identity), timeout = 3600, and one client that stays
              connected all along (120 s, --quick 20 s)

sertcp runs as it is deployed: `python3 -c 'import sys, sertcp;
sys.exit(sertcp.main())'` (what --print-service writes) with PYTHONPATH at the
repository and its bytecode compiled once per run into a cache of the
bench's own (PYTHONPYCACHEPREFIX); the bench raises its descriptor limit to
the hard limit.

The servers' rounds are interleaved (sertcp, socat, ser2net, sertcp, ...) so
that changes in the machine's load hit them alike; throughput is the best
round (the median is in --json), round trips are taken in blocks likewise.
CPU seconds per MB (utime+stime of the server from /proc/PID/stat) are taken
over the timed part of the throughput runs, peak RSS from VmHWM in
/proc/PID/status; a bare python3 is measured the same way for reference.
MB means 10**6 bytes.  Every transfer is bounded in bytes and time; a
transfer that hits its time bound is reported with what it achieved and
marked "partial".  --json: "results" (server -> measurement) for those run
on each server, "own" (measurement) for those that start their own
servers, "rows" every figure beside its target.

--only takes measurement names and/or server names (sertcp, socat, ser2net),
comma separated.  Linux only (/proc, fork); standard library only.  socat and
ser2net are used if found on PATH and skipped otherwise.
"""

import argparse
import atexit
import contextlib
import errno
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
import threading
import time
import tty
import zlib
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERTCP = ROOT / "sertcp.py"
HOST = "127.0.0.1"
MiB = 1 << 20
MB = 1e6
SERVERS = ("sertcp", "socat", "ser2net")
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
                 startup_runs=5, ready_timeout=10.0, soak=600.0, soak_timers=120.0, accept_runs=3):
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
        # footprint and scale
        self.memory_levels = (1, 100, 1000)  # idle clients on one port
        self.broadcast = 64                # bytes each level's clients must receive
        self.accept_clients = 1000
        self.accept_runs = int(accept_runs)  # per backlog; median reported
        self.big_fanout_clients = 1000
        self.big_fanout_size = 1 * MiB
        self.scale_ports = 200
        self.port_clients = 10             # per port
        self.shared_listeners = 4
        self.connect_window = 16           # connects not yet answered, outside `accept`
        self.pack_samples = 30
        self.pack_idle_ms = 20
        self.pack_max_ms = 50
        self.pack_trickle_ms = 5           # pack_max_ms run: one byte this often
        self.soak = float(soak)            # seconds of connect/disconnect churn
        self.soak_timers = float(soak_timers)  # seconds of the soaktimers churn
        self.soak_rate = 100.0             # connections per second
        self.soak_hold = 0.1               # seconds each connection stays
        self.soak_sample = 5.0             # seconds between RSS/descriptor samples
        self.scale_bound = 60.0            # seconds any one scale step may take
        self.accept_bound = 10.0           # seconds a burst of connects may take
        # cross-port isolation: port B's round trips alone and while port A streams
        self.isolation_blocks = 5          # blocks of each, taken in turn
        self.isolation_count = 300         # timed round trips per block
        self.isolation_bound = 60.0        # seconds the whole measurement may take
        # 32-port load: every port moves baudrate/10 bytes/s both ways
        self.load_ports = 32
        self.load_baudrate = 115200
        self.load_seconds = 10.0           # per round
        self.load_rounds = 2               # per server, sertcp and ser2net in turn
        self.load_tick = 0.005             # seconds between paced writes
        self.modbus_seconds = 5.0          # protocol = modbus: seconds of polling by 4 masters

    @classmethod
    def full(cls):
        return cls()

    @classmethod
    def quick(cls):
        return cls(size=4 * MiB, rounds=2, echo_count=500, budget=4.0,
                   stall_bound=2.5, startup_runs=3, soak=20.0, soak_timers=20.0, accept_runs=1)

    @classmethod
    def smoke(cls):
        """Every measurement once, as small as still gives figures: that
        each one runs and reports, in well under 30 s; its speeds mean
        nothing (targets are not judged)."""
        s = cls(size=256 * 1024, rounds=1, echo_count=40, echo_warmup=5, fanout_clients=3, budget=2.0,
                stall_size=512 * 1024, stall_bound=1.5, startup_runs=1, soak=1.0, soak_timers=1.0,
                accept_runs=1)
        s.memory_levels = (1, 5, 20)
        s.accept_clients = 12               # within the default backlog: none left hanging
        s.accept_bound = 3.0
        s.big_fanout_clients = 20
        s.big_fanout_size = 64 * 1024
        s.scale_ports = 4
        s.port_clients = 2
        s.shared_listeners = 2
        s.pack_samples = 3
        s.soak_sample = 0.25
        s.isolation_blocks = 1
        s.isolation_count = 30
        s.load_seconds = 0.5
        s.load_rounds = 1
        s.modbus_seconds = 0.5
        return s

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
            argv = [PYTHON["path"], str(SERTCP), "--version"]
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


# Every interpreter the bench starts (sertcp and the bare python3 it is
# measured against) is PYTHON["path"]: by default a fresh venv of this
# Python with only pyserial, as a box runs it: the interpreter running the
# bench may load .pth extras of its site-packages at every start, which
# hides part of sertcp's cost in the bare figure.  --python PATH picks one.
PYTHON = {"path": sys.executable, "what": "the bench's own interpreter"}


def clean_venv(directory):
    """A venv of this Python without pip, setuptools or any .pth, holding
    only a link to the pyserial the bench's interpreter has (no network);
    returns its python3."""
    import serial
    import venv
    venv.EnvBuilder(with_pip=False, symlinks=True).create(directory)
    python = os.path.join(directory, "bin", "python3")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          stdout=subprocess.PIPE, check=True, timeout=60).stdout.decode().strip()
    os.symlink(os.path.dirname(serial.__file__), os.path.join(site, "serial"))
    return python


def choose_python(path):
    """Set PYTHON: `path`, or a clean venv made for this run."""
    if path:
        PYTHON.update(path=path, what="given with --python")
        return
    directory = tempfile.mkdtemp(prefix="sertcp-bench-venv-")
    atexit.register(shutil.rmtree, directory, True)
    try:
        PYTHON.update(path=clean_venv(directory), what="a fresh venv of %s with only pyserial" % sys.executable)
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError("cannot make a clean venv in %s: %s (or give --python)" % (directory, e))


def describe_python():
    version = subprocess.run([PYTHON["path"], "-c", "import sys; print(sys.version.split()[0])"],
                             stdout=subprocess.PIPE, timeout=30).stdout.decode().strip()
    return "interpreter: %s (Python %s; %s)" % (PYTHON["path"], version, PYTHON["what"])


# sertcp runs as deployed: `python3 -m sertcp` from cached bytecode.  Run as
# a script (`python3 sertcp.py`) the whole file is compiled at every start,
# which costs megabytes of peak RSS and tens of milliseconds.
_BYTECODE = {"prefix": None, "stamp": None}


def sertcp_argv(script=False):
    return [PYTHON["path"]] + ([str(SERTCP)] if script else ["-c", "import sys, sertcp; sys.exit(sertcp.main())"])


def _pycache_prefix():
    if _BYTECODE["prefix"] is None:
        path = tempfile.mkdtemp(prefix="sertcp-bench-pycache-")
        atexit.register(shutil.rmtree, path, True)
        _BYTECODE["prefix"] = path
    return _BYTECODE["prefix"]


def sertcp_env():
    """The environment of every sertcp the bench starts: the repository on
    PYTHONPATH, bytecode written to (and read from) the bench's own cache."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONPYCACHEPREFIX"] = _pycache_prefix()
    return env


# The cache prefix holds the bytecode of every module, the standard
# library's and pyserial's included (their own __pycache__ is not used under
# a prefix): import sertcp and every module it names anywhere, including the
# ones it imports only when needed, and the codec socket uses for host names.
_WARM_CACHE = """
import ast, importlib, sertcp
for node in ast.walk(ast.parse(open(sertcp.__file__).read())):
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module]
    else:
        continue
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
"localhost".encode("idna")
"""


def ensure_bytecode():
    """Compile sertcp.py, and what it imports, into the cache once (again
    whenever the file changed since), so that no measured start compiles."""
    st = SERTCP.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    if stamp == _BYTECODE["stamp"]:
        return
    r = subprocess.run([PYTHON["path"], "-c", _WARM_CACHE], env=sertcp_env(), cwd=str(ROOT),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if r.returncode:
        raise BenchError("`import sertcp` failed:\n%s" % r.stdout.decode(errors="replace")[-2000:])
    _BYTECODE["stamp"] = stamp


def pycache_files():
    """The files in the bench's bytecode cache (relative paths)."""
    prefix = _pycache_prefix()
    return {os.path.relpath(os.path.join(d, f), prefix) for d, _, files in os.walk(prefix) for f in files}


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of sockets and
    hundreds of ptys); returns the (soft, hard) in force."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def proc_fds(pid):
    """Open descriptors of a process."""
    return len(os.listdir("/proc/%d/fd" % pid))


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

_SERIAL = [0]   # numbers the servers' log files


def write_ser2net_config(path, connections):
    """A ser2net (4.x YAML) configuration: one connection per (TCP port,
    device, max clients), 115200 8N1, with ser2net's default options."""
    with open(path, "w") as f:
        f.write("%YAML 1.1\n---\n")
        for i, (port, device, max_clients) in enumerate(connections):
            f.write("connection: &bench%d\n"
                    "  accepter: tcp,%s,%d\n"
                    "  connector: serialdev,%s,115200n81,local\n"
                    "  options:\n"
                    "    max-connections: %d\n"
                    % (i, HOST, port, device, max_clients))


class Server:
    """One server process (sertcp, socat or ser2net) on one pty and port.
    sertcp only: `extra` flags, `script` = run as `python3 sertcp.py`, and
    device/port None for a configuration given by `extra` (-c FILE)."""

    def __init__(self, kind, device, port, max_clients, workdir, extra=(), script=False, config=None):
        self.kind = kind
        self.config = config    # ser2net: a configuration file instead of device and port
        self.device = device
        self.port = port
        self.max_clients = max_clients
        self.workdir = workdir
        self.extra = list(extra)
        self.script = script
        self.proc = None
        _SERIAL[0] += 1
        self.logpath = os.path.join(workdir, "%s-%d-%d.log" % (kind, port or 0, _SERIAL[0]))
        self.argv = self._argv()
        if kind == "sertcp":
            ensure_bytecode()
            self.cached = pycache_files()

    def compiled(self):
        """sertcp: modules compiled (into the cache) since this server was
        made -- none, if every start read bytecode."""
        return sorted(pycache_files() - self.cached) if self.kind == "sertcp" else []

    def _argv(self):
        if self.kind == "sertcp":
            argv = sertcp_argv(self.script)
            if self.device:
                argv += [self.device, "--baudrate", "115200"]
            if self.port:
                argv += ["--listen", "%s:%d" % (HOST, self.port)]
            if self.max_clients > 1:
                argv += ["--max-clients", str(self.max_clients)]
            return argv + self.extra
        if self.kind == "socat":
            return ["socat",
                    "TCP-LISTEN:%d,bind=%s,reuseaddr" % (self.port, HOST),
                    "FILE:%s,rawer,echo=0,b115200" % self.device]
        if self.kind == "ser2net":
            config = self.config
            if config is None:
                config = os.path.join(self.workdir, "ser2net-%d.yaml" % self.port)
                write_ser2net_config(config, [(self.port, self.device, self.max_clients)])
            pidfile = os.path.join(self.workdir, "ser2net-%d.pid" % _SERIAL[0])
            # -n: stay in the foreground (Popen's pid is ser2net itself);
            # -d: log to stdout; -u: no UUCP lock files.
            return ["ser2net", "-n", "-d", "-u", "-c", config, "-P", pidfile]
        raise ValueError(self.kind)

    def start(self):
        env = sertcp_env() if self.kind == "sertcp" else None
        log = open(self.logpath, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent, env=env)
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

    def footprint(self):
        """RSS now, peak RSS and open descriptors of the server."""
        self.check_alive()
        return {"rss_kib": self.rss_kib(), "hwm_kib": self.hwm_kib(), "fds": proc_fds(self.pid)}

    def log_count(self, text):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode(errors="replace").count(text)
        except OSError:
            return 0

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


def connect(server, deadline, rcvbuf=None, port=None):
    """Connect to the server (on `port` if given, else its own), retrying
    while the port is not yet listening."""
    port = port or server.port
    while True:
        server.check_alive()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(max(0.05, min(2.0, deadline - time.monotonic())))
            sock.connect((HOST, port))
        except (ConnectionRefusedError, socket.timeout):
            sock.close()
            if time.monotonic() > deadline:
                raise BenchError("%s: port %d never accepted a connection; log:\n%s"
                                 % (server.kind, port, server.log_tail()))
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


def round_trip(sock, master, dev_poll, net_poll, i, wait_ms, clock=time.perf_counter):
    """One byte from the client to the device, which (the bench) sends it
    back; the microseconds from send to receipt.  dev_poll and net_poll
    wait for the pty master and the socket to be readable."""
    byte = bytes((i % 255 + 1,))
    t0 = clock()
    sock.send(byte)
    if not dev_poll.poll(wait_ms):
        raise BenchError("round trip %d: the byte never reached the device" % i)
    got = os.read(master, 16)
    if got != byte:
        raise BenchError("round trip %d: device got %r, expected %r" % (i, got, byte))
    os.write(master, got)
    if not net_poll.poll(wait_ms):
        raise BenchError("round trip %d: the byte never came back" % i)
    back = sock.recv(16)
    t1 = clock()
    if back != byte:
        raise BenchError("round trip %d: client got %r, expected %r" % (i, back, byte))
    return (t1 - t0) * 1e6


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
        warmup = self.settings.echo_warmup
        end = min(self.total, self.done + self.block + (warmup if self.done == 0 else 0))
        while self.done < end:
            i = self.done
            if time.monotonic() > deadline:
                return False
            wait_ms = int(self.settings.ready_timeout * 1000) if i == 0 else 2000
            rtt = round_trip(sock, master, self.dev_poll, self.net_poll, i, wait_ms)
            if i >= warmup:
                self.rtts.append(rtt)
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
    while they complete within the bound, like the dev2net rounds.  Before
    each stalled round, a reference round: the same server set-up and
    payload with the reading client alone, so that the median stalled round
    is compared with the median of rounds taken alongside it, not with the
    dev2net rounds taken minutes earlier under other load."""
    name = "stalled"
    clients = 2
    max_clients = 2
    stalled = 1

    def start(self):
        self.payload = make_payload(self.settings.stall_size)
        self.rounds = []
        self.reference = []
        self.open_round(alone=True)

    def open_round(self, alone=False):
        self.close()
        self.alone = alone
        self.session = Session(self.kind, self.settings, self.workdir, clients=1 if alone else 2,
                               max_clients=2, stalled=0 if alone else 1).__enter__()
        # Both clients read the priming bytes; after that one never reads.
        prime(self.pty, self.session.clients, time.monotonic() + self.settings.ready_timeout)

    def run_step(self, deadline):
        began = time.monotonic()
        if self.session is None:
            self.open_round(alone=len(self.reference) <= len(self.rounds))
        deadline = min(deadline, time.monotonic() + self.settings.stall_bound)
        if self.alone:
            good = self.session.clients[0]
            secs, complete = device_to_clients(self.pty, self.payload, [good], deadline)
            self.reference.append({"mbps": good.payload / secs / MB, "complete": complete})
            self.close()
            return True                          # the stalled round of this pair
        good, stalled = self.session.clients
        cpu0 = self.server.cpu()
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
            "reference_rounds": self.reference,
        })
        if self.reference:
            out["reference_median_mbps"] = statistics.median(r["mbps"] for r in self.reference)
            out["fraction"] = out["median_mbps"] / out["reference_median_mbps"]
        return out


class Startup(Measurement):
    """Spawn to the first accepted connection; one spawn per step.  sertcp
    starts as the service files start it (cached bytecode); a start as
    `python3 sertcp.py` (compiled each time) is timed beside it."""
    name = "startup"

    def start(self):
        self.times = []
        self.bare = []   # `python3 -c pass`, timed beside each sertcp spawn
        self.script = []  # sertcp as a script

    def run_step(self, deadline):
        if self.kind == "sertcp":
            t0 = time.monotonic()
            subprocess.run([PYTHON["path"], "-c", "pass"], timeout=30)
            self.bare.append(time.monotonic() - t0)
            self.script.append(self.spawn(script=True))
        self.times.append(self.spawn())
        return len(self.times) < self.settings.startup_runs

    def spawn(self, script=False):
        pty = Pty()
        server = client = None
        try:
            server = Server(self.kind, pty.path, free_port(), 1, self.workdir, script=script)
            t0 = time.monotonic()
            server.start()
            client = connect(server, t0 + self.settings.ready_timeout)
            return time.monotonic() - t0
        finally:
            if client is not None:
                client.close()
            if server is not None:
                server.stop()
            pty.close()

    def result(self):
        out = {"ms": statistics.median(self.times) * 1000,
               "runs_ms": [t * 1000 for t in self.times]}
        if self.bare:
            out["python_pass_ms"] = statistics.median(self.bare) * 1000
        if self.script:
            out["script_ms"] = statistics.median(self.script) * 1000
            out["script_runs_ms"] = [t * 1000 for t in self.script]
        return out


def measure(name, kinds, settings, workdir, errors, progress=None):
    """Run measurement `name` for each server in `kinds`, steps interleaved.
    Returns {kind: result}; failures go to errors["kind.name"]."""
    progress = progress or (lambda _msg: None)
    running, results = {}, {}
    t0 = time.monotonic()
    try:
        for kind in kinds:
            m = running[kind] = BENCH[name].each(kind, settings, workdir)
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
        subprocess.run([PYTHON["path"], "-c", "pass"], timeout=30)
        walls.append(time.monotonic() - t0)
    proc = subprocess.Popen([PYTHON["path"], "-c",
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


# ---------------------------------------------------------------- footprint and scale
#
# Issue #7's figures.  sertcp only: socat joins one client to one device,
# and neither socat nor ser2net has shared listeners with identity routing
# or packing timers.  Each scale_*() starts its own sertcp (with --banner,
# so that a client knows it was admitted: the banner comes from the port
# once it has the connection) and returns a dictionary; scale_rows() sets
# each figure beside its target.

BANNER = b"+"


class Peer:
    """One of many non-blocking clients (see connect_many): it connects,
    sends `greeting`, and counts as answered once `expect` has arrived;
    `got` gathers what it received."""
    __slots__ = ("addr", "greeting", "expect", "sock", "fd", "got", "stage", "not_before")

    def __init__(self, addr, greeting=b"", expect=BANNER):
        self.addr, self.greeting, self.expect = addr, greeting, expect
        self.sock, self.fd, self.got = None, -1, bytearray()
        self.stage = 0          # 0 connecting, 1 waiting for `expect`, 2 answered
        self.not_before = 0.0   # a refused connect is tried again after this

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def close_peers(peers):
    for p in peers:
        p.close()


def _log_hint(server):
    return "; sertcp log:\n%s" % server.log_tail() if server is not None else ""


def connect_many(peers, deadline, window=0, server=None):
    """Connect every peer at once (window 0) or with at most `window` of
    them not yet answered, send each its greeting as soon as it is
    connected, and wait until each has received its `expect` bytes.  A
    refused connect is tried again (the server may still be starting); a
    connection the server closes is an error.  Returns the seconds from the
    first connect to the last answer."""
    poller = select.poll()
    by_fd = {}
    todo = deque(peers)
    unanswered = 0
    left = len(peers)

    def answered(fd, p):
        poller.unregister(fd)
        del by_fd[fd]
        p.stage = 2

    start = time.monotonic()
    while left:
        now = time.monotonic()
        while todo and (not window or unanswered < window) and todo[0].not_before <= now:
            p = todo.popleft()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(p.addr)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                raise BenchError("connect to %s:%d: %s" % (p.addr[0], p.addr[1], os.strerror(err)))
            p.sock, p.fd, p.stage = sock, sock.fileno(), 0
            by_fd[p.fd] = p
            poller.register(p.fd, select.POLLOUT)
            unanswered += 1
        if now > deadline:
            raise BenchError("%d of %d connections not answered within the time bound%s"
                             % (left, len(peers), _log_hint(server)))
        wait = 100
        if todo and (not window or unanswered < window):   # refused ones, to try again
            wait = min(wait, max(1, int(math.ceil((todo[0].not_before - now) * 1000))))
        for fd, _ in poller.poll(wait):
            p = by_fd.get(fd)
            if p is None:
                continue
            if p.stage == 0:
                err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == errno.ECONNREFUSED:   # not listening yet
                    if server is not None:
                        server.check_alive()
                    poller.unregister(fd)
                    del by_fd[fd]
                    p.close()
                    unanswered -= 1
                    p.not_before = time.monotonic() + 0.005
                    todo.append(p)
                    continue
                if err:
                    raise BenchError("connect to %s:%d: %s" % (p.addr[0], p.addr[1], os.strerror(err)))
                p.stage = 1
                if p.greeting:
                    p.sock.send(p.greeting)   # a few bytes: the socket takes them
                if not p.expect:
                    answered(fd, p)
                    unanswered -= 1
                    left -= 1
                else:
                    poller.modify(fd, select.POLLIN)
                continue
            try:
                data = p.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                raise BenchError("sertcp closed a connection before answering it (%d of %d answered)%s"
                                 % (len(peers) - left, len(peers), _log_hint(server)))
            p.got += data
            if len(p.got) >= len(p.expect):
                if bytes(p.got[:len(p.expect)]) != p.expect:
                    raise BenchError("a client got %r, expected %r first" % (bytes(p.got[:16]), p.expect))
                answered(fd, p)
                unanswered -= 1
                left -= 1
    return time.monotonic() - start


def gather(peers, need, deadline, what, server=None):
    """Read every peer until its `got` holds need[i] bytes."""
    poller = select.poll()
    by_fd = {}
    for p, n in zip(peers, need):
        if len(p.got) < n:
            by_fd[p.fd] = (p, n)
            poller.register(p.fd, select.POLLIN)
    while by_fd:
        if time.monotonic() > deadline:
            raise BenchError("%d of %d clients did not receive %s in time%s"
                             % (len(by_fd), len(peers), what, _log_hint(server)))
        for fd, _ in poller.poll(100):
            p, n = by_fd[fd]
            try:
                data = p.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                raise BenchError("sertcp closed a client before it received %s%s" % (what, _log_hint(server)))
            p.got += data
            if len(p.got) >= n:
                poller.unregister(fd)
                del by_fd[fd]


@contextlib.contextmanager
def sertcp_with_peers(workdir, max_clients, extra, script=False):
    """A sertcp on a fresh pty, and a list for its peers: the peers, the
    server and the pty are closed afterwards whatever happened."""
    pty = Pty()
    server, peers = None, []
    try:
        server = Server("sertcp", pty.path, free_port(), max_clients, workdir, script=script,
                        extra=extra).start()
        yield pty, server, peers
    finally:
        close_peers(peers)
        if server is not None:
            server.stop()
        pty.close()


def _memory_run(settings, workdir, levels, script, deadline):
    """One sertcp (one port, send_to = all) with `levels` idle clients in
    turn; at each level a broadcast that every client must receive, then
    RSS, peak RSS and descriptors."""
    snaps = []
    with sertcp_with_peers(workdir, 2000, ["--send-to", "all", "--banner", BANNER.decode()],
                           script) as (pty, server, peers):
        addr = (HOST, server.port)
        for i, n in enumerate(levels):
            new = [Peer(addr) for _ in range(n - len(peers))]
            secs = connect_many(new, deadline, window=settings.connect_window, server=server)
            peers += new
            mark = bytes((0x41 + i % 26,)) * settings.broadcast
            need = [len(p.got) + len(mark) for p in peers]
            os.write(pty.master, mark)
            gather(peers, need, deadline, "the %d-byte broadcast" % len(mark), server)
            if any(not p.got.endswith(mark) for p in peers):
                raise BenchError("a client got something else than the broadcast")
            for p in peers:
                del p.got[:]
            snap = server.footprint()
            snap.update(clients=n, connect_s=secs, compiled=server.compiled())
            snaps.append(snap)
    return snaps


def scale_memory(settings, workdir, report):
    deadline = time.monotonic() + settings.scale_bound
    bare = (report.get("bare_python") or {}).get("rss_kib")
    levels = _memory_run(settings, workdir, settings.memory_levels, False, deadline)
    script = _memory_run(settings, workdir, settings.memory_levels[:1], True, deadline)[0]
    one = levels[0]
    out = {"bare_python_hwm_kib": bare, "levels": levels, "script_one_client": script,
           "one_client_hwm_kib": one["hwm_kib"],
           "above_python_kib": one["hwm_kib"] - bare if bare else None,
           "script_above_python_kib": script["hwm_kib"] - bare if bare else None,
           "per_client_kib": {}}
    pairs = list(zip(levels, levels[1:]))
    if len(levels) > 2:
        pairs.append((levels[0], levels[-1]))
    for a, b in pairs:
        out["per_client_kib"]["%d-%d" % (a["clients"], b["clients"])] = \
            (b["rss_kib"] - a["rss_kib"]) / float(b["clients"] - a["clients"])
    return out


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDoCookies", "SyncookiesSent", "SyncookiesRecv")


def tcp_counters():
    """The kernel's (system-wide) TcpExt counters of listen-queue overflows
    and SYN cookies, from /proc/net/netstat."""
    out = {}
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            for k, v in zip(names.split()[1:], values.split()[1:]):
                if k in TCP_COUNTERS:
                    out[k] = int(v)
    return out


def _accept_run(settings, workdir, extra):
    """A burst of connects at once; the time until sertcp answered every
    one (its banner), or how many it answered within accept_bound."""
    n = settings.accept_clients
    with sertcp_with_peers(workdir, n + 1, ["--banner", BANNER.decode()] + extra) as (pty, server, peers):
        addr = (HOST, server.port)
        probe = [Peer(addr)]            # listening and serving: then time the burst
        connect_many(probe, time.monotonic() + settings.ready_timeout, server=server)
        close_peers(probe)
        time.sleep(0.1)
        peers.extend(Peer(addr) for _ in range(n))
        before = tcp_counters()
        try:
            secs = connect_many(peers, time.monotonic() + settings.accept_bound, window=0, server=server)
        except BenchError:
            server.check_alive()
            secs = None
        after = tcp_counters()
        snap = server.footprint()
        snap.update(seconds=secs, answered=sum(1 for p in peers if p.stage == 2),
                    # connected as far as the client's kernel knows, never answered
                    silent=sum(1 for p in peers if p.stage == 1),
                    kernel={k: after[k] - before.get(k, 0) for k in after})
        return snap


def scale_accept(settings, workdir, report):
    out = {"clients": settings.accept_clients, "variants": {}}
    for label, extra in (("16", ["--backlog", "16"]), ("default", [])):
        runs = [_accept_run(settings, workdir, extra) for _ in range(settings.accept_runs)]
        secs = [r["seconds"] for r in runs]
        every = None not in secs      # None: not all answered within accept_bound
        out["variants"][label] = {"backlog": 1024 if label == "default" else int(label),
                                  "seconds": statistics.median(secs) if every else None,
                                  "max_seconds": max(secs) if every else None,
                                  "answered_min": min(r["answered"] for r in runs),
                                  "silent_max": max(r["silent"] for r in runs), "runs": runs}
    out["bound_s"] = settings.accept_bound
    return out


def broadcast_to_many(pty, clients, payload, deadline):
    """Write payload into the device while reading every client into one
    buffer; returns the seconds until every client still connected has
    all of it (or the deadline).  A client the server closes is counted
    (client.closed), not an error."""
    total = len(payload)
    targets = {c.fd: c.payload + total for c in clients}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    src = memoryview(payload)
    poller = select.poll()
    by_fd = {}
    for c in clients:
        poller.register(c.fd, select.POLLIN)
        by_fd[c.fd] = c
    master = pty.master
    poller.register(master, select.POLLOUT)
    off = 0
    waiting = len(clients)
    start = time.monotonic()
    while waiting and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            if fd == master:
                try:
                    off += os.write(master, src[off:off + CHUNK])
                except BlockingIOError:
                    continue
                if off >= total:
                    poller.unregister(master)
                continue
            c = by_fd[fd]
            try:
                k = c.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                k = 0
            if not k:
                c.closed = True
            elif c.in_payload:
                c.payload += k
                c.crc = zlib.crc32(view[:k], c.crc)
            else:
                c.feed(bytes(view[:k]))
            if c.closed or c.payload >= targets[fd]:
                poller.unregister(fd)
                waiting -= 1
    return time.monotonic() - start


def scale_fanout1000(settings, workdir, report):
    n, size = settings.big_fanout_clients, settings.big_fanout_size
    payload = make_payload(size)
    want = zlib.crc32(payload)
    with sertcp_with_peers(workdir, n, ["--send-to", "all", "--banner", BANNER.decode()]) as (pty, server, peers):
        deadline = time.monotonic() + settings.scale_bound
        peers.extend(Peer((HOST, server.port)) for _ in range(n))
        connect_s = connect_many(peers, deadline, window=settings.connect_window, server=server)
        clients = [Client(p.sock) for p in peers]
        prime(pty, clients, deadline)
        cpu0 = server.cpu()
        secs = broadcast_to_many(pty, clients, payload, deadline)
        cpu = server.cpu() - cpu0
        out = server.footprint()
        out.update({
            "clients": n, "bytes": size, "connect_s": connect_s, "seconds": secs,
            "complete": sum(1 for c in clients if c.payload == size and c.crc == want),
            "closed_by_sertcp": sum(1 for c in clients if c.closed),
            "short": sum(1 for c in clients if not c.closed and c.payload < size),
            "crc_mismatch": sum(1 for c in clients if c.payload == size and c.crc != want),
            "device_mbps": size / secs / MB,
            "aggregate_mbps": sum(c.payload for c in clients) / secs / MB,
            "cpu_s": cpu,
            "slow_client_log_lines": server.log_count("slow client"),
        })
        return out


def scale_ports200(settings, workdir, report):
    nports, per, nlisten = settings.scale_ports, settings.port_clients, settings.shared_listeners
    ptys, peers, server = [], [], None
    try:
        for _ in range(nports):
            ptys.append(Pty())
        lports = []
        while len(lports) < nlisten:
            port = free_port()
            if port not in lports:
                lports.append(port)
        path = os.path.join(workdir, "ports%d.ini" % nports)
        lines = ["[global]", "log_level = info", ""]
        for i, pty in enumerate(ptys):
            lines += ["[p%03d]" % i, "device = %s" % pty.path, "baudrate = 115200",
                      "listen = %s:%d" % (HOST, lports[i % nlisten]), "identity = c%03d" % i,
                      "banner = p%03d\\n" % i, "max_clients = %d" % per, ""]
        with open(path, "w") as f:
            f.write("\n".join(lines))
        ensure_bytecode()
        check = subprocess.run(sertcp_argv() + ["--check", "-c", path], env=sertcp_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=60)
        if check.returncode:
            raise BenchError("sertcp --check refused the generated %s:\n%s"
                             % (path, check.stdout.decode(errors="replace")[-2000:]))
        server = Server("sertcp", None, None, 1, workdir, extra=["-c", path]).start()
        deadline = time.monotonic() + settings.scale_bound
        for _ in range(per):
            for i in range(nports):
                peers.append(Peer((HOST, lports[i % nlisten]), b"c%03d\n" % i, b"p%03d\n" % i))
        connect_s = connect_many(peers, deadline, window=settings.connect_window, server=server)
        connected = server.footprint()
        # each device sends its own marker; every client must get its port's
        for i, pty in enumerate(ptys):
            os.write(pty.master, b"<M%03d>" % i)
        gather(peers, [len(p.expect) + 6 for p in peers], deadline, "its port's marker", server)
        routed = sum(1 for k, p in enumerate(peers) if bytes(p.got) == p.expect + b"<M%03d>" % (k % nports))
        out = server.footprint()
        out.update({"ports": nports, "listeners": nlisten, "clients": len(peers), "connect_s": connect_s,
                    "routed": routed, "connected_rss_kib": connected["rss_kib"],
                    "bench_fds": proc_fds(os.getpid())})
        return out
    finally:
        close_peers(peers)
        if server is not None:
            server.stop()
        for pty in ptys:
            pty.close()


def _drain_quiet(sock, quiet, bound):
    """Read and discard until nothing arrived for `quiet` seconds."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    end = time.monotonic() + bound
    while time.monotonic() < end and poller.poll(int(quiet * 1000)):
        try:
            if not sock.recv(65536):
                raise BenchError("sertcp closed the client")
        except BlockingIOError:
            pass


def _error_summary(errors, configured):
    errs = sorted(errors)
    absolute = sorted(abs(e) for e in errors)
    return {"configured_ms": configured, "samples": len(errs),
            "median_error_ms": statistics.median(errs) if errs else None,
            "p95_abs_error_ms": percentile(absolute, 0.95),
            "min_error_ms": errs[0] if errs else None, "max_error_ms": errs[-1] if errs else None,
            "errors_ms": [round(e, 3) for e in errors]}


def _pack_idle(pty, client, settings, deadline):
    """Bursts of 4 writes 3 ms apart, then silence: the packet should leave
    pack_idle_ms after the last write."""
    clock = time.perf_counter
    poller = select.poll()
    poller.register(client.fd, select.POLLIN)
    errors, wrong = [], 0
    for i in range(settings.pack_samples):
        chunks = [bytes((0x41 + (i + k) % 26,)) * 2 for k in range(4)]
        expect = b"".join(chunks)
        for k, chunk in enumerate(chunks):
            if k:
                time.sleep(0.003)
            os.write(pty.master, chunk)
        last = clock()
        got, first = b"", None
        while len(got) < len(expect):
            if time.monotonic() > deadline or not poller.poll(1000):
                raise BenchError("pack_idle_ms: no packet within 1 s")
            data = client.sock.recv(4096)
            if not data:
                raise BenchError("sertcp closed the client")
            if first is None:
                first = clock()
            got += data
        errors.append((first - last) * 1000 - settings.pack_idle_ms)
        wrong += got != expect
        time.sleep(0.03 + 0.003 * (i % 7))   # silence between bursts, phases varied
    out = _error_summary(errors, settings.pack_idle_ms)
    out["wrong_packets"] = wrong
    return out


def _pack_max(pty, client, settings, deadline):
    """A byte every pack_trickle_ms (never idle long enough): each packet
    should leave pack_max_ms after its first byte was written.  Packets
    during which the bench itself paused pack_idle_ms or more between two
    bytes are left out (the idle timer then rightly fired first)."""
    clock = time.perf_counter
    poller = select.poll()
    poller.register(client.fd, select.POLLIN)
    period = settings.pack_trickle_ms / 1000.0
    writes, sent, received = [], bytearray(), bytearray()
    packets = []            # (index of the packet's first byte, arrival time)
    last_rx = None
    want = settings.pack_samples + 1   # the first packet is left out
    next_write = clock()
    while len(packets) < want + 1:     # the last one may still be growing
        if time.monotonic() > deadline:
            raise BenchError("pack_max_ms: %d of %d packets within the time bound" % (len(packets), want))
        now = clock()
        if now >= next_write:
            byte = bytes((0x61 + len(writes) % 26,))
            os.write(pty.master, byte)
            writes.append(clock())
            sent += byte
            next_write = max(next_write + period, now)
            continue
        if poller.poll(int(math.ceil((next_write - now) * 1000))):
            t = clock()
            data = client.sock.recv(4096)
            if not data:
                raise BenchError("sertcp closed the client")
            if last_rx is None or t - last_rx > period:   # a new packet, not a continuation
                packets.append((len(received), t))
            received += data
            last_rx = t
    _drain_quiet(client.sock, 0.1, 2.0)
    idle_s = settings.pack_idle_ms / 1000.0
    errors, disturbed = [], 0
    for (start, t), (end, _) in zip(packets[1:want], packets[2:want + 1]):
        span = writes[start:end]
        if any(b - a >= idle_s for a, b in zip(span, span[1:])):
            disturbed += 1
            continue
        errors.append((t - writes[start]) * 1000 - settings.pack_max_ms)
    out = _error_summary(errors, settings.pack_max_ms)
    out.update(disturbed=disturbed, data_ok=bytes(received) == bytes(sent[:len(received)]),
               bytes_per_packet=len(received) / float(len(packets)))
    return out


def scale_packtimer(settings, workdir, report):
    pty = Pty()
    server = client = None
    try:
        server = Server("sertcp", pty.path, free_port(), 1, workdir,
                        extra=["--pack-idle-ms", str(settings.pack_idle_ms),
                               "--pack-max-ms", str(settings.pack_max_ms)]).start()
        deadline = time.monotonic() + settings.scale_bound
        client = connect(server, deadline)
        prime(pty, [client], deadline)
        _drain_quiet(client.sock, 0.2, 5.0)
        return {"idle": _pack_idle(pty, client, settings, deadline),
                "max": _pack_max(pty, client, settings, deadline)}
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        pty.close()


class _Churn:
    """One soak connection: connect, banner, a few bytes, hold, close."""
    __slots__ = ("sock", "fd", "stage", "t0")


def _fds_settle(server, target, bound):
    """Descriptors of the server once they are down to `target` (or after
    `bound` seconds)."""
    end = time.monotonic() + bound
    while True:
        fds = proc_fds(server.pid)
        if fds <= target or time.monotonic() > end:
            return fds
        time.sleep(0.02)


def scale_soak(settings, workdir, report):
    """The issue's soak: churn on a port with the default settings."""
    return _soak(settings, workdir, settings.soak, [], b"", False)


def scale_soaktimers(settings, workdir, report):
    """The soak through the paths that arm timers per connection: an id
    to send first (identity_timeout), timeout = 3600 (an idle timer per
    client), and one client that stays connected all along."""
    return _soak(settings, workdir, settings.soak_timers,
                 ["--identity", "soak", "--timeout", "3600"], b"soak\n", True)


def _soak(settings, workdir, dur, extra, greeting, keep):
    rate, hold = settings.soak_rate, settings.soak_hold
    total = int(dur * rate)
    pty = Pty()
    server, live, stay = None, {}, []
    try:
        server = Server("sertcp", pty.path, free_port(), 64, workdir,
                        extra=["--banner", BANNER.decode()] + extra).start()
        addr = (HOST, server.port)
        probe = [Peer(addr, greeting)]
        connect_many(probe, time.monotonic() + settings.ready_timeout, server=server)
        with_probe = proc_fds(server.pid)
        if keep:
            stay = probe
        else:
            close_peers(probe)
        fds_base = _fds_settle(server, with_probe - (0 if keep else 1), 2.0)
        poller = select.poll()
        master = pty.master
        poller.register(master, select.POLLIN)
        closing = deque()
        started = done = failed = 0
        samples = []
        t0 = time.monotonic()
        end = t0 + dur
        next_conn, next_bcast, next_sample = t0, t0, t0

        def sample(now):
            snap = server.footprint()
            snap.update(t=round(now - t0, 3), connections=done, open=len(live))
            samples.append(snap)

        def drop(c):
            poller.unregister(c.fd)
            del live[c.fd]
            try:
                c.sock.close()
            except OSError:
                pass

        while True:
            now = time.monotonic()
            if now >= next_sample and now < end:
                sample(now)
                next_sample += settings.soak_sample
            while started < total and now >= next_conn:
                c = _Churn()
                c.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                c.sock.setblocking(False)
                err = c.sock.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    c.sock.close()
                    failed += 1
                else:
                    c.fd, c.stage, c.t0 = c.sock.fileno(), 0, now
                    live[c.fd] = c
                    poller.register(c.fd, select.POLLOUT)
                started += 1
                next_conn += 1.0 / rate
            while closing and closing[0][0] <= now:
                c = closing.popleft()[1]
                if c.fd in live and live[c.fd] is c:
                    drop(c)
                    done += 1
            if now >= next_bcast and now < end:
                try:
                    os.write(master, b"soak broadcast\r\n")
                except BlockingIOError:
                    pass
                next_bcast += 0.1
            if started >= total and not live:
                break
            if now > end + 10:
                failed += len(live)
                for c in list(live.values()):
                    drop(c)
                break
            due = [next_sample, next_bcast] if now < end else []
            if started < total:
                due.append(next_conn)
            if closing:
                due.append(closing[0][0])
            wait = max(0, int(math.ceil((min(due) - now) * 1000))) if due else 100
            for fd, _ in poller.poll(min(wait, 100)):
                if fd == master:
                    try:
                        os.read(master, 65536)
                    except BlockingIOError:
                        pass
                    continue
                c = live.get(fd)
                if c is None:
                    continue
                if c.stage == 0:
                    if c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        drop(c)
                        failed += 1
                        continue
                    c.stage = 1
                    if greeting:
                        c.sock.send(greeting)
                    poller.modify(fd, select.POLLIN)
                    continue
                try:
                    data = c.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:                       # closed by sertcp: not expected
                    drop(c)
                    failed += 1
                    continue
                if c.stage == 1:                   # the banner: admitted
                    try:
                        c.sock.send(b"soak %d\r\n" % started)
                    except OSError:
                        drop(c)
                        failed += 1
                        continue
                    c.stage = 2
                    closing.append((time.monotonic() + hold, c))
        took = time.monotonic() - t0
        sample(time.monotonic())        # the end of the churn
        fds_end = _fds_settle(server, fds_base, 3.0)
        end_snap = server.footprint()
    finally:
        for c in live.values():
            c.sock.close()
        close_peers(stay)
        if server is not None:
            server.stop()
        pty.close()
    warm_at = max(settings.soak_sample, 0.1 * dur)
    during = [s for s in samples if s["t"] >= warm_at - 0.5] or samples[-1:]
    warm, last = during[0], during[-1]
    slope = None
    if len(during) >= 2:
        ts = [s["t"] / 60.0 for s in during]
        ys = [s["rss_kib"] for s in during]
        mt, my = statistics.mean(ts), statistics.mean(ys)
        var = sum((t - mt) ** 2 for t in ts)
        slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else None
    growth = last["rss_kib"] - warm["rss_kib"]
    return {"seconds": dur, "took_s": took, "rate": rate, "hold_s": hold, "connections": done,
            "sertcp_flags": extra, "client_staying": keep,
            "failed": failed, "achieved_rate": started / took if took else None,
            "samples": samples, "warm_t": warm["t"], "rss_warm_kib": warm["rss_kib"],
            "rss_last_kib": last["rss_kib"], "rss_growth_kib": growth, "slope_kib_per_min": slope,
            "rss_end_kib": end_snap["rss_kib"], "hwm_kib": end_snap["hwm_kib"],
            "fds_base": fds_base, "fds_end": fds_end, "fds_max": max(s["fds"] for s in samples),
            "flat": growth <= 1024 and fds_end <= fds_base and failed == 0}


# ---------------------------------------------------------------- ports side by side
#
# One server process with many ports, each a pty of its own on a TCP port
# of its own with one client: how one port's traffic affects another's
# (isolation), and what a fleet of slow ports costs (load32).

def distinct_ports(n):
    ports = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@contextlib.contextmanager
def many_ports(kind, n, workdir, settings):
    """`kind` (sertcp or ser2net) serving n fresh ptys, each on a TCP port
    of its own with one client that has received a byte from its device and
    whose device has received a byte from it.  Yields (ptys, server,
    clients); everything is closed afterwards."""
    ptys, server, clients = [], None, []
    try:
        for _ in range(n):
            ptys.append(Pty())
        lports = distinct_ports(n)
        if kind == "sertcp":
            path = os.path.join(workdir, "ports%d-%d.ini" % (n, _SERIAL[0]))
            lines = ["[global]", "log_level = info", ""]
            for i, (pty, lport) in enumerate(zip(ptys, lports)):
                lines += ["[p%03d]" % i, "device = %s" % pty.path, "baudrate = 115200",
                          "listen = %s:%d" % (HOST, lport), ""]
            with open(path, "w") as f:
                f.write("\n".join(lines))
            server = Server("sertcp", None, None, 1, workdir, extra=["-c", path]).start()
        else:
            path = os.path.join(workdir, "ports%d-%d.yaml" % (n, _SERIAL[0]))
            write_ser2net_config(path, [(lport, pty.path, 1) for pty, lport in zip(ptys, lports)])
            server = Server(kind, None, None, 1, workdir, config=path).start()
        deadline = time.monotonic() + settings.ready_timeout
        for lport in lports:
            clients.append(connect(server, deadline, port=lport))
        for pty, client in zip(ptys, clients):
            prime(pty, [client], deadline)
            client.sock.send(PRIME)
            read_master_exact(pty, 1, deadline)
        yield ptys, server, clients
    finally:
        for c in clients:
            c.close()
        if server is not None:
            server.stop()
        for pty in ptys:
            pty.close()


def _stream(master, sock, control, report, bound):
    """The child of Streamer: write into `master` as fast as it takes bytes
    and read `sock`, until `control` says stop (or closes); then read on
    until nothing arrived for 50 ms (the port drained), and write the
    figures to `report` as JSON (after b"r" once 256 KiB had arrived)."""
    end = time.monotonic() + bound
    payload = make_payload(CHUNK)
    poller = select.poll()
    poller.register(master, select.POLLOUT)
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(control, select.POLLIN)
    written = received = 0
    ready_at = stop_at = None
    received_at_stop = 0
    error = None
    while time.monotonic() < end:
        events = poller.poll(50 if stop_at else 100)
        if not events and stop_at:
            break
        for fd, _ in events:
            try:
                if fd == control:
                    stop_at, received_at_stop = time.monotonic(), received
                    poller.unregister(control)
                    poller.unregister(master)
                elif fd == master:
                    written += os.write(master, payload)
                else:
                    data = sock.recv(CHUNK)
                    if not data:
                        error = "sertcp closed port A's client"
                        end = 0
                        break
                    received += len(data)
                    if ready_at is None and received >= CHUNK:
                        ready_at = time.monotonic()
                        os.write(report, b"r")
            except (BlockingIOError, InterruptedError):
                pass
    if stop_at is None:
        error = error or "never told to stop"
        stop_at, received_at_stop = time.monotonic(), received
    streamed = received_at_stop - (CHUNK if ready_at else 0)
    mbps = streamed / (stop_at - ready_at) / MB if ready_at and stop_at > ready_at else None
    os.write(report, json.dumps({"written": written, "received": received, "mbps": mbps,
                                 "error": error}).encode())


class Streamer:
    """Port A streaming device -> client at full speed, in a child process
    (forked): a thread in the bench would hold the interpreter lock while
    port B's round trips are timed, and the bench's own delay would be
    measured, not sertcp's.  `with Streamer(...) as s:` returns once A's
    client has received 256 KiB; on leaving, A stops, drains, and s.result
    holds the figures (bytes written and received, MB/s while streaming)."""

    def __init__(self, pty, client, bound):
        self.pty, self.client, self.bound = pty, client, bound
        self.result = None

    def __enter__(self):
        control_r, self.control = os.pipe()
        self.report, report_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:       # the child: stream, report, and never return
            code = 1
            try:
                os.close(self.control)
                os.close(self.report)
                _stream(self.pty.master, self.client.sock, control_r, report_w, self.bound)
                code = 0
            finally:
                os._exit(code)
        os.close(control_r)
        os.close(report_w)
        try:
            if not select.select([self.report], [], [], 10.0)[0] or os.read(self.report, 1) != b"r":
                raise BenchError("port A never streamed%s" % self._collect())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _collect(self):
        """Stop the child (closing its control pipe), read its report, reap it."""
        if self.control is not None:
            os.close(self.control)
            self.control = None
        text = b""
        end = time.monotonic() + 10.0
        while time.monotonic() < end and select.select([self.report], [], [], 0.5)[0]:
            chunk = os.read(self.report, 65536)
            if not chunk:
                break
            text += chunk
        os.close(self.report)
        try:
            os.waitpid(self.pid, 0) if text else self._kill()
        except ChildProcessError:
            pass
        try:
            self.result = json.loads(text.decode().lstrip("r")) if text.strip(b"r") else None
        except ValueError:
            self.result = None
        if self.result and self.result.get("error"):
            return ": %s" % self.result["error"]
        return "" if self.result else ": no report from the streaming child"

    def _kill(self):
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)

    def __exit__(self, *exc):
        if self.control is not None:
            problem = self._collect()
            if problem and exc[0] is None:
                raise BenchError("port A" + problem)
        return False


def own_isolation(settings, workdir, report):
    """Port B's 1-byte round trips alone and while port A streams at full
    speed, in one sertcp process; blocks of each taken in turn."""
    with many_ports("sertcp", 2, workdir, settings) as (ptys, server, clients):
        (a_pty, b_pty), (a, b) = ptys, clients
        deadline = time.monotonic() + settings.isolation_bound
        dev_poll, net_poll = select.poll(), select.poll()
        dev_poll.register(b_pty.master, select.POLLIN)
        net_poll.register(b.fd, select.POLLIN)
        i = [0]

        def trips(count):
            out = []
            for _ in range(count):
                if time.monotonic() > deadline:
                    raise BenchError("port B: %d round trips within the time bound" % i[0])
                out.append(round_trip(b.sock, b_pty.master, dev_poll, net_poll, i[0], 2000))
                i[0] += 1
            return out

        trips(settings.echo_warmup)
        alone, loaded, streams = [], [], []
        for _ in range(settings.isolation_blocks):
            alone += trips(settings.isolation_count)
            with Streamer(a_pty, a, max(1.0, deadline - time.monotonic())) as streamer:
                loaded += trips(settings.isolation_count)
            streams.append(streamer.result)
        server.check_alive()
        alone.sort()
        loaded.sort()
        out = {"count": len(alone), "blocks": settings.isolation_blocks,
               "alone_p50_us": statistics.median(alone), "alone_p99_us": percentile(alone, 0.99),
               "loaded_p50_us": statistics.median(loaded), "loaded_p99_us": percentile(loaded, 0.99),
               "a_mbps": statistics.median(s["mbps"] for s in streams if s["mbps"]) if any(
                   s["mbps"] for s in streams) else None,
               "a_bytes": sum(s["received"] for s in streams), "streams": streams}
        out["p99_ratio"] = out["loaded_p99_us"] / out["alone_p99_us"]
        out["p50_ratio"] = out["loaded_p50_us"] / out["alone_p50_us"]
        return out


def _paced(fds, rate, start, seconds, tick, out):
    """Thread body of load32: every `tick`, write into each of `fds` what
    is due at `rate` bytes/s since `start`, for `seconds`; read everything
    that arrives on them all along, then until 0.2 s were quiet (at most
    2 s more).  Fills out["sent"], out["got"] (bytes per fd)."""
    try:
        n = len(fds)
        sent, got = [0] * n, [0] * n
        index = {fd: i for i, fd in enumerate(fds)}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        chunk = make_payload(int(rate * tick * 4) + 256)
        end, last_rx = start + seconds, time.monotonic()
        next_tick = start
        while True:
            now = time.monotonic()
            if now >= end + 2.0 or (now >= end and now - last_rx >= 0.2):
                break
            if now < end and now >= next_tick:
                due = int(rate * (now - start))
                for i, fd in enumerate(fds):
                    k = min(due - sent[i], len(chunk))
                    if k > 0:
                        try:
                            sent[i] += os.write(fd, chunk[:k])
                        except BlockingIOError:
                            pass
                next_tick = max(next_tick + tick, now)
            wait = (next_tick if now < end else now + 0.05) - time.monotonic()
            for fd, _ in poller.poll(max(0, int(math.ceil(wait * 1000)))):
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    raise BenchError("a connection or device closed during the load")
                got[index[fd]] += len(data)
                last_rx = time.monotonic()
        out["sent"], out["got"] = sent, got
    except BaseException as e:     # handed to the main thread
        out["error"] = "%s: %s" % (type(e).__name__, e)


def _load_round(kind, settings, workdir):
    """One server, load_ports ports, each moving baudrate/10 bytes/s both
    ways for load_seconds: one thread paces every pty master, one every
    client.  The server's CPU seconds over the load, and how much of what
    was offered arrived."""
    rate = settings.load_baudrate / 10.0
    with many_ports(kind, settings.load_ports, workdir, settings) as (ptys, server, clients):
        dev, net = {}, {}
        start = time.monotonic() + 0.05
        threads = [threading.Thread(target=_paced, args=([p.master for p in ptys], rate, start,
                                                         settings.load_seconds, settings.load_tick, dev)),
                   threading.Thread(target=_paced, args=([c.fd for c in clients], rate, start,
                                                         settings.load_seconds, settings.load_tick, net))]
        cpu0 = server.cpu()
        for t in threads:
            t.daemon = True
            t.start()
        for t in threads:
            t.join(settings.load_seconds + 10.0)
        cpu = server.cpu() - cpu0
        server.check_alive()
        for side in (dev, net):
            if "error" in side:
                raise BenchError(side["error"])
            if "sent" not in side:
                raise BenchError("the load did not finish within its time bound")
        offered = rate * settings.load_seconds
        to_net = [g / float(s) if s else 0.0 for g, s in zip(net["got"], dev["sent"])]
        to_dev = [g / float(s) if s else 0.0 for g, s in zip(dev["got"], net["sent"])]
        return {"cpu_s": cpu, "sent_fraction": min(dev["sent"] + net["sent"]) / offered,
                "delivered_min": min(to_net + to_dev),
                "bytes": sum(dev["sent"]) + sum(net["sent"])}


def own_load32(settings, workdir, report):
    """sertcp and ser2net (if installed) on the same load, rounds in turn."""
    kinds = ["sertcp"] + (["ser2net"] if available("ser2net") else [])
    rounds = {kind: [] for kind in kinds}
    for _ in range(settings.load_rounds):
        for kind in kinds:
            rounds[kind].append(_load_round(kind, settings, workdir))
    out = {"ports": settings.load_ports, "bytes_per_s_each_way": settings.load_baudrate / 10.0,
           "seconds": settings.load_seconds, "tick_s": settings.load_tick}
    for kind, rs in rounds.items():
        out[kind] = {"cpu_s": statistics.median(r["cpu_s"] for r in rs),
                     "delivered_min": min(r["delivered_min"] for r in rs),
                     "sent_fraction": min(r["sent_fraction"] for r in rs), "rounds": rs}
    if "ser2net" in out and out["ser2net"]["cpu_s"]:
        out["ratio"] = out["sertcp"]["cpu_s"] / out["ser2net"]["cpu_s"]
    return out


# ---------------------------------------------------------------- the registry
#
# Every measurement once, in the order they run: its name (for --only), one
# line on what it measures, how it runs, and each of its figures beside its
# target.  A measurement runs either `each`: a Measurement class started for
# every server in `servers`, their rounds interleaved, results in
# report["results"][server][name]; or `own`: a function (settings, workdir,
# report) -> dict that starts what it needs (sertcp, and ser2net where it
# compares), result in report["own"][name].  A Target's figure(report) gives
# (value, shown) -- None when there is nothing to show -- and check(value,
# report) whether the target is met (None: cannot be judged, e.g. the peer
# is not installed); a Target without a check is a figure for reference.

class Target:
    def __init__(self, label, figure, target="-", check=None):
        self.label = label
        self.figure = figure
        self.target = target
        self.check = check


class Bench:
    def __init__(self, name, about, targets, each=None, own=None, servers=SERVERS, group="servers"):
        self.name = name
        self.about = about
        self.targets = targets
        self.each = each
        self.own = own
        self.servers = servers
        self.group = group       # "servers", "ports" or "scale" (the --only alias)


def own(report, name):
    return (report.get("own") or {}).get(name)


def beside_peers(key, fmt):
    """sertcp's figure `key` (see metric()), with its ratio to each peer."""
    def figure(report):
        value = metric(report, "sertcp", key)
        if value is None:
            return None
        shown = fmt % (value / 1024.0 if key.startswith("rss") else value)
        ratios = report["ratios"].get(key, {})
        peers = ["%.2fx %s" % (ratios[p], p) for p in ("socat", "ser2net") if p in ratios]
        return value, shown + (" (%s)" % ", ".join(peers) if peers else "")
    return figure


def ratio_to(key, peer, op, factor):
    """check: sertcp's `key` over the peer's, against factor (None without the peer)."""
    def check(_value, report):
        r = report["ratios"].get(key, {}).get(peer)
        if r is None:
            return None
        return r >= factor if op == ">=" else r <= factor
    return check


def own_figure(name, compute):
    """figure from report["own"][name]: compute(result) -> (value, shown)."""
    def figure(report):
        r = own(report, name)
        return compute(r) if r else None
    return figure


def _stalled_fraction(report):
    st = _get(report, "sertcp", "stalled")
    if not st or st.get("fraction") is None:
        return None
    return st["fraction"], "%.2f (median %.1f MB/s; client alone %.1f MB/s; stalled one %s)" % (
        st["fraction"], st["median_mbps"], st.get("reference_median_mbps") or 0,
        "cut off" if st["stalled_client_cut"] else "still connected")


def _startup_above(report):
    st = _get(report, "sertcp", "startup")
    if not st or not st.get("python_pass_ms"):
        return None
    above = st["ms"] - st["python_pass_ms"]
    return above, "%+.0f ms (%.0f vs %.0f)" % (above, st["ms"], st["python_pass_ms"])


def _startup_script(report):
    st = _get(report, "sertcp", "startup")
    if not st or not st.get("script_ms") or not st.get("python_pass_ms"):
        return None
    return st["script_ms"], "%+.0f ms (%.0f)" % (st["script_ms"] - st["python_pass_ms"], st["script_ms"])


def _isolation(r):
    return r["loaded_p99_us"], "p50 / p99 %.0f / %.0f us; alone %.0f / %.0f us (p99 %.2fx); A at %s MB/s" % (
        r["loaded_p50_us"], r["loaded_p99_us"], r["alone_p50_us"], r["alone_p99_us"], r["p99_ratio"],
        "%.1f" % r["a_mbps"] if r["a_mbps"] else "-")


def _load32(r):
    mine = r["sertcp"]
    shown = "sertcp %.2f s" % mine["cpu_s"]
    if "ser2net" in r:
        shown += ", ser2net %.2f s" % r["ser2net"]["cpu_s"]
        if r.get("ratio") is not None:
            shown += " (%.2fx)" % r["ratio"]
    delivered = min(r[k]["delivered_min"] for k in ("sertcp", "ser2net") if k in r)
    return mine["cpu_s"], shown + "; least delivered %.1f%%" % (delivered * 100)


def _load32_check(_value, report):
    r = own(report, "load32")
    if "ser2net" not in r:
        return None
    return r["sertcp"]["cpu_s"] <= r["ser2net"]["cpu_s"]


def _memory_above(m):
    if m["above_python_kib"] is None:
        return None
    one, bare = m["levels"][0], m["bare_python_hwm_kib"]
    return m["above_python_kib"], "%+.2f MiB (%.1f vs %.1f)" % (
        m["above_python_kib"] / 1024.0, one["hwm_kib"] / 1024.0, bare / 1024.0)


def _memory_script(m):
    if m["script_above_python_kib"] is None:
        return None
    return m["script_above_python_kib"], "%+.2f MiB (%.1f)" % (
        m["script_above_python_kib"] / 1024.0, m["script_one_client"]["hwm_kib"] / 1024.0)


def _memory_per_client(m):
    levels = m["levels"]
    span = "%d-%d" % (levels[0]["clients"], levels[-1]["clients"])
    kib = m["per_client_kib"].get(span)
    if kib is None:
        return None
    others = ", ".join("%s: %.1f" % (k, v) for k, v in m["per_client_kib"].items() if k != span)
    return kib, "%.1f KiB (%s clients%s)" % (kib, span.replace("-", " -> "), "; " + others if others else "")


def _memory_levels(m):
    return m["levels"][-1]["rss_kib"], "%s clients: %s; %s fds" % (
        " / ".join(str(s["clients"]) for s in m["levels"]),
        " / ".join("%.1f MiB" % (s["rss_kib"] / 1024.0) for s in m["levels"]),
        " / ".join(str(s["fds"]) for s in m["levels"]))


def _accept(label):
    def compute(a):
        v = a["variants"].get(label)
        if v is None:
            return None
        if v["max_seconds"] is not None:
            return v["max_seconds"], "%.2f s (max %.2f of %d), %d clients" % (
                v["seconds"], v["max_seconds"], len(v["runs"]), a["clients"])
        worst = min(v["runs"], key=lambda r: r["answered"])
        return worst["answered"], "%d/%d answered in %.0f s; %d hang%s" % (
            worst["answered"], a["clients"], a["bound_s"], worst["silent"],
            " (syncookies)" if worst["kernel"].get("TCPReqQFullDoCookies") else "")
    return compute


def _accept_check(_value, report):
    v = own(report, "accept")["variants"]["default"]
    return v["max_seconds"] is not None and v["max_seconds"] < 2.0


def _fanout1000(f):
    return f["complete"], "%d/%d complete, %.1f s, %.0f MB/s aggregate; cut off / short / CRC bad %d / %d / %d" % (
        f["complete"], f["clients"], f["seconds"], f["aggregate_mbps"],
        f["closed_by_sertcp"], f["short"], f["crc_mismatch"])


def _ports200(p):
    return p["routed"], "%d/%d routed over %d ports, %d listeners, in %.2f s; %.1f MiB, %d fds" % (
        p["routed"], p["clients"], p["ports"], p["listeners"], p["connect_s"], p["rss_kib"] / 1024.0, p["fds"])


def _packtimer(key):
    def compute(t):
        r = t[key]
        if r["p95_abs_error_ms"] is None:
            return None
        return r["p95_abs_error_ms"], "error median %+.2f ms, p95 |%.2f| ms (n=%d)" % (
            r["median_error_ms"], r["p95_abs_error_ms"], r["samples"])
    return compute


def _soak_figure(s):
    return s["rss_growth_kib"], "RSS %+d KiB from %.0f s on (%s KiB/min); fds %d->%d; %d conns, %d failed" % (
        s["rss_growth_kib"], s["warm_t"],
        "%+.1f" % s["slope_kib_per_min"] if s["slope_kib_per_min"] is not None else "-",
        s["fds_base"], s["fds_end"], s["connections"], s["failed"])


def _rfc2217(direction, every):
    def compute(result):
        for r in result["results"].values():
            if r["direction"] == direction and r["every"] == every:
                if r["ratio"] is None:
                    return None
                return r["ratio"], "%.2fx (%.1f vs %.1f MB/s raw)" % (
                    r["ratio"], r["rfc2217"]["mbps"], r["raw"]["mbps"])
        return None
    return compute


def _rfc2217_targets():
    out = []
    for every in (64, 4, 2):
        for direction, arrow in (("dev2net", "device->net"), ("net2dev", "net->device")):
            plain = every == 64
            out.append(Target("rfc2217/raw %s, 1 byte in %d 0xFF" % (arrow, every), own_figure("rfc2217", _rfc2217(direction, every)),
                              ">= 0.80x raw" if plain else "-",
                              (lambda v, _r: v >= 0.8) if plain else None))
    return out


def _own_rfc2217(settings, workdir, report):
    return rfc2217_throughput(settings)


def _modbus_crc(body):
    """CRC-16/MODBUS, the bench's own (the device it plays checks sertcp's)."""
    crc = 0xFFFF
    for byte in body:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes((crc & 0xFF, crc >> 8))


def _modbus_status(port):
    """The modbus part of sertcp's /status (a raw HTTP/1.0 GET)."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["ports"][0]["modbus"]


def own_modbus(settings, workdir, report):
    """protocol = modbus: four Modbus TCP masters, each with one request
    out at a time (read 2 holding registers of its own), against an RTU
    device the bench plays on the pty master, answering at once.  Requests
    per second; each master's round trip (which includes its wait behind
    the other three); the bus round trip sertcp reports; and sertcp's own
    cost per request: the time per request less that bus round trip."""
    pty = Pty()
    server, masters = None, []
    status = free_port()
    try:
        server = Server("sertcp", pty.path, free_port(), 4, workdir,
                        extra=["--protocol", "modbus", "--status", "%s:%d" % (HOST, status)]).start()
        deadline = time.monotonic() + settings.ready_timeout
        masters = [connect(server, deadline) for _ in range(4)]
        poller = select.poll()
        poller.register(pty.master, select.POLLIN)
        by_fd = {}
        for i, m in enumerate(masters):
            poller.register(m.fd, select.POLLIN)
            by_fd[m.fd] = i
        tids, sent_at, got = [0] * 4, [0.0] * 4, [b""] * 4
        rtts, crossed, device_in = [], 0, b""

        def ask(i):
            tids[i] = (tids[i] + 1) & 0xFFFF
            pdu = bytes((3, 0, 10 * i, 0, 2))
            sent_at[i] = time.perf_counter()
            masters[i].sock.send(tids[i].to_bytes(2, "big") + b"\0\0\0\x06\x01" + pdu)
        for i in range(4):
            ask(i)
        end = time.monotonic() + settings.modbus_seconds
        while time.monotonic() < end:
            server.check_alive()
            for fd, _ in poller.poll(1000):
                if fd == pty.master:
                    device_in += os.read(pty.master, 4096)
                    while len(device_in) >= 8:      # every request is 8 bytes: read 2 registers
                        request, device_in = device_in[:8], device_in[8:]
                        if _modbus_crc(request[:6]) != request[6:]:
                            raise BenchError("bad CRC from sertcp: %s" % request.hex())
                        start = request[3]
                        body = bytes((1, 3, 4, 0, start, 0, start + 1))
                        os.write(pty.master, body + _modbus_crc(body))
                    continue
                i = by_fd[fd]
                got[i] += masters[i].sock.recv(4096)
                if len(got[i]) < 13:
                    continue
                reply, got[i] = got[i][:13], got[i][13:]
                rtts.append((time.perf_counter() - sent_at[i]) * 1e6)
                want = tids[i].to_bytes(2, "big") + b"\0\0\0\x07\x01\x03\x04" + bytes((0, 10 * i, 0, 10 * i + 1))
                crossed += reply != want
                ask(i)
        took = settings.modbus_seconds
        bus = _modbus_status(status)
        rtts.sort()
        p50 = statistics.median(rtts) if rtts else None
        bus_p50_us = bus["round_trip_p50_ms"] * 1000 if bus["round_trip_p50_ms"] is not None else None
        return {"requests": len(rtts), "per_second": len(rtts) / took, "crossed": crossed,
                "p50_us": p50, "p99_us": percentile(rtts, 0.99),
                "bus_p50_us": bus_p50_us, "bus_p99_us": (bus["round_trip_p99_ms"] or 0) * 1000,
                # the bus is never idle while four masters wait, so a request's
                # share of the time beyond its bus round trip is sertcp's cost
                "cycle_us": 1e6 * took / len(rtts) if rtts else None,
                "added_us": (1e6 * took / len(rtts) - bus_p50_us) if rtts and bus_p50_us is not None else None,
                "timeouts": bus["timeouts"], "crc_errors": bus["crc_errors"]}
    finally:
        for m in masters:
            m.close()
        if server is not None:
            server.stop()
        pty.close()


def _modbus_rate(m):
    return m["per_second"], "%.0f requests/s (%d in %.1f s); master p50 %.0f us, p99 %.0f us" % (
        m["per_second"], m["requests"], m["requests"] / m["per_second"] if m["per_second"] else 0,
        m["p50_us"] or 0, m["p99_us"] or 0)


def _modbus_added(m):
    if m["added_us"] is None:
        return None
    return m["added_us"], "%.0f us (%.0f us per request - bus round trip p50 %.0f us; p99 %.0f us)" % (
        m["added_us"], m["cycle_us"], m["bus_p50_us"], m["bus_p99_us"])


def _modbus_crossed(m):
    return m["crossed"], "%d of %d (timeouts %d, CRC errors %d)" % (
        m["crossed"], m["requests"], m["timeouts"], m["crc_errors"])


def _udp_round(kind, size, workdir, bound, packet=None):
    """One pty and one server (sertcp with udp_send_to, or socat's
    UDP-SENDTO) sending what is written into the master to one UDP
    receiver: payload MB/s and datagrams/s as received, and bytes lost
    (UDP has no back-pressure: what the receiver's buffer cannot hold is
    gone).  Timed from the first payload byte written to the last one
    received.  `packet`: datagrams of at most this size (sertcp's
    pack_size, socat's -b), else each read is one datagram."""
    pty = Pty()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server = None
    try:
        try:    # root may pass net.core.rmem_max: fewer datagrams lost to the bench itself
            rx.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 16 * MiB)
        except OSError:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * MiB)
        rx.bind((HOST, 0))
        rx.setblocking(False)
        target = "%s:%d" % (HOST, rx.getsockname()[1])
        server = Server(kind, pty.path, None if kind == "sertcp" else 0, 1, workdir,
                        extra=["--udp-send-to", target] + (["--pack-size", str(packet)] if packet else []))
        if kind == "socat":     # each read (at most -b bytes) is one datagram
            server.argv = ["socat", "-u", "-b", str(packet or 65507), "FILE:%s,rawer,echo=0,b115200" % pty.path,
                           "UDP4-SENDTO:%s" % target]
        server.start()
        poller = select.poll()
        poller.register(rx.fileno(), select.POLLIN)
        deadline = time.monotonic() + 10.0
        primed, last = False, 0.0
        while not primed:       # the server is up and sending once a priming byte arrives
            server.check_alive()
            if time.monotonic() > deadline:
                raise BenchError("%s: no datagram within 10 s; log:\n%s" % (kind, server.log_tail()))
            if time.monotonic() - last >= 0.005:
                try:
                    os.write(pty.master, PRIME)
                except BlockingIOError:
                    pass
                last = time.monotonic()
            for _ in poller.poll(5):
                primed = True
        while poller.poll(100):     # stragglers of the priming
            try:
                while rx.recv(65536):
                    pass
            except BlockingIOError:
                pass
        payload = make_payload(size)
        view = memoryview(payload)
        poller.register(pty.master, select.POLLOUT)
        got = datagrams = 0
        start = time.monotonic()
        end = start + bound
        last_at = start
        while got < size:
            now = time.monotonic()
            if now > end or (not view and now - last_at > 1.0):
                break           # the rest was lost
            for fd, _ in poller.poll(100):
                if fd == pty.master:
                    try:
                        view = view[os.write(pty.master, view[:CHUNK]):]
                    except BlockingIOError:
                        pass
                    if not view:
                        poller.unregister(pty.master)
                    continue
                try:
                    while True:
                        data = rx.recv(65536)
                        datagrams += 1
                        got += len(data) - data.count(PRIME)
                        last_at = time.monotonic()
                except BlockingIOError:
                    pass
        seconds = last_at - start
        server.check_alive()
        return {"mbps": got / seconds / MB if seconds > 0 else None,
                "datagrams_per_s": datagrams / seconds if seconds > 0 else None,
                "datagrams": datagrams, "bytes": got, "lost": size - got,
                "average_datagram": got / datagrams if datagrams else None, "seconds": seconds}
    finally:
        if server is not None:
            server.stop()
        rx.close()
        pty.close()


UDP_SMALL_DATAGRAM = 1024


def own_udp(settings, workdir, report):
    """device -> UDP through sertcp (udp_send_to) and socat (UDP-SENDTO) on
    the same kind of pty, rounds taken in turn, the best round of each:
    each read one datagram ("bulk"), and datagrams of 1 KiB ("small",
    the cost per datagram)."""
    size = min(settings.size, 16 * MiB)
    kinds = [k for k in ("sertcp", "socat") if available(k)]
    out = {"size": size, "rounds": settings.rounds}
    for variant, packet, metric in (("bulk", None, "mbps"), ("small", UDP_SMALL_DATAGRAM, "datagrams_per_s")):
        best = {}
        for _ in range(settings.rounds):
            for kind in kinds:
                r = _udp_round(kind, size // (4 if packet else 1), workdir, max(2.0, settings.budget), packet)
                if r[metric] is not None and r[metric] > best.get(kind, {}).get(metric, 0):
                    best[kind] = r
        out[variant] = best
        if "sertcp" in best and "socat" in best:
            out[variant + "_ratio"] = best["sertcp"][metric] / best["socat"][metric]
    return out


def _udp_figure(variant, key, fmt):
    def compute(u):
        mine = u[variant].get("sertcp")
        if not mine or mine[key] is None:
            return None
        peer = u[variant].get("socat")
        shown = fmt % mine[key] + " (lost %d of %d bytes)" % (mine["lost"], mine["lost"] + mine["bytes"])
        if peer and peer[key]:
            shown += "; socat " + fmt % peer[key] + " (lost %d), %.2fx" % (peer["lost"], mine[key] / peer[key])
        return mine[key], shown
    return compute


def _udp_check(variant, factor):
    def check(_value, report):
        ratio = own(report, "udp").get(variant + "_ratio")
        return None if ratio is None else ratio >= factor
    return check


MONITOR_VARIANTS = ("none", "raw", "hex")


def _monitor_round(variant, size, workdir, settings):
    """One sertcp port, device -> one TCP client, with no monitor or with
    one monitor (monitor_format raw or hex) that reads everything it gets
    in a thread of its own: payload MB/s to the client, and the CPU
    seconds per MB sertcp spent."""
    pty = Pty()
    server = watcher = None
    try:
        monitor_port = free_port()
        extra = [] if variant == "none" else ["--monitor", "%s:%d" % (HOST, monitor_port), "--monitor-format", variant]
        server = Server("sertcp", pty.path, free_port(), 1, workdir, extra=extra).start()
        deadline = time.monotonic() + settings.ready_timeout
        client = connect(server, deadline)
        readers = [client]
        if variant != "none":
            watcher = connect(server, deadline, port=monitor_port)
            readers.append(watcher)
        prime(pty, readers, deadline)        # the monitor too is served once it got the priming bytes
        seen = [0]

        def drain():                         # the monitor reads on, as fast as it can
            watcher.sock.setblocking(True)
            try:
                while True:
                    data = watcher.sock.recv(CHUNK)
                    if not data:
                        return
                    seen[0] += len(data)
            except OSError:
                return
        thread = threading.Thread(target=drain, daemon=True) if watcher else None
        if thread:
            thread.start()
        payload = make_payload(size)
        cpu0 = server.cpu()
        secs, complete = device_to_clients(pty, payload, [client], time.monotonic() + max(2.0, settings.budget))
        cpu = server.cpu() - cpu0
        server.check_alive()
        return {"mbps": client.payload / secs / MB, "complete": complete, "seconds": secs,
                "cpu_s_per_mb": cpu / (client.payload / MB) if client.payload else None,
                "monitor_bytes": seen[0]}
    finally:
        if server is not None:
            server.stop()
        if watcher is not None:
            watcher.close()
        pty.close()


def own_monitor(settings, workdir, report):
    """device -> network MB/s with no monitor, a raw monitor and a hex
    monitor (both reading), rounds of each in turn, the best of each."""
    size = min(settings.size, 16 * MiB)
    best = {}
    for _ in range(settings.rounds):
        for variant in MONITOR_VARIANTS:
            r = _monitor_round(variant, size, workdir, settings)
            if r["mbps"] > best.get(variant, {}).get("mbps", 0):
                best[variant] = r
    out = {"size": size, "rounds": settings.rounds}
    out.update(best)
    for variant in ("raw", "hex"):
        out[variant + "_ratio"] = best[variant]["mbps"] / best["none"]["mbps"]
    return out


def _monitor_figure(variant):
    def compute(m):
        r = m[variant]
        shown = "%.1f MB/s, %.4f CPU s/MB" % (r["mbps"], r["cpu_s_per_mb"] or 0)
        if variant != "none":
            shown += " (%.2fx without; the monitor read %.1f MB)" % (m[variant + "_ratio"], r["monitor_bytes"] / MB)
        return r["mbps"], shown
    return compute


REGISTRY = [
    Bench("dev2net", "bytes written into the pty master, received by one TCP client (best round)", [
        Target("device->network MB/s", beside_peers("dev2net.mbps", "%.1f MB/s"),
               ">= 0.9x socat", ratio_to("dev2net.mbps", "socat", ">=", 0.9)),
        Target("  CPU s/MB device->network", beside_peers("dev2net.cpu_s_per_mb", "%.4f"))], each=Dev2Net),
    Bench("net2dev", "bytes sent by one TCP client, read from the pty master (best round)", [
        Target("network->device MB/s", beside_peers("net2dev.mbps", "%.1f MB/s"),
               ">= 0.9x socat", ratio_to("net2dev.mbps", "socat", ">=", 0.9)),
        Target("  CPU s/MB network->device", beside_peers("net2dev.cpu_s_per_mb", "%.4f"))], each=Net2Dev),
    Bench("echo", "1-byte round trip client -> device -> client", [
        Target("round trip median", beside_peers("echo.median_us", "%.0f us"),
               "<= 1.2x socat", ratio_to("echo.median_us", "socat", "<=", 1.2)),
        Target("  round trip p99", beside_peers("echo.p99_us", "%.0f us"))], each=Echo),
    Bench("fanout", "clients of one port each receive all that is written into the master (aggregate)", [
        Target("8-client fan-out MB/s", beside_peers("fanout.mbps", "%.1f MB/s"),
               ">= 3.0x ser2net", ratio_to("fanout.mbps", "ser2net", ">=", 3.0))],
          each=FanOut, servers=("sertcp", "ser2net")),
    Bench("stalled", "2 clients, one never reads: the other one's rate against it alone (medians)", [
        Target("stalled / unstalled", _stalled_fraction, ">= 0.80", lambda v, _r: v >= 0.8)],
          each=Stalled, servers=("sertcp", "ser2net")),
    Bench("startup", "spawn to the listening port accepting a connection", [
        Target("start-up above python3 -c pass", _startup_above, "<= +60 ms", lambda v, _r: v <= 60),
        Target("  same, as `python3 sertcp.py`", _startup_script),
        Target("  start-up ms", beside_peers("startup.ms", "%.0f ms"))], each=Startup),
    Bench("isolation", "port B's 1-byte round trip while port A of the same sertcp streams at full speed", [
        Target("port B round trip while A streams", own_figure("isolation", _isolation), "p99 <= 2x alone",
               lambda v, r: v <= 2 * own(r, "isolation")["alone_p99_us"])], own=own_isolation, group="ports"),
    Bench("load32", "32 ports, each moving 115,200 baud's worth both ways: CPU seconds per round", [
        Target("32 ports x 11,520 B/s each way", own_figure("load32", _load32), "<= ser2net's", _load32_check)],
          own=own_load32, group="ports"),
    Bench("rfc2217", "protocol = rfc2217 beside raw, 0xFF-rich payloads (payload MB/s)", _rfc2217_targets(),
          own=_own_rfc2217),
    Bench("udp", "device -> UDP (udp_send_to): payload received by one UDP socket, beside socat UDP-SENDTO", [
        Target("device->UDP MB/s", own_figure("udp", _udp_figure("bulk", "mbps", "%.1f MB/s")), ">= 0.9x socat",
               _udp_check("bulk", 0.9)),
        Target("  same, datagrams/s", own_figure("udp", _udp_figure("bulk", "datagrams_per_s", "%.0f/s"))),
        Target("device->UDP 1 KiB datagrams/s", own_figure("udp", _udp_figure("small", "datagrams_per_s", "%.0f/s")),
               ">= 0.9x socat", _udp_check("small", 0.9))],
          own=own_udp),
    Bench("monitor", "device -> network through one port while a monitor reads all it gets (monitor = ...)", [
        Target("device->network, no monitor", own_figure("monitor", _monitor_figure("none"))),
        Target("  with a raw monitor reading", own_figure("monitor", _monitor_figure("raw")), ">= 0.6x without",
               lambda _v, r: own(r, "monitor")["raw_ratio"] >= 0.6),
        Target("  with a hex monitor reading", own_figure("monitor", _monitor_figure("hex")))],
          own=own_monitor),
    Bench("memory", "peak RSS of one port and client above a bare python3; RSS per idle client", [
        Target("peak RSS, 1 port + 1 client, above python3", own_figure("memory", _memory_above),
               "<= +3 MiB", lambda v, _r: v <= 3 * 1024),
        Target("  same, as `python3 sertcp.py`", own_figure("memory", _memory_script)),
        Target("RSS per idle client", own_figure("memory", _memory_per_client), "<= 16 KiB", lambda v, _r: v <= 16),
        Target("  RSS / descriptors by clients", own_figure("memory", _memory_levels))],
          own=scale_memory, group="scale"),
    Bench("accept", "connections at once until sertcp has answered each one (its banner)", [
        # the default is set for fleets; 16 for reference: a burst of 1,000
        # overflows that queue and the kernel answers with SYN cookies
        Target("accept at once, backlog 1024 (default)", own_figure("accept", _accept("default")), "< 2 s",
               _accept_check),
        Target("accept at once, backlog 16", own_figure("accept", _accept("16")))],
          own=scale_accept, group="scale"),
    Bench("fanout1000", "1,000 clients, send_to = all, each receives all of a 1 MiB burst", [
        Target("clients that got every byte", own_figure("fanout1000", _fanout1000), "all",
               lambda v, r: v == own(r, "fanout1000")["clients"])], own=scale_fanout1000, group="scale"),
    Bench("ports200", "2,000 clients on 200 ports behind 4 shared listeners (identity routing)", [
        Target("clients routed to their port", own_figure("ports200", _ports200), "all",
               lambda v, r: v == own(r, "ports200")["clients"])], own=scale_ports200, group="scale"),
    Bench("packtimer", "pack_idle_ms = 20, pack_max_ms = 50: packet departure against the byte written", [
        Target("pack_idle_ms (after the last byte)", own_figure("packtimer", _packtimer("idle")),
               "p95 |error| <= 2 ms", lambda v, _r: v <= 2.0),
        Target("pack_max_ms (after the first byte)", own_figure("packtimer", _packtimer("max")),
               "p95 |error| <= 2 ms", lambda v, _r: v <= 2.0)], own=scale_packtimer, group="scale"),
    Bench("soak", "connect/disconnect churn at 100 connections per second: RSS and descriptors", [
        Target("soak, default settings", own_figure("soak", _soak_figure), "flat (RSS within 1 MiB, fds back)",
               lambda _v, r: own(r, "soak")["flat"])], own=scale_soak, group="scale"),
    Bench("soaktimers", "the same churn with an id sent first, timeout = 3600 and one client staying", [
        Target("soak, id + timeout + 1 staying", own_figure("soaktimers", _soak_figure), "flat (RSS within 1 MiB, fds back)",
               lambda _v, r: own(r, "soaktimers")["flat"])], own=scale_soaktimers, group="scale"),
    Bench("modbus", "protocol = modbus: 4 Modbus TCP masters, one request out each, an RTU device answering at once", [
        Target("4 masters through one RTU bus", own_figure("modbus", _modbus_rate), ">= 1000 requests/s",
               lambda v, _r: v >= 1000),
        Target("  sertcp's cost per request (p50)", own_figure("modbus", _modbus_added)),
        Target("replies to the wrong master or id", own_figure("modbus", _modbus_crossed), "0",
               lambda v, _r: v == 0)], own=own_modbus),
]
BENCH = {b.name: b for b in REGISTRY}
MEASUREMENTS = tuple(BENCH)
SCALE = tuple(b.name for b in REGISTRY if b.group == "scale")
PORTS = tuple(b.name for b in REGISTRY if b.group == "ports")


def format_registry():
    """The registry as text: each measurement, what it measures, and its targets."""
    lines = []
    for b in REGISTRY:
        how = ", ".join(b.servers) if b.each else "starts its own servers"
        lines.append("%-11s %s (%s)" % (b.name, b.about, how))
        for t in b.targets:
            lines.append("%-11s   %-46s %s" % ("", t.label.strip(), t.target))
    return "\n".join(lines)


def run_own(bench, settings, workdir, report, progress):
    t0 = time.monotonic()
    progress("sertcp   %-10s ..." % bench.name)
    try:
        result = bench.own(settings, workdir, report)
    except (BenchError, OSError) as e:
        report["errors"]["sertcp.%s" % bench.name] = str(e)
        progress("sertcp   %-10s ERROR %s" % (bench.name, e))
        return
    finally:
        _kill_leftovers()
    report["own"][bench.name] = result
    progress("sertcp   %-10s done (%.1fs)" % (bench.name, time.monotonic() - t0))


def target_rows(report, judged=True):
    """Every figure of every measurement that ran, beside its target: a list
    of {name, label, value, measured, target, ok}; ok None: a figure for
    reference, or not judged (the peer missing, or judged False: a smoke run)."""
    rows = []
    for name in report["meta"]["measurements"]:
        bench = BENCH[name]
        failed = any(k.split(".", 1)[1] == name for k in report["errors"])
        for t in bench.targets:
            try:
                figure = t.figure(report)
            except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError):
                figure = None
            value, shown, ok = None, "error" if failed else "-", None
            if figure is not None:
                value, shown = figure
                if judged and t.check is not None:
                    ok = t.check(value, report)
            rows.append({"name": name, "label": t.label, "value": value, "measured": shown,
                         "target": t.target, "ok": ok, "judged": judged and t.check is not None})
    return rows


def format_targets(report):
    rows = report["rows"]
    if not rows:
        return ""
    smoke = report["meta"].get("smoke")
    lines = ["", "every measurement beside its target%s" % (
        " (smoke run: tiny sizes, targets not judged)" if smoke else ""),
        "%-11s %-44s %-64s %s" % ("name", "figure", "measured", "target: verdict")]
    lines.append("-" * 140)
    for r in rows:
        verdict = ""
        if r["target"] != "-":
            verdict = {True: "ok", False: "MISS", None: "not judged" if not smoke else ""}[r["ok"]]
        lines.append("%-11s %-44s %-64s %s%s" % (r["name"], r["label"], r["measured"], r["target"],
                                                ": " + verdict if verdict else ""))
    for name, err in sorted(report["errors"].items()):
        lines.append("ERROR %s: %s" % (name, err.splitlines()[0] if err else ""))
    compiled = report["meta"].get("compiled_during_run")
    if compiled:
        lines.append("note: sertcp compiled %d module(s) not in the warmed cache during the run (start-up and"
                     " RSS of the first start that imported them include compiling): %s"
                     % (len(compiled), ", ".join(compiled[:8])))
    return "\n".join(lines)


# ---------------------------------------------------------------- run & report

def run(settings, servers=SERVERS, measurements=MEASUREMENTS, progress=None, smoke=False):
    """Run the chosen measurements (names in REGISTRY, run in its order);
    returns the result dictionary.  smoke: targets are not judged."""
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
            "measurements": [b.name for b in REGISTRY if b.name in measurements],
            "servers": [],
            "smoke": smoke,
        },
        "bare_python": None,
        "results": {},       # server -> measurement -> result, for those run on each server
        "own": {},           # measurement -> result, for those that start their own servers
        "rows": [],          # every figure beside its target (target_rows)
        "skipped": {},
        "errors": {},
    }
    report["meta"]["nofile"] = raise_nofile()
    report["meta"]["interpreter"] = describe_python()
    kinds = []
    for kind in servers:
        if available(kind):
            kinds.append(kind)
            report["meta"]["versions"][kind] = tool_version(kind)
            report["results"][kind] = {}
            report["meta"]["servers"].append(kind)
        else:
            report["skipped"][kind] = "not found"
            progress("%s: not found, skipped" % kind)
    workdir = tempfile.mkdtemp(prefix="sertcp-bench-")
    try:
        report["bare_python"] = bare_python(settings)
        if "sertcp" in kinds:
            ensure_bytecode()   # compiled once; every start reads the .pyc
            cached = pycache_files()
        for name in report["meta"]["measurements"]:
            bench = BENCH[name]
            if bench.own is not None:
                if "sertcp" in kinds:
                    run_own(bench, settings, workdir, report, progress)
                continue
            these = [k for k in kinds if k in bench.servers]
            for kind, result in measure(name, these, settings, workdir,
                                        report["errors"], progress).items():
                report["results"][kind][name] = result
        for res in report["results"].values():
            stalled, plain = res.get("stalled"), res.get("dev2net")
            # median against median (both run in rounds), or noise in one
            # best round reads as a loss or a gain
            reference = plain and (plain.get("median_mbps") or plain.get("mbps"))
            if stalled and reference and "fraction" not in stalled:
                stalled["fraction"] = (stalled.get("median_mbps") or stalled["mbps"]) / reference
        if "sertcp" in kinds:
            # a module compiled by a measured sertcp (the first to import it)
            report["meta"]["compiled_during_run"] = sorted(pycache_files() - cached)
    finally:
        _kill_leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
    report["ratios"] = compare(report)
    report["rows"] = target_rows(report, judged=not smoke)
    report["meta"]["seconds"] = time.monotonic() - started
    return report


def _brief(name, r):
    if name == "echo":
        return "median %.0f us, p99 %.0f us" % (r["median_us"] or 0, r["p99_us"] or 0)
    if name == "startup":
        return "%.0f ms%s" % (r["ms"], "; as a script %.0f ms" % r["script_ms"] if r.get("script_ms") else "")
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
# The servers side by side (the measurements run on each server); each
# figure's target is in REGISTRY.  (key, label, unit format, better: "high"/"low")
ROWS = [
    ("dev2net.mbps", "device->network MB/s", "%.1f", "high"),
    ("net2dev.mbps", "network->device MB/s", "%.1f", "high"),
    ("echo.median_us", "round trip median us", "%.0f", "low"),
    ("echo.p99_us", "round trip p99 us", "%.0f", "low"),
    ("fanout.mbps", "8-client fan-out MB/s", "%.1f", "high"),
    ("stalled.mbps", "stalled: other client MB/s", "%.1f", "high"),
    ("stalled.fraction", "stalled / unstalled (medians)", "%.2f", "high"),
    ("cpu_s_per_mb", "CPU s/MB (dev2net+net2dev)", "%.4f", "low"),
    ("dev2net.cpu_s_per_mb", "CPU s/MB device->network", "%.4f", "low"),
    ("net2dev.cpu_s_per_mb", "CPU s/MB network->device", "%.4f", "low"),
    ("fanout.cpu_s_per_mb", "CPU s/MB fan-out (per dev MB)", "%.4f", "low"),
    ("rss_kib", "peak RSS (VmHWM) MiB", "%.1f", "low"),
    ("rss_end_kib", "RSS at end (VmRSS) MiB", "%.1f", "low"),
    ("rss_above_python_kib", "RSS above bare python MiB", "%.1f", "low"),
    ("startup.ms", "start-up ms", "%.0f", "low"),
]


def compare(report):
    """sertcp's figure over each peer's: {key: {peer: ratio}}."""
    ratios = {}
    for key, _label, _fmt, _better in ROWS:
        mine = metric(report, "sertcp", key)
        for peer in (() if key == "stalled.fraction" else ("socat", "ser2net")):
            theirs = metric(report, peer, key)
            if mine is not None and theirs:
                ratios.setdefault(key, {})[peer] = mine / theirs
    startup = _get(report, "sertcp", "startup", "ms")
    bare = (_get(report, "sertcp", "startup", "python_pass_ms")
            or (report.get("bare_python") or {}).get("pass_ms"))
    if startup and bare:
        ratios["startup.ms"] = dict(ratios.get("startup.ms", {}), python_pass=startup / bare)
    return ratios


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
    header += "%14s%16s" % ("sertcp/socat", "sertcp/ser2net")
    lines.append(header)
    lines.append("-" * len(header))
    table_at = len(lines)
    for key, label, fmt, better in ROWS:
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
        lines.append(line)
    has_rows = len(lines) > table_at
    if not has_rows:    # only footprint and scale measurements ran
        del lines[table_at - 3:]
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
    if has_rows:
        lines.append("MB/s: best round (servers' rounds interleaved; medians in --json);"
                     " MB = 10^6 bytes; CPU in %d Hz clock ticks" % os.sysconf("SC_CLK_TCK"))
        lines.append("ratios are sertcp/peer: throughput higher is better; time, CPU, RSS lower is better")
        lines.append("sertcp runs imported, as --print-service starts it, from cached bytecode")
    if report.get("meta", {}).get("interpreter"):
        lines.append(report["meta"]["interpreter"])
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark sertcp against socat and ser2net on ptys over loopback.")
    p.add_argument("--json", metavar="OUT.json", help="write every number to this file")
    p.add_argument("--python", metavar="PATH",
                   help="the python3 that runs sertcp and the bare reference (default: a fresh venv with only pyserial)")
    p.add_argument("--quick", action="store_true", help="small sizes, fewer rounds, a 20 s soak (about 2 minutes)")
    p.add_argument("--smoke", action="store_true",
                   help="every measurement with tiny sizes (well under 30 s): that each runs and reports;"
                        " targets are not judged")
    p.add_argument("--list", action="store_true", help="print the measurements and their targets, run nothing")
    p.add_argument("--only", metavar="NAME", action="append", default=[],
                   help="measurement (%s; scale = all of %s; ports = all of %s) and/or server (%s);"
                        " comma separated, repeatable"
                        % (", ".join(MEASUREMENTS), ", ".join(SCALE), ", ".join(PORTS), ", ".join(SERVERS)))
    p.add_argument("--size-mib", type=float, help="MiB per transfer round (and stalled-client run)")
    p.add_argument("--rounds", type=int, help="throughput rounds per server (best reported)")
    p.add_argument("--echo-count", type=int, help="timed 1-byte round trips")
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="seconds of connect/disconnect churn in each soak (soak 600 and soaktimers 120; --quick 20)")
    args = p.parse_args(argv)
    servers, measurements = [], []
    for item in ",".join(args.only).split(","):
        item = item.strip()
        if not item:
            continue
        if item in SERVERS:
            servers.append(item)
        elif item == "scale":
            measurements += SCALE
        elif item == "ports":
            measurements += PORTS
        elif item in MEASUREMENTS:
            measurements.append(item)
        else:
            p.error("--only: unknown name %r" % item)
    args.servers = [k for k in SERVERS if k in servers] or list(SERVERS)
    args.measurements = [m for m in MEASUREMENTS if m in measurements] or list(MEASUREMENTS)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        print(format_registry())
        return 0
    settings = Settings.smoke() if args.smoke else Settings.quick() if args.quick else Settings.full()
    if args.size_mib:
        settings.size = settings.stall_size = max(1, int(args.size_mib * MiB))
    if args.rounds:
        settings.rounds = args.rounds
    if args.echo_count:
        settings.echo_count = args.echo_count
    if args.soak is not None:
        settings.soak = settings.soak_timers = max(1.0, args.soak)

    def progress(msg):
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    if argv is None:
        signal.signal(signal.SIGTERM, on_term)
    try:
        choose_python(args.python)
        progress(describe_python())
        report = run(settings, args.servers, args.measurements, progress, smoke=args.smoke)
    finally:
        if argv is None:
            signal.signal(signal.SIGTERM, previous)
    print(format_table(report))
    if own(report, "rfc2217"):
        print(format_rfc2217(own(report, "rfc2217")))
    print(format_targets(report))
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
    try:
        server = Server("sertcp", pty.path, free_port(), 1, workdir, extra=["--protocol", protocol]).start()
    except BaseException:
        pty.close()
        raise
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


def rfc2217_throughput(settings, progress=None):
    """dev2net and net2dev through sertcp in raw and in rfc2217 mode, with
    0xFF-rich payloads (half and a quarter of the bytes 0xFF) and a plain
    one (1 in 64); payload MB/s
    (best of the rounds), and rfc2217 as a fraction of raw."""
    progress = progress or (lambda _msg: None)
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
                out["results"][key] = {"raw": raw, "rfc2217": telnet, "ratio": ratio,
                                       "direction": direction, "every": every}
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
