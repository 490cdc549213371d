"""On the packages a router ships: OpenWrt splits Python's standard library
into python3-light and packages such as python3-codecs (unicodedata, the
idna codec), python3-openssl, python3-logging and python3-urllib.  Here
sertcp runs with a Python that cannot import those (env_without), and each
feature either works or is refused by --check naming the package to
install, never with a traceback."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from certs import TlsServer, certs  # noqa: F401 (fixture)
from conftest import OPENWRT_LIGHT_LACKS, Client, env_without, free_port, http_get, run_sertcp, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sertcp as sertcp_module  # noqa: E402  (the module under test, not the fixture)

CODECS = ("unicodedata", "encodings.idna")


def test_the_fixture_hides_what_openwrt_splits_off(tmp_path):
    probe = """
import sys
for name in sys.argv[1:]:
    try:
        __import__(name)
        print("imported", name)
    except ImportError:
        pass
try:
    "x".encode("idna")
    print("imported the idna codec")
except LookupError:
    pass
import serial, select, json, termios
print("core ok")
"""
    r = subprocess.run([sys.executable, "-c", probe] + list(OPENWRT_LIGHT_LACKS) + ["urllib.parse", "logging.handlers"],
                       capture_output=True, text=True, env=env_without(tmp_path), timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "core ok\n"


class LineServer:
    """A plain TCP server for the client role to dial; keeps what it accepts."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(10)
            self.accepted.append(sock)

    def close(self):
        self.listener.close()
        for sock in self.accepted:
            sock.close()


def test_host_names_listen_status_and_connect_work_without_the_idna_codec(sertcp, pty, tmp_path):
    """localhost in listen, status and connect, on a Python without
    python3-codecs, python3-logging, python3-openssl, python3-urllib."""
    port, status = free_port(), free_port()
    far = LineServer()
    try:
        s = sertcp("--listen", "localhost:%d" % port, "--status", "localhost:%d" % status,
                   "--connect", "localhost:%d" % far.port, "--max-clients", "2", pty.path,
                   env=env_without(tmp_path))
        s.wait_listening(port)
        wait_for(lambda: far.accepted, message="the dial to localhost")
        s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % far.port)
        c = Client(port)
        try:
            s.wait_log("client 127.0.0.1")
            pty.write(b"to both")
            assert c.recv(7) == b"to both"
            assert far.accepted[0].recv(7, socket.MSG_WAITALL) == b"to both"
            c.send(b"from client")
            assert pty.read(11) == b"from client"
        finally:
            c.close()
        code, body = http_get(status, "/status")
        assert code == 200 and json.loads(body)["ports"][0]["name"] == "cli"
        assert "Traceback" not in s.log()
    finally:
        far.close()


@pytest.mark.parametrize("hidden", [(), CODECS], ids=["full", "without_codecs"])
@pytest.mark.parametrize("name", ["a..b", "no-such-host.invalid", "-x"])
def test_a_bad_or_unknown_name_is_a_logged_retried_dial_failure(sertcp, pty, tmp_path, hidden, name):
    s = sertcp("--connect", "%s:7000" % name, "--reconnect-min", "0.1", "--reconnect-max", "0.2",
               "--status", "127.0.0.1:%d" % free_port(), pty.path, env=env_without(tmp_path, hidden))
    s.wait_log(r"\[cli\] dial to %s:7000 failed: cannot resolve" % name.replace(".", r"\."), count=2)
    assert "Traceback" not in s.log() and "internal error" not in s.log()


