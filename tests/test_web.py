"""The status endpoint for people and for scripts: the web page at GET /
(loaded by a real browser, headless Chromium), status_allow, and the
control API (POST /ports/NAME/..., POST /reload) driven with curl."""
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import ROOT, Client, free_port, http_get, need_programs, run_sertcp, wait_for
from test_device import SimulatedUart
from test_ops import raw_http

TOKEN = "tok-3n7Yq"


def artifacts_dir():
    """Where a run keeps what people look at afterwards (screenshots):
    $SERTCP_ARTIFACTS, else tests/artifacts/ (git-ignored)."""
    folder = Path(os.environ.get("SERTCP_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium(url, tmp_path, *args, budget_ms=4000):
    """Run headless Chromium on url; --virtual-time-budget lets the page's
    script fetch /status and render before the DOM is dumped."""
    need_programs("chromium")
    profile = tmp_path / ("chromium-profile-%d" % time.monotonic_ns())
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--user-data-dir=%s" % profile, "--virtual-time-budget=%d" % budget_ms] + list(args) + [url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def port_box(dom, name_html):
    """The HTML of the page's box for one port (its h2 starts with the name,
    as the DOM serializes it)."""
    for box in dom.split('<div class="port">')[1:]:
        if box.startswith("<h2>" + name_html + " "):
            return box
    raise AssertionError("no port %s in the page:\n%s" % (name_html, dom[-3000:]))


def counter_in(box, counter):
    m = re.search(r"<td>%s</td><td class=\"n\">(\d+)</td>" % counter, box)
    assert m, (counter, box)
    return int(m.group(1))


def curl(status, path, *args, token=None, source=None, timeout=20):
    """(HTTP code, JSON answer or text, seconds) of a curl request to the
    status endpoint; code 0 when curl got no HTTP answer at all."""
    need_programs("curl")
    argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", str(timeout)]
    if token is not None:
        argv += ["-H", "Authorization: Bearer %s" % token]
    if source is not None:
        argv += ["--interface", source]
    argv += list(args) + ["http://127.0.0.1:%d%s" % (status, path)]
    started = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
    elapsed = time.monotonic() - started
    body, _, code = r.stdout.rpartition("\n")
    try:
        body = json.loads(body)
    except ValueError:
        pass
    return int(code or 0), body, elapsed


def post(status, path, *args, **kw):
    kw.setdefault("token", TOKEN)
    return curl(status, path, "-X", "POST", *args, **kw)


def status_of(status, name=None):
    ports = json.loads(http_get(status, "/status")[1])["ports"]
    if name is None:
        return ports
    return next(p for p in ports if p["name"] == name)


def start_with_control(sertcp, config_body, status, extra_global=""):
    """sertcp on an INI file whose [global] has status and the token."""
    config = "[global]\nstatus = 127.0.0.1:%d\ncontrol_token = %s\n%s\n%s" % (status, TOKEN, extra_global, config_body)
    s = sertcp(config=config)
    s.wait_log("status endpoint on")
    return s


def refused(port, source=None):
    """True if a TCP connect to 127.0.0.1:port is refused (nobody listens)."""
    with socket.socket() as probe:
        if source:
            probe.bind((source, 0))
        probe.settimeout(5)
        try:
            probe.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def fds_of(pid):
    """The paths a process holds open."""
    out = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            out.add(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    return out


# --- the web page --------------------------------------------------------------

HOSTILE = '<script>document.title="injected"</script>'


def test_the_page_in_a_browser_shows_ports_clients_and_counters(sertcp, pty_factory, tmp_path):
    """Chromium loads /, its script reads /status and draws each port; a
    port name holding markup is shown as text (an INI section name may hold
    any character but ']'); bytes moved between two loads show up; a
    phone-sized screenshot is kept."""
    meter, other = pty_factory(), pty_factory()
    port, port2, status = free_port(), free_port(), free_port()
    s = sertcp(config="""
[global]
status = 127.0.0.1:%d

[meter]
device = %s
listen = 127.0.0.1:%d

[%s]
device = %s
listen = 127.0.0.1:%d
udp_send_to = 127.0.0.1:9
""" % (status, meter.path, port, HOSTILE, other.path, port2))
    s.wait_log(r"\[meter\] device \S+ opened")
    c = Client(port)
    try:
        c.send(b"x")
        assert meter.read(1) == b"x"
        peer = "127.0.0.1:%d" % c.sock.getsockname()[1]
        url = "http://127.0.0.1:%d/" % status
        first = chromium(url, tmp_path, "--dump-dom", budget_ms=2000)     # one read of /status
        assert "<title>sertcp</title>" in first and "injected" not in first.split("<script>")[0].split("<h1>")[0]
        box = port_box(first, "meter")
        assert peer in box and meter.path in box and "open" in box
        assert "&lt;script&gt;document.title=\"injected\"&lt;/script&gt;" in first   # as text
        assert first.count("<script>") == 1                                          # only the page's own
        before = counter_in(box, "bytes_from_device")
        assert '<td>bytes_from_device</td><td class="n">%d</td><td></td>' % before in box  # no rate yet
        # the counters of a side a port has (UDP on the other one), not of those it has not
        assert "udp_datagrams_out" not in box and "modem_rings" not in box and "monitor_bytes_dropped" not in box
        assert "<td>udp_datagrams_out</td>" in first
        meter.write(b"0123456789" * 10)
        assert c.recv(100) == b"0123456789" * 10
        # long enough for the page to read /status again (every 3 s): rates appear
        second = chromium(url, tmp_path, "--dump-dom", budget_ms=7000)
        assert counter_in(port_box(second, "meter"), "bytes_from_device") == before + 100
        assert re.search(r'<td>bytes_from_device</td><td class="n">\d+</td><td class="n">\d+</td>', second), second
        assert counter_in(port_box(second, "meter"), "bytes_to_device") == 1
        shot = artifacts_dir() / "status-page.png"
        if shot.exists():
            shot.unlink()
        chromium(url, tmp_path, "--window-size=412,915", "--screenshot=%s" % shot)
        assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print("screenshot of the status page: %s" % shot)
    finally:
        c.close()


def test_the_page_is_small_and_self_contained(sertcp, pty):
    status = free_port()
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % free_port(), "--status", "127.0.0.1:%d" % status)
    s.wait_log("status endpoint on")
    code, page = http_get(status, "/")
    assert code == 200
    assert 1000 < len(page.encode()) < 6000, len(page.encode())
    # no external assets: nothing fetched but /status, nothing linked
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", page), page
    assert 'fetch("status"' in page
    # every value reaches the DOM through textContent, never as markup
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_every_path_answers_its_method(sertcp, pty):
    status = free_port()
    s = sertcp(pty.path, "--listen", "127.0.0.1:%d" % free_port(), "--status", "127.0.0.1:%d" % status)
    s.wait_log("status endpoint on")
    for path in ("/", "/status", "/metrics"):
        assert curl(status, path)[0] == 200
        assert curl(status, path, "-I")[0] == 200
        assert curl(status, path, "-d", "x=1")[0] == 405
    # without a control token there is no control API
    assert curl(status, "/reload", "-X", "POST", token=TOKEN)[0] == 404
    assert curl(status, "/ports/cli/disable", "-X", "POST", token=TOKEN)[0] == 404
    assert status_of(status, "cli")["disabled"] is False


# --- status_allow ----------------------------------------------------------------

def test_status_allow_keeps_every_path_from_other_addresses(sertcp, pty):
    status = free_port()
    s = start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, free_port()), status,
                           "status_allow = 127.0.0.1, 127.0.0.2/32")
    for source in ("127.0.0.1", "127.0.0.2"):
        assert curl(status, "/status", source=source)[0] == 200
    for path in ("/", "/status", "/metrics"):
        code, body, _ = curl(status, path, source="127.0.0.3")
        assert code == 0 and body == "", (path, code, body)       # closed before a word is read
    assert post(status, "/ports/p/disable", source="127.0.0.3")[0] == 0
    assert post(status, "/reload", source="127.0.0.3")[0] == 0
    assert status_of(status, "p")["disabled"] is False
    s.wait_log(r"status endpoint: 127\.0\.0\.3:\d+ refused: not in status_allow")


