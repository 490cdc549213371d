"""Unit tests of the small pure cores the port and the gate are built on:
which clients send_to / receive_from select, the buffer that holds device
data while nobody is connected, the wrong-password counter, the allow list
match, and the status endpoint's request line.  No processes, no sockets;
time is passed in."""
import sys

import pytest

from conftest import ROOT, Peer

sys.path.insert(0, str(ROOT))
import sertcp as core  # noqa: E402  (the module under test)


# --- send_to / receive_from: the client-selection policies --------------------

OLDEST, MIDDLE, NEWEST = Peer("oldest"), Peer("middle"), Peer("newest")
CLIENTS = [OLDEST, MIDDLE, NEWEST]         # in the order they connected

# send_to: (policy, the client that sent last or None) -> who gets device data
SEND_TO = [
    ("all", None, [OLDEST, MIDDLE, NEWEST]),
    ("all", MIDDLE, [OLDEST, MIDDLE, NEWEST]),
    ("first", MIDDLE, [OLDEST]),
    ("last", MIDDLE, [NEWEST]),
    ("last_active", MIDDLE, [MIDDLE]),
    ("last_active", None, [NEWEST]),        # nobody has sent yet: the newest
    ("none", MIDDLE, []),
]

# receive_from: policy -> the clients whose data reaches the device
RECEIVE_FROM = [
    ("all", [OLDEST, MIDDLE, NEWEST]),
    ("first", [OLDEST]),
    ("last", [NEWEST]),
    ("last_active", [OLDEST, MIDDLE, NEWEST]),   # whoever sends becomes the active one
    ("none", []),
]


@pytest.mark.parametrize("policy, active, chosen", SEND_TO)
def test_send_to_chooses(policy, active, chosen):
    assert list(core.choose_clients(policy, CLIENTS, active)) == chosen


@pytest.mark.parametrize("policy", ["all", "first", "last", "last_active", "none"])
def test_send_to_without_clients_chooses_nobody(policy):
    assert list(core.choose_clients(policy, [], None)) == []


def test_send_to_first_moves_on_when_the_oldest_leaves():
    assert list(core.choose_clients("first", [MIDDLE, NEWEST], None)) == [MIDDLE]


def test_send_to_an_unknown_policy_is_a_bug_not_a_silence():
    with pytest.raises(ValueError):
        core.choose_clients("oldest", CLIENTS, None)


@pytest.mark.parametrize("policy, heard", RECEIVE_FROM)
def test_receive_from_hears(policy, heard):
    # the port asks with the sender as the active client (it just sent)
    assert [c for c in CLIENTS if core.client_selected(policy, c, CLIENTS)] == heard


@pytest.mark.parametrize("policy", ["first", "last", "last_active", "none"])
def test_receive_from_without_clients_hears_nobody(policy):
    assert not core.client_selected(policy, OLDEST, [])


def test_receive_from_last_moves_back_when_the_newest_leaves():
    assert core.client_selected("last", MIDDLE, [OLDEST, MIDDLE])
    assert not core.client_selected("last", OLDEST, [OLDEST, MIDDLE])


# --- ByteBuffer: device data held while nobody is connected --------------------

def test_buffer_holds_what_fits_and_take_empties_it():
    b = core.ByteBuffer(10)
    assert b.add(b"0123") == 0 and b.add(b"456789") == 0 and len(b) == 10
    assert b.take() == b"0123456789" and len(b) == 0 and b.take() == b""


def test_buffer_of_zero_drops_everything_and_counts_it():
    b = core.ByteBuffer(0)
    assert b.add(b"abc") == 3 and len(b) == 0


def test_buffer_takes_an_empty_chunk():
    b = core.ByteBuffer(2)
    assert b.add(b"") == 0 and b.add(b"ab") == 0 and b.add(b"") == 0


def test_buffer_drop_newest_keeps_the_first_bytes():
    b = core.ByteBuffer(5, "newest")
    assert b.add(b"0123") == 0 and b.add(b"456") == 2
    assert b.add(b"xy") == 2 and b.take() == b"01234"


def test_buffer_drop_newest_with_a_chunk_larger_than_the_limit():
    b = core.ByteBuffer(5, "newest")
    assert b.add(b"0123456789") == 5 and b.take() == b"01234"


def test_buffer_drop_oldest_keeps_the_last_bytes():
    b = core.ByteBuffer(5, "oldest")
    assert b.add(b"0123") == 0 and b.add(b"456") == 2
    assert b.add(b"xy") == 2 and b.take() == b"456xy"


def test_buffer_drop_oldest_with_a_chunk_larger_than_the_limit():
    b = core.ByteBuffer(5, "oldest")
    assert b.add(b"ab") == 0 and b.add(b"0123456789") == 7
    assert b.take() == b"56789"


def test_buffer_fills_again_after_take():
    b = core.ByteBuffer(3, "newest")
    assert b.add(b"abcd") == 1 and b.take() == b"abc"
    assert b.add(b"defg") == 1 and b.take() == b"def"


# --- FailedPasswords: wrong passwords block an address -------------------------

FAILURES, WINDOW, BLOCK = core.PASSWORD_FAILURES, core.PASSWORD_WINDOW, core.PASSWORD_BLOCK


def fail_times(f, host, times):
    """Record a failure at each time; what the last one returned."""
    return [f.failed(host, t) for t in times][-1]


def test_five_wrong_passwords_in_a_minute_then_refused_for_a_minute():
    # what the README promises (a wrong one answered after 1 s); the tests
    # below are written in these names
    assert (FAILURES, WINDOW, BLOCK, core.WRONG_PASSWORD_DELAY) == (5, 60.0, 60, 1.0)


