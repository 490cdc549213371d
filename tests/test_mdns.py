"""DNS-SD: the multicast DNS codec and responder as a pure core (names with
compression pointers, probing, announcing, renaming, answering, the rate
limit), then the real sertcp.py inside a network namespace of the test's
own, found by python-zeroconf and avahi-browse."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import sertcp as S
from conftest import free_port, http_get, need_programs, run_sertcp, wait_for

HOST = S.mdns_host_label() if hasattr(S, "mdns_host_label") else socket.gethostname().split(".")[0]


def service(port=7000, instance="cli on box", txt=(b"protocol=raw",), key="cli"):
    return S.MdnsService(key, instance, ("_iostream", "_tcp"), port, list(txt), "box",
                         [(socket.AF_INET, socket.inet_aton("192.0.2.7"))])


def parse(packets):
    return [(S.parse_dns_message(data), destination) for data, destination in packets]


def announced(now=100.0, **kw):
    """A responder whose one service went through its probes unopposed."""
    r = S.MdnsResponder()
    r.add(service(**kw), now)
    for step in range(4):
        r.expire(now + step * 0.25)
    assert r.names["cli"].state == "announce 1"
    return r


def query(*questions, ident=0, known=(), authorities=()):
    return S.DnsMessage(ident, 0, [(q[0], q[1], False) for q in questions], known, authorities).wire()


PTR_QUESTION = (("_iostream", "_tcp", "local"), S.DNS_PTR)
FULL = ("cli on box", "_iostream", "_tcp", "local")


# --- names and messages -----------------------------------------------------------

def test_a_name_with_dots_and_spaces_in_a_label_goes_out_and_back():
    wire = S.dns_name(FULL)
    assert wire.startswith(b"\x0acli on box\x09_iostream")
    assert S.read_dns_name(wire, 0) == (FULL, len(wire))


def test_compression_pointers_are_followed_back_and_never_forward_or_in_a_loop():
    data = b"\x05local\x00" + b"\x04host\xc0\x00"
    assert S.read_dns_name(data, 7) == (("host", "local"), 14)
    with pytest.raises(S.DnsError):
        S.read_dns_name(b"\xc0\x00", 0)          # a pointer to itself
    with pytest.raises(S.DnsError):
        S.read_dns_name(b"\xc0\x02\x00", 0)      # a pointer forward
    with pytest.raises(S.DnsError):
        S.read_dns_name(b"\x05loc", 0)           # past the end


def test_a_message_goes_out_and_back_with_its_sections():
    r = announced()
    (message, destination), = parse(r.feed(query(PTR_QUESTION), ("192.0.2.1", 5353), 102.0))
    assert destination is None and message.is_response
    assert [(a.name, a.rtype) for a in message.answers] == [(("_iostream", "_tcp", "local"), S.DNS_PTR)]
    assert sorted(a.rtype for a in message.additionals) == [S.DNS_A, S.DNS_TXT, S.DNS_SRV]
    srv = [a for a in message.additionals if a.rtype == S.DNS_SRV][0]
    assert srv.rdata[4:6] == (7000).to_bytes(2, "big") and S.read_dns_name(srv.rdata, 6)[0] == ("box", "local")


def test_malformed_datagrams_are_counted_and_ignored():
    r = announced()
    rnd = random.Random(7)
    good = query(PTR_QUESTION)
    for _ in range(2000):
        junk = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            junk[rnd.randrange(len(junk))] = rnd.randrange(256)
        r.feed(bytes(junk[:rnd.randint(0, len(junk))]), ("192.0.2.1", 5353), 101.0)
    assert r.counters["mdns_packets_in"] == 2000
    assert 0 < r.counters["mdns_packets_malformed"] < 2000
    assert r.names["cli"].state == "announce 1"


# --- probing, announcing, renaming (MDNS_NAME_ON) ------------------------------------

def test_three_probes_250ms_apart_then_two_announcements_a_second_apart():
    r = S.MdnsResponder()
    r.add(service(), 100.0)
    sent = []
    while r.deadline() is not None:
        now = r.deadline()
        sent += [(now, m) for m, _ in parse(r.expire(now))]
    assert [round(t - 100, 2) for t, _ in sent] == [0, 0.25, 0.5, 0.75, 1.75]
    probes, announcements = [m for _, m in sent[:3]], [m for _, m in sent[3:]]
    for probe in probes:
        # answers by multicast, which every program bound to 5353 here receives
        assert not probe.is_response and probe.questions == [(FULL, S.DNS_ANY, False)]
        assert sorted(a.rtype for a in probe.authorities) == [S.DNS_TXT, S.DNS_SRV]
    for announcement in announcements:
        assert sorted(a.rtype for a in announcement.answers) == [S.DNS_A, S.DNS_PTR, S.DNS_PTR, S.DNS_TXT, S.DNS_SRV]
    assert r.names["cli"].state == "announced" and r.take_notes() == [("announced", "cli on box")]


def test_an_answer_for_our_name_from_another_host_while_probing_renames():
    r = S.MdnsResponder()
    r.add(service(), 100.0)
    r.expire(100.0)
    theirs = S.MdnsService("x", "cli on box", ("_iostream", "_tcp"), 9999, [], "other", []).records("cli on box")[1]
    r.feed(S.DnsMessage(0, S.DNS_RESPONSE, answers=theirs).wire(), ("192.0.2.9", 5353), 100.1)
    assert r.names["cli"].instance == "cli on box (2)" and r.names["cli"].state == "waiting"
    assert r.take_notes() == [("renamed", "cli on box", "cli on box (2)")]
    (probe, _), = parse(r.expire(100.1))
    assert probe.questions[0][0] == ("cli on box (2)", "_iostream", "_tcp", "local")
    assert r.counters["mdns_conflicts"] == 1


def test_our_own_probe_and_announcement_heard_back_are_no_conflict():
    r = S.MdnsResponder()
    r.add(service(), 100.0)
    for now in (100.0, 100.25, 100.5, 100.75):
        for data, _ in r.expire(now):
            r.feed(data, ("127.0.0.1", 5353), now)
    assert r.names["cli"].instance == "cli on box" and r.names["cli"].state == "announce 1"


def test_a_simultaneous_probe_with_greater_data_wins_and_we_probe_again_a_second_later():
    r = S.MdnsResponder()
    r.add(service(port=7000), 100.0)
    r.expire(100.0)
    greater = service(port=7001).records("cli on box")[1]
    r.feed(S.DnsMessage(0, 0, [(FULL, S.DNS_ANY, True)], authorities=greater).wire(), ("192.0.2.9", 5353), 100.1)
    assert r.names["cli"].state == "waiting" and r.deadline() == pytest.approx(101.1)
    lesser = service(port=6999).records("cli on box")[1]
    r.expire(101.1)
    r.feed(S.DnsMessage(0, 0, [(FULL, S.DNS_ANY, True)], authorities=lesser).wire(), ("192.0.2.9", 5353), 101.2)
    assert r.names["cli"].state == "probe 1"


def test_renaming_counts_up():
    assert S.clip_label("port on " + "\u00e9" * 40) == "port on " + "\u00e9" * 27
    assert S.next_instance_name("radio") == "radio (2)"
    assert S.next_instance_name("radio (2)") == "radio (3)"
    assert S.next_instance_name("radio (x)") == "radio (x) (2)"
    assert S.next_instance_name("r" * 63) == "r" * 59 + " (2)"


def test_withdrawing_sends_goodbyes_with_ttl_0_only_for_a_name_announced():
    r = announced()
    (goodbye, _), = parse(r.remove("cli"))
    assert goodbye.answers and all(a.ttl == 0 for a in goodbye.answers)
    probing = S.MdnsResponder()
    probing.add(service(), 100.0)
    probing.expire(100.0)
    assert probing.remove("cli") == [] and probing.deadline() is None


# --- answering ----------------------------------------------------------------------

def test_no_answers_while_probing():
    r = S.MdnsResponder()
    r.add(service(), 100.0)
    r.expire(100.0)
    assert r.feed(query(PTR_QUESTION), ("192.0.2.1", 5353), 100.1) == []


def test_a_record_is_multicast_at_most_once_a_second():
    r = announced()
    assert r.feed(query(PTR_QUESTION), ("192.0.2.1", 5353), 100.9) == []     # announced at 100.75
    assert len(r.feed(query(PTR_QUESTION), ("192.0.2.1", 5353), 101.8)) == 1
    assert r.feed(query(PTR_QUESTION), ("192.0.2.1", 5353), 102.0) == []


def test_known_answers_are_not_sent_again():
    r = announced()
    ptr = service().records("cli on box")[0][0]
    assert r.feed(query(PTR_QUESTION, known=[ptr]), ("192.0.2.1", 5353), 102.0) == []
    stale = S.DnsRecord(ptr.name, ptr.rtype, 100, ptr.rdata)        # under half its TTL left: answered
    assert len(r.feed(query(PTR_QUESTION, known=[stale]), ("192.0.2.1", 5353), 102.0)) == 1


def test_a_legacy_querier_gets_a_unicast_reply_with_its_id_and_short_ttls():
    r = announced()
    (reply, destination), = parse(r.feed(query((FULL, S.DNS_SRV), ident=0x1234), ("192.0.2.1", 40000), 100.8))
    assert destination == ("192.0.2.1", 40000) and reply.ident == 0x1234
    assert reply.questions == [(FULL, S.DNS_SRV, False)]
    assert [a.rtype for a in reply.answers] == [S.DNS_SRV] and [a.rtype for a in reply.additionals] == [S.DNS_A]
    assert all(a.ttl <= 10 and not a.unique for a in reply.answers + reply.additionals)


def test_a_query_flood_gets_a_bounded_number_of_answers():
    r = announced()
    sent = 0
    for i in range(1000):
        sent += len(r.feed(query((FULL, S.DNS_TXT), ident=i), ("192.0.2.1", 40000 + i % 100), 102.0 + i * 0.001))
    # one second of flood: the burst, then MDNS_REPLY_RATE a second
    assert sent <= S.MDNS_REPLY_BURST + S.MDNS_REPLY_RATE * 1.0 + 1
    assert r.counters["mdns_answers_limited"] == 1000 - sent


def test_a_host_address_query_is_answered():
    r = announced()
    (reply, _), = parse(r.feed(query((("box", "local"), S.DNS_A)), ("192.0.2.1", 5353), 102.0))
    assert [(a.rtype, a.rdata) for a in reply.answers] == [(S.DNS_A, socket.inet_aton("192.0.2.7"))]
    assert r.feed(query((("box", "local"), S.DNS_AAAA)), ("192.0.2.1", 5353), 102.0) == []


# --- configuration ------------------------------------------------------------------

MDNS_KEY_ERRORS = [
    (["--connect", "192.0.2.1:7000", "--mdns", "yes"], "--mdns: announces the TCP service on listen, which is not set"),
    (["--listen", "7000", "--mdns-name", "radio"], "mdns: is off, but an mdns_* key is set: add mdns = yes"),
    (["--listen", "7000", "--mdns", "yes", "--mdns-type", "iostream"], "expected _NAME._tcp"),
    (["--listen", "7000", "--mdns", "yes", "--mdns-type", "_serial._udp"], "expected _NAME._tcp"),
    (["--listen", "7000", "--mdns", "yes", "--mdns-txt", "radio_type"], "expected key=value"),
    (["--listen", "7000", "--mdns", "yes", "--mdns-name", "x" * 64], "expected 1-63 bytes"),
]


@pytest.mark.parametrize("flags, error", MDNS_KEY_ERRORS)
def test_mdns_keys_are_checked(flags, error):
    r = run_sertcp(["--check", "/dev/ttyUSB0"] + flags)
    assert r.returncode == 2 and error in r.stderr, r.stderr


def test_the_keys_home_assistant_needs_are_accepted():
    r = run_sertcp(["--check", "/dev/ttyUSB0", "--listen", "7000", "--mdns", "yes",
                    "--mdns-type", "_zigbee-coordinator._tcp", "--mdns-txt", "radio_type=ezsp, serial_number=a1"])
    assert r.returncode == 0, r.stderr
    assert "mdns_txt = radio_type=ezsp, serial_number=a1" in r.stdout


def test_the_txt_record_holds_the_protocol_baudrate_and_usb_ids(tmp_path, monkeypatch):
    from test_device import usb_env
    sysfs, devroot, env = usb_env(tmp_path)
    sysfs.plug("ttyUSB3", "10c4", "ea60", "0001", "1-1.2")
    monkeypatch.setenv("SERTCP_SYSFS", env["SERTCP_SYSFS"])
    values = {k.name: k.default for k in S.PORT_KEYS}
    values.update(device="usb:10c4:ea60", baudrate=115200, mdns=True, mdns_txt=[("radio_type", "ezsp")])
    config = S.PortConfig("zigbee", values)
    assert S.mdns_txt_strings(config) == [b"protocol=raw", b"baudrate=115200", b"usb_vendor=10c4",
                                         b"usb_product=ea60", b"usb_serial=0001", b"radio_type=ezsp"]
    values["mdns_txt"] = [("baudrate", "fast")]             # a pair of mdns_txt replaces ours
    txt = S.mdns_txt_strings(S.PortConfig("zigbee", values))
    assert b"baudrate=fast" in txt and b"baudrate=115200" not in txt


def test_a_specific_listen_address_is_announced_and_a_wildcard_means_the_interfaces():
    assert S.announced_addresses([("192.0.2.5", 7000)]) == [(socket.AF_INET, socket.inet_aton("192.0.2.5"))]
    everything = S.announced_addresses([("0.0.0.0", 7000)])
    assert everything and all(family == socket.AF_INET for family, _ in everything)


# --- the real process in a network namespace, found by real browsers -----------------

BROWSE = r"""
# python-zeroconf browsing one service type: a JSON line per service
# added, updated (resolved again) or removed
import json, sys
from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
def changed(zeroconf, service_type, name, state_change):
    out = {"event": state_change.name, "name": name}
    if state_change is not ServiceStateChange.Removed:
        info = zeroconf.get_service_info(service_type, name, timeout=5000)
        if info is not None:
            out.update(server=info.server, port=info.port, addresses=info.parsed_addresses(),
                       txt={k.decode(): (v or b"").decode() for k, v in info.properties.items()})
    print(json.dumps(out), flush=True)