def test_status_allow_and_the_token_change_at_sighup(sertcp, pty, tmp_path):
    status = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    body = "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, free_port())
    s = sertcp(config="[global]\nstatus = 127.0.0.1:%d\ncontrol_token_file = %s\n%s" % (status, token_file, body))
    s.wait_log("status endpoint on")
    assert post(status, "/ports/p/disconnect", token="first-token")[0] == 200
    token_file.write_text("second-token\n")
    s.config.write_text("[global]\nstatus = 127.0.0.1:%d\ncontrol_token_file = %s\nstatus_allow = 127.0.0.2\n%s"
                        % (status, token_file, body))
    s.signal(signal.SIGHUP)
    s.wait_log("reloaded: kept p")
    assert curl(status, "/status")[0] == 0                       # 127.0.0.1 is out now
    assert post(status, "/ports/p/disconnect", token="first-token", source="127.0.0.2")[0] == 401
    assert post(status, "/ports/p/disconnect", token="second-token", source="127.0.0.2")[0] == 200
    # and the control API goes away with its key
    s.config.write_text("[global]\nstatus = 127.0.0.1:%d\n%s" % (status, body))
    s.signal(signal.SIGHUP)
    s.wait_log("reload: control API off")
    assert post(status, "/ports/p/disconnect", token="second-token")[0] == 404