@pytest.mark.parametrize("flags, hidden, key, package", [
    (["--listen", "7000", "--tls-cert", "C", "--tls-key", "K", "/dev/ttyUSB0"], ("ssl",), "--tls-cert",
     "python3-openssl"),
    (["--connect", "127.0.0.1:7000", "--tls", "yes", "/dev/ttyUSB0"], ("_ssl",), "--tls", "python3-openssl"),
    (["--listen", "7000", "socket://127.0.0.1:7001"], ("urllib",), "DEVICE", "python3-urllib"),
    (["--listen", "7000", "loop://"], ("logging",), "DEVICE", "python3-logging"),
    (["--listen", "7000", "rfc2217://127.0.0.1:7001"], CODECS, "DEVICE", "python3-codecs"),
    (["--connect", "b\u00fccher.example:7000", "/dev/ttyUSB0"], CODECS, "--connect", "python3-codecs"),
    (["--listen", "b\u00fccher.example:7000", "/dev/ttyUSB0"], ("unicodedata",), "--listen", "python3-codecs"),
    (["--listen", "7000", "--status", "b\u00fccher.example:8000", "/dev/ttyUSB0"], CODECS, "--status",
     "python3-codecs"),
], ids=["tls_cert", "tls", "url", "url_logging", "url_codecs", "connect", "listen", "status"])
def test_check_names_the_openwrt_package_a_feature_needs(tmp_path, certs, flags, hidden, key, package):
    flags = [{"C": certs.server[0], "K": certs.server[1]}.get(f, f) for f in flags]
    env = env_without(tmp_path, hidden)
    r = run_sertcp(["--check"] + flags, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert key in r.stderr and "opkg install %s" % package in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # the same configuration with every module there passes
    assert run_sertcp(["--check"] + flags).returncode == 0
    # and starting it is refused the same way, before anything is opened
    started = run_sertcp(flags, env=env)
    assert started.returncode == 2 and "opkg install %s" % package in started.stderr
    assert "Traceback" not in started.stderr


def test_a_reload_that_adds_tls_without_ssl_is_refused_and_the_port_goes_on(sertcp, pty, certs, tmp_path):
    port = free_port()
    ini = tmp_path / "reload.ini"
    plain = "[a]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, port)
    ini.write_text(plain)
    s = sertcp("-c", ini, env=env_without(tmp_path))
    s.wait_listening(port)
    ini.write_text(plain + "tls_cert = %s\ntls_key = %s\n" % certs.server)
    s.signal(signal.SIGHUP)
    s.wait_log(r"reload refused: .*tls_cert: needs the Python module ssl.*opkg install python3-openssl")
    c = Client(port)
    try:
        s.wait_log(r"\[a\] client 127\.0\.0\.1")
        c.send(b"still plain")
        assert pty.read(11) == b"still plain"
    finally:
        c.close()
    assert s.proc.poll() is None and "Traceback" not in s.log()


def test_tls_dial_to_a_host_name_works_without_the_idna_codec(sertcp, pty, certs, tmp_path):
    server = TlsServer(certs.server_context())
    try:
        s = sertcp("--connect", "localhost:%d" % server.port, "--tls", "yes", "--tls-ca", certs.ca, pty.path,
                   env=env_without(tmp_path, CODECS))
        conn = server.wait_connection()
        s.wait_log(r"\[cli\] connected to 127\.0\.0\.1:%d" % server.port)
        pty.write(b"over tls")
        got = b""
        while len(got) < 8:
            got += conn.recv(8 - len(got))
        assert got == b"over tls"
        assert "Traceback" not in s.log()
    finally:
        server.close()


def test_the_log_file_rolls_over_at_log_max_size(sertcp, pty, tmp_path):
    """A router's /tmp is RAM: the log takes at most twice log_max_size."""
    port = free_port()
    log = tmp_path / "sertcp.log"
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--log", log, "--log-max-size", "2k",
               env=env_without(tmp_path))
    wait_for(lambda: log.exists() and "listening on" in log.read_text(), message="the log")
    rolled = tmp_path / "sertcp.log.1"
    for n in range(2, 200):  # each connection writes two lines of about 100 bytes
        if rolled.exists():
            break
        size = log.stat().st_size
        Client(port, source="127.0.0.%d" % n).close()  # a source each: log lines are limited per peer
        wait_for(lambda: rolled.exists() or log.stat().st_size > size + 100, message="two more lines")
    for n in range(200, 210):
        Client(port, source="127.0.0.%d" % n).close()
    s.stop()
    assert rolled.exists()
    assert 0 < log.stat().st_size <= 2048 + 200 and 2048 <= rolled.stat().st_size <= 2048 + 200
    assert "stopped" in log.read_text().splitlines()[-1]


# ---------------------------------------------------------------------
# The termios2 ioctl per architecture, against Debian's kernel headers
# (linux-libc-dev and its cross packages, installed by .ci/run)
# ---------------------------------------------------------------------

def header_value(text, name, default=None):
    found = re.search(r"^#\s*define\s+%s\s+(\d+)U?\b" % name, text, re.M)
    return int(found.group(1)) if found else default


