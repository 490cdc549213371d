"""gpsd, the program GPS receivers are most often shared with, reading a
receiver through sertcp: NMEA written to the device's pty reaches gpsd over a
`tcp://` source, and gpsd's own clients get a position fix from it."""
import json
import socket
import subprocess
import time

import pytest

from conftest import free_port, need_programs, wait_for


def nmea(body):
    checksum = 0
    for c in body.encode():
        checksum ^= c
    return b"$%s*%02X\r\n" % (body.encode(), checksum)


FIX = [
    nmea("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
    nmea("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"),
]


class Gpsd:
    def __init__(self, tmp_path, source):
        need_programs("gpsd")
        self.port = free_port()
        # -N foreground, -n poll without a client, -b never write to the
        # receiver, -F a control socket of our own, -S our own port
        self.proc = subprocess.Popen(
            ["gpsd", "-N", "-n", "-b", "-D", "1", "-F", str(tmp_path / "gpsd.sock"), "-S", str(self.port),
             source], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gpsd.log", "wb"))

    def watch(self):
        sock = wait_for(self._connect, 10, message="gpsd to listen")
        sock.sendall(b'?WATCH={"enable":true,"json":true};\n')
        return sock.makefile("rb")

    def _connect(self):
        try:
            return socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def first_fix(reports, pty, timeout=30):
    """Write the receiver's sentences (as it repeats them every second) until
    gpsd reports a 2D or 3D fix; that report."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no fix from gpsd within %d s" % timeout
        for sentence in FIX:
            pty.write(sentence)
        line = reports.readline()
        report = json.loads(line) if line.startswith(b"{") else {}
        if report.get("class") == "TPV" and report.get("mode", 0) >= 2:
            return report


@pytest.fixture
def gpsd_factory(tmp_path):
    started = []

    def start(source):
        g = Gpsd(tmp_path, source)
        started.append(g)
        return g
    yield start
    for g in started:
        g.stop()


def test_gpsd_gets_a_fix_through_a_tcp_port(serve, pty, gpsd_factory):
    s, port = serve(pty.path, "--baudrate", "4800")
    gpsd = gpsd_factory("tcp://127.0.0.1:%d" % port)
    reports = gpsd.watch()
    fix = first_fix(reports, pty)
    assert abs(fix["lat"] - 48.1173) < 1e-4 and abs(fix["lon"] - 11.516667) < 1e-4, fix
    assert fix["device"] == "tcp://127.0.0.1:%d" % port


def test_gpsd_gets_a_fix_from_the_readme_udp_recipe(sertcp, pty, gpsd_factory):
    # the README's "one GPS receiver to every program on the LAN", one
    # datagram per sentence, sent to where gpsd listens on loopback
    udp = free_port()
    gpsd = gpsd_factory("udp://127.0.0.1:%d" % udp)
    reports = gpsd.watch()
    s = sertcp("--baudrate", "4800", "--udp-send-to", "127.0.0.1:%d" % udp, "--pack-delimiter", "\\n",
               "--pack-max-ms", "1000", pty.path)
    s.wait_log(r"device \S+ opened")
    fix = first_fix(reports, pty)
    assert abs(fix["lat"] - 48.1173) < 1e-4 and fix["device"] == "udp://127.0.0.1:%d" % udp, fix
