"""protocol = modbus: the Modbus TCP to RTU gateway.  First its pure core
(CRC, MBAP decoding, RTU framing by length and by silence, the bus that
sends one request at a time), with time passed in; then the real sertcp.py
between pymodbus masters and slaves, a device emulator of the test's own,
and mbpoll."""
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, Peer

sys.path.insert(0, str(ROOT))
import sertcp as core  # noqa: E402  (the module under test)
from sertcp import mbap_frame, rtu_frame  # noqa: E402


A, B = Peer("A"), Peer("B")
READ_2 = bytes([3, 0, 0, 0, 2])                 # read holding registers 0-1
ANSWER_2 = bytes([3, 4, 0, 1, 0, 2])            # their values: 1, 2


def gateway(timeout=0.5, retries=0, gap=0.004, char_time=0.0, queue_limit=core.MODBUS_CLIENT_QUEUE):
    return core.ModbusGateway(timeout, retries, gap, char_time, queue_limit)


def kinds(actions):
    return [a[0] for a in actions]


# --- CRC and frames ------------------------------------------------------------

def test_crc_matches_the_published_check_values():
    assert core.modbus_crc(b"123456789") == bytes((0x37, 0x4B))          # CRC-16/MODBUS check 0x4B37
    assert core.modbus_crc(bytes.fromhex("01030000000A")) == bytes.fromhex("C5CD")   # the spec's example


def test_an_rtu_frame_is_unit_pdu_and_crc_low_byte_first():
    assert rtu_frame(1, READ_2) == bytes.fromhex("010300000002C40B")


def test_an_mbap_frame_carries_transaction_protocol_0_length_and_unit():
    assert mbap_frame(0x1234, 7, ANSWER_2) == bytes.fromhex("12340000000707") + ANSWER_2


# --- the frame gap ---------------------------------------------------------------

def test_the_gap_is_three_and_a_half_characters_of_the_line_settings():
    assert core.rtu_frame_gap(9600) == pytest.approx(3.5 * 10 / 9600)
    assert core.rtu_frame_gap(9600, 8, "even", "1") == pytest.approx(3.5 * 11 / 9600)
    assert core.rtu_frame_gap(19200, 8, "none", "2") == pytest.approx(3.5 * 11 / 19200)


def test_above_19200_baud_the_gap_is_fixed_at_1_75_ms():
    assert core.rtu_frame_gap(19201) == 0.00175
    assert core.rtu_frame_gap(115200, 8, "even", "2") == 0.00175


def test_modbus_frame_gap_ms_overrides_the_baud_rate():
    assert core.rtu_frame_gap(9600, gap_ms=20) == 0.020
    assert core.rtu_frame_gap(115200, gap_ms=0.5) == 0.0005


# --- reply lengths by function code ----------------------------------------------

@pytest.mark.parametrize("start, length", [
    (b"\x01", None),                    # too short to tell
    (b"\x01\x03", None),                # a read: the byte count is not there yet
    (b"\x01\x03\x04", 9),               # unit, function, count, 4 bytes, CRC
    (b"\x01\x01\x01", 6),
    (b"\x01\x06", 8), (b"\x01\x10", 8), (b"\x01\x05", 8), (b"\x01\x0f", 8),
    (b"\x01\x83", 5), (b"\x01\x90", 5),  # exceptions
    (b"\x01\x16", 10),                  # mask write register
    (b"\x01\x2b", None),                # encapsulated: only silence ends it
])
def test_the_function_code_tells_the_length_of_a_reply(start, length):
    assert core.rtu_reply_length(start) == length


# --- MBAP decoding ---------------------------------------------------------------

def test_mbap_requests_come_out_whole_however_the_stream_is_cut():
    decoder = core.MbapDecoder()
    stream = mbap_frame(1, 1, READ_2) + mbap_frame(2, 5, READ_2)
    events = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i:i + 1])
    assert events == [("request", 1, 1, READ_2), ("request", 2, 5, READ_2)]
    assert decoder.feed(stream) == events and decoder.pending() == 0