# --- the token -------------------------------------------------------------------

def test_no_token_or_a_wrong_one_is_401_after_the_wrong_password_delay(sertcp, pty):
    status = free_port()
    s = start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, free_port()), status)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        code, body, elapsed = curl(status, "/ports/p/disable", "-X", "POST", token=token, source="127.0.0.10")
        assert code == 401 and "token" in body["error"], (token, code, body)
        assert elapsed >= 0.9, elapsed
    # a Basic header or the token in the query string is no token either
    code, _, elapsed = curl(status, "/ports/p/disable?token=%s" % TOKEN, "-X", "POST", "-u", "x:" + TOKEN,
                            source="127.0.0.11")
    assert code == 401 and elapsed >= 0.9
    assert status_of(status, "p")["disabled"] is False
    s.wait_log(r"control API: POST /ports/p/disable from 127\.0\.0\.10 refused: no token")
    s.wait_log(r"control API: POST /ports/p/disable from 127\.0\.0\.10 refused: wrong token")
    assert TOKEN not in s.log()
    code, body, elapsed = post(status, "/ports/p/disable")
    assert code == 200 and body == {"port": "p", "disabled": True} and elapsed < 0.9


def test_an_address_with_five_wrong_tokens_is_refused_even_with_the_right_one(sertcp, pty):
    status = free_port()
    start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, free_port()), status)
    guesses = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                                 "--interface", "127.0.0.2", "-H", "Authorization: Bearer guess%d" % i,
                                 "http://127.0.0.1:%d/ports/p/disable" % status], stdout=subprocess.PIPE, text=True)
               for i in range(5)]
    assert [g.communicate(timeout=20)[0] for g in guesses] == ["401"] * 5
    code, body, elapsed = post(status, "/ports/p/disable", source="127.0.0.2")
    assert code == 429 and "127.0.0.2" in body["error"] and elapsed < 0.9
    assert status_of(status, "p")["disabled"] is False
    # the others are not blocked, and GET /status stays open to everyone
    assert post(status, "/ports/p/disable", source="127.0.0.3")[0] == 200
    assert curl(status, "/status", source="127.0.0.2")[0] == 200


# --- the actions -----------------------------------------------------------------

