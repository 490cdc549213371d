"""Faults found by attacking the web page and control API of the status
endpoint and the DNS-SD responder: each test failed before its fix."""
import socket

import sertcp as S


def announced_responder(ports=4):
    """A responder with `ports` services of one type, all announced."""
    r = S.MdnsResponder()
    for i in range(ports):
        r.add(S.MdnsService("p%d" % i, "p%d on box" % i, ("_iostream", "_tcp"), 7000 + i, [b"protocol=raw"], "box",
                            [(socket.AF_INET, socket.inet_aton("192.0.2.7"))]), 0.0)
    for step in range(8):
        r.expire(step * 1.0)
    assert all(e.state == "announced" for e in r.names.values())
    return r


def repeated_query():
    """One datagram of at most 9000 bytes: the browse question ~750 times
    (a compression pointer each) and ~320 known answers that match none
    of ours."""
    body = S.dns_name(("_iostream", "_tcp", "local")) + b"\x00\x0c\x00\x01"
    questions, known = 1, 0
    while len(body) < 4500:
        body += b"\xc0\x0c\x00\x0c\x00\x01"
        questions += 1
    while len(body) + 14 <= 8988:
        body += b"\xc0\x0c\x00\x0c\x00\x01" + (4500).to_bytes(4, "big") + b"\x00\x02\xc0\x0c"
        known += 1
    header = b"\0\0\0\0" + questions.to_bytes(2, "big") + known.to_bytes(2, "big") + b"\0\0\0\0"
    return header + body, questions + known


def test_an_mdns_query_repeating_questions_and_known_answers_costs_time_in_proportion_to_its_size(monkeypatch):
    # Before: every answer was compared with every known answer, and every
    # repeat of a question answered again: one 9000-byte datagram cost
    # 0.2 s of the loop per announced port (and 64 are read per wake-up).
    r = announced_responder()
    data, records = repeated_query()
    calls = [0]
    key = S.DnsRecord.key

    def counting_key(self):
        calls[0] += 1
        return key(self)
    monkeypatch.setattr(S.DnsRecord, "key", counting_key)
    out = r.feed(data, ("192.0.2.9", 5353), 20.0)
    assert len(out) == 1 and r.counters["mdns_answers"] == 1      # still answered, once
    answer = S.parse_dns_message(out[0][0])
    assert sorted(S.read_dns_name(rec.rdata, 0)[0][0] for rec in answer.answers) == ["p%d on box" % i for i in range(4)]
    assert calls[0] < 20 * records, calls[0]