def struct_layout(text, struct, nccs):
    """(size, offset of c_ospeed) of `struct` in a termbits.h, laid out as
    the C compiler would: tcflag_t and speed_t are 4 bytes, cc_t 1."""
    body = re.search(r"struct %s \{(.*?)\};" % struct, text, re.S).group(1)
    offset, ospeed = 0, None
    for ctype, field, count in re.findall(r"(\w+)\s+(\w+)(?:\[([^\]]+)\])?;", body):
        size = {"tcflag_t": 4, "speed_t": 4, "cc_t": 1}[ctype]
        offset = (offset + size - 1) // size * size
        if field == "c_ospeed":
            ospeed = offset
        offset += size * (eval(count.replace("NCCS", str(nccs))) if count else 1)
    return (offset + 3) // 4 * 4, ospeed


def header(include, name):
    """The text of <name> with the asm-generic headers it includes after
    it (the cross packages ship their own asm-generic; the host's is in
    /usr/include)."""
    for base in (include, Path("/usr/include")):
        if (base / name).exists():
            text = (base / name).read_text()
            break
    else:
        raise AssertionError("no %s for %s" % (name, include))
    for included in re.findall(r"#include <(asm-generic/[\w-]+\.h)>", text):
        text += "\n" + header(include, included)
    return text


def tcgets2_from_headers(include):
    """(request, size, c_ospeed offset) as an architecture's headers give
    TCGETS2 (or, on PowerPC, which has no termios2, TCGETS)."""
    ioctls, termbits = header(include, "asm/ioctls.h"), header(include, "asm/termbits.h")
    ioctl = header(include, "asm/ioctl.h")
    found = re.search(r"#define\s+TCGETS2\s+_IOR\('(.)',\s*(\w+),\s*struct (\w+)\)", ioctls) or \
        re.search(r"#define\s+TCGETS\s+_IOR\('(.)',\s*(\w+),\s*struct (\w+)\)", ioctls)
    kind, number, struct = found.group(1), int(found.group(2), 0), found.group(3)
    size, ospeed = struct_layout(termbits, struct, header_value(termbits, "NCCS"))
    # the first definition wins, as in the preprocessor: the architecture's own
    size_bits, read = header_value(ioctl, "_IOC_SIZEBITS"), header_value(ioctl, "_IOC_READ")
    request = (read << (16 + size_bits)) | (size << 16) | (ord(kind) << 8) | number
    return request, size, ospeed


@pytest.mark.parametrize("machine, include", [
    ("mips", "/usr/mipsel-linux-gnu/include"),
    ("sparc64", "/usr/sparc64-linux-gnu/include"),
    ("ppc", "/usr/powerpc-linux-gnu/include"),
    ("armv7l", "/usr/arm-linux-gnueabihf/include"),
    ("x86_64", "/usr/include/x86_64-linux-gnu"),
])
def test_the_termios2_ioctl_matches_the_kernel_headers_of_each_architecture(machine, include):
    include = Path(include)
    assert include.is_dir(), "%s missing (.ci/run installs linux-libc-dev and the -cross header packages)" % include
    assert sertcp_module.tcgets2_for(machine) == tcgets2_from_headers(include)


def test_mips_reads_a_48_byte_termios2_with_0x4030542a():
    assert sertcp_module.tcgets2_for("mips") == (0x4030542A, 48, 44)
    assert sertcp_module.tcgets2_for("mips64") == (0x4030542A, 48, 44)
    assert sertcp_module.tcgets2_for("aarch64") == (0x802C542A, 44, 40)


# ---------------------------------------------------------------------
# user = ...: what root made in a root-owned directory goes at exit
# ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_pidfile_and_virtual_symlink_are_removed_after_dropping_to_nobody(sertcp, tmp_path, how):
    assert os.geteuid() == 0, "dropping privileges needs root (CI runs as root)"
    run = tmp_path / "run"           # like /run: root's, others may only read it
    run.mkdir()
    os.chmod(run, 0o755)
    pidfile, link, port = run / "sertcp.pid", run / "ttyV0", free_port()
    s = sertcp("--virtual", link, "--listen", "127.0.0.1:%d" % port, "--pidfile", pidfile, "--user", "nobody",
               wait_port=port)
    s.wait_log("running as user nobody")
    assert pidfile.read_text().strip() == str(s.proc.pid) and os.path.islink(link)
    if how == "sigkill":
        s.proc.kill()
        s.proc.wait(10)
    else:
        assert s.stop() == 0
    wait_for(lambda: not os.path.lexists(pidfile) and not os.path.lexists(link), message="both removed")
    assert "not removed" not in s.log()
    if how == "sigkill":
        s.proc.returncode = 0   # killed on purpose: the fixture's exit check does not apply


