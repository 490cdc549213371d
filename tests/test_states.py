"""The port's state machines as pure cores: the device's life, the one
back-pressure rule, admission, and the client role's dial plan.  Each
transition is a short test; no process, no socket."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sertcp  # noqa: E402

from sertcp import DialPlan, admission, device_should_pause, device_state_after  # noqa: E402


# -- the device's life --

@pytest.mark.parametrize("state, event, after", [
    ("closed", "open", "opening"),
    ("missing", "open", "opening"),
    ("opening", "opened", "open"),
    ("opening", "failed", "missing"),
    ("open", "lost", "missing"),
    ("open", "close", "closed"),
    ("opening", "close", "closed"),
    ("missing", "close", "closed"),
    ("closed", "close", "closed"),
])
def test_device_transitions(state, event, after):
    assert device_state_after(state, event) == after


@pytest.mark.parametrize("state, event", [("open", "open"), ("closed", "opened"), ("missing", "lost"),
                                          ("closed", "lost"), ("open", "failed")])
def test_device_transitions_that_cannot_happen(state, event):
    with pytest.raises(ValueError):
        device_state_after(state, event)


def test_every_device_state_can_be_closed():
    assert {s for s, e in sertcp.DEVICE_STATE_ON if e == "close"} == {"closed", "opening", "open", "missing"}


# -- back-pressure: one rule --

def test_no_recipient_never_pauses_the_device():
    assert device_should_pause([], False, 100) is False
    assert device_should_pause([], True, 100) is False      # the stalled client left: read again


def test_pauses_only_when_every_recipient_is_behind():
    assert device_should_pause([100, 100], False, 100) is True
    assert device_should_pause([100, 99], False, 100) is False
    assert device_should_pause([5000, 0], False, 100) is False   # one stalled client slows nobody


def test_paused_device_resumes_below_half():
    assert device_should_pause([50], True, 100) is True
    assert device_should_pause([49], True, 100) is False
    assert device_should_pause([99], False, 100) is False


# -- admission --

def test_admission_accepts_while_there_is_room():
    assert admission(0, 1, "reject", True) == "accept"
    assert admission(2, 3, "kick_oldest", True) == "accept"


def test_admission_when_full():
    assert admission(1, 1, "reject", True).startswith("refuse: full")
    assert admission(1, 1, "kick_oldest", True) == "kick_oldest"


def test_admission_while_the_virtual_port_is_closed():
    assert admission(0, 4, "kick_oldest", False).startswith("refuse: not open")


# -- the dial plan: every transition --

def plan(peers=2, on_data=False):
    return DialPlan(peers, 1.0, 8.0, on_data=on_data)


def at(state, **kw):
    p = plan(**kw)
    p.state = state
    return p


def test_wanted_resolves_the_first_peer():
    p = at("gathering")
    p.peer = 1
    assert p.handle("wanted") == [("resolve", 0)] and p.state == "resolving"


def test_resolved_connects():
    p = at("resolving")
    assert p.handle("resolved") == [("connect",)] and p.state == "connecting"


@pytest.mark.parametrize("state", ["resolving", "connecting"])
def test_a_failed_peer_moves_to_the_next(state):
    p = at(state)
    assert p.handle("peer_failed") == [("resolve", 1)] and p.state == "resolving" and p.peer == 1


@pytest.mark.parametrize("state", ["resolving", "connecting"])
def test_the_last_peer_failing_ends_the_round_with_back_off(state):
    p = at(state)
    p.peer = 1
    assert p.handle("peer_failed", entropy=0.0) == [("back_off", 1.0, 1)]
    assert p.state == "waiting" and p.failures == 1


def test_back_off_doubles_up_to_the_maximum():
    p = plan(peers=1)
    waits = []
    for _ in range(6):
        p.state = "resolving"
        waits.append(p.handle("peer_failed", entropy=0.0)[0][1])
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_up_admits():
    p = at("connecting")
    assert p.handle("up") == [("admit",)] and p.state == "connected"


def test_place_taken_by_an_incoming_client():
    p = at("connecting")
    assert p.handle("place_taken") == [] and p.state == "gathering"


def test_our_own_hang_up_is_no_failure():
    p = at("connected")
    p.failures = 3
    assert p.handle("we_hung_up", held=False) == [("dial_if_wanted",)]
    assert p.state == "gathering" and p.failures == 0


def test_peer_hang_up_after_a_real_session_redials_after_reconnect_min():
    p = at("connected")
    p.failures = 3
    assert p.handle("peer_hung_up", held=True) == [("wait", 1.0)]
    assert p.state == "waiting" and p.failures == 0


def test_peer_hang_up_without_a_word_is_a_failed_round():
    p = at("connected")
    assert p.handle("peer_hung_up", held=False, entropy=0.0) == [("back_off", 1.0, 1)]
    assert p.state == "waiting"


def test_peer_hang_up_on_an_event_bytes_port_waits_for_device_data():
    p = at("connected", on_data=True)
    assert p.handle("peer_hung_up", held=False) == [("dial_if_wanted",)] and p.state == "gathering"


def test_jitter_takes_up_to_a_fifth_off_the_back_off():
    p = plan(peers=1)
    for _ in range(3):
        p.state = "resolving"
        action = p.handle("peer_failed", entropy=1.0)
    assert action == [("back_off", 4.0 * 0.8, 3)]


@pytest.mark.parametrize("event, held, on_data, refined", [
    ("peer_hung_up", True, False, "peer_hung_up"),
    ("peer_hung_up", False, False, "peer_hung_up_silent"),
    ("peer_hung_up", False, True, "peer_hung_up_on_data"),
    ("we_hung_up", False, False, "we_hung_up"),
])
def test_refine_tells_the_hang_ups_apart(event, held, on_data, refined):
    assert plan(on_data=on_data).refine(event, held) == refined


def test_timer_ends_the_wait():
    p = at("waiting")
    assert p.handle("timer") == [("dial_if_wanted",)] and p.state == "gathering"


@pytest.mark.parametrize("state", ["gathering", "resolving", "connecting", "connected", "waiting"])
def test_stop_from_anywhere(state):
    p = at(state)
    assert p.handle("stop") == [] and p.state == "off"


@pytest.mark.parametrize("state, event", [("gathering", "up"), ("waiting", "resolved"), ("off", "wanted"),
                                          ("connected", "timer"), ("gathering", "we_hung_up")])
def test_events_that_cannot_happen_are_bugs(state, event):
    with pytest.raises(ValueError):
        at(state).handle(event)


def test_the_table_names_only_known_steps():
    steps = {step for _, steps in DialPlan.TABLE.values() for step in steps}
    assert steps <= {"first_peer", "next_peer", "reset", "failed_round", "back_off", "wait_min", "resolve",
                     "connect", "admit", "dial_if_wanted"}