@pytest.mark.parametrize("frame, why", [
    (bytes.fromhex("0001 0001 0006 01") + READ_2, "protocol id 1"),
    (bytes.fromhex("0001 0000 0001 01"), "length 1 out of range 2-254"),
    (bytes.fromhex("0001 0000 00ff 01"), "length 255 out of range"),
    (bytes.fromhex("0001 0000 0000 01"), "length 0 out of range"),
])
def test_malformed_mbap_is_reported_once_and_nothing_after_it_is_read(frame, why):
    decoder = core.MbapDecoder()
    events = decoder.feed(mbap_frame(9, 1, READ_2) + frame + mbap_frame(10, 1, READ_2))
    assert events[0] == ("request", 9, 1, READ_2)
    assert events[1][0] == "malformed" and why in events[1][1] and len(events) == 2
    assert decoder.feed(mbap_frame(11, 1, READ_2)) == []


def test_a_truncated_frame_stays_pending():
    decoder = core.MbapDecoder()
    assert decoder.feed(mbap_frame(1, 1, READ_2)[:9]) == []
    assert decoder.pending() == 9


# --- RTU framing -------------------------------------------------------------------

def test_a_reply_ends_at_its_announced_length_without_waiting_for_silence():
    rtu = core.RtuAssembler(0.004)
    reply = rtu_frame(1, ANSWER_2)
    assert rtu.feed(reply[:4], 0.0) == []
    assert rtu.deadline() == 0.004
    assert rtu.feed(reply[4:] + b"\x01", 0.001) == [reply]  # the rest starts a new frame
    assert rtu.deadline() == 0.005


def test_silence_ends_a_frame_whose_length_is_unknown():
    rtu = core.RtuAssembler(0.004)
    frame = rtu_frame(1, b"\x2b\x0e\x01")
    assert rtu.feed(frame, 1.0) == []
    assert rtu.expire(1.0039) == []
    assert rtu.expire(1.004) == [frame]
    assert rtu.deadline() is None


def test_a_gap_before_a_read_ends_the_frame_before_it():
    rtu = core.RtuAssembler(0.004)
    assert rtu.feed(b"\x01\x2b\x00", 0.0) == []
    assert rtu.feed(b"\x01\x2b", 0.010) == [b"\x01\x2b\x00"]


# --- the bus -----------------------------------------------------------------------

def test_a_request_goes_out_as_rtu_and_its_reply_back_with_the_transaction_id():
    gw = gateway()
    assert gw.from_client(A, mbap_frame(0x4242, 1, READ_2), 0.0) == [("write", rtu_frame(1, READ_2))]
    assert gw.from_device(rtu_frame(1, ANSWER_2), 0.02) == [("reply", A, mbap_frame(0x4242, 1, ANSWER_2))]
    assert gw.bus.counters["replies"] == 1 and gw.bus.state == "idle"
    assert gw.bus.percentile(0.5) == pytest.approx(0.02)


def test_an_exception_from_the_device_is_a_reply_like_any_other():
    gw = gateway()
    gw.from_client(A, mbap_frame(3, 1, READ_2), 0.0)
    assert gw.from_device(rtu_frame(1, b"\x83\x02"), 0.01) == [("reply", A, mbap_frame(3, 1, b"\x83\x02"))]


def test_only_one_request_is_on_the_bus_and_the_queue_keeps_arrival_order():
    gw = gateway()
    assert kinds(gw.from_client(A, mbap_frame(1, 1, READ_2), 0.0)) == ["write"]
    assert gw.from_client(B, mbap_frame(7, 2, READ_2), 0.001) == []
    assert gw.from_client(A, mbap_frame(2, 3, READ_2), 0.002) == []
    assert gw.bus.depth() == 3
    assert gw.from_device(rtu_frame(1, ANSWER_2), 0.01) == [
        ("reply", A, mbap_frame(1, 1, ANSWER_2)), ("write", rtu_frame(2, READ_2))]
    assert gw.from_device(rtu_frame(2, ANSWER_2), 0.02) == [
        ("reply", B, mbap_frame(7, 2, ANSWER_2)), ("write", rtu_frame(3, READ_2))]


def test_no_answer_within_the_timeout_gives_exception_0x0b():
    gw = gateway(timeout=0.5)
    gw.from_client(A, mbap_frame(5, 1, READ_2), 10.0)
    assert gw.deadline() == 10.5
    assert gw.expire(10.499) == []
    assert gw.expire(10.5) == [("reply", A, mbap_frame(5, 1, b"\x83\x0b"))]
    assert gw.bus.counters["timeouts"] == 1 and gw.bus.counters["exceptions_sent"] == 1
    assert gw.deadline() is None


