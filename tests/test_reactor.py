"""Unit tests of the reactor: timers fire in order, a cancelled timer lets
go of what its callback holds at once, the heap does not fill with
cancelled timers, and descriptors are dispatched to their handlers."""
import gc
import os
import socket
import sys
import weakref

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from sertcp import Reactor  # noqa: E402


class Held:
    """Stands for a connection with its buffers."""


def test_timers_fire_in_deadline_order_and_cancelled_ones_never():
    r = Reactor()
    fired = []
    now = r.now()
    for delay, name in ((0.03, "c"), (0.01, "a"), (0.02, "b")):
        r.call_at(now + delay, lambda name=name: fired.append(name))
    r.call_at(now + 0.015, lambda: fired.append("cancelled")).cancel()
    while len(fired) < 3:
        r.run_once(max_wait=1.0)
    assert fired == ["a", "b", "c"]
    assert r.timers == []


def test_cancelled_timer_releases_its_callback_while_a_later_one_waits():
    r = Reactor()
    r.call_later(3600, lambda: None)        # a live timer at the top of the heap
    refs = []
    for _ in range(1000):
        held = Held()
        refs.append(weakref.ref(held))
        r.call_later(60, lambda held=held: held).cancel()
        del held
    gc.collect()
    assert not any(ref() is not None for ref in refs), "cancelled timers keep their objects alive"
    # and the heap is rebuilt without them instead of growing
    assert len(r.timers) < 200, len(r.timers)
    r.run_once(max_wait=0)                  # the loop still runs with what is left
    assert any(not t.cancelled for t in r.timers)


def test_cancel_after_firing_changes_nothing():
    r = Reactor()
    fired = []
    timer = r.call_later(0, lambda: fired.append(1))
    r.run_once(max_wait=0)
    timer.cancel()
    assert fired == [1] and r.cancelled_timers == 0


def test_handlers_get_their_events_and_forget_stops_them():
    r = Reactor()
    a, b = socket.socketpair()
    a.setblocking(False)
    events = []

    class Handler:
        watched = 0

        def fileno(self):
            return a.fileno()

        def on_readable(self):
            events.append(a.recv(100))

        def on_writable(self):
            events.append("writable")
            r.set_interest(self, True, False)

    h = Handler()
    r.set_interest(h, True, True)
    r.run_once(max_wait=1.0)
    assert events == ["writable"]
    b.send(b"ping")
    r.run_once(max_wait=1.0)
    assert events[-1] == b"ping"
    r.forget(h)
    b.send(b"unseen")
    r.run_once(max_wait=0.05)
    assert events[-1] == b"ping" and a.fileno() not in r.handlers
    a.close()
    b.close()


def test_a_thread_wakes_the_loop():
    r = Reactor()
    done = []
    import threading
    t = threading.Thread(target=lambda: r.call_soon_threadsafe(lambda: done.append(os.getpid())))
    t.start()
    t.join()
    started = r.now()
    r.run_once(max_wait=5.0)
    assert done == [os.getpid()]
    # the wake-up ended the wait, not the 5 s bound
    assert r.now() - started < 1.0


def test_forget_after_the_socket_closed_leaves_nothing_behind():
    """A closed socket's fileno() is -1: the reactor still finds and drops
    the handler (else it would be kept, and its fd number refused later)."""
    r = Reactor()
    for _ in range(3):                  # the same fd number comes back each time
        a, b = socket.socketpair()

        class Handler:
            watched = 0

            def fileno(self):
                return a.fileno()

        h = Handler()
        r.set_interest(h, True, False)
        a.close()
        r.forget(h)
        b.close()
        assert r.handlers == {} and h.watched == 0


def test_run_keeps_going_until_interrupted_even_from_a_signal():
    """run() dispatches round after round in one call; interrupt() (what
    the signal handler calls) ends it after the round in progress, also
    while it waits in epoll with nothing else to do."""
    import signal
    r = Reactor()
    ticks = []

    def tick():
        ticks.append(r.now())
        if len(ticks) < 5:
            r.call_later(0.001, tick)
        else:
            # nothing is left to wake the loop: only the signal can
            signal.setitimer(signal.ITIMER_REAL, 0.05)

    old = signal.signal(signal.SIGALRM, lambda signum, frame: r.interrupt())
    try:
        r.call_later(0, tick)
        r.call_later(10.0, r.interrupt)      # a bound, should the signal not wake it
        started = r.now()
        r.run()
        assert len(ticks) == 5
        assert r.now() - started < 5.0
        assert r.interrupted is False        # consumed: the next run() waits again
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Raising:
    """A handler with a bug: on_readable raises once data arrives."""
    watched = 0

    def __init__(self, sock, can_fail=True):
        self.sock = sock
        self.failed = []
        if not can_fail:
            self.fail = None

    def fileno(self):
        return self.sock.fileno()

    def on_readable(self):
        self.sock.recv(100)
        raise KeyError("planted")

    def fail(self, reason):
        self.failed.append(reason)


def test_a_handler_that_raises_is_failed_and_the_others_go_on():
    r = Reactor()
    reported = []
    r.on_error = lambda where, exc: reported.append((where, exc))
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    fired = []
    bad = Raising(a)
    good = Raising(c)
    good.on_readable = lambda: fired.append(c.recv(100))
    r.set_interest(bad, True, False)
    r.set_interest(good, True, False)
    r.call_later(0, lambda: 1 / 0)                   # a timer's bug: reported, not fatal
    b.send(b"x")
    d.send(b"y")
    r.run_once(max_wait=1.0)
    assert bad.failed == ["internal error: KeyError: 'planted'"]
    assert fired == [b"y"]
    assert sorted((where is bad, type(exc).__name__) for where, exc in reported) == [
        (False, "ZeroDivisionError"), (True, "KeyError")]
    assert r.errors == 2
    d.send(b"z")
    r.run_once(max_wait=1.0)
    assert fired == [b"y", b"z"]
    for sock in (a, b, c, d):
        sock.close()


def test_a_handler_that_raises_and_cannot_be_failed_ends_run():
    """Nothing to close it with: the loop would only meet it again (a
    level-triggered fd stays readable), so the exception ends the loop."""
    import pytest
    r = Reactor()
    r.on_error = lambda where, exc: None
    a, b = socket.socketpair()
    h = Raising(a, can_fail=False)
    r.set_interest(h, True, False)
    b.send(b"x")
    with pytest.raises(KeyError):
        r.run_once(max_wait=1.0)
    a.close()
    b.close()
