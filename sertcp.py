#!/usr/bin/env python3
"""sertcp - a serial device server in one file.

sertcp joins serial ports (real UARTs, USB adapters, pyserial URLs, or
virtual ports it creates as pseudo-terminals) to TCP: as a server that many
clients share under clear rules, as a client that dials out, or both.

The file reads top to bottom; each section uses only the ones above it:

    1. constants
    2. config       - the schema (every key once), INI and flag parsing,
                      validation, --check output, the example file
    3. cores        - sans-I/O (bytes, times and settings in; bytes,
                      events and actions out; no sockets, no clocks):
                      packer, client-selection policies, identity
                      matcher, Telnet codec (RFC 854/855/1143), RFC 2217
                      encoders and per-connection state, Modbus (MBAP,
                      RTU framing, the bus scheduler), DNS-SD (multicast
                      DNS messages and the responder: probe, announce,
                      rename, answer), the device side (the RS-485
                      struct, the USB identity matcher, modem lines),
                      the port's state machines as tables (device life
                      DEVICE_STATE_ON, the back-pressure rule,
                      admission, the dial plan), and Hayes AT commands
                      (the modem emulation's command and online modes)
    4. reactor      - the Handler contract; one selector loop with a
                      timer heap
    5. endpoints    - names and dialing; serial devices (tty, URL through
                      helper threads, socket, byte stream, virtual pty);
                      RS-485 mode, USB adapters found in sysfs; termios tables;
                      connections and TLS; listeners; the gate of a
                      listener (allow, password, identity); UDP; the
                      multicast DNS socket and interface addresses
    6. port         - the RFC 2217 roles (server, client); the Modbus
                      gateway role; the modem role (dialing, ringing,
                      answering for AT commands); the port (device
                      life, delivery, back-pressure, modem lines that
                      drive connections, notices to the device); its
                      admission shell (break on connect, heartbeat);
                      its dialer (the client role)
    7. status       - /status and /metrics, the web page, the control API
                      (POST /ports/NAME/...), traces (rolled over at a
                      size), monitors (read-only listeners of the
                      traffic), reload (SIGHUP)
    8. main         - command line, logging, service files, signals
"""

import errno
import heapq
import math
import os
import select
import sys
import time
from collections import deque

import _signal
import _socket

monotonic = time.monotonic


# socket.py and signal.py wrap their C modules to turn every constant into
# an enum member at import, which with enum itself costs about 1.5 MiB of
# RSS (a router has 64-128 MiB) and is of no use here: sertcp takes the C
# modules' names through these, and pays for the Python module only where
# something needs a name the C module lacks (TLS, pyserial URLs do).

class LightSocket(_socket.socket):
    """socket.socket as sertcp uses it: the C socket, with accept()
    returning a LightSocket, and `with`."""
    __slots__ = ()

    def accept(self):
        fd, peer = self._accept()
        return LightSocket(self.family, self.type, self.proto, fileno=fd), peer

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class CModule:
    """A C module's names (_socket's, _signal's) under the Python module's
    name; a name only the Python module has imports it then."""

    def __init__(self, python_module, c_module, **replaced):
        self.__dict__.update(_python_module=python_module, _c_module=c_module)
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        try:
            value = getattr(self._c_module, name)
        except AttributeError:
            value = getattr(__import__(self._python_module), name)
        self.__dict__[name] = value
        return value


socket = CModule("socket", _socket, socket=LightSocket)
signal = CModule("signal", _signal)

__version__ = "0.1.0"

# =====================================================================
# 1. Constants
# =====================================================================

PROGRAM = "sertcp"
READ_CHUNK = 65536             # bytes asked of a device or socket per read
BURST_READ = 1024              # a device read this large means more is waiting
DEVICE_HIGH_WATER = 65536      # queued for a device: stop reading clients
CLIENT_HIGH_WATER = 65536      # queued for every recipient: pause the device
MAX_PACKET = 65536             # a packer never holds more than this
SHUTDOWN_DRAIN = 2.0           # seconds to write out what is queued at exit
VIRTUAL_POLL = 0.1             # seconds between checks that a program opened a virtual port
IDENTITY_PAUSE = 0.2           # an id ends at LF, CR LF or this pause
INTERNAL_ERROR_TRACEBACKS = 20  # tracebacks logged for contained bugs; one line each after
HALF_CLOSE_GRACE = 0.5         # seconds a half-closed client still gets device data (socat's -t)
DIAL_SETTLE = 5.0              # a dialed connection closed sooner, silent: a failed round
DIAL_TIMEOUT = 10.0            # seconds a dial may take before the next peer is tried
MODEM_COUNTERS = ("modem_calls_in", "modem_calls_out", "modem_rings")  # modem = yes: /status, /metrics
MODEM_POLL = 0.1               # rfc2217: seconds between looks at modem lines (only while asked for)
RFC2217_AGREE_TIMEOUT = 5.0    # rfc2217 client: seconds the server has to accept COM-PORT-OPTION
BREAK_DURATION = 0.25          # seconds of break for a Telnet IAC BRK
MAX_PENDING_HANDSHAKES = 1024  # per listener: clients in TLS/password/id before a port
PASSWORD_LINE_LIMIT = 256      # bytes: a longer first line is not a password
WRONG_PASSWORD_DELAY = 1.0     # seconds before a wrong password is answered by closing
PASSWORD_FAILURES, PASSWORD_WINDOW, PASSWORD_BLOCK = 5, 60.0, 60  # then refuse that address
PEER_LOG_BURST, PEER_LOG_WINDOW = 10, 10.0  # per-peer log lines per window
CONTROL_BODY_LIMIT = 4096      # bytes: the form body of a control API request
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40  # logging's levels (sertcp has its own logger)

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2


# =====================================================================
# 2. Configuration
# =====================================================================

class ConfigError(Exception):
    """A configuration mistake; `where` names the file and line or the flag."""

    def __init__(self, where, key, message):
        self.where, self.key, self.message = where, key, message
        super().__init__(self.__str__())

    def __str__(self):
        key = self.key
        if key and self.where == "--" + key.replace("_", "-"):
            key = None  # the flag already names the key
        parts = [p for p in (self.where, key) if p]
        return "%s: %s" % (": ".join(parts), self.message) if parts else self.message


class ValueProblem(ValueError):
    """Raised by a value parser; the caller adds where and which key."""


def parse_bool(text):
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueProblem("expected yes/no/true/false/on/off/1/0")


SIZE_UNITS = (("g", 1024 ** 3), ("m", 1024 ** 2), ("k", 1024))


def show_size(value):
    """4096 -> 4k, as parse_size reads it back."""
    for suffix, scale in SIZE_UNITS:
        if value and value % scale == 0:
            return "%d%s" % (value // scale, suffix)
    return str(value)


def size_parser(low, high):
    """A parser for a size key (4096, 64k, 1m, 1g) within low..high."""
    allowed = "%s-%s" % (show_size(low), show_size(high))

    def parse(text):
        value = text.strip().lower()
        scale = dict(SIZE_UNITS).get(value[-1:], 1)
        if scale != 1:
            value = value[:-1]
        try:
            number = int(value)
        except ValueError:
            raise ValueProblem("expected a size such as 4096, 64k or 1m, in %s" % allowed)
        if not low <= number * scale <= high:
            raise ValueProblem("allowed range is %s" % allowed)
        return number * scale
    parse.allowed = allowed
    return parse


def parse_bytes(text):
    r"""C escapes (\r \n \t \\ \xNN \0) in a byte string."""
    out = bytearray()
    raw = text.encode("utf-8")
    i = 0
    simple = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"\\": b"\\", b"0": b"\0",
              b"a": b"\a", b"b": b"\b", b"e": b"\x1b", b"'": b"'", b'"': b'"'}
    while i < len(raw):
        c = raw[i:i + 1]
        if c != b"\\":
            out += c
            i += 1
            continue
        esc = raw[i + 1:i + 2]
        if esc == b"x":
            digits = raw[i + 2:i + 4]
            try:
                if len(digits) != 2:
                    raise ValueError
                out.append(int(digits, 16))
            except ValueError:
                raise ValueProblem("\\x needs two hex digits")
            i += 4
        elif esc in simple:
            out += simple[esc]
            i += 2
        else:
            raise ValueProblem("unknown escape \\%s (use \\r \\n \\t \\\\ \\xNN)"
                               % esc.decode("utf-8", "replace"))
    return bytes(out)


def show_bytes(value):
    """The inverse of parse_bytes, for --check output."""
    out = []
    for b in value:
        ch = chr(b)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif 32 <= b < 127:
            out.append(ch)
        else:
            out.append("\\x%02x" % b)
    return "".join(out)


# Every number a key takes has a range, written once here and shown by
# --check's errors, -h, the example file and the README's table.  Times
# stop at TIME_LIMIT: epoll's timeout is a 32-bit count of milliseconds
# (24.8 days), and a timer any further away would end the loop.
TIME_LIMIT = 864000            # seconds (10 days): the longest time a key may hold
SIZE_LIMIT = 1 << 30           # bytes (1g): the largest buffer a key may ask for


def show_number(value):
    """1000000 and 0.05 as a user would write them (no 1e+06)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def number_parser(kind, low, high):
    """A parser for an int or float key within low..high; `allowed` tells
    the range to the documentation and to the error messages."""
    allowed = "%s-%s" % (show_number(low), show_number(high))

    def parse(text):
        try:
            value = kind(text.strip())
        except ValueError:
            raise ValueProblem("expected %s in %s" % ("an integer" if kind is int else "a number", allowed))
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueProblem("expected a finite number in %s" % allowed)
        if not low <= value <= high:
            raise ValueProblem("allowed range is %s" % allowed)
        return value
    parse.allowed = allowed
    return parse


def choice_parser(*choices, aliases=None):
    aliases = aliases or {}

    def parse(text):
        value = text.strip().lower()
        value = aliases.get(value, value)
        if value not in choices:
            raise ValueProblem("expected one of: %s" % ", ".join(choices))
        return value
    return parse


def parse_hostport(text, need_host=False):
    """'PORT', 'HOST:PORT', '[V6]:PORT' -> (host or '', port)."""
    value = text.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1:end + 2] != ":":
            raise ValueProblem("expected [IPV6]:PORT")
        host, port = value[1:end], value[end + 2:]
    elif ":" in value:
        host, _, port = value.rpartition(":")
        if ":" in host:
            raise ValueProblem("put IPv6 addresses in brackets: [::1]:PORT")
    else:
        host, port = "", value
    if host == "*":
        host = ""
    if need_host and not host:
        raise ValueProblem("expected HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise ValueProblem("expected [HOST:]PORT with a numeric port")
    if not 1 <= number <= 65535:
        raise ValueProblem("port must be 1-65535")
    return (host, number)


def show_hostport(value):
    host, port = value
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port) if host else str(port)


def parse_listen(text):
    return parse_hostport(text)


def parse_connect(text):
    peers = [p for p in (x.strip() for x in text.split(",")) if p]
    if not peers:
        raise ValueProblem("expected HOST:PORT[, HOST:PORT ...]")
    return tuple(parse_hostport(p, need_host=True) for p in peers)


# What Linux takes for TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT (more is
# EINVAL at every connection, and the keepalive would be half set)
KEEPALIVE_LIMITS = (("IDLE", 32767), ("INTERVAL", 32767), ("COUNT", 127))


def parse_keepalive(text):
    parts = [p.strip() for p in text.split(",")]
    if parts == ["0"]:
        return (0, 0, 0)
    if len(parts) != 3:
        raise ValueProblem("expected IDLE,INTERVAL,COUNT (seconds, seconds, probes) or 0")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueProblem("expected three integers IDLE,INTERVAL,COUNT")
    for value, (name, high) in zip(values, KEEPALIVE_LIMITS):
        if not 1 <= value <= high:
            raise ValueProblem("%s must be 1-%d (0 alone turns keepalive off); allowed: %s"
                               % (name, high, parse_keepalive.allowed))
    return values


parse_keepalive.allowed = "0, or " + ",".join("1-%d" % high for _, high in KEEPALIVE_LIMITS)


def parse_line_state(text):
    return choice_parser("on", "off", "keep", aliases={"yes": "on", "true": "on", "1": "on",
                                                       "no": "off", "false": "off", "0": "off"})(text)


REMOTE_CONTROL_ITEMS = ("settings", "dtr", "rts", "break", "purge")


def parse_remote_control(text):
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1", "all"):
        return REMOTE_CONTROL_ITEMS
    if value in ("no", "false", "off", "0", "none"):
        return ()
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    for item in items:
        if item not in REMOTE_CONTROL_ITEMS:
            raise ValueProblem("expected yes, no or a list of: %s" % ", ".join(REMOTE_CONTROL_ITEMS))
    return items


def parse_allow(text):
    import ipaddress  # only configurations with allow lists pay for it
    networks = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueProblem("%r is not an IP address or CIDR network" % item)
    if not networks:
        raise ValueProblem("expected a comma list of addresses or CIDRs")
    return tuple(networks)


def parse_text(text):
    return text


# The modem lines connect_on_line and disconnect_on_line name, as
# modem_status() reports them
MODEM_LINE_KEYS = ("none", "dsr", "dcd", "cts")
MODEM_LINE_NAMES = {"dsr": "DSR", "dcd": "CD", "cts": "CTS"}
NOTICE_KEYS = ("device_connect_msg", "device_disconnect_msg", "device_unreachable_msg")
RS485_DETAIL_KEYS = ("rs485_rts", "rs485_delay_before_ms", "rs485_delay_after_ms", "rs485_rx_during_tx",
                     "rs485_terminate")


def parse_device(text):
    """A device path or URL; usb:VID:PID[:SERIAL] and usb@LOCATION are
    checked here, so that a typo is a config error, not a missing device."""
    value = parse_path(text)
    if value.startswith("usb:") or value.startswith("usb@"):
        parse_usb_spec(value)
    return value


def parse_usb_spec(text):
    """usb:VID:PID[:SERIAL] -> ("id", vid, pid, serial); usb@LOCATION ->
    ("location", location).  Ids are 4 hex digits or *; '*' for SERIAL
    (or none) takes any serial number."""
    if text.startswith("usb@"):
        location = text[4:]
        if not location or not all(c.isalnum() or c in "-." for c in location):
            raise ValueProblem("usb@LOCATION needs the USB port as sysfs names it, such as usb@1-1.4")
        return ("location", location)
    parts = text[4:].split(":")
    if len(parts) not in (2, 3):
        raise ValueProblem("expected usb:VID:PID or usb:VID:PID:SERIAL (hex ids, * for any)")
    ids = []
    for part in parts[:2]:
        part = part.strip().lower()
        if part != "*" and not (len(part) == 4 and all(c in "0123456789abcdef" for c in part)):
            raise ValueProblem("%r is not a USB id: expected 4 hex digits or * (as in usb:0403:6001)" % part)
        ids.append(part)
    serial = parts[2].strip() if len(parts) == 3 else "*"
    return ("id", ids[0], ids[1], serial or "*")


def parse_mdns_name(text):
    """A DNS-SD instance name: any UTF-8 text of 1-63 bytes without
    control characters (RFC 6763 §4.1.1)."""
    value = text.strip()
    if not 0 < len(value.encode("utf-8")) <= 63:
        raise ValueProblem("expected 1-63 bytes of text")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueProblem("must not contain control characters")
    return value


def parse_mdns_type(text):
    """_NAME._tcp, NAME being letters, digits and hyphens.  RFC 6335 §5.1
    asks for 15 at most, but longer names are in use (Home Assistant
    looks for _zigbee-coordinator._tcp): up to a DNS label's 62."""
    value = text.strip().lower()
    if value.endswith(".local") or value.endswith(".local."):
        value = value.rsplit(".local", 1)[0]
    parts = value.split(".")
    name = parts[0][1:]
    if (len(parts) != 2 or parts[1] != "_tcp" or not parts[0].startswith("_") or not 0 < len(name) <= 62
            or not all(c.isascii() and (c.isalnum() or c == "-") for c in name)):
        raise ValueProblem("expected _NAME._tcp, NAME being letters, digits or hyphens (as _iostream._tcp)")
    return value


MDNS_TXT_LIMIT = 1300             # bytes of mdns_txt pairs (RFC 6763 §6.2), leaving room for ours


def parse_mdns_txt(text):
    """key=value[, key=value ...] -> [(key, value)]; keys are printable
    ASCII without '=' (RFC 6763 §6.4), each pair at most 255 bytes."""
    pairs = []
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not all(33 <= ord(c) <= 126 and c != "=" for c in key):
            raise ValueProblem("expected key=value[, key=value ...], keys in printable ASCII; got %r" % item.strip())
        if len(("%s=%s" % (key, value)).encode("utf-8")) > 255:
            raise ValueProblem("%s=... is longer than 255 bytes" % key)
        pairs.append((key, value))
    # RFC 6763 §6.2: a TXT record over 1300 bytes is not to be used (and
    # one over 9000 would not fit in an mDNS message at all)
    size = sum(1 + len(("%s=%s" % pair).encode("utf-8")) for pair in pairs)
    if size > MDNS_TXT_LIMIT:
        raise ValueProblem("the pairs take %d bytes; a TXT record takes at most %d" % (size, MDNS_TXT_LIMIT))
    return pairs


def parse_path(text):
    value = text.strip()
    if not value:
        raise ValueProblem("expected a path")
    if "\0" in value:
        raise ValueProblem("a path cannot contain a NUL character")
    return value


# The largest file of each kind sertcp reads.  Anything bigger is a
# mistake (a log file named as -c), and reading it whole at every start
# and SIGHUP would only fill memory.
CONFIG_FILE_LIMIT = 4 << 20    # -c FILE: some 20,000 ports
PEM_FILE_LIMIT = 1 << 20       # tls_cert, tls_key, tls_ca (a system CA bundle is ~200k)
PASSWORD_FILE_LIMIT = 64 << 10  # password_file (only its first line counts)


def read_regular_file(path, limit):
    """The bytes of the regular file at `path`, at most `limit` of them.

    Opened without blocking, so that a FIFO (which would wait for a
    writer) cannot hang --check or stall every port at SIGHUP; a FIFO, a
    device (/dev/zero, which never ends) or a directory is refused, and
    so is a file larger than `limit`.  Raises OSError, or ValueProblem
    with a message to put after the path."""
    import stat
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFDIR: "a directory",
                    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "special")
            raise ValueProblem("is %s, not a regular file" % kind)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueProblem("is larger than %s, the most this kind of file may hold" % show_size(limit))
    finally:
        os.close(fd)


class Key:
    """One configuration key: declared once, used by the INI parser, the
    flags, --check, the example file and the README table."""

    def __init__(self, name, parse, default, help, show=str, secret=False):
        self.name, self.parse, self.default, self.help = name, parse, default, help
        self.show, self.secret = show, secret

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def allowed(self):
        """The range of a numeric key ("0-864000"), None for the others."""
        return getattr(self.parse, "allowed", None)

    @property
    def described(self):
        """The help line with the range, for -h and the example file."""
        return "%s; allowed: %s" % (self.help, self.allowed) if self.allowed else self.help

    def format(self, value):
        if value is None:
            return ""
        if self.secret:
            return "********"
        return self.show(value)


def _show_bool(v):
    return "yes" if v else "no"


def _show_float(v):
    return show_number(v)


def _show_list(v):
    return ", ".join(str(x) for x in v)


PORT_KEYS = [
    # serial side
    Key("device", parse_device, None, "path (/dev/ttyUSB0), pyserial URL (loop://, socket://, rfc2217://), "
        "usb:VID:PID[:SERIAL] or usb@LOCATION (a USB adapter found in sysfs at every open)"),
    Key("virtual", parse_path, None, "create a pseudo-terminal with a symlink at this path: a virtual serial port for local programs"),
    Key("baudrate", number_parser(int, 50, 12000000), 9600, "bits per second; any rate the OS accepts"),
    Key("bytesize", number_parser(int, 5, 8), 8, "data bits"),
    Key("parity", choice_parser("none", "even", "odd", "mark", "space",
                                aliases={"n": "none", "e": "even", "o": "odd", "m": "mark", "s": "space"}),
        "none", "none, even, odd, mark, space (N E O M S accepted)"),
    Key("stopbits", choice_parser("1", "1.5", "2"), "1", "1, 1.5 or 2"),
    Key("flow", choice_parser("none", "rtscts", "xonxoff", "dsrdtr"), "none", "flow control: none, rtscts, xonxoff, dsrdtr"),
    Key("dtr_active", parse_line_state, "on", "DTR while at least one client is connected: on, off, keep"),
    Key("rts_active", parse_line_state, "on", "RTS while at least one client is connected: on, off, keep"),
    Key("dtr_idle", parse_line_state, "keep", "DTR while no client is connected: on, off, keep"),
    Key("rts_idle", parse_line_state, "keep", "RTS while no client is connected: on, off, keep"),
    Key("open_on_demand", parse_bool, False, "open the device only while at least one client is connected", _show_bool),
    Key("reopen_interval", number_parser(float, 0.05, TIME_LIMIT), 2.0, "seconds between attempts to open a missing or failed device", _show_float),
    Key("exclusive", parse_bool, True, "lock the device against other programs (TIOCEXCL and flock)", _show_bool),
    Key("tx_pause_ms", number_parser(int, 0, 60000), 0, "milliseconds to pause between successive writes to the device"),
    Key("tx_char_delay_ms", number_parser(float, 0, 60000), 0.0, "milliseconds to pause after every byte written to the device (fractions allowed)", _show_float),
    Key("break_on_connect", number_parser(float, 0, 60), 0.0, "seconds of serial break sent when a connection comes up (0 = none)", _show_float),
    Key("rs485", parse_bool, False, "put the UART in the kernel's RS-485 mode (TIOCSRS485) at every open", _show_bool),
    Key("rs485_rts", choice_parser("on_send", "after_send"), "on_send", "RS-485: RTS level while sending: on_send or after_send"),
    Key("rs485_delay_before_ms", number_parser(int, 0, 1000), 0, "RS-485: milliseconds of RTS before a transmission"),
    Key("rs485_delay_after_ms", number_parser(int, 0, 1000), 0, "RS-485: milliseconds of RTS after a transmission"),
    Key("rs485_rx_during_tx", parse_bool, False, "RS-485: keep receiving while sending (hear your own echo)", _show_bool),
    Key("rs485_terminate", parse_bool, False, "RS-485: switch on the bus termination where the driver has one", _show_bool),
    Key("connect_on_line", choice_parser(*MODEM_LINE_KEYS), "none", "none, dsr, dcd, cts: dial, or accept clients, only while this modem line is on"),
    Key("disconnect_on_line", choice_parser(*MODEM_LINE_KEYS), "none", "none, dsr, dcd, cts: close the port's connections when this modem line goes off"),
    Key("device_connect_msg", parse_bytes, None, "bytes written to the device when a connection comes up", show_bytes),
    Key("device_disconnect_msg", parse_bytes, None, "bytes written to the device when a connection ends", show_bytes),
    Key("device_unreachable_msg", parse_bytes, None, "client role: bytes written to the device when every peer failed", show_bytes),
    Key("strict_baud", parse_bool, False, "virtual ports: pace data at the port's baud rate, like a real line", _show_bool),
    Key("listen_on_open", parse_bool, False, "virtual ports: accept or dial only while a local program has the port open", _show_bool),
    # network side
    Key("listen", parse_listen, None, "[HOST:]PORT to accept clients on ([::1]:PORT for IPv6; no host = all addresses)", show_hostport),
    Key("connect", parse_connect, None, "HOST:PORT[, HOST:PORT ...] to dial, tried in order", lambda v: ", ".join(show_hostport(p) for p in v)),
    Key("event_bytes", number_parser(int, 0, 1 << 20), 0, "client role: 0 = dial at start and stay up; N = dial once N device bytes wait"),
    Key("timeout", number_parser(float, 0, TIME_LIMIT), 0.0, "close a connection idle this many seconds in both directions (0 = never)", _show_float),
    Key("heartbeat_interval", number_parser(float, 0, TIME_LIMIT), 0.0, "client role: send heartbeat_data after this many idle seconds on a dialed connection (0 = never)", _show_float),
    Key("heartbeat_data", parse_bytes, None, "client role: the heartbeat's bytes", show_bytes),
    Key("reconnect_min", number_parser(float, 0.01, TIME_LIMIT), 1.0, "client role: shortest pause between failed dials", _show_float),
    Key("reconnect_max", number_parser(float, 0.01, TIME_LIMIT), 60.0, "client role: longest pause between failed dials", _show_float),
    Key("protocol", choice_parser("raw", "rfc2217", "modbus"), "raw", "raw, rfc2217 (Telnet COM-PORT-OPTION), or modbus (Modbus TCP clients, RTU device)"),
    Key("rfc2217_role", choice_parser("auto", "server", "client"), "auto", "server, client, or auto (a virtual port is the client)"),
    Key("remote_control", parse_remote_control, REMOTE_CONTROL_ITEMS, "rfc2217 server: what clients may change: yes, no, or a list of settings, dtr, rts, break, purge",
        lambda v: "yes" if tuple(v) == REMOTE_CONTROL_ITEMS else (", ".join(v) if v else "no")),
    Key("modbus_timeout_ms", number_parser(int, 1, 600000), 1000, "modbus: milliseconds the device has to answer; then exception 0x0B"),
    Key("modbus_retries", number_parser(int, 0, 100), 0, "modbus: extra tries before that exception"),
    Key("modbus_frame_gap_ms", number_parser(float, 0, 10000), 0.0, "modbus: silence that ends an RTU frame (0 = 3.5 characters at baudrate, 1.75 above 19200)", _show_float),
    Key("max_clients", number_parser(int, 1, 100000), 1, "server role: clients accepted at once"),
    Key("backlog", number_parser(int, 1, 65535), 1024, "server role: pending connections the kernel queues (at most net.core.somaxconn)"),
    Key("when_full", choice_parser("reject", "kick_oldest"), "reject", "when max_clients are connected: reject the newest, or kick_oldest"),
    Key("send_to", choice_parser("all", "first", "last", "last_active", "none"), "all", "which clients get device data: all, first, last, last_active, none"),
    Key("receive_from", choice_parser("all", "first", "last", "last_active", "none"), "all", "whose data goes to the device: all, first, last, last_active, none"),
    Key("client_buffer", size_parser(0, SIZE_LIMIT), 262144, "bytes queued for one client before slow_client applies", lambda v: str(v)),
    Key("slow_client", choice_parser("disconnect", "drop"), "disconnect", "a client whose queue is full: disconnect it, or drop its data"),
    Key("buffer", size_parser(0, SIZE_LIMIT), 0, "device bytes held while no client is connected, for the next one (0 = discard)"),
    Key("buffer_drop", choice_parser("newest", "oldest"), "newest", "when buffer is full: discard the newest or the oldest bytes"),
    Key("nodelay", parse_bool, True, "TCP_NODELAY (send small packets at once)", _show_bool),
    Key("keepalive", parse_keepalive, (60, 10, 3), "TCP keepalive IDLE,INTERVAL,COUNT, or 0 for off",
        lambda v: "0" if not v[0] else "%d,%d,%d" % v),
    Key("pack_size", size_parser(0, 1 << 20), 0, "device->network: send when this many bytes are gathered (0 = off)"),
    Key("pack_delimiter", parse_bytes, None, "device->network: send when this byte or 2-byte sequence arrives", show_bytes),
    Key("pack_trailing", number_parser(int, 0, 2), 0, "bytes after the delimiter that belong to the packet (a CRC)"),
    Key("pack_strip", parse_bool, False, "drop the delimiter from the packet", _show_bool),
    Key("pack_idle_ms", number_parser(int, 0, 3600000), 0, "device->network: send when the device was silent this long (0 = off)"),
    Key("pack_max_ms", number_parser(int, 0, 3600000), 0, "device->network: never hold gathered data longer than this (0 = off)"),
    Key("banner", parse_bytes, None, "bytes sent to each client on connect", show_bytes),
    Key("connect_id", parse_bytes, None, "client role: bytes sent first on every connection (the device's identity)", show_bytes),
    Key("identity", parse_bytes, None, "server role: the id a client must send first (shared listeners)", show_bytes),
    Key("identity_timeout", number_parser(float, 0.01, 3600), 10.0, "seconds a client has to send its id or password", _show_float),
    Key("allow", parse_allow, None, "comma list of IPs/CIDRs allowed to connect (IPv4 and IPv6)", _show_list),
    Key("password", parse_text, None, "a client must send this password and a newline first", secret=True),
    Key("password_file", parse_path, None, "file whose first line is the password"),
    Key("tls_cert", parse_path, None, "server role: certificate chain (PEM) to serve TLS"),
    Key("tls_key", parse_path, None, "server role: private key (PEM) for tls_cert"),
    Key("tls_ca", parse_path, None, "server: require client certificates from this CA; client: verify the server with it"),
    Key("tls", parse_bool, False, "client role: dial with TLS", _show_bool),
    Key("tls_server_name", parse_text, None, "client role: name to verify (default: the host dialled)"),
    Key("trace", parse_path, None, "file to which both directions are appended with timestamps"),
    Key("trace_format", choice_parser("hex", "raw"), "hex", "hex (lines marked < device->net, > net->device) or raw"),
    Key("trace_max_size", size_parser(0, 1024 ** 3), 0, "the trace file this large becomes FILE.1 and a new one starts (0 = never)", show_size),
    Key("monitor", parse_listen, None, "[HOST:]PORT of a read-only listener streaming a copy of both directions (allow applies)", show_hostport),
    Key("monitor_format", choice_parser("hex", "raw"), "hex", "monitor: hex (timestamped lines marked < device->net, > net->device) or raw"),
    # UDP side
    Key("udp_listen", parse_listen, None, "[HOST:]PORT: datagrams received here go to the device (allow applies)", show_hostport),
    Key("udp_send_to", parse_connect, None, "HOST:PORT[, HOST:PORT ...]: each packet of device data goes to each as one datagram "
        "(unicast, broadcast or multicast)", lambda v: ", ".join(show_hostport(p) for p in v)),
    Key("udp_reply", parse_bool, False, "also send device data to the source of the latest datagram, until timeout passes "
        "without one", _show_bool),
    Key("udp_multicast_ttl", number_parser(int, 0, 255), 1, "hop limit of multicast datagrams"),
    # modem emulation
    Key("modem", parse_bool, False, "the device speaks Hayes AT commands: ATD HOST:PORT dials, connections on listen "
        "RING, ATA answers, +++ and ATH hang up", _show_bool),
    Key("modem_phonebook", lambda text: parse_modem_phonebook(text), None,
        "NUMBER=HOST:PORT[, NUMBER=HOST:PORT ...]: what ATD NUMBER dials", lambda v: show_modem_phonebook(v)),
    Key("modem_init", lambda text: parse_modem_init(text), None, "AT commands applied at start and after ATZ "
        "(such as ATE0 S0=1)", " ".join),
    # DNS-SD
    Key("mdns", parse_bool, False, "announce the port (its listen address) with DNS-SD over multicast DNS; withdrawn at exit",
        _show_bool),
    Key("mdns_name", parse_mdns_name, None, "the service instance name (default: PORT on HOST)"),
    Key("mdns_type", parse_mdns_type, "_iostream._tcp", "the service type: _NAME._tcp"),
    Key("mdns_txt", parse_mdns_txt, None, "key=value[, key=value ...] added to the TXT record "
        "(which holds protocol, baudrate and the USB ids)", lambda v: ", ".join("%s=%s" % kv for kv in v)),
]

GLOBAL_KEYS = [
    Key("log_level", choice_parser("debug", "info", "warning", "error"), "info", "debug, info, warning, error"),
    Key("log", parse_path, "stderr", "stderr, syslog, or a file path"),
    Key("log_max_size", size_parser(0, 1024 ** 3), 0, "a log file this large becomes FILE.1 and a new one starts (0 = never)", show_size),
    Key("pidfile", parse_path, None, "written at start, removed at exit"),
    Key("status", parse_listen, None, "[HOST:]PORT of the HTTP status endpoint (/status JSON, /metrics)", show_hostport),
    Key("user", parse_text, None, "after opening devices and binding, drop to this user"),
    Key("status_allow", parse_allow, None, "comma list of IPs/CIDRs that may use the status endpoint, every path (default: any)", _show_list),
    Key("control_token", parse_text, None, "enables the control API (POST) on the status endpoint: requests carry "
        "Authorization: Bearer TOKEN", secret=True),
    Key("control_token_file", parse_path, None, "file whose first line is the control token (re-read on SIGHUP)"),
]

PORT_SCHEMA = {k.name: k for k in PORT_KEYS}
GLOBAL_SCHEMA = {k.name: k for k in GLOBAL_KEYS}
FLAG_TO_KEY = {k.flag: k for k in PORT_KEYS + GLOBAL_KEYS}
CLI_PORT = "cli"

class Setting:
    """A raw key = value with where it came from."""
    __slots__ = ("value", "where")

    def __init__(self, value, where):
        self.value, self.where = value, where


class IniSections(dict):
    """{section: {key: Setting}} that also knows where each header stood,
    so that a missing key can be blamed on its section's line."""

    def __init__(self):
        super().__init__()
        self.headers = {}


def read_ini(path):
    """Parse an INI file into {section: {key: Setting}} keeping line numbers.

    Our own reader rather than configparser: errors must name the line, and
    passwords and banners may hold '%' that configparser would interpolate.
    Comment lines start with '#' or ';'; an indented line continues a value.
    """
    try:
        lines = read_regular_file(path, CONFIG_FILE_LIMIT).decode("utf-8").splitlines()
    except OSError as e:
        raise ConfigError(path, None, "cannot read: %s" % e.strerror)
    except ValueProblem as e:
        raise ConfigError(path, None, str(e))
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text")
    sections = IniSections()
    errors = []
    current = None
    last = None
    for number, line in enumerate(lines, 1):
        where = "%s:%d" % (path, number)
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line[0] in " \t" and last is not None:
            last.value += "\n" + stripped
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]") or len(stripped) < 3:
                errors.append(ConfigError(where, None, "bad section header %r" % stripped))
                current = None
                continue
            name = stripped[1:-1].strip()
            if name in sections:
                errors.append(ConfigError(where, None, "section [%s] appears twice" % name))
            current = sections.setdefault(name, {})
            sections.headers.setdefault(name, where)
            last = None
            continue
        sep = min([i for i in (stripped.find("="), stripped.find(":")) if i > 0] or [-1])
        if sep < 0:
            errors.append(ConfigError(where, None, "expected 'key = value', got %r" % stripped))
            continue
        if current is None:
            errors.append(ConfigError(where, None, "key outside any section"))
            continue
        key = stripped[:sep].strip().lower().replace("-", "_")
        if key in current:
            errors.append(ConfigError(where, key, "appears twice in this section"))
        last = current[key] = Setting(stripped[sep + 1:].strip(), where)
    return sections, errors


class PortConfig:
    """Every key of one port, parsed, defaults filled in."""

    def __init__(self, name, values):
        # the keys become plain attributes: the data path reads several of
        # them per event, and an attribute is cheaper than a lookup method
        self.__dict__.update(values)
        self.name = name
        self.values = values

    secret = None  # the password as bytes, from password or password_file

    def same_as(self, other):
        return self.values == other.values and self.secret == other.secret


class Config:
    control_token = None    # bytes: the control API is on (control_token or control_token_file)

    def __init__(self, global_values, ports, source=None):
        self.globals = global_values
        self.ports = ports          # list of PortConfig, in file order
        self.source = source


def _parse_settings(schema, settings, section_label, errors):
    """Turn {key: Setting} into {key: value} with defaults; collect errors."""
    values = {k.name: k.default for k in schema.values()}
    for key, setting in settings.items():
        spec = schema.get(key)
        if spec is None:
            known = sorted(schema)
            hint = [k for k in known if k.startswith(key[:4])][:3]
            errors.append(ConfigError(setting.where, key, "unknown key in %s%s" % (
                section_label, ("; did you mean %s?" % " or ".join(hint)) if hint else "")))
            continue
        try:
            values[key] = spec.parse(setting.value)
        except ValueProblem as e:
            shown = "********" if spec.secret else setting.value
            errors.append(ConfigError(setting.where, key, "bad value %r: %s" % (shown, e)))
    return values


# Keys that make no sense on a modem port, and why (a PORT_RULES row each)
MODEM_CONFLICTS = (
    ("connect", "the device dials with ATD (modem_phonebook names the peers)"),
    ("protocol", "the device's bytes are AT commands and raw online data"),
    ("max_clients", "a modem has one call at a time; a second one is refused (busy)"),
    ("when_full", "a modem has one call at a time; a second one is refused (busy)"),
    ("open_on_demand", "the device must be open to give AT commands"),
    ("listen_on_open", "the device must be open to give AT commands"),
    ("buffer", "device data without a call are AT commands"),
    ("connect_on_line", "AT&D decides what the device's DTR does"),
    ("disconnect_on_line", "AT&D decides what the device's DTR does"),
    ("device_connect_msg", "the modem says CONNECT"),
    ("device_disconnect_msg", "the modem says NO CARRIER"),
    ("udp_listen", "a modem carries one call, over TCP"),
    ("udp_send_to", "a modem carries one call, over TCP"),
)


# Rules across the keys of one port, one row each: (when the values break
# it, the key to blame, the message).  A message may name the port as
# {name} and any key's value as {key}, shown as --check shows it.
PORT_RULES = (
    (lambda v: v["device"] is None and v["virtual"] is None,
     "device", "port [{name}] needs device or virtual"),
    (lambda v: v["device"] is not None and v["virtual"] is not None,
     "virtual", "port [{name}] has both device and virtual; choose one"),
    (lambda v: v["listen"] is None and v["connect"] is None and v["udp_listen"] is None and v["udp_send_to"] is None
     and not v["modem"],
     "listen", "port [{name}] needs listen or connect (or both), or udp_listen or udp_send_to, or modem"),
    (lambda v: v["pack_delimiter"] is not None and not 1 <= len(v["pack_delimiter"]) <= 2,
     "pack_delimiter", "must be 1 or 2 bytes"),
    (lambda v: v["pack_delimiter"] is None and v["pack_trailing"],
     "pack_trailing", "needs pack_delimiter"),
    (lambda v: v["pack_delimiter"] is None and v["pack_strip"],
     "pack_strip", "needs pack_delimiter"),
    (lambda v: v["reconnect_min"] > v["reconnect_max"],
     "reconnect_min", "is larger than reconnect_max ({reconnect_min} > {reconnect_max})"),
    (lambda v: v["virtual"] is None and v["strict_baud"],
     "strict_baud", "applies only to virtual ports"),
    (lambda v: v["virtual"] is not None and (v["rs485"] or v["connect_on_line"] != "none"
                                             or v["disconnect_on_line"] != "none" or v["break_on_connect"]),
     "virtual", "a virtual port has no RS-485 mode, modem lines or break; rs485, connect_on_line, "
     "disconnect_on_line and break_on_connect need a device"),
    (lambda v: v["rs485"] and v["device"] is not None and "://" in v["device"],
     "rs485", "needs a tty (a device path or usb: spec), not the URL {device}"),
    (lambda v: not v["rs485"] and any(v[k] != PORT_SCHEMA[k].default for k in RS485_DETAIL_KEYS),
     "rs485", "is off, but an rs485_* key is set: add rs485 = yes"),
    (lambda v: v["connect_on_line"] != "none" and v["open_on_demand"],
     "connect_on_line", "cannot go with open_on_demand: the line is read only while the device is open"),
    (lambda v: v["protocol"] == "modbus" and any(v[k] is not None for k in NOTICE_KEYS),
     "protocol", "modbus cannot go with device_connect_msg, device_disconnect_msg or device_unreachable_msg: "
     "a notice would corrupt the RTU bus"),
    (lambda v: v["heartbeat_interval"] and v["heartbeat_data"] is None,
     "heartbeat_data", "heartbeat_interval is set; heartbeat_data says what to send"),
    (lambda v: v["heartbeat_interval"] and v["connect"] is None,
     "heartbeat_interval", "needs connect (the heartbeat is for dialed connections)"),
    (lambda v: v["device_unreachable_msg"] is not None and v["connect"] is None,
     "device_unreachable_msg", "needs connect"),
    (lambda v: v["monitor"] is not None and v["monitor"] == v["listen"],
     "monitor", "is the port's own listen address; the monitor needs one of its own"),
    (lambda v: v["virtual"] is None and v["listen_on_open"],
     "listen_on_open", "applies only to virtual ports"),
    (lambda v: v["password"] is not None and v["password_file"] is not None,
     "password_file", "set password or password_file, not both"),
    (lambda v: v["password"] is not None and len(v["password"].encode("utf-8")) > PASSWORD_LINE_LIMIT,
     "password", "is longer than %d bytes" % PASSWORD_LINE_LIMIT),
    (lambda v: v["tls_cert"] is not None and v["tls_key"] is None,
     "tls_key", "tls_cert and tls_key go together"),
    (lambda v: v["tls_key"] is not None and v["tls_cert"] is None,
     "tls_cert", "tls_cert and tls_key go together"),
    (lambda v: v["tls_cert"] is not None and v["listen"] is None,
     "tls_cert", "serves TLS on listen, which is not set"),
    (lambda v: v["tls"] and v["connect"] is None,
     "tls", "dials with TLS on connect, which is not set"),
    (lambda v: v["event_bytes"] and v["connect"] is None,
     "event_bytes", "needs connect"),
    (lambda v: v["connect_id"] is not None and v["connect"] is None,
     "connect_id", "needs connect"),
    (lambda v: v["identity"] is not None and v["listen"] is None,
     "identity", "needs listen"),
    (lambda v: v["protocol"] == "modbus" and (v["pack_size"] or v["pack_idle_ms"] or v["pack_max_ms"]
                                              or v["pack_delimiter"] is not None),
     "protocol", "modbus frames device data itself; remove the pack_* keys"),
    (lambda v: v["protocol"] == "modbus" and v["banner"] is not None,
     "banner", "would break the Modbus TCP stream of protocol = modbus"),
    (lambda v: v["protocol"] != "modbus" and (v["modbus_retries"] or v["modbus_frame_gap_ms"]
                                              or v["modbus_timeout_ms"] != 1000),
     "protocol", "modbus_* keys need protocol = modbus (it is {protocol})"),
    (lambda v: v["identity"] == b"",
     "identity", "must not be empty"),
    (lambda v: v["identity"] is not None and (b"\n" in v["identity"] or b"\r" in v["identity"]),
     "identity", "must not contain CR or LF (they end an id)"),
    (lambda v: v["protocol"] == "modbus" and (v["udp_listen"] is not None or v["udp_send_to"] is not None),
     "protocol", "modbus queues each client's requests and answers; UDP carries raw device bytes: "
     "remove udp_listen and udp_send_to"),
    (lambda v: v["udp_reply"] and v["udp_listen"] is None,
     "udp_reply", "answers datagrams received on udp_listen, which is not set"),
    (lambda v: v["udp_multicast_ttl"] != 1 and v["udp_send_to"] is None,
     "udp_multicast_ttl", "applies to udp_send_to, which is not set"),
    (lambda v: not v["modem"] and (v["modem_phonebook"] is not None or v["modem_init"] is not None),
     "modem", "is off, but modem_phonebook or modem_init is set: add modem = yes"),
) + tuple(
    # modem = yes makes its own calls, one at a time, and its device speaks AT commands
    (lambda v, key=key: v["modem"] and v[key] != PORT_SCHEMA[key].default, key, "cannot go with modem = yes: " + why)
    for key, why in MODEM_CONFLICTS
) + (
    (lambda v: v["mdns"] and v["listen"] is None,
     "mdns", "announces the TCP service on listen, which is not set (a client-role port offers no service)"),
    (lambda v: not v["mdns"] and any(v[k] != PORT_SCHEMA[k].default for k in ("mdns_name", "mdns_type", "mdns_txt")),
     "mdns", "is off, but an mdns_* key is set: add mdns = yes"),
    (lambda v: v["open_on_demand"] and v["listen"] is None and v["connect"] is None,
     "open_on_demand", "opens the device while a TCP client is connected; set listen or connect (UDP has no connections)"),
)


# ---------------------------------------------------------------------
# Modules a feature needs: OpenWrt splits the standard library in packages
# ---------------------------------------------------------------------

def is_url(device):
    return device is not None and "://" in device


def non_ascii(*names):
    """True if a host name needs the idna codec (see resolver_host)."""
    return any(name and not name.isascii() for name in names)


# One row per feature beyond OpenWrt's python3-light: (does this port use
# it, the key to blame, the modules it imports, the package that has
# them).  A missing module is a configuration error naming the package, so
# --check, the start and a reload refuse the feature instead of a
# traceback at the first use.
PORT_NEEDS = (
    (lambda v: v["tls"], "tls", ("ssl",), "python3-openssl"),
    (lambda v: v["tls_cert"] is not None, "tls_cert", ("ssl",), "python3-openssl"),
    (lambda v: is_url(v["device"]), "device", ("urllib.parse",), "python3-urllib"),
    (lambda v: is_url(v["device"]), "device", ("logging",), "python3-logging"),
    # pyserial's socket:// and rfc2217:// resolve str hosts: the idna codec
    (lambda v: is_url(v["device"]) and v["device"].split("://")[0] in ("socket", "rfc2217"),
     "device", ("encodings.idna",), "python3-codecs"),
    (lambda v: v["connect"] is not None and non_ascii(*(host for host, _ in v["connect"])),
     "connect", ("encodings.idna",), "python3-codecs"),
    (lambda v: v["listen"] is not None and non_ascii(v["listen"][0]), "listen", ("encodings.idna",), "python3-codecs"),
    (lambda v: non_ascii(v["tls_server_name"]), "tls_server_name", ("encodings.idna",), "python3-codecs"),
)
GLOBAL_NEEDS = (
    (lambda v: v["status"] is not None and non_ascii(v["status"][0]), "status", ("encodings.idna",), "python3-codecs"),
)
_importable = {}


def missing_module(names):
    """The first of the modules that cannot be imported, or None."""
    for name in names:
        if name not in _importable:
            try:
                __import__(name)
                _importable[name] = True
            except ImportError:
                _importable[name] = False
        if not _importable[name]:
            return name
    return None


def check_needs(rows, values, where_of, errors):
    for uses, key, modules, package in rows:
        missing = uses(values) and missing_module(modules)
        if missing:
            errors.append(ConfigError(where_of(key), key, "needs the Python module %s, which this Python lacks "
                                      "(OpenWrt: opkg install %s)" % (missing, package)))


def _validate_port(port, where_of, errors):
    """Combinations that each key alone cannot check: PORT_RULES, then
    the modules and files the port needs."""
    v = port.values
    for broken, key, message in PORT_RULES:
        if broken(v):
            shown = {k: PORT_SCHEMA[k].format(value) for k, value in v.items()}
            errors.append(ConfigError(where_of(key), key, message.format(name=port.name, **shown)))
    check_needs(PORT_NEEDS, v, where_of, errors)
    _check_port_files(port, where_of, errors)


def _check_port_files(port, where_of, errors):
    """The TLS files must be regular files, of PEM of the right kind."""
    v = port.values
    for key in ("tls_cert", "tls_key", "tls_ca"):
        if v[key] is None:
            continue
        try:
            content = read_regular_file(v[key], PEM_FILE_LIMIT)
        except OSError as e:
            errors.append(ConfigError(where_of(key), key, "cannot read %s: %s" % (v[key], e.strerror)))
            continue
        except ValueProblem as e:
            errors.append(ConfigError(where_of(key), key, "%s %s" % (v[key], e)))
            continue
        wanted = b"PRIVATE KEY-----" if key == "tls_key" else b"-----BEGIN CERTIFICATE-----"
        if wanted not in content:
            errors.append(ConfigError(where_of(key), key, "%s is not a PEM %s"
                                      % (v[key], "private key" if key == "tls_key" else "certificate")))


def _validate_ports(ports, where_of_port, errors):
    """Rules across ports: shared listeners, one device per port."""
    by_listen = {}
    for port in ports:
        if port.values["listen"] is not None:
            by_listen.setdefault(port.values["listen"], []).append(port)
    for address, group in by_listen.items():
        if len(group) < 2:
            continue
        for key in ("tls_cert", "tls_key", "tls_ca", "password", "password_file"):
            settings = {p.values[key] for p in group}
            if len(settings) > 1:
                errors.append(ConfigError(where_of_port(group[1], key), key,
                                          "ports sharing %s (%s) must have the same %s: TLS and the password "
                                          "come before the id that picks the port"
                                          % (show_hostport(address), ", ".join("[%s]" % p.name for p in group), key)))
        for port in group:
            if port.values["identity"] is None and port.values["allow"] is None:
                errors.append(ConfigError(where_of_port(port, "listen"), "listen",
                                          "%s is shared by %s; each port on it needs identity or allow"
                                          % (show_hostport(address), ", ".join("[%s]" % p.name for p in group))))
    by_udp = {}
    for port in ports:
        address = port.values["udp_listen"]
        if address is not None and address in by_udp:
            errors.append(ConfigError(where_of_port(port, "udp_listen"), "udp_listen",
                                      "%s is already port [%s]'s udp_listen: a datagram has no id to pick a port by"
                                      % (show_hostport(address), by_udp[address])))
        by_udp.setdefault(address, port.name)
    seen = {}
    for port in ports:
        for key in ("device", "virtual"):
            path = port.values[key]
            if path is None or "://" in path and path.startswith("loop://"):
                continue
            if path in seen:
                errors.append(ConfigError(where_of_port(port, key), key,
                                          "%s is already used by port [%s]" % (path, seen[path])))
            seen[path] = port.name


def parse_command_line(argv):
    """Split argv into options: returns (opts, flag settings, device)."""
    opts = {"config": None, "check": False, "print_service": None, "print_example": False,
            "help": False, "version": False}
    port_flags, global_flags = {}, {}
    device = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg.startswith("--") and "=" in arg:
            arg, value = arg.split("=", 1)

        def take():
            nonlocal i
            if value is not None:
                return value
            i += 1
            if i >= len(argv):
                raise ConfigError(arg, None, "needs a value")
            return argv[i]
        if arg in ("-h", "--help"):
            opts["help"] = True
        elif arg == "--version":
            opts["version"] = True
        elif arg == "--check":
            opts["check"] = True
        elif arg == "--print-example":
            opts["print_example"] = True
        elif arg in ("-c", "--config"):
            opts["config"] = take()
        elif arg == "--print-service":
            opts["print_service"] = take()
        elif arg in FLAG_TO_KEY:
            key = FLAG_TO_KEY[arg]
            target = global_flags if key.name in GLOBAL_SCHEMA else port_flags
            target[key.name] = Setting(take(), arg)
        elif arg.startswith("-") and arg != "-":
            raise ConfigError(arg, None, "unknown option (see --help)")
        elif device is None:
            device = arg
        else:
            raise ConfigError(arg, None, "only one DEVICE may be given (use -c FILE for several ports)")
        i += 1
    return opts, port_flags, global_flags, device


def build_config(config_path, port_flags, global_flags, device):
    """Merge file, flags and DEVICE into a validated Config, or raise a
    list of every ConfigError found."""
    errors = []
    sections = IniSections()
    if config_path is not None:
        try:
            sections, read_errors = read_ini(config_path)
            errors += read_errors
        except ConfigError as e:
            raise ConfigErrors([e])
    global_settings = dict(sections.pop("global", {}))
    default_settings = sections.pop("DEFAULT", {})
    for key, setting in default_settings.items():
        if key in GLOBAL_SCHEMA:
            errors.append(ConfigError(setting.where, key, "is a global key; put it in [global]"))
    if CLI_PORT in sections and (device or "virtual" in port_flags):
        errors.append(ConfigError(config_path, None, "section [%s] clashes with the port given on the command line" % CLI_PORT))
    global_settings.update(global_flags)
    global_values = _parse_settings(GLOBAL_SCHEMA, global_settings, "[global]", errors)
    check_needs(GLOBAL_NEEDS, global_values, lambda key: global_settings[key].where, errors)

    port_sections = list(sections.items())
    if device is not None or port_flags:
        cli = dict(port_flags)
        if device is not None:
            cli["device"] = Setting(device, "DEVICE")
        if "device" not in cli and "virtual" not in cli:
            errors.append(ConfigError(None, None, "flags %s describe the command-line port, which needs DEVICE or --virtual"
                                      % ", ".join(s.where for s in port_flags.values())))
        else:
            port_sections.append((CLI_PORT, cli))
    if not port_sections:
        errors.append(ConfigError(config_path, None, "no ports: give DEVICE or --virtual PATH, or -c FILE with a port section"))

    ports = []
    wheres = {}
    for name, settings in port_sections:
        merged = dict(default_settings)
        merged.update(settings)
        label = "[%s]" % name
        for key in sorted(set(settings) & set(GLOBAL_SCHEMA)):
            errors.append(ConfigError(settings[key].where, key, "is a global key; put it in [global]"))
        values = _parse_settings(PORT_SCHEMA, {k: s for k, s in merged.items() if k not in GLOBAL_SCHEMA}, label, errors)
        port = PortConfig(name, values)
        if values["password"] is not None:
            port.secret = values["password"].encode("utf-8")
        elif values["password_file"] is not None:
            # read at every (re)load, so SIGHUP picks up a changed file
            port.secret = read_secret_line(values["password_file"], merged["password_file"].where,
                                           "password_file", errors)
        ports.append(port)
        wheres[name] = merged

        header = sections.headers.get(name)

        def where_of(key, merged=merged, label=label, header=header):
            s = merged.get(key)
            if s is not None:
                return s.where
            return header or (config_path or "command line") + " " + label
        _validate_port(port, where_of, errors)

    _validate_ports(ports, lambda port, key: (wheres[port.name][key].where if key in wheres[port.name]
                                              else "[%s]" % port.name), errors)
    token = read_control_token(global_values, global_settings, errors)
    if errors:
        raise ConfigErrors(errors)
    config = Config(global_values, ports, config_path)
    config.control_token = token
    return config


def read_secret_line(path, where, key, errors):
    """The first line of a password or token file, read again at every
    (re)load; None after adding an error (unreadable, empty, too long)."""
    try:
        content = read_regular_file(path, PASSWORD_FILE_LIMIT)
    except OSError as e:
        errors.append(ConfigError(where, key, "cannot read %s: %s" % (path, e.strerror)))
        return None
    except ValueProblem as e:
        errors.append(ConfigError(where, key, "%s %s" % (path, e)))
        return None
    line = content.split(b"\n", 1)[0].rstrip(b"\r\n")
    if not line:
        errors.append(ConfigError(where, key, "the first line of %s is empty" % path))
    elif len(line) > PASSWORD_LINE_LIMIT:
        errors.append(ConfigError(where, key, "the first line of %s is longer than %d bytes" % (path, PASSWORD_LINE_LIMIT)))
    else:
        return line
    return None


def read_control_token(values, settings, errors):
    """The control API's token as bytes (control_token, or the first line
    of control_token_file), or None: the API is off.  The keys of the
    status endpoint need `status`."""
    def where(key):
        return settings[key].where
    for key in ("control_token", "control_token_file", "status_allow"):
        if values[key] is not None and values["status"] is None:
            errors.append(ConfigError(where(key), key, "needs status (the HTTP endpoint it applies to)"))
    if values["control_token"] is not None and values["control_token_file"] is not None:
        errors.append(ConfigError(where("control_token_file"), "control_token_file",
                                  "set control_token or control_token_file, not both"))
        return None
    if values["control_token"] is not None:
        key, token = "control_token", values["control_token"].encode("utf-8")
    elif values["control_token_file"] is not None:
        key = "control_token_file"
        token = read_secret_line(values[key], where(key), key, errors)
    else:
        return None
    # it travels in a header line: "Authorization: Bearer TOKEN"
    if token is not None and not (0 < len(token) <= PASSWORD_LINE_LIMIT and all(33 <= b < 127 for b in token)):
        errors.append(ConfigError(where(key), key, "must be 1-%d printable ASCII characters without spaces "
                                  "(it is sent in an HTTP header)" % PASSWORD_LINE_LIMIT))
        return None
    return token


class ConfigErrors(Exception):
    def __init__(self, errors):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def format_config(config):
    """The effective configuration as INI text (for --check)."""
    lines = ["# effective configuration (defaults filled in)", "[global]"]
    for key in GLOBAL_KEYS:
        lines.append("%s = %s" % (key.name, key.format(config.globals[key.name])))
    for port in config.ports:
        lines.append("")
        lines.append("[%s]" % port.name)
        for key in PORT_KEYS:
            lines.append("%s = %s" % (key.name, key.format(port.values[key.name])))
    return "\n".join(lines) + "\n"


def example_ini():
    """sertcp.ini.example, generated from the schema (a test keeps the file
    in the repository equal to this)."""
    out = ["# sertcp.ini.example - every key with its default and meaning.",
           "# Generated from the schema in sertcp.py: python3 sertcp.py --print-example",
           "#",
           "# [global] holds process-wide keys; every other section is one serial port.",
           "# [DEFAULT] keys apply to every port. Booleans: yes/no/true/false/on/off/1/0.",
           "# Sizes: 4096, 64k, 1m. Times in seconds unless the key ends in _ms.",
           "# A number outside the range after 'allowed:' is an error (--check says so).",
           "# Byte strings (banner, connect_id, identity, pack_delimiter) take C escapes.",
           "", "[global]"]
    for key in GLOBAL_KEYS:
        out.append("# %s" % key.described)
        out.append("%s%s = %s" % ("" if key.default is not None else ";", key.name, key.format(key.default)))
    out += ["", "# One port: a virtual serial port bridged to TCP port 7000.",
            "# Change 'virtual' to 'device = /dev/ttyUSB0' for a real adapter.", "[example]"]
    for key in PORT_KEYS:
        out.append("# %s" % key.described)
        if key.name == "virtual":
            out.append("virtual = /tmp/ttySERTCP0")
        elif key.name == "listen":
            out.append("listen = 127.0.0.1:7000")
        else:
            out.append("%s%s = %s" % ("" if key.default is not None else ";", key.name, key.format(key.default)))
    return "\n".join(out) + "\n"


# =====================================================================
# 3. Protocol cores (sans-I/O)
# =====================================================================

class Packer:
    """Device->network packetizing: size, delimiter (+ trailing bytes, strip),
    idle gap and maximum hold, in any combination.

    feed(data, now) returns the packets completed by data; deadline() says
    when expire(now) must be called to flush on the idle or max timer.  With
    no rule set, `enabled` is False and the caller bypasses the packer."""

    def __init__(self, size=0, delimiter=None, trailing=0, strip=False, idle=0.0, max_hold=0.0,
                 limit=MAX_PACKET):
        self.size = size
        self.delimiter = delimiter or b""
        self.trailing = trailing
        self.strip = strip
        self.idle = idle
        self.max_hold = max_hold
        self.limit = max(limit, size)
        self.enabled = bool(size or self.delimiter or idle or max_hold)
        self.pending = bytearray()
        self.first_at = None       # when the oldest pending byte arrived
        self.last_at = None        # when the newest pending byte arrived
        self.scan_from = 0         # delimiter search resumes here

    @classmethod
    def from_config(cls, port):
        return cls(port.pack_size, port.pack_delimiter, port.pack_trailing, port.pack_strip,
                   port.pack_idle_ms / 1000.0, port.pack_max_ms / 1000.0)

    def feed(self, data, now):
        if not data:
            return []
        if not self.pending:
            self.first_at = now
        self.last_at = now
        self.pending += data
        packets = []
        while self.pending:
            cut = self._find_cut()
            if cut is None:
                break
            if cut[0] > self.limit:     # a delimiter straddling the limit: the limit wins
                cut = (self.limit, self.limit, 0)
            packets.append(self._take(cut))
        while len(self.pending) >= self.limit:
            packets.append(self._take((self.limit, self.limit, 0)))
        return packets

    def _find_cut(self):
        """(end of packet, end of delimiter region to strip, delimiter length)."""
        best = None
        if self.delimiter:
            start = max(0, self.scan_from - len(self.delimiter) + 1)
            at = self.pending.find(self.delimiter, start)
            if at >= 0:
                end = at + len(self.delimiter) + self.trailing
                if end <= len(self.pending):
                    best = (end, at, len(self.delimiter))
                else:
                    self.scan_from = at  # wait for the trailing bytes
                    if self.size and len(self.pending) >= self.size and self.size <= at:
                        return (self.size, self.size, 0)
                    return None
            else:
                self.scan_from = len(self.pending)
        if self.size and len(self.pending) >= self.size and (best is None or self.size < best[0]):
            return (self.size, self.size, 0)
        return best

    def _take(self, cut):
        end, delimiter_at, delimiter_len = cut
        packet = bytes(self.pending[:end])
        if self.strip and delimiter_len:
            packet = packet[:delimiter_at] + packet[delimiter_at + delimiter_len:]
        del self.pending[:end]
        self.scan_from = 0
        if self.pending:
            self.first_at = self.last_at  # the rest arrived with the newest chunk
        else:
            self.first_at = None
        return packet

    def deadline(self):
        if not self.pending:
            return None
        times = []
        if self.idle:
            times.append(self.last_at + self.idle)
        if self.max_hold:
            times.append(self.first_at + self.max_hold)
        return min(times) if times else None

    def expire(self, now):
        """Flush what is pending if the idle gap or the maximum hold ran out."""
        due = self.deadline()
        if due is None or now < due:
            return []
        return [self.flush()]

    def flush(self):
        packet = bytes(self.pending)
        self.pending.clear()
        self.first_at = self.last_at = None
        self.scan_from = 0
        return packet


def choose_clients(policy, clients, active):
    """Which of `clients` (oldest first) a policy selects.

    Serial to Ethernet Connector's terms: first / last are the oldest /
    newest connection; last_active is the client that most recently sent
    data (`active`), or the newest when none has sent yet."""
    if not clients or policy == "none":
        return ()
    if policy == "all":
        return clients
    if policy == "first":
        return clients[:1]
    if policy == "last":
        return clients[-1:]
    if policy == "last_active":
        return (active,) if active is not None else clients[-1:]
    raise ValueError(policy)


def client_selected(policy, client, clients):
    """True if `client` may send to the device under `policy`."""
    if policy == "all":
        return True
    if policy == "none" or not clients:
        return False
    if policy == "first":
        return client is clients[0]
    if policy == "last":
        return client is clients[-1]
    # last_active: the client that sent most recently holds the device; a
    # client that sends becomes that client, so its own data is accepted.
    return True


def udp_source_selected(policy, source, holder, tcp_clients):
    """True if a datagram from `source` may go to the device under the
    receive_from `policy`.  A source counts as a client that exists while
    it sends: it is the newest and the latest active at that moment, so
    all, last and last_active take every datagram.  first takes them from
    the `holder` (the first source heard, kept while it sends within
    `timeout`) only, and from nobody while a TCP client is connected
    (that client came first)."""
    if policy == "none":
        return False
    if policy == "first":
        return not tcp_clients and (holder is None or holder == source)
    return True


class IdentityMatcher:
    """The id a client sends first on a shared listener (IOT-Tree's
    "Common" identity): bytes up to LF, CR LF or a pause, compared with the
    ids of the ports on that listener.

    feed(data, now) and expire(now) return None while undecided, else
    (outcome, id, rest): outcome is "match", "unknown" or "late"; rest is
    what came after the id and belongs to the device."""

    def __init__(self, ids, started, timeout, pause=IDENTITY_PAUSE):
        # a dict or set is used as it is: a listener shares one among
        # all its handshakes
        self.ids = ids if isinstance(ids, (dict, set, frozenset)) else frozenset(ids)
        self.buffer = bytearray()
        self.give_up_at = started + timeout
        self.pause = pause
        self.last_at = None
        # an id can be no longer than the longest known one (plus CR LF)
        self.limit = max(len(i) for i in self.ids) + 2 if self.ids else 2

    def feed(self, data, now):
        self.buffer += data
        self.last_at = now
        end = self.buffer.find(b"\n")
        if end >= 0:
            return self._decide(bytes(self.buffer[:end]), bytes(self.buffer[end + 1:]))
        if len(self.buffer) > self.limit:
            return ("unknown", bytes(self.buffer[:self.limit]), b"")
        return None

    def deadline(self):
        if self.buffer:
            return min(self.give_up_at, self.last_at + self.pause)
        return self.give_up_at

    def expire(self, now):
        if self.buffer and now >= self.last_at + self.pause:
            return self._decide(bytes(self.buffer), b"")
        if now >= self.give_up_at:
            return ("late", bytes(self.buffer), b"")
        return None

    def _decide(self, line, rest):
        if line.endswith(b"\r"):
            line = line[:-1]
        return ("match" if line in self.ids else "unknown", line, rest)


def next_backoff(failures, low, high, entropy):
    """Pause before the next dial after `failures` failed rounds: doubling
    from low up to high, with up to 20% jitter taken off (entropy in 0..1)
    so that a fleet that lost its server does not redial in step."""
    base = min(high, low * (2 ** min(failures - 1, 30)))
    return max(low, base * (1.0 - 0.2 * entropy)) if failures else low


# ---------------------------------------------------------------------
# Telnet (RFC 854/855) with loop-free option negotiation (RFC 1143)
# ---------------------------------------------------------------------

IAC, DONT, DO, WONT, WILL, SB = 255, 254, 253, 252, 251, 250
GA, EL, EC, AYT, AO, IP, BRK, DM, NOP, SE = 249, 248, 247, 246, 245, 244, 243, 242, 241, 240
OPT_BINARY, OPT_ECHO, OPT_SGA, OPT_COM_PORT = 0, 1, 3, 44
TELNET_OPTION_NAMES = {OPT_BINARY: "BINARY", OPT_ECHO: "ECHO", OPT_SGA: "SGA", OPT_COM_PORT: "COM-PORT-OPTION"}
TELNET_COMMAND_NAMES = {NOP: "NOP", DM: "DM", BRK: "BRK", IP: "IP", AO: "AO", AYT: "AYT", EC: "EC",
                        EL: "EL", GA: "GA", SE: "SE"}
TELNET_SB_LIMIT = 512          # bytes in one subnegotiation; a longer one is discarded whole

# RFC 1143 section 7 as a table, for one side of one option.  "us" is our
# WILL/WONT (the peer's DO/DONT asks for it), "him" is the peer's
# WILL/WONT (our DO/DONT).  A state is (state, opposite queued).
#   (state, queued, peer says yes) -> (new state, queued, we answer)
# where the answer is our "yes" verb, our "no" verb or nothing.  A peer
# asking for an option we do not support is answered "no" instead.
Q_ON_PEER = {
    ("no", False, True): ("yes", False, "yes"),
    ("no", False, False): ("no", False, None),
    ("yes", False, True): ("yes", False, None),
    ("yes", False, False): ("no", False, "no"),
    ("wantno", False, True): ("no", False, None),        # the peer broke the rules: DONT answered by WILL
    ("wantno", True, True): ("yes", False, None),
    ("wantno", False, False): ("no", False, None),
    ("wantno", True, False): ("wantyes", False, "yes"),
    ("wantyes", False, True): ("yes", False, None),
    ("wantyes", True, True): ("wantno", False, "no"),
    ("wantyes", False, False): ("no", False, None),
    ("wantyes", True, False): ("no", False, None),
}
#   (state, queued, we want it on) -> (new state, queued, we send)
Q_ON_REQUEST = {
    ("no", False, True): ("wantyes", False, "yes"),
    ("no", False, False): ("no", False, None),
    ("yes", False, True): ("yes", False, None),
    ("yes", False, False): ("wantno", False, "no"),
    ("wantno", False, True): ("wantno", True, None),
    ("wantno", True, True): ("wantno", True, None),
    ("wantno", False, False): ("wantno", False, None),
    ("wantno", True, False): ("wantno", False, None),
    ("wantyes", False, True): ("wantyes", False, None),
    ("wantyes", True, True): ("wantyes", False, None),
    ("wantyes", False, False): ("wantyes", True, None),
    ("wantyes", True, False): ("wantyes", True, None),
}
TELNET_VERBS = {("us", "yes"): WILL, ("us", "no"): WONT, ("him", "yes"): DO, ("him", "no"): DONT}

_T_DATA, _T_IAC, _T_VERB, _T_SB, _T_SB_IAC = range(5)


def undouble_iac(data):
    """(data with each IAC IAC made one IAC, whether a lone IAC ends it), or
    None if an IAC in it starts a command.  Two ways to the same result,
    by the density of IAC in the first 4 KiB: where IAC is sparse,
    splitting on it (one memchr-speed pass) beats replacing the two-byte
    IAC IAC, which bytes.replace searches for far more slowly; where it is
    dense, the pieces cost more than the search."""
    if data.count(b"\xff", 0, 4096) * 12 < min(len(data), 4096):    # under 1 byte in 12 (measured)
        pieces = data.split(b"\xff")
        odd_tail = not len(pieces) & 1         # an odd number of IAC
        if odd_tail:
            if pieces[-1]:
                return None                    # the lone IAC is not the last byte
            pieces.pop()
        # doubled, each IAC IAC leaves an empty piece between its two
        if any(pieces[1::2]):
            return None
        return b"\xff".join(pieces[0::2]), odd_tail
    odd_tail = bool((len(data) - len(data.rstrip(b"\xff"))) & 1)
    body = data[:-1] if odd_tail else data
    halved = body.replace(b"\xff\xff", b"\xff")
    # every IAC was doubled exactly when each one left has lost its twin
    if len(body) - len(halved) != halved.count(b"\xff"):
        return None
    return halved, odd_tail


class TelnetCodec:
    """Telnet for one connection, sans-I/O.

    feed(data) returns, in the order they arrived, bytes (payload for the
    device: IAC IAC undone, and CR NUL undone while the peer does not send
    BINARY) and event tuples:
        ("enabled", side, option) / ("disabled", side, option)
        ("sb", option, body)      a complete subnegotiation, IAC IAC undone
        ("break",)                IAC BRK
        ("command", code)         NOP, DM, AYT, GA ...: never payload
        ("refused", side, option) the peer said no to our request
        ("malformed", text)       something discarded, for a debug log line
    Negotiation answers pile up until data_to_send() takes them.  `local`
    and `remote` are the options we will enable on our side (we WILL) and
    let the peer enable (we DO); every other option is refused."""

    def __init__(self, local=(), remote=(), ask_local=(), ask_remote=()):
        self.supported = {"us": frozenset(local), "him": frozenset(remote)}
        # only supported options get an entry: an unknown one is always "no"
        self.options = {"us": {}, "him": {}}
        self.outgoing = bytearray()
        self.state = _T_DATA
        self.verb = 0
        self.sb = bytearray()
        self.sb_discarding = False
        self.after_cr = False          # the last payload byte was CR (non-binary only)
        self.binary_in = False         # the peer sends BINARY: no CR NUL to undo
        self.binary_out = False        # we send BINARY: no CR to pad
        self.heard_telnet = False      # the peer has sent at least one Telnet command
        for option in ask_local:
            self.request("us", option, True)
        for option in ask_remote:
            self.request("him", option, True)

    # -- what the caller asks --

    def enabled(self, side, option):
        entry = self.options[side].get(option)
        return entry is not None and entry[0] == "yes"

    def request(self, side, option, enable):
        """Ask for an option on our side ("us") or the peer's ("him")."""
        state, queued = self.options[side].get(option, ("no", False))
        new_state, new_queued, send = Q_ON_REQUEST[(state, queued, enable)]
        if send:
            self.outgoing += bytes((IAC, TELNET_VERBS[(side, send)], option))
        self._store(side, option, new_state, new_queued, None)

    def data_to_send(self):
        """Negotiation bytes due to the peer (and forget them)."""
        out = bytes(self.outgoing)
        self.outgoing.clear()
        return out

    def escape(self, data):
        """Payload framed for the peer: IAC doubled, CR padded if not BINARY."""
        if b"\xff" in data:
            data = data.replace(b"\xff", b"\xff\xff")
        if not self.binary_out and b"\r" in data:
            # RFC 854: a bare CR goes as CR NUL; CR LF stays as it is
            data = data.replace(b"\r", b"\r\0").replace(b"\r\0\n", b"\r\n")
        return data

    @staticmethod
    def subnegotiation(option, body):
        """IAC SB option body IAC SE, with IAC in the body doubled."""
        return bytes((IAC, SB, option)) + body.replace(b"\xff", b"\xff\xff") + bytes((IAC, SE))

    # -- what the peer sent --

    def feed(self, data):
        if not self.binary_in:
            return self._parse(data)
        head = b""
        if self.state == _T_IAC and data[:1] == b"\xff":
            # the last chunk ended inside an IAC IAC pair
            head, data, self.state = b"\xff", data[1:], _T_DATA
        if self.state == _T_DATA:
            # fast path: plain data, or data whose every IAC is doubled
            if b"\xff" not in data:
                body = head + data
                return [body] if body else []
            undone = undouble_iac(data)
            if undone is not None:
                halved, odd_tail = undone
                if odd_tail:
                    self.state = _T_IAC   # a lone IAC at the end: what it starts comes next time
                body = head + halved
                return [body] if body else []
        return ([head] if head else []) + self._parse(data)

    def _parse(self, data):
        out = []
        payload = bytearray()
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state == _T_DATA:
                j = data.find(b"\xff", i)
                if j < 0:
                    payload += data[i:]
                    break
                payload += data[i:j]
                i = j + 1
                self.state = _T_IAC
                continue
            if state == _T_SB:
                j = data.find(b"\xff", i)
                end = n if j < 0 else j
                self._sb_add(data[i:end])
                if j < 0:
                    break
                i = j + 1
                self.state = _T_SB_IAC
                continue
            byte = data[i]
            i += 1
            if state == _T_IAC:
                if byte == IAC:
                    payload.append(IAC)
                    self.state = _T_DATA
                    continue
                self.heard_telnet = True
                self._flush(payload, out)
                if byte in (WILL, WONT, DO, DONT):
                    self.verb = byte
                    self.state = _T_VERB
                elif byte == SB:
                    self.sb.clear()
                    self.sb_discarding = False
                    self.state = _T_SB
                else:
                    self.state = _T_DATA
                    if byte == BRK:
                        out.append(("break",))
                    elif byte == SE:
                        out.append(("malformed", "IAC SE outside a subnegotiation"))
                    else:
                        out.append(("command", byte))
            elif state == _T_VERB:
                self.state = _T_DATA
                self._peer_says(self.verb, byte, out)
            else:  # _T_SB_IAC
                if byte == IAC:
                    self._sb_add(b"\xff")
                    self.state = _T_SB
                elif byte == SE:
                    self.state = _T_DATA
                    self._flush(payload, out)
                    if self.sb_discarding:
                        out.append(("malformed", "subnegotiation longer than %d bytes discarded" % TELNET_SB_LIMIT))
                    elif not self.sb:
                        out.append(("malformed", "empty subnegotiation"))
                    else:
                        out.append(("sb", self.sb[0], bytes(self.sb[1:])))
                    self.sb.clear()
                else:
                    # RFC 855 allows only IAC IAC and IAC SE here: drop the
                    # broken subnegotiation and read this IAC as a command
                    self._flush(payload, out)
                    out.append(("malformed", "subnegotiation cut short by IAC %d" % byte))
                    self.sb.clear()
                    self.state = _T_IAC
                    i -= 1
        self._flush(payload, out)
        return out

    def _sb_add(self, chunk):
        if self.sb_discarding:
            return
        if len(self.sb) + len(chunk) > TELNET_SB_LIMIT:
            self.sb_discarding = True
            self.sb.clear()
            return
        self.sb += chunk

    def _flush(self, payload, out):
        if not payload:
            return
        piece = bytes(payload)
        payload.clear()
        if not self.binary_in:
            if self.after_cr and piece[:1] == b"\0":
                piece = piece[1:]
            self.after_cr = piece[-1:] == b"\r"
            if b"\r\0" in piece:
                piece = piece.replace(b"\r\0", b"\r")
        if piece:
            out.append(piece)

    def _peer_says(self, verb, option, out):
        side = "us" if verb in (DO, DONT) else "him"
        yes = verb in (DO, WILL)
        state, queued = self.options[side].get(option, ("no", False))
        new_state, new_queued, answer = Q_ON_PEER[(state, queued, yes)]
        if state == "no" and yes and option not in self.supported[side]:
            new_state, answer = "no", "no"
        if answer:
            self.outgoing += bytes((IAC, TELNET_VERBS[(side, answer)], option))
        self._store(side, option, new_state, new_queued, out)

    def _store(self, side, option, state, queued, out):
        table = self.options[side]
        before = table.get(option, ("no", False))[0]
        if option in self.supported[side] or state != "no":
            table[option] = (state, queued)
        if (before == "yes") != (state == "yes"):
            if option == OPT_BINARY:
                if side == "him":
                    self.binary_in = state == "yes"
                else:
                    self.binary_out = state == "yes"
            if out is not None:
                out.append(("enabled" if state == "yes" else "disabled", side, option))
        elif before == "wantyes" and state == "no" and out is not None:
            out.append(("refused", side, option))


# ---------------------------------------------------------------------
# RFC 2217: the COM-PORT-OPTION (option 44) carried in subnegotiations
# ---------------------------------------------------------------------

RFC2217_SERVER_OFFSET = 100    # a server's code is the client's code + 100
RFC2217_COMMANDS = ("SIGNATURE", "SET-BAUDRATE", "SET-DATASIZE", "SET-PARITY", "SET-STOPSIZE",
                    "SET-CONTROL", "NOTIFY-LINESTATE", "NOTIFY-MODEMSTATE", "FLOWCONTROL-SUSPEND",
                    "FLOWCONTROL-RESUME", "SET-LINESTATE-MASK", "SET-MODEMSTATE-MASK", "PURGE-DATA")
# what each command is about, in sertcp's terms
RFC2217_ITEMS = ("signature", "baudrate", "bytesize", "parity", "stopbits", "control", "linestate",
                 "modemstate", "suspend", "resume", "linemask", "modemmask", "purge")
RFC2217_MAX_BAUD = 20000000    # a requested rate above this is out of range (answered, not applied)
PARITY_CODES = {"none": 1, "odd": 2, "even": 3, "mark": 4, "space": 5}
STOPBITS_CODES = {"1": 1, "2": 2, "1.5": 3}
FLOW_CODES = {"none": 1, "xonxoff": 2, "rtscts": 3, "dsrdtr": 19}          # outbound / both
FLOW_IN_CODES = {"none": 14, "xonxoff": 15, "rtscts": 16, "dsrdtr": 18}    # inbound
# SET-CONTROL values -> (what, wanted); wanted None asks for the value in
# force.  17 (DCD flow control) has no termios equivalent: answered like 0.
CONTROL_VALUES = {0: ("flow", None), 1: ("flow", "none"), 2: ("flow", "xonxoff"), 3: ("flow", "rtscts"),
                  4: ("break", None), 5: ("break", True), 6: ("break", False),
                  7: ("dtr", None), 8: ("dtr", True), 9: ("dtr", False),
                  10: ("rts", None), 11: ("rts", True), 12: ("rts", False),
                  13: ("flow_in", None), 14: ("flow_in", "none"), 15: ("flow_in", "xonxoff"),
                  16: ("flow_in", "rtscts"), 18: ("flow_in", "dsrdtr"), 19: ("flow", "dsrdtr")}
LINE_CODES = {"break": (5, 6), "dtr": (8, 9), "rts": (11, 12)}
MODEM_CTS, MODEM_DSR, MODEM_RI, MODEM_CD = 0x10, 0x20, 0x40, 0x80
LINE_THRE, LINE_TSRE = 0x20, 0x40   # transfer holding / shift register empty


def decode_com_port_request(body):
    """A client's COM-PORT-OPTION subnegotiation (the bytes after 44) ->
    (code, what, wanted, problem).

    `what` names the setting ("baudrate", "bytesize", "parity",
    "stopbits", "flow", "flow_in", "break", "dtr", "rts", "linemask",
    "modemmask", "purge") or the action ("signature", "linestate",
    "modemstate", "suspend", "resume"); None for a code that is not a
    client command.  `wanted` is the value asked for, or None for "tell me
    the value in force" -- a query, or a value that cannot be applied,
    which `problem` then explains."""
    if not body:
        return None, None, None, "empty COM-PORT-OPTION subnegotiation"
    code, value = body[0], body[1:]
    if code >= len(RFC2217_COMMANDS):
        return code, None, None, "COM-PORT-OPTION command %d is not a client command" % code
    what = RFC2217_ITEMS[code]
    name = RFC2217_COMMANDS[code]

    def one_byte():
        if len(value) != 1:
            return None, "%s with %d value bytes (1 expected)" % (name, len(value))
        return value[0], None

    if what == "signature":
        return code, what, value or None, None
    if what == "baudrate":
        if len(value) != 4:
            return code, what, None, "SET-BAUDRATE with %d value bytes (4 expected)" % len(value)
        baud = int.from_bytes(value, "big")
        if baud == 0:
            return code, what, None, None
        if baud > RFC2217_MAX_BAUD:
            return code, what, None, "baud rate %d out of range (1-%d)" % (baud, RFC2217_MAX_BAUD)
        return code, what, baud, None
    if what in ("linestate", "modemstate", "suspend", "resume"):
        return code, what, None, None   # any value bytes are ignored
    number, problem = one_byte()
    if problem:
        return code, ("flow" if what == "control" else what), None, problem
    if what == "bytesize":
        if number == 0:
            return code, what, None, None
        if not 5 <= number <= 8:
            return code, what, None, "data size %d out of range (5-8)" % number
        return code, what, number, None
    if what in ("parity", "stopbits"):
        codes, noun, allowed = (PARITY_CODES, "parity", "1-5") if what == "parity" else \
            (STOPBITS_CODES, "stop size", "1-3")
        names = {v: k for k, v in codes.items()}
        if number == 0:
            return code, what, None, None
        if number not in names:
            return code, what, None, "%s %d out of range (%s)" % (noun, number, allowed)
        return code, what, names[number], None
    if what == "control":
        if number not in CONTROL_VALUES:
            return code, "flow", None, "SET-CONTROL %d is not supported" % number
        item, wanted = CONTROL_VALUES[number]
        return code, item, wanted, None
    if what in ("linemask", "modemmask"):
        return code, what, number, None
    # purge: 1 receive buffer, 2 transmit buffer, 3 both
    if number not in (1, 2, 3):
        return code, what, None, "PURGE-DATA %d out of range (1-3)" % number
    return code, what, number, None


def encode_com_port_value(what, value):
    """The value bytes that report `what` (see decode_com_port_request)."""
    if what == "baudrate":
        return int(value).to_bytes(4, "big")
    if what in ("bytesize", "linemask", "modemmask", "purge", "linestate", "modemstate"):
        return bytes((value,))
    if what == "parity":
        return bytes((PARITY_CODES[value],))
    if what == "stopbits":
        return bytes((STOPBITS_CODES[value],))
    if what == "flow":
        return bytes((FLOW_CODES[value],))
    if what == "flow_in":
        return bytes((FLOW_IN_CODES[value],))
    if what in LINE_CODES:
        return bytes((LINE_CODES[what][0 if value else 1],))
    if what == "signature":
        return value
    return b""


def com_port_code(what):
    """The client command code that carries `what`."""
    if what in ("flow", "flow_in", "break", "dtr", "rts"):
        return 5
    return RFC2217_ITEMS.index(what)


def com_port_reply(what, value):
    """A server's answer (code + 100) reporting `what` = value."""
    return bytes((com_port_code(what) + RFC2217_SERVER_OFFSET,)) + encode_com_port_value(what, value)


def com_port_request(what, value):
    """A client's request (code) to set `what` to value (None: a query)."""
    code = com_port_code(what)
    if value is None:
        query = {"flow": 0, "flow_in": 13, "break": 4, "dtr": 7, "rts": 10}
        if what in query:
            return bytes((code, query[what]))
        return bytes((code,)) + (b"\0\0\0\0" if what == "baudrate" else b"\0" if code in (2, 3, 4) else b"")
    return bytes((code,)) + encode_com_port_value(what, value)


def decode_com_port_reply(body):
    """A server's COM-PORT-OPTION subnegotiation -> (what, value) or None.

    Tolerates what real servers send: the client's code instead of code +
    100, 8-byte baud rates (sredird: the rate, then 4 zero bytes), and
    FLOWCONTROL-SUSPEND/RESUME under either code."""
    if not body:
        return None
    code, value = body[0], body[1:]
    if code >= RFC2217_SERVER_OFFSET:
        code -= RFC2217_SERVER_OFFSET
    if code >= len(RFC2217_COMMANDS):
        return None
    what = RFC2217_ITEMS[code]
    if what in ("suspend", "resume"):
        return what, None
    if what == "signature":
        return what, value
    if what == "baudrate":
        if len(value) < 4:
            return None   # a 1-byte "Cisco" rate index: not a rate
        return what, int.from_bytes(value[:4], "big")
    if not value:
        return None
    number = value[0]
    if what == "parity":
        names = {v: k for k, v in PARITY_CODES.items()}
        return (what, names[number]) if number in names else None
    if what == "stopbits":
        names = {v: k for k, v in STOPBITS_CODES.items()}
        return (what, names[number]) if number in names else None
    if what == "control":
        item, state = CONTROL_VALUES.get(number, (None, None))
        if item is None or state is None:
            return None
        return item, state
    return what, number


class ComPortServer:
    """The RFC 2217 server state of one connection: its masks and what it
    was last told; builds NOTIFY bodies.  The settings themselves belong to
    the port (one device, several clients)."""

    def __init__(self):
        self.active = False            # COM-PORT-OPTION agreed in either direction
        self.modem_mask = 255          # RFC 2217 default: every modem line and delta
        self.line_mask = 0             # line state is only sent once asked for

    def modem_notification(self, state, previous):
        """NOTIFY-MODEMSTATE body for a change from `previous` to `state`
        (lines in the high nibble), or None if the mask selects nothing
        that changed.  previous None: a report asked for (no deltas)."""
        if previous is None:
            return com_port_reply("modemstate", state & self.modem_mask)
        changed = (state ^ previous) & 0xF0
        deltas = (changed >> 4) & 0x0B                  # CTS, DSR and CD deltas
        if previous & MODEM_RI and not state & MODEM_RI:
            deltas |= 0x04                              # RI: the trailing edge only
        value = (state | deltas) & self.modem_mask
        if not (changed | deltas) & self.modem_mask:
            return None
        return com_port_reply("modemstate", value)

    def line_notification(self, state, previous):
        if previous is None:
            return com_port_reply("linestate", state & self.line_mask)
        if not (state ^ previous) & self.line_mask:
            return None
        return com_port_reply("linestate", state & self.line_mask)


class ComPortClient:
    """The RFC 2217 client state of one connection: the settings asked
    of the server and what it answered.

    update(settings) returns request bodies for the settings that differ
    from what was last asked; reply(body) returns (what, value, asked) --
    asked being the value we had asked for, None if we had not -- or None
    for a body that reports nothing sertcp understands."""

    SETTINGS = ("baudrate", "bytesize", "parity", "stopbits", "flow")

    def __init__(self):
        self.active = False            # the server agreed to COM-PORT-OPTION
        self.asked = {}
        self.heard = {}
        self.timer = None              # the deadline for the server to agree

    def update(self, settings):
        bodies = []
        for what in self.SETTINGS:
            value = settings.get(what)
            if value is None or (what == "baudrate" and not 0 < value <= RFC2217_MAX_BAUD):
                continue  # B0 (hang up) or an unknown rate: nothing to ask for
            if self.asked.get(what) != value:
                self.asked[what] = value
                bodies.append(com_port_request(what, value))
        return bodies

    def reply(self, body):
        decoded = decode_com_port_reply(body)
        if decoded is None:
            return None
        what, value = decoded
        self.heard[what] = value
        return what, value, self.asked.get(what)


class ByteBuffer:
    """Device data held while nobody is connected, bounded, dropping the
    newest or the oldest bytes when full; returns how much it dropped."""

    def __init__(self, limit, drop="newest"):
        self.limit, self.drop = limit, drop
        self.data = bytearray()

    def add(self, chunk):
        if self.limit <= 0:
            return len(chunk)
        room = max(0, self.limit - len(self.data))
        if len(chunk) <= room:
            self.data += chunk
            return 0
        if self.drop == "newest":
            self.data += chunk[:room]
            return len(chunk) - room
        self.data += chunk
        dropped = len(self.data) - self.limit
        del self.data[:dropped]
        return dropped

    def take(self):
        data = bytes(self.data)
        self.data.clear()
        return data

    def __len__(self):
        return len(self.data)


# ---------------------------------------------------------------------
# Modbus: MBAP to RTU and back (protocol = modbus)
# ---------------------------------------------------------------------
# Modbus TCP masters on the network, one Modbus RTU bus on the device.
# MbapDecoder cuts a client's stream into requests; RtuAssembler cuts the
# device's bytes into frames (by the length the function code announces,
# else by silence); ModbusBus is the one-request-at-a-time scheduler.
# ModbusGateway joins them for the port: bytes and times in, actions out.

MBAP_HEADER = 7                 # transaction id, protocol id, length, unit id
MBAP_LENGTH_RANGE = (2, 254)    # unit id + function code .. unit id + 253-byte PDU
MODBUS_CLIENT_QUEUE = 16        # requests one client may have waiting; more is a flood
MODBUS_ROUND_TRIPS = 1024       # bus round trips kept for p50/p99
MODBUS_GATEWAY_NO_RESPONSE = 0x0B   # exception: gateway target device failed to respond
MODBUS_GATEWAY_UNAVAILABLE = 0x0A   # exception: gateway path unavailable (the device is not open)


def modbus_crc(data):
    """CRC-16/MODBUS (reflected polynomial 0xA001, initial 0xFFFF) as
    the two bytes that end an RTU frame, low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes((crc & 0xFF, crc >> 8))


def rtu_frame(unit, pdu):
    """An RTU frame: unit id, PDU, CRC."""
    body = bytes((unit,)) + pdu
    return body + modbus_crc(body)


def mbap_frame(transaction, unit, pdu):
    """A Modbus TCP frame: the MBAP header (protocol id 0), then the PDU."""
    return (transaction.to_bytes(2, "big") + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big")
            + bytes((unit,)) + pdu)


def modbus_exception_pdu(function, code):
    return bytes((function | 0x80, code))


def rtu_char_time(baudrate, bytesize=8, parity="none", stopbits="1"):
    """Seconds one character takes on the line: start bit, data, parity, stop."""
    bits = 1 + bytesize + (0 if parity == "none" else 1) + float(stopbits)
    return bits / baudrate


def rtu_frame_gap(baudrate, bytesize=8, parity="none", stopbits="1", gap_ms=0):
    """The silence that ends an RTU frame: gap_ms if set, else 3.5
    character times, fixed at 1.75 ms above 19,200 baud (Modbus over
    serial line, 2.5.1.1)."""
    if gap_ms:
        return gap_ms / 1000.0
    if baudrate > 19200:
        return 0.00175
    return 3.5 * rtu_char_time(baudrate, bytesize, parity, stopbits)


# Length of a reply by function code, where the code tells it: a fixed
# size, or ("count", i, extra): byte i holds a count of the bytes that
# follow it, and `extra` bytes (the CRC) end the frame.
RTU_REPLY_LENGTH = {
    0x01: ("count", 2, 2), 0x02: ("count", 2, 2), 0x03: ("count", 2, 2), 0x04: ("count", 2, 2),
    0x05: 8, 0x06: 8, 0x07: 5, 0x08: 8, 0x0B: 8, 0x0C: ("count", 2, 2),
    0x0F: 8, 0x10: 8, 0x11: ("count", 2, 2), 0x14: ("count", 2, 2), 0x15: ("count", 2, 2),
    0x16: 10, 0x17: ("count", 2, 2),
}


def rtu_reply_length(frame):
    """The full length of the reply that starts with `frame`, or None
    while unknown (too few bytes yet, or a code whose reply ends only by
    silence)."""
    if len(frame) < 2:
        return None
    function = frame[1]
    if function & 0x80:
        return 5                        # unit, function | 0x80, exception code, CRC
    rule = RTU_REPLY_LENGTH.get(function)
    if rule is None or isinstance(rule, int):
        return rule
    _, at, extra = rule
    if len(frame) <= at:
        return None
    return at + 1 + frame[at] + extra


class MbapDecoder:
    """One client's Modbus TCP stream, fed as it comes: feed() returns
    ("request", transaction, unit, pdu) events, or ("malformed", why)
    after which the stream is not read further (the client is closed)."""

    def __init__(self):
        self.data = bytearray()
        self.broken = False

    def feed(self, data):
        if self.broken:
            return []
        self.data += data
        events = []
        while len(self.data) >= MBAP_HEADER:
            header = self.data
            protocol = int.from_bytes(header[2:4], "big")
            length = int.from_bytes(header[4:6], "big")
            if protocol != 0:
                return self._malformed(events, "protocol id %d (Modbus is 0)" % protocol)
            if not MBAP_LENGTH_RANGE[0] <= length <= MBAP_LENGTH_RANGE[1]:
                return self._malformed(events, "length %d out of range %d-%d" % ((length,) + MBAP_LENGTH_RANGE))
            end = 6 + length
            if len(self.data) < end:
                break
            transaction = int.from_bytes(header[0:2], "big")
            events.append(("request", transaction, header[6], bytes(header[7:end])))
            del self.data[:end]
        return events

    def pending(self):
        """Bytes of an unfinished frame (a truncated one, at the end)."""
        return len(self.data)

    def _malformed(self, events, why):
        self.broken = True
        self.data.clear()
        events.append(("malformed", why))
        return events


class RtuAssembler:
    """The device's bytes cut into RTU frames: a frame ends when it holds
    the length its function code announces, or after `gap` seconds of
    silence.  feed(data, now) / deadline() / expire(now) like Packer."""

    def __init__(self, gap):
        self.gap = gap
        self.frame = bytearray()
        self.last = None                # when the last byte came

    def feed(self, data, now):
        frames = []
        if self.frame and now - self.last >= self.gap:
            frames.append(bytes(self.frame))    # the silence passed before this read
            self.frame.clear()
        self.last = now
        self.frame += data
        while True:
            length = rtu_reply_length(self.frame)
            if length is None or len(self.frame) < length:
                break
            frames.append(bytes(self.frame[:length]))
            del self.frame[:length]
        return frames

    def deadline(self):
        return self.last + self.gap if self.frame else None

    def expire(self, now):
        if self.frame and now >= self.last + self.gap:
            frame = bytes(self.frame)
            self.frame.clear()
            return [frame]
        return []


class ModbusRequest:
    __slots__ = ("client", "transaction", "unit", "pdu", "tries", "queued_at")

    def __init__(self, client, transaction, unit, pdu, queued_at):
        self.client, self.transaction, self.unit, self.pdu = client, transaction, unit, pdu
        self.tries = 0
        self.queued_at = queued_at


# The bus: (state, event) -> next state.  One request is on the bus at a
# time; "waiting" ends with its reply, a bad reply or the timeout (then a
# retry or exception 0x0B); a broadcast is not answered, so the bus is
# held ("turnaround") until the device has had time to act on it.
MODBUS_BUS_ON = {
    ("idle", "send"): "waiting",
    ("idle", "send_broadcast"): "turnaround",
    ("waiting", "reply"): "idle",
    ("waiting", "bad_reply"): "idle",
    ("waiting", "timeout"): "idle",
    ("turnaround", "timeout"): "idle",
}


class ModbusBus:
    """The RTU bus shared by every client: requests wait in arrival
    order, one goes out at a time, its answer goes back to the client
    that asked.  A reply with a bad CRC, from another unit or for another
    function counts as no reply: the request is tried again (retries) or
    answered with exception 0x0B.  While the device is not open
    (available = False) a request is answered with exception 0x0A at
    once, and so is the one on the bus when the device goes.  Returns actions:
    ("write", rtu bytes), ("reply", client, mbap bytes),
    ("flood", client) (a client with too many requests waiting), and
    ("stray", n bytes, why) for device bytes nobody asked for."""

    def __init__(self, timeout, retries, turnaround, char_time=0.0, queue_limit=MODBUS_CLIENT_QUEUE):
        self.timeout, self.retries, self.turnaround = timeout, retries, turnaround
        self.char_time = char_time      # a frame's own time on the wire is added to the waits
        self.queue_limit = queue_limit
        self.state = "idle"
        self.queue = deque()
        self.waiting = {}               # client -> its requests in the queue
        self.current = None
        self.due = None
        self.sent_at = None
        self.counters = dict(requests=0, replies=0, timeouts=0, crc_errors=0, bad_replies=0,
                             broadcasts=0, exceptions_sent=0, unavailable=0)
        self.round_trips = deque(maxlen=MODBUS_ROUND_TRIPS)

    def _move(self, event):
        self.state = MODBUS_BUS_ON[self.state, event]

    def depth(self):
        return len(self.queue) + (self.current is not None)

    def request(self, client, transaction, unit, pdu, now, available=True):
        if self.waiting.get(client, 0) >= self.queue_limit:
            return [("flood", client)]
        self.counters["requests"] += 1
        if not available:
            return self._unavailable(ModbusRequest(client, transaction, unit, pdu, now))
        self.queue.append(ModbusRequest(client, transaction, unit, pdu, now))
        self.waiting[client] = self.waiting.get(client, 0) + 1
        return self._next(now)

    def forget(self, client):
        """A client left: its waiting requests go; a reply to the one on
        the bus is thrown away when it comes."""
        if self.waiting.pop(client, None):
            self.queue = deque(r for r in self.queue if r.client is not client)
        if self.current is not None and self.current.client is client:
            self.current.client = None

    def frame(self, frame, now):
        """A whole RTU frame from the device."""
        request = self.current
        if self.state != "waiting":
            return [("stray", len(frame), "device sent %d bytes with no request on the bus" % len(frame))]
        if len(frame) < 4 or modbus_crc(frame[:-2]) != frame[-2:]:
            self.counters["crc_errors"] += 1
            return self._no_reply(now, "bad_reply")
        if frame[0] != request.unit or frame[1] & 0x7F != request.pdu[0]:
            self.counters["bad_replies"] += 1
            return self._no_reply(now, "bad_reply")
        self._move("reply")
        self.counters["replies"] += 1
        self.round_trips.append(now - self.sent_at)
        self.current = self.due = None
        actions = []
        if request.client is not None:
            actions.append(("reply", request.client, mbap_frame(request.transaction, request.unit, frame[1:-2])))
        return actions + self._next(now)

    def deadline(self):
        return self.due

    def expire(self, now):
        if self.due is None or now < self.due:
            return []
        if self.state == "turnaround":
            self._move("timeout")
            self.due = None
            return self._next(now)
        self.counters["timeouts"] += 1
        return self._no_reply(now, "timeout")

    def _no_reply(self, now, event):
        self._move(event)
        request, self.current, self.due = self.current, None, None
        if request.tries <= self.retries:
            self.queue.appendleft(request)      # tried again before anything else
            if request.client is not None:
                self.waiting[request.client] = self.waiting.get(request.client, 0) + 1
            return self._next(now)
        return self._exception(request, MODBUS_GATEWAY_NO_RESPONSE) + self._next(now)

    def device_gone(self):
        """The device closed or vanished: neither the request on the bus
        nor those waiting can be answered; 0x0A for each now rather than
        0x0B one timeout after another."""
        gone = list(self.queue)
        self.queue.clear()
        self.waiting.clear()
        if self.state == "waiting":
            self._move("timeout")
            gone.insert(0, self.current)
            self.current = self.due = None
        actions = []
        for request in gone:
            actions += self._unavailable(request)
        return actions

    def _unavailable(self, request):
        self.counters["unavailable"] += 1
        return self._exception(request, MODBUS_GATEWAY_UNAVAILABLE)

    def _exception(self, request, code):
        if request.client is None or request.unit == 0:     # nobody asked, or a broadcast
            return []
        self.counters["exceptions_sent"] += 1
        pdu = modbus_exception_pdu(request.pdu[0], code)
        return [("reply", request.client, mbap_frame(request.transaction, request.unit, pdu))]

    def _next(self, now):
        if self.state != "idle" or not self.queue:
            return []
        request = self.current = self.queue.popleft()
        if request.client is not None:
            left = self.waiting[request.client] - 1
            if left:
                self.waiting[request.client] = left
            else:
                del self.waiting[request.client]
        request.tries += 1
        frame = rtu_frame(request.unit, request.pdu)
        on_wire = len(frame) * self.char_time
        self.sent_at = now
        if request.unit == 0:
            self.counters["broadcasts"] += 1
            self._move("send_broadcast")
            self.current = None
            self.due = now + on_wire + self.turnaround
        else:
            self._move("send")
            self.due = now + on_wire + self.timeout
        return [("write", frame)]

    def percentile(self, fraction):
        """The bus round trip (request written to reply complete) below
        which `fraction` of the recent ones fall, in seconds; None before any."""
        if not self.round_trips:
            return None
        ordered = sorted(self.round_trips)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class ModbusGateway:
    """Everything of protocol = modbus that needs no I/O: each client's
    MBAP stream, the device's RTU frames, the bus.  The port calls
    from_client(), from_device(), client_gone(), expire() at deadline(),
    and performs the actions (ModbusBus's, and ("close", client, why) for
    a client whose MBAP is malformed)."""

    def __init__(self, timeout, retries, gap, char_time=0.0, queue_limit=MODBUS_CLIENT_QUEUE):
        self.assembler = RtuAssembler(gap)
        self.bus = ModbusBus(timeout, retries, gap, char_time, queue_limit)
        self.decoders = {}

    @classmethod
    def from_config(cls, c):
        gap = rtu_frame_gap(c.baudrate, c.bytesize, c.parity, c.stopbits, c.modbus_frame_gap_ms)
        return cls(c.modbus_timeout_ms / 1000.0, c.modbus_retries, gap,
                   rtu_char_time(c.baudrate, c.bytesize, c.parity, c.stopbits))

    def from_client(self, client, data, now, available=True):
        decoder = self.decoders.get(client)
        if decoder is None:
            decoder = self.decoders[client] = MbapDecoder()
        actions = []
        for event in decoder.feed(data):
            if event[0] == "malformed":
                self.client_gone(client)
                return actions + [("close", client, "malformed Modbus TCP frame: %s" % event[1])]
            _, transaction, unit, pdu = event
            done = self.bus.request(client, transaction, unit, pdu, now, available)
            actions += done
            if done and done[0][0] == "flood":
                self.client_gone(client)
                break
        return actions

    def client_gone(self, client):
        """Forget a client; the bytes of a frame it left unfinished."""
        decoder = self.decoders.pop(client, None)
        self.bus.forget(client)
        return decoder.pending() if decoder is not None else 0

    def from_device(self, data, now):
        actions = []
        for frame in self.assembler.feed(data, now):
            actions += self.bus.frame(frame, now)
        return actions

    def deadline(self):
        due = [d for d in (self.assembler.deadline(), self.bus.deadline()) if d is not None]
        return min(due) if due else None

    def expire(self, now):
        actions = []
        for frame in self.assembler.expire(now):
            actions += self.bus.frame(frame, now)
        return actions + self.bus.expire(now)


# ---------------------------------------------------------------------
# DNS-SD: multicast DNS messages, records and the responder (RFC 6762/6763)
# ---------------------------------------------------------------------
# Names are tuples of labels (an instance name may hold dots and spaces:
# "cli on host"), compared without case as RFC 6762 §16 asks.

MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353
DNS_A, DNS_PTR, DNS_TXT, DNS_AAAA, DNS_SRV, DNS_ANY = 1, 12, 16, 28, 33, 255
DNS_IN = 1
DNS_RESPONSE = 0x8400            # QR and AA: every mDNS response is authoritative
DNS_UNIQUE = 0x8000              # in a record's class: cache-flush; in a question's: unicast wanted (QU)
MDNS_HOST_TTL = 120              # seconds, RFC 6762 §10: records that name a host
MDNS_OTHER_TTL = 4500            # the others
MDNS_LEGACY_TTL = 10             # the most a legacy (one-shot) querier may be told, §6.7
MDNS_PROBE_INTERVAL = 0.25       # §8.1: three probes this far apart
MDNS_ANNOUNCE_INTERVAL = 1.0     # §8.3: two announcements this far apart
MDNS_TIEBREAK_WAIT = 1.0         # §8.2: the loser of a simultaneous probe tries again after this
MDNS_REPEAT_GAP = 1.0            # §6: a record is multicast again only this long after the last time
MDNS_PROBE_REPEAT_GAP = 0.25     # ... or this long when it defends a name against a probe
MDNS_REPLY_BURST = 20            # answers sent back to back before the rate below applies
MDNS_REPLY_RATE = 10.0           # answers per second, however many queries arrive
DNS_MESSAGE_LIMIT = 9000         # bytes, §17: the most an mDNS message may hold
MDNS_READ_BURST = 1              # datagrams read per wake-up: one of 9000 bytes takes ~10 ms to decode, 64 stalled the ports


class DnsError(ValueError):
    """A malformed DNS message."""


def dns_name(labels):
    """A name's wire form, uncompressed; raises DnsError for a label of
    more than 63 bytes or a name of more than 255."""
    out = bytearray()
    for label in labels:
        raw = label.encode("utf-8")
        if not 0 < len(raw) <= 63:
            raise DnsError("label %r is not 1-63 bytes" % label)
        out += bytes((len(raw),)) + raw
    out.append(0)
    if len(out) > 255:
        raise DnsError("name longer than 255 bytes")
    return bytes(out)


def name_key(labels):
    return tuple(label.lower() for label in labels)


def read_dns_name(data, offset):
    """(labels, offset after the name) of the name at `offset`, following
    compression pointers (RFC 1035 §4.1.4); a pointer must point back,
    before the one that follows it, so a loop cannot be made."""
    labels, end, length, limit = [], None, 0, offset
    while True:
        if offset >= len(data):
            raise DnsError("name runs past the end")
        size = data[offset]
        if size >= 0xC0:
            if offset + 1 >= len(data):
                raise DnsError("pointer runs past the end")
            target = ((size & 0x3F) << 8) | data[offset + 1]
            if target >= limit:
                raise DnsError("compression pointer does not point back")
            if end is None:
                end = offset + 2
            offset = limit = target
            continue
        if size > 63:
            raise DnsError("bad label length %d" % size)
        if size == 0:
            return tuple(labels), (offset + 1 if end is None else end)
        length += size + 1
        if length > 255 or offset + 1 + size > len(data):
            raise DnsError("name too long or past the end")
        labels.append(data[offset + 1:offset + 1 + size].decode("utf-8", "replace"))
        offset += 1 + size


class DnsRecord:
    """One resource record; `rdata` in its uncompressed wire form, so that
    two records compare by their bytes (RFC 6762 §8.2)."""
    __slots__ = ("name", "rtype", "ttl", "rdata", "unique", "_key", "_wire_name")

    def __init__(self, name, rtype, ttl, rdata, unique=False):
        self.name, self.rtype, self.ttl, self.rdata, self.unique = tuple(name), rtype, ttl, rdata, unique
        self._key = self._wire_name = None

    def key(self):
        """(name, type, data) without case where DNS ignores it: the same record, whatever its TTL."""
        if self._key is None:
            self._key = (name_key(self.name), self.rtype,
                         self.rdata.lower() if self.rtype in (DNS_PTR, DNS_SRV) else self.rdata)
        return self._key

    def wire(self, ttl=None, unique=None):
        unique = self.unique if unique is None else unique
        if self._wire_name is None:
            self._wire_name = dns_name(self.name)
        return (self._wire_name + self.rtype.to_bytes(2, "big")
                + (DNS_IN | (DNS_UNIQUE if unique else 0)).to_bytes(2, "big")
                + (self.ttl if ttl is None else ttl).to_bytes(4, "big")
                + len(self.rdata).to_bytes(2, "big") + self.rdata)

    def __repr__(self):
        return "DnsRecord(%r, %d, %d, %r)" % (self.name, self.rtype, self.ttl, self.rdata)


def srv_rdata(port, target):
    return (0).to_bytes(2, "big") * 2 + port.to_bytes(2, "big") + dns_name(target)


def txt_rdata(strings):
    """TXT strings (bytes, 1-255 each); an empty TXT is one empty string (RFC 6763 §6.1)."""
    return b"".join(bytes((len(s),)) + s for s in strings) or b"\0"


def read_txt(rdata):
    strings, i = [], 0
    while i < len(rdata):
        size = rdata[i]
        strings.append(rdata[i + 1:i + 1 + size])
        i += 1 + size
    return [s for s in strings if s]


class DnsMessage:
    """A decoded message: `questions` are (name, qtype, unicast_wanted),
    the sections lists of DnsRecord."""

    def __init__(self, ident=0, flags=0, questions=(), answers=(), authorities=(), additionals=()):
        self.ident, self.flags = ident, flags
        self.questions, self.answers = list(questions), list(answers)
        self.authorities, self.additionals = list(authorities), list(additionals)

    @property
    def is_response(self):
        return bool(self.flags & 0x8000)

    def wire(self, ttl=None, unique=None):
        """The message as bytes (names uncompressed); `ttl` and `unique`
        override every record's (a legacy unicast answer)."""
        out = bytearray(self.ident.to_bytes(2, "big") + self.flags.to_bytes(2, "big"))
        for section in (self.questions, self.answers, self.authorities, self.additionals):
            out += len(section).to_bytes(2, "big")
        for name, qtype, unicast in self.questions:
            out += dns_name(name) + qtype.to_bytes(2, "big") + (DNS_IN | (DNS_UNIQUE if unicast else 0)).to_bytes(2, "big")
        for section in (self.answers, self.authorities, self.additionals):
            for record in section:
                out += record.wire(None if ttl is None else min(ttl, record.ttl), unique)
        return bytes(out)


def parse_dns_message(data):
    """A DnsMessage from bytes; raises DnsError for anything malformed.
    Records of other classes than IN are skipped; the names inside PTR and
    SRV data are decompressed."""
    if len(data) < 12:
        raise DnsError("shorter than a DNS header")
    counts = [int.from_bytes(data[i:i + 2], "big") for i in range(4, 12, 2)]
    message = DnsMessage(int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big"))
    offset = 12
    for _ in range(counts[0]):
        name, offset = read_dns_name(data, offset)
        if offset + 4 > len(data):
            raise DnsError("question runs past the end")
        qtype, qclass = int.from_bytes(data[offset:offset + 2], "big"), int.from_bytes(data[offset + 2:offset + 4], "big")
        offset += 4
        if qclass & 0x7FFF in (DNS_IN, DNS_ANY):
            message.questions.append((name, qtype, bool(qclass & DNS_UNIQUE)))
    for section, count in zip((message.answers, message.authorities, message.additionals), counts[1:]):
        for _ in range(count):
            name, offset = read_dns_name(data, offset)
            if offset + 10 > len(data):
                raise DnsError("record runs past the end")
            rtype = int.from_bytes(data[offset:offset + 2], "big")
            rclass = int.from_bytes(data[offset + 2:offset + 4], "big")
            ttl = int.from_bytes(data[offset + 4:offset + 8], "big")
            size = int.from_bytes(data[offset + 8:offset + 10], "big")
            start, offset = offset + 10, offset + 10 + size
            if offset > len(data):
                raise DnsError("record data runs past the end")
            rdata = data[start:offset]
            if rtype == DNS_PTR:
                rdata = dns_name(read_dns_name(data, start)[0])
            elif rtype == DNS_SRV:
                if size < 7:
                    raise DnsError("SRV data too short")
                rdata = data[start:start + 6] + dns_name(read_dns_name(data, start + 6)[0])
            if rclass & 0x7FFF == DNS_IN:
                section.append(DnsRecord(name, rtype, ttl, rdata, bool(rclass & DNS_UNIQUE)))
    return message


class MdnsService:
    """What one port announces: its instance name, type (labels such as
    ("_iostream", "_tcp")), TCP port, TXT strings, and the host's name and
    addresses ((family, packed address) pairs) for A and AAAA."""

    def __init__(self, key, instance, service_type, port, txt, host, addresses):
        self.key, self.instance, self.service_type, self.port = key, instance, tuple(service_type), port
        self.txt, self.host, self.addresses = list(txt), host, list(addresses)

    def same_as(self, other):
        return (self.instance, self.service_type, self.port, self.txt, self.host, self.addresses) == \
            (other.instance, other.service_type, other.port, other.txt, other.host, other.addresses)

    def full_name(self, instance=None):
        return (self.instance if instance is None else instance,) + self.service_type + ("local",)

    def host_records(self):
        host = (self.host, "local")
        return [DnsRecord(host, DNS_A if len(packed) == 4 else DNS_AAAA, MDNS_HOST_TTL, packed)
                for _, packed in self.addresses]

    def records(self, instance):
        """(answers for a PTR browse, the name's own unique records)."""
        full = self.full_name(instance)
        srv = DnsRecord(full, DNS_SRV, MDNS_HOST_TTL, srv_rdata(self.port, (self.host, "local")), True)
        txt = DnsRecord(full, DNS_TXT, MDNS_OTHER_TTL, txt_rdata(self.txt), True)
        ptr = DnsRecord(self.service_type + ("local",), DNS_PTR, MDNS_OTHER_TTL, dns_name(full))
        meta = DnsRecord(("_services", "_dns-sd", "_udp", "local"), DNS_PTR, MDNS_OTHER_TTL,
                         dns_name(self.service_type + ("local",)))
        return [ptr, meta], [srv, txt]


def clip_label(text, room=63):
    """At most `room` bytes of `text` (a DNS label holds 63), cut between characters."""
    return text.encode("utf-8")[:room].decode("utf-8", "ignore")


def next_instance_name(name):
    """RFC 6763 §9 style renaming: "NAME" -> "NAME (2)" -> "NAME (3)",
    NAME shortened if the label would grow past 63 bytes."""
    base, number = name, 1
    if name.endswith(")") and " (" in name:
        head, tail = name[:-1].rsplit(" (", 1)
        if tail.isdigit():
            base, number = head, int(tail)
    suffix = " (%d)" % (number + 1)
    return clip_label(base, 63 - len(suffix)) + suffix


# The life of one announced name: (state, event) -> (next state, what to
# send, seconds until the next "timer" event or None).  Probing (§8.1)
# asks three times whether anyone holds the name; announcing (§8.3) tells
# twice; a conflict at any point renames and probes again (§9); losing
# a simultaneous probe (§8.2) waits a second and probes again.
MDNS_NAME_ON = {
    ("waiting", "timer"): ("probe 1", "probe", MDNS_PROBE_INTERVAL),
    ("probe 1", "timer"): ("probe 2", "probe", MDNS_PROBE_INTERVAL),
    ("probe 2", "timer"): ("probe 3", "probe", MDNS_PROBE_INTERVAL),
    ("probe 3", "timer"): ("announce 1", "announce", MDNS_ANNOUNCE_INTERVAL),
    ("announce 1", "timer"): ("announced", "announce", None),
}
for _state in ("probe 1", "probe 2", "probe 3"):
    MDNS_NAME_ON[(_state, "lost tiebreak")] = ("waiting", None, MDNS_TIEBREAK_WAIT)
for _state in ("waiting", "probe 1", "probe 2", "probe 3", "announce 1", "announced"):
    # not while waiting to probe a new name: its probe finds out (a holder
    # answers it), so that renames go at most at the pace of probes, which
    # §8.1 slows down, however many claims a flood carries
    if _state != "waiting":
        MDNS_NAME_ON[(_state, "conflict")] = ("waiting", "rename", 0.0)
    MDNS_NAME_ON[(_state, "withdraw")] = ("withdrawn", "goodbye" if _state.startswith("announce") else None, None)
del _state
MDNS_OWNED = ("announce 1", "announced")     # states in which the name is ours to answer for


class MdnsName:
    """One service as the responder holds it: the name in use now, its
    state (MDNS_NAME_ON) and when its next timer event is due."""

    def __init__(self, service, now):
        self.service = service
        self.instance = service.instance
        self.state = "waiting"
        self.due = now                  # the first probe goes at once: the shell starts us after binding
        self.renames = 0
        self.made = None                # (instance, shared, unique, host records), remade on a rename

    def records(self):
        """(shared, unique) records under the name in use now."""
        if self.made is None or self.made[0] != self.instance:
            shared, unique = self.service.records(self.instance)
            self.made = (self.instance, shared, unique, self.service.host_records())
        return self.made[1], self.made[2]

    def host_records(self):
        self.records()
        return self.made[3]


class MdnsResponder:
    """Multicast DNS for a set of services, sans I/O.

    add(service, now) and remove(key) change the set; feed(data, source,
    now) takes one datagram; expire(now) runs what is due by deadline().
    Each returns a list of (bytes, destination): destination None means
    the group (224.0.0.251:5353), else the (host, port) to answer by
    unicast.  take_notes() hands out what the shell should log: ("renamed",
    old, new), ("announced", name), ("withdrawn", name).  `counters` count
    the datagrams received, those malformed and ignored, the answers
    sent, the answers held back by the rate limit, and the conflicts."""

    def __init__(self):
        self.names = {}                 # key -> MdnsName
        self.last_multicast = {}        # record key -> when it was last multicast
        self.tokens, self.tokens_at = float(MDNS_REPLY_BURST), None
        self.notes = []
        self.counters = {"mdns_packets_in": 0, "mdns_packets_malformed": 0, "mdns_answers": 0,
                         "mdns_answers_limited": 0, "mdns_conflicts": 0}

    def take_notes(self):
        notes, self.notes = self.notes, []
        return notes

    # --- the set of services ---
    def add(self, service, now):
        self.names[service.key] = MdnsName(service, now)

    def remove(self, key):
        entry = self.names.pop(key, None)
        return self._step(entry, "withdraw", None) if entry is not None else []

    def remove_all(self):
        out = []
        for key in list(self.names):
            out += self.remove(key)
        return out

    # --- time ---
    def deadline(self):
        due = [e.due for e in self.names.values() if e.due is not None]
        return min(due) if due else None

    def expire(self, now):
        out = []
        for entry in list(self.names.values()):
            if entry.due is not None and entry.due <= now:
                out += self._step(entry, "timer", now)
        return out

    def _step(self, entry, event, now):
        state, action, delay = MDNS_NAME_ON[(entry.state, event)]
        out = []
        if action == "goodbye":
            out.append(self._goodbye(entry))
            self.notes.append(("withdrawn", entry.instance))
        elif action == "rename":
            self.counters["mdns_conflicts"] += 1
            old, entry.instance = entry.instance, next_instance_name(entry.instance)
            entry.renames += 1
            self.notes.append(("renamed", old, entry.instance))
            # §8.1: after 15 conflicts in a row, slow down to one try every 5 s
            delay = 5.0 if entry.renames > 15 else delay
        entry.state = state
        entry.due = None if delay is None else now + delay
        if action == "probe":
            out.append(self._probe(entry))
        elif action == "announce":
            out.append(self._announce(entry, now))
            if state == "announce 1":
                self.notes.append(("announced", entry.instance))
        return out

    def _probe(self, entry):
        # asking for a multicast answer, not a unicast one (QU) as §8.1 suggests:
        # with several responders bound to port 5353 on this host (avahi,
        # another sertcp) the kernel would hand a unicast answer to one of them
        _, unique = entry.records()
        return (DnsMessage(0, 0, [(entry.service.full_name(entry.instance), DNS_ANY, False)],
                           authorities=unique).wire(), None)

    def _announce(self, entry, now):
        shared, unique = entry.records()
        records = shared + unique + entry.host_records()
        for record in records:
            self.last_multicast[record.key()] = now
        return (DnsMessage(0, DNS_RESPONSE, answers=records).wire(), None)

    def _goodbye(self, entry):
        shared, unique = entry.records()
        return (DnsMessage(0, DNS_RESPONSE, answers=shared + unique).wire(ttl=0), None)

    # --- what arrives ---
    def feed(self, data, source, now):
        self.counters["mdns_packets_in"] += 1
        try:
            message = parse_dns_message(data)
        except DnsError:
            self.counters["mdns_packets_malformed"] += 1
            return []
        if message.flags & 0x7800:      # an opcode other than QUERY: §18.3 says ignore
            return []
        out = []
        for entry in list(self.names.values()):
            event = self._conflict_in(entry, message)
            if (entry.state, event) in MDNS_NAME_ON:
                out += self._step(entry, event, now)
        if not message.is_response and message.questions:
            out += self._answer(message, source, now)
        return out

    def _conflict_in(self, entry, message):
        """"conflict", "lost tiebreak" or None: does `message` hold another
        host's records for the name `entry` uses?"""
        full = name_key(entry.service.full_name(entry.instance))
        _, unique = entry.records()
        ours = sorted(r.key()[1:] for r in unique)
        if message.is_response:
            for record in message.answers + message.additionals:
                if name_key(record.name) == full and record.ttl and record.rtype in (DNS_SRV, DNS_TXT) \
                        and record.key()[1:] not in ours:
                    return "conflict"
            return None
        if entry.state.startswith("probe"):
            theirs = sorted(r.key()[1:] for r in message.authorities if name_key(r.name) == full)
            if theirs and any(name_key(q[0]) == full for q in message.questions) and theirs > ours:
                return "lost tiebreak"
        return None

    def _answer(self, query, source, now):
        """The answers to a query's questions about names we own: sent to
        the group, or to the asker when it is a one-shot (legacy) querier
        on a port other than 5353 (§6.7).  QU questions get multicast
        answers too: several programs share port 5353 on one host, and a
        unicast reply would reach only one of them."""
        legacy = source[1] != MDNS_PORT
        probe = bool(query.authorities)
        # one datagram may repeat a question or a known answer hundreds of
        # times: each is looked at once, so a packet costs time in
        # proportion to its size, not to its size squared
        questions = self._unique_questions(query.questions)
        known = {}                      # record key -> the longest TTL the querier holds it with
        for record in query.answers:
            known[record.key()] = max(known.get(record.key(), 0), record.ttl)
        answers, extra = [], []
        for entry in self.names.values():
            if entry.state not in MDNS_OWNED:
                continue
            shared, unique = entry.records()
            hosts = entry.host_records()
            for wanted, qtype in questions:
                for record in shared + unique + hosts:
                    if record.key()[0] == wanted and qtype in (record.rtype, DNS_ANY):
                        answers.append(record)
                        if record.rtype == DNS_PTR and record in shared[:1]:
                            extra += unique + hosts
                        elif record.rtype == DNS_SRV:
                            extra += hosts
        # §7.1: a record the querier already holds with at least half its TTL left is not sent
        answers = self._unique(r for r in answers if known.get(r.key(), -1) < r.ttl // 2)
        if not answers:
            return []
        if not legacy:
            gap = MDNS_PROBE_REPEAT_GAP if probe else MDNS_REPEAT_GAP
            answers = [r for r in answers if now - self.last_multicast.get(r.key(), -gap) >= gap]
            if not answers:
                return []
        if not self._take_token(now):
            self.counters["mdns_answers_limited"] += 1
            return []
        given = {r.key() for r in answers}
        extra = [r for r in self._unique(extra) if r.key() not in given and r.key() not in known]
        self.counters["mdns_answers"] += 1
        if legacy:
            reply = DnsMessage(query.ident, DNS_RESPONSE, query.questions, answers, additionals=extra)
            return [(reply.wire(ttl=MDNS_LEGACY_TTL, unique=False), source)]
        for record in answers + extra:
            self.last_multicast[record.key()] = now
        return [(DnsMessage(0, DNS_RESPONSE, answers=answers, additionals=extra).wire(), None)]

    @staticmethod
    def _unique_questions(questions):
        return list(dict.fromkeys((name_key(name), qtype) for name, qtype, _ in questions))

    @staticmethod
    def _unique(records):
        seen, out = set(), []
        for record in records:
            if record.key() not in seen:
                seen.add(record.key())
                out.append(record)
        return out

    def _take_token(self, now):
        """A token bucket over every answer: a flood of queries gets at
        most MDNS_REPLY_RATE answers a second out of us (§6)."""
        if self.tokens_at is not None:
            self.tokens = min(MDNS_REPLY_BURST, self.tokens + (now - self.tokens_at) * MDNS_REPLY_RATE)
        self.tokens_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# ---------------------------------------------------------------------
# Device side: the RS-485 struct, USB identity, modem lines
# ---------------------------------------------------------------------

# struct serial_rs485 (include/uapi/linux/serial.h): __u32 flags,
# __u32 delay_rts_before_send, __u32 delay_rts_after_send, then 20 bytes
# (__u32 padding[5] in older kernels; addr_recv, addr_dest and padding in
# newer ones, all zero here): 32 bytes in the machine's byte order.
RS485_STRUCT = "=III20x"
RS485_SIZE = 32
SER_RS485_ENABLED = 1 << 0
SER_RS485_RTS_ON_SEND = 1 << 1
SER_RS485_RTS_AFTER_SEND = 1 << 2
SER_RS485_RX_DURING_TX = 1 << 4
SER_RS485_TERMINATE_BUS = 1 << 5
RS485_FLAG_NAMES = ((SER_RS485_ENABLED, "enabled"), (SER_RS485_RTS_ON_SEND, "rts_on_send"),
                    (SER_RS485_RTS_AFTER_SEND, "rts_after_send"), (SER_RS485_RX_DURING_TX, "rx_during_tx"),
                    (SER_RS485_TERMINATE_BUS, "terminate_bus"))


def rs485_pack(rts="on_send", delay_before_ms=0, delay_after_ms=0, rx_during_tx=False, terminate=False):
    """The bytes of a struct serial_rs485 that switches RS-485 mode on."""
    import struct
    flags = SER_RS485_ENABLED
    flags |= SER_RS485_RTS_ON_SEND if rts == "on_send" else SER_RS485_RTS_AFTER_SEND
    if rx_during_tx:
        flags |= SER_RS485_RX_DURING_TX
    if terminate:
        flags |= SER_RS485_TERMINATE_BUS
    return struct.pack(RS485_STRUCT, flags, delay_before_ms, delay_after_ms)


def rs485_pack_config(c):
    return rs485_pack(c.rs485_rts, c.rs485_delay_before_ms, c.rs485_delay_after_ms,
                      c.rs485_rx_during_tx, c.rs485_terminate)


def rs485_unpack(data):
    """What TIOCGRS485 reported, as /status shows it."""
    import struct
    flags, before, after = struct.unpack(RS485_STRUCT, bytes(data[:RS485_SIZE]))
    shown = {name: bool(flags & bit) for bit, name in RS485_FLAG_NAMES}
    shown["delay_before_ms"], shown["delay_after_ms"] = before, after
    return shown


def rs485_ioctls(machine):
    """(TIOCGRS485, TIOCSRS485) for os.uname().machine.  Most
    architectures use asm-generic's 0x542E/0x542F (x86, ARM, RISC-V,
    PowerPC, PA-RISC); MIPS, Alpha and SPARC define them with _IOR/_IOWR,
    whose direction bits there are read=2, write=4 at bit 29, with the
    32-byte size at bit 16, and SPARC numbers them 0x41/0x42."""
    size = RS485_SIZE << 16
    if machine.startswith(("mips", "alpha")):
        return (2 << 29) | size | 0x542E, (6 << 29) | size | 0x542F
    if machine.startswith("sparc"):
        return (2 << 29) | size | 0x5441, (6 << 29) | size | 0x5442
    return 0x542E, 0x542F


def match_usb(spec, adapters):
    """The adapters (dicts with name, vendor, product, serial, location) a
    usb: or usb@ spec (parse_usb_spec's tuple) picks, in name order."""
    if spec[0] == "location":
        picked = [a for a in adapters if a["location"] == spec[1]]
    else:
        _, vendor, product, serial = spec
        picked = [a for a in adapters
                  if vendor in ("*", a["vendor"]) and product in ("*", a["product"])
                  and serial in ("*", a["serial"])]
    return sorted(picked, key=lambda a: a["name"])


def describe_usb(adapter):
    return "%s (usb:%s:%s:%s at usb@%s)" % (adapter["name"], adapter["vendor"], adapter["product"],
                                              adapter["serial"] or "-", adapter["location"])


def line_is_on(modem, key):
    """Whether the modem line a connect_on_line/disconnect_on_line value
    names is on in a modem_status() answer ({} = no lines: off)."""
    return bool(modem.get(MODEM_LINE_NAMES[key]))


# ---------------------------------------------------------------------
# Port state machines: device life cycle, back-pressure, admission, dialing
# ---------------------------------------------------------------------
# The port (section 6) feeds these events and performs what they return;
# each holds its state in one field.

# The device's life: (state, event) -> new state.  "opening" lasts while a
# URL or socket device connects in the background; "missing" is retried
# every reopen_interval; "closed" is open_on_demand's rest, or a stop.
DEVICE_STATE_ON = {
    ("closed", "open"): "opening",
    ("missing", "open"): "opening",
    ("opening", "opened"): "open",
    ("opening", "failed"): "missing",
    ("open", "lost"): "missing",
    ("closed", "close"): "closed",
    ("opening", "close"): "closed",
    ("open", "close"): "closed",
    ("missing", "close"): "closed",
}


def device_state_after(state, event):
    """The device state after `event`; ValueError for one that cannot happen."""
    try:
        return DEVICE_STATE_ON[state, event]
    except KeyError:
        raise ValueError("device %s: no transition on %r" % (state, event))


def device_should_pause(backlogs, paused, pause_at):
    """Back-pressure, the one rule: stop reading the device while every
    client that device data goes to has at least `pause_at` bytes waiting
    (read again below half of it).  With no recipient the device is read:
    its data goes to `buffer` or is counted as dropped, never left in the
    UART for good.  Evaluated whenever a client comes, goes, drains or is
    suspended (RFC 2217), when send_to picks another client, and after
    each delivery."""
    if not backlogs:
        return False
    return min(backlogs) >= (pause_at // 2 if paused else pause_at)


def admission(connected, max_clients, when_full, network_enabled, line_on=True):
    """What to do with a client the listener accepted: "accept",
    "kick_oldest", or a reason to refuse it."""
    if not network_enabled:
        return "refuse: not open (listen_on_open)"
    if not line_on:
        return "refuse: line off (connect_on_line)"
    if connected < max_clients:
        return "accept"
    if when_full == "kick_oldest":
        return "kick_oldest"
    return "refuse: full (when_full = reject)"


class DialPlan:
    """The client role's dialing, h11-style: handle(event) moves the one
    `state` along TABLE and returns the actions for the port to perform.

    States: gathering (no reason to dial yet: event_bytes not reached, an
    incoming client holds the place, a virtual port closed), resolving
    (peer `peer` of connect), connecting (one address of it, then TLS),
    connected, waiting (a timer runs; the port sends "timer"), off.

    Events the port sends: wanted, resolved, peer_failed (name or every
    address failed), up, place_taken (an incoming client came first, or
    the virtual port closed meanwhile), we_hung_up (timeout,
    listen_on_open, kicked, slow), peer_hung_up (with held=True if the
    connection lasted or carried data), timer, stop.

    Actions returned: ("resolve", peer), ("connect",), ("admit",),
    ("back_off", seconds, failed rounds) after a failed round,
    ("wait", seconds) before redialing a peer that hung up,
    ("dial_if_wanted",)."""

    TABLE = {
        # (state, event):                       (new state, steps)
        ("gathering", "wanted"):                ("resolving", ("first_peer", "resolve")),
        ("resolving", "resolved"):              ("connecting", ("connect",)),
        ("resolving", "peer_failed"):           ("resolving", ("next_peer", "resolve")),
        ("resolving", "round_failed"):          ("waiting", ("failed_round", "back_off")),
        ("connecting", "peer_failed"):          ("resolving", ("next_peer", "resolve")),
        ("connecting", "round_failed"):         ("waiting", ("failed_round", "back_off")),
        ("connecting", "up"):                   ("connected", ("admit",)),
        ("connecting", "place_taken"):          ("gathering", ()),
        # who ended a connection decides what follows: our own hang-up is
        # no failure; a peer that accepts and closes without a word is
        ("connected", "we_hung_up"):            ("gathering", ("reset", "dial_if_wanted")),
        ("connected", "peer_hung_up"):          ("waiting", ("reset", "wait_min")),
        ("connected", "peer_hung_up_on_data"):  ("gathering", ("reset", "dial_if_wanted")),
        ("connected", "peer_hung_up_silent"):   ("waiting", ("failed_round", "back_off")),
        ("waiting", "timer"):                   ("gathering", ("dial_if_wanted",)),
    }

    def __init__(self, peers, reconnect_min, reconnect_max, on_data=False):
        self.peers = peers              # how many connect addresses
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.on_data = on_data          # event_bytes > 0: device data starts a dial
        self.state = "gathering"
        self.peer = 0
        self.failures = 0               # failed rounds since a connection last held

    def refine(self, event, held=True):
        """The TABLE's event for what the port saw: the last peer failing
        ends a round; a peer's hang-up depends on the session it ended
        (with event_bytes only device data dials, so no redial loop)."""
        if event == "peer_failed" and self.peer + 1 >= self.peers:
            return "round_failed"
        if event == "peer_hung_up":
            if self.on_data:
                return "peer_hung_up_on_data"
            if not held:
                return "peer_hung_up_silent"
        return event

    def handle(self, event, held=True, entropy=0.0):
        """Apply one event; returns the list of actions.  `held` refines
        peer_hung_up, `entropy` (0..1) jitters a back-off."""
        if event == "stop":
            self.state = "off"
            return []
        event = self.refine(event, held)
        try:
            self.state, steps = self.TABLE[self.state, event]
        except KeyError:
            raise ValueError("dial plan: %s has no transition on %r" % (self.state, event))
        actions = []
        for step in steps:
            if step == "first_peer":
                self.peer = 0
            elif step == "next_peer":
                self.peer += 1
            elif step == "reset":
                self.failures = 0
            elif step == "failed_round":
                self.failures += 1
            elif step == "back_off":
                actions.append(("back_off", next_backoff(self.failures, self.reconnect_min,
                                                         self.reconnect_max, entropy), self.failures))
            elif step == "wait_min":
                actions.append(("wait", self.reconnect_min))
            elif step == "resolve":
                actions.append(("resolve", self.peer))
            else:
                actions.append((step,))
        return actions


# ---------------------------------------------------------------------
# Hayes AT commands: the modem emulation's command and online modes
# ---------------------------------------------------------------------
# The device talks to sertcp as to a dial-up modem (Moxa's "Ethernet
# Modem" mode, tcpser): AT commands in command mode, data in online mode,
# "+++" with guard time between them.  The core below is fed the device's
# bytes and the network's events with `now`; it returns what to write to
# the device and what the port must do, and a deadline (guard time, the
# next RING, S7).  Result codes as ITU-T V.250 numbers them.

MODEM_RESULT_CODES = {"OK": 0, "CONNECT": 1, "RING": 2, "NO CARRIER": 3, "ERROR": 4, "BUSY": 7, "NO ANSWER": 8}
# S-registers a command may read and set (S0..S99), with the defaults of
# AT&F: S0 rings before auto-answer (0 = never), S1 rings so far, S2 the
# escape character (above 127: no escape), S3 end of line, S4 line feed,
# S5 backspace, S7 seconds to wait for carrier, S12 guard time in 50ths
MODEM_REGISTERS = 100
MODEM_REGISTER_DEFAULTS = {0: 0, 1: 0, 2: 43, 3: 13, 4: 10, 5: 8, 6: 2, 7: 50, 8: 2, 9: 6, 10: 14, 11: 95, 12: 50}
MODEM_RING_INTERVAL = 2.0       # seconds between RINGs of an incoming call
MODEM_LOOKUPS = 4               # name lookups (threads) at once; a dial beyond them fails
MODEM_LINE_LIMIT = 255          # characters of one command line; a longer one is an ERROR
MODEM_IGNORED = "BLMNPTWXY"     # commands taken and ignored (speaker, dial mode, result set...)
MODEM_IGNORED_AMPERSAND = "CKSWYQM"  # &C (DCD follows carrier anyway), &K flow, &W (nothing is stored)...


def modem_number(text):
    """A phonebook number as written or dialed, without the spaces and
    punctuation people put in phone numbers: "555-12 34" -> "5551234"."""
    return "".join(c for c in text if c not in " -()/")


def parse_modem_phonebook(text):
    """NUMBER=HOST:PORT[, NUMBER=HOST:PORT ...] -> {number: (host, port)}."""
    book = {}
    for entry in (e.strip() for e in text.replace("\n", ",").split(",")):
        if not entry:
            continue
        number, sep, target = entry.partition("=")
        number = modem_number(number)
        if not sep or not number:
            raise ValueProblem("expected NUMBER=HOST:PORT[, NUMBER=HOST:PORT ...], got %r" % entry)
        if number in book:
            raise ValueProblem("number %s appears twice" % number)
        book[number] = parse_hostport(target, need_host=True)
    if not book:
        raise ValueProblem("expected NUMBER=HOST:PORT[, NUMBER=HOST:PORT ...]")
    return book


def show_modem_phonebook(book):
    return ", ".join("%s=%s" % (number, show_hostport(target)) for number, target in book.items())


def parse_modem_init(text):
    """AT commands applied at start and after ATZ: "ATE0 S0=1", or several
    lines ("ATE0 ATS0=1"; a word starting with AT starts a line).  Only
    settings: no dialing, answering or hanging up."""
    lines = []
    for word in text.split():
        if word[:2].upper() == "AT" or not lines:
            lines.append(word)
        else:
            lines[-1] += " " + word
    if not lines:
        raise ValueProblem("expected AT commands such as ATE0 S0=1")
    scratch = ModemCore()
    for line in lines:
        if line[:2].upper() != "AT":
            raise ValueProblem("%r does not start with AT" % line)
        problem = scratch.settings_problem(line[2:])
        if problem:
            raise ValueProblem("%s: %s" % (line, problem))
    return tuple(lines)


class ModemCore:
    """A Hayes modem as the device sees it, sans-I/O: feed(data, now) takes
    the device's bytes, event(name, now) what the network did, expire(now)
    runs what deadline() said was due.  Each returns a list of actions:

      ("send", bytes)        write to the device (echo, results, RING)
      ("data", bytes)        online data for the remote end
      ("dial", [(host, port), ...])  call these in order (ATD)
      ("cancel_dial",)       give up the call being made (S7, a key, DTR)
      ("take_call",)         answer the caller (ATA, auto-answer)
      ("refuse_call",)       hang up on the caller (ATH while ringing)
      ("hang_up",)           end the call that is up (ATH, ATZ, DTR)
      ("hold",) / ("resume",)  online command mode: the remote's data waits
      ("ring",)              a RING went out (counted)
      ("dropped", n)         held escape characters lost with the call

    `mode` is one of command, dialing, ringing, online, online_command
    (escaped with +++, the call still up); TABLE moves it.  Events from the
    port: up, refused, failed (the dial), incoming, caller_gone,
    carrier_lost, dtr_off (refined by AT&D).  An event the table lacks is
    an ERROR for a command and ignored for the network."""

    TABLE = {
        # (mode, event):                       (new mode, steps)
        ("command", "dial"):                   ("dialing", ("dial",)),
        ("command", "incoming"):               ("ringing", ("ring",)),
        ("command", "hang_up"):                ("command", ()),
        ("command", "answer"):                 ("command", ("NO CARRIER",)),   # nobody is calling
        ("command", "go_online"):              ("command", ("NO CARRIER",)),   # no call to go back to
        ("dialing", "up"):                     ("online", ("CONNECT", "online")),
        ("dialing", "refused"):                ("command", ("BUSY",)),
        ("dialing", "failed"):                 ("command", ("NO CARRIER",)),
        ("dialing", "timeout"):                ("command", ("cancel_dial", "NO ANSWER")),
        ("dialing", "key"):                    ("command", ("cancel_dial", "NO CARRIER")),
        ("dialing", "dtr_hang_up"):            ("command", ("cancel_dial", "NO CARRIER")),
        ("ringing", "ring_timer"):             ("ringing", ("ring",)),
        ("ringing", "answer"):                 ("online", ("CONNECT", "take_call", "online")),
        ("ringing", "caller_gone"):            ("command", ()),
        ("ringing", "hang_up"):                ("command", ("refuse_call",)),
        ("online", "escape"):                  ("online_command", ("hold", "OK")),
        ("online", "carrier_lost"):            ("command", ("NO CARRIER",)),
        ("online", "dtr_hang_up"):             ("command", ("hang_up", "NO CARRIER")),
        ("online", "dtr_command"):             ("online_command", ("hold", "OK")),
        ("online_command", "go_online"):       ("online", ("CONNECT", "resume", "online")),
        ("online_command", "hang_up"):         ("command", ("hang_up",)),
        ("online_command", "carrier_lost"):    ("command", ("NO CARRIER",)),
        ("online_command", "dtr_hang_up"):     ("command", ("hang_up", "NO CARRIER")),
    }
    def __init__(self, init=(), phonebook=None):
        self.init = tuple(init)             # modem_init lines, applied by ATZ
        self.phonebook = dict(phonebook or {})
        self.mode = "command"
        self.line = bytearray()             # the command line being typed
        self.last_line = b""                # for A/
        self.held = 0                       # online: escape characters held back (0-3)
        self.plus_at = 0.0                  # when the last of them came
        self.data_at = 0.0                  # when the last online byte went through
        self.next_ring_at = None
        self.dial_deadline = None
        self.init_only = False
        self.line_failed = False            # the last line ended in ERROR
        self.reset()

    @classmethod
    def from_config(cls, c):
        return cls(c.modem_init or (), c.modem_phonebook)

    def reset(self):
        """ATZ: factory settings, then modem_init (A/ still repeats the
        device's own last line)."""
        self.factory()
        last_line = self.last_line
        for line in self.init:
            self._command_line(line.encode("ascii", "replace"), 0.0)
        self.last_line = last_line

    def factory(self):
        """AT&F: echo on, verbose results, AT&D2, the registers' defaults."""
        self.echo, self.verbose, self.quiet, self.dtr_mode = True, True, False, 2
        self.registers = dict(MODEM_REGISTER_DEFAULTS)
        self.register = 0                   # the one ATSn selected

    def settings_problem(self, commands):
        """Why an init line is not plain settings (None if it is)."""
        self.init_only = True
        try:
            self._command_line(("AT" + commands).encode("ascii", "replace"), 0.0)
        finally:
            self.init_only = False
        return "not understood (only settings such as E0, V0, Q1, S0=1, &D1 may go here)" \
            if self.line_failed else None

    # -- formatting --

    def _eol(self):
        return bytes((self.registers[3], self.registers[4]))

    def _result(self, name):
        if self.quiet:
            return b""
        if self.verbose:
            return self._eol() + name.encode("ascii") + self._eol()
        return str(MODEM_RESULT_CODES[name]).encode("ascii") + bytes((self.registers[3],))

    def _info(self, text):
        """Information text (ATI, ATSn?): framed like a verbose result, or
        only followed by CR LF in numeric mode, as V.250 frames it."""
        body = text.encode("ascii") + self._eol()
        return self._eol() + body if self.verbose else body

    # -- deadlines --

    def deadline(self):
        due = [t for t in (self.next_ring_at, self.dial_deadline) if t is not None]
        if self.mode == "online" and self.held:
            due.append(self.plus_at + self.guard())
        return min(due) if due else None

    def guard(self):
        return self.registers[12] / 50.0

    def expire(self, now):
        """What is due at `now`: the escape once guard time has passed
        after +++ (or the held + as data), NO ANSWER after S7, a RING."""
        out = []
        if self.mode == "online" and self.held and now >= self.plus_at + self.guard():
            if self.held == 3:
                self.held = 0
                out += self._event("escape", now)   # silence after the third: command mode
            else:
                out.append(("data", bytes((self.registers[2],)) * self.held))
                self.held, self.data_at = 0, self.plus_at
        if self.mode == "dialing" and self.dial_deadline is not None and now >= self.dial_deadline:
            out += self._event("timeout", now)
        if self.mode == "ringing" and self.next_ring_at is not None and now >= self.next_ring_at:
            out += self._event("ring_timer", now)
        return out

    # -- events --

    def event(self, name, now):
        """What the network (or a modem line) did; unknown here: ignored."""
        if name == "dtr_off":
            name = {0: None, 1: "dtr_command"}.get(self.dtr_mode, "dtr_hang_up")
            if name is None:
                return []
        if (self.mode, name) not in self.TABLE:
            return []
        return self._event(name, now)

    def _event(self, name, now, targets=None):
        leaving = self.mode
        self.mode, steps = self.TABLE[leaving, name]
        out = []
        if leaving == "online" and self.mode != "online" and self.held and name != "escape":
            out.append(("dropped", self.held))
            self.held = 0
        if leaving == "dialing":
            self.dial_deadline = None
        if leaving == "ringing" and self.mode != "ringing":
            self.next_ring_at = None
            self.registers[1] = 0
        for step in steps:
            if step in MODEM_RESULT_CODES:
                out.append(("send", self._result(step)))
            elif step == "dial":
                self.dial_deadline = now + max(1, self.registers[7])
                out.append(("dial", targets))
            elif step == "ring":
                out += [("send", self._result("RING")), ("ring",)]
                self.registers[1] = min(255, self.registers[1] + 1)
                self.next_ring_at = now + MODEM_RING_INTERVAL
                if self.registers[0] and self.registers[1] >= self.registers[0]:
                    out += self._event("answer", now)       # S0: auto-answer
            elif step == "online":
                self.data_at, self.held = now, 0
            else:
                out.append((step,))
        return out

    # -- bytes from the device --

    def feed(self, data, now):
        out = self.expire(now)
        i = 0
        while i < len(data):
            if self.mode == "online":
                out += self._online(data[i:], now)
                break
            if self.mode == "dialing":
                if data[i] != self.registers[4]:    # a key (not the LF of CR LF) aborts the dial
                    out += self._event("key", now)
                i += 1
                continue
            i = self._command_bytes(data, i, now, out)
        return out

    def _online(self, data, now):
        """Online data, with +++ (S2) held back while it may be an escape:
        guard time of silence before, the three within guard time of each
        other, guard time of silence after.  Anything else goes on as it
        came, in order."""
        escape = self.registers[2]
        guard = self.guard()
        if not self.held and (escape > 127 or escape not in data):
            self.data_at = now
            return [("data", bytes(data))]
        out = bytearray()
        for i, b in enumerate(data):
            if self.held:
                if b == escape and self.held < 3 and now - self.plus_at <= guard:
                    self.held += 1
                    self.plus_at = now
                    continue
                out += bytes((escape,)) * self.held     # not an escape after all
                self.held, self.data_at = 0, self.plus_at
            if b == escape and escape <= 127 and now - self.data_at >= guard:
                self.held, self.plus_at = 1, now
            else:
                out.append(b)
                self.data_at = now
                if guard:
                    out += data[i + 1:]     # no silence before the rest of this chunk: all data
                    break
        return [("data", bytes(out))] if out else []

    def _command_bytes(self, data, i, now, out):
        """Command mode: echo (ATE), edit the line, run it at CR (S3).
        Returns where the next mode's bytes start."""
        echo = bytearray()
        cr, lf, bs = self.registers[3], self.registers[4], self.registers[5]
        while i < len(data) and self.mode not in ("online", "dialing"):
            b = data[i]
            i += 1
            if self.echo:
                echo.append(b)
            # CR (S3) ends a line; so does an LF after something (a program
            # sending Unix newlines), while the LF of CR LF finds it empty
            if b == cr or (b == lf and self.line):
                line, self.line = bytes(self.line), bytearray()
                self._flush_echo(echo, out)
                out += self._command_line(line, now)
            elif b == bs or b == 127:
                del self.line[-1:]
            elif b == lf or (b == 32 and not self.line):
                continue
            elif len(self.line) <= MODEM_LINE_LIMIT:
                self.line.append(b)
                if self.line[-2:].upper() == b"A/" and len(self.line) == 2:
                    self.line = bytearray()
                    self._flush_echo(echo, out)
                    out += self._command_line(self.last_line, now)     # A/: the last line again
        self._flush_echo(echo, out)
        return i

    @staticmethod
    def _flush_echo(echo, out):
        if echo:
            out.append(("send", bytes(echo)))
            del echo[:]

    def _command_line(self, line, now):
        """One line ended by CR: nothing unless it starts with AT; then
        its commands in order, OK at the end, ERROR at the first one not
        understood (the rest of the line is not run)."""
        if line[:2].upper() != b"AT":
            return []
        self.line_failed = False
        if len(line) > MODEM_LINE_LIMIT:
            return self._failed([])
        self.last_line = line
        text = line[2:].decode("ascii", "replace")
        out = []
        i = 0
        while i < len(text):
            c = text[i].upper()
            i += 1
            if c == " ":
                continue
            if c == "D" and not self.init_only:
                targets = self._dial_targets(text[i:])
                return self._command_event("dial", now, targets, out) if targets else self._failed(out)
            if c == "&" and i < len(text):
                c += text[i].upper()
                i += 1
            if c == "S":
                number, i = self._number(text, i)
                if not number or int(number) >= MODEM_REGISTERS:
                    return self._failed(out)
                self.register = int(number)
                continue
            if c == "=":
                number, i = self._number(text, i)
                if not number or int(number) > 255 or self.register == 1:
                    return self._failed(out)
                self.registers[self.register] = int(number)
                continue
            if c == "?":
                out.append(("send", self._info("%03d" % self.registers.get(self.register, 0))))
                continue
            number, i = self._number(text, i)
            if not self._simple_command(c, number, now, out):
                return self._failed(out)
            if out and out[-1] == ("stop",):
                out.pop()
                return out
        return out + [("send", self._result("OK"))]

    def _simple_command(self, c, number, now, out):
        """One command but D and S: False if it is not understood.  A
        command that gives its own result (A, O, Z) appends ("stop",)."""
        if len(number) > 1:
            return False
        if c in "AOHZ" and self.init_only:
            return False
        if c in ("A", "O") and number in ("", "0"):
            out += self._command_event("answer" if c == "A" else "go_online", now) + [("stop",)]
        elif c == "H" and number in ("", "0", "1"):
            if number != "1" and (self.mode, "hang_up") in self.TABLE:
                out += self._event("hang_up", now)
        elif c == "Z" and number in ("", "0", "1"):
            if (self.mode, "hang_up") in self.TABLE:
                out += self._event("hang_up", now)
            self.reset()
            out += [("send", self._result("OK")), ("stop",)]    # the rest of a Z line is ignored
        elif c in ("E", "Q", "V") and number in ("", "0", "1"):
            setattr(self, {"E": "echo", "Q": "quiet", "V": "verbose"}[c], number == "1")
        elif c == "I":
            out.append(("send", self._info("sertcp %s" % __version__ if number in ("", "0")
                                           else "sertcp modem emulation")))
        elif c == "&F" and number in ("", "0"):
            self.factory()
        elif c == "&D" and number in ("", "0", "1", "2", "3"):
            self.dtr_mode = int(number or 0)
        elif not (c in MODEM_IGNORED or c[:1] == "&" and c[1:] in MODEM_IGNORED_AMPERSAND and c != "&"):
            return False
        return True

    def _command_event(self, name, now, targets=None, out=None):
        out = [] if out is None else out
        if (self.mode, name) not in self.TABLE:
            return self._failed(out)
        return out + self._event(name, now, targets)

    def _failed(self, out):
        self.line_failed = True
        return out + [("send", self._result("ERROR"))]

    @staticmethod
    def _number(text, i):
        start = i
        while i < len(text) and text[i].isdigit():
            i += 1
        return text[start:i], i

    def _dial_targets(self, dial):
        """What ATD dials: a phonebook number, HOST:PORT or [V6]:PORT, after
        an optional T or P (tone, pulse) and before an optional ';'.  None
        if it is neither."""
        dial = dial.strip().rstrip(";").strip()
        if dial[:1].upper() in ("T", "P"):
            dial = dial[1:].strip()
        dial = dial.replace(" ", "")
        if not dial:
            return None
        for number in (dial, modem_number(dial)):
            if number in self.phonebook:
                return [self.phonebook[number]]
        try:
            return [parse_hostport(dial, need_host=True)]
        except ValueProblem:
            return None

# =====================================================================
# 4. Reactor: one selector loop with a timer heap
# =====================================================================

class Timer:
    """A deadline in the reactor's heap.  Cancelling drops the callback at
    once: a cancelled timer can sit in the heap until its own deadline, and
    must not keep a closed connection (and its buffers) alive till then."""
    __slots__ = ("when", "callback", "cancelled", "reactor")

    def __init__(self, when, callback, reactor):
        self.when, self.callback, self.cancelled, self.reactor = when, callback, False, reactor

    def cancel(self):
        if not self.cancelled:
            self.cancelled = True
            self.callback = None
            self.reactor._timer_cancelled()

    def __lt__(self, other):
        return self.when < other.when


# What a handler is watched for: the poll(2) bits, which epoll shares.
WATCH_READ = select.POLLIN
WATCH_WRITE = select.POLLOUT
# the peer shut down its side: watched alone while a connection is not
# read (back-pressure), so that a client who leaves is still seen (Linux)
WATCH_HANGUP = getattr(select, "POLLRDHUP", 0)
WATCH_READABLE = WATCH_READ | WATCH_HANGUP
# error and hang-up wake whatever the handler waits for; its read or
# write then finds out what happened
WATCH_BROKEN = select.POLLERR | select.POLLHUP | select.POLLNVAL | WATCH_HANGUP


class Handler:
    """What the reactor expects of anything it watches, the way
    socketserver documents what to override:

    - fileno(): the descriptor, valid from the first set_interest() until
      the handler is forgotten (the reactor keeps the number it saw).
    - on_readable() / on_writable(): called when the descriptor is ready
      (or broken: the call then meets the error) and the handler watches
      for it.  They must not block, and may change the interest or close.
    - fail(reason): a bug met while serving it (an exception out of one of
      the above, or out of a timer of its own): end this one thing.
    - `watched` / `watched_fd` belong to the reactor.

    finish(reason) is the one way to end: it runs ended(reason) once,
    however many paths (peer, timer, error, stop) reach it."""

    watched = 0
    watched_fd = -1
    finished = False

    def fileno(self):
        raise NotImplementedError

    def on_readable(self):
        pass

    def on_writable(self):
        pass

    def fail(self, reason):
        self.finish(reason)

    def finish(self, reason=None):
        """End once; False if it had ended already."""
        if self.finished:
            return False
        self.finished = True
        self.ended(reason)
        return True

    def ended(self, reason):
        pass


class Reactor:
    """Owns every file descriptor and deadline.  Handlers (see Handler)
    are told when their descriptor is ready; threads hand work in with
    call_soon_threadsafe(), the only method they may call.

    It drives epoll (poll(2) where there is none) itself rather than
    through `selectors`: each wake-up is a handful of dictionary lookups,
    which is most of the cost of a 1-byte round trip."""

    def __init__(self):
        if hasattr(select, "epoll"):
            self.poller = select.epoll()
            self.poll_scale = 1.0               # epoll takes seconds
        else:
            self.poller = select.poll()
            self.poll_scale = 1000.0            # poll takes milliseconds
        self.handlers = {}                      # fd -> handler
        self.timers = []
        self.cancelled_timers = 0               # cancelled timers still in the heap
        self.interrupted = False
        self.errors = 0                         # exceptions contained (see failed())
        self.on_error = None                    # on_error(handler or None, exception)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.from_threads = deque()
        self.poller.register(self.wake_r, WATCH_READ)

    @staticmethod
    def now():
        return time.monotonic()

    def call_at(self, when, callback):
        timer = Timer(when, callback, self)
        heapq.heappush(self.timers, timer)
        return timer

    def _timer_cancelled(self):
        # Idle timers are cancelled far more often than they fire; once most
        # of the heap is cancelled timers, rebuild it without them.
        self.cancelled_timers += 1
        timers = self.timers
        if self.cancelled_timers > 64 and 2 * self.cancelled_timers > len(timers):
            timers[:] = [t for t in timers if not t.cancelled]   # in place: run_once holds it
            heapq.heapify(timers)
            self.cancelled_timers = 0

    def call_later(self, delay, callback):
        return self.call_at(time.monotonic() + delay, callback)

    def call_soon_threadsafe(self, callback):
        self.from_threads.append(callback)
        self.wake()

    def wake(self):
        try:
            os.write(self.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def set_interest(self, handler, read, write, hangup=False):
        """Watch handler's fd for reading and/or writing, or only for the
        peer's hang-up (which then calls on_readable); none = forget."""
        mask = (WATCH_READ if read else WATCH_HANGUP if hangup else 0) | (WATCH_WRITE if write else 0)
        old = handler.watched
        if mask == old:
            return
        if old == 0:
            fd = handler.fileno()
            self.poller.register(fd, mask)
            self.handlers[fd] = handler
            handler.watched_fd = fd     # kept: a closed socket's fileno() is -1
        elif mask == 0:
            self.forget(handler)
            return
        else:
            self.poller.modify(handler.watched_fd, mask)
        handler.watched = mask

    def forget(self, handler):
        if handler.watched:
            fd = handler.watched_fd
            try:
                self.poller.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass            # closed already: the kernel dropped it
            if self.handlers.get(fd) is handler:
                del self.handlers[fd]
            handler.watched = 0

    def run(self, once=False, max_wait=None):
        """Dispatch events and due timers until interrupt() is called, or
        for one round with once=True.  The loop lives in this one frame,
        with what it uses in locals: a round trip wakes it twice, and
        every call and lookup between epoll and the handler shows."""
        poll = self.poller.poll
        scale = self.poll_scale
        handlers = self.handlers
        timers = self.timers
        from_threads = self.from_threads
        monotonic = time.monotonic
        while True:
            while timers and timers[0].cancelled:
                heapq.heappop(timers)
                self.cancelled_timers -= 1
            if timers:
                timeout = max(0.0, timers[0].when - monotonic())
                if max_wait is not None and max_wait < timeout:
                    timeout = max_wait
                if timeout > 0:
                    # poll(2) and epoll count whole milliseconds: round up,
                    # so a timer is never woken for early and polled again
                    timeout = math.ceil(timeout * 1000.0) / 1000.0
                timeout *= scale
            else:
                timeout = -1 if max_wait is None else max_wait * scale
            for fd, mask in poll(timeout):
                handler = handlers.get(fd)
                if handler is None:
                    if fd == self.wake_r:
                        self._drain_wake()
                    continue                    # forgotten by an earlier handler
                if mask & WATCH_BROKEN:
                    mask |= handler.watched
                try:
                    if mask & WATCH_READABLE and handler.watched & WATCH_READABLE:
                        handler.on_readable()
                    if mask & WATCH_WRITE and handler.watched & WATCH_WRITE:
                        handler.on_writable()
                except Exception as e:
                    self.failed(handler, e)
            if timers and timers[0].when <= monotonic():
                self._fire_timers()
            while from_threads:
                callback = from_threads.popleft()
                try:
                    callback()
                except Exception as e:
                    self.failed(None, e)
            if once:
                return
            if self.interrupted:
                self.interrupted = False
                return

    def run_once(self, max_wait=None):
        self.run(once=True, max_wait=max_wait)

    def interrupt(self):
        """Make run() return after the round in progress (signals use it)."""
        self.interrupted = True
        self.wake()

    def _fire_timers(self):
        timers = self.timers
        now = time.monotonic()
        while timers and (timers[0].cancelled or timers[0].when <= now):
            timer = heapq.heappop(timers)
            if timer.cancelled:
                self.cancelled_timers -= 1
            else:
                callback = timer.callback
                timer.cancelled, timer.callback = True, None   # fired: cancel() is a no-op now
                try:
                    callback()
                except Exception as e:
                    self.failed(None, e)

    def failed(self, handler, exc):
        """A handler, timer or thread's callback raised: a bug in sertcp.
        It is reported (on_error logs the traceback) and contained to what
        raised: a handler's fail() ends that connection, device or request
        and the rest goes on.  Every Handler has fail(); something watched
        without one is not contained: the exception ends run(), and the
        process, instead of spinning."""
        fail = getattr(handler, "fail", None)
        if handler is not None and fail is None:
            raise exc
        self.errors += 1
        if self.on_error is not None:
            self.on_error(handler, exc)
        if fail is not None:
            fail("internal error: %s: %s" % (type(exc).__name__, exc))

    def _drain_wake(self):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


# =====================================================================
# 5. Endpoints: serial devices, connections, listeners
# =====================================================================

# ---------------------------------------------------------------------
# Names and dialing: resolving off the loop, one connect() in flight
# ---------------------------------------------------------------------

def is_ip_literal(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
            return True
        except (OSError, ValueError):
            pass
    return False


def resolver_host(host):
    """The host as getaddrinfo should get it.  A str goes through Python's
    idna codec, which needs unicodedata (OpenWrt's python3-codecs) and
    raises UnicodeError for a malformed name such as a..b; an ASCII name
    as bytes goes to the resolver as it is."""
    try:
        return host.encode("ascii")
    except UnicodeError:
        return host


def resolve_in_thread(reactor, host, port, callback):
    """getaddrinfo without blocking the loop: literals at once, names in a
    helper thread whose answer comes back through the loop.  Every failure
    (an OSError, a codec error, anything) reaches callback([], error)."""
    if is_ip_literal(host):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        callback([(family, (host, port))], None)
        return
    import threading

    def work():
        try:
            infos = socket.getaddrinfo(resolver_host(host), port, 0, socket.SOCK_STREAM)
            result = [(info[0], info[4]) for info in infos]
            reactor.call_soon_threadsafe(lambda: callback(result, None))
        except Exception as e:  # the thread must answer, or the port waits for ever
            reactor.call_soon_threadsafe(lambda e=e: callback([], e))
    threading.Thread(target=work, daemon=True, name="sertcp-resolve").start()


class Dial(Handler):
    """One non-blocking connect() in flight; reports on_done(sock, None)
    or on_done(None, error) once, unless cancelled."""

    def __init__(self, reactor, family, sockaddr, on_done, timeout=DIAL_TIMEOUT):
        self.reactor = reactor
        self.on_done = on_done
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.timer = None
        code = self.sock.connect_ex(sockaddr)
        if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self.reactor.set_interest(self, False, True)
            self.timer = reactor.call_later(timeout, lambda: self.finish("no answer within %gs" % timeout))
        else:
            self.timer = reactor.call_later(0, lambda: self.finish(os.strerror(code)))

    def fileno(self):
        return self.sock.fileno()

    def on_writable(self):
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.finish(os.strerror(code) if code else None)

    def ended(self, error):
        self.reactor.forget(self)
        if self.timer:
            self.timer.cancel()
            self.timer = None
        on_done, self.on_done = self.on_done, None
        if error or on_done is None:
            self.sock.close()
        if on_done is not None:
            on_done(None if error else self.sock, error)

    def cancel(self):
        self.on_done = None
        self.finish("cancelled")


# ---------------------------------------------------------------------
# Serial devices: the common queue, pyserial ttys, URL devices, sockets,
# virtual ports
# ---------------------------------------------------------------------

PARITY_TO_PYSERIAL = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}
STOPBITS_TO_PYSERIAL = {"1": 1, "1.5": 1.5, "2": 2}


def describe_error(exc):
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


def unwritten(chunk, n):
    """What a partial write left of chunk.  A tty takes 4-12 KiB a write,
    so a 64 KiB chunk goes in a dozen pieces: bytes are sliced as views,
    not copied each time (a bytearray is copied, since it may be resized)."""
    return memoryview(chunk)[n:] if type(chunk) is bytes else chunk[n:]



class Device(Handler):
    """The serial side of a port.  The port calls open(), write(), close()
    and call(); the device calls port.on_device_data(data),
    port.on_device_lost(reason), port.on_device_drained(),
    port.on_virtual_peer(is_open) (a virtual port's local program), and
    port.device_open_done(error) when open() left it opening in the
    background (is_open still False).

    Writes are queued in `tx` and written as the device accepts them;
    `tx_pause` spaces successive writes (ezTCP's TX interval), and
    `tx_char_delay` writes one byte at a time with a pause after each
    (for bootloaders and consoles without a FIFO).

    Line and setting changes (set_lines, set_break, apply_setting,
    purge_buffers, modem_status) are plain blocking calls on the device;
    the port runs them through call(), which a device whose calls wait on
    a far end (a URL device) runs off the loop.  This base class is a
    device with no lines and no settings: a byte stream."""

    def __init__(self, port, reactor):
        self.port = port
        self.config = port.config
        self.reactor = reactor
        self.tx = deque()
        self.tx_bytes = 0
        self.tx_pause = self.config.tx_pause_ms / 1000.0
        self.tx_char_delay = self.config.tx_char_delay_ms / 1000.0
        self.tx_held_until = 0.0
        self.tx_timer = None
        self.is_open = False
        self.reading_paused = False

    def label(self):
        return self.config.device

    # -- the write queue, shared by every kind --

    def write(self, data):
        tried = not self.tx and not self.tx_pause and not self.tx_char_delay and self.is_open
        if tried:
            # the common case: nothing queued, so try the device at once
            try:
                n = self._write_some(data)
            except OSError as e:
                self.tx.append(data)        # counted as dropped with the rest
                self.tx_bytes += len(data)
                self._lost("write failed: %s" % describe_error(e))
                return
            if n:
                if self.counts_writes:
                    self.port.counters["bytes_to_device"] += n
                if n == len(data):
                    return
                data = unwritten(data, n)
        self.tx.append(data)
        self.tx_bytes += len(data)
        if tried:
            # the device took all it could: the rest waits until it is
            # writable again (trying now would only meet EAGAIN)
            self._want_write(True)
        else:
            self._flush()

    def _flush(self):
        while self.tx and self.is_open:
            if self.tx_pause or self.tx_char_delay:
                now = self.reactor.now()
                if now < self.tx_held_until:
                    if self.tx_timer is None:
                        self.tx_timer = self.reactor.call_at(self.tx_held_until, self._tx_timer_fired)
                    return
            chunk = self.tx[0]
            try:
                n = self._write_some(chunk[:1] if self.tx_char_delay else chunk)
            except OSError as e:
                self._lost("write failed: %s" % describe_error(e))
                return
            if n is None or n == 0:
                self._want_write(True)
                return
            self.tx_bytes -= n
            if self.counts_writes:
                self.port.counters["bytes_to_device"] += n
            if self.tx_char_delay:
                self.tx_held_until = self.reactor.now() + self.tx_char_delay
            if n < len(chunk):
                self.tx[0] = unwritten(chunk, n)
                if self.tx_char_delay:
                    continue            # the next byte after the pause
                self._want_write(True)
                return
            self.tx.popleft()
            if self.tx_pause:
                self.tx_held_until = max(self.tx_held_until, self.reactor.now() + self.tx_pause)
        self._want_write(False)
        self.port.on_device_drained()

    def _tx_timer_fired(self):
        self.tx_timer = None
        self._flush()

    def discard_tx(self):
        dropped = self.tx_bytes
        self.tx.clear()
        self.tx_bytes = 0
        return dropped

    def pause_reading(self, paused):
        if paused != self.reading_paused:
            self.reading_paused = paused
            self._update_interest()

    def _lost(self, reason):
        self.close()
        self.port.on_device_lost(reason)

    def _stop_watching(self):
        """Closing: out of the loop, and no longer open."""
        self.reactor.forget(self)
        self.is_open = False

    def fail(self, reason):
        self._lost(reason)      # a bug met while serving it: reopened like a lost device

    def on_writable(self):
        self._flush()

    def on_readable(self):
        try:
            data = self._read_some(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            # EIO: the USB adapter was unplugged or the pty's other side closed
            self._lost("read failed: %s" % describe_error(e))
            return
        if not data:
            self._lost("hung up")
            return
        if len(data) >= BURST_READ:
            # A tty hands out about 4 KiB a read: during a burst, gather what
            # is already there so that clients get one send, not sixteen.
            chunks = [data]
            total = len(data)
            # at most a quarter of client_buffer, so one delivery can never
            # overflow a client that is only a little behind
            limit = max(BURST_READ, min(READ_CHUNK, self.config.client_buffer // 4))
            while total < limit:
                try:
                    more = self._read_some(limit - total)
                except OSError:
                    break  # EAGAIN, or a failure the next wake-up reports
                if not more:
                    break
                chunks.append(more)
                total += len(more)
            if len(chunks) > 1:
                data = b"".join(chunks)
        self.port.on_device_data(data)

    # -- what each kind provides --

    def _read_some(self, size):
        """One non-blocking read of the descriptor (devices that have one)."""
        raise NotImplementedError

    def _write_some(self, data):
        raise NotImplementedError

    want_write = False
    peer_open = True                    # a local program has it open (see VirtualDevice)
    counts_writes = True                # what _write_some took is written (not so for URL devices)

    def _update_interest(self):
        """Watch the descriptor for what is wanted now."""
        if self.is_open:
            self.reactor.set_interest(self, not self.reading_paused, self.want_write)

    def _want_write(self, want):
        if want != self.want_write:
            self.want_write = want
            self._update_interest()

    # -- lines and settings: blocking calls, run through call() --

    def call(self, operation, done=None):
        """Run operation() and hand done(result, error) its outcome: at
        once here, later for a device whose calls wait on a far end."""
        try:
            result, error = operation(), None
        except Exception as e:  # an OS, driver or far end that refuses
            result, error = None, e
        if done is not None:
            done(result, error)

    def set_lines(self, dtr, rts):
        """Set DTR/RTS (None = leave); returns a problem for the log, or ""."""
        return ""

    def set_break(self, on):
        """Start or end a break; returns a problem for the log, or ""."""
        return "%s has no break line" % self.label()

    def apply_setting(self, name, value):
        """Change baudrate, bytesize, parity, stopbits or flow; raises if
        the device or the OS refuses the value.  A byte stream takes any."""

    def purge_buffers(self, receive, transmit):
        """Drop what the OS holds: received and not read, or not yet sent."""

    def modem_status(self):
        """{"CTS", "DSR", "RI", "CD"}: the modem lines, {} where there are none."""
        return {}

    def settings(self):
        """The settings the OS reports for the line (termios), or None
        where it cannot say."""
        return None

    def line_states(self, fallback):
        """{"dtr", "rts", "break"}: as last set; `fallback` where unknown."""
        return dict(fallback)

    def output_pending(self):
        """Bytes the OS still holds for the line, if it says (else 0)."""
        return 0

    def purge(self, receive, transmit):
        """Drop what waits for the device (sertcp's queue at once, counted)
        and, through call(), what the OS holds."""
        dropped = self.discard_tx() if transmit else 0
        if dropped:
            self.port.count_dropped(dropped, "purged by an RFC 2217 client")
        self.call(lambda: self.purge_buffers(receive, transmit))


class PyserialDevice(Device):
    """What the devices pyserial opens share: the configured settings and
    line states applied before opening, and the lines and settings through
    the pyserial object, which keeps the line states it last set even
    where the ioctl fails (a pty has no modem lines)."""

    serial = None

    def _configure(self, ser):
        """Settings and line states into a pyserial object not yet open."""
        c = self.config
        for name in ("baudrate", "bytesize", "parity", "stopbits", "flow"):
            pyserial_setting(ser, name, getattr(c, name))
        dtr, rts = self.port.wanted_lines()
        if dtr is not None:
            ser.dtr = dtr
        if rts is not None:
            ser.rts = rts

    @staticmethod
    def _open(ser):
        import serial
        try:
            ser.open()
        except (serial.SerialException, OSError, ValueError) as e:
            raise OSError(getattr(e, "errno", None) or errno.EIO, describe_error(e))

    def set_lines(self, dtr, rts):
        ser = self.serial
        if ser is None:
            return "device not open"
        try:
            if dtr is not None:
                ser.dtr = dtr
            if rts is not None:
                ser.rts = rts
        except Exception as e:  # ptys refuse modem ioctls (ENOTTY/EINVAL)
            return "cannot set lines: %s" % describe_error(e)
        return ""

    def set_break(self, on):
        ser = self.serial
        if ser is None:
            return "device not open"
        try:
            ser.break_condition = on
        except Exception as e:  # a pty has no break (ENOTTY/EINVAL)
            return "cannot %s break: %s" % ("start" if on else "end", describe_error(e))
        return ""

    def apply_setting(self, name, value):
        if self.serial is None:
            raise OSError(errno.ENODEV, "device not open")
        pyserial_setting(self.serial, name, value)

    def purge_buffers(self, receive, transmit):
        ser = self.serial
        if ser is None:
            return
        try:
            if receive:
                ser.reset_input_buffer()
            if transmit:
                ser.reset_output_buffer()
        except Exception:
            pass

    def modem_status(self):
        ser = self.serial
        try:
            return {"CTS": ser.cts, "DSR": ser.dsr, "RI": ser.ri, "CD": ser.cd}
        except Exception:  # not open, or no modem lines (a pty, a socket)
            return {}

    def line_states(self, fallback):
        ser = self.serial
        if ser is None:
            return dict(fallback)
        return {"dtr": bool(ser.dtr), "rts": bool(ser.rts), "break": bool(ser.break_condition)}


def pyserial_setting(ser, name, value):
    """One configuration setting into a pyserial object."""
    if name == "baudrate":
        ser.baudrate = value
    elif name == "bytesize":
        ser.bytesize = value
    elif name == "parity":
        ser.parity = PARITY_TO_PYSERIAL[value]
    elif name == "stopbits":
        ser.stopbits = STOPBITS_TO_PYSERIAL[value]
    elif name == "flow":
        ser.xonxoff = value == "xonxoff"
        ser.rtscts = value == "rtscts"
        ser.dsrdtr = value == "dsrdtr"
    else:
        raise ValueError(name)


class FdDevice(PyserialDevice):
    """A tty path opened with pyserial, then read and written through its
    file descriptor by the selector loop (no thread, no polling).

    A usb: or usb@ device is looked up in sysfs at every open, so that
    `path` follows an adapter that came back as another /dev/ttyUSBn.
    With rs485 set, RS-485 mode is switched on at every open; `rs485`
    holds what the driver reported back, or "refused: why"."""

    def __init__(self, port, reactor):
        super().__init__(port, reactor)
        self.fd = None
        self.path = None if is_usb_spec(self.config.device) else self.config.device
        self.rs485 = None

    def fileno(self):
        return self.fd

    def label(self):
        if self.path is None or self.path == self.config.device:
            return self.config.device
        return "%s (%s)" % (self.config.device, self.path)

    def open(self):
        import serial  # pyserial: imported where first needed, so --check stays fast
        c = self.config
        if is_usb_spec(c.device):
            self.path = None
            self.path = resolve_usb_device(c.device)[0]    # OSError: missing, retried
        ser = serial.Serial()
        ser.port = self.path
        ser.exclusive = c.exclusive
        ser.timeout = 0
        self._configure(ser)
        self._open(ser)
        self.serial = ser
        if c.exclusive:
            try:
                import fcntl
                import termios
                fcntl.ioctl(ser.fd, termios.TIOCEXCL)
            except (OSError, AttributeError):
                pass  # not a tty that supports it; flock still holds
        if c.rs485:
            self.rs485 = rs485_apply(ser.fd, rs485_pack_config(c))
        self.fd = ser.fd
        self.is_open = True
        self._update_interest()
        self._flush()

    def close(self):
        if self.serial is None:
            return
        self._stop_watching()
        try:
            self.serial.close()
        except Exception:  # a vanished USB device may fail in any way here
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.serial = None
        self.fd = None

    def _read_some(self, size):
        return os.read(self.fd, size)

    def _write_some(self, data):
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    def settings(self):
        return termios_settings(self.fd) if self.fd is not None else None

    def output_pending(self):
        try:
            return self.serial.out_waiting
        except Exception:
            return 0


class UrlDevice(PyserialDevice):
    """A pyserial URL (loop://, rfc2217://, ...) that has no file
    descriptor to select on: a reader thread and a writer thread do the
    blocking calls and hand results to the loop.  They never touch the
    port's state; the loop never blocks on them.

    Opening is blocking too (a TCP connect, RFC 2217 negotiation: seconds
    when the far end is down or silent), so it runs in a thread of its own
    and reports through port.device_open_done().  So do line and setting
    changes (pyserial's rfc2217:// waits at least 50 ms, and up to 3 s,
    for the far end to acknowledge each): call() hands them to the writer
    thread, in turn with the data handed to it before them, and done()
    comes back on the loop when the far end has answered.  Closing is
    the writer's last task too (pyserial's close joins its own thread).

    Bytes count as written to the device once the writer has written
    them; those it still held when the device was lost or closed count
    as dropped.  Back-pressure holds the reader thread between reads."""

    counts_writes = False               # _thread_wrote counts them

    def __init__(self, port, reactor):
        super().__init__(port, reactor)
        self.generation = 0
        self.outbox = None
        self.in_flight = 0
        self.read_allowed = None        # a threading.Event: clear while paused

    def open(self):
        import serial
        import threading
        ser = serial.serial_for_url(self.config.device, do_not_open=True)  # a bad URL fails here
        ser.timeout = 0.05
        self._configure(ser)
        self.generation += 1
        generation = self.generation
        threading.Thread(target=self._opener, args=(ser, generation), daemon=True,
                         name="sertcp-open-%s" % self.port.name).start()

    def _opener(self, ser, generation):
        try:
            self._open(ser)
        except OSError as e:
            self.reactor.call_soon_threadsafe(lambda e=e: self._opened(generation, ser, e))
            return
        self.reactor.call_soon_threadsafe(lambda: self._opened(generation, ser, None))

    def _opened(self, generation, ser, error):
        import threading
        import queue
        if generation != self.generation:
            # closed (or the port stopped) while it was opening
            if error is None:
                threading.Thread(target=ser.close, daemon=True).start()
            return
        if error is not None:
            self.port.device_open_done(error)
            return
        self.serial = ser
        self.outbox = queue.Queue()
        self.in_flight = 0
        self.read_allowed = threading.Event()
        self.is_open = True
        self._update_interest()
        threading.Thread(target=self._reader, args=(ser, generation), daemon=True,
                         name="sertcp-read-%s" % self.port.name).start()
        threading.Thread(target=self._writer, args=(ser, self.outbox, generation), daemon=True,
                         name="sertcp-write-%s" % self.port.name).start()
        self.port.device_open_done(None)
        self._flush()                   # what clients sent while it opened

    def close(self):
        self.generation += 1            # an open in progress is stale now
        if self.serial is None:
            return
        self.is_open = False
        self.serial = None
        self.read_allowed.set()         # a paused reader wakes, sees it is stale, ends
        self.outbox.put(None)           # the writer closes it, after what it holds

    def discard_tx(self):
        dropped = Device.discard_tx(self) + self.in_flight
        self.in_flight = 0
        return dropped

    def _update_interest(self):
        # no descriptor: the reader thread waits while reading is paused
        if self.read_allowed is not None:
            if self.reading_paused:
                self.read_allowed.clear()
            else:
                self.read_allowed.set()

    # The threads: blocking calls only, results posted to the loop.

    def _reader(self, ser, generation):
        allowed = self.read_allowed
        while True:
            allowed.wait()
            if self.generation != generation:
                return
            try:
                data = ser.read(max(1, min(READ_CHUNK, ser.in_waiting)))
            except Exception as e:
                if self.generation == generation:
                    self.reactor.call_soon_threadsafe(lambda e=e: self._thread_failed(generation, e))
                return
            if self.generation != generation:
                return
            if data:
                self.reactor.call_soon_threadsafe(lambda d=data: self._thread_data(generation, d))

    def _writer(self, ser, outbox, generation):
        failed = False
        while True:
            item = outbox.get()
            if item is None:
                try:
                    ser.close()
                except Exception:
                    pass
                return
            if callable(item):                  # a call(): answered even after a failed write
                item()
            elif not failed:                    # after one, data is only counted (in_flight)
                try:
                    ser.write(item)
                except Exception as e:
                    failed = True
                    self.reactor.call_soon_threadsafe(lambda e=e: self._thread_failed(generation, e))
                    continue
                self.reactor.call_soon_threadsafe(lambda n=len(item): self._thread_wrote(generation, n))

    # Back on the loop.

    def _thread_data(self, generation, data):
        if generation == self.generation and self.is_open:
            self.port.on_device_data(data)

    def _thread_failed(self, generation, exc):
        if generation == self.generation and self.is_open:
            self._lost(describe_error(exc))

    def _thread_wrote(self, generation, n):
        if generation == self.generation:
            self.in_flight -= n
            self.port.counters["bytes_to_device"] += n
            if self.in_flight < DEVICE_HIGH_WATER:
                self._flush()

    def _write_some(self, data):
        if self.in_flight >= DEVICE_HIGH_WATER:
            return 0  # resumed by _thread_wrote
        self.in_flight += len(data)
        self.outbox.put(data)
        return len(data)

    def call(self, operation, done=None):
        generation = self.generation
        if not self.is_open:
            if done is not None:
                done(None, OSError(errno.ENODEV, "device not open"))
            return

        def back_on_loop(result, error):
            if generation != self.generation:
                result, error = None, OSError(errno.ENODEV, "device closed meanwhile")
            done(result, error)

        def run():                      # in the writer thread
            if generation != self.generation:
                result, error = None, OSError(errno.ENODEV, "device closed meanwhile")
            else:
                try:
                    result, error = operation(), None
                except Exception as e:
                    result, error = None, e
            if done is not None:
                self.reactor.call_soon_threadsafe(lambda: back_on_loop(result, error))
        self.outbox.put(run)


class SocketDevice(Device):
    """A `socket://HOST:PORT` device (a serial server elsewhere, raw TCP):
    a TCP socket in the selector loop like any tty, connected without
    blocking and read in chunks.  It has no lines and no settings."""

    def __init__(self, port, reactor):
        super().__init__(port, reactor)
        self.sock = None
        self.dial = None
        self.generation = 0

    def fileno(self):
        return self.sock.fileno()

    def open(self):
        self.generation += 1
        generation = self.generation
        rest = self.config.device.split("://", 1)[1].split("?", 1)[0].rstrip("/")
        host, port = parse_socket_url(rest)     # a bad URL fails here, like pyserial's
        resolve_in_thread(self.reactor, host, port,
                          lambda addresses, error: self._resolved(generation, addresses, error))

    def _resolved(self, generation, addresses, error):
        if generation != self.generation:
            return
        if error is not None or not addresses:
            self.port.device_open_done(error or OSError(errno.EHOSTUNREACH, "no address"))
            return
        family, sockaddr = addresses[0]
        try:
            self.dial = Dial(self.reactor, family, sockaddr,
                             lambda sock, problem: self._connected(generation, sock, problem))
        except OSError as e:
            self.port.device_open_done(e)

    def _connected(self, generation, sock, problem):
        self.dial = None
        if generation != self.generation:
            if sock is not None:
                sock.close()
            return
        if problem:
            self.port.device_open_done(OSError(errno.ECONNREFUSED, problem))
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.is_open = True
        self.port.device_open_done(None)
        self._update_interest()
        self._flush()

    def close(self):
        self.generation += 1
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        if self.sock is None:
            return
        self._stop_watching()
        self.sock.close()
        self.sock = None

    def _read_some(self, size):
        return self.sock.recv(size)

    def _write_some(self, data):
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0


def parse_socket_url(rest):
    """(host, port) of a socket:// URL's HOST:PORT ([v6]:PORT too)."""
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("socket:// needs HOST:PORT, not %r" % rest)
    return host.strip("[]"), int(port)


def rs485_apply(fd, packed):
    """Switch the tty to RS-485 mode (TIOCSRS485) and read back what the
    driver made of it (TIOCGRS485, which may clamp the delays): a dict
    as rs485_unpack() gives it, or "refused: why" where the driver (or a
    pty: ENOTTY) does not take it."""
    import fcntl
    get, put = rs485_ioctls(os.uname().machine)
    reported = bytearray(RS485_SIZE)
    try:
        fcntl.ioctl(fd, put, bytearray(packed))
        fcntl.ioctl(fd, get, reported)
    except OSError as e:
        return "refused: %s" % describe_error(e)
    shown = rs485_unpack(reported)
    if not shown["enabled"]:
        return "refused: the driver left RS-485 mode off"
    return shown


# ---------------------------------------------------------------------
# USB adapters found by identity in sysfs
# ---------------------------------------------------------------------
# Where to look: the real /sys and /dev, unless the environment names
# others (SERTCP_SYSFS, SERTCP_DEVROOT): the test suite builds a fake
# sysfs tree and a directory of links to pseudo-terminals.

def is_usb_spec(device):
    return device is not None and (device.startswith("usb:") or device.startswith("usb@"))


def read_sysfs_value(folder, name):
    try:
        with open(os.path.join(folder, name), "rb") as f:
            return f.read(256).decode("ascii", "replace").strip()
    except OSError:
        return ""


def usb_serial_adapters(sysfs):
    """The USB serial ttys sysfs lists now: ttyUSBn of the usb-serial
    drivers (FTDI, CH340, CP210x, PL2303) and ttyACMn (CDC ACM), each with
    the vendor, product and serial number of the USB device it belongs
    to and its location (the directory's name: bus 1, hub port 1, port 4
    is 1-1.4), found by walking up from the tty to the directory that
    has idVendor."""
    top = os.path.realpath(sysfs)
    found = {}
    for folder, prefix in (("bus/usb-serial/devices", "ttyUSB"), ("class/tty", "ttyACM")):
        try:
            names = sorted(os.listdir(os.path.join(sysfs, folder)))
        except OSError:
            continue
        for name in names:
            if not name.startswith(prefix) or name in found:
                continue
            here = os.path.realpath(os.path.join(sysfs, folder, name))
            while here.startswith(top + os.sep) and not os.path.exists(os.path.join(here, "idVendor")):
                here = os.path.dirname(here)
            if not here.startswith(top + os.sep):
                continue                # not on USB (a platform UART)
            found[name] = {"name": name, "vendor": read_sysfs_value(here, "idVendor").lower(),
                           "product": read_sysfs_value(here, "idProduct").lower(),
                           "serial": read_sysfs_value(here, "serial"), "location": os.path.basename(here)}
    return list(found.values())


def resolve_usb_device(spec):
    """(path, adapter) of the one adapter the usb: or usb@ spec matches
    now; OSError when none does (missing: retried) or several do (the
    message names each)."""
    sysfs = os.environ.get("SERTCP_SYSFS", "/sys")
    devroot = os.environ.get("SERTCP_DEVROOT", "/dev")
    found = match_usb(parse_usb_spec(spec), usb_serial_adapters(sysfs))
    if not found:
        raise OSError(errno.ENOENT, "no USB serial adapter matches %s" % spec)
    if len(found) > 1:
        raise OSError(errno.ENOTUNIQ, "%s matches %d adapters: %s; add the serial number or use usb@LOCATION"
                      % (spec, len(found), ", ".join(describe_usb(a) for a in found)))
    return os.path.join(devroot, found[0]["name"]), found[0]


def is_stream_device(path):
    """True for a device path that is no tty: a FIFO, or a character
    device that sysfs does not list as a tty (/dev/usb/lp0).  Anything
    unknown (missing now, a pty, a URL) is taken for a tty, as before;
    nothing is opened to find out (opening a tty would raise DTR)."""
    import stat
    if path is None or "://" in path or is_usb_spec(path):
        return False
    try:
        mode = os.stat(path)
    except OSError:
        return False
    if stat.S_ISFIFO(mode.st_mode):
        return True
    if not stat.S_ISCHR(mode.st_mode):
        return False
    node = "/sys/dev/char/%d:%d" % (os.major(mode.st_rdev), os.minor(mode.st_rdev))
    if not os.path.exists(node):
        return False
    return "/tty/" not in os.path.realpath(node) + "/"


class StreamDevice(Device):
    """A device path that is not a tty (a USB printer's /dev/usb/lp0, a
    FIFO): its bytes as they come, with no settings, lines or break.

    A FIFO is opened for reading and writing, so that it never ends when
    a writer leaves, and is only read: what clients send is counted as
    dropped, since writing it would hand it straight back to sertcp."""

    fd = None
    is_fifo = False
    # read and written through the descriptor as a tty is
    fileno, _read_some, _write_some = FdDevice.fileno, FdDevice._read_some, FdDevice._write_some

    def open(self):
        import stat
        self.fd = os.open(self.config.device, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        self.is_fifo = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
        self.is_open = True
        self._update_interest()
        self._flush()

    def close(self):
        if self.fd is not None:
            self._stop_watching()
            os.close(self.fd)
            self.fd = None

    def write(self, data):
        if self.is_fifo:
            self.port.count_dropped(len(data), "device %s is a FIFO, which sertcp only reads" % self.label())
            return
        super().write(data)


# ---------------------------------------------------------------------
# termios: the one set of tables between configuration terms and flags
# ---------------------------------------------------------------------

class TermiosTables:
    """Looked up once, on first use (termios is imported only then)."""

    def __init__(self):
        import termios
        self.termios = termios
        self.size_flag = {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}
        self.flag_size = {flag: size for size, flag in self.size_flag.items()}
        self.cmspar = getattr(termios, "CMSPAR", 0o10000000000)
        self.crtscts = getattr(termios, "CRTSCTS", 0o20000000000)
        p, o, m = termios.PARENB, termios.PARODD, self.cmspar
        self.parity_flags = {"none": 0, "even": p, "odd": p | o, "mark": p | o | m, "space": p | m}
        self.speed_rate = {getattr(termios, name): int(name[1:]) for name in dir(termios)
                           if name.startswith("B") and name[1:].isdigit()}

    def parity(self, cflag):
        for name, flags in self.parity_flags.items():
            if cflag & (self.termios.PARENB | self.termios.PARODD | self.cmspar) == flags:
                return name
        return "none"


_termios_tables = None


def termios_tables():
    global _termios_tables
    if _termios_tables is None:
        _termios_tables = TermiosTables()
    return _termios_tables


# The ioctl that reads a rate without a B constant (BOTHER) in numbers, as
# each architecture's <asm/ioctls.h> and <asm/termbits.h> define it:
# (request, size of the struct, offset of c_ospeed).  TCGETS2 reads a
# termios2; MIPS (most OpenWrt routers) and SPARC lay out both differently
# from asm-generic (x86, ARM, RISC-V); PowerPC has no termios2, its own
# TCGETS carries the rates.
TCGETS2_BY_ARCH = {
    "generic": (0x802C542A, 44, 40),
    "mips": (0x4030542A, 48, 44),
    "sparc": (0x402C540C, 44, 40),
    "powerpc": (0x402C7413, 44, 40),
}


def tcgets2_for(machine):
    """TCGETS2_BY_ARCH's row for a machine as os.uname() names it."""
    for prefix, arch in (("mips", "mips"), ("sparc", "sparc"), ("ppc", "powerpc"), ("powerpc", "powerpc")):
        if machine.startswith(prefix):
            return TCGETS2_BY_ARCH[arch]
    return TCGETS2_BY_ARCH["generic"]


def termios_settings(fd):
    """The serial settings a tty or pty holds, in configuration terms:
    {baudrate, bytesize, parity, stopbits, flow}.  On a pty master this is
    what the program on the slave set (Linux shares one termios)."""
    t = termios_tables()
    termios = t.termios
    iflag, _, cflag, _, _, ospeed, _ = termios.tcgetattr(fd)
    baud = t.speed_rate.get(ospeed)
    if baud is None:  # BOTHER: a rate without a B constant, set through termios2
        try:
            import fcntl
            request, size, ospeed_at = tcgets2_for(os.uname().machine)
            raw = fcntl.ioctl(fd, request, bytes(size))
            baud = int.from_bytes(raw[ospeed_at:ospeed_at + 4], sys.byteorder)
        except (OSError, ImportError):
            baud = 0
    flow = "rtscts" if cflag & t.crtscts else "xonxoff" if iflag & termios.IXON else "none"
    return {"baudrate": baud, "bytesize": t.flag_size[cflag & termios.CSIZE], "parity": t.parity(cflag),
            "stopbits": "2" if cflag & termios.CSTOPB else "1", "flow": flow}


def termios_apply(fd, name, value):
    """Change one serial setting of a tty or pty with termios (standard
    rates only); raises OSError (or termios.error) if it cannot."""
    t = termios_tables()
    termios = t.termios
    attrs = termios.tcgetattr(fd)
    if name == "baudrate":
        speed = getattr(termios, "B%d" % value, None)
        if speed is None:
            raise OSError(errno.EINVAL, "%d is not a standard baud rate" % value)
        attrs[4] = attrs[5] = speed
    elif name == "bytesize":
        attrs[2] = (attrs[2] & ~termios.CSIZE) | t.size_flag[value]
    elif name == "parity":
        attrs[2] = (attrs[2] & ~t.parity_flags["mark"]) | t.parity_flags[value]
    elif name == "stopbits":
        attrs[2] = (attrs[2] & ~termios.CSTOPB) | (0 if value == "1" else termios.CSTOPB)
    elif name == "flow":
        attrs[2] = (attrs[2] & ~t.crtscts) | (t.crtscts if value == "rtscts" else 0)
        xon = termios.IXON | termios.IXOFF
        attrs[0] = (attrs[0] & ~xon) | (xon if value == "xonxoff" else 0)
    else:
        raise ValueError(name)
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class VirtualDevice(Device):
    """A pseudo-terminal whose slave side, reached through a symlink at
    `virtual`, is the serial port local programs open.  sertcp keeps only
    the master: reads fail with EIO while no program has the slave open,
    which is how listen_on_open knows; the loop then checks every
    VIRTUAL_POLL seconds instead of spinning on the hangup.  Its settings
    are the pty's termios, which the local program sees; it has no modem
    lines and no break."""

    def __init__(self, port, reactor):
        super().__init__(port, reactor)
        self.master = None
        self.slave_name = None
        self.peer_open = False
        self.poll_timer = None
        self.want_write = False
        # strict_baud: a budget of bytes each way that refills at the line rate
        self.pace_at = {"rx": 0.0, "tx": 0.0}
        self.pace_timer = None

    def fileno(self):
        return self.master

    def label(self):
        return self.config.virtual

    def open(self):
        import tty
        c = self.config
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            if getattr(termios_tables().termios, "B%d" % c.baudrate, None) is not None:
                termios_apply(slave, "baudrate", c.baudrate)
            termios_apply(slave, "bytesize", c.bytesize)
            self.slave_name = os.ttyname(slave)
            path = c.virtual
            if os.path.islink(path):
                os.unlink(path)
            elif os.path.exists(path):
                raise OSError(errno.EEXIST, "%s exists and is not a symlink; not replacing it" % path)
            os.symlink(self.slave_name, path)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        os.close(slave)  # only programs that open the port hold the slave
        os.set_blocking(master, False)
        self.master = master
        self.is_open = True
        self.peer_open = False
        self._poll_peer()

    def close(self):
        if self.master is None:
            return
        self._stop_watching()
        for timer in (self.poll_timer, self.pace_timer):
            if timer:
                timer.cancel()
        self.poll_timer = self.pace_timer = None
        try:
            if os.path.islink(self.config.virtual) and os.readlink(self.config.virtual) == self.slave_name:
                os.unlink(self.config.virtual)
        except OSError:
            pass
        os.close(self.master)
        self.master = None

    def _update_interest(self):
        if self.is_open and self.peer_open:
            write = self.want_write
            if write and self._paced("tx"):
                # strict_baud: the line is busy for a while; the pty is
                # writable all along, so wait for the pace timer instead
                # of being woken at once, again and again
                write = False
                self._schedule_pace(self.pace_at["tx"] - 0.01)
            self.reactor.set_interest(self, not self.reading_paused and not self._paced("rx"), write)

    def _want_write(self, want):
        # always re-evaluated: under strict_baud the answer also depends on
        # the pace, which changes with every write
        self.want_write = want
        self._update_interest()

    def _peer_closed(self):
        """The local program closed the port: watch for the next open."""
        self.reactor.forget(self)
        if self.peer_open:
            self.peer_open = False
            self.port.on_virtual_peer(False)
        self.poll_timer = self.reactor.call_later(VIRTUAL_POLL, self._poll_peer)

    def _poll_peer(self):
        self.poll_timer = None
        if self.master is None:
            return
        # what the program wrote before this look is paced like the rest
        try:
            data = os.read(self.master, self._budget("rx", READ_CHUNK) or 1)
        except BlockingIOError:
            data = b""
        except OSError:
            self.poll_timer = self.reactor.call_later(VIRTUAL_POLL, self._poll_peer)
            return
        self.peer_open = True
        self.port.on_virtual_peer(True)
        if data:
            self._spend("rx", len(data))
        self._update_interest()
        if data:
            self.port.on_device_data(data)
        self._flush()

    def on_readable(self):
        budget = self._budget("rx", READ_CHUNK)
        if not budget:
            return
        try:
            data = os.read(self.master, budget)
        except BlockingIOError:
            return
        except OSError:
            self._peer_closed()
            return
        if not data:
            self._peer_closed()
            return
        self._spend("rx", len(data))
        self.port.on_device_data(data)

    def _write_some(self, data):
        budget = self._budget("tx", len(data))
        if budget == 0:
            return None
        try:
            n = os.write(self.master, data[:budget])
        except BlockingIOError:
            return 0
        self._spend("tx", n)
        return n

    # strict_baud pacing

    def line_rate(self):
        """Bytes per second at the settings the local program set."""
        c = self.config
        settings = {"baudrate": c.baudrate, "bytesize": c.bytesize, "parity": c.parity, "stopbits": c.stopbits}
        try:
            settings = termios_settings(self.master)  # the slave's settings, seen from the master
        except Exception:  # termios.error is no OSError
            pass
        bits = 1 + settings["bytesize"] + (0 if settings["parity"] == "none" else 1) + float(settings["stopbits"])
        return (settings["baudrate"] or c.baudrate) / bits

    def _budget(self, direction, wanted):
        if not self.config.strict_baud:
            return wanted
        now = self.reactor.now()
        # allow bursts of at most 10 ms worth of characters
        ready_at = self.pace_at[direction]
        if ready_at > now + 0.01:
            self._schedule_pace(ready_at - 0.01)
            return 0
        return max(1, min(wanted, int(self.line_rate() * 0.02)))

    def _spend(self, direction, n):
        if not self.config.strict_baud:
            return
        now = self.reactor.now()
        start = max(self.pace_at[direction], now)
        self.pace_at[direction] = start + n / self.line_rate()
        if direction == "rx" and self._paced("rx"):
            self._update_interest()
            self._schedule_pace(self.pace_at["rx"] - 0.01)

    def _paced(self, direction):
        return self.config.strict_baud and self.pace_at[direction] > self.reactor.now() + 0.01

    def _schedule_pace(self, when):
        if self.pace_timer is None:
            self.pace_timer = self.reactor.call_at(when, self._pace_fired)

    def _pace_fired(self):
        self.pace_timer = None
        self._update_interest()
        self._flush()

    # settings are the pty's termios

    def settings(self):
        return termios_settings(self.master)

    def apply_setting(self, name, value):
        if self.master is None:
            raise OSError(errno.ENODEV, "device not open")
        termios_apply(self.master, name, value)

    def set_break(self, on):
        return "a virtual port has no break line"


def make_device(port, reactor):
    c = port.config
    if c.virtual is not None:
        return VirtualDevice(port, reactor)
    if c.device.startswith("socket://"):
        return SocketDevice(port, reactor)
    if "://" in c.device:
        return UrlDevice(port, reactor)
    if is_stream_device(c.device):
        return StreamDevice(port, reactor)
    return FdDevice(port, reactor)


# ---------------------------------------------------------------------
# Connections: one client (or dialed peer) each, and TLS
# ---------------------------------------------------------------------

def format_peer(address):
    host, port = address[0], address[1]
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


class Connection(Handler):
    """One TCP client of a port.  Outgoing data is sent at once when the
    socket takes it; the rest waits in `out`, bounded by client_buffer.

    Reading stops while the device cannot take more (back-pressure); the
    peer's hang-up is still watched then.  A peer that shuts down its
    sending side (half-close, `nc -N`) is not gone: it keeps getting
    device data until the port's grace for it ends (Port.peer_finished)."""

    def __init__(self, port, reactor, sock, peer, now):
        self.port = port
        self.reactor = reactor
        self.sock = sock
        self.peer = peer
        self.fd = sock.fileno()
        self.out = bytearray()
        self.since = time.time()
        self.since_mono = now
        self.last_io = now
        self.last_active = None       # wall time of the last data from this client
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_dropped = 0
        self.reading = True           # False while the device's queue is full
        self.half_closed = False      # the peer sent FIN: nothing more to read
        self.closed = False
        self.idle_timer = None
        self.heartbeat_timer = None   # heartbeat_interval: a dialed connection's next look at its silence
        self.dialed = False           # True for the connection the client role made
        self.limit = port.config.client_buffer
        self.drop_when_full = port.config.slow_client == "drop"
        self.telnet = None            # protocol = rfc2217: this connection's TelnetCodec
        self.com_port = None          # and its RFC 2217 state (ComPortServer or ComPortClient)
        self.suspended = False        # RFC 2217 FLOWCONTROL-SUSPEND: hold what we send

    def fileno(self):
        return self.fd

    def _interest(self):
        self.reactor.set_interest(self, self.reading and not self.half_closed,
                                  bool(self.out) and not self.suspended, hangup=not self.half_closed)

    def start(self):
        self._interest()

    def pause_reading(self, paused):
        if not self.closed and self.reading == paused:
            self.reading = not paused
            self._interest()

    def send_data(self, data, bounded=True):
        """Send payload: framed by Telnet (IAC doubled) on rfc2217 ports."""
        return self.send(self.telnet.escape(data) if self.telnet is not None else data, bounded)

    def suspend(self, suspended):
        """RFC 2217 flow control: hold (or release) what is sent to the
        peer; held bytes count against client_buffer like any backlog."""
        if self.closed or suspended == self.suspended:
            return
        self.suspended = suspended
        self._interest()
        self.port.backlog_changed()

    def send(self, data, bounded=True):
        """Queue data for this client; False if the client was dropped.
        bounded=False is for what the port held for this very client (the
        `buffer`, which may be larger than client_buffer)."""
        if self.closed:
            return False
        if self.out or self.suspended:
            if bounded and len(self.out) + len(data) > self.limit:
                return self._overflow(data)
            self.out += data
            return True
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.port.count_dropped(len(data), "a client is gone")
            self.port.end_connection(self, "send failed: %s" % describe_error(e), by_peer=True)
            return False
        self.bytes_out += n
        if n:
            self.last_io = monotonic()  # timeout counts data in either direction
        if n < len(data):
            rest = data[n:]
            if bounded and len(rest) > self.limit:
                return self._overflow(rest)
            self.out += rest
            self._interest()
        return True

    def _overflow(self, data):
        if self.drop_when_full:
            self.bytes_dropped += len(data)
            self.port.count_dropped(len(data), "client %s is not reading (client_buffer %d full)"
                                    % (format_peer(self.peer), self.limit))
            return True
        self.port.count_dropped(len(data), "a slow client was cut off (client_buffer %d full)" % self.limit)
        self.port.end_connection(self, "slow client: client_buffer of %d bytes full" % self.limit)
        return False

    def on_writable(self):
        if self.suspended:
            self._interest()
            return
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as e:
            self.port.end_connection(self, "send failed: %s" % describe_error(e), by_peer=True)
            return
        del self.out[:n]
        self.bytes_out += n
        self.last_io = self.reactor.now()
        if not self.out:
            self._interest()
        if self.port.device_paused:     # draining can only end a pause
            self.port.backlog_changed()

    def on_readable(self):
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            self.port.end_connection(self, describe_error(e), by_peer=True)
            return
        if not data:
            self.half_closed = True
            self._interest()
            self.port.peer_finished(self)
            return
        self.bytes_in += len(data)
        self.last_io = monotonic()
        if self.telnet is None:
            self.port.client_payload(self, data)
        else:
            self.port.rfc2217.received(self, data)  # payload comes back through client_payload

    def fail(self, reason):
        self.port.end_connection(self, reason)

    def close(self):
        self.finish()

    def ended(self, reason):
        self.closed = True
        if self.idle_timer:
            self.idle_timer.cancel()
        self.reactor.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass


class TlsConnection(Connection):
    """A client over TLS: the SSL layer may hold decrypted bytes that the
    selector cannot see, so reading goes on while it has some."""

    def on_readable(self):
        Connection.on_readable(self)
        while not self.closed and self.reading and not self.half_closed and self.sock.pending():
            Connection.on_readable(self)


class TlsStream:
    """An SSLSocket that behaves like a non-blocking plain socket for
    Connection: SSL's want-read/want-write become BlockingIOError."""

    def __init__(self, ssl_sock):
        import ssl
        self.ssl_sock = ssl_sock
        self.want = (ssl.SSLWantReadError, ssl.SSLWantWriteError)

    def send(self, data):
        try:
            return self.ssl_sock.send(data)
        except self.want:
            raise BlockingIOError(errno.EAGAIN, "TLS wants I/O")

    def recv(self, size):
        try:
            return self.ssl_sock.recv(size)
        except self.want:
            raise BlockingIOError(errno.EAGAIN, "TLS wants I/O")

    def __getattr__(self, name):
        return getattr(self.ssl_sock, name)


class TlsStart(Handler):
    """Drives a non-blocking TLS handshake on the loop, then hands the
    socket back through on_done(error or None)."""

    def __init__(self, reactor, ssl_sock, on_done, timeout=None):
        self.reactor = reactor
        self.sock = ssl_sock
        self.on_done = on_done
        self.timer = None
        if timeout is not None:
            self.timer = reactor.call_later(timeout, lambda: self.finish("no TLS handshake within %gs" % timeout))

    def fileno(self):
        return self.sock.fileno()

    def step(self):
        import ssl
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.reactor.set_interest(self, True, False)
            return
        except ssl.SSLWantWriteError:
            self.reactor.set_interest(self, False, True)
            return
        except (ssl.SSLError, ssl.CertificateError, OSError, ValueError) as e:
            self.finish(getattr(e, "verify_message", None) or getattr(e, "reason", None) or describe_error(e))
            return
        self.finish(None)

    on_readable = on_writable = step

    def ended(self, error):
        self.reactor.forget(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done(error)

    def cancel(self):
        """Drop the handshake and its socket; on_done is not called."""
        self.on_done = None
        self.finish()
        try:
            self.sock.close()
        except OSError:
            pass


def tune_socket(sock, config):
    """TCP_NODELAY and keepalive as configured (Linux names; others skip)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if config.nodelay else 0)
        # The kernel would let a non-reader's send buffer grow to megabytes
        # (tcp_wmem autotuning) before client_buffer even starts to fill:
        # cap it so that a stalled client costs about client_buffer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(65536, min(config.client_buffer, 1 << 20)))
        idle, interval, count = config.keepalive
        if idle:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


# ---------------------------------------------------------------------
# Listeners: bound sockets, accepting in bursts, pausing on EMFILE
# ---------------------------------------------------------------------

def resolve_listen(address):
    """[(family, sockaddr)] to bind for a listen address; no host = every
    address, IPv6 and IPv4 in one dual-stack socket where the OS allows."""
    host, port = address
    if not host:
        if socket.has_ipv6:
            return [(socket.AF_INET6, ("::", port), True)]
        return [(socket.AF_INET, ("0.0.0.0", port), False)]
    if is_ip_literal(host):  # no resolver (and no idna codec import) for addresses
        return [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port), False)]
    try:
        infos = socket.getaddrinfo(resolver_host(host), port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (UnicodeError, LookupError) as e:  # a malformed name, or no idna codec for a non-ASCII one
        raise OSError(errno.EINVAL, "cannot resolve %s: %s" % (host, e))
    seen, out = set(), []
    for family, _, _, _, sockaddr in infos:
        if sockaddr in seen:
            continue
        seen.add(sockaddr)
        out.append((family, sockaddr, False))
    return out


# An address not there yet (an interface that comes up after sertcp at
# boot) or held by another program: retried every reopen_interval, the
# rest of the process working meanwhile.  Other errors (EACCES for a port
# below 1024, a name that does not resolve) stop the start.
RETRIED_BIND_ERRORS = (errno.EADDRNOTAVAIL, errno.EADDRINUSE)


class Listener:
    """A bound TCP socket; hands accepted sockets to the port that owns
    the address (or, for a shared listener, to a router).

    With retry_every, a bind that fails with one of `retried` errors (None:
    any OSError) is logged and tried again every retry_every seconds;
    `error` says why meanwhile (None once bound), and on_bound(listener)
    is called at each successful bind.  Without it, a failed bind raises."""

    def __init__(self, reactor, address, backlog, on_accept, name,
                 retry_every=None, on_bound=None, retried=RETRIED_BIND_ERRORS):
        self.reactor = reactor
        self.address = address
        self.backlog = backlog
        self.on_accept = on_accept
        self.name = name
        self.retry_every, self.on_bound, self.retried = retry_every, on_bound, retried
        self.sockets = []
        self.error = None               # why the address is not bound yet
        self.retry_timer = None
        self._bind()

    def _bind(self):
        self.retry_timer = None
        try:
            for family, sockaddr, dual in resolve_listen(self.address):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
                    sock.bind(sockaddr)
                    sock.listen(self.backlog)
                    sock.setblocking(False)
                except OSError:
                    sock.close()
                    raise
                self.sockets.append(ListenSocket(self, sock))
        except OSError as e:
            self.close()
            if self.retry_every is None or (self.retried is not None and e.errno not in self.retried):
                raise
            error = describe_error(e)
            if error != self.error:     # said once, not at every retry
                log_warning("[%s] cannot listen on %s: %s; retrying every %gs"
                            % (self.name, show_hostport(self.address), error, self.retry_every))
            self.error = error
            self.retry_timer = self.reactor.call_later(self.retry_every, self._bind)
            return
        self.error = None
        for s in self.sockets:
            self.reactor.set_interest(s, True, False)
        if self.on_bound is not None:
            self.on_bound(self)

    def bound(self):
        return ", ".join(format_peer(s.sock.getsockname()) for s in self.sockets)

    def close(self):
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        for s in self.sockets:
            s.close()
        self.sockets = []


class ListenSocket(Handler):
    """One bound socket of a Listener (an address family each)."""

    def __init__(self, listener, sock):
        self.listener = listener
        self.sock = sock
        self.resume_timer = None        # accepting again after EMFILE

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        if self.resume_timer is not None:
            self.resume_timer.cancel()  # a reload may close it while paused
            self.resume_timer = None
        self.listener.reactor.forget(self)
        self.sock.close()

    def _resume(self):
        self.resume_timer = None
        self.listener.reactor.set_interest(self, True, False)

    def on_readable(self):
        for _ in range(64):  # accept a burst, then let the others run
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors: stop accepting for a moment instead of spinning
                    self.listener.reactor.set_interest(self, False, False)
                    log_warning("[%s] cannot accept: %s; pausing accepts for 1s"
                                % (self.listener.name, describe_error(e)))
                    self.resume_timer = self.listener.reactor.call_later(1.0, self._resume)
                    return
                continue
            conn.setblocking(False)
            try:
                self.listener.on_accept(conn, peer)
            except Exception:
                conn.close()            # that connection only; fail() says the rest
                raise

    def fail(self, reason):
        pass    # that one connection is lost (the logged traceback says how); accepting goes on


# ---------------------------------------------------------------------
# The gate of a listener: allow, TLS, password, identity (handshake)
# ---------------------------------------------------------------------

def host_allowed(networks, host):
    """Is `host` (a peer address string) inside one of `networks`?"""
    import ipaddress
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    return any(address.version == net.version and address in net for net in networks)


class PeerLog:
    """Per-peer log lines, rate-limited per source address so that one peer
    cannot flood the log: at most PEER_LOG_BURST lines per PEER_LOG_WINDOW
    seconds, then one line saying how many were suppressed, when that
    window ends (with a reactor to time it) or at the next line."""

    def __init__(self, log, reactor=None):
        self.log = log
        self.reactor = reactor
        self.windows = {}   # host -> [window start, lines, suppressed]

    def __call__(self, host, level, message, *args):
        now = time.monotonic()
        window = self.windows.get(host)
        if window is None or now - window[0] >= PEER_LOG_WINDOW:
            if window is not None and window[2]:
                self.log.warning("suppressed %d log lines about %s", window[2], host)
            if len(self.windows) >= 4096:
                self._forget_old(now)
            window = self.windows[host] = [now, 0, 0]
        window[1] += 1
        if window[1] > PEER_LOG_BURST:
            window[2] += 1
            if window[2] == 1 and self.reactor is not None:
                self.reactor.call_at(window[0] + PEER_LOG_WINDOW, lambda: self._window_over(host, window))
            return
        self.log.log(level, message, *args)

    def _window_over(self, host, window):
        if self.windows.get(host) is window:
            del self.windows[host]
            self.log.warning("suppressed %d log lines about %s", window[2], host)

    def _forget_old(self, now):
        for host, window in list(self.windows.items()):
            if now - window[0] >= PEER_LOG_WINDOW:
                if window[2]:
                    self.log.warning("suppressed %d log lines about %s", window[2], host)
                del self.windows[host]
        if len(self.windows) >= 4096:
            self.windows.clear()


def make_server_tls(config):
    import ssl  # only configurations with TLS pay for it
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=config.tls_ca)
    return context


def make_client_tls(config):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_ca is not None:
        context.load_verify_locations(cafile=config.tls_ca)
    else:
        context.load_default_certs()
    return context


class FailedPasswords:
    """Wrong passwords per source address: after PASSWORD_FAILURES within
    PASSWORD_WINDOW seconds the address is refused for PASSWORD_BLOCK."""

    def __init__(self):
        self.failures = {}      # host -> [times]
        self.blocked = {}       # host -> until
        self.blocked_limit = 4096       # the size at which blocks that have ended are dropped

    def is_blocked(self, host, now):
        until = self.blocked.get(host)
        if until is None:
            return False
        if now >= until:
            del self.blocked[host]
            return False
        return True

    def failed(self, host, now):
        """Record a failure; True if the address is now blocked."""
        if len(self.failures) >= 4096:
            self.failures.clear()  # bounded memory beats perfect memory of old failures
        times = [t for t in self.failures.get(host, ()) if now - t < PASSWORD_WINDOW]
        times.append(now)
        self.failures[host] = times
        if len(times) >= PASSWORD_FAILURES:
            if len(self.blocked) >= self.blocked_limit:
                # an address whose block has ended is forgotten here, or when it comes back
                self.blocked = {h: until for h, until in self.blocked.items() if until > now}
                self.blocked_limit = max(4096, 2 * len(self.blocked))
            self.blocked[host] = now + PASSWORD_BLOCK
            del self.failures[host]
            return True
        return False


class Gate:
    """Admission on one listen address, shared by one or more ports, in
    this order: the source address (allow, "Fix IP"), TLS, the password,
    the id the client sends (identity, "Common"), then the port's own rules
    (max_clients, banner ...).  Each step before the port is bounded by
    identity_timeout."""

    def __init__(self, reactor, address, ports, log, peer_log):
        self.reactor = reactor
        self.ports = ports
        self.log = log
        self.peer_log = peer_log
        self.name = ports[0].name if len(ports) == 1 else "listen %s" % show_hostport(address)
        self.pending = deque()
        self.rejected = 0       # refused before any port was chosen, on a shared listener too
        self.any_allow = any(p.config.allow is not None for p in ports)
        self.id_maps = {}
        first = ports[0].config
        # ports sharing a listener agree on these (checked by the config)
        self.tls = make_server_tls(first) if first.tls_cert is not None else None
        self.password = ports[0].password
        self.timeout = min(p.config.identity_timeout for p in ports)
        self.failed_passwords = FailedPasswords()
        self.listener = Listener(reactor, address, max(p.config.backlog for p in ports), self.on_accept, self.name,
                                 min(p.config.reopen_interval for p in ports), self._listening)

    def _listening(self, listener):
        bound = listener.bound()
        ports = self.ports
        for port in ports:
            others = [p.name for p in ports if p is not port]
            how = ""
            if others:
                how = " (shared with %s; by %s)" % (", ".join(others), "identity" if port.config.identity is not None
                                                    else "source address")
            extras = [word for word, on in (("TLS", self.tls), ("password", self.password)) if on]
            self.log.info("[%s] listening on %s%s%s", port.name, bound, how,
                          (" with %s" % " and ".join(extras)) if extras else "")

    def refuse(self, sock, peer, reason):
        self.peer_log(peer[0], INFO, "[%s] client %s refused: %s", self.name, format_peer(peer), reason)
        self.rejected += 1
        if len(self.ports) == 1:
            self.ports[0].counters["connections_rejected"] += 1
        try:
            sock.close()
        except OSError:
            pass

    def on_accept(self, sock, peer):
        host = peer[0]
        if self.any_allow:
            candidates = [p for p in self.ports
                          if p.config.allow is None or host_allowed(p.config.allow, host)]
        else:
            candidates = self.ports     # the usual fleet listener: ids only
        if not candidates:
            self.refuse(sock, peer, "address not allowed")
            return
        if self.password is not None and self.failed_passwords.is_blocked(host, self.reactor.now()):
            self.refuse(sock, peer, "too many wrong passwords from %s (blocked for %ds)" % (host, PASSWORD_BLOCK))
            return
        # "Fix IP" ports that name this address win over ids ("Common")
        fixed = [p for p in candidates if p.config.allow is not None and p.config.identity is None]
        if fixed:
            candidates, with_identity = fixed[:1], []
        else:
            with_identity = [p for p in candidates if p.config.identity is not None]
        if self.tls is None and self.password is None and not with_identity:
            candidates[0].on_accept(sock, peer, b"")  # the plain case: straight to the port
            return
        if len(self.pending) >= MAX_PENDING_HANDSHAKES:
            oldest = self.pending.popleft()
            oldest.abandon("too many connections still in their handshake")
        Handshake(self, sock, peer, candidates[0], self._id_map(with_identity)).start()

    def _id_map(self, ports):
        """id -> port for these ports: one dict per distinct set, shared by
        every handshake (a fleet listener may have hundreds of ids)."""
        key = tuple(ports)
        by_id = self.id_maps.get(key)
        if by_id is None:
            if len(self.id_maps) >= 64:
                self.id_maps.clear()
            by_id = self.id_maps[key] = {p.config.identity: p for p in ports}
        return by_id

    def close(self):
        self.listener.close()
        for handshake in list(self.pending):
            handshake.abandon("listener closed")


class Handshake(Handler):
    """A client between accept and its port: TLS, then the password line,
    then the id, each step fed by the same reads, all within one deadline.
    Costs one socket and a few hundred bytes however hostile the peer.
    It ends once: to a port, or refused (finish(reason))."""

    def __init__(self, gate, sock, peer, first, by_id):
        self.gate = gate
        self.reactor = gate.reactor
        self.sock = sock
        self.peer = peer
        self.first = first          # the port when no id is asked for
        self.by_id = by_id          # id -> port (shared, never changed)
        now = self.reactor.now()
        self.deadline = now + gate.timeout
        self.timer = None
        self.line = bytearray()     # the password line being read
        self.matcher = IdentityMatcher(self.by_id, now, gate.timeout) if self.by_id else None
        self.stage = "tls" if gate.tls else "password" if gate.password is not None else "identity"

    def fileno(self):
        return self.sock.fileno()

    def start(self):
        self.gate.pending.append(self)
        if self.stage == "tls":
            try:
                self.sock = self.gate.tls.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            except OSError as e:
                self._refuse("TLS set-up failed: %s" % describe_error(e))
                return
            self.tls_start = TlsStart(self.reactor, self.sock, self._tls_done)
            self.tls_start.step()
        else:
            self.reactor.set_interest(self, True, False)
        if not self.finished:
            self._arm(self.deadline)

    def _arm(self, when, callback=None):
        if self.timer:
            self.timer.cancel()
        self.timer = self.reactor.call_at(when, callback or self._expired)

    def _expired(self):
        self.timer = None
        now = self.reactor.now()
        if self.stage == "identity":
            result = self.matcher.expire(now)
            if result is not None:
                self._identity_decided(result)
                return
            self._arm(self.matcher.deadline())
            return
        what = {"tls": "no TLS handshake", "password": "no password"}.get(self.stage, "nothing")
        self._refuse("%s within %gs (identity_timeout)" % (what, self.gate.timeout))

    # TLS

    tls_start = None

    def _tls_done(self, error):
        self.tls_start = None
        if error:
            self._refuse("TLS handshake failed: %s" % error)
            return
        self.sock = TlsStream(self.sock)
        self.stage = "password" if self.gate.password is not None else "identity" if self.by_id else "port"
        if self.stage == "port":
            self._to_port(self.first, b"")
            return
        self.reactor.set_interest(self, True, False)
        if self.sock.pending():
            self.on_readable()

    def on_readable(self):
        try:
            data = self.sock.recv(1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._refuse("failed in its handshake: %s" % describe_error(e))
            return
        if not data:
            self._refuse("closed before %s" % ("its password" if self.stage == "password" else "its id"))
            return
        if self.stage == "password":
            self._password_data(data)
        else:
            self._identity_data(data)

    # password: the first line, compared in constant time

    def _password_data(self, data):
        self.line += data
        end = self.line.find(b"\n")
        if end < 0:
            if len(self.line) > PASSWORD_LINE_LIMIT:
                self._refuse("password line too long")
            return
        given = bytes(self.line[:end])
        rest = bytes(self.line[end + 1:])
        self.line = bytearray()
        if given.endswith(b"\r"):
            given = given[:-1]
        import hmac
        if not hmac.compare_digest(given, self.gate.password):
            self._wrong_password()
            return
        if self.by_id:
            self.stage = "identity"
            if rest:
                self._identity_data(rest)
        else:
            self._to_port(self.first, rest)

    def _wrong_password(self):
        host = self.peer[0]
        blocked = self.gate.failed_passwords.failed(host, self.reactor.now())
        reason = "wrong password" + ("; %s blocked for %ds" % (host, PASSWORD_BLOCK) if blocked else "")
        # close after a pause: guessing costs the guesser time, not us memory
        self.stage = "closing"
        self.reactor.forget(self)
        self._arm(self.reactor.now() + WRONG_PASSWORD_DELAY, lambda: self._refuse(reason))

    # identity

    def _identity_data(self, data):
        result = self.matcher.feed(data, self.reactor.now())
        if result is None:
            self._arm(self.matcher.deadline())
        else:
            self._identity_decided(result)

    def _identity_decided(self, result):
        outcome, identity, rest = result
        if outcome == "match":
            self._to_port(self.by_id[identity], rest)
        elif outcome == "late":
            self._refuse("no id within %gs (identity_timeout)" % self.gate.timeout)
        else:
            self._refuse("unknown id %r" % show_bytes(identity))

    # endings: to a port, or refused with a reason

    def _to_port(self, port, rest):
        self.destination = (port, rest)
        self.finish(None)

    def _refuse(self, reason):
        self.finish(reason)

    def abandon(self, reason):
        self.finish(reason)

    destination = None

    def ended(self, reason):
        if self.tls_start is not None:
            self.tls_start.cancel()
        self.reactor.forget(self)
        if self.timer:
            self.timer.cancel()
            self.timer = None
        try:
            self.gate.pending.remove(self)
        except ValueError:
            pass
        if self.destination is not None:
            port, rest = self.destination
            port.on_accept(self.sock, self.peer, rest)
        else:
            self.gate.refuse(self.sock, self.peer, reason)


# ---------------------------------------------------------------------
# UDP: datagrams from udp_listen to the device, packets to udp_send_to
# ---------------------------------------------------------------------

UDP_MAX_PAYLOAD = 65507        # the most one IPv4 datagram carries; longer packets are split
UDP_READ_BURST = 64            # datagrams read per wake-up before the others run
UDP_SOURCES_SHOWN = 16         # recent source addresses /status lists
UDP_COUNTERS = ("udp_datagrams_in", "udp_bytes_in", "udp_datagrams_out", "udp_bytes_out",
                "udp_datagrams_refused", "udp_send_errors", "udp_packets_split")
# Linux's numbers for these; Python does not name them
IP_RECVERR, IPV6_RECVERR = 11, 25


def udp_key(address):
    """(host, port) of a sockaddr, an IPv4-mapped IPv6 one (a dual-stack
    socket's view of an IPv4 peer) as the IPv4 address."""
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, address[1]


def open_udp_socket(family, ttl, bind_to=None, dual=False):
    """A non-blocking datagram socket, bound to `bind_to` if given, set
    for what udp_send_to may name: broadcast (SO_BROADCAST: the peers are
    the user's choice, so it is always allowed), multicast (`ttl` hops),
    and ICMP errors queued with the address they are about (IP_RECVERR;
    without it an unconnected socket never hears of an unreachable peer)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        if bind_to is not None:
            sock.bind(bind_to)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    options = [(socket.SOL_SOCKET, socket.SO_BROADCAST, 1),
               (socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)]
    if sys.platform.startswith("linux"):
        options.append((socket.IPPROTO_IP, IP_RECVERR, 1))
    if family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl))
        if sys.platform.startswith("linux"):
            options.append((socket.IPPROTO_IPV6, IPV6_RECVERR, 1))
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass        # an IPv6-only socket takes no IPv4 options: nothing to send there
    return sock


class UdpPeer:
    """Where device data goes by UDP: one udp_send_to entry (resolved at
    start), or the source udp_reply follows; and what went to it."""

    def __init__(self, name, address=None):
        self.name = name                # as configured, or the source as heard
        self.address = address          # sockaddr; None until resolved
        self.datagrams_out = self.bytes_out = self.errors = 0
        self.last_error = None

    def status(self):
        return {"peer": self.name, "address": format_peer(self.address) if self.address else None,
                "datagrams_out": self.datagrams_out, "bytes_out": self.bytes_out,
                "errors": self.errors, "last_error": self.last_error}


class UdpSocket(Handler):
    """One datagram socket of a port: bound to udp_listen (datagrams go
    on to the port) or unbound (sending only; anything it receives is
    discarded).  Both are read for ICMP errors: IP_RECVERR queues them,
    and a queue left full would wake the loop for ever."""

    def __init__(self, side, sock, bound, dual=False):
        self.side, self.sock, self.bound, self.dual = side, sock, bound, dual
        self.family = sock.family
        self.buffer = bytearray(65536)
        self.view = memoryview(self.buffer)

    def fileno(self):
        return self.sock.fileno()

    def on_readable(self):
        self.read_errors()
        for _ in range(UDP_READ_BURST):
            try:
                n, source = self.sock.recvfrom_into(self.buffer)
            except BlockingIOError:
                return
            except OSError as e:
                if self.read_errors():
                    continue            # an ICMP error about an earlier datagram
                self.side.port.log.warning("[%s] UDP socket: %s", self.side.port.name, describe_error(e))
                return
            self.side.received(self, self.view[:n].tobytes(), source)

    def read_errors(self):
        """Hand each queued ICMP error to the side, with the address the
        refused datagram was sent to; returns how many there were."""
        flag = getattr(socket, "MSG_ERRQUEUE", 0)
        count = 0
        while flag and count < 1024:
            try:
                _, ancillary, _, address = self.sock.recvmsg(1, 512, flag)
            except OSError:             # BlockingIOError: the queue is empty
                return count
            count += 1
            for level, kind, data in ancillary:
                if (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                    # struct sock_extended_err begins with ee_errno (u32)
                    self.side.peer_error(address, int.from_bytes(data[:4], sys.byteorder))
        return count

    def send(self, peer, data, address):
        """One datagram; True if the kernel took it.  A failure that was
        an earlier datagram's ICMP error (reported on this send, which the
        kernel then did not make) is read off the queue and the send made
        again."""
        for attempt in (0, 1):
            try:
                self.sock.sendto(data, address)
                return True
            except BlockingIOError as e:
                self.side.send_failed(peer, e, len(data))
                return False
            except OSError as e:
                if attempt == 0 and self.read_errors():
                    continue
                self.side.send_failed(peer, e, len(data))
                return False

    def fail(self, reason):
        pass    # that one datagram is lost (the logged traceback says how); the socket goes on

    def close(self):
        self.side.port.reactor.forget(self)
        self.sock.close()


class UdpSide:
    """The UDP side of one port (udp_listen, udp_send_to, udp_reply).

    Datagrams received on udp_listen go to the device, one write each,
    subject to allow, receive_from (see udp_source_selected) and
    listen_on_open.  Each packet of device data goes to every udp_send_to
    peer and the udp_reply peer as one datagram (split, and counted, past
    UDP_MAX_PAYLOAD), from the udp_listen socket of its family when there
    is one, so that a peer sees the answer come from the port it sent to.
    UDP has no back-pressure: a datagram the socket cannot take now is
    dropped and counted; an error from one peer (an ICMP unreachable is
    ECONNREFUSED) is counted and logged for that peer alone."""

    def __init__(self, port):
        self.port = port
        config = port.config
        self.listen = config.udp_listen
        self.ttl = config.udp_multicast_ttl
        self.bound = []                 # UdpSockets on udp_listen
        self.unbound = {}               # family -> UdpSocket that only sends
        self.peers = [UdpPeer(show_hostport(a)) for a in config.udp_send_to or ()]
        self.reply_peer = None          # udp_reply: the latest source
        self.reply_heard = 0.0
        self.holder = None              # receive_from = first: the source that holds the device
        self.holder_heard = 0.0
        self.sources = {}               # udp_key -> [shown, datagrams, bytes, last heard]: the latest few
        self.listen_error = None
        self.timers = set()
        self.stopped = False

    # -- life --

    def start(self):
        if self.listen is not None:
            self.bind()
        for peer, (host, number) in zip(self.peers, self.port.config.udp_send_to or ()):
            self.resolve(peer, host, number)

    def later(self, delay, callback):
        def fire():
            self.timers.discard(timer)
            callback()
        timer = self.port.reactor.call_later(delay, fire)
        self.timers.add(timer)

    def bind(self):
        """Bind udp_listen; an address that cannot be bound (in use, an
        interface not up yet) is logged once and retried every
        reopen_interval, and sending meanwhile uses unbound sockets."""
        port = self.port
        made = []
        try:
            for family, sockaddr, dual in resolve_listen(self.listen):
                made.append(UdpSocket(self, open_udp_socket(family, self.ttl, sockaddr, dual), True, dual))
        except OSError as e:
            for s in made:
                s.sock.close()
            if self.listen_error is None:
                port.log.error("[%s] cannot listen for UDP on %s: %s; retrying every %gs", port.name,
                               show_hostport(self.listen), describe_error(e), port.config.reopen_interval)
            self.listen_error = describe_error(e)
            self.later(port.config.reopen_interval, self.bind)
            return
        self.listen_error = None
        self.bound = made
        for s in made:
            port.reactor.set_interest(s, True, False)
        port.log.info("[%s] listening for UDP on %s", port.name,
                      ", ".join(format_peer(s.sock.getsockname()) for s in made))

    def resolve(self, peer, host, number):
        """Resolve a udp_send_to peer once, off the loop; a name that does
        not resolve is retried every reopen_interval."""
        port = self.port

        def done(results, error):
            if self.stopped:
                return
            if error is not None or not results:
                peer.last_error = "cannot resolve %s: %s" % (host, describe_error(error) if error else "no address")
                port.peer_log(host, WARNING, "[%s] UDP peer %s", port.name, peer.last_error)
                self.later(port.config.reopen_interval, lambda: self.resolve(peer, host, number))
                return
            families = [s.family for s in self.bound]
            results = [r for r in results if r[0] in families] + results
            peer.address = results[0][1]
            peer.last_error = None
        resolve_in_thread(port.reactor, host, number, done)

    def close(self):
        self.stopped = True
        for timer in list(self.timers):
            timer.cancel()
        self.timers.clear()
        for s in self.bound + list(self.unbound.values()):
            s.close()
        self.bound, self.unbound = [], {}

    # -- device to peers --

    def socket_for(self, address):
        """(UdpSocket, sockaddr as it takes it) to send to `address`: a
        udp_listen socket of its family, a dual-stack one for IPv4 (as an
        IPv4-mapped address), else an unbound one made on first use."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        for s in self.bound:
            if s.family == family:
                return s, address
        if family == socket.AF_INET:
            for s in self.bound:
                if s.dual:
                    return s, ("::ffff:" + address[0], address[1], 0, 0)
        s = self.unbound.get(family)
        if s is None:
            s = self.unbound[family] = UdpSocket(self, open_udp_socket(family, self.ttl), False)
            self.port.reactor.set_interest(s, True, False)
        return s, address

    def current_reply_peer(self):
        """The udp_reply peer, None once it has been silent for `timeout`
        (looked at when it matters: data to send, a /status request)."""
        reply = self.reply_peer
        timeout = self.port.config.timeout
        if reply is not None and timeout and self.port.reactor.now() - self.reply_heard >= timeout:
            self.port.log.info("[%s] udp_reply: %s silent for %gs, no longer answered",
                               self.port.name, reply.name, timeout)
            self.reply_peer = reply = None
        return reply

    def targets(self):
        """The peers device data goes to now: udp_send_to, and the source
        of the latest datagram (udp_reply) until `timeout` passes."""
        peers = [p for p in self.peers if p.address is not None]
        reply = self.current_reply_peer() if self.reply_peer is not None else None
        if reply is not None and all(udp_key(p.address) != udp_key(reply.address) for p in peers):
            peers.append(reply)
        return peers

    def send(self, data):
        """A packet of device data to every target; returns how many there
        were (a datagram one of them did not get is counted as dropped)."""
        peers = self.targets()
        if not peers:
            return 0
        counters = self.port.counters
        if len(data) > UDP_MAX_PAYLOAD:
            counters["udp_packets_split"] += 1
            chunks = [data[i:i + UDP_MAX_PAYLOAD] for i in range(0, len(data), UDP_MAX_PAYLOAD)]
        else:
            chunks = (data,)
        for peer in peers:
            try:
                sock, address = self.socket_for(peer.address)
            except OSError as e:        # no socket of that family (IPv6 off)
                self.send_failed(peer, e, len(data))
                continue
            for chunk in chunks:
                if sock.send(peer, chunk, address):
                    peer.datagrams_out += 1
                    peer.bytes_out += len(chunk)
                    counters["udp_datagrams_out"] += 1
                    counters["udp_bytes_out"] += len(chunk)
        return len(peers)

    def send_failed(self, peer, error, size):
        """A datagram the kernel did not take: counted, its bytes dropped,
        logged (rate-limited per peer address)."""
        port = self.port
        if isinstance(error, BlockingIOError) or getattr(error, "errno", None) == errno.ENOBUFS:
            why = "socket buffer full, datagram dropped (UDP has no back-pressure)"
        else:
            why = describe_error(error)
        peer.errors += 1
        peer.last_error = why
        port.counters["udp_send_errors"] += 1
        port.count_dropped(size, "UDP peer %s: %s" % (peer.name, why))
        port.peer_log(udp_key(peer.address)[0] if peer.address else peer.name, WARNING,
                      "[%s] UDP peer %s: %s", port.name, peer.name, why)

    def peer_error(self, address, code):
        """An ICMP error about a datagram sent to `address` earlier (port
        unreachable: ECONNREFUSED): counted and logged for that peer; the
        udp_reply peer is forgotten, it has gone."""
        port = self.port
        key = udp_key(address)
        why = os.strerror(code) if code else "ICMP error"
        port.counters["udp_send_errors"] += 1
        for peer in self.peers + ([self.reply_peer] if self.reply_peer else []):
            if peer.address is not None and udp_key(peer.address) == key:
                peer.errors += 1
                peer.last_error = why
        port.peer_log(key[0], WARNING, "[%s] UDP peer %s: %s", port.name, format_peer(key), why)
        if self.reply_peer is not None and udp_key(self.reply_peer.address) == key:
            port.log.info("[%s] udp_reply: %s is gone, no longer answered", port.name, self.reply_peer.name)
            self.reply_peer = None

    # -- peers to device --

    def received(self, sock, data, source):
        port = self.port
        config = port.config
        counters = port.counters
        counters["udp_datagrams_in"] += 1
        counters["udp_bytes_in"] += len(data)
        key = udp_key(source)
        self.note_source(key, len(data))
        now = port.reactor.now()
        if not sock.bound:
            why = "sent to a socket that only sends (use udp_listen)"
        elif config.allow is not None and not host_allowed(config.allow, source[0]):
            why = "address not allowed"
        elif not port.network_enabled():
            why = "virtual port not open by a local program (listen_on_open)"
        else:
            if config.receive_from == "first" and (self.holder is None or config.timeout
                                                   and now - self.holder_heard >= config.timeout):
                self.holder = key
            if self.holder == key:
                self.holder_heard = now
            why = None if udp_source_selected(config.receive_from, key, self.holder, port.clients) else \
                "receive_from = %s ignores it" % config.receive_from
        if why is not None:
            counters["udp_datagrams_refused"] += 1
            port.count_dropped(len(data), "datagram from %s: %s" % (format_peer(key), why))
            port.peer_log(key[0], INFO, "[%s] datagram from %s refused: %s", port.name, format_peer(key), why)
            return
        if config.udp_reply:
            if self.reply_peer is None or udp_key(self.reply_peer.address) != key:
                self.reply_peer = UdpPeer(format_peer(key), source)
                port.peer_log(key[0], INFO, "[%s] udp_reply: answering %s", port.name, format_peer(key))
            self.reply_heard = now
        if port.trace:
            port.trace.record(">", "udp " + format_peer(key), data)
        if port.device.is_open and port.device.tx_bytes >= DEVICE_HIGH_WATER:
            # no back-pressure in UDP: dropped (counted) rather than queued without bound
            counters["udp_datagrams_refused"] += 1
            port.count_dropped(len(data), "device queue full (%d bytes): datagram from %s dropped"
                               % (port.device.tx_bytes, format_peer(key)))
            return
        port.to_device(data)            # one datagram, one write

    def note_source(self, key, size):
        """Keep the latest few sources for /status (bounded, whoever sends)."""
        entry = self.sources.pop(key, None)
        if entry is None:
            if len(self.sources) >= UDP_SOURCES_SHOWN:
                del self.sources[next(iter(self.sources))]
            entry = [format_peer(key), 0, 0, 0.0]
        entry[1] += 1
        entry[2] += size
        entry[3] = time.time()
        self.sources[key] = entry

    def status(self):
        reply = self.current_reply_peer()
        shown = None
        if reply is not None:
            shown = reply.status()
            timeout = self.port.config.timeout
            shown["expires_in"] = round(max(0.0, self.reply_heard + timeout - self.port.reactor.now()), 3) \
                if timeout else None
        return {"listen": show_hostport(self.listen) if self.listen else None,
                "bound": [format_peer(s.sock.getsockname()) for s in self.bound],
                "listen_error": self.listen_error,
                "send_to": [p.status() for p in self.peers],
                "reply_to": shown,
                "sources": [{"peer": e[0], "datagrams_in": e[1], "bytes_in": e[2], "last_heard": round(e[3], 3)}
                            for e in reversed(list(self.sources.values()))]}


# ---------------------------------------------------------------------
# DNS-SD: the multicast DNS socket, interface addresses, what a port announces
# ---------------------------------------------------------------------
# Only a Server with a port that sets mdns builds any of this; fcntl is
# the one module it needs beyond _socket, and pyserial has imported it.

SIOCGIFFLAGS, SIOCGIFADDR = 0x8913, 0x8915      # linux/sockios.h
IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000


def ipv4_interfaces():
    """[(name, address, flags)] of the interfaces that are up and have
    an IPv4 address, by ioctl on a datagram socket (no netlink, no
    ifaddr package: fcntl is already imported by pyserial)."""
    import fcntl
    found = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            request = name.encode()[:15].ljust(40, b"\0")
            try:
                flags = int.from_bytes(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request)[16:18], sys.byteorder)
                address = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24]
            except OSError:
                continue                # no IPv4 address on it
            if flags & IFF_UP:
                found.append((name, socket.inet_ntoa(address), flags))
    return found


def ipv6_addresses(path="/proc/net/if_inet6"):
    """The IPv6 addresses of the interfaces (Linux lists them in
    /proc/net/if_inet6: address, index, prefix, scope, flags, name)."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and len(fields[0]) == 32:
                    found.append(bytes.fromhex(fields[0]))
    except OSError:
        pass
    return found


def announced_addresses(bound):
    """(family, packed) pairs for the A and AAAA records of a listener
    bound to the sockaddrs `bound`: a specific address is itself; a
    wildcard stands for every interface's address of its family (IPv4
    too for a dual-stack "::").  Loopback addresses only when there is
    nothing else: another machine cannot reach us there."""
    v4, v6 = [], []
    for address in bound:
        host = address[0].split("%")[0]
        if host in ("0.0.0.0", "::"):
            v4 += [socket.inet_aton(a) for _, a, _ in ipv4_interfaces()]
            if host == "::":
                v6 += ipv6_addresses()
        elif ":" in host and not host.startswith("::ffff:"):
            v6.append(socket.inet_pton(socket.AF_INET6, host))
        else:
            v4.append(socket.inet_aton(host.replace("::ffff:", "")))
    pairs = [(socket.AF_INET, a) for a in v4] + [(socket.AF_INET6, a) for a in v6]
    outside = [(f, a) for f, a in pairs if not (a[:1] == b"\x7f" or a == bytes(15) + b"\1")]
    seen, out = set(), []
    for pair in outside or pairs:
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def mdns_host_label():
    """This host's name as the first label of HOST.local."""
    return clip_label(socket.gethostname().split(".")[0]) or "sertcp"


def mdns_txt_strings(config):
    """The TXT record of a port: protocol, baudrate, the USB adapter's
    vendor, product and serial number when the device is a usb: spec
    that resolves now, then the mdns_txt pairs (which may override)."""
    pairs = [("protocol", config.protocol), ("baudrate", str(config.baudrate))]
    if is_usb_spec(config.device):
        try:
            _, adapter = resolve_usb_device(config.device)
            pairs += [(key, adapter[field]) for key, field in
                      (("usb_vendor", "vendor"), ("usb_product", "product"), ("usb_serial", "serial"))
                      if adapter[field]]
        except OSError:
            pass                        # not plugged in now: announced without
    given = dict(config.mdns_txt or ())
    pairs = [(k, v) for k, v in pairs if k not in given] + list(config.mdns_txt or ())
    return [("%s=%s" % (k, v)).encode("utf-8")[:255] for k, v in pairs]


def mdns_service(config, bound, host):
    """The MdnsService of a port with mdns, listening on sockaddrs `bound`."""
    instance = config.mdns_name or clip_label("%s on %s" % (config.name, host))
    return MdnsService(config.name, instance, config.mdns_type.split("."), bound[0][1], mdns_txt_strings(config),
                       host, announced_addresses(bound))


class MdnsSocket(Handler):
    """The responder's socket: UDP 5353 shared with any other responder
    on the host (avahi-daemon: SO_REUSEADDR and SO_REUSEPORT), member of
    224.0.0.251 on each multicast interface, with loopback on so that
    browsers on this host see us.  IPv4 only (no ff02::fb).  It feeds
    datagrams to an MdnsResponder and sends what that returns, on every
    interface for the group."""

    def __init__(self, reactor, log):
        self.reactor, self.log = reactor, log
        self.responder = MdnsResponder()
        self.timer = None
        self.send_errors = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15), 1)
            self.sock.bind(("", MDNS_PORT))
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            self.interfaces = [address for _, address, flags in ipv4_interfaces() if flags & IFF_MULTICAST]
            for address in self.interfaces or ["0.0.0.0"]:
                try:
                    self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                         socket.inet_aton(MDNS_GROUP) + socket.inet_aton(address))
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:     # two interfaces with one address
                        log.warning("mdns: cannot join %s on %s: %s", MDNS_GROUP, address, describe_error(e))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.buffer = bytearray(DNS_MESSAGE_LIMIT)
        reactor.set_interest(self, True, False)

    def fileno(self):
        return self.sock.fileno()

    def update(self, services):
        """Announce `services` ({port name: MdnsService}), withdraw the
        ones no longer there or changed (and announce them anew)."""
        now = monotonic()
        for key, entry in list(self.responder.names.items()):
            if key not in services or not entry.service.same_as(services[key]):
                self.send(self.responder.remove(key))
        for key, service in services.items():
            if key not in self.responder.names:
                self.responder.add(service, now)
        self.run_due()

    def on_readable(self):
        for _ in range(MDNS_READ_BURST):
            try:
                n, source = self.sock.recvfrom_into(self.buffer)
            except BlockingIOError:
                break
            except OSError as e:
                self.log.debug("mdns: receive: %s", describe_error(e))
                break
            self.send(self.responder.feed(bytes(self.buffer[:n]), source, monotonic()))
        self.run_due()

    def run_due(self):
        self.send(self.responder.expire(monotonic()))
        for note in self.responder.take_notes():
            if note[0] == "renamed":
                self.log.warning("mdns: another host uses the name %r: renamed %r", note[1], note[2])
            else:
                self.log.info("mdns: %s %r", note[0], note[1])
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        due = self.responder.deadline()
        if due is not None:
            self.timer = self.reactor.call_at(due, self.run_due)

    def send(self, packets):
        for data, destination in packets:
            if destination is not None:
                self.send_one(data, destination)
                continue
            for address in self.interfaces or [None]:
                if address is not None:
                    try:
                        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
                    except OSError:
                        continue
                self.send_one(data, (MDNS_GROUP, MDNS_PORT))

    def send_one(self, data, destination):
        try:
            self.sock.sendto(data, destination)
        except OSError as e:
            self.send_errors += 1
            self.log.debug("mdns: send to %s: %s", format_peer(destination), describe_error(e))

    def status(self):
        return dict(self.responder.counters, mdns_send_errors=self.send_errors,
                    names={key: {"name": e.instance, "state": e.state} for key, e in self.responder.names.items()})

    def fail(self, reason):
        pass    # that datagram is lost (the traceback is logged); the socket goes on

    def close(self):
        """Goodbye (TTL 0) for every name we announced, then the socket."""
        self.send(self.responder.remove_all())
        if self.timer is not None:
            self.timer.cancel()
        self.reactor.forget(self)
        self.sock.close()


# =====================================================================
# 6. Port: one serial device and its clients
# =====================================================================

# ---------------------------------------------------------------------
# RFC 2217 roles: the server owns the device, the client pushes settings
# ---------------------------------------------------------------------

class ComPortRole:
    """A port's RFC 2217 side (protocol = rfc2217): a TelnetCodec on every
    connection, and the role the port plays on all of them -- what both
    roles share.  ComPortServerRole and ComPortClientRole say the rest;
    make_com_port_role() picks one."""

    role = None
    SETTINGS = ("baudrate", "bytesize", "parity", "stopbits", "flow")
    OPTIONS = {}                        # TelnetCodec keywords for this role

    def __init__(self, port):
        self.port = port
        self.configured = {name: getattr(port.config, name) for name in self.SETTINGS}

    # -- connections --

    def attach(self, conn):
        """A new connection: give it a codec (nothing is sent yet)."""
        conn.telnet = TelnetCodec(**self.OPTIONS)

    def start(self, conn):
        """Send the opening negotiation (after any password, id or banner)."""
        opening = conn.telnet.data_to_send()
        if opening:
            conn.send(opening)

    def detach(self, conn):
        """A connection closed."""
        self._update_timers()

    def stop(self):
        pass

    def device_opened(self):
        pass

    def received(self, conn, data):
        """Bytes from a connection: payload on to the port, Telnet handled here."""
        codec = conn.telnet
        for item in codec.feed(data):
            if conn.closed:
                return
            if item.__class__ is bytes:
                self.port.client_payload(conn, item)
            else:
                self._event(conn, item)
        answer = codec.data_to_send()
        if answer and not conn.closed:
            conn.send(answer)

    def _event(self, conn, event):
        kind = event[0]
        if kind == "sb":
            if event[1] != OPT_COM_PORT:
                self._debug(conn, "ignoring a subnegotiation of Telnet option %d", event[1])
            elif not (conn.telnet.enabled("us", OPT_COM_PORT) or conn.telnet.enabled("him", OPT_COM_PORT)):
                self._debug(conn, "ignoring COM-PORT-OPTION subnegotiation before the option was agreed")
            else:
                self.subnegotiation(conn, event[2])
        elif kind == "enabled":
            if event[2] == OPT_COM_PORT and not conn.com_port.active:
                conn.com_port.active = True
                self.agreed(conn)
        elif kind == "refused":
            self.refused(conn, event[1], event[2])
        elif kind == "break":
            self.telnet_break(conn)
        elif kind == "malformed":
            self._debug(conn, "Telnet: %s", event[1])
        elif kind == "command":
            self._debug(conn, "Telnet command %s ignored", TELNET_COMMAND_NAMES.get(event[1], str(event[1])))

    # what each role does with the events
    def subnegotiation(self, conn, body):
        raise NotImplementedError

    def agreed(self, conn):
        raise NotImplementedError

    def refused(self, conn, side, option):
        pass

    def telnet_break(self, conn):
        self._debug(conn, "ignoring IAC BRK")

    def _update_timers(self):
        pass

    # -- helpers --

    def _send_sb(self, conn, body):
        if not conn.closed:
            conn.send(conn.telnet.subnegotiation(OPT_COM_PORT, body))

    def _who(self, conn):
        return "%s %s" % ("peer" if conn.dialed else "client", format_peer(conn.peer))

    def _debug(self, conn, message, *args):
        self.port.log.debug("[%s] %s: " + message, self.port.name, self._who(conn), *args)

    def _info(self, conn, message, *args):
        self.port.peer_log(conn.peer[0], INFO, "[%s] %s: " + message, self.port.name, self._who(conn), *args)

    def _log(self, level, message, *args):
        self.port.log.log(level, "[%s] " + message, self.port.name, *args)


class ComPortServerRole(ComPortRole):
    """The port owns the real device: clients change the one device; a
    change is applied once, answered with the value in force and heard by
    every RFC 2217 client; remote_control limits what may change; when the
    last client leaves, the configured settings and lines come back.
    Modem lines are polled only while some client's mask wants them.

    Every change goes through device.call(): the answer is sent when the
    device has taken it, which for a URL device is later, off the loop."""

    role = "server"
    OPTIONS = dict(local=(OPT_BINARY, OPT_SGA, OPT_ECHO, OPT_COM_PORT), remote=(OPT_BINARY, OPT_SGA, OPT_COM_PORT),
                   ask_local=(OPT_BINARY, OPT_SGA, OPT_ECHO), ask_remote=(OPT_BINARY, OPT_COM_PORT))

    def __init__(self, port):
        super().__init__(port)
        self.allowed = frozenset(port.config.remote_control)
        self.in_force = dict(self.configured)
        self.lines = {"dtr": True, "rts": True, "break": False}  # for devices without lines
        self.lines_before = None        # line states before a client first changed one
        self.modem_state = None         # modem lines at the last poll (high nibble)
        self.line_state = None
        self.modem_supported = True     # False once the device says it has no modem lines
        self.modem_reading = False      # a modem read is under way (URL devices answer later)
        self.poll_timer = None
        self.break_timer = None
        self.session = 0                # counts restore()s: a change answered after one is stale
        self.changing = {}              # setting -> changes handed to the device, not yet answered

    def attach(self, conn):
        super().attach(conn)
        conn.com_port = ComPortServer()

    def detach(self, conn):
        """The last connection takes the clients' changes along."""
        self._update_timers()
        if not self.port.clients and not self.port.stopping:
            self.restore()

    def stop(self):
        for timer in (self.poll_timer, self.break_timer):
            if timer is not None:
                timer.cancel()
        self.poll_timer = self.break_timer = None

    def _servers(self):
        return [c for c in self.port.clients if c.com_port.active]

    def agreed(self, conn):
        self._debug(conn, "speaks RFC 2217")
        # pyserial reads CTS/DSR from notifications: give it the state at once
        self.read_modem(lambda state: self._send_sb(conn, conn.com_port.modem_notification(state, None)))
        self._update_timers()

    def telnet_break(self, conn):
        if "break" not in self.allowed:
            self._info(conn, "IAC BRK refused (remote_control does not allow break)")
        else:
            self.send_break(conn)

    def subnegotiation(self, conn, body):
        """One request: apply it if allowed and valid, answer with what is in force."""
        code, what, wanted, problem = decode_com_port_request(body)
        if problem:
            self._debug(conn, "%s%s", problem, "; answering with the value in force" if what else "; ignored")
        if what is None:
            return
        cp = conn.com_port
        if what == "signature":
            if wanted is None:
                self._send_sb(conn, com_port_reply("signature", ("%s %s" % (PROGRAM, __version__)).encode()))
            else:
                self._info(conn, "signature %r", wanted.decode("utf-8", "replace")[:100])
        elif what in ("suspend", "resume"):
            # RFC 2217: no answer; hold everything sent to this client until RESUME
            conn.suspend(what == "suspend")
            self._debug(conn, "FLOWCONTROL-%s", what.upper())
        elif what == "modemstate":
            self.read_modem(lambda state: self._send_sb(conn, cp.modem_notification(state, None)))
        elif what == "linestate":
            self._send_sb(conn, cp.line_notification(self.read_line_state(), None))
        elif what in ("modemmask", "linemask"):
            if wanted is not None:
                setattr(cp, "modem_mask" if what == "modemmask" else "line_mask", wanted)
                self._update_timers()
            self._send_sb(conn, com_port_reply(what, cp.modem_mask if what == "modemmask" else cp.line_mask))
        elif what == "purge":
            done = 0
            if wanted is not None:
                if "purge" in self.allowed:
                    self.port.device.purge(bool(wanted & 1), bool(wanted & 2))
                    done = wanted
                    self._debug(conn, "purged %s", {1: "receive buffer", 2: "transmit buffer", 3: "both buffers"}[wanted])
                else:
                    self._info(conn, "PURGE-DATA refused (remote_control does not allow purge)")
            self._send_sb(conn, com_port_reply("purge", done))
        else:
            self._serve_setting(conn, what, wanted)

    def _serve_setting(self, conn, what, wanted):
        permission = "settings" if what in self.SETTINGS or what == "flow_in" else what
        before = self.value_of(what)

        def answer():
            after = self.value_of(what)
            reply = com_port_reply(what, after)
            self._send_sb(conn, reply)
            if after != before:
                for other in self._servers():
                    if other is not conn:
                        self._send_sb(other, reply)
        if wanted is None or wanted == before:
            answer()
        elif permission not in self.allowed:
            self._info(conn, "%s %s refused (remote_control does not allow %s); keeping %s",
                       what, wanted, permission, before)
            answer()
        elif what in ("dtr", "rts"):
            # the modem notification goes before the answer
            self.change(conn, what, wanted, lambda: self.poll_modem(answer))
        else:
            self.change(conn, what, wanted, answer)

    def value_of(self, what):
        if what in self.SETTINGS:
            return self.in_force[what]
        if what == "flow_in":
            return self.in_force["flow"]
        return self.port.device.line_states(self.lines)[what]

    def change(self, conn, what, wanted, then):
        """Apply one change the client may make; then() once it is done."""
        name = "flow" if what == "flow_in" else what
        device = self.port.device
        if name in self.SETTINGS:
            old = self.in_force[name]
            session = self.session

            def done(_, error):
                self.changing[name] -= 1
                if session != self.session:
                    then()              # the last client left meanwhile: restore() undid it
                    return
                if error is not None:
                    self._info(conn, "cannot set %s %s: %s; keeping %s", name, wanted, describe_setting_error(error), old)
                else:
                    self.in_force[name] = wanted
                    self._info(conn, "set %s %s", name, wanted)
                then()
            self.changing[name] = self.changing.get(name, 0) + 1
            if device.is_open:
                device.call(lambda: self._try_setting(name, wanted, old), done)
            else:
                done(None, None)        # applied when the device opens
            return
        if self.lines_before is None:
            self.lines_before = device.line_states(self.lines)
        self.lines[name] = wanted

        def lines_done(problem, error):
            problem = problem or (describe_error(error) if error else "")
            self._info(conn, "set %s %s%s", name.upper(), "on" if wanted else "off",
                       (" (%s)" % problem) if problem else "")
            then()
        if name == "break":
            device.call(lambda: device.set_break(wanted), lines_done)
        else:
            device.call(lambda: device.set_lines(wanted if name == "dtr" else None,
                                                 wanted if name == "rts" else None), lines_done)

    def _try_setting(self, name, wanted, old):
        """On the device (off the loop for a URL device): set, read back,
        and put the old value back if the device did not keep it."""
        device = self.port.device
        try:
            device.apply_setting(name, wanted)
            kept = self.read_back(name, wanted)
            if kept != wanted:  # a driver may take the call and keep part of it
                raise OSError(errno.EINVAL, "the device kept %s" % kept)
        except Exception:
            try:
                device.apply_setting(name, old)
            except Exception:
                pass
            raise

    def read_back(self, name, wanted):
        """What the device holds for `name` after setting it to `wanted`."""
        try:
            settings = self.port.device.settings()
        except Exception:  # termios.error is no OSError
            settings = None
        if not settings:
            return wanted
        kept = settings[name]
        if name == "stopbits" and wanted == "1.5" and kept == "2":
            return wanted   # termios has one bit (CSTOPB) for both
        if name == "flow" and wanted == "dsrdtr" and kept == "none":
            return wanted   # pyserial keeps DSR/DTR flow itself; termios has no flag for it
        return kept

    def send_break(self, conn):
        """IAC BRK: a break of BREAK_DURATION, timed on the loop."""
        device = self.port.device

        def started(problem, error):
            problem = problem or (describe_error(error) if error else "")
            self._info(conn, "IAC BRK: break for %gs%s", BREAK_DURATION, (" (%s)" % problem) if problem else "")
        device.call(lambda: device.set_break(True), started)
        if self.break_timer is not None:
            self.break_timer.cancel()

        def end():
            self.break_timer = None
            if device.is_open:
                device.call(lambda: device.set_break(self.lines["break"]))
        self.break_timer = self.port.reactor.call_later(BREAK_DURATION, end)

    def restore(self):
        """The last client left: the configured settings and lines return
        (through call(): nothing here waits for the device)."""
        device = self.port.device
        self.session += 1
        for name, value in self.configured.items():
            # a change still on its way to the device is undone after it
            # (call()s run in order), though in_force does not show it yet
            if self.in_force[name] != value or self.changing.get(name):
                self.in_force[name] = value
                if device.is_open:
                    device.call(lambda name=name, value=value: device.apply_setting(name, value),
                                lambda _, error, name=name, value=value: self._restored(name, value, error))
                else:
                    self._restored(name, value, None)
        if self.lines_before is not None:
            before, self.lines_before = self.lines_before, None
            if device.is_open:
                device.call(lambda: device.set_lines(before["dtr"], before["rts"]))
                if before["break"] != self.lines["break"]:
                    device.call(lambda: device.set_break(before["break"]))
            self.lines = dict(before)
            self._log(INFO, "last client left: DTR %s, RTS %s, break %s as before",
                      *("on" if before[k] else "off" for k in ("dtr", "rts", "break")))

    def _restored(self, name, value, error):
        if error is not None:
            self._log(WARNING, "cannot restore %s %s: %s", name, value, describe_error(error))
        else:
            self._log(INFO, "last client left: %s back to %s", name, value)

    def device_opened(self):
        """The device (re)opened with the configured settings: re-apply
        what clients changed, and look at its modem lines afresh."""
        self.modem_supported = True
        self.modem_reading = False      # a read the old device never answered
        self.modem_state = self.line_state = None
        device = self.port.device
        for name, value in self.in_force.items():
            if value != self.configured[name]:
                device.call(lambda name=name, value=value: device.apply_setting(name, value),
                            lambda _, error, name=name, value=value: self._reapplied(name, value, error))
        self._update_timers()

    def _reapplied(self, name, value, error):
        if error is not None:
            self._log(WARNING, "cannot re-apply %s %s: %s", name, value, describe_error(error))
            self.in_force[name] = self.configured[name]

    # modem and line state

    def read_modem(self, then):
        """then(modem lines as NOTIFY-MODEMSTATE's high nibble), once the
        device has said (a URL device's far end answers off the loop)."""
        device = self.port.device

        def done(status, error):
            if not status:
                self.modem_supported = False   # a pty or socket: no lines to watch
                then(0)
                return
            then((MODEM_CTS if status.get("CTS") else 0) | (MODEM_DSR if status.get("DSR") else 0)
                 | (MODEM_RI if status.get("RI") else 0) | (MODEM_CD if status.get("CD") else 0))
        if device.is_open:
            device.call(device.modem_status, done)
        else:
            done({}, None)

    def read_line_state(self):
        device = self.port.device
        if not device.is_open or device.tx_bytes:
            return 0
        return LINE_THRE | (0 if device.output_pending() else LINE_TSRE)

    def poll_modem(self, then=None):
        """Look at the lines now; notify each client whose mask selects a
        change; then then()."""
        clients = self._servers()
        if any(c.com_port.line_mask for c in clients):
            state = self.read_line_state()
            previous, self.line_state = self.line_state, state
            if previous is not None and state != previous:
                for conn in clients:
                    body = conn.com_port.line_notification(state, previous)
                    if body is not None:
                        self._send_sb(conn, body)
        if not (any(c.com_port.modem_mask for c in clients) and self.modem_supported) or self.modem_reading:
            if then is not None:
                then()
            return
        self.modem_reading = True

        def heard(state):
            self.modem_reading = False
            previous, self.modem_state = self.modem_state, state
            if previous is not None and state != previous:
                for conn in self._servers():
                    body = conn.com_port.modem_notification(state, previous)
                    if body is not None:
                        self._send_sb(conn, body)
            if then is not None:
                then()
        self.read_modem(heard)

    def _poll_fired(self):
        self.poll_timer = None
        self.poll_modem()
        self._update_timers()

    def _update_timers(self):
        """Run the modem poll only while a connection wants it."""
        clients = self._servers()
        wanted = self.port.device.is_open and any(
            (c.com_port.modem_mask and self.modem_supported) or c.com_port.line_mask for c in clients)
        if wanted and self.poll_timer is None:
            if self.modem_state is None and self.modem_supported:
                self.poll_modem()       # the first look: the state changes are measured from
            self.poll_timer = self.port.reactor.call_later(MODEM_POLL, self._poll_fired)
        elif not wanted and self.poll_timer is not None:
            self.poll_timer.cancel()
            self.poll_timer = None
            self.modem_state = self.line_state = None


class ComPortClientRole(ComPortRole):
    """A virtual port (or rfc2217_role = client): the settings of the local
    side -- the pty's termios, which the local program sets, or the
    configuration -- are pushed to the server, and again on every change."""

    role = "client"
    OPTIONS = dict(local=(OPT_BINARY, OPT_SGA, OPT_COM_PORT), remote=(OPT_BINARY, OPT_SGA, OPT_ECHO, OPT_COM_PORT),
                   ask_local=(OPT_BINARY, OPT_SGA, OPT_COM_PORT), ask_remote=(OPT_BINARY, OPT_SGA))

    def __init__(self, port):
        super().__init__(port)
        self.local_settings = None      # the local side's settings last pushed
        self.watch_timer = None

    def attach(self, conn):
        super().attach(conn)
        conn.com_port = ComPortClient()
        conn.com_port.timer = self.port.reactor.call_later(RFC2217_AGREE_TIMEOUT, lambda: self._agree_timeout(conn))

    def detach(self, conn):
        if conn.com_port.timer is not None:
            conn.com_port.timer.cancel()
        self._update_timers()

    def stop(self):
        if self.watch_timer is not None:
            self.watch_timer.cancel()
            self.watch_timer = None

    def local_settings_now(self):
        device = self.port.device
        if isinstance(device, VirtualDevice) and device.master is not None:
            try:
                return device.settings()
            except Exception:  # termios.error is no OSError
                pass
        return dict(self.configured)

    def agreed(self, conn):
        cp = conn.com_port
        if cp.timer is not None:
            cp.timer.cancel()
            cp.timer = None
        settings = self.local_settings_now()
        self.local_settings = settings
        self._log(INFO, "%s speaks RFC 2217; asking for %s", self._who(conn), describe_settings(settings))
        self._send_sb(conn, com_port_request("signature", None))
        for body in cp.update(settings):
            self._send_sb(conn, body)
        self._update_timers()

    def refused(self, conn, side, option):
        if option == OPT_COM_PORT and side == "us":
            self._not_rfc2217(conn, "refuses COM-PORT-OPTION (DONT 44)")

    def telnet_break(self, conn):
        self._debug(conn, "ignoring IAC BRK from the server")

    def _update_timers(self):
        """Follow the local program's settings only while a server listens."""
        wanted = isinstance(self.port.device, VirtualDevice) and any(
            c.com_port.active for c in self.port.clients)
        if wanted and self.watch_timer is None:
            self.watch_timer = self.port.reactor.call_later(VIRTUAL_POLL, self._watch_fired)
        elif not wanted and self.watch_timer is not None:
            self.watch_timer.cancel()
            self.watch_timer = None

    def _watch_fired(self):
        self.watch_timer = None
        settings = self.local_settings_now()
        if settings != self.local_settings:
            changed = {k: v for k, v in settings.items() if self.local_settings is None or self.local_settings.get(k) != v}
            self.local_settings = settings
            self._log(INFO, "local program set %s", describe_settings(changed))
            for conn in self.port.clients:
                if conn.com_port.active:
                    for body in conn.com_port.update(settings):
                        self._send_sb(conn, body)
        self._update_timers()

    def subnegotiation(self, conn, body):
        result = conn.com_port.reply(body)
        if result is None:
            self._debug(conn, "ignoring COM-PORT-OPTION %r", list(body[:8]))
            return
        what, value, asked = result
        if what == "signature":
            self._info(conn, "server signature %r", value.decode("utf-8", "replace")[:100])
        elif what in ("suspend", "resume"):
            conn.suspend(what == "suspend")   # the server asks us to hold our data
            self._debug(conn, "server sent FLOWCONTROL-%s", what.upper())
        elif what in ("modemstate", "linestate"):
            self._debug(conn, "%s 0x%02x", what, value)
        elif what == "flow_in" or asked is None:
            self._debug(conn, "server reports %s %s", what, value)
        elif value != asked:
            self._info(conn, "server keeps %s %s (asked for %s)", what, value, asked)
        else:
            self._debug(conn, "server set %s %s", what, value)

    def _agree_timeout(self, conn):
        cp = conn.com_port
        cp.timer = None
        if conn.closed or cp.active:
            return
        if not conn.telnet.heard_telnet:
            self._log(WARNING, "%s sent no Telnet negotiation within %gs: not an RFC 2217 server; "
                      "carrying on as raw TCP (serial settings are not sent)", self._who(conn), RFC2217_AGREE_TIMEOUT)
            conn.telnet = None
            return
        self._not_rfc2217(conn, "did not accept COM-PORT-OPTION within %gs" % RFC2217_AGREE_TIMEOUT)

    def _not_rfc2217(self, conn, why):
        cp = conn.com_port
        if cp.timer is not None:
            cp.timer.cancel()
            cp.timer = None
        self._log(WARNING, "%s %s: it is a plain Telnet server, not RFC 2217; data goes on, "
                  "serial settings are not sent", self._who(conn), why)


def make_com_port_role(port):
    """The RFC 2217 role of an rfc2217 port: the side that owns the real
    device is the server; a virtual port makes sertcp the client."""
    role = port.config.rfc2217_role
    if role == "auto":
        role = "client" if port.config.virtual is not None else "server"
    return (ComPortServerRole if role == "server" else ComPortClientRole)(port)


def describe_setting_error(exc):
    """termios.error is (errno, text) but not an OSError."""
    if len(getattr(exc, "args", ())) == 2 and isinstance(exc.args[1], str):
        return exc.args[1]
    return describe_error(exc)


def describe_settings(settings):
    """'115200 8N1, flow none' for the log (missing items left out)."""
    s = settings
    if all(k in s for k in ("baudrate", "bytesize", "parity", "stopbits")):
        text = "%s %s%s%s" % (s["baudrate"], s["bytesize"], s["parity"][0].upper(), s["stopbits"])
        return text + (", flow %s" % s["flow"] if "flow" in s else "")
    return ", ".join("%s %s" % (k, v) for k, v in s.items())


# ---------------------------------------------------------------------
# Modbus gateway role: Modbus TCP clients, an RTU device
# ---------------------------------------------------------------------

class CoreTimer:
    """What a role around a timed core shares: one timer at the core's
    deadline(); what its expire(now) returns goes to the role's _perform."""
    timer = None

    def _arm(self):
        due = self.core.deadline()
        if self.timer is not None:
            if self.timer.when == due:
                return
            self.timer.cancel()
            self.timer = None
        if due is not None:
            self.timer = self.port.reactor.call_at(due, self._fired)

    def _fired(self):
        self.timer = None
        self._perform(self.core.expire(self.port.reactor.now()))


class ModbusRole(CoreTimer):
    """A port with protocol = modbus: the shell around ModbusGateway.
    Bytes from every client and from the device go to the core; the role
    writes the RTU frames it returns, sends each answer to the client that
    asked, closes a client whose MBAP is malformed or that floods
    requests (like a slow client), and keeps one timer at the core's
    deadline (frame gap, reply timeout, broadcast turnaround)."""

    def __init__(self, port):
        self.port = port
        self.core = ModbusGateway.from_config(port.config)
        self.timer = None

    def received(self, conn, data):
        """MBAP bytes from a client; while the device is not open each
        request is answered with exception 0x0A at once."""
        available = self.port.device_state in ("open", "opening")
        self._perform(self.core.from_client(conn, data, self.port.reactor.now(), available))

    def device_data(self, data):
        """RTU bytes from the device."""
        if self.port.trace:
            self.port.trace.record("<", "(modbus)", data)
        self._perform(self.core.from_device(data, self.port.reactor.now()))

    def detach(self, conn):
        """A client left: its waiting requests are dropped."""
        unfinished = self.core.client_gone(conn)
        if unfinished:
            self.port.log.info("[%s] client %s left %d bytes of a truncated Modbus TCP frame",
                               self.port.name, format_peer(conn.peer), unfinished)
            self.port.count_dropped(unfinished, "truncated Modbus TCP frame")

    def device_gone(self):
        """The device is not open any more: what waits is answered 0x0A."""
        self._perform(self.core.bus.device_gone())

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def status(self):
        bus = self.core.bus
        p50, p99 = bus.percentile(0.5), bus.percentile(0.99)
        status = dict(bus.counters)
        status.update(bus_state=bus.state, queue_depth=bus.depth(),
                      round_trip_p50_ms=None if p50 is None else round(p50 * 1000, 3),
                      round_trip_p99_ms=None if p99 is None else round(p99 * 1000, 3))
        return status

    def _perform(self, actions):
        port = self.port
        for action in actions:
            kind = action[0]
            if kind == "write":
                if port.device_state in ("open", "opening"):
                    port.device.write(action[1])
                else:
                    port.count_dropped(len(action[1]), "device %s is not open" % port.device.label())
                    self.device_gone()
            elif kind == "reply":
                action[1].send(action[2])           # a full client_buffer ends it like any slow client
            elif kind == "stray":
                port.count_dropped(action[1], action[2])
            elif kind == "flood":
                port.end_connection(action[1], "flooding: more than %d Modbus requests waiting"
                                    % MODBUS_CLIENT_QUEUE)
            elif kind == "close":
                port.peer_log(action[1].peer[0], WARNING, "[%s] client %s: %s", port.name,
                              format_peer(action[1].peer), action[2])
                port.end_connection(action[1], action[2])
        self._arm()


# ---------------------------------------------------------------------
# Modem emulation role: AT commands on the device, calls on the network
# ---------------------------------------------------------------------

class Caller(Handler):
    """An incoming call while it rings: the accepted socket, not yet read
    (what the caller sends waits in the kernel until ATA), watched only
    for the caller hanging up."""

    def __init__(self, modem, sock, peer, first_data):
        self.modem, self.sock, self.peer, self.first_data = modem, sock, peer, first_data
        self.reactor = modem.port.reactor
        self.reactor.set_interest(self, False, False, hangup=True)

    def fileno(self):
        return self.sock.fileno()

    def on_readable(self):
        self.finish("caller hung up")

    def take(self):
        """The socket, for the port to admit: no longer watched here."""
        self.reactor.forget(self)
        self.finished = True
        return self.sock, self.peer, self.first_data

    def ended(self, reason):
        self.reactor.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        self.modem.caller_ended(self, reason)


class ModemRole(CoreTimer):
    """A port with modem = yes: the shell around ModemCore.  Device bytes
    go to the core, which hands online data back for the connection; the
    role dials (names resolved off the loop, one Dial at a time, each
    address in turn), holds an incoming connection while it rings, admits
    the call through the port's Admission, hangs up, and keeps one timer
    at the core's deadline.  One call at a time: a connection that comes
    while the modem is not idle is refused (busy).  The modem lines: the
    device's DTR, seen as our DSR, drives AT&D; our DTR follows carrier
    (Port.wanted_lines)."""

    def __init__(self, port):
        self.port = port
        self.core = ModemCore.from_config(port.config)
        self.timer = None
        self.call = None                # the Connection of the call that is up
        self.caller = None              # a Caller while it rings
        self.targets = []               # dialing: (host, port) still to try
        self.addresses = []             # and the addresses of the one being tried
        self.refused_only = True        # every address so far refused the connection: BUSY
        self.dial = None
        self.generation = 0             # answers for an older dial are dropped
        self.waiting = bytearray()      # the remote's data while in online command mode
        self.resolving = 0              # name lookups under way (threads), current or given up

    # -- what the port hands over --

    def device_data(self, data):
        if self.port.trace and self.core.mode != "online":
            self.port.trace.record("<", "(modem)", data)     # AT commands (online data is traced as delivered)
        self._perform(self.core.feed(data, self.port.reactor.now()))

    def received(self, conn, data):
        """The remote's data: to the device while online; held (and the
        connection not read) in online command mode, until ATO."""
        if self.core.mode == "online" and not self.waiting:
            self.port.to_device(data)
            return
        room = self.port.config.client_buffer - len(self.waiting)
        if len(data) > room:
            self.port.count_dropped(len(data) - max(0, room), "modem in command mode: client_buffer full")
        self.waiting += data[:max(0, room)]
        conn.pause_reading(True)

    def on_accept(self, sock, peer, first_data=b""):
        """A connection on listen: it rings, or is refused while the modem
        is busy (dialing, ringing, a call up)."""
        port = self.port
        missing = port.device_state not in ("open", "opening")    # nobody to ring
        if self.core.mode != "command" or port.stopping or missing:
            port.counters["connections_total"] += 1
            port.counters["connections_rejected"] += 1
            port.peer_log(peer[0], INFO, "[%s] client %s refused: %s", port.name, format_peer(peer),
                          "device %s is not open" % port.device.label() if missing
                          else "modem busy (%s)" % self.core.mode)
            sock.close()
            return
        port.log.info("[%s] incoming call from %s: ringing", port.name, format_peer(peer))
        self.caller = Caller(self, sock, peer, first_data)
        self._event("incoming")

    def caller_ended(self, caller, reason):
        if caller is self.caller:
            self.caller = None
            self.port.log.info("[%s] incoming call from %s ended before it was answered: %s",
                               self.port.name, format_peer(caller.peer), reason)
            self._event("caller_gone")

    def detach(self, conn):
        """A connection ended (either side): no carrier, if it was the call."""
        if conn is not self.call:
            return
        self.call = None
        if self.waiting:
            self.port.count_dropped(len(self.waiting), "call ended in command mode with data not yet read")
            self.waiting = bytearray()
        self._event("carrier_lost")

    def lines_seen(self, before, modem):
        """The device dropped DTR (our DSR went off): AT&D decides."""
        if line_is_on(before, "dsr") and not line_is_on(modem, "dsr"):
            self.port.log.info("[%s] DSR went off (the device dropped DTR; AT&D%d)", self.port.name,
                               self.core.dtr_mode)
            self._event("dtr_off")

    def device_lost(self):
        """The device is gone (unplugged, hung up): as its DTR dropping
        (AT&D decides), and a call that rings is refused -- nobody is
        there to answer it, and it would ring on for as long as the caller
        waits (or be answered by S0 into a missing device)."""
        self._event("hang_up" if self.core.mode == "ringing" else "dtr_off")

    def virtual_peer(self, is_open):
        """A virtual port's program closed it: its DTR dropped, as a tty's does."""
        if not is_open:
            self._event("dtr_off")

    def stop(self):
        self.generation += 1
        for timer in (self.timer,):
            if timer is not None:
                timer.cancel()
        self.timer = None
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        if self.caller is not None:
            caller, self.caller = self.caller, None
            caller.finish("port stopped")

    def status(self):
        registers = self.core.registers
        return {"state": self.core.mode, "rings": registers[1],
                "registers": {"S%d" % n: registers[n] for n in (0, 2, 7, 12)}, "dtr_mode": self.core.dtr_mode,
                "peer": format_peer(self.call.peer) if self.call else
                format_peer(self.caller.peer) if self.caller else None}

    # -- performing the core's actions --

    def _event(self, name):
        self._perform(self.core.event(name, self.port.reactor.now()))

    def _perform(self, actions):
        port = self.port
        for action in actions:
            kind = action[0]
            if kind == "send":
                if action[1] and port.device.tx_bytes >= DEVICE_HIGH_WATER:
                    # a device that types without reading its echo: a real
                    # modem's UART would lose it too; memory must not grow
                    port.count_dropped(len(action[1]), "modem: the device does not read its echo and results")
                elif action[1] and port.device_state in ("open", "opening"):
                    if port.trace:
                        port.trace.record(">", "(modem)", action[1])
                    port.device.write(action[1])
            elif kind == "data":
                if port.packer.enabled:
                    port.pack(action[1])
                else:
                    port.deliver(action[1])
            else:
                getattr(self, "_do_" + kind)(*action[1:])
        self._arm()

    def _do_ring(self):
        self.port.counters["modem_rings"] += 1

    def _do_dropped(self, n):
        self.port.count_dropped(n, "escape characters held when the call ended")

    def _do_take_call(self):
        caller, self.caller = self.caller, None
        port = self.port
        if caller is None or caller.finished:
            self._event("carrier_lost")
            return
        sock, peer, first_data = caller.take()
        port.counters["modem_calls_in"] += 1
        port.log.info("[%s] answered the call from %s", port.name, format_peer(peer))
        self._admit(lambda: port.admission.on_accept(sock, peer, first_data))

    def _admit(self, admit):
        """Make the call one of the port's connections (banner, buffer,
        lines, timeout as for any); no carrier if it is gone at once."""
        port = self.port
        before = set(port.clients)
        admit()
        added = [conn for conn in port.clients if conn not in before]
        if added:
            self.call = added[0]
        else:
            self._event("carrier_lost")

    def _do_refuse_call(self):
        if self.caller is not None:
            caller, self.caller = self.caller, None
            caller.finish("refused (ATH while ringing)")

    def _do_hang_up(self):
        if self.call is not None:
            call, self.call = self.call, None
            self.port.end_connection(call, "hung up by the device (modem)")

    def _do_hold(self):
        if self.call is not None:
            self.call.pause_reading(True)

    def _do_resume(self):
        if self.waiting:
            data, self.waiting = bytes(self.waiting), bytearray()
            self.port.to_device(data)
        if self.call is not None and not self.port.clients_paused:
            self.call.pause_reading(False)

    # dialing: each target in turn, each of its addresses in turn

    def _do_dial(self, targets):
        self.port.counters["modem_calls_out"] += 1
        self.targets = list(targets)
        self.refused_only = True
        self._next_target()

    def _next_target(self):
        if not self.targets:
            self.port.counters["dials_failed"] += 1
            self._event("refused" if self.refused_only else "failed")
            return
        host, port_number = self.targets.pop(0)
        self.port.log.info("[%s] modem dialing %s", self.port.name, show_hostport((host, port_number)))
        if not is_ip_literal(host) and self.resolving >= MODEM_LOOKUPS:
            # dials given up (a key, S7) whose lookups still hang: a device
            # dialing in a loop must not start a thread per dial
            self.port.log.warning("[%s] modem dial: %d name lookups still under way; not resolving %s",
                                  self.port.name, self.resolving, host)
            self.refused_only = False
            self._next_target()
            return
        answer = self._current(self._resolved)

        def resolved(result, error):
            self.resolving -= 1
            answer(result, error)
        self.resolving += 1
        resolve_in_thread(self.port.reactor, host, port_number, resolved)

    def _current(self, callback):
        """callback(result, error) for the step under way; an answer that
        comes after a cancel (S7, a key, DTR) is dropped, a socket closed."""
        self.generation += 1
        generation = self.generation

        def answer(result, error):
            if generation == self.generation:
                callback(result, error)
            elif isinstance(result, LightSocket):
                result.close()
        return answer

    def _resolved(self, addresses, error):
        if error is not None or not addresses:
            self.port.log.warning("[%s] modem dial: cannot resolve: %s", self.port.name,
                                  describe_error(error) if error else "no address")
            self.refused_only = False
            self._next_target()
            return
        self.addresses = list(addresses)
        self._next_address()

    def _next_address(self):
        if not self.addresses:
            self._next_target()
            return
        family, sockaddr = self.addresses.pop(0)
        # the core's S7 ends the wait; Dial's own limit only a little later
        limit = max(1, self.core.registers[7]) + 1.0
        try:
            self.dial = Dial(self.port.reactor, family, sockaddr,
                             self._current(lambda sock, error: self._dialed(sockaddr, sock, error)), timeout=limit)
        except OSError as e:
            self._dial_failed(sockaddr, describe_error(e))

    def _dialed(self, sockaddr, sock, error):
        self.dial = None
        if error:
            self._dial_failed(sockaddr, error)
            return
        self.targets, self.addresses = [], []
        if self.core.mode != "dialing":
            sock.close()
            return
        port = self.port
        self._event("up")                   # CONNECT before the remote's first byte
        port.counters["connections_total"] += 1
        self._admit(lambda: port.admission.admit(sock, sockaddr, dialed=True))

    def _dial_failed(self, sockaddr, error):
        self.port.log.warning("[%s] modem dial to %s failed: %s", self.port.name, format_peer(sockaddr), error)
        if error != os.strerror(errno.ECONNREFUSED):
            self.refused_only = False
        self._next_address()

    def _do_cancel_dial(self):
        self.generation += 1
        self.targets, self.addresses = [], []
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        self.port.counters["dials_failed"] += 1


# ---------------------------------------------------------------------
# The port: device life cycle, delivery and back-pressure
# ---------------------------------------------------------------------

class DropLog:
    """A port's discarded bytes: counted at once in bytes_dropped, and
    said in the log at most once a second -- the bytes of the seconds in
    between in a line when the second ends, the last ones at stop()."""

    def __init__(self, port):
        self.port = port
        self.pending = 0                # dropped bytes not yet in a log line
        self.why = ""
        self.timer = None               # ends the second in which a line was logged

    def count(self, n, why):
        self.port.counters["bytes_dropped"] += n
        self.pending += n
        self.why = why
        if self.timer is None:
            self._second_over()

    def _second_over(self):
        self.timer = None
        if self._say():
            self.timer = self.port.reactor.call_later(1.0, self._second_over)

    def _say(self):
        if not self.pending:
            return False
        self.port.log.warning("[%s] dropped %d bytes: %s", self.port.name, self.pending, self.why)
        self.pending = 0
        return True

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._say()


class Port:
    """One configured port: a device, its clients and the rules between
    them.  The port owns the device's life (one `device_state`, moved by
    DEVICE_STATE_ON), delivers device data to the clients send_to picks
    (packing, `buffer`), and keeps back-pressure to the one rule of
    device_should_pause().  Its helpers: `admission` (who connects, how
    connections end), `dialer` (the client role), `rfc2217` and `modbus`
    (protocol roles), `modem` (the device's AT commands), each None where
    the configuration has no use for it."""

    def __init__(self, config, reactor, log, peer_log=None):
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.log = log
        self.peer_log = peer_log or PeerLog(log)
        self.password = config.secret
        self.device = make_device(self, reactor)
        self.device_state = "closed"
        self.reopen_timer = None
        # pause the device once every recipient has this much waiting
        self.pause_at = min(CLIENT_HIGH_WATER, config.client_buffer // 2 or 1)
        self.device_paused = False      # back-pressure: the device is not read
        self.clients_paused = False     # the device's queue is full: clients are not read
        self.clients = []               # oldest first
        self.active_client = None       # last_active: who sent data last
        self.recipients = None          # who send_to picks now; None: work it out
        self.packer = Packer.from_config(config)
        self.pack_timer = None
        self.stopping = False
        self.counters = dict(bytes_from_device=0, bytes_to_device=0, bytes_dropped=0,
                             connections_total=0, connections_rejected=0, dials_failed=0,
                             device_errors=0)
        self.counters.update(dict.fromkeys(UDP_COUNTERS, 0))
        self.counters.update(dict.fromkeys(MODEM_COUNTERS, 0))
        self.drop_log = DropLog(self)
        self.count_dropped = self.drop_log.count
        self.counters.update(dict.fromkeys(MONITOR_COUNTERS, 0))
        self.monitors = Monitors(self) if config.monitor is not None else None
        self.trace = copies_of_traffic(self)    # the trace file and the monitors: both directions go there
        self.modem_lines = {}           # connect_on_line/disconnect_on_line: as last polled
        self.line_polling = False       # a poll of the modem lines is due or under way
        self.rfc2217 = make_com_port_role(self) if config.protocol == "rfc2217" else None
        self.modbus = ModbusRole(self) if config.protocol == "modbus" else None
        self.modem = ModemRole(self) if config.modem else None
        self.dialer = Dialer(self) if config.connect is not None else None
        self.udp = UdpSide(self) if config.udp_listen is not None or config.udp_send_to is not None else None
        # the client role must keep at least the event bytes that make it dial
        self.held = ByteBuffer(self.held_limit(), config.buffer_drop)
        self.admission = Admission(self)
        # what connections and the listener call
        self.on_accept = self.modem.on_accept if self.modem else self.admission.on_accept
        self.end_connection = self.admission.end
        self.peer_finished = self.admission.peer_finished

    # stopped through the control API (POST /ports/NAME/disable) until
    # enabled again, when the server starts a fresh Port in its place
    disabled = False

    @property
    def dial_state(self):
        return self.dialer.plan.state if self.dialer else "off"

    # -- life cycle --

    def start(self):
        """Open the device and start dialing; the server's Gate listens."""
        if not self.config.open_on_demand:
            self.open_device()
        if self.dialer:
            self.dialer.start()
        if self.udp:
            self.udp.start()

    def stop(self, reason="shutdown"):
        if self.stopping:
            return                      # a disabled port, stopped already
        self.stopping = True
        for timer in (self.reopen_timer, self.pack_timer):
            if timer:
                timer.cancel()
        if self.dialer:
            self.dialer.stop()
        if self.rfc2217:
            self.rfc2217.stop()
        if self.modbus:
            self.modbus.stop()
        if self.modem:
            self.modem.stop()
        if self.udp:
            self.udp.close()
        for conn in list(self.clients):
            self.end_connection(conn, reason)
        self.close_device("shutdown" if reason == "shutdown" else "port stopped: %s" % reason)
        self.drop_log.stop()
        if self.trace:
            self.trace.close()

    def pending_to_device(self):
        return self.device.tx_bytes if self.device.is_open else 0

    # -- the device's life: closed -> opening -> open -> missing -> opening ... --

    def _device_event(self, event):
        self.device_state = device_state_after(self.device_state, event)
        if self.modbus is not None and self.device_state in ("closed", "missing"):
            self.modbus.device_gone()

    def open_device(self):
        self.reopen_timer = None
        if self.stopping or self.device_state in ("open", "opening"):
            return
        self._device_event("open")
        try:
            self.device.open()
        except Exception as e:  # OSError; or a bad URL, settings the device refuses
            self._device_open_failed(e)
            return
        if self.device.is_open and self.device_state == "opening":
            self._device_opened()
        # else a URL or socket device: device_open_done() follows

    def device_open_done(self, error):
        """A device that opens in the background has finished trying."""
        if self.device_state != "opening":
            return                      # closed meanwhile
        if error is not None:
            self._device_open_failed(error)
        else:
            self._device_opened()

    def _device_open_failed(self, e):
        self.counters["device_errors"] += 1
        if not isinstance(e, OSError):
            self.log.error("[%s] device %s cannot be opened: %s; retrying every %gs",
                           self.name, self.device.label(), describe_error(e), self.config.reopen_interval)
        elif self.device_was_missing is False:
            self.log.warning("[%s] device %s cannot be opened: %s; retrying every %gs",
                             self.name, self.device.label(), describe_error(e), self.config.reopen_interval)
        self.device_was_missing = True
        self._device_event("failed")
        self._device_gone("device could not be opened")

    device_was_missing = False          # said once, not at every retry

    def _device_opened(self):
        self._device_event("opened")
        self.device_was_missing = False
        extra = " (pty %s)" % self.device.slave_name if isinstance(self.device, VirtualDevice) else ""
        self.log.info("[%s] device %s opened%s", self.name, self.device.label(), extra)
        rs485 = getattr(self.device, "rs485", None)
        if isinstance(rs485, str):
            # the port still serves data; /status shows "rs485": "refused: ..."
            self.log.warning("[%s] RS-485 mode %s by %s; serving the port without it", self.name,
                             rs485, self.device.label())
        elif rs485:
            self.log.info("[%s] RS-485 mode on: %s", self.name,
                          ", ".join("%s=%s" % (k, v) for k, v in sorted(rs485.items())))
        if self.rfc2217:
            self.rfc2217.device_opened()
        self.apply_lines()
        self.device.pause_reading(self.device_paused)
        self.watch_lines()

    def close_device(self, why):
        if self.reopen_timer is not None:
            self.reopen_timer.cancel()      # closed on purpose: no retry
            self.reopen_timer = None
        if self.device.is_open:
            self.log.info("[%s] device %s closed (%s)", self.name, self.device.label(), why)
        self.device.close()             # an open under way is dropped when it ends
        self._device_event("close")
        dropped = self.device.discard_tx()  # not for the next client (open_on_demand)
        if dropped:
            self.count_dropped(dropped, "device closed with data still queued for it")
        self.on_device_drained()

    def on_device_lost(self, reason):
        if self.device_state == "opening":  # lost while opening: a failed open
            self._device_open_failed(OSError(errno.EIO, reason))
            return
        if self.device_state != "open":
            return                      # closed already (a bug met while closing it)
        self.counters["device_errors"] += 1
        self._device_event("lost")
        self.device_was_missing = True
        self.log.warning("[%s] device %s lost: %s; reopening every %gs", self.name,
                         self.device.label(), reason, self.config.reopen_interval)
        self._device_gone("device lost with data still queued for it")
        if self.modem:
            self.modem.device_lost()

    def _device_gone(self, why):
        """Missing: what waited for it is counted, clients are read again
        (their data is counted as dropped), and a reopen is due."""
        dropped = self.device.discard_tx()
        if dropped:
            self.count_dropped(dropped, why)
        self.on_device_drained()
        if not self.stopping and self.reopen_timer is None:
            self.reopen_timer = self.reactor.call_later(self.config.reopen_interval, self.open_device)

    def on_virtual_peer(self, is_open):
        self.log.info("[%s] virtual port %s %s by a local program", self.name, self.config.virtual,
                      "opened" if is_open else "closed")
        if self.modem:
            self.modem.virtual_peer(is_open)
        if not self.config.listen_on_open:
            return
        if is_open:
            if self.dialer:
                self.dialer.poke()
        else:
            for conn in list(self.clients):
                self.end_connection(conn, "virtual port closed by the local program (listen_on_open)")

    # -- modem lines that drive connections: connect_on_line, disconnect_on_line --

    def watch_lines(self):
        """Poll the modem lines every MODEM_POLL while the device is open
        and a key needs them (a UART does not announce a change)."""
        c = self.config
        if (c.connect_on_line != "none" or c.disconnect_on_line != "none" or self.modem and not c.virtual) \
                and not self.line_polling:
            self.line_polling = True
            self._poll_lines()

    def _poll_lines(self):
        device = self.device
        if self.stopping or not device.is_open:
            self.line_polling = False
            self._lines_seen({})        # no device, no lines: off
            return
        device.call(device.modem_status, self._lines_polled)

    def _lines_polled(self, modem, error):
        self._lines_seen(modem if error is None and modem else {})
        self.reactor.call_later(MODEM_POLL, self._poll_lines)

    def line_allows(self):
        """connect_on_line: dial and accept only while its line is on."""
        key = self.config.connect_on_line
        return key == "none" or line_is_on(self.modem_lines, key)

    def _lines_seen(self, modem):
        c = self.config
        before, self.modem_lines = self.modem_lines, modem
        key = c.connect_on_line
        if key != "none" and line_is_on(before, key) != line_is_on(modem, key):
            self.log.info("[%s] %s %s (connect_on_line): %s", self.name, MODEM_LINE_NAMES[key],
                          "on" if line_is_on(modem, key) else "off",
                          "connections allowed" if line_is_on(modem, key) else "no new connections")
            if line_is_on(modem, key) and self.dialer:
                self.dialer.poke()
        key = c.disconnect_on_line
        if key != "none" and line_is_on(before, key) and not line_is_on(modem, key):
            why = "%s went off (disconnect_on_line)" % MODEM_LINE_NAMES[key]
            if self.clients:
                self.log.info("[%s] %s: closing %d connection%s", self.name, why, len(self.clients),
                              "" if len(self.clients) == 1 else "s")
            for conn in list(self.clients):
                self.end_connection(conn, why)
        if self.modem:
            self.modem.lines_seen(before, modem)

    # -- what a connection's coming and going does to the device --

    def notify_device(self, data):
        """device_connect_msg and its kin: written to the device like
        client data, if it is open (a notice to a missing device is lost)."""
        if data is None or self.device_state not in ("open", "opening"):
            return
        if self.trace:
            self.trace.record(">", "(notice)", data)
        self.device.write(data)

    def break_on_connect(self):
        """A break of break_on_connect seconds (boards that reset on break)."""
        self.send_break(self.config.break_on_connect, "break_on_connect")

    def send_break(self, seconds, why, done=None):
        """A break of `seconds` on the device, if it is open; done(problem)
        once it has started ("") or been refused (why, for the log)."""
        device = self.device
        if not device.is_open:
            if done is not None:
                done("device not open")
            return

        def started(problem, error):
            problem = problem or (describe_error(error) if error else "")
            if problem:
                self.log.warning("[%s] %s: %s refused the break: %s", self.name, why, device.label(), problem)
            else:
                self.log.info("[%s] break for %gs (%s)", self.name, seconds, why)
                self.reactor.call_later(seconds, end)
            if done is not None:
                done(problem)

        def end():
            if device.is_open:
                device.call(lambda: device.set_break(False))
        device.call(lambda: device.set_break(True), started)

    def wanted_lines(self):
        """(DTR, RTS) as the configuration wants them now; None = keep."""
        c = self.config
        if self.clients:
            dtr, rts = c.dtr_active, c.rts_active
        else:
            dtr, rts = c.dtr_idle, c.rts_idle
            if self.modem:
                dtr = "off"             # modem: DTR (the device's DCD) follows carrier, like AT&C1
        state = {"on": True, "off": False, "keep": None}
        return state[dtr], state[rts]

    def apply_lines(self):
        device = self.device
        if not device.is_open:
            return
        dtr, rts = self.wanted_lines()
        if dtr is None and rts is None:
            return

        def set_and_read():
            problem = device.set_lines(dtr, rts)
            return problem, ({} if problem else device.modem_status())
        device.call(set_and_read, lambda result, error: self._lines_applied(dtr, rts, result, error))

    def _lines_applied(self, dtr, rts, result, error):
        names = {True: "on", False: "off", None: "kept"}
        problem, modem = result if error is None else (describe_error(error), {})
        if problem:
            # a pty refuses modem lines every time (debug); a URL device's
            # far end that does not acknowledge them is worth a warning
            self.log.log(WARNING if isinstance(self.device, UrlDevice) else DEBUG,
                         "[%s] DTR %s, RTS %s: %s", self.name, names[dtr], names[rts], problem)
            return
        read_back = ", ".join("%s=%s" % (k, "on" if v else "off") for k, v in modem.items())
        self.log.info("[%s] lines DTR=%s RTS=%s%s", self.name, names[dtr], names[rts],
                      ("; device reports %s" % read_back) if read_back else "")

    # -- device to network: packing, send_to, buffer, back-pressure --

    def on_device_data(self, data):
        self.counters["bytes_from_device"] += len(data)
        if self.modbus is not None:
            self.modbus.device_data(data)   # RTU frames, answered to whoever asked
        elif self.modem is not None:
            self.modem.device_data(data)    # AT commands, or online data back through pack/deliver
        elif self.packer.enabled:
            self.pack(data)
        else:
            self.deliver(data)

    def pack(self, data):
        now = self.reactor.now()
        for packet in self.packer.feed(data, now):
            self.deliver(packet)
        self._arm_pack_timer()

    def _arm_pack_timer(self):
        due = self.packer.deadline()
        if self.pack_timer is not None:
            if due is not None and self.pack_timer.when == due:
                return
            self.pack_timer.cancel()
            self.pack_timer = None
        if due is not None:
            self.pack_timer = self.reactor.call_at(due, self._pack_timer_fired)

    def _pack_timer_fired(self):
        self.pack_timer = None
        for packet in self.packer.expire(self.reactor.now()):
            self.deliver(packet)
        self._arm_pack_timer()

    def _recipients(self):
        recipients = self.recipients
        if recipients is None:
            # cached until a client comes or goes or another one sends
            recipients = self.recipients = tuple(choose_clients(self.config.send_to, self.clients,
                                                                self.active_client))
        return recipients

    def deliver(self, data):
        """Device data (a packet, when packing) to the clients send_to picks,
        and as one datagram to each UDP peer."""
        reached = self.udp.send(data) if self.udp is not None else 0
        if self.trace:
            self.trace.record("<", ",".join(format_peer(c.peer) for c in
                                            choose_clients(self.config.send_to, self.clients, self.active_client))
                              or ("(UDP peers)" if reached else "(no client)"), data)
        if not self.clients:
            if self.config.listen is None and self.config.connect is None:
                if not reached:         # UDP only: no TCP client to hold data for
                    self.count_dropped(len(data), "no UDP peer to send to")
                return
            self.held.limit = self.held_limit()
            dropped = self.held.add(data)
            if dropped and (self.held.limit or not reached):    # with buffer = 0, UDP peers had it
                self.count_dropped(dropped, "buffer of %d bytes full (buffer_drop = %s)"
                                   % (self.held.limit, self.config.buffer_drop)
                                   if self.held.limit else "no client connected (buffer = 0)")
            if self.dialer:
                self.dialer.poke()
            return
        recipients = self.recipients or self._recipients()     # (cached: the round trip's path)
        if not recipients:
            self.count_dropped(len(data), "send_to = %s selects no client" % self.config.send_to)
            return
        framed = None                   # rfc2217: IAC doubled once for every BINARY client
        least = None
        for conn in recipients:
            if conn.telnet is None:
                conn.send(data)
            elif conn.telnet.binary_out:
                if framed is None:
                    framed = conn.telnet.escape(data)
                conn.send(framed)
            else:
                conn.send_data(data)
            if least is None or len(conn.out) < least:
                least = len(conn.out)
        if least >= self.pause_at or self.device_paused:    # else the rule says "read on"
            self.backlog_changed()

    def backlog_changed(self):
        """A client came, went, drained, was suspended or got data: apply
        the back-pressure rule.  One stalled client never slows the
        others (it overflows client_buffer instead)."""
        paused = device_should_pause([len(c.out) for c in self._recipients()], self.device_paused, self.pause_at)
        if paused != self.device_paused:
            self.device_paused = paused
            self.device.pause_reading(paused)

    # -- network to device --

    def held_limit(self):
        """How much device data waits while no connection is up: `buffer`;
        a port that dials on event_bytes keeps at least those bytes, and all
        of the burst that made it dial and what arrives during the dial
        (up to client_buffer), so the peer gets the whole message first."""
        c = self.config
        limit = c.buffer
        if c.connect is not None and c.event_bytes:
            limit = max(limit, c.event_bytes)
            if self.dial_state != "waiting":
                limit = max(limit, c.client_buffer)
        return limit

    def network_enabled(self):
        """listen_on_open: the network side works only while a local
        program has the virtual port open."""
        return not self.config.listen_on_open or self.device.peer_open

    def client_payload(self, conn, data):
        if self.trace:
            self.trace.record(">", format_peer(conn.peer), data)
        conn.last_active = time.time()
        if self.active_client is not conn:
            self.active_client = conn
            self.recipients = None
            if self.device_paused:      # send_to = last_active: the new recipient may not be behind
                self.backlog_changed()
        if self.modbus is not None:
            self.modbus.received(conn, data)    # MBAP in; RTU frames go to the device one at a time
            return
        if self.modem is not None:
            self.modem.received(conn, data)     # held while the modem is in command mode
            return
        if self.config.receive_from != "all" and \
                not client_selected(self.config.receive_from, conn, self.clients):
            self.count_dropped(len(data), "receive_from = %s ignores %s" % (self.config.receive_from,
                                                                           format_peer(conn.peer)))
            return
        self.to_device(data)

    def to_device(self, data):
        """Network data for the device, queued; while the device's queue
        is full, clients are not read."""
        if self.device_state not in ("open", "opening"):
            self.count_dropped(len(data), "device %s is not open" % self.device.label())
            return
        self.device.write(data)             # queued while a URL device opens
        if self.device.tx_bytes >= DEVICE_HIGH_WATER and not self.clients_paused:
            self.clients_paused = True
            for c in self.clients:
                c.pause_reading(True)

    def on_device_drained(self):
        if self.clients_paused:
            self.clients_paused = False
            for c in self.clients:
                c.pause_reading(False)


# ---------------------------------------------------------------------
# Admission: who connects, and how each connection ends
# ---------------------------------------------------------------------

class Admission:
    """The shell around the admission() core for one port: refuses or
    takes a connection, greets it (banner, or password and connect_id when
    dialed), hands it what `buffer` held, times it out, and ends it --
    telling the dialer whether we or the peer hung up."""

    def __init__(self, port):
        self.port = port

    def on_accept(self, sock, peer, first_data=b""):
        port, c = self.port, self.port.config
        port.counters["connections_total"] += 1
        if port.stopping:
            sock.close()
            return
        # a half-closed client yields its place (see peer_finished)
        connected = [conn for conn in port.clients if not conn.half_closed]
        decision = admission(len(connected), c.max_clients, c.when_full, port.network_enabled(), port.line_allows())
        if decision.startswith("refuse"):
            port.counters["connections_rejected"] += 1
            if decision.startswith("refuse: not open"):
                why = "virtual port %s is not open (listen_on_open)" % c.virtual
            elif decision.startswith("refuse: line off"):
                why = "%s is off (connect_on_line)" % MODEM_LINE_NAMES[c.connect_on_line]
            else:
                why = "%d of %d clients connected (when_full = reject)" % (len(connected), c.max_clients)
            port.peer_log(peer[0], INFO, "[%s] client %s rejected: %s", port.name, format_peer(peer), why)
            sock.close()
            return
        if decision == "kick_oldest":
            self.end(connected[0], "kicked by newer client %s (when_full = kick_oldest)" % format_peer(peer))
        for conn in [conn for conn in port.clients if conn.half_closed][:max(0, len(port.clients) + 1 - c.max_clients)]:
            self.end(conn, "closed by peer; its place taken by %s" % format_peer(peer), by_peer=True)
        conn = self.admit(sock, peer)
        if first_data and not conn.closed:
            conn.bytes_in += len(first_data)
            if conn.telnet is not None:
                port.rfc2217.received(conn, first_data)  # payload comes back through client_payload
            else:
                port.client_payload(conn, first_data)

    def admit(self, sock, peer, dialed=False):
        """Make sock one of the port's connections: banner (or connect_id
        when dialed), then what was held for it."""
        port, c = self.port, self.port.config
        tune_socket(sock, c)
        now = port.reactor.now()
        conn = (TlsConnection if isinstance(sock, TlsStream) else Connection)(port, port.reactor, sock, peer, now)
        conn.dialed = dialed
        first = not port.clients
        port.clients.append(conn)
        port.recipients = None
        if dialed:
            port.log.info("[%s] connected to %s", port.name, format_peer(peer))
        else:
            port.peer_log(peer[0], INFO, "[%s] client %s connected (%d of %d)", port.name, format_peer(peer),
                          len(port.clients), c.max_clients)
        conn.start()
        if port.rfc2217:
            port.rfc2217.attach(conn)
        if dialed:
            # a sertcp (or any) server with a password wants it first, then the id
            greeting = (port.password + b"\n" if port.password is not None else b"") + (c.connect_id or b"")
            if greeting:
                conn.send(greeting)  # the password and id come before Telnet starts
        elif c.banner:
            conn.send_data(c.banner)
        if port.rfc2217:
            port.rfc2217.start(conn)
        if conn.closed:                 # the peer was gone already: end() has said so
            return conn
        if len(port.held):
            data = port.held.take()
            port.log.info("[%s] delivering %d buffered bytes to %s", port.name, len(data), format_peer(peer))
            conn.send_data(data, bounded=False)
        if c.timeout and not conn.closed:
            conn.idle_timer = port.reactor.call_at(now + c.timeout, lambda: self._idle_check(conn))
        if port.clients_paused:
            conn.pause_reading(True)
        port.backlog_changed()
        if first and not conn.closed:
            if port.device_state == "closed" and c.open_on_demand:
                port.open_device()
            else:
                port.apply_lines()
        if c.break_on_connect:
            port.break_on_connect()
        port.notify_device(c.device_connect_msg)
        if dialed and c.heartbeat_interval:
            conn.heartbeat_timer = port.reactor.call_at(now + c.heartbeat_interval, lambda: self._heartbeat(conn))
        return conn

    def _heartbeat(self, conn):
        """heartbeat_interval: a dialed connection idle that long both ways
        gets heartbeat_data (cellular NATs forget silent connections)."""
        conn.heartbeat_timer = None
        if conn.closed:
            return
        c, reactor = self.port.config, self.port.reactor
        due = conn.last_io + c.heartbeat_interval
        if reactor.now() >= due:
            conn.send_data(c.heartbeat_data)
            due = reactor.now() + c.heartbeat_interval
        conn.heartbeat_timer = reactor.call_at(due, lambda: self._heartbeat(conn))

    def _idle_check(self, conn):
        conn.idle_timer = None
        if conn.closed:
            return
        limit = self.port.config.timeout
        due = conn.last_io + limit
        if self.port.reactor.now() < due:
            conn.idle_timer = self.port.reactor.call_at(due, lambda: self._idle_check(conn))
        else:
            self.end(conn, "idle timeout (%gs without data)" % limit)

    def peer_finished(self, conn):
        """The peer shut down its sending side.  It may still be reading
        (`nc -N`, `printf cmd | socat`): device data goes on to it for
        HALF_CLOSE_GRACE after its FIN (or `timeout`, if shorter), as
        socat's -t does; meanwhile a new client may take its place."""
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
        timeout = self.port.config.timeout
        grace = min(timeout, HALF_CLOSE_GRACE) if timeout else HALF_CLOSE_GRACE
        conn.idle_timer = self.port.reactor.call_later(grace, lambda: self.end(conn, "closed by peer", by_peer=True))

    def end(self, conn, reason, by_peer=False):
        """Close one connection: what it had not been sent is counted; the
        device's lines, open_on_demand, back-pressure and the dialer hear."""
        port = self.port
        if conn.closed:
            return
        out_pending = len(conn.out)
        conn.close()
        if conn in port.clients:
            port.clients.remove(conn)
        if port.active_client is conn:
            port.active_client = None
        port.recipients = None
        if port.rfc2217:
            port.rfc2217.detach(conn)
        if port.modbus:
            port.modbus.detach(conn)
        if port.modem:
            port.modem.detach(conn)
        if out_pending:
            port.count_dropped(out_pending, "a client left with data not yet sent to it")
        duration = port.reactor.now() - conn.since_mono
        port.peer_log(conn.peer[0], INFO, "[%s] %s %s disconnected: %s; %d bytes in, %d bytes out%s, %.1fs",
                      port.name, "peer" if conn.dialed else "client", format_peer(conn.peer), reason, conn.bytes_in,
                      conn.bytes_out, (", %d unsent" % out_pending) if out_pending else "", duration)
        if conn.heartbeat_timer is not None:
            conn.heartbeat_timer.cancel()
            conn.heartbeat_timer = None
        port.notify_device(port.config.device_disconnect_msg)
        if port.stopping:
            return
        port.backlog_changed()
        if not port.clients:
            if port.config.open_on_demand:
                port.close_device("last client left (open_on_demand)")
            else:
                port.apply_lines()
        if port.dialer:
            if conn.dialed:
                port.dialer.connection_ended(conn, by_peer, duration)
            else:
                port.dialer.poke()      # the mixed role may dial now


# ---------------------------------------------------------------------
# The dialer: the client role, redial and back-off
# ---------------------------------------------------------------------

class Dialer:
    """The client role of a port: performs what its DialPlan returns --
    resolving names off the loop, one non-blocking connect (and TLS
    handshake) at a time, peers in order, back-off after a failed round --
    and feeds the plan what happened.  The log names each step."""

    def __init__(self, port):
        c = port.config
        self.port = port
        self.log = port.log
        self.plan = DialPlan(len(c.connect), c.reconnect_min, c.reconnect_max, on_data=bool(c.event_bytes))
        self.addresses = []             # resolved addresses of the peer still to try
        self.dial = None                # the Dial or TlsStart in flight
        self.timer = None
        self.generation = 0             # answers for an older attempt are dropped
        self.last_error = "no address"
        self.connected = None           # (sock, sockaddr) between "up" and "admit"
        self.tls_context = None

    def start(self):
        if self.port.config.event_bytes:
            self.log.info("[%s] gathering: dialing once %d bytes from the device wait",
                          self.port.name, self.port.config.event_bytes)
        self.poke()

    def stop(self):
        self.plan.handle("stop")
        self.generation += 1
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.dial:
            self.dial.cancel()
            self.dial = None

    def poke(self):
        """Dial if the plan rests and the port wants a connection now."""
        if self.plan.state == "gathering" and self.wanted():
            self._event("wanted")

    def wanted(self):
        port, c = self.port, self.port.config
        if port.stopping or not port.network_enabled() or any(conn.dialed for conn in port.clients):
            return False
        if not port.line_allows():
            return False                # connect_on_line: polled lines poke when it comes on
        if c.event_bytes == 0:
            return True
        # mixed role: one connection at a time, incoming or outgoing (ezTCP)
        return not port.clients and len(port.held) >= c.event_bytes

    def connection_ended(self, conn, by_peer, duration):
        """A dialed connection ended: who hung up decides what follows."""
        held = duration >= DIAL_SETTLE or bool(conn.bytes_in)
        event = "peer_hung_up" if by_peer else "we_hung_up"
        if self.plan.on_data:
            self.log.info("[%s] gathering: dialing again once %d bytes from the device wait",
                          self.port.name, self.port.config.event_bytes)
        elif self.plan.refine(event, held) == "peer_hung_up_silent":
            # accepted and closed without a word (a full server, a gateway
            # with nothing behind it): a failed round, so that redialing
            # backs off instead of hammering the peer
            self.log.warning("[%s] peer %s closed the connection after %.1fs without sending anything",
                             self.port.name, format_peer(conn.peer), duration)
        self._event(event, held=held)

    def _event(self, event, held=True):
        entropy = int.from_bytes(os.urandom(2), "big") / 65535.0
        for action in self.plan.handle(event, held=held, entropy=entropy):
            getattr(self, "_do_" + action[0])(*action[1:])

    # the actions

    def _do_resolve(self, peer):
        peers = self.port.config.connect
        host, port = peers[peer]
        self.generation += 1
        generation = self.generation
        self.log.info("[%s] dialing %s (peer %d of %d)", self.port.name, show_hostport((host, port)),
                      peer + 1, len(peers))
        resolve_in_thread(self.port.reactor, host, port,
                          lambda addresses, error: self._resolved(generation, addresses, error))

    def _resolved(self, generation, addresses, error):
        if generation != self.generation:
            return
        if error is not None or not addresses:
            self._peer_failed("cannot resolve: %s" % (describe_error(error) if error else "no address"))
            return
        self.addresses = list(addresses)
        self.last_error = "no address"
        self._event("resolved")

    def _do_connect(self):
        """The next address of the peer (the plan stays in connecting)."""
        if not self.addresses:
            self._peer_failed(self.last_error)
            return
        family, sockaddr = self.addresses.pop(0)
        generation = self.generation
        try:
            self.dial = Dial(self.port.reactor, family, sockaddr,
                             lambda sock, error: self._dialed(generation, sockaddr, sock, error))
        except OSError as e:
            self.last_error = describe_error(e)
            self._do_connect()

    def _dialed(self, generation, sockaddr, sock, error):
        self.dial = None
        if generation != self.generation:
            if sock:
                sock.close()
            return
        if error:
            self.last_error = "%s: %s" % (format_peer(sockaddr), error)
            self._do_connect()
            return
        if self.port.config.tls:
            self._start_tls(generation, sockaddr, sock)
            return
        self._up(sock, sockaddr)

    def _up(self, sock, sockaddr):
        """Connected (and through TLS): still wanted?  An incoming client
        may have taken the only place meanwhile (mixed role), or the local
        program closed the virtual port (listen_on_open)."""
        port = self.port
        if len(port.clients) >= port.config.max_clients or not port.network_enabled():
            why = "a client is already connected" if port.network_enabled() else "the virtual port closed meanwhile"
            self.log.info("[%s] dial to %s succeeded but %s; closing it", port.name, format_peer(sockaddr), why)
            sock.close()
            self._event("place_taken")
            return
        self.connected = (sock, sockaddr)
        self._event("up")

    def _start_tls(self, generation, sockaddr, sock):
        """Client-role TLS: verify the server (tls_ca or the system store)
        against tls_server_name or the host dialled."""
        c = self.port.config
        name = c.tls_server_name or c.connect[self.plan.peer][0]
        try:
            if self.tls_context is None:
                self.tls_context = make_client_tls(c)
            # an ASCII name as bytes: no idna codec (python3-codecs) needed
            ssl_sock = self.tls_context.wrap_socket(sock, server_hostname=resolver_host(name),
                                                    do_handshake_on_connect=False)
        except Exception as e:  # no ssl module, a bad CA file...: a failed dial, retried

            sock.close()
            self.last_error = "%s: TLS set-up failed: %s" % (format_peer(sockaddr), describe_error(e))
            self._do_connect()
            return

        def done(error):
            self.dial = None
            if generation != self.generation:
                ssl_sock.close()
                return
            if error:
                ssl_sock.close()
                self.last_error = "%s: TLS handshake failed: %s" % (format_peer(sockaddr), error)
                self._do_connect()
                return
            self._up(TlsStream(ssl_sock), sockaddr)
        self.dial = TlsStart(self.port.reactor, ssl_sock, done, timeout=DIAL_TIMEOUT)
        self.dial.step()

    def _do_admit(self):
        sock, sockaddr = self.connected
        self.connected = None
        self.port.counters["connections_total"] += 1
        self.port.admission.admit(sock, sockaddr, dialed=True)

    def _peer_failed(self, error):
        host_port = show_hostport(self.port.config.connect[self.plan.peer])
        if error.startswith(host_port + ": "):
            error = error[len(host_port) + 2:]  # the address dialled is the one configured
        self.log.warning("[%s] dial to %s failed: %s", self.port.name, host_port, error)
        self._event("peer_failed")

    def _do_back_off(self, delay, failures):
        self.port.counters["dials_failed"] += 1
        self.log.warning("[%s] every peer failed (%d round%s in a row); next dial in %.2fs",
                         self.port.name, failures, "" if failures == 1 else "s", delay)
        self._arm(delay)
        self.port.notify_device(self.port.config.device_unreachable_msg)

    def _do_wait(self, delay):
        self.log.info("[%s] redialing in %gs", self.port.name, delay)
        self._arm(delay)

    def _arm(self, delay):
        if self.timer:
            self.timer.cancel()
        self.timer = self.port.reactor.call_later(delay, self._timer_fired)

    def _timer_fired(self):
        self.timer = None
        self._event("timer")

    def _do_dial_if_wanted(self):
        self.poke()


# =====================================================================
# 7. Status, traces, reload and signals
# =====================================================================

def port_status(port):
    """One port as /status reports it (SPEC "Status")."""
    c = port.config
    now_mono = port.reactor.now()
    wall = time.time()
    clients = []
    for conn in port.clients:
        clients.append({
            "peer": format_peer(conn.peer),
            "dialed": conn.dialed,
            "since": round(conn.since, 3),
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "queued": len(conn.out),
            "last_active": round(conn.last_active, 3) if conn.last_active else None,
            "idle_seconds": round(now_mono - conn.last_io, 3),
        })
    status = {
        "name": port.name,
        "device": c.device if c.device is not None else c.virtual,
        "virtual": c.virtual is not None,
        "open": bool(port.device.is_open),
        # open, opening (a URL device's open under way), missing (retried
        # every reopen_interval), closed (open_on_demand, or stopped)
        "device_state": port.device_state,
        "disabled": port.disabled,      # through the control API, until enabled
        "settings": (dict(port.rfc2217.in_force) if port.rfc2217 and port.rfc2217.role == "server" else  # as clients set them
                     {"baudrate": c.baudrate, "bytesize": c.bytesize, "parity": c.parity,
                      "stopbits": c.stopbits, "flow": c.flow}),
        "listen": show_hostport(c.listen) if c.listen else None,
        "connect": [show_hostport(p) for p in c.connect] if c.connect else None,
        "dial_state": port.dial_state,
        "clients": clients,
    }
    device_side_status(port, status)
    status.update(port.counters)
    if port.modbus:
        status["modbus"] = port.modbus.status()
    if port.modem:
        status["modem"] = port.modem.status()
    status["udp"] = port.udp.status() if port.udp else None
    status["bytes_held"] = len(port.held)
    status["monitor"] = port.monitors.status() if port.monitors else None
    status["updated"] = round(wall, 3)
    return status


def device_side_status(port, status):
    """What the device side adds to a port's /status: the tty a usb: spec
    resolved to, the RS-485 mode as the driver reported it (or "refused:
    why"), the modem lines that drive connections, and "not applicable"
    settings for a device that is not a tty."""
    c, device = port.config, port.device
    if is_usb_spec(c.device):
        status["device_path"] = device.path
    if c.rs485:
        status["rs485"] = getattr(device, "rs485", None) if device.is_open else None
    if c.connect_on_line != "none" or c.disconnect_on_line != "none":
        status["modem_lines"] = {k.lower(): bool(v) for k, v in sorted(port.modem_lines.items())}
    if isinstance(device, StreamDevice):
        status["settings"] = "not applicable (not a tty)"
    if device.is_open and isinstance(device, PyserialDevice):
        status["lines"] = device.line_states({})   # DTR, RTS, break as last set


def server_status(server):
    listen_errors = {p.name: g.listener.error for g in server.gates for p in g.ports}
    return {"program": PROGRAM, "version": __version__, "pid": os.getpid(),
            "uptime": round(time.monotonic() - server.started, 3),
            "internal_errors": server.reactor.errors,
            "ports": [dict(port_status(p), listen_error=listen_errors.get(p.name)) for p in server.ports],
            # a shared listener refuses before a port is chosen: its own count
            "listeners": [{"listen": show_hostport(g.listener.address), "ports": [p.name for p in g.ports],
                           "connections_rejected": g.rejected,
                           "error": g.listener.error} for g in server.gates],   # why it is not bound (retried)
            "mdns": server.mdns.status() if server.mdns is not None else None}


COUNTER_HELP = {
    "bytes_from_device": "Bytes read from the serial device.",
    "bytes_to_device": "Bytes written to the serial device.",
    "bytes_dropped": "Bytes discarded (full buffer, slow or excluded client, device gone).",
    "connections_total": "TCP connections accepted or dialed.",
    "connections_rejected": "TCP connections refused (port full, not allowed).",
    "dials_failed": "Dial rounds in which every peer failed.",
    "device_errors": "Failures to open or keep the device.",
    "udp_datagrams_in": "UDP datagrams received on udp_listen.",
    "udp_bytes_in": "Bytes of UDP datagrams received on udp_listen.",
    "udp_datagrams_out": "UDP datagrams sent to udp_send_to and udp_reply peers.",
    "udp_bytes_out": "Bytes of UDP datagrams sent.",
    "udp_datagrams_refused": "UDP datagrams received and not written to the device (allow, receive_from, device queue full).",
    "udp_send_errors": "UDP datagrams not sent, and ICMP errors from UDP peers (unreachable).",
    "udp_packets_split": "Packets of device data longer than one UDP datagram, sent in several.",
    "modem_calls_in": "Modem emulation: incoming calls answered (ATA or auto-answer).",
    "modem_calls_out": "Modem emulation: calls dialed (ATD).",
    "modem_rings": "Modem emulation: RINGs sent to the device.",
    "monitor_bytes_dropped": "Bytes of traffic a monitor that fell behind did not get (per monitor).",
    "monitor_bytes_ignored": "Bytes monitors sent (read and ignored).",
}


def counter_metric(counter):
    """A counter's Prometheus name: sertcp_<counter>_total (a counter
    already named ..._total is not suffixed twice)."""
    name = "sertcp_" + counter
    return name if name.endswith("_total") else name + "_total"


def format_metrics(server):
    """Prometheus text exposition (format 0.0.4) of the counters and a few
    gauges: counters end in _total, gauges do not, each family has HELP
    and TYPE, so that `promtool check metrics` finds nothing to report."""
    def label(text):
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = []

    def family(metric, kind, help_text, samples):
        lines.append("# HELP %s %s" % (metric, help_text))
        lines.append("# TYPE %s %s" % (metric, kind))
        for labels, value in samples:
            lines.append("%s%s %d" % (metric, labels, value))
    for counter, help_text in COUNTER_HELP.items():
        family(counter_metric(counter), "counter", help_text,
               [('{port="%s"}' % label(port.name), port.counters[counter]) for port in server.ports])
    for gauge, help_text, value in (
            ("clients", "Connections open now.", lambda p: len(p.clients)),
            ("device_open", "1 if the device is open.", lambda p: 1 if p.device.is_open else 0),
            ("port_disabled", "1 if the port is disabled through the control API.", lambda p: 1 if p.disabled else 0)):
        family("sertcp_" + gauge, "gauge", help_text,
               [('{port="%s"}' % label(port.name), value(port)) for port in server.ports])
    family(counter_metric("listener_connections_rejected"), "counter",
           "Connections a listener refused before choosing a port (address, password block, unknown identity, "
           "silence).", [('{listen="%s"}' % label(show_hostport(gate.listener.address)), gate.rejected)
                         for gate in server.gates])
    lines.extend(format_modbus_metrics([p for p in server.ports if p.modbus], label))
    if server.mdns is not None:
        for counter, value in sorted(server.mdns.status().items()):
            if counter in MDNS_COUNTER_HELP:
                family(counter_metric(counter), "counter", MDNS_COUNTER_HELP[counter], [("", value)])
    family(counter_metric("internal_errors"), "counter",
           "Bugs met and contained: the connection, device or request closed.", [("", server.reactor.errors)])
    return "\n".join(lines) + "\n"


MDNS_COUNTER_HELP = {
    "mdns_packets_in": "Multicast DNS datagrams received on port 5353.",
    "mdns_packets_malformed": "Multicast DNS datagrams that could not be decoded, ignored.",
    "mdns_answers": "Multicast DNS answers sent to queries for our names.",
    "mdns_answers_limited": "Multicast DNS answers not sent: more queries than the rate limit allows.",
    "mdns_conflicts": "Service names found in use by another host, and renamed.",
    "mdns_send_errors": "Multicast DNS datagrams the kernel refused to send.",
}


MODBUS_COUNTER_HELP = {
    "requests": "Modbus TCP requests queued for the RTU bus.",
    "replies": "RTU replies returned to the client that asked.",
    "timeouts": "RTU requests the device did not answer in modbus_timeout_ms.",
    "crc_errors": "RTU frames from the device with a bad CRC (no reply).",
    "bad_replies": "RTU replies from another unit or for another function (no reply).",
    "broadcasts": "Requests to unit 0, sent without waiting for a reply.",
    "exceptions_sent": "Exceptions 0x0B (no response) and 0x0A (device not open) sent to clients.",
    "unavailable": "Requests answered with exception 0x0A because the device was not open.",
}


def format_modbus_metrics(ports, label):
    """The metric lines of protocol = modbus ports (none without one)."""
    if not ports:
        return []
    lines = []

    def family(metric, kind, help_text, samples):
        lines.extend(("# HELP %s %s" % (metric, help_text), "# TYPE %s %s" % (metric, kind)))
        lines.extend("%s{port=\"%s\"} %s" % (metric, label(p.name), show_number(v)) for p, v in samples if v is not None)
    for counter, help_text in MODBUS_COUNTER_HELP.items():
        family(counter_metric("modbus_" + counter), "counter", help_text,
               [(p, p.modbus.core.bus.counters[counter]) for p in ports])
    family("sertcp_modbus_queue_depth", "gauge", "Modbus requests waiting or on the bus now.",
           [(p, p.modbus.core.bus.depth()) for p in ports])
    for fraction, name in ((0.5, "p50"), (0.99, "p99")):
        family("sertcp_modbus_round_trip_%s_seconds" % name, "gauge",
               "Bus round trip (request written to reply read), %s of the last %d." % (name, MODBUS_ROUND_TRIPS),
               [(p, p.modbus.core.bus.percentile(fraction)) for p in ports])
    return lines


class HttpProblem(Exception):
    """An answer other than 200: code, reason phrase, and for the control
    API a detail (its JSON "error") and extra header lines."""

    def __init__(self, code, reason, detail=None, headers=""):
        self.code, self.reason, self.detail, self.headers = code, reason, detail, headers


class HttpRequest:
    """One request to the status endpoint: method, path (still %-escaped),
    query (after '?'), headers {lower-case name: value}, body, peer."""
    __slots__ = ("method", "path", "query", "headers", "body", "peer", "control")


def parse_http_head(head):
    """An HTTP/1.x request head (bytes up to the blank line) -> HttpRequest
    (body empty).  Raises HttpProblem: 400 for anything malformed, 405 for
    a method other than GET, HEAD and POST."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpProblem(400, "Bad Request")
    request = HttpRequest()
    request.method, target = parts[0], parts[1]
    if request.method not in ("GET", "HEAD", "POST"):
        raise HttpProblem(405, "Method Not Allowed")
    request.path, _, request.query = target.partition("?")
    request.headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        name = name.lower()
        if not colon or not name or name != name.strip():
            raise HttpProblem(400, "Bad Request", "malformed header line")
        if name in request.headers and name in ("content-length", "content-type", "authorization"):
            raise HttpProblem(400, "Bad Request", "%s given twice" % name)
        request.headers[name] = value.strip()
    request.body, request.peer, request.control = b"", None, False
    return request


def http_body_length(request):
    """The bytes of body a request announces (Content-Length), at most
    CONTROL_BODY_LIMIT; HttpProblem otherwise (a chunked body: 411)."""
    if "transfer-encoding" in request.headers:
        raise HttpProblem(411, "Length Required", "send the body with a Content-Length")
    text = request.headers.get("content-length", "0")
    if not (text.isascii() and text.isdigit()):
        raise HttpProblem(400, "Bad Request", "Content-Length is not a number")
    if int(text) > CONTROL_BODY_LIMIT:
        raise HttpProblem(413, "Payload Too Large", "a body takes at most %d bytes" % CONTROL_BODY_LIMIT)
    return int(text)


def percent_decode(text, form=False):
    """A path segment or form field with %XX escapes (and, in a form, '+'
    for a space) -> str; HttpProblem 400 for a bad escape or non-UTF-8."""
    raw = text.encode("latin-1")        # the head was decoded as latin-1: these are its bytes
    if form:
        raw = raw.replace(b"+", b" ")
    pieces = raw.split(b"%")
    out = bytearray(pieces[0])
    for piece in pieces[1:]:
        if len(piece) < 2 or not all(c in b"0123456789abcdefABCDEF" for c in piece[:2]):
            raise HttpProblem(400, "Bad Request", "bad %-escape")
        out.append(int(piece[:2], 16))
        out += piece[2:]
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpProblem(400, "Bad Request", "not UTF-8 after %-decoding")


def parse_form(text, fields=None):
    """name=value&... (a query string, or an x-www-form-urlencoded body)
    added to `fields`; HttpProblem 400 for a name given twice."""
    fields = {} if fields is None else fields
    for item in text.split("&"):
        if item:
            name, _, value = item.partition("=")
            name = percent_decode(name, form=True)
            if name in fields:
                raise HttpProblem(400, "Bad Request", "%s given twice" % name)
            fields[name] = percent_decode(value, form=True)
    return fields


# ---------------------------------------------------------------------
# The control API: POST /ports/NAME/ACTION and POST /reload
# ---------------------------------------------------------------------

# what each action takes: parameter -> parser (from the query string or
# an x-www-form-urlencoded body)
CONTROL_ACTIONS = {
    "disconnect": {"peer": str},
    "lines": {"dtr": choice_parser("on", "off"), "rts": choice_parser("on", "off"),
              "break": number_parser(float, 0.01, 60)},
    "enable": {},
    "disable": {},
    "reload": {},
}


def control_route(path):
    """The control API's (action, port name) for a path: ("reload", None)
    for /reload, (ACTION, NAME) for /ports/NAME/ACTION with NAME still
    %-escaped; None for a path that is not the control API's."""
    if path == "/reload":
        return "reload", None
    parts = path.split("/")
    if len(parts) == 4 and parts[:2] == ["", "ports"] and parts[2] and parts[3] != "reload":
        return parts[3], parts[2]
    return None


def control_parameters(action, fields):
    """The parsed parameters of an action; HttpProblem 400 naming what is
    wrong (an unknown parameter, a value out of range, lines without any)."""
    takes = CONTROL_ACTIONS[action]
    unknown = sorted(set(fields) - set(takes))
    if unknown:
        raise HttpProblem(400, "Bad Request", "%s takes %s, not %s" % (
            action, ", ".join(sorted(takes)) or "no parameters", ", ".join(unknown)))
    values = {}
    for name, text in fields.items():
        try:
            values[name] = takes[name](text)
        except ValueProblem as e:
            raise HttpProblem(400, "Bad Request", "%s: %s" % (name, e))
    if action == "lines" and not values:
        raise HttpProblem(400, "Bad Request", "lines takes dtr=on|off, rts=on|off, break=SECONDS")
    return values


def bearer_token(request):
    """The token of an `Authorization: Bearer TOKEN` header, as bytes (b"" if none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""


class ControlApi:
    """The control API of a status endpoint (only with a control token):
    POST only; then the token, compared in constant time, where a missing
    or wrong one is answered 401 after WRONG_PASSWORD_DELAY, as a wrong
    password is, and PASSWORD_FAILURES of them from one address within
    PASSWORD_WINDOW refuse it (429) for PASSWORD_BLOCK seconds; then the
    action.  Answers are JSON; each action is logged with the address."""

    def __init__(self, server):
        self.server = server
        self.log = server.log
        self.failed_tokens = FailedPasswords()

    def handle(self, handler, action, name):
        """(code, JSON-able answer), or None when the StatusRequest
        `handler` is answered later."""
        request = handler.request
        if request.method != "POST":
            raise HttpProblem(405, "Method Not Allowed", "the control API takes POST", "Allow: POST\r\n")
        host, now = request.peer[0], self.server.reactor.now()
        if self.failed_tokens.is_blocked(host, now):
            raise HttpProblem(429, "Too Many Requests", "too many wrong tokens from %s: refused for up to %ds"
                              % (host, PASSWORD_BLOCK), "Retry-After: %d\r\n" % PASSWORD_BLOCK)
        import hmac  # only with a control token
        given = bearer_token(request)
        if not hmac.compare_digest(given, self.server.config.control_token):
            blocked = self.failed_tokens.failed(host, now)
            self.server.peer_log(host, WARNING, "control API: POST %s from %s refused: %s token%s",
                                 repr(request.path[:200])[1:-1], host, "wrong" if given else "no",
                                 "; %s blocked for %ds" % (host, PASSWORD_BLOCK) if blocked else "")
            # answered after a pause, as a wrong password: guessing costs the guesser time
            problem = HttpProblem(401, "Unauthorized", "missing or wrong token (Authorization: Bearer TOKEN)",
                                  "WWW-Authenticate: Bearer\r\n")
            self.server.reactor.call_later(WRONG_PASSWORD_DELAY, lambda: handler.answer_problem(problem))
            return None
        if action not in CONTROL_ACTIONS:
            raise HttpProblem(404, "Not Found", "no action %r: %s" % (action, ", ".join(sorted(CONTROL_ACTIONS))))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.body and kind not in ("", "application/x-www-form-urlencoded"):
            raise HttpProblem(415, "Unsupported Media Type", "send parameters as a query string or a form")
        values = control_parameters(action, parse_form(request.body.decode("latin-1"), parse_form(request.query)))
        by = "through the control API by %s" % host
        if action == "reload":
            outcome = self.server.reload("reload requested %s" % by)
            return (200 if outcome["reloaded"] else 409), outcome
        name = percent_decode(name)
        port = next((p for p in self.server.ports if p.name == name), None)
        if port is None:
            raise HttpProblem(404, "Not Found", "no port named %r" % name)
        return getattr(self, action)(handler, port, values, by)

    def disconnect(self, handler, port, values, by):
        peer = values.get("peer")
        if peer == "all":
            peer = None
        chosen = [conn for conn in port.clients if peer is None or format_peer(conn.peer) == peer]
        if peer is not None and not chosen:
            raise HttpProblem(404, "Not Found", "port %s has no client %s" % (port.name, peer))
        self.log.info("[%s] disconnecting %s %s", port.name, peer or "every client (%d)" % len(chosen), by)
        for conn in chosen:
            port.end_connection(conn, "disconnected %s" % by)
        return 200, {"port": port.name, "disconnected": [format_peer(conn.peer) for conn in chosen]}

    def enable(self, handler, port, values, by):
        if port.disabled:
            refused = self.server.enable_port(port, "enabled %s" % by)
            if refused:
                raise HttpProblem(409, "Conflict", refused)
        return 200, {"port": port.name, "disabled": False}

    def disable(self, handler, port, values, by):
        if not port.disabled:
            self.server.disable_port(port, "disabled %s" % by)
        return 200, {"port": port.name, "disabled": True}

    def lines(self, handler, port, values, by):
        """DTR and RTS, then the break, through the device's call() (a URL
        device answers later): answered once the device has done them."""
        device, problems = port.device, []
        if not device.is_open:
            raise HttpProblem(409, "Conflict", "the device of port %s is %s" % (
                port.name, "disabled" if port.disabled else port.device_state))
        dtr, rts = [None if values.get(k) is None else values[k] == "on" for k in ("dtr", "rts")]

        def lines_set(problem, error):
            problem = problem or (describe_error(error) if error else "")
            if problem:
                problems.append(problem)
            elif dtr is not None or rts is not None:
                self.log.info("[%s] lines %s %s", port.name, " ".join(
                    "%s=%s" % (k.upper(), values[k]) for k in ("dtr", "rts") if k in values), by)
            if "break" in values:
                port.send_break(values["break"], by, done)
            else:
                done("")

        def done(problem):
            if problem:
                problems.append(problem)
            answer = {"port": port.name, "lines": device.line_states({})}
            if problems:
                answer["error"] = "; ".join(problems)
            handler.answer_json(409 if problems else 200, answer)
        if dtr is None and rts is None:
            lines_set("", None)
        else:
            device.call(lambda: device.set_lines(dtr, rts), lines_set)
        return None


# ---------------------------------------------------------------------
# The web page: GET / (no external assets; it reads /status every few s)
# ---------------------------------------------------------------------
# Every name and value goes in with textContent, never as markup: a port
# name, a device path or a peer cannot inject anything.

STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>sertcp</title>
<style>
body{font:15px/1.35 system-ui,sans-serif;margin:0;padding:6px;background:#eee;color:#222}
h1{font-size:1.15em;margin:4px}h2{font-size:1.05em;margin:0 0 4px;overflow-wrap:anywhere}
.port{background:#fff;border-radius:6px;padding:8px;margin:8px 0}
.st{color:#fff;background:#888;border-radius:4px;padding:0 5px;font-size:.85em;font-weight:normal}
.open{background:#297}.missing,.disabled{background:#c33}.opening{background:#d80}
.k{color:#666;font-size:.9em;overflow-wrap:anywhere}
table{border-collapse:collapse;margin-top:4px}td,th{padding:1px 8px 1px 0;text-align:left;font-size:.9em}
td.n{text-align:right;font-variant-numeric:tabular-nums}
@media(min-width:700px){.port{display:inline-block;vertical-align:top;width:46%;margin:8px}}
</style></head><body>
<h1>sertcp <span id="info" class="k"></span></h1><div id="ports"></div>
<script>
"use strict";
var seen = {};
function add(to, tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return to.appendChild(e);
}
function table(to, head, rows) {
  var t = add(to, "table"), r = add(t, "tr");
  head.forEach(function (h) { add(r, "th", h); });
  rows.forEach(function (row) {
    var r = add(t, "tr");
    row.forEach(function (v) { add(r, "td", v, typeof v == "number" ? "n" : ""); });
  });
}
function render(s) {
  var box = document.getElementById("ports");
  document.getElementById("info").textContent = s.version + ", pid " + s.pid + ", up " +
    Math.round(s.uptime) + " s, read " + new Date().toLocaleTimeString();
  box.textContent = "";
  s.ports.forEach(function (p) {
    var d = add(box, "div", null, "port"), h = add(d, "h2", p.name + " ");
    var state = p.disabled ? "disabled" : p.device_state;
    add(h, "span", state, "st " + state);
    var set = p.settings, lines = p.lines || {};
    if (set && typeof set == "object")
      set = set.baudrate + " " + set.bytesize + (set.parity || "n")[0].toUpperCase() + set.stopbits + " " + set.flow;
    add(d, "div", (p.virtual ? "virtual " : "") + p.device + ": " + set +
      Object.keys(lines).filter(function (k) { return lines[k]; }).map(function (k) { return " " + k.toUpperCase(); }).join(""), "k");
    var listens = s.listeners.filter(function (l) { return l.ports.indexOf(p.name) >= 0; }).map(function (l) { return l.listen; });
    add(d, "div", "listen " + (listens.join(", ") || (p.listen ? p.listen + " (closed)" : "-")) + (p.connect ? "; connect " + p.connect.join(", ") + " (" + p.dial_state + ")" : ""), "k");
    var now = p.updated;
    table(d, ["client", "since", "in", "out"], p.clients.map(function (c) {
      return [c.peer + (c.dialed ? " (dialed)" : ""), new Date(c.since * 1000).toLocaleTimeString() + " (" + Math.round(now - c.since) + " s)", c.bytes_in, c.bytes_out];
    }));
    var before = seen[p.name], read = Date.now() / 1000, rows = [];
    Object.keys(p).forEach(function (k) {
      if (typeof p[k] != "number" || k == "updated") return;
      if (/^(udp|modem|monitor)_/.test(k) && !p[k.split("_")[0]]) return;   // a side the port does not have
      rows.push([k, p[k], before ? Math.round((p[k] - before.p[k]) / (read - before.read)) : ""]);
    });
    table(d, ["counter", "total", "per s"], rows);
    seen[p.name] = {p: p, read: read};
  });
}
function refresh() {
  fetch("status", {cache: "no-store"}).then(function (r) { return r.json(); }).then(render).catch(function (e) {
    document.getElementById("info").textContent = "cannot read /status: " + e;
  }).then(function () { setTimeout(refresh, 3000); });
}
refresh();
</script></body></html>
"""


STATUS_REQUEST_LIMIT = 8192
STATUS_REQUEST_TIMEOUT = 5.0
# requests open at once on the status endpoint: beyond this the oldest one
# still sending its head is closed (else the new one is answered 503), so
# that silent connections cannot take the descriptors the ports need
STATUS_REQUESTS_MAX = 64


class StatusEndpoint:
    """GET / (a web page), GET /status (JSON) and GET /metrics
    (Prometheus) on the same loop, and the control API's POST paths with
    a control token; status_allow says who reaches any of them.  A tiny
    HTTP/1.0 responder instead of http.server, which would pull in email
    and urllib (absent from OpenWrt's python3-light)."""

    def __init__(self, server, address, retry_every=None):
        self.server = server
        self.control = None             # ControlApi, made at the first control request
        self.requests = {}              # StatusRequest -> None: those open, oldest first
        self.crowded, self.crowded_said = 0, -60.0     # requests closed or refused as too many; when logged
        self.listener = Listener(server.reactor, address, 16, self.on_accept, "status", retry_every,
                                 lambda listener: server.log.info(
                                     "status endpoint on http://%s/ (a web page), /status and /metrics",
                                     listener.bound()))

    def on_accept(self, sock, peer):
        allow = self.server.config.globals["status_allow"]
        if allow is not None and not host_allowed(allow, peer[0]):
            self.server.peer_log(peer[0], INFO, "status endpoint: %s refused: not in status_allow", format_peer(peer))
            sock.close()
            return
        if len(self.requests) >= STATUS_REQUESTS_MAX and not self._make_room(peer):
            try:
                sock.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            sock.close()
            return
        request = StatusRequest(self, sock, peer)
        self.requests[request] = None
        request.start()

    def _make_room(self, peer):
        """Close the oldest request still sending its head, for a new
        connection from `peer`; False if every open one is being answered.
        Said in the log once a minute at most, however many addresses."""
        oldest = next((r for r in self.requests if r.request is None), None)
        self.crowded += 1
        now = self.server.reactor.now()
        if now >= self.crowded_said + 60:
            self.server.log.warning("status endpoint: %d requests open at once: the oldest still sending "
                                    "is closed, else a new one refused (%d times since said last)",
                                    len(self.requests), self.crowded)
            self.crowded, self.crowded_said = 0, now
        if oldest is None:
            return False
        oldest.close()
        return True

    def respond(self, handler):
        """(code, content type, body) for the request of a StatusRequest,
        or None when it is answered otherwise (the control API); raises
        HttpProblem."""
        request = handler.request
        if request.control:
            if self.control is None:
                self.control = ControlApi(self.server)
            answer = self.control.handle(handler, *control_route(request.path))
            if answer is not None:
                handler.answer_json(*answer)
            return None
        if request.method == "POST" and request.path in ("/", "/status", "/metrics"):
            raise HttpProblem(405, "Method Not Allowed", None, "Allow: GET, HEAD\r\n")
        if request.path == "/":
            return 200, "text/html; charset=utf-8", STATUS_PAGE.encode()
        if request.path == "/status":
            import json
            body = json.dumps(server_status(self.server), indent=1).encode() + b"\n"
            return 200, "application/json", body
        if request.path == "/metrics":
            return 200, "text/plain; version=0.0.4", format_metrics(self.server).encode()
        return 404, "text/plain", b"not found: try /, /status or /metrics\n"

    def close(self):
        self.listener.close()


def json_line(answer):
    import json
    return json.dumps(answer).encode() + b"\n"


HTTP_REASONS = {200: "OK", 404: "Not Found", 409: "Conflict"}  # the codes answered without an HttpProblem


class StatusRequest(Handler):
    """One HTTP request on the status endpoint: read the head (and a
    bounded body), answer, close; bounded in size and time.  A malformed
    request is answered 4xx and costs nothing else."""

    def __init__(self, endpoint, sock, peer=("", 0)):
        self.endpoint = endpoint
        self.reactor = endpoint.server.reactor
        self.sock = sock
        self.peer = peer
        self.head = bytearray()
        self.request = None             # the HttpRequest, once its head is read
        self.body_at = 0                # where the body starts in self.head
        self.body_length = 0
        self.reply = b""
        self.answering = False          # the request is whole: what comes now is not read
        self.replied = False
        self.timer = None

    def fileno(self):
        return self.sock.fileno()

    def start(self):
        self.reactor.set_interest(self, True, False)
        self.timer = self.reactor.call_later(STATUS_REQUEST_TIMEOUT, self.close)

    def on_readable(self):
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        if self.answering:
            return  # draining what the client still sends, so close() sends FIN, not RST
        self.head += data
        try:
            if self.request is None and not self._head_read():
                return
            if len(self.head) < self.body_at + self.body_length:
                return
            self.answering = True
            self.request.body = bytes(self.head[self.body_at:self.body_at + self.body_length])
            answer = self.endpoint.respond(self)
        except HttpProblem as e:
            self.answering = True
            self.answer_problem(e)
            return
        if answer is not None:
            self.answer(*answer)

    def _head_read(self):
        """Parse the head once it is all here; False while it is not."""
        end = self.head.find(b"\r\n\r\n")
        blank = 4
        if end < 0:
            end, blank = self.head.find(b"\n\n"), 2
        if end < 0:
            if len(self.head) <= STATUS_REQUEST_LIMIT:
                return False
            raise HttpProblem(431, "Request Header Fields Too Large")
        self.request = parse_http_head(bytes(self.head[:end]))
        self.request.peer = self.peer
        # the control API's paths answer in JSON, errors too
        self.request.control = (self.endpoint.server.config.control_token is not None
                                and control_route(self.request.path) is not None)
        self.body_at = end + blank
        self.body_length = http_body_length(self.request)
        return True

    def answer(self, code, kind, body, headers="", reason=None):
        """Send the answer and close (a request that ended meanwhile, by
        its timeout or its client, is not answered)."""
        if self.finished:
            return
        self.answering = True
        head = ("HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n"
                % (code, reason or HTTP_REASONS[code], kind, len(body), headers)).encode()
        method = self.request.method if self.request is not None else "GET"
        self.reply = head + (body if method != "HEAD" else b"")
        self.reactor.set_interest(self, False, True)

    def answer_json(self, code, answer):
        self.answer(code, "application/json", json_line(answer))

    def answer_problem(self, problem):
        if self.request is not None and self.request.control:
            body, kind = json_line({"error": problem.detail or problem.reason}), "application/json"
        else:
            body, kind = (problem.reason + "\n").encode(), "text/plain"
        self.answer(problem.code, kind, body, problem.headers, problem.reason)

    def on_writable(self):
        try:
            n = self.sock.send(self.reply)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.reply = self.reply[n:]
        if not self.reply:
            self.replied = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()
                return
            self.reactor.set_interest(self, True, False)

    def close(self):
        self.finish()

    def ended(self, reason):
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.endpoint.requests.pop(self, None)
        self.reactor.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass


class RollingFile:
    """A file appended to; at max_size (0 = never) it becomes FILE.1
    (replacing the one before) and a new one starts, so it takes at most
    about twice max_size.  reopen() starts anew at the same path, as after
    logrotate moved the file and sent SIGHUP.  open_file(path) opens it."""

    def __init__(self, path, max_size, open_file, strict=False):
        self.path, self.max_size, self.open_file = path, max_size, open_file
        self.strict = strict            # a failed rollover raises (else: keep writing, past max_size)
        self.file = None
        self.reopen()

    def write(self, data, divisible=False):
        """Append data.  Divisible data (a raw byte stream) is cut so that
        the file rolled over holds exactly max_size; a record (a log line,
        a hexdump) stays whole and may take the file past max_size."""
        while True:
            room = self.limit - self.file.tell() if self.limit else 0
            cut = room if divisible and 0 < room < len(data) else len(data)
            self.file.write(data[:cut])
            self.file.flush()
            data = data[cut:]
            if self.limit and self.file.tell() >= self.limit:
                try:
                    os.replace(self.path, self.path + ".1")
                    self.reopen()
                except OSError:
                    if self.strict:
                        raise
                    # keep writing where we are: losing the lines is worse than a big file
                else:
                    if divisible:
                        data = self.last_generations(data)
            if not data:
                return

    def last_generations(self, data):
        """Of a stream about to fill the new file more than once, only what
        ends in FILE.1 and FILE: the generations between would be replaced
        at once, and renaming a file per max_size bytes (per byte at 1)
        would hold up the port for minutes."""
        limit = self.limit
        if not limit or len(data) <= limit:
            return data
        tail = len(data) % limit
        return data[-(limit + tail):] if tail else data[-limit:]

    def reopen(self):
        new = self.open_file(self.path)
        import stat                     # (loaded by os already)
        # a FIFO or a tty does not roll over
        self.limit = self.max_size if stat.S_ISREG(os.fstat(new.fileno()).st_mode) else 0
        if self.file is not None:
            self.file.close()
        self.file = new

    def close(self):
        self.file.close()


def open_trace_file(path):
    # without blocking: a FIFO nobody reads would otherwise hold up the
    # start (or a SIGHUP) at open, and every port at write
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY, 0o666)
    return open(fd, "ab")


def traffic_record(fmt, direction, peer, data):
    """Traffic as traces and monitors write it: the bytes themselves
    (raw), or hexdump lines with the time and the peer (hex)."""
    if fmt == "raw":
        return data
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + ".%06d" % int((now % 1) * 1e6)
    return format_hexdump(stamp, direction, peer, data).encode()


class Trace:
    """Both directions of a port appended to a file with timestamps and the
    peer: `hex` (hexdump lines, '<' device->net, '>' net->device) or `raw`;
    rolled over at max_size (trace_max_size) and reopened at SIGHUP.
    A write error disables the trace with one log line; the bridge goes on."""

    def __init__(self, path, fmt, log, name, max_size=0):
        self.path, self.format, self.log, self.name = path, fmt, log, name
        self.file = None
        try:
            self.file = RollingFile(path, max_size, open_trace_file, strict=True)   # never past max_size
        except OSError as e:
            self._fail(e)

    def _fail(self, exc):
        self.log.error("[%s] trace %s disabled: %s", self.name, self.path, describe_error(exc))
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass

    def record(self, direction, peer, data):
        if self.file is None:
            return
        try:
            self.file.write(traffic_record(self.format, direction, peer, data), divisible=self.format == "raw")
        except (OSError, ValueError) as e:
            self._fail(e)

    def reopen(self):
        """SIGHUP: logrotate moved the file; start anew at the path."""
        if self.file is None:
            return
        try:
            self.file.reopen()
        except OSError as e:
            self._fail(e)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


HEXDUMP_PRINTABLE = bytes(b if 32 <= b < 127 else 46 for b in range(256))     # the rest as '.'


def format_hexdump(stamp, direction, peer, data):
    """'<' or '>' lines: timestamp, peer, offset, 16 bytes hex, printable."""
    # hex and text made whole, then cut in lines: a monitor watching a full
    # speed port costs 20x less than formatting byte by byte
    hexes = data.hex(" ")
    text = data.translate(HEXDUMP_PRINTABLE).decode("ascii")
    lines = ["%s %s %s %d bytes\n" % (stamp, direction, peer, len(data))]
    lines += ["%s %04x  %-47s  |%s|\n" % (direction, offset, hexes[3 * offset:3 * offset + 47], text[offset:offset + 16])
              for offset in range(0, len(data), 16)]
    return "".join(lines)


# ---------------------------------------------------------------------
# Monitors: read-only listeners that stream a copy of both directions
# ---------------------------------------------------------------------

MONITOR_BACKLOG = 256 * 1024   # bytes queued for one monitor; whole records beyond it are dropped
MONITORS_PER_PORT = 8          # at once; more are refused (each may hold MONITOR_BACKLOG)
MONITOR_COUNTERS = ("monitor_bytes_dropped", "monitor_bytes_ignored")


class Monitors:
    """A port's `monitor` listener and the monitors connected to it (at
    most MONITORS_PER_PORT): each gets every record of the traffic
    (monitor_format), as the trace file does.  A monitor is no client: it
    is not counted for max_clients or send_to, never pauses the device,
    and what it sends is read and ignored (monitor_bytes_ignored).  One
    that falls behind loses whole records beyond MONITOR_BACKLOG
    (monitor_bytes_dropped, in bytes of traffic), and a hex monitor is
    told how many.  `allow` applies: a monitor sees what the clients see.
    An address that cannot be bound is retried every reopen_interval."""

    def __init__(self, port):
        self.port = port
        self.format = port.config.monitor_format
        self.connections = []
        self.listener = Listener(port.reactor, port.config.monitor, 16, self.on_accept, port.name,
                                 port.config.reopen_interval, self._listening, retried=None)

    def _listening(self, listener):
        self.port.log.info("[%s] monitor (%s) listening on %s", self.port.name, self.format, listener.bound())

    def on_accept(self, sock, peer):
        allow = self.port.config.allow
        refused = "address not allowed" if allow is not None and not host_allowed(allow, peer[0]) else \
            "%d monitors already watch" % MONITORS_PER_PORT if len(self.connections) >= MONITORS_PER_PORT else None
        if refused:
            self.port.peer_log(peer[0], INFO, "[%s] monitor %s refused: %s", self.port.name, format_peer(peer), refused)
            sock.close()
            return
        tune_socket(sock, self.port.config)     # keepalive finds a vanished monitor; a capped send buffer
        monitor = MonitorConnection(self, sock, peer)
        self.connections.append(monitor)
        self.port.reactor.set_interest(monitor, True, False)
        self.port.peer_log(peer[0], INFO, "[%s] monitor %s connected", self.port.name, format_peer(peer))

    def record(self, direction, peer, data):
        if not self.connections:
            return
        record = None                   # formatted once, and only for a monitor with room
        for monitor in tuple(self.connections):    # (one may end in send())
            if monitor.queued >= MONITOR_BACKLOG:
                monitor.lose(len(data))
                continue
            if record is None:
                record = traffic_record(self.format, direction, peer, data)
            monitor.send(record, len(data))

    def status(self):
        return {"listen": show_hostport(self.port.config.monitor), "error": self.listener.error,
                "monitors": [{"peer": format_peer(m.peer), "since": round(m.since, 3), "queued": m.queued,
                              "bytes_out": m.bytes_out, "bytes_lost": m.bytes_lost} for m in self.connections]}

    def reopen(self):
        pass                            # (SIGHUP: for the trace file beside it)

    def close(self):
        self.listener.close()
        for monitor in list(self.connections):
            monitor.finish("port stopped")


class MonitorConnection(Handler):
    """One monitor: records queued (whole, at most MONITOR_BACKLOG bytes
    besides the one being written) and written as the peer reads them."""

    def __init__(self, monitors, sock, peer):
        self.monitors = monitors
        self.sock = sock
        self.peer = peer
        self.since = time.time()
        self.out = deque()
        self.queued = 0
        self.bytes_out = 0
        self.bytes_lost = 0
        self.unsaid = 0                 # lost bytes the peer has not been told of (hex)

    def fileno(self):
        return self.sock.fileno()

    def lose(self, n):
        self.bytes_lost += n
        self.unsaid += n
        self.monitors.port.counters["monitor_bytes_dropped"] += n

    def send(self, record, traffic):
        """Queue one record (of `traffic` bytes of traffic), or lose it
        whole if it does not fit."""
        if self.queued and self.queued + len(record) > MONITOR_BACKLOG:
            self.lose(traffic)
            return
        if self.unsaid and self.monitors.format == "hex":
            record = b"! %d bytes not shown: this monitor fell behind\n" % self.unsaid + record
        self.unsaid = 0
        self.out.append(record)
        self.queued += len(record)
        if len(self.out) == 1:
            self.on_writable()

    def on_writable(self):
        while self.out:
            try:
                n = self.sock.send(self.out[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.finish(describe_error(e))
                return
            self.bytes_out += n
            self.queued -= n
            if n < len(self.out[0]):
                self.out[0] = self.out[0][n:]
                break
            self.out.popleft()
        self.monitors.port.reactor.set_interest(self, True, bool(self.out))

    def on_readable(self):
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.finish(describe_error(e))
            return
        if not data:
            self.finish("closed by the monitor")
            return
        self.monitors.port.counters["monitor_bytes_ignored"] += len(data)

    def ended(self, reason):
        port = self.monitors.port
        port.reactor.forget(self)
        try:
            self.monitors.connections.remove(self)
        except ValueError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        port.peer_log(self.peer[0], INFO, "[%s] monitor %s gone: %s (%d bytes lost)",
                      port.name, format_peer(self.peer), reason or "closed", self.bytes_lost)


class Tee:
    """The trace file and the monitors as one place where a port copies
    both directions (Port.trace)."""

    def __init__(self, *taps):
        self.taps = taps

    def record(self, direction, peer, data):
        for tap in self.taps:
            tap.record(direction, peer, data)

    def reopen(self):
        for tap in self.taps:
            tap.reopen()

    def close(self):
        for tap in self.taps:
            tap.close()


def copies_of_traffic(port):
    """Port.trace: the trace file, the port's monitors, both (a Tee), or None."""
    config = port.config
    trace = Trace(config.trace, config.trace_format, port.log, port.name, config.trace_max_size) \
        if config.trace else None
    if trace and port.monitors:
        return Tee(trace, port.monitors)
    return trace or port.monitors


# =====================================================================
# 8. Main: command line, logging, service files, the server
# =====================================================================

USAGE = """usage: python3 sertcp.py [-c FILE] [options] [DEVICE]

Serial device server: joins serial ports to TCP.

  -c FILE, --config FILE   read ports from an INI file (see sertcp.ini.example)
  DEVICE                   serial device path or pyserial URL for the port 'cli'
  --check                  validate, print the effective configuration, exit
  --print-example          print an example INI file with every key
  --print-service KIND     print a systemd unit, OpenWrt procd script, SysV
                           script or crontab line (systemd|openwrt|sysv|cron)
                           that starts this same command line, and exit
  --version                print the version
  -h, --help               this help

Every INI key is also a flag: --some-key VALUE (booleans: yes|no).
Signals: TERM/INT stop, HUP reloads the file, USR1 logs the status.
Port keys:
%s
Global keys:
%s
"""


def usage_text():
    def table(keys):
        return "\n".join("  %-22s %s (default: %s)" % (k.flag, k.described, k.format(k.default) or "-")
                         for k in keys)
    return USAGE % (table(PORT_KEYS), table(GLOBAL_KEYS))


_log = None


def log_warning(message):
    if _log is not None:
        _log.warning(message)


# ---------------------------------------------------------------------
# The log: a small logger of our own.  The logging package is a package
# of its own on OpenWrt (python3-logging) and costs 16 ms and 1.8 MiB at
# start; this writes the same lines ("2024-01-02 03:04:05,678 INFO ...").
# ---------------------------------------------------------------------

LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}
SYSLOG_SEVERITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}   # RFC 5424; facility user (1)


class StreamSink:
    """Log lines to stderr."""

    def __init__(self, stream):
        self.stream = stream

    def emit(self, level, message):
        self.stream.write(timestamped(level, message))
        self.stream.flush()

    def reopen(self):
        pass

    def close(self):
        pass


class FileSink(RollingFile):
    """Log lines appended to a file; at max_size (0 = never) the file
    becomes FILE.1 (replacing the one before) and a new one starts, so a
    router's RAM-backed /tmp holds at most twice max_size."""

    def __init__(self, path, max_size=0):
        super().__init__(path, max_size, lambda path: open(path, "a"))

    def emit(self, level, message):
        self.write(timestamped(level, message))


class SyslogSink:
    """Log lines as datagrams to the local syslog daemon (/dev/log, or UDP
    port 514 of localhost where there is none, as logging's SysLogHandler)."""

    def __init__(self):
        devlog = os.environ.get("SERTCP_DEVLOG", "/dev/log")     # the test suite's own socket
        if os.path.exists(devlog):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.address = devlog
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.address = ("127.0.0.1", 514)
        try:
            self.sock.connect(self.address)
        except OSError:
            self.sock.close()
            raise

    def emit(self, level, message):
        line = "<%d>%s[%d]: %s %s\x00" % (8 + SYSLOG_SEVERITY[level], PROGRAM, os.getpid(),
                                         LEVEL_NAMES[level], message)
        try:
            self.sock.send(line.encode("utf-8", "replace"))
        except OSError:
            try:
                self.sock.connect(self.address)  # syslogd restarted
                self.sock.send(line.encode("utf-8", "replace"))
            except OSError:
                pass

    def reopen(self):
        pass

    def close(self):
        self.sock.close()


def timestamped(level, message):
    now = time.time()
    return "%s,%03d %s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                                 int(now * 1000) % 1000, LEVEL_NAMES[level], message)


class Log:
    """What sertcp calls a logger: debug/info/warning/error/log(level, ...)
    with %-style arguments, like logging.Logger; one sink at a time."""

    def __init__(self, sink, level=INFO):
        self.sink, self.level = sink, level

    def setLevel(self, name):
        self.level = name if isinstance(name, int) else LEVEL_BY_NAME[name.upper()]

    def isEnabledFor(self, level):
        return level >= self.level

    def log(self, level, message, *args):
        if level < self.level:
            return
        if args:
            try:
                message = message % args
            except (TypeError, ValueError, KeyError):
                message = "%s %r" % (message, args)
        try:
            self.sink.emit(level, message)
        except (OSError, ValueError):
            pass  # a full disk must not stop the bridge

    def debug(self, message, *args):
        self.log(DEBUG, message, *args)

    def info(self, message, *args):
        self.log(INFO, message, *args)

    def warning(self, message, *args):
        self.log(WARNING, message, *args)

    def error(self, message, *args):
        self.log(ERROR, message, *args)


LEVEL_BY_NAME = {name: level for level, name in LEVEL_NAMES.items()}


def open_log_handler(global_values):
    """A sink for `log`: stderr, syslog or a file (raises OSError when the
    file cannot be opened)."""
    target = global_values["log"]
    if target == "stderr":
        return StreamSink(sys.stderr)
    if target == "syslog":
        return SyslogSink()
    return FileSink(target, global_values["log_max_size"])


def use_log_handler(logger, handler):
    """Make `handler` the logger's sink, closing the one it replaces."""
    old, logger.sink = logger.sink, handler
    old.close()


def setup_logging(global_values):
    logger = Log(open_log_handler(global_values))
    logger.setLevel(global_values["log_level"])
    global _log
    _log = logger
    return logger


def reopen_log_file(logger):
    """After logrotate moved the file: SIGHUP makes a file sink start anew."""
    try:
        logger.sink.reopen()
    except OSError as e:
        logger.error("log: cannot reopen: %s", describe_error(e))


# How a service starts sertcp: imported, so that Python loads the bytecode
# cached in __pycache__.  Not `python3 -m sertcp`, whose runpy imports
# importlib.util, contextlib and collections: 0.25 MiB more.
SERVICE_LAUNCH = "import sys, %s; sys.exit(%s.main())"


def module_command(args):
    """How a service should start sertcp: `python3 -c SERVICE_LAUNCH` with
    the file's directory on PYTHONPATH, so that Python loads the bytecode
    it cached in __pycache__ instead of compiling this whole file at every
    start (the script form costs about 60 ms and 13 MiB more).  Returns
    (that directory, argv); (None, script argv) if the file's name cannot
    be imported as a module."""
    path = os.path.abspath(__file__)
    home, name = os.path.split(path)
    module, ext = os.path.splitext(name)
    if ext != ".py" or not module.isidentifier():
        return None, [os.path.abspath(sys.executable), path] + list(args)
    return home, [os.path.abspath(sys.executable), "-c", SERVICE_LAUNCH % (module, module)] + list(args)


CRON_LOG, CRON_LOG_MAX_SIZE = "/tmp/sertcp.log", "256k"   # a router's /tmp is RAM


def service_text(kind, argv, global_values=None):
    """A unit, init script or crontab line starting this same command line
    with absolute paths (and without --print-service).  `global_values`
    (the configuration's) tells whether the cron line must name a log."""
    args = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--print-service":
            skip = True
            continue
        if arg.startswith("--print-service="):
            continue
        args.append(arg)
    # make file arguments absolute so the service finds them from /
    path_flags = {"-c", "--config", "--virtual", "--pidfile", "--log", "--trace", "--password-file",
                  "--tls-cert", "--tls-key", "--tls-ca"}
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] in path_flags and args[i] not in ("stderr", "syslog"):
            args[i] = os.path.abspath(arg)
        elif not arg.startswith("-") and (i == 0 or args[i - 1] not in FLAG_TO_KEY and args[i - 1] not in path_flags) \
                and os.path.exists(arg):
            args[i] = os.path.abspath(arg)
    import shlex
    home, command = module_command(args)
    line = " ".join(shlex.quote(a) for a in command)
    env = "PYTHONPATH=%s" % home if home else ""
    prefix = shlex.quote(env) + " " if home else ""    # for sh and cron
    if kind == "systemd":
        return ("[Unit]\nDescription=sertcp serial device server\nAfter=network.target\n\n"
                "[Service]\nType=simple\n%sExecStart=%s\nExecReload=/bin/kill -HUP $MAINPID\n"
                "Restart=always\nRestartSec=2\n\n[Install]\nWantedBy=multi-user.target\n"
                % ("Environment=%s\n" % shlex.quote(env) if home else "",
                   " ".join(shlex.quote(a) for a in command)))
    if kind == "openwrt":
        params = "\n".join("\tprocd_append_param command %s" % shlex.quote(a) for a in command[1:])
        return ("#!/bin/sh /etc/rc.common\n# sertcp serial device server (procd)\n"
                "USE_PROCD=1\nSTART=95\nSTOP=10\n\nstart_service() {\n%s"
                "\tprocd_open_instance\n\tprocd_set_param command %s\n%s\n%s"
                "\tprocd_set_param respawn\n\tprocd_set_param stderr 1\n\tprocd_close_instance\n}\n\n"
                "reload_service() {\n\tprocd_send_signal sertcp\n}\n"
                % (bytecode_step(command[0]) if home else "", shlex.quote(command[0]), params,
                   "\tprocd_set_param env %s\n" % shlex.quote(env) if home else ""))
    if kind == "sysv":
        return ("#!/bin/sh\n### BEGIN INIT INFO\n# Provides:          sertcp\n"
                "# Required-Start:    $network $remote_fs\n# Required-Stop:     $network $remote_fs\n"
                "# Default-Start:     2 3 4 5\n# Default-Stop:      0 1 6\n"
                "# Short-Description: sertcp serial device server\n### END INIT INFO\n\n"
                "PIDFILE=/run/sertcp.pid\n\n"
                "case \"$1\" in\n"
                "  start)\n"
                "    if [ -f \"$PIDFILE\" ] && kill -0 \"$(cat \"$PIDFILE\")\" 2>/dev/null; then echo 'sertcp is running'; exit 0; fi\n"
                "    %s%s >>/var/log/sertcp.log 2>&1 &\n"
                "    echo $! >\"$PIDFILE\"\n    ;;\n"
                "  stop)\n"
                "    [ -f \"$PIDFILE\" ] && kill \"$(cat \"$PIDFILE\")\" && rm -f \"$PIDFILE\"\n    ;;\n"
                "  reload)\n    [ -f \"$PIDFILE\" ] && kill -HUP \"$(cat \"$PIDFILE\")\"\n    ;;\n"
                "  restart)\n    \"$0\" stop; sleep 1; \"$0\" start\n    ;;\n"
                "  status)\n"
                "    if [ -f \"$PIDFILE\" ] && kill -0 \"$(cat \"$PIDFILE\")\" 2>/dev/null; then echo running; else echo stopped; exit 3; fi\n    ;;\n"
                "  *)\n    echo \"usage: $0 {start|stop|reload|restart|status}\"; exit 2\n    ;;\n"
                "esac\n" % (prefix, line))
    if kind == "cron":
        # every minute: start it unless it runs (flock holds while it lives).
        # The log is a file of bounded size, and what the start itself says
        # (a configuration error, a crash) is in sertcp.out, which only a
        # new start truncates.
        if global_values is None or global_values["log"] == "stderr":
            line += " --log %s --log-max-size %s" % (CRON_LOG, CRON_LOG_MAX_SIZE)
        run = shlex.quote('exec "$0" "$@" >%s 2>&1' % (os.path.splitext(CRON_LOG)[0] + ".out"))
        return "* * * * * %sflock -n /tmp/sertcp.cron.lock sh -c %s %s\n" % (prefix, run, line)
    raise ValueError(kind)


SERVICE_KINDS = ("systemd", "openwrt", "sysv", "cron")


def bytecode_step(python):
    """Shell lines that compile this file to the bytecode `python -m`
    loads, unless it is newer than the file: OpenWrt's python3 never writes
    __pycache__ itself (its patch 004), so without this every start
    compiles the whole file.  py_compile needs nothing beyond python3-light
    (compileall needs python3-urllib on 3.9-3.12)."""
    import importlib.util
    import shlex
    source = os.path.abspath(__file__)
    cached = importlib.util.cache_from_source(source)
    return ("\t# bytecode for python3 -m (OpenWrt's python3 does not write it): once, and after an update\n"
            "\t[ %s -nt %s ] || %s -m py_compile %s\n"
            % tuple(shlex.quote(x) for x in (cached, source, python, source)))


def drop_privileges(user, log):
    """After opening and binding: become `user`, keeping its supplementary
    groups (dialout) so that unplugged devices can be reopened."""
    import pwd
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RuntimeError("user: no such user %r" % user)
    if os.getuid() == entry.pw_uid:
        return
    try:
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as e:
        raise RuntimeError("user: cannot become %s: %s" % (user, describe_error(e)))
    log.info("running as user %s (uid %d, groups %s)", user, entry.pw_uid,
             ",".join(str(g) for g in os.getgroups()))


# Run by /bin/sh, which stays root while sertcp drops to `user`: it waits
# for the end of the pipe it reads (sertcp's exit, however it ends), then
# removes the pidfile if it still holds sertcp's pid and each virtual
# port's symlink if it still points to sertcp's pty: in a root-owned
# directory (/run, /dev) sertcp itself may no longer remove them.
CLEANUP_SCRIPT = """trap '' HUP INT TERM
read -r _
pid=$1 pidfile=$2
shift 2
[ -n "$pidfile" ] && [ "$(cat "$pidfile" 2>/dev/null)" = "$pid" ] && rm -f "$pidfile"
while [ $# -ge 2 ]; do
    [ "$(readlink "$1")" = "$2" ] && rm -f "$1"
    shift 2
done
"""


def start_cleanup_after_exit(server):
    """Before dropping privileges: start CLEANUP_SCRIPT for the pidfile and
    the virtual ports' symlinks.  Returns its pid, or None if it could not
    start (logged: the files then stay behind, as they would have)."""
    links = []
    for port in server.ports:
        device = port.device
        if isinstance(device, VirtualDevice) and device.slave_name:
            links += [os.path.abspath(port.config.virtual), device.slave_name]
    if not server.pidfile and not links:
        return None
    read_end, write_end = os.pipe()      # the write end stays open, unused, until we exit
    try:
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", CLEANUP_SCRIPT, "sertcp-cleanup", str(os.getpid()),
                                         os.path.abspath(server.pidfile) if server.pidfile else ""] + links,
                             os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0)])
    except OSError as e:
        os.close(write_end)
        server.log.warning("user: cannot start /bin/sh to remove the pidfile and symlinks at exit: %s",
                           describe_error(e))
        return None
    finally:
        os.close(read_end)
    server.cleanup_pipe = write_end
    return pid


def raise_fd_limit(log):
    """Thousands of clients need descriptors: soft limit up to the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("descriptor limit raised from %d to %d", soft, hard)
    except (ImportError, ValueError, OSError):
        pass


class Server:
    """All ports on one reactor, plus reload, status and shutdown."""

    def __init__(self, config, log, reload_config=None):
        self.config = config
        self.log = log
        self.reactor = Reactor()
        self.reactor.on_error = self.internal_error
        self.ports = []
        self.gates = []
        self.status = None
        self.stop_requested = None
        self.signals_seen = deque()
        self.reload_config = reload_config
        self.started = time.monotonic()
        self.pidfile = None         # the path written, removed at exit
        self.cleanup_pipe = None    # with user: held until exit by start_cleanup_after_exit
        self.mdns = None            # the MdnsSocket, while a port sets mdns

    def internal_error(self, where, exc):
        """A bug met while serving `where` (contained by the reactor): the
        traceback for the first few, one line each after that."""
        what = type(where).__name__ if where is not None else "a callback"
        if self.reactor.errors <= INTERNAL_ERROR_TRACEBACKS:
            import traceback
            self.log.error("internal error in %s, which is closed (please report it):\n%s", what,
                           "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        else:
            self.log.error("internal error in %s, which is closed: %s: %s", what, type(exc).__name__, exc)

    def start(self):
        """Bind every listen address first (a port that cannot listen is a
        fatal error before anything is opened, unless the address is not
        there yet or in use: that is retried), then open and dial."""
        self.peer_log = PeerLog(self.log, self.reactor)
        self.ports = [Port(pc, self.reactor, self.log, self.peer_log) for pc in self.config.ports]
        try:
            self.gates = self._bind(self.ports, {})
            if self.config.globals["status"] is not None:
                # an address not there yet is retried as a port's listen is
                self.status = StatusEndpoint(self, self.config.globals["status"], PORT_SCHEMA["reopen_interval"].default)
        except OSError as e:
            for gate in self.gates:
                gate.close()
            raise RuntimeError(str(e))
        for port in self.ports:
            port.start()
        self.update_mdns()

    def update_mdns(self):
        """Announce the ports that set mdns on the addresses their
        listeners are bound to; withdraw (goodbye, TTL 0) the ones gone
        or changed, and close the socket when no port is left to announce."""
        services, host = {}, None
        for gate in self.gates:
            bound = [s.sock.getsockname() for s in gate.listener.sockets]
            for port in gate.ports:
                if port.config.mdns and bound:
                    host = host or mdns_host_label()
                    services[port.name] = mdns_service(port.config, bound, host)
        if self.mdns is None and services:
            try:
                self.mdns = MdnsSocket(self.reactor, self.log)
            except OSError as e:
                self.log.error("mdns: cannot use UDP port %d: %s; no port is announced", MDNS_PORT, describe_error(e))
                return
        if self.mdns is not None:
            self.mdns.update(services)
            if not services:
                self.mdns.close()
                self.mdns = None

    def _bind(self, ports, keep):
        """Gates for ports grouped by listen address; `keep` maps an address
        to a gate that may stay because its ports did not change."""
        by_address = {}
        for port in ports:
            if port.config.listen is not None:
                by_address.setdefault(port.config.listen, []).append(port)
        gates = []
        for address, group in by_address.items():
            old = keep.get(address)
            if old is not None and [p for p in old.ports] == group:
                gates.append(old)
                continue
            if old is not None:
                old.close()
            try:
                gates.append(Gate(self.reactor, address, group, self.log, self.peer_log))
            except OSError as e:
                for gate in gates:
                    if gate not in keep.values():
                        gate.close()
                raise OSError(e.errno, "[%s] cannot listen on %s: %s" % (
                    ", ".join(p.name for p in group), show_hostport(address), describe_error(e)))
        return gates

    def write_pidfile(self, path):
        """Write our pid to `path` (raises RuntimeError) and remember it."""
        try:
            with open(path, "w") as f:
                f.write("%d\n" % os.getpid())
        except OSError as e:
            raise RuntimeError("pidfile %s: %s" % (path, describe_error(e)))
        self.pidfile = path

    def remove_pidfile(self):
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM) and self.cleanup_pipe is not None:
                    self.log.debug("pidfile %s is removed by root's helper at exit", self.pidfile)
                elif e.errno != errno.ENOENT:
                    self.log.warning("pidfile %s not removed: %s", self.pidfile, describe_error(e))
            self.pidfile = None

    def apply_globals(self, new):
        """At SIGHUP, before any port changes: take the new `log`,
        `pidfile` and `status` (log_level is set with the ports).  Returns
        None, or why the reload must be refused; then nothing changed.
        Every step that can fail is done first and undone if a later one
        fails."""
        old = self.config.globals
        if new["user"] != old["user"]:
            return ("user: cannot change from %s to %s while running (privileges are dropped once, at start); "
                    "restart sertcp" % (old["user"] or "(none)", new["user"] or "(none)"))
        handler = None
        if new["log"] != old["log"] or new["log_max_size"] != old["log_max_size"]:
            try:
                handler = open_log_handler(new)
            except OSError as e:
                return "log: cannot open %s: %s" % (new["log"], describe_error(e))
        wrote_pidfile = new["pidfile"] is not None and new["pidfile"] != old["pidfile"]
        if wrote_pidfile:
            previous = self.pidfile
            try:
                self.write_pidfile(new["pidfile"])
            except RuntimeError as e:
                if handler is not None:
                    handler.close()
                return str(e)
            self.pidfile = previous
        status = self.status
        if new["status"] != old["status"]:
            try:
                status = self._rebind_status(new["status"])
            except OSError as e:
                if handler is not None:
                    handler.close()
                if wrote_pidfile:
                    try:
                        os.unlink(new["pidfile"])
                    except OSError:
                        pass
                return "status: cannot listen on %s: %s" % (show_hostport(new["status"]), describe_error(e))
        # nothing can fail from here on
        if handler is not None:
            self.log.info("reload: log moves to %s", new["log"])
            use_log_handler(self.log, handler)
            self.log.info("reload: log continues here from %s", old["log"])
        if new["pidfile"] != old["pidfile"]:
            self.remove_pidfile()
            self.pidfile = new["pidfile"]
            if new["pidfile"]:
                self.log.info("reload: pidfile now %s", new["pidfile"])
        if status is not self.status:
            if self.status is not None:
                self.status.close()
                self.log.info("reload: status endpoint on %s closed", show_hostport(old["status"]))
            self.status = status
        return None

    def _rebind_status(self, address):
        """A StatusEndpoint on `address` (None for none), bound while the
        old one still serves; if the old one holds the address (a port
        moving from 127.0.0.1:N to N), it is closed first and brought
        back should the new one fail.  Raises OSError."""
        if address is None:
            return None
        try:
            return StatusEndpoint(self, address)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or self.status is None:
                raise
        old_address = self.config.globals["status"]
        self.status.close()
        try:
            return StatusEndpoint(self, address)
        except OSError:
            try:
                self.status = StatusEndpoint(self, old_address)
            except OSError as e:
                self.log.error("status endpoint on %s lost: %s", show_hostport(old_address), describe_error(e))
                self.status = None
            raise

    def on_signal(self, signum, frame):
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_requested = signum
        else:
            self.signals_seen.append(signum)
        self.reactor.interrupt()

    def install_signals(self):
        """Before anything is opened, so that a signal during start-up is
        queued for the loop instead of killing the process."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self):
        while self.stop_requested is None:
            self.reactor.run()
            while self.signals_seen and self.stop_requested is None:
                signum = self.signals_seen.popleft()
                if signum == signal.SIGHUP:
                    self.reload()
                elif signum == signal.SIGUSR1:
                    import json
                    self.log.info("status %s", json.dumps(server_status(self)))
        self.shutdown()

    def reload(self, why="SIGHUP received"):
        """SIGHUP (or POST /reload): re-read the configuration; unchanged
        ports keep their device and connections, changed ones restart,
        removed ones close, new ones start; a disabled port stays disabled
        (with its new configuration, if that changed).  An invalid file
        changes nothing.  Returns what happened, for the control API."""
        reopen_log_file(self.log)
        for port in self.ports:
            if port.trace:
                port.trace.reopen()     # logrotate moved the trace file too
        self.log.info("%s: reloading configuration", why)
        if self.reload_config is None:
            return {"reloaded": False, "errors": ["no configuration to reload"]}
        try:
            new = self.reload_config()
        except ConfigErrors as e:
            for error in e.errors:
                self.log.error("reload refused: %s", error)
            self.log.error("reload refused: %d error%s; the running configuration stays",
                           len(e.errors), "" if len(e.errors) == 1 else "s")
            return {"reloaded": False, "errors": [str(error) for error in e.errors]}
        refused = self.apply_globals(new.globals)
        if refused:
            self.log.error("reload refused: %s; the running configuration stays", refused)
            return {"reloaded": False, "errors": [refused]}
        old_by_name = {p.name: p for p in self.ports}
        kept, restarted, started, stopped = [], [], [], []
        ports = []
        for pc in new.ports:
            old = old_by_name.pop(pc.name, None)
            if old is not None and old.config.same_as(pc):
                ports.append(old)
                kept.append(old.name)
                continue
            if old is not None:
                old.stop("configuration changed")
                restarted.append(pc.name)
            else:
                started.append(pc.name)
            ports.append(Port(pc, self.reactor, self.log, self.peer_log))
            if old is not None and old.disabled:
                ports[-1].stop("disabled")  # the new configuration waits for enable
                ports[-1].disabled = True
        for old in old_by_name.values():
            old.stop("port removed from the configuration")
            stopped.append(old.name)
        try:
            self._rebind_gates(ports)
        except OSError as e:
            self.log.error("reload: %s", e)
        self.ports = ports
        for port in ports:
            if (port.name in started or port.name in restarted) and not port.disabled:
                port.start()
        if new.globals["log_level"] != self.config.globals["log_level"]:
            self.log.setLevel(new.globals["log_level"].upper())
        if (new.control_token is None) != (self.config.control_token is None):
            self.log.info("reload: control API %s", "off" if new.control_token is None else "on")
        self.config = new
        self.update_mdns()
        disabled = [p.name for p in ports if p.disabled]
        self.log.info("reloaded: kept %s; restarted %s; started %s; stopped %s%s",
                      *(", ".join(names) or "none" for names in (kept, restarted, started, stopped)),
                      "; still disabled: %s" % ", ".join(disabled) if disabled else "")
        return {"reloaded": True, "kept": kept, "restarted": restarted, "started": started, "stopped": stopped,
                "disabled": disabled}

    def _rebind_gates(self, ports):
        """Gates for the enabled ones of `ports`: a gate whose ports all
        stay (and stay enabled) keeps its sockets; the others close and
        are bound again for the ports left.  Raises OSError (a listen
        address taken meanwhile); self.gates then holds what listens."""
        enabled = [p for p in ports if not p.disabled]
        keep = {g.listener.address: g for g in self.gates if all(p in enabled for p in g.ports)}
        for gate in self.gates:
            if gate not in keep.values():
                gate.close()
        self.gates = list(keep.values())
        self.gates = self._bind(enabled, keep)

    # -- the control API's enable and disable --

    def disable_port(self, port, why):
        """Stop the port (clients, dialer, UDP, device) and close its
        listener (one it shares is bound again for the other ports).  It
        stays in /status, disabled, until enable_port(); a SIGHUP keeps it
        disabled; a restart of sertcp forgets it."""
        self.log.info("[%s] %s", port.name, why)
        port.stop(why)
        port.disabled = True
        try:
            self._rebind_gates(self.ports)
        except OSError as e:
            self.log.error("%s", e)
        self.update_mdns()              # withdrawn, as its listener is closed

    def enable_port(self, port, why):
        """A fresh Port from the same configuration in place of the
        disabled one (its counters carried on), listening again.  Returns
        None, or why it cannot be (its address is taken now): then it
        stays disabled."""
        fresh = Port(port.config, self.reactor, self.log, self.peer_log)
        fresh.counters.update(port.counters)
        ports = [fresh if p is port else p for p in self.ports]
        try:
            self._rebind_gates(ports)
        except OSError as e:
            fresh.stop("not enabled")
            try:
                self._rebind_gates(self.ports)
            except OSError:
                pass
            self.log.error("[%s] cannot be enabled: %s", port.name, e)
            return str(e)
        self.ports = ports
        self.log.info("[%s] %s", port.name, why)
        fresh.start()
        self.update_mdns()
        return None

    def shutdown(self):
        name = "SIGTERM" if self.stop_requested == signal.SIGTERM else "SIGINT"
        self.log.info("%s received: stopping", name)
        if self.mdns is not None:
            self.mdns.close()       # goodbye packets first, while the ports still serve
            self.mdns = None
        for gate in self.gates:
            gate.close()
        if self.status:
            self.status.close()
        for port in self.ports:
            for conn in port.clients:
                conn.pause_reading(True)
        # write out what is queued for the devices, bounded in time
        deadline = time.monotonic() + SHUTDOWN_DRAIN
        while time.monotonic() < deadline and any(p.pending_to_device() for p in self.ports):
            self.reactor.run_once(max_wait=0.05)
        for port in self.ports:
            left = port.pending_to_device()
            if left:
                self.log.warning("[%s] %d bytes for the device not written at shutdown", port.name, left)
            port.stop("shutdown")
        self.log.info("stopped")


def device_notes(config):
    """--check's word on each port's device as it is now: what a usb:
    spec resolves to, and a path that is no tty (its serial settings do
    not apply)."""
    lines = []
    for port in config.ports:
        device = port.values["device"]
        if is_usb_spec(device):
            try:
                path, adapter = resolve_usb_device(device)
                lines.append("# [%s] %s resolves now to %s: %s" % (port.name, device, path, describe_usb(adapter)))
            except OSError as e:
                lines.append("# [%s] %s resolves to nothing now: %s" % (port.name, device, describe_error(e)))
        elif is_stream_device(device):
            lines.append("# [%s] %s is not a tty: served as a byte stream; baudrate, bytesize, parity, "
                         "stopbits, flow and rs485 do not apply" % (port.name, device))
    return "\n".join(lines) + "\n" if lines else ""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, port_flags, global_flags, device = parse_command_line(argv)
    except ConfigError as e:
        print("%s: %s" % (PROGRAM, e), file=sys.stderr)
        return EXIT_USAGE
    if opts["help"]:
        print(usage_text())
        return EXIT_OK
    if opts["version"]:
        print("%s %s" % (PROGRAM, __version__))
        return EXIT_OK
    if opts["print_example"]:
        sys.stdout.write(example_ini())
        return EXIT_OK
    if opts["print_service"] is not None and opts["print_service"] not in SERVICE_KINDS:
        print("%s: --print-service: expected one of %s" % (PROGRAM, ", ".join(SERVICE_KINDS)), file=sys.stderr)
        return EXIT_USAGE

    def load():
        return build_config(opts["config"], port_flags, global_flags, device)
    try:
        config = load()
    except ConfigErrors as e:
        for error in e.errors:
            print("%s: error: %s" % (PROGRAM, error), file=sys.stderr)
        print("%s: %d configuration error%s" % (PROGRAM, len(e.errors), "" if len(e.errors) == 1 else "s"),
              file=sys.stderr)
        return EXIT_USAGE
    if opts["check"]:
        sys.stdout.write(format_config(config))
        sys.stdout.write(device_notes(config))
        return EXIT_OK
    if opts["print_service"] is not None:
        sys.stdout.write(service_text(opts["print_service"], argv, config.globals))
        return EXIT_OK
    try:
        log = setup_logging(config.globals)
    except OSError as e:
        print("%s: error: log: cannot open %s: %s" % (PROGRAM, config.globals["log"], describe_error(e)),
              file=sys.stderr)
        return EXIT_USAGE
    raise_fd_limit(log)
    server = Server(config, log, load)
    server.install_signals()
    try:
        server.start()
        if config.globals["pidfile"]:
            server.write_pidfile(config.globals["pidfile"])
        if config.globals["user"]:
            if os.geteuid() == 0:
                start_cleanup_after_exit(server)
            drop_privileges(config.globals["user"], log)
    except RuntimeError as e:
        log.error("%s", e)
        for port in server.ports:
            port.stop("fatal error")
        server.remove_pidfile()
        return EXIT_FATAL
    log.info("%s %s started with %d port%s", PROGRAM, __version__, len(server.ports),
             "" if len(server.ports) == 1 else "s")
    try:
        server.run()
    finally:
        server.remove_pidfile()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