def test_fewer_failures_than_the_limit_do_not_block():
    f = core.FailedPasswords()
    assert fail_times(f, "10.0.0.1", [0, 1, 2, 3][:FAILURES - 1]) is False
    assert not f.is_blocked("10.0.0.1", 4)


def test_the_last_failure_in_the_window_blocks_that_address_only():
    f = core.FailedPasswords()
    assert fail_times(f, "10.0.0.1", [10 * i for i in range(FAILURES)]) is True
    assert f.is_blocked("10.0.0.1", 40) and not f.is_blocked("10.0.0.2", 40)


def test_the_block_ends_after_its_time():
    f = core.FailedPasswords()
    fail_times(f, "10.0.0.1", [100] * FAILURES)
    assert f.is_blocked("10.0.0.1", 100 + BLOCK - 0.001)
    assert not f.is_blocked("10.0.0.1", 100 + BLOCK)


def test_failures_older_than_the_window_are_forgotten():
    f = core.FailedPasswords()
    assert fail_times(f, "10.0.0.1", [0] + [WINDOW - 1] * (FAILURES - 2) + [WINDOW]) is False
    assert fail_times(f, "10.0.0.1", [WINDOW + 0.5]) is True


def test_failures_just_inside_the_window_all_count():
    f = core.FailedPasswords()
    assert fail_times(f, "10.0.0.1", [0] * (FAILURES - 1) + [WINDOW - 0.001]) is True


def test_after_a_block_the_count_starts_again():
    f = core.FailedPasswords()
    fail_times(f, "10.0.0.1", [0] * FAILURES)
    assert not f.is_blocked("10.0.0.1", BLOCK) and f.failed("10.0.0.1", BLOCK) is False


def test_memory_of_failures_is_bounded():
    f = core.FailedPasswords()
    for n in range(10000):
        f.failed("10.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255), 0)
    assert len(f.failures) <= 4096


# --- host_allowed: the allow list ----------------------------------------------

def allowed(allow, host):
    return core.host_allowed(core.parse_allow(allow), host)


@pytest.mark.parametrize("allow, host, verdict", [
    ("127.0.0.2", "127.0.0.2", True),
    ("127.0.0.2", "127.0.0.3", False),
    ("10.0.0.0/8", "10.255.1.2", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("192.168.1.77/24", "192.168.1.200", True),      # host bits are ignored, not an error
    ("10.0.0.0/8, 127.0.0.8/29", "127.0.0.15", True),
    ("10.0.0.0/8, 127.0.0.8/29", "127.0.0.16", False),
    ("::1", "::1", True),
    ("::1", "::2", False),
    ("2001:db8::/32", "2001:db8:ffff::1", True),
    ("2001:db8::/32", "2001:db9::1", False),
    ("fe80::/10", "fe80::1%eth0", True),             # a link-local peer's scope id
    ("127.0.0.2", "::ffff:127.0.0.2", True),         # IPv4 peer on a dual-stack listener
    ("127.0.0.2", "::ffff:127.0.0.3", False),
    ("0.0.0.0/0", "::1", False),                     # IPv4 networks do not admit IPv6 peers
    ("::/0", "127.0.0.1", False),                    # nor the other way round
    ("::/0, 0.0.0.0/0", "127.0.0.1", True),
])
def test_host_allowed(allow, host, verdict):
    assert allowed(allow, host) is verdict


@pytest.mark.parametrize("host", ["", "localhost", "127.0.0.256", "::ffff:zz", "%eth0"])
def test_a_peer_that_is_not_an_address_is_not_allowed(host):
    assert allowed("0.0.0.0/0, ::/0", host) is False


@pytest.mark.parametrize("allow", ["", " , ", "localhost", "10.0.0.0/33", "::1/129", "10.0.0.1-10.0.0.9"])
def test_an_allow_list_that_is_not_addresses_is_refused(allow):
    with pytest.raises(core.ValueProblem):
        core.parse_allow(allow)


# --- parse_http_head: the status endpoint's request line --------------------

@pytest.mark.parametrize("head, method_and_path", [
    (b"GET /status HTTP/1.0", ("GET", "/status")),
    (b"HEAD /metrics HTTP/1.1", ("HEAD", "/metrics")),
    (b"GET /metrics?name[]=x HTTP/1.1", ("GET", "/metrics")),    # the query is ignored
    (b"GET /status HTTP/1.1\r\nHost: a\r\nAccept: */*", ("GET", "/status")),
    (b"GET /status HTTP/1.0\nHost: a", ("GET", "/status")),       # bare LF line ends
])
def test_http_request_line(head, method_and_path):
    request = core.parse_http_head(head)
    assert (request.method, request.path) == method_and_path


@pytest.mark.parametrize("head", [
    b"", b"garbage", b"GET /status", b"GET /status HTTP/2", b"GET /status FTP/1.0",
    b"GET  /status HTTP/1.0", b"GET /status HTTP/1.0 extra", b"\xff\xfe\x00",
    b"\r\nGET /status HTTP/1.0",
])
def test_a_malformed_request_line_is_400(head):
    with pytest.raises(core.HttpProblem) as e:
        core.parse_http_head(head)
    assert (e.value.code, e.value.reason) == (400, "Bad Request")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "CONNECT", "get"])
def test_a_method_other_than_get_head_or_post_is_405(method):
    with pytest.raises(core.HttpProblem) as e:
        core.parse_http_head(method.encode() + b" /status HTTP/1.1")
    assert (e.value.code, e.value.reason) == (405, "Method Not Allowed")


def test_a_long_request_line_is_parsed_whole():
    # the reader bounds the head (STATUS_REQUEST_LIMIT, 431) before this sees it
    path = "/" + "a" * 2 * core.STATUS_REQUEST_LIMIT
    assert core.parse_http_head(b"GET " + path.encode() + b" HTTP/1.0").path == path