def test_disconnect_one_peer_then_all(sertcp, pty):
    status, port = free_port(), free_port()
    s = start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\nmax_clients = 4\n"
                           % (pty.path, port), status)
    s.wait_log(r"\[p\] device \S+ opened")
    clients = [Client(port) for _ in range(3)]
    try:
        wait_for(lambda: len(status_of(status, "p")["clients"]) == 3, message="three clients")
        one = "127.0.0.1:%d" % clients[1].sock.getsockname()[1]
        code, body, _ = post(status, "/ports/p/disconnect", "-d", "peer=%s" % one)
        assert (code, body) == (200, {"port": "p", "disconnected": [one]})
        assert clients[1].closed_by_peer(5)
        assert sorted(c["peer"] for c in status_of(status, "p")["clients"]) == sorted(
            "127.0.0.1:%d" % c.sock.getsockname()[1] for c in (clients[0], clients[2]))
        s.wait_log(r"client %s disconnected: disconnected through the control API by 127\.0\.0\.1" % one)
        # the others still carry data
        pty.write(b"still here")
        assert clients[0].recv(10) == b"still here" and clients[2].recv(10) == b"still here"
        code, body, _ = post(status, "/ports/p/disconnect?peer=%s" % one)
        assert code == 404 and one in body["error"]
        code, body, _ = post(status, "/ports/p/disconnect", "-d", "peer=all")
        assert code == 200 and len(body["disconnected"]) == 2
        assert clients[0].closed_by_peer(5) and clients[2].closed_by_peer(5)
        assert status_of(status, "p")["clients"] == []
    finally:
        for c in clients:
            c.close()


def test_lines_and_break_on_the_simulated_uart(sertcp, tmp_path):
    uart = SimulatedUart(tmp_path / "uart")
    status = free_port()
    config = "[global]\nstatus = 127.0.0.1:%d\ncontrol_token = %s\n[u]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (
        status, TOKEN, uart.url, free_port())
    s = sertcp(config=config, env=uart.env)
    s.wait_log(r"device testuart://\S+ opened")

    def outputs():
        return (uart.folder / "out").read_text().split()
    code, body, _ = post(status, "/ports/u/lines", "-d", "dtr=off")
    assert (code, body["lines"]["dtr"]) == (200, False)
    assert "DTR" not in outputs()
    code, body, _ = post(status, "/ports/u/lines?rts=off")
    assert code == 200 and outputs() == []
    assert status_of(status, "u")["lines"] == {"dtr": False, "rts": False, "break": False}
    code, body, _ = post(status, "/ports/u/lines", "-d", "dtr=on", "-d", "rts=on")
    assert code == 200 and sorted(outputs()) == ["DTR", "RTS"]
    s.wait_log(r"\[u\] lines DTR=on RTS=on through the control API by 127\.0\.0\.1")
    code, body, _ = post(status, "/ports/u/lines", "-d", "break=0.4")
    assert code == 200 and body["lines"]["break"] is True
    wait_for(lambda: [k for k, _ in uart.breaks()] == ["on", "off"], message="the break ended")
    (_, start), (_, end) = uart.breaks()
    assert 0.35 <= end - start < 3.0
    s.wait_log(r"\[u\] break for 0.4s \(through the control API by 127\.0\.0\.1\)")
    for bad in ("dtr=yes", "break=0", "break=61", "break=nan", "speed=9600", "dtr=on&dtr=off"):
        code, body, _ = post(status, "/ports/u/lines?" + bad)
        assert code == 400 and body["error"], (bad, body)
    assert post(status, "/ports/u/lines")[0] == 400                # nothing to do
    assert sorted(outputs()) == ["DTR", "RTS"] and len(uart.breaks()) == 2


def test_disable_closes_listener_and_device_until_enabled_even_across_sighup(sertcp, pty):
    status, port = free_port(), free_port()
    s = start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, port), status)
    s.wait_log(r"\[p\] device \S+ opened")
    assert pty.path in fds_of(s.proc.pid)
    c = Client(port)
    try:
        c.send(b"a")
        assert pty.read(1) == b"a"
        code, body, _ = post(status, "/ports/p/disable")
        assert (code, body) == (200, {"port": "p", "disabled": True})
        assert c.closed_by_peer(5)
        assert refused(port)
        assert pty.path not in fds_of(s.proc.pid)
        p = status_of(status, "p")
        assert p["disabled"] is True and p["device_state"] == "closed" and p["open"] is False
        assert p["bytes_to_device"] == 1
        s.wait_log(r"\[p\] device \S+ closed \(port stopped: disabled through the control API by 127\.0\.0\.1\)")
        metrics = http_get(status, "/metrics")[1]
        assert 'sertcp_port_disabled{port="p"} 1' in metrics and 'sertcp_device_open{port="p"} 0' in metrics
        assert post(status, "/ports/p/disable")[0] == 200        # again: no change
        code, body, _ = post(status, "/ports/p/lines", "-d", "dtr=on")
        assert code == 409 and "disabled" in body["error"]
        # a reload keeps it disabled
        s.signal(signal.SIGHUP)
        s.wait_log(r"reloaded: kept p; .*still disabled: p")
        assert refused(port) and status_of(status, "p")["disabled"] is True
        code, body, _ = post(status, "/ports/p/enable")
        assert (code, body) == (200, {"port": "p", "disabled": False})
        s.wait_log(r"\[p\] device \S+ opened", count=2)
        p = status_of(status, "p")
        assert p["disabled"] is False and p["device_state"] == "open" and p["bytes_to_device"] == 1
        assert 'sertcp_port_disabled{port="p"} 0' in http_get(status, "/metrics")[1]
        c2 = Client(port)
        c2.send(b"b")
        assert pty.read(1) == b"b"
        pty.write(b"c")
        assert c2.recv(1) == b"c"
        c2.close()
    finally:
        c.close()