# ---------------------------------------------------------------------
# Bytecode: OpenWrt's python3 never writes __pycache__ (its patch 004)
# ---------------------------------------------------------------------

def test_openwrt_script_compiles_the_bytecode_without_urllib(tmp_path):
    home = tmp_path / "opt"
    home.mkdir()
    shutil.copy(str(Path(sertcp_module.__file__)), str(home / "sertcp.py"))
    env = env_without(tmp_path, ("urllib",))
    env["PYTHONDONTWRITEBYTECODE"] = "1"     # what patch 004 makes the default
    script = subprocess.run([sys.executable, str(home / "sertcp.py"), "--virtual", "/tmp/v", "--listen", "7000",
                             "--print-service", "openwrt"], capture_output=True, text=True, env=env, timeout=30)
    assert script.returncode == 0, script.stderr
    step = [line.strip() for line in script.stdout.splitlines() if "py_compile" in line]
    assert len(step) == 1 and "compileall" not in script.stdout
    cached = list((home / "__pycache__").glob("sertcp.*.pyc")) if (home / "__pycache__").exists() else []
    assert not cached

    def run_step():
        r = subprocess.run(["sh", "-c", step[0]], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return list((home / "__pycache__").glob("sertcp.*.pyc"))
    cached = run_step()
    assert len(cached) == 1
    compiled_at = cached[0].stat().st_mtime_ns
    assert run_step()[0].stat().st_mtime_ns == compiled_at            # not again while it is current
    # the service's command loads it, without writing anything
    r = subprocess.run([sys.executable, "-v", "-c", "import sys, sertcp; sys.exit(sertcp.main())", "--version"],
                       capture_output=True, text=True,
                       env=dict(env, PYTHONPATH=str(home) + os.pathsep + env["PYTHONPATH"]), cwd=str(tmp_path),
                       timeout=30)
    assert r.returncode == 0 and "code object from %r" % str(cached[0]) in r.stderr
    os.utime(str(home / "sertcp.py"), ns=(compiled_at + 10 ** 9, compiled_at + 10 ** 9))   # an update
    assert run_step()[0].stat().st_mtime_ns > compiled_at


def syslog_lines(sertcp, pty, tmp_path, receiver, devlog):
    """Start sertcp with log = syslog (SERTCP_DEVLOG = devlog); the
    datagrams `receiver` got up to a client's disconnection."""
    receiver.settimeout(10)
    port = free_port()
    env = dict(env_without(tmp_path), SERTCP_DEVLOG=str(devlog))
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % port, "--log", "syslog", env=env)
    lines = []
    while not any(b"listening on" in line for line in lines):
        lines.append(receiver.recv(4096))
    assert b"<14>sertcp[%d]: INFO [cli] listening on 127.0.0.1:%d\x00" % (s.proc.pid, port) in lines
    Client(port).close()
    while not any(b"disconnected" in line for line in lines):
        lines.append(receiver.recv(4096))
    return lines


def test_syslog_lines_to_dev_log_without_the_logging_package(sertcp, pty, tmp_path):
    """log = syslog writes RFC 3164 datagrams itself to the syslog
    daemon's socket (here one of the test's own in place of /dev/log)."""
    devlog = tmp_path / "log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(devlog))
    try:
        syslog_lines(sertcp, pty, tmp_path, receiver, devlog)
    finally:
        receiver.close()


def test_syslog_lines_to_udp_514_where_there_is_no_dev_log(sertcp, pty, tmp_path):
    """Without the daemon's socket, UDP port 514 of localhost, as logging's
    SysLogHandler did."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert os.geteuid() == 0, "binding UDP port 514 needs root (CI runs as root)"
    receiver.bind(("127.0.0.1", 514))
    try:
        syslog_lines(sertcp, pty, tmp_path, receiver, tmp_path / "no-such-socket")
    finally:
        receiver.close()