def test_the_timeout_counts_from_when_the_frame_is_on_the_line():
    gw = gateway(timeout=0.5, char_time=0.001)       # 8 bytes take 8 ms at this speed
    gw.from_client(A, mbap_frame(5, 1, READ_2), 0.0)
    assert gw.deadline() == pytest.approx(0.508)


def test_retries_send_the_request_again_before_anything_else():
    gw = gateway(timeout=0.5, retries=1)
    gw.from_client(A, mbap_frame(5, 1, READ_2), 0.0)
    gw.from_client(B, mbap_frame(6, 1, READ_2), 0.1)
    assert gw.expire(0.5) == [("write", rtu_frame(1, READ_2))]
    assert gw.from_device(rtu_frame(1, ANSWER_2), 0.6) == [
        ("reply", A, mbap_frame(5, 1, ANSWER_2)), ("write", rtu_frame(1, READ_2))]


@pytest.mark.parametrize("bad, counter", [
    (rtu_frame(1, ANSWER_2)[:-1] + b"\x00", "crc_errors"),      # bad CRC
    (rtu_frame(2, ANSWER_2), "bad_replies"),                    # another unit
    (rtu_frame(1, b"\x04\x02\x00\x01"), "bad_replies"),         # another function
    (b"\x01", "crc_errors"),                                    # a lone byte ended by silence
])
def test_a_bad_reply_counts_as_no_reply_retry_then_0x0b(bad, counter):
    gw = gateway(retries=1)
    gw.from_client(A, mbap_frame(5, 1, READ_2), 0.0)
    actions = gw.from_device(bad, 0.01) + gw.expire(0.02)
    assert actions == [("write", rtu_frame(1, READ_2))]
    actions = gw.from_device(bad, 0.03) + gw.expire(0.04)
    assert actions == [("reply", A, mbap_frame(5, 1, b"\x83\x0b"))]
    assert gw.bus.counters[counter] == 2 and gw.bus.counters["replies"] == 0


def test_a_broadcast_is_not_answered_and_holds_the_bus_for_the_turnaround():
    gw = gateway(gap=0.004)
    write = bytes([6, 0, 1, 0, 9])
    assert gw.from_client(A, mbap_frame(1, 0, write), 0.0) == [("write", rtu_frame(0, write))]
    assert gw.bus.state == "turnaround"
    assert gw.from_client(B, mbap_frame(2, 1, READ_2), 0.001) == []
    assert gw.deadline() == 0.004
    assert gw.expire(0.004) == [("write", rtu_frame(1, READ_2))]
    assert gw.bus.counters["broadcasts"] == 1


def test_device_bytes_nobody_asked_for_are_stray():
    gw = gateway()
    assert gw.from_device(rtu_frame(1, ANSWER_2), 0.0) == [
        ("stray", 9, "device sent 9 bytes with no request on the bus")]
    assert gw.expire(1.0) == []
    gw = gateway()
    assert gw.from_device(b"\x01\x2b", 0.0) == []
    assert kinds(gw.expire(0.004)) == ["stray"]


def test_while_the_device_is_not_open_a_request_gets_0x0a_at_once():
    gw = gateway()
    assert gw.from_client(A, mbap_frame(9, 1, READ_2), 0.0, available=False) == [
        ("reply", A, mbap_frame(9, 1, b"\x83\x0a"))]
    assert gw.from_client(A, mbap_frame(10, 0, READ_2), 0.0, available=False) == []   # a broadcast: no answer
    assert gw.bus.counters["unavailable"] == 2 and gw.bus.counters["exceptions_sent"] == 1
    assert gw.bus.depth() == 0 and gw.deadline() is None