def test_a_disabled_port_changed_at_sighup_stays_disabled_and_enables_as_changed(sertcp, pty):
    status, port, moved = free_port(), free_port(), free_port()
    s = start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, port), status)
    s.wait_log(r"\[p\] device \S+ opened")
    assert post(status, "/ports/p/disable")[0] == 200
    s.config.write_text(s.config.read_text().replace(":%d\n" % port, ":%d\n" % moved))
    s.signal(signal.SIGHUP)
    s.wait_log(r"reloaded: kept none; restarted p; .*still disabled: p")
    assert refused(port) and refused(moved)
    p = status_of(status, "p")
    assert p["disabled"] is True and p["listen"] == "127.0.0.1:%d" % moved and p["device_state"] == "closed"
    assert post(status, "/ports/p/enable")[0] == 200
    c = Client(moved)
    try:
        c.send(b"z")
        assert pty.read(1) == b"z"
    finally:
        c.close()
    assert refused(port)


def test_disabling_one_port_of_a_shared_listener_leaves_the_others(sertcp, pty_factory):
    a, b = pty_factory(), pty_factory()
    status, port = free_port(), free_port()
    s = start_with_control(sertcp, """
[DEFAULT]
listen = 127.0.0.1:%d
[a]
device = %s
identity = A
[b]
device = %s
identity = B
""" % (port, a.path, b.path), status)
    s.wait_log(r"\[b\] device \S+ opened")
    assert post(status, "/ports/a/disable")[0] == 200
    to_b = Client(port)
    to_a = Client(port)
    try:
        to_b.send(b"B\nfor b")
        assert b.read(5) == b"for b"
        to_a.send(b"A\nfor a")
        assert to_a.closed_by_peer(5)
        s.wait_log(r"unknown id 'A'")
        assert post(status, "/ports/a/enable")[0] == 200
        again = Client(port)
        again.send(b"A\nback")
        assert a.read(4) == b"back"
        again.close()
    finally:
        to_a.close()
        to_b.close()


def test_reload_through_the_api(sertcp, pty_factory):
    first, second = pty_factory(), pty_factory()
    status = free_port()
    body = "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (first.path, free_port())
    s = start_with_control(sertcp, body, status)
    added = "[q]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (second.path, free_port())
    s.config.write_text(s.config.read_text() + added)
    code, answer, _ = post(status, "/reload")
    assert code == 200 and answer["reloaded"] is True and answer["started"] == ["q"] and answer["kept"] == ["p"]
    assert [p["name"] for p in status_of(status)] == ["p", "q"]
    s.wait_log(r"reload requested through the control API by 127\.0\.0\.1: reloading configuration")
    s.config.write_text(s.config.read_text() + "[bad]\nbaudrate = fast\n")
    code, answer, _ = post(status, "/reload")
    assert code == 409 and answer["reloaded"] is False and any("baudrate" in e for e in answer["errors"])
    assert [p["name"] for p in status_of(status)] == ["p", "q"]


# --- bad requests ------------------------------------------------------------------

