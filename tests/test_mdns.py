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
        assert not probe.is_response and probe.questions == [(FULL, S.DNS_ANY, True)]
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
    assert S.next_instance_name("radio") == "radio (2)"
    assert S.next_instance_name("radio (2)") == "radio (3)"
    assert S.next_instance_name("radio (x)") == "radio (x) (2)"


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

def test_mdns_keys_are_checked():
    r = run_sertcp(["--check", "/dev/ttyUSB0", "--connect", "192.0.2.1:7000", "--mdns", "yes"])
    assert r.returncode == 2 and "--mdns: announces the TCP service on listen, which is not set" in r.stderr
    r = run_sertcp(["--check", "/dev/ttyUSB0", "--listen", "7000", "--mdns-name", "radio"])
    assert r.returncode == 2 and "mdns: is off, but an mdns_* key is set: add mdns = yes" in r.stderr
    r = run_sertcp(["--check", "/dev/ttyUSB0", "--listen", "7000", "--mdns", "yes", "--mdns-type", "iostream"])
    assert r.returncode == 2 and "expected _NAME._tcp" in r.stderr
    r = run_sertcp(["--check", "/dev/ttyUSB0", "--listen", "7000", "--mdns", "yes", "--mdns-txt", "radio_type"])
    assert r.returncode == 2 and "expected key=value" in r.stderr
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