def test_a_device_that_goes_answers_the_bus_and_the_queue_with_0x0a():
    gw = gateway()
    gw.from_client(A, mbap_frame(1, 1, READ_2), 0.0)
    gw.from_client(B, mbap_frame(2, 2, READ_2), 0.0)
    gw.from_client(A, mbap_frame(3, 0, READ_2), 0.0)
    assert gw.bus.device_gone() == [("reply", A, mbap_frame(1, 1, b"\x83\x0a")),
                                    ("reply", B, mbap_frame(2, 2, b"\x83\x0a"))]
    assert gw.bus.state == "idle" and gw.bus.depth() == 0 and gw.deadline() is None
    assert gw.bus.device_gone() == []
    # and the bus works again when the device is back
    assert gw.from_client(B, mbap_frame(4, 1, READ_2), 1.0) == [("write", rtu_frame(1, READ_2))]


def test_a_client_that_leaves_loses_its_queue_and_the_answer_on_the_bus():
    gw = gateway()
    gw.from_client(A, mbap_frame(1, 1, READ_2), 0.0)
    gw.from_client(A, mbap_frame(2, 1, READ_2), 0.0)
    gw.from_client(B, mbap_frame(3, 2, READ_2), 0.0)
    assert gw.client_gone(A) == 0
    assert gw.from_device(rtu_frame(1, ANSWER_2), 0.01) == [("write", rtu_frame(2, READ_2))]
    assert gw.bus.depth() == 1


def test_malformed_mbap_closes_that_client_only():
    gw = gateway()
    gw.from_client(A, mbap_frame(1, 1, READ_2), 0.0)
    actions = gw.from_client(B, b"\x00\x01\x00\x07\x00\x06\x01" + READ_2, 0.0)
    assert actions[0][:2] == ("close", B) and "protocol id 7" in actions[0][2]
    assert gw.from_device(rtu_frame(1, ANSWER_2), 0.01) == [("reply", A, mbap_frame(1, 1, ANSWER_2))]


def test_a_client_with_too_many_requests_waiting_is_flooding():
    gw = gateway(queue_limit=3)
    flood = b"".join(mbap_frame(i, 1, READ_2) for i in range(5))
    actions = gw.from_client(A, flood, 0.0)
    assert kinds(actions) == ["write", "flood"]   # one on the bus, three waiting, the fifth is too many
    assert gw.bus.depth() == 1                   # what it queued is gone
    assert kinds(gw.from_client(B, mbap_frame(9, 1, READ_2), 0.0)) == []


def test_a_truncated_frame_is_counted_when_its_client_leaves():
    gw = gateway()
    gw.from_client(A, mbap_frame(1, 1, READ_2)[:10], 0.0)
    assert gw.client_gone(A) == 10


def test_the_bus_table_knows_every_state():
    states = {s for s, _ in core.MODBUS_BUS_ON} | set(core.MODBUS_BUS_ON.values())
    assert states == {"idle", "waiting", "turnaround"}
    with pytest.raises(KeyError):
        core.ModbusBus(1, 0, 0.004)._move("reply")       # nothing to reply to while idle


# --- the property: every answer to the client that asked, with its id ---------------

def register_value(unit, address):
    return (unit * 1000 + address) & 0xFFFF


REQUESTS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 0xFFFF), st.integers(1, 247),
                              st.integers(0, 500)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(REQUESTS, st.integers(0, 2), st.data())