ServiceBrowser(zc, sys.argv[1], handlers=[changed])
print(json.dumps({"event": "ready"}), flush=True)
try:
    sys.stdin.read()
finally:
    zc.close()
"""


class Browser:
    """python-zeroconf's ServiceBrowser in the namespace, as its own process;
    `events` are the JSON lines it printed."""

    def __init__(self, netns, tmp_path, service_type="_iostream._tcp.local."):
        script = tmp_path / "browse.py"
        script.write_text(BROWSE)
        self.events = []
        self.proc = subprocess.Popen(netns.argv(sys.executable, script, service_type), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_for(lambda: self.proc.poll() is not None or {"event": "ready"} in self.events, message="zeroconf ready")
        assert self.proc.poll() is None, self.events

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "output", "text": line})

    def find(self, name, event="Added"):
        for e in self.events:
            if e.get("name") == name and e["event"] == event:
                return e
        return None

    def wait(self, name, event="Added", timeout=15):
        wait_for(lambda: self.find(name, event) is not None, timeout=timeout,
                 message="zeroconf sees %s %s (saw %s)" % (name, event, self.events))
        return self.find(name, event)

    def names(self):
        return {e["name"] for e in self.events if e["event"] == "Added"}

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def browsers(netns, tmp_path):
    made = []

    def make(service_type="_iostream._tcp.local."):
        made.append(Browser(netns, tmp_path, service_type))
        return made[-1]
    yield make
    for b in made:
        b.close()


def full(instance, service_type="_iostream._tcp"):
    return "%s.%s.local." % (instance, service_type)


def test_zeroconf_finds_each_port_with_its_host_port_and_txt_and_sees_it_go_at_exit(
        sertcp, pty_factory, netns, browsers, tmp_path):
    from test_device import usb_env
    sysfs, devroot, env = usb_env(tmp_path)
    radio = pty_factory()
    sysfs.plug("ttyUSB0", "10c4", "ea60", "A1B2", "1-1.3")
    os.symlink(radio.path, devroot / "ttyUSB0")
    other = pty_factory()
    browser = browsers()
    zigbee = browsers("_zigbee-coordinator._tcp.local.")
    s = sertcp(config="""
        [gps]
        device = %s
        listen = 7001
        mdns = yes
        baudrate = 4800
        [radio]
        device = usb:10c4:ea60
        listen = 127.0.0.1:7002
        protocol = raw
        baudrate = 115200
        mdns = yes
        mdns_name = Zigbee radio
        mdns_type = _zigbee-coordinator._tcp
        mdns_txt = radio_type=ezsp, serial_number=A1B2
        [quiet]
        device = %s
        listen = 7003
    """.replace("\n        ", "\n") % (other.path, pty_factory().path),
               preexec_fn=netns.enter, env=env)
    s.wait_log("mdns: announced 'Zigbee radio'")
    gps = browser.wait(full("gps on %s" % HOST))
    # listen without a host: every address of both families (here only loopback has any)
    assert gps["server"] == "%s.local." % HOST and gps["port"] == 7001
    assert sorted(gps["addresses"]) == ["127.0.0.1", "::1"]
    assert gps["txt"] == {"protocol": "raw", "baudrate": "4800"}
    # bound to 127.0.0.1, it announces that address; but both services name
    # one host, HOST.local, which holds the addresses of both listeners
    radio_seen = zigbee.wait(full("Zigbee radio", "_zigbee-coordinator._tcp"))
    assert radio_seen["port"] == 7002 and sorted(radio_seen["addresses"]) == ["127.0.0.1", "::1"]
    assert radio_seen["txt"] == {"protocol": "raw", "baudrate": "115200", "usb_vendor": "10c4",
                                 "usb_product": "ea60", "usb_serial": "A1B2", "radio_type": "ezsp",
                                 "serial_number": "A1B2"}
    assert browser.names() == {full("gps on %s" % HOST)}     # [quiet] has no mdns
    s.signal(signal.SIGTERM)
    assert s.proc.wait(10) == 0
    browser.wait(full("gps on %s" % HOST), "Removed", timeout=5)
    zigbee.wait(full("Zigbee radio", "_zigbee-coordinator._tcp"), "Removed", timeout=5)


def ini(text):
    return text.replace("\n        ", "\n")


def test_two_instances_with_one_name_end_with_two_names(sertcp, pty_factory, netns, browsers):
    browser = browsers()
    first = sertcp(pty_factory().path, "--listen", "7001", "--mdns", "yes", preexec_fn=netns.enter)
    second = sertcp(pty_factory().path, "--listen", "7002", "--mdns", "yes", preexec_fn=netns.enter)
    name = "cli on %s" % HOST
    first.wait_log("mdns: announced")
    second.wait_log("mdns: announced")
    a, b = browser.wait(full(name)), browser.wait(full(name + " (2)"))
    assert {a["port"], b["port"]} == {7001, 7002}
    renamed = [s for s in (first, second) if "renamed" in s.log()]
    assert len(renamed) == 1, first.log() + second.log()
    assert "mdns: another host uses the name %r: renamed %r" % (name, name + " (2)") in renamed[0].log()


def test_sighup_withdraws_a_removed_port_and_announces_a_new_and_a_changed_one(
        sertcp, pty_factory, netns, browsers, tmp_path):
    browser = browsers()
    a, b, c = pty_factory(), pty_factory(), pty_factory()
    before = ini("""
        [a]
        device = %s
        listen = 7001
        mdns = yes
        [b]
        device = %s
        listen = 7002
        mdns = yes
        mdns_txt = version=1
    """ % (a.path, b.path))
    s = sertcp(config=before, preexec_fn=netns.enter)
    browser.wait(full("a on %s" % HOST))
    assert browser.wait(full("b on %s" % HOST))["txt"]["version"] == "1"
    s.config.write_text(ini("""
        [b]
        device = %s
        listen = 7002
        mdns = yes
        mdns_txt = version=2
        [c]
        device = %s
        listen = 7003
        mdns = yes
    """ % (b.path, c.path)))
    s.signal(signal.SIGHUP)
    browser.wait(full("a on %s" % HOST), "Removed")
    assert browser.wait(full("c on %s" % HOST))["port"] == 7003
    wait_for(lambda: [e["txt"]["version"] for e in browser.events
                      if e.get("name") == full("b on %s" % HOST) and "txt" in e][-1:] == ["2"],
             timeout=15, message="b announced again with version=2 (%s)" % browser.events)
    s.wait_log(r"mdns: withdrawn 'a on ")


def test_malformed_datagrams_and_a_query_flood_are_counted_and_the_responder_goes_on(
        sertcp, pty, netns, browsers):
    status = free_port()
    s = sertcp(pty.path, "--listen", "7001", "--mdns", "yes", "--status", "127.0.0.1:%d" % status,
               preexec_fn=netns.enter)
    s.wait_log("mdns: announced")

    def counters():
        return json.loads(http_get(status, "/status")[1])["mdns"]

    def hostile():
        """In batches the socket's receive buffer holds, each counted
        before the next: random bytes, a name pointing at itself, then
        one-shot queries (from a port other than 5353: each asks for a
        unicast reply) far faster than the rate limit."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.3)
        rnd = random.Random(3)
        loop = b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
        good = query((("cli on %s" % HOST, "_iostream", "_tcp", "local"), S.DNS_TXT), ident=7)
        sent, answers, started = counters()["mdns_packets_in"], 0, time.monotonic()
        for batch in range(6):
            for i in range(50):
                data = [bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 40))), loop, good][batch % 3]
                sock.sendto(data, ("224.0.0.251" if batch % 3 < 2 else "127.0.0.1", 5353))
            sent += 50
            wait_for(lambda: counters()["mdns_packets_in"] >= sent, message="batch %d counted" % batch)
        while True:
            try:
                reply, _ = sock.recvfrom(9000)
                assert S.parse_dns_message(reply).ident == 7
                answers += 1
            except socket.timeout:
                break
        sock.close()
        return answers, time.monotonic() - started, counters()
    answers, seconds, st = netns.call(hostile)
    assert 1 <= answers <= S.MDNS_REPLY_BURST + S.MDNS_REPLY_RATE * seconds + 1
    assert st["mdns_packets_malformed"] >= 100 and st["mdns_answers_limited"] == 100 - answers
    assert st["names"]["cli"]["name"] == "cli on %s" % HOST and st["names"]["cli"]["state"] in S.MDNS_OWNED
    metrics = netns.call(lambda: http_get(status, "/metrics")[1])
    assert "sertcp_mdns_packets_malformed_total %d" % st["mdns_packets_malformed"] in metrics
    check = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert (check.returncode, check.stdout + check.stderr) == (0, ""), metrics
    # and still answering: a browser started now finds the port
    assert browsers().wait(full("cli on %s" % HOST))["port"] == 7001


DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# avahi-daemon as on a Raspberry Pi, but on lo only (which the namespace
# gave the MULTICAST flag), publishing this host's name and address as it
# would: sertcp announces the same name beside it, on the same port 5353
AVAHI_CONFIG = """[server]
host-name=%s
use-ipv4=yes
use-ipv6=no
allow-interfaces=lo
enable-dbus=yes
[publish]
publish-addresses=yes
publish-hinfo=no
publish-workstation=no
"""


@pytest.fixture
def avahi(netns, tmp_path):
    """avahi-daemon in the namespace, on a D-Bus system bus of the test's
    own (a dbus-daemon with its own config and socket): returns the
    environment in which avahi-browse finds that bus.  The daemon runs in
    a mount namespace of its own with a tmpfs on /run, so that its pid
    file (/run/avahi-daemon/pid) cannot meet another avahi-daemon's.  Its
    log must not mention a conflict: our A records for HOST.local sit
    beside its own."""
    need_programs("avahi-daemon", "avahi-browse", "dbus-daemon", "unshare")
    bus = tmp_path / "bus.sock"
    (tmp_path / "bus.conf").write_text(DBUS_CONFIG % bus)
    (tmp_path / "avahi.conf").write_text(AVAHI_CONFIG % HOST)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=%s" % bus)
    log = open(tmp_path / "avahi.log", "wb")
    procs = [subprocess.Popen(["dbus-daemon", "--config-file=%s" % (tmp_path / "bus.conf"), "--nofork"],
                              stdout=log, stderr=subprocess.STDOUT)]
    wait_for(lambda: bus.exists(), message="the D-Bus socket")
    procs.append(subprocess.Popen(netns.argv(
        "unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /run && exec avahi-daemon -f %s "
        "--no-drop-root --no-chroot --no-rlimits --debug" % (tmp_path / "avahi.conf")),
        stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        wait_for(lambda: b"Server startup complete" in (tmp_path / "avahi.log").read_bytes()
                 or procs[1].poll() is not None, message="avahi-daemon started")
        assert procs[1].poll() is None, (tmp_path / "avahi.log").read_text()
        yield env
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    assert "conflict" not in (tmp_path / "avahi.log").read_text().lower(), (tmp_path / "avahi.log").read_text()


def test_avahi_browse_finds_the_port_and_sees_it_go_at_exit(sertcp, pty, netns, avahi, tmp_path):
    browse = subprocess.Popen(netns.argv("avahi-browse", "--resolve", "--parsable", "--no-db-lookup",
                                         "_zigbee-coordinator._tcp"),
                              env=avahi, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(browse.stdout), daemon=True).start()
    try:
        s = sertcp(pty.path, "--listen", "127.0.0.1:7005", "--mdns", "yes", "--mdns-name", "Radio, upstairs",
                   "--mdns-type", "_zigbee-coordinator._tcp", "--mdns-txt", "radio_type=znp",
                   preexec_fn=netns.enter)
        resolved = wait_for(lambda: [line for line in lines if line.startswith("=")], timeout=15,
                            message="avahi-browse resolves the service (%s)" % lines)
        fields = resolved[0].rstrip("\n").split(";", 9)
        # =;lo;IPv4;NAME;TYPE;DOMAIN;HOST;ADDRESS;PORT;TXT (avahi escapes ',' and ' ' in NAME)
        assert fields[1:6] == ["lo", "IPv4", r"Radio\044\032upstairs", "_zigbee-coordinator._tcp", "local"]
        assert fields[6:9] == ["%s.local" % HOST, "127.0.0.1", "7005"]
        assert sorted(fields[9].split(" ")) == ['"baudrate=9600"', '"protocol=raw"', '"radio_type=znp"']
        s.signal(signal.SIGTERM)
        assert s.proc.wait(10) == 0
        wait_for(lambda: any(line.startswith("-;lo;IPv4;Radio") for line in lines), timeout=5,
                 message="avahi-browse sees the goodbye (%s)" % lines)
    finally:
        browse.terminate()
        browse.wait(10)


def test_the_readme_documents_each_mdns_key_and_the_example_file_has_it():
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "sertcp.ini.example").read_text()
    for key in ("mdns", "mdns_name", "mdns_type", "mdns_txt"):
        assert "\n| `%s` |" % key in readme, key
        assert "%s = " % key in example, key
    assert "mdns_type = _zigbee-coordinator._tcp" in readme


def test_ipv6_addresses_come_from_proc_net_if_inet6(tmp_path):
    listing = tmp_path / "if_inet6"
    listing.write_text("00000000000000000000000000000001 01 80 10 80       lo\n"
                       "fe80000000000000021122fffe334455 02 40 20 80     eth0\n"
                       "not a line\n")
    assert S.ipv6_addresses(str(listing)) == [socket.inet_pton(socket.AF_INET6, "::1"),
                                              socket.inet_pton(socket.AF_INET6, "fe80::211:22ff:fe33:4455")]
    assert S.ipv6_addresses(str(tmp_path / "absent")) == []


def sockets_on_5353(pid):
    """The inodes of the UDP sockets process `pid` has bound to port 5353
    (in its own network namespace, as /proc/PID/net shows it)."""
    bound = set()
    with open("/proc/%d/net/udp" % pid) as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":14E9"):
                bound.add(fields[9])
    held = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            held.add(link[8:-1])
    return bound & held


def test_turning_mdns_off_at_sighup_says_goodbye_and_closes_the_socket(sertcp, pty, netns, browsers):
    status = free_port()
    browser = browsers()
    s = sertcp(config=ini("""
        [global]
        status = 127.0.0.1:%d
        [cli]
        device = %s
        listen = 7001
        mdns = yes
    """ % (status, pty.path)), preexec_fn=netns.enter)
    browser.wait(full("cli on %s" % HOST))
    assert len(sockets_on_5353(s.proc.pid)) == 1
    s.config.write_text(s.config.read_text().replace("mdns = yes", "mdns = no"))
    s.signal(signal.SIGHUP)
    browser.wait(full("cli on %s" % HOST), "Removed")
    wait_for(lambda: netns.call(lambda: json.loads(http_get(status, "/status")[1])["mdns"]) is None,
             message="no responder left")
    assert sockets_on_5353(s.proc.pid) == set()
