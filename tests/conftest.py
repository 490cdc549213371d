"""Shared fixtures: pseudo-terminals as serial devices, the real sertcp.py as
a process, and loopback TCP clients.  Everything waits for conditions with a
deadline; nothing sleeps a fixed time to let something happen."""
import os
import re
import select
import shutil
import signal
import threading
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERTCP = ROOT / "sertcp.py"


def wait_for(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll predicate() until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


def need_ipv6_loopback():
    """Fail, not skip, where ::1 cannot be bound: every Linux with IPv6 has
    it (CI does), and an IPv6 test that skips hides a regression."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        raise AssertionError("this test needs the IPv6 loopback ::1: %s" % e)


class Peer:
    """A client or connection as a sans-I/O core sees it: only its
    identity matters (the cores' unit tests)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def random_bytes(rnd, n):
    """n bytes from the random.Random rnd, as rnd.randbytes(n) gives them
    on Python 3.9+ (the tests run on 3.8 too)."""
    return rnd.getrandbits(8 * n).to_bytes(n, "little") if n > 0 else b""


def need_programs(*names):
    """Fail, not skip, when a peer program is missing: .ci/run installs
    every one of them, and an interop test that skips hides a regression."""
    missing = [name for name in names if shutil.which(name) is None]
    assert not missing, "not installed: %s (.ci/run installs them with apt-get)" % ", ".join(missing)


def http_get(port, path, timeout=5.0):
    """(status, body text) of GET http://127.0.0.1:port/path."""
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.status, r.read().decode()


def free_port(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_count(s, pattern):
    return len(re.findall(pattern, s.log()))


class Background(threading.Thread):
    """Run fn(*args) in a thread; join() re-raises what it raised."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.start()

    def run(self):
        try:
            self.fn(*self.args)
        except BaseException as e:  # handed to the test thread
            self.error = e

    def join(self, timeout=60.0):
        super().join(timeout)
        assert not self.is_alive(), "background %s still running" % self.fn
        if self.error:
            raise self.error


class Pty:
    """A pseudo-terminal pair standing in for a serial device.

    sertcp opens `path` (the slave side); the test reads and writes `master`.
    The slave is put in raw mode at once so nothing is echoed before sertcp
    configures it, and kept open by the test until close() so that the pair
    survives sertcp reopening it."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def write(self, data, timeout=30.0):
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError("pty write stalled with %d bytes left" % len(view))
                select.select([], [self.master], [], 0.1)

    def read(self, n, timeout=10.0):
        """Read exactly n bytes from the master, or fail after timeout."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("pty read: got %d of %d bytes: %r" % (len(out), n, bytes(out[-64:])))
            r, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if r:
                try:
                    out += os.read(self.master, min(65536, n - len(out)))
                except (BlockingIOError, OSError):
                    select.select([], [], [], 0.01)
        return bytes(out)

    def read_available(self, wait=0.3):
        """Everything that arrives until the line has been quiet for `wait` s."""
        out = bytearray()
        while True:
            r, _, _ = select.select([self.master], [], [], wait)
            if not r:
                return bytes(out)
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def close(self):
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class Client:
    """A loopback TCP client with exact-length reads."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0, source=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))

    def send(self, data):
        self.sock.sendall(data)

    def recv(self, n, timeout=10.0):
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("socket read: got %d of %d bytes: %r" % (len(out), n, bytes(out[-64:])))
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(1 << 20, n - len(out)))
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError("connection closed after %d of %d bytes: %r" % (len(out), n, bytes(out[-64:])))
            out += chunk
        return bytes(out)

    def recv_available(self, wait=0.3):
        """Everything that arrives until the connection is quiet for `wait` s
        (b'' also when the peer closed)."""
        out = bytearray()
        self.sock.settimeout(wait)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return bytes(out)
            except OSError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def closed_by_peer(self, timeout=10.0):
        """True once the peer has closed (EOF or reset) within timeout; data
        still arriving is read and discarded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Sertcp:
    """The real sertcp.py as a child process, stderr captured to a file."""

    def __init__(self, args, tmpdir, config=None, env=None, preexec_fn=None):
        self.tmpdir = Path(tmpdir)
        self.logpath = self.tmpdir / ("sertcp-%d.log" % id(self))
        argv = [sys.executable, str(SERTCP)]
        if config is not None:
            self.config = self.tmpdir / ("sertcp-%d.ini" % id(self))
            self.config.write_text(config)
            argv += ["-c", str(self.config)]
        argv += [str(a) for a in args]
        self.argv = argv
        self.logfile = open(self.logpath, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.logfile, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec_fn)

    def log(self):
        return self.logpath.read_text(errors="replace")

    def wait_log(self, pattern, timeout=10.0, count=1):
        """Wait until the log matches regex `pattern` at least `count` times."""
        rx = re.compile(pattern)

        def seen():
            if self.proc.poll() is not None and len(rx.findall(self.log())) < count:
                raise AssertionError("sertcp exited (%s) before log matched %r:\n%s"
                                     % (self.proc.returncode, pattern, self.log()))
            return len(rx.findall(self.log())) >= count
        wait_for(seen, timeout, message="log line %r" % pattern)

    def wait_listening(self, port, host="127.0.0.1", timeout=10.0):
        self.wait_log(r"listening on .*%d" % port, timeout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        return self.proc.returncode


class EchoServer(socketserver.ThreadingTCPServer):
    """A TCP echo server on loopback; `accepted` and `closed` list the
    connections it took and the ones that ended."""
    daemon_threads = True

    def __init__(self):
        self.accepted, self.closed = [], []
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def hang_up(self):
        """End the latest connection from this side."""
        self.accepted[-1].shutdown(socket.SHUT_RDWR)

    def close(self):
        self.shutdown()
        self.server_close()
        for conn in self.accepted:
            conn.close()


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.accepted.append(self.request)
        try:
            for chunk in iter(lambda: self.request.recv(65536), b""):
                self.request.sendall(chunk)
        except OSError:
            pass
        self.server.closed.append(self.request)


UART_PATH = Path(__file__).resolve().parent / "uart"


class SimulatedUart:
    """testuart://DIR (tests/uart): a UART whose DSR/DCD/CTS this test sets."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir()
        self.url = "testuart://%s" % self.folder
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(UART_PATH)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.set()

    def set(self, *lines):
        tmp = self.folder / "lines.tmp"
        tmp.write_text(" ".join(lines))
        os.replace(tmp, self.folder / "lines")

    def breaks(self):
        """[("on"|"off", monotonic time), ...] as the UART saw them."""
        try:
            text = (self.folder / "breaks").read_text()
        except FileNotFoundError:
            return []
        return [(kind, float(at)) for kind, at in (line.split() for line in text.splitlines())]

    def sent(self):
        try:
            return (self.folder / "tx").read_bytes()
        except FileNotFoundError:
            return b""

    def receive(self, data):
        """Bytes the UART receives from the device, after those before."""
        with open(self.folder / "rx", "ab") as f:
            f.write(data)

    def outputs(self):
        """The output lines that are on now, e.g. {"DTR", "RTS"}."""
        try:
            return set((self.folder / "out").read_text().split())
        except FileNotFoundError:
            return set()


# sitecustomize for a Python whose standard library lacks some modules, as
# OpenWrt's package split leaves python3-light: a meta-path finder refuses
# them (and their submodules), so every import of them fails as it would
# there; the idna codec goes with encodings.idna.
HIDE_MODULES = """
import os, sys
HIDDEN = tuple(n for n in os.environ.get("SERTCP_TEST_HIDE", "").split(",") if n)


class RefuseHidden:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in HIDDEN):
            raise ModuleNotFoundError("No module named %r" % name, name=name)
        return None


for loaded in list(sys.modules):
    if any(loaded == h or loaded.startswith(h + ".") for h in HIDDEN):
        del sys.modules[loaded]
sys.meta_path.insert(0, RefuseHidden)
"""

# What OpenWrt's python3-light lacks that sertcp could want: python3-codecs
# (unicodedata, the idna codec), python3-openssl, python3-logging, python3-urllib
OPENWRT_LIGHT_LACKS = ("unicodedata", "encodings.idna", "ssl", "_ssl", "logging", "urllib")


def env_without(tmp_path, modules=OPENWRT_LIGHT_LACKS):
    """An environment in which python3 cannot import `modules`."""
    directory = Path(tmp_path) / "hide-modules"
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(HIDE_MODULES)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH")) if p)
    env["SERTCP_TEST_HIDE"] = ",".join(modules)
    return env


def run_sertcp(args, timeout=20.0, config=None, tmpdir=None, env=None):
    """Run sertcp.py to completion (for --check, --version, errors)."""
    argv = [sys.executable, str(SERTCP)]
    if config is not None:
        fd, path = tempfile.mkstemp(suffix=".ini", dir=tmpdir)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        argv += ["-c", path]
    argv += [str(a) for a in args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def closing_factory(make):
    """The body of a factory fixture: yields a function that makes objects
    with make(...), and closes every one of them after the test."""
    made = []

    def factory(*args, **kw):
        thing = make(*args, **kw)
        made.append(thing)
        return thing
    yield factory
    for thing in made:
        thing.close()


@pytest.fixture
def pty_factory():
    yield from closing_factory(Pty)


@pytest.fixture
def pty(pty_factory):
    return pty_factory()


@pytest.fixture
def sertcp(tmp_path):
    """sertcp(args..., config=INI) starts the real process; all are stopped
    (SIGTERM) after the test, and a crash or non-zero exit fails it.
    preexec_fn runs in the child before sertcp (resource limits); env
    replaces its environment (env_without)."""
    started = []

    def start(*args, config=None, wait_port=None, host="127.0.0.1", preexec_fn=None, env=None):
        s = Sertcp(args, tmp_path, config=config, preexec_fn=preexec_fn, env=env)
        started.append(s)
        if wait_port is not None:
            s.wait_listening(wait_port, host)
        return s
    yield start
    for s in started:
        code = s.stop()
        assert code == 0, "sertcp exited %s:\n%s" % (code, s.log())


@pytest.fixture
def serve(sertcp):
    """serve(device, *flags, host="127.0.0.1") starts sertcp with one port
    on device (a path, a pyserial URL or a Pty) listening on a free port of
    host; returns (process, tcp port) once it listens and the device is
    open.  Flags come before the device, so a test's flag overrides the
    same flag earlier in its list."""
    def start(device, *flags, host="127.0.0.1"):
        port = free_port(host)
        shown = "[%s]" % host if ":" in host else host
        s = sertcp("--listen", "%s:%d" % (shown, port), *flags, getattr(device, "path", device))
        s.wait_log(r"\[cli\] listening on \S*:%d" % port)
        s.wait_log(r"\[cli\] device \S+ opened")
        return s, port
    return start


@pytest.fixture
def clients():
    """clients(port, host="127.0.0.1", ...) connects a Client."""
    yield from closing_factory(Client)


class NetNamespace:
    """A network namespace of the test's own (ip netns add): only lo, up,
    with the MULTICAST flag and a route for 224.0.0.0/4, so that multicast
    sent in it (mDNS, udp_send_to to a group) reaches the programs in it
    and nothing leaves the machine.  Several processes join it: `argv()`
    prefixes a command with `ip netns exec`, `enter` is a preexec_fn for
    Popen, and `call(fn)` runs fn in a thread of this process that joined
    it (setns(2) moves only the calling thread)."""

    CLONE_NEWNET = 0x40000000

    def __init__(self):
        import ctypes
        self.name = "sertcp-test-%d-%d" % (os.getpid(), id(self) % 100000)
        self.libc = ctypes.CDLL(None, use_errno=True)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "lo", "multicast", "on"],
                        ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(self.argv(*command), check=True)

    def argv(self, *command):
        return ["ip", "netns", "exec", self.name] + [str(c) for c in command]

    def enter(self):
        fd = os.open("/run/netns/" + self.name, os.O_RDONLY)
        try:
            if self.libc.setns(fd, self.CLONE_NEWNET) != 0:
                import ctypes
                raise OSError(ctypes.get_errno(), "setns into %s" % self.name)
        finally:
            os.close(fd)

    def call(self, fn, *args):
        result = {}

        def run():
            try:
                self.enter()
                result["value"] = fn(*args)
            except BaseException as e:  # handed to the caller
                result["error"] = e
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(60)
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns():
    """A fresh network namespace (NetNamespace); needs root and ip(8)."""
    need_programs("ip")
    assert os.geteuid() == 0, "a network namespace of the test's own (ip netns add) needs root (CI runs as root)"
    ns = NetNamespace()
    yield ns
    ns.close()