def test_any_interleaving_of_clients_gets_each_reply_to_its_client_and_transaction(requests, retries, data):
    clients = [Peer("c%d" % i) for i in range(4)]
    gw = gateway(timeout=0.5, retries=retries, gap=0.004, char_time=0.0001, queue_limit=100)
    got = {c: [] for c in clients}
    on_bus = []                         # RTU frames written, not yet acted on by the device
    expected_exceptions = 0
    now = 0.0

    def perform(actions):
        for action in actions:
            if action[0] == "write":
                on_bus.append(action[1])
            else:
                assert action[0] == "reply", action
                got[action[1]].append(action[2])
    waiting = list(requests)
    failures = {}                       # request frame -> failed tries in a row
    while waiting or on_bus:
        if waiting and (not on_bus or data.draw(st.booleans())):
            client, transaction, unit, address = waiting.pop(0)
            frame = mbap_frame(transaction, unit, bytes([3]) + address.to_bytes(2, "big") + b"\x00\x01")
            cut = data.draw(st.integers(0, len(frame)))       # a request may come in two reads
            perform(gw.from_client(clients[client], frame[:cut], now))
            perform(gw.from_client(clients[client], frame[cut:], now))
            continue
        request = on_bus.pop(0)
        unit, address = request[0], int.from_bytes(request[2:4], "big")
        behaviour = data.draw(st.sampled_from(["answer", "answer", "silent", "bad_crc", "wrong_unit"]))
        answer = rtu_frame(unit, b"\x03\x02" + register_value(unit, address).to_bytes(2, "big"))
        if behaviour == "silent":
            now = gw.deadline()
            before = gw.bus.counters["timeouts"]
            perform(gw.expire(now))
            assert gw.bus.counters["timeouts"] == before + 1
        else:
            if behaviour == "bad_crc":
                answer = answer[:-1] + bytes([answer[-1] ^ 0x55])
            elif behaviour == "wrong_unit":
                answer = rtu_frame(unit % 247 + 1, answer[1:-2])
            now += 0.001
            cut = data.draw(st.integers(0, len(answer)))
            perform(gw.from_device(answer[:cut], now))
            now += 0.001                # within the gap: one frame
            perform(gw.from_device(answer[cut:], now))
        if behaviour == "answer":
            failures.pop(request, None)
        else:
            failures[request] = failures.get(request, 0) + 1
            if failures[request] > retries:
                expected_exceptions += 1
                del failures[request]
    assert gw.bus.depth() == 0 and gw.deadline() is None
    exceptions = 0
    for i, client in enumerate(clients):
        asked = [(t, u, a) for c, t, u, a in requests if c == i]
        replies = got[client]
        assert len(replies) == len(asked)
        for (transaction, unit, address), reply in zip(asked, replies):
            assert reply[:2] == transaction.to_bytes(2, "big") and reply[6] == unit
            if reply[7] == 0x83:
                assert reply[8] == 0x0B
                exceptions += 1
            else:
                assert reply[7:] == b"\x03\x02" + register_value(unit, address).to_bytes(2, "big")
    assert exceptions == expected_exceptions == gw.bus.counters["exceptions_sent"]


# =====================================================================
# The real sertcp.py: pymodbus masters and slaves, an emulator, mbpoll
# =====================================================================

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from conftest import Client, free_port, http_get, need_programs, wait_for  # noqa: E402

SLAVE = ROOT / "tests" / "modbus_slave.py"


def slave_value(unit, register):
    """What tests/modbus_slave.py holds in a holding register."""
    return unit * 100 + register


def modbus_status(status_port):
    return json.loads(http_get(status_port, "/status")[1])["ports"][0]["modbus"]


@pytest.fixture
def gateway_to_slave(sertcp, tmp_path):
    """gateway_to_slave(*flags) -> (sertcp process, tcp port, status port,
    slave process): sertcp with protocol = modbus on a virtual port whose
    other end a pymodbus RTU slave (units 1 and 2) has open."""
    slaves = []

    def start(*flags, units="1,2"):
        port = free_port()
        status = free_port()
        while status == port:
            status = free_port()
        path = tmp_path / "meter"
        s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--protocol", "modbus",
                   "--max-clients", "8", *flags, "--virtual", path)
        s.wait_log(r"device \S+ opened")
        log = tmp_path / "slave.log"
        with open(log, "w") as errors:
            slave = subprocess.Popen([sys.executable, str(SLAVE), str(path), "9600", units],
                                     stdout=subprocess.PIPE, stderr=errors, text=True)
        slaves.append(slave)
        assert slave.stdout.readline() == "ready\n", log.read_text()
        s.wait_log("opened by a local program")
        s.wait_listening(port)
        return s, port, status, slave
    yield start
    for slave in slaves:
        slave.send_signal(signal.SIGCONT)
        slave.kill()
        slave.wait()


def master(port, timeout=5.0):
    from pymodbus.client import ModbusTcpClient
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=timeout, retries=0)
    assert client.connect()
    return client


