"""Smoke test run inside a foreign root filesystem (tests/qemu_smoke.sh runs
it under qemu-user): sertcp.py and sertcp.ini.example beside this file,
the guest's python3 with pyserial.  Exits non-zero at the first failure.

  1. --check of the example file
  2. a virtual port bridged to TCP: 1 MiB each way, byte for byte
  3. RFC 2217 (pyserial's client): a rate change reaches the device and
     /status
"""
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import termios
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERTCP = os.path.join(HERE, "sertcp.py")
MIB = 1 << 20


def step(message):
    sys.stdout.write("%7.1fs  %s\n" % (time.monotonic() - STARTED, message))
    sys.stdout.flush()


def wait_for(predicate, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit("FAILED: timed out waiting for %s" % what)
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port):
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=60)
    except OSError:
        return None


def start(*args):
    log = open(os.path.join("/tmp", "sertcp-smoke-%d.log" % len(PROCESSES)), "wb")
    proc = subprocess.Popen([sys.executable, SERTCP] + list(args), stdout=log, stderr=subprocess.STDOUT)
    PROCESSES.append((proc, log.name))
    return proc


def read_exactly(read, n):
    out = bytearray()
    while len(out) < n:
        chunk = read(min(65536, n - len(out)))
        if not chunk:
            raise SystemExit("FAILED: end of data after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)


def check_example():
    r = subprocess.run([sys.executable, SERTCP, "--check", "-c", os.path.join(HERE, "sertcp.ini.example")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit("FAILED: --check of the example: %s" % r.stdout.decode(errors="replace"))
    step("--check of sertcp.ini.example: ok")


def bridge_one_mib_each_way():
    import serial
    import threading
    port, link = free_port(), "/tmp/sertcp-smoke-ttyV0"
    start("--virtual", link, "--listen", "127.0.0.1:%d" % port)
    conn = wait_for(lambda: os.path.islink(link) and connect(port), "the bridge")
    tty = serial.Serial(link, 115200, timeout=60)
    time.sleep(1.0)   # let sertcp see the port opened (it polls every 0.1 s)
    data = os.urandom(MIB)
    received = {}
    reader = threading.Thread(target=lambda: received.update(tty=read_exactly(tty.read, MIB)))
    reader.start()
    t0 = time.monotonic()
    conn.sendall(data)
    reader.join(600)
    if received.get("tty") != data:
        raise SystemExit("FAILED: network -> device differs")
    step("1 MiB network -> device: ok (%.1fs)" % (time.monotonic() - t0))
    reader = threading.Thread(target=lambda: received.update(net=read_exactly(conn.recv, MIB)))
    reader.start()
    t0 = time.monotonic()
    tty.write(data)
    tty.flush()
    reader.join(600)
    if received.get("net") != data:
        raise SystemExit("FAILED: device -> network differs")
    step("1 MiB device -> network: ok (%.1fs), sha256 %s" % (time.monotonic() - t0, hashlib.sha256(data).hexdigest()[:16]))
    tty.close()
    conn.close()


def rfc2217_rate_change():
    import serial
    import tty
    port, status = free_port(), free_port()
    master, slave = os.openpty()      # the device: a pty whose other side this script holds
    tty.setraw(slave)
    start("--listen", "127.0.0.1:%d" % port, "--protocol", "rfc2217", "--status", "127.0.0.1:%d" % status,
          os.ttyname(slave))
    wait_for(lambda: connect(port), "the RFC 2217 port").close()
    client = serial.serial_for_url("rfc2217://127.0.0.1:%d" % port, baudrate=9600, timeout=10)
    client.baudrate = 57600
    wait_for(lambda: termios.tcgetattr(master)[5] == termios.B57600, "the device at 57600")

    def reported():
        c = connect(status)
        c.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        body = read_all(c).split(b"\r\n\r\n", 1)[1]
        return json.loads(body.decode())["ports"][0]["settings"]["baudrate"] == 57600
    wait_for(reported, "/status showing 57600")
    client.write(b"through rfc2217")
    client.flush()
    got = wait_for(lambda: os.read(master, 100), "data through the RFC 2217 port")
    if got != b"through rfc2217":
        raise SystemExit("FAILED: RFC 2217 data: %r" % got)
    step("RFC 2217: rate changed to 57600 on the device and in /status, data through (machine %s)"
         % os.uname().machine)
    client.close()
    os.close(master)
    os.close(slave)


def read_all(conn):
    out = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return out
        out += chunk


STARTED = time.monotonic()
PROCESSES = []


def main():
    step("Python %s on %s (%s)" % (platform.python_version(), os.uname().machine, platform.platform()))
    try:
        check_example()
        bridge_one_mib_each_way()
        rfc2217_rate_change()
    finally:
        for proc, log in PROCESSES:
            proc.terminate()
            code = proc.wait(60)
            if code != 0:
                sys.stdout.write(open(log).read())
                raise SystemExit("FAILED: sertcp exited %s" % code)
    step("all ok")


if __name__ == "__main__":
    main()