def test_bad_requests_get_4xx_and_cost_only_themselves(sertcp, pty):
    status = free_port()
    s = start_with_control(sertcp, "[p]\ndevice = %s\nlisten = 127.0.0.1:%d\n" % (pty.path, free_port()), status)
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    # a request still being written does not hold up the others
    slow = socket.create_connection(("127.0.0.1", status))
    slow.sendall(b"POST /ports/p/disable HTTP/1.0\r\n" + auth + b"Content-Length: 10\r\n\r\nab")
    try:
        for request, code in [
                (b"POST /ports/p/lines HTTP/1.0\r\n" + auth + b"Content-Length: 99999\r\n\r\n", 413),
                (b"POST /ports/p/lines HTTP/1.0\r\n" + auth + b"Content-Length: x\r\n\r\n", 400),
                (b"POST /ports/p/lines HTTP/1.0\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n", 411),
                (b"POST /ports/p/lines HTTP/1.0\r\n" + auth + b"Content-Type: application/json\r\n"
                 b"Content-Length: 12\r\n\r\n{\"dtr\":\"on\"}", 415),
                (b"POST /ports/p%zz/disable HTTP/1.0\r\n" + auth + b"\r\n", 400),
                (b"POST /ports/%ff/disable HTTP/1.0\r\n" + auth + b"\r\n", 400),
                (b"POST /ports/p/lines?dtr=%4 HTTP/1.0\r\n" + auth + b"\r\n", 400),
                (b"POST /ports/p/disable HTTP/1.0\r\nno colon here\r\n\r\n", 400),
                (b"POST /ports/nosuch/disable HTTP/1.0\r\n" + auth + b"\r\n", 404),
                (b"POST /ports/p/explode HTTP/1.0\r\n" + auth + b"\r\n", 404),
                (b"GET /ports/p/disable HTTP/1.0\r\n" + auth + b"\r\n", 405),
                (b"PUT /ports/p/disable HTTP/1.0\r\n" + auth + b"\r\n", 405)]:
            answer = raw_http(status, request)
            assert answer.startswith(b"HTTP/1.0 %d " % code), (request, answer)
            if not request.startswith(b"PUT") and b"no colon" not in request:    # (no head, no path)
                assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"], answer
        assert status_of(status, "p")["disabled"] is False
        # the slow one ends its body now and is answered
        slow.sendall(b"cdefghij")
        slow.settimeout(5)
        assert slow.recv(100).startswith(b"HTTP/1.0 400")      # 'abcdefghij' is no parameter list of disable
    finally:
        slow.close()
    assert s.proc.poll() is None and "Traceback" not in s.log()
    # a port name with / and spaces is reached %-encoded
    other = free_port()
    s.config.write_text(s.config.read_text() + "[a/b c]\ndevice = /nonexistent/tty\nlisten = 127.0.0.1:%d\n" % other)
    assert post(status, "/reload")[0] == 200
    code, body, _ = post(status, "/ports/a%2Fb%20c/disable")
    assert (code, body) == (200, {"port": "a/b c", "disabled": True})
    assert refused(other)


# --- configuration -----------------------------------------------------------------

def test_control_keys_are_checked(tmp_path):
    def errors(*args):
        r = run_sertcp(["--check", "--virtual", str(tmp_path / "v"), "--listen", "7000"] + list(args))
        assert r.returncode == 2, r.stdout
        return r.stderr
    assert "--control-token: needs status" in errors("--control-token", "abc")
    assert "--status-allow: needs status" in errors("--status-allow", "127.0.0.1")
    assert "not an IP address" in errors("--status", "7001", "--status-allow", "localhost")
    (tmp_path / "t").write_text("abc\n")
    assert "set control_token or control_token_file, not both" in errors(
        "--status", "7001", "--control-token", "abc", "--control-token-file", str(tmp_path / "t"))
    message = errors("--status", "7001", "--control-token", "two words")
    assert "printable ASCII characters without spaces" in message and "two words" not in message
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in errors("--status", "7001", "--control-token-file", str(tmp_path / "empty"))
    r = run_sertcp(["--check", "--virtual", str(tmp_path / "v"), "--listen", "7000", "--status", "7001",
                    "--control-token", "s3cret-token", "--status-allow", "127.0.0.0/8, ::1"])
    assert r.returncode == 0, r.stderr
    assert "control_token = ********" in r.stdout and "s3cret-token" not in r.stdout
    assert "status_allow = 127.0.0.0/8, ::1/128" in r.stdout