def test_four_pymodbus_masters_polling_at_once_get_their_own_answers(gateway_to_slave):
    s, port, status, _ = gateway_to_slave()
    problems, counts = [], [0] * 4

    def poll(i):
        # master i reads unit 1 + i % 2, registers 10 i .. 10 i + 2, for 10 s
        unit, first = 1 + i % 2, 10 * i
        client = master(port)
        try:
            end = time.monotonic() + 10.0
            while time.monotonic() < end and counts[i] < 20000:
                address = first + counts[i] % 3
                reply = client.read_holding_registers(address, count=3, device_id=unit)
                want = [slave_value(unit, address + k) for k in range(3)]
                if reply.isError() or reply.registers != want or reply.dev_id != unit:
                    problems.append((i, address, reply))
                    return
                counts[i] += 1
        finally:
            client.close()
    threads = [threading.Thread(target=poll, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    assert not problems, problems
    assert min(counts) >= 20, counts           # every master got a fair share of the bus
    stats = modbus_status(status)
    assert stats["requests"] == stats["replies"] == sum(counts)
    assert stats["timeouts"] == stats["crc_errors"] == stats["exceptions_sent"] == 0
    assert stats["round_trip_p50_ms"] is not None and stats["round_trip_p99_ms"] >= stats["round_trip_p50_ms"]
    print("4 masters: %d requests in %.1fs, %.0f/s; bus p50 %.2f ms, p99 %.2f ms"
          % (sum(counts), elapsed, sum(counts) / elapsed, stats["round_trip_p50_ms"], stats["round_trip_p99_ms"]))


def test_a_slave_that_stops_answering_gives_0x0b_within_the_timeout(gateway_to_slave):
    s, port, status, slave = gateway_to_slave("--modbus-timeout-ms", "300")
    client = master(port)
    assert client.read_holding_registers(4, count=1, device_id=1).registers == [slave_value(1, 4)]
    slave.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    reply = client.read_holding_registers(4, count=1, device_id=1)
    took = time.monotonic() - started
    assert reply.isError() and reply.exception_code == 0x0B
    assert 0.29 <= took < 0.3 + 2.0, took
    assert modbus_status(status)["timeouts"] == 1
    metrics = http_get(status, "/metrics")[1]
    assert re.search(r'^sertcp_modbus_timeouts_total\{port="cli"\} 1$', metrics, re.M)
    assert re.search(r'^sertcp_modbus_exceptions_sent_total\{port="cli"\} 1$', metrics, re.M)
    client.close()


def test_broadcast_writes_reach_every_unit_and_get_no_answer(gateway_to_slave):
    # timeouts must stay 0: a slave slowed by a loaded machine gets 3 s, not 1
    s, port, status, _ = gateway_to_slave("--modbus-timeout-ms", "3000")
    client = master(port)
    assert client.write_register(7, 4321, device_id=0, no_response_expected=True) is None
    for unit in (1, 2):
        assert wait_for(lambda: client.read_holding_registers(7, count=1, device_id=unit).registers == [4321],
                        message="unit %d to hold the broadcast value" % unit)
    stats = modbus_status(status)
    assert stats["broadcasts"] == 1 and stats["timeouts"] == 0 and stats["bus_state"] == "idle"
    client.close()


def test_a_client_sending_malformed_mbap_is_closed_while_the_others_go_on(gateway_to_slave):
    s, port, status, _ = gateway_to_slave()
    running, problems, done = threading.Event(), [], [0]
    running.set()

    def poll():
        client = master(port)
        try:
            while running.is_set() and done[0] < 100000:
                reply = client.read_holding_registers(1, count=2, device_id=2)
                if reply.isError() or reply.registers != [slave_value(2, 1), slave_value(2, 2)]:
                    problems.append(reply)
                    return
                done[0] += 1
        finally:
            client.close()
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_for(lambda: done[0] >= 5, message="the good master polling")
        for bad in (bytes.fromhex("0001 0003 0006 01") + READ_2,      # protocol id 3
                    bytes.fromhex("0002 0000 0400 01") + READ_2):      # length 1024
            evil = Client(port)
            evil.send(bad)
            assert evil.closed_by_peer()
        s.wait_log(r"malformed Modbus TCP frame: protocol id 3")
        s.wait_log(r"malformed Modbus TCP frame: length 1024 out of range 2-254")
        before = done[0]
        wait_for(lambda: done[0] >= before + 5, message="the good master to go on")
    finally:
        running.clear()
        poller.join(30)
    assert not problems, problems


def test_a_client_flooding_requests_is_cut_off_and_the_others_are_served(gateway_to_slave):
    s, port, status, _ = gateway_to_slave()
    flood = Client(port)
    flood.send(b"".join(mbap_frame(i, 1, READ_2) for i in range(2 * core.MODBUS_CLIENT_QUEUE)))
    assert flood.closed_by_peer()
    s.wait_log("flooding: more than %d Modbus requests waiting" % core.MODBUS_CLIENT_QUEUE)
    client = master(port)
    assert client.read_holding_registers(0, count=1, device_id=1).registers == [slave_value(1, 0)]
    client.close()


def test_mbpoll_as_a_master(gateway_to_slave):
    need_programs("mbpoll")
    s, port, status, slave = gateway_to_slave("--modbus-timeout-ms", "300")
    out = subprocess.run(["mbpoll", "-m", "tcp", "-a", "2", "-t", "4", "-0", "-r", "3", "-c", "4", "-1",
                          "-o", "5", "-p", str(port), "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    values = dict(re.findall(r"^\[(\d+)\]:\s+(-?\d+)$", out.stdout, re.M))
    assert values == {str(r): str(slave_value(2, r)) for r in range(3, 7)}, out.stdout
    # a slave that stopped answering: mbpoll reports the gateway's exception
    slave.send_signal(signal.SIGSTOP)
    out = subprocess.run(["mbpoll", "-m", "tcp", "-a", "2", "-t", "4", "-r", "1", "-1", "-o", "5",
                          "-p", str(port), "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "failed to respond" in out.stderr, out.stdout + out.stderr


# --- a device emulator of the test's own: what a pymodbus slave will not do --------

@pytest.fixture
def gateway_to_emulator(sertcp, pty):
    def start(*flags):
        port, status = free_port(), free_port()
        while status == port:
            status = free_port()
        s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--protocol", "modbus",
                   "--max-clients", "4", *flags, pty.path)
        s.wait_log(r"device \S+ opened")
        s.wait_listening(port)
        return s, port, status
    return start


def recv_exactly(client, n):
    data = client.recv(n)
    assert len(data) == n, data
    return data


def test_a_corrupted_crc_gives_a_retry_then_0x0b(gateway_to_emulator, pty):
    s, port, status = gateway_to_emulator("--modbus-retries", "1", "--modbus-timeout-ms", "2000")
    c = Client(port)
    c.send(mbap_frame(0xBEEF, 1, READ_2))
    corrupt = rtu_frame(1, ANSWER_2)[:-2] + b"\x00\x00"
    started = time.monotonic()
    for _ in range(2):
        assert pty.read(8) == rtu_frame(1, READ_2)
        pty.write(corrupt)
    assert recv_exactly(c, 9) == mbap_frame(0xBEEF, 1, b"\x83\x0b")
    assert time.monotonic() - started < 2.0     # a bad reply is no reply at once, not a wait for the timeout
    stats = modbus_status(status)
    assert stats["crc_errors"] == 2 and stats["exceptions_sent"] == 1 and stats["replies"] == 0


def test_a_good_reply_after_a_bad_one_is_passed_on(gateway_to_emulator, pty):
    s, port, status = gateway_to_emulator("--modbus-retries", "2")
    c = Client(port)
    c.send(mbap_frame(17, 1, READ_2))
    assert pty.read(8) == rtu_frame(1, READ_2)
    pty.write(rtu_frame(3, ANSWER_2))           # another unit: no reply
    assert pty.read(8) == rtu_frame(1, READ_2)
    pty.write(rtu_frame(1, ANSWER_2))
    assert recv_exactly(c, 13) == mbap_frame(17, 1, ANSWER_2)
    stats = modbus_status(status)
    assert stats["bad_replies"] == 1 and stats["replies"] == 1


def test_a_reply_in_pieces_within_the_gap_is_one_frame(gateway_to_emulator, pty):
    s, port, status = gateway_to_emulator("--modbus-frame-gap-ms", "200")
    c = Client(port)
    c.send(mbap_frame(1, 1, b"\x2b\x0e\x01\x00"))   # read device id: only silence ends its reply
    assert pty.read(7) == rtu_frame(1, b"\x2b\x0e\x01\x00")
    reply = rtu_frame(1, b"\x2b\x0e\x01\x01\x00\x00\x01\x00\x03abc")
    pty.write(reply[:5])
    time.sleep(0.05)                # a pause shorter than the gap (the thing under test)
    pty.write(reply[5:])
    assert recv_exactly(c, 6 + len(reply) - 2) == mbap_frame(1, 1, reply[1:-2])


def test_a_device_that_is_not_open_gives_0x0a_without_waiting_for_the_timeout(sertcp, tmp_path, pty):
    port, status = free_port(), free_port()
    while status == port:
        status = free_port()
    link = tmp_path / "ttyRTU"
    os.symlink(pty.path, str(link))
    s = sertcp("--listen", "127.0.0.1:%d" % port, "--status", "127.0.0.1:%d" % status, "--protocol", "modbus",
               "--modbus-timeout-ms", "5000", "--reopen-interval", "0.2", str(link))
    s.wait_log(r"device \S+ opened")
    c = Client(port)
    c.send(mbap_frame(1, 1, READ_2))
    assert pty.read(8) == rtu_frame(1, READ_2)  # on the bus, waiting for an answer
    os.symlink("/nonexistent-rtu-device", str(link) + ".new")
    os.replace(str(link) + ".new", str(link))   # unplugged: the link points nowhere
    pty.close()
    started = time.monotonic()
    assert recv_exactly(c, 9) == mbap_frame(1, 1, b"\x83\x0a")
    c.send(mbap_frame(2, 1, READ_2))            # and while it stays away
    assert recv_exactly(c, 9) == mbap_frame(2, 1, b"\x83\x0a")
    assert time.monotonic() - started < 2.5     # not the 5 s timeout
    stats = modbus_status(status)
    assert stats["unavailable"] == 2 and stats["timeouts"] == 0


def test_device_bytes_nobody_asked_for_are_dropped_and_counted(gateway_to_emulator, pty):
    s, port, status = gateway_to_emulator()
    c = Client(port)
    pty.write(rtu_frame(1, ANSWER_2))
    wait_for(lambda: json.loads(http_get(status, "/status")[1])["ports"][0]["bytes_dropped"] == 9,
             message="9 stray bytes counted")
    assert c.recv_available() == b""


def test_modbus_keys_need_protocol_modbus_and_exclude_packing():
    from conftest import run_sertcp
    out = run_sertcp(["--check", "--listen", "7000", "--modbus-retries", "2", "/dev/ttyUSB0"])
    assert out.returncode == 2 and "modbus_* keys need protocol = modbus" in out.stderr
    out = run_sertcp(["--check", "--listen", "7000", "--protocol", "modbus", "--pack-idle-ms", "5", "/dev/ttyUSB0"])
    assert out.returncode == 2 and "remove the pack_* keys" in out.stderr
    out = run_sertcp(["--check", "--listen", "7000", "--protocol", "modbus", "--banner", "hello", "/dev/ttyUSB0"])
    assert out.returncode == 2 and "would break the Modbus TCP stream" in out.stderr
    out = run_sertcp(["--check", "--listen", "7000", "--protocol", "modbus", "--modbus-frame-gap-ms", "1.75",
                      "/dev/ttyUSB0"])
    assert out.returncode == 0, out.stderr


def test_a_modbus_port_imports_nothing_heavy(pty, tmp_path):
    from test_ops import HEAVY, imported_modules
    port = free_port()
    names = imported_modules([pty.path, "--listen", "127.0.0.1:%d" % port, "--protocol", "modbus"], tmp_path, port)
    assert not (names & HEAVY), sorted(names & HEAVY)


def test_modbus_metrics_pass_promtool_check(gateway_to_emulator, pty):
    import shutil
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus"
    s, port, status = gateway_to_emulator()
    c = Client(port)
    c.send(mbap_frame(1, 1, READ_2))
    assert pty.read(8) == rtu_frame(1, READ_2)
    pty.write(rtu_frame(1, ANSWER_2))
    assert recv_exactly(c, 13) == mbap_frame(1, 1, ANSWER_2)
    text = http_get(status, "/metrics")[1]
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert (check.returncode, check.stdout + check.stderr) == (0, ""), text
    assert 'sertcp_modbus_requests_total{port="cli"} 1' in text
    assert 'sertcp_modbus_replies_total{port="cli"} 1' in text
    assert 'sertcp_modbus_queue_depth{port="cli"} 0' in text
    assert re.search(r'^sertcp_modbus_round_trip_p99_seconds\{port="cli"\} 0\.\d+$', text, re.M), text
