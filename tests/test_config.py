"""Configuration: the INI file, the flags, --check and the exit codes.

--check parses and validates without opening or binding anything, so these
tests run sertcp to completion and read what it printed."""
import configparser
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, run_sertcp

sys.path.insert(0, str(ROOT))
import sertcp as sertcp_module  # noqa: E402  (the module under test, not the fixture)

# The key names SPEC.md fixes; the schema must hold exactly these.
SPEC_PORT_KEYS = """
    device virtual baudrate bytesize parity stopbits flow dtr_active rts_active
    dtr_idle rts_idle open_on_demand reopen_interval exclusive tx_pause_ms
    strict_baud listen_on_open listen connect event_bytes timeout reconnect_min
    reconnect_max protocol rfc2217_role remote_control max_clients backlog
    when_full send_to receive_from client_buffer slow_client buffer buffer_drop
    nodelay keepalive pack_size pack_delimiter pack_trailing pack_strip
    pack_idle_ms pack_max_ms banner connect_id identity identity_timeout allow
    password password_file tls_cert tls_key tls_ca tls tls_server_name trace
    trace_format""".split()
SPEC_PORT_KEYS += "modbus_timeout_ms modbus_retries modbus_frame_gap_ms".split()
SPEC_PORT_KEYS += "udp_listen udp_send_to udp_reply udp_multicast_ttl".split()
# SPEC "Additions (second round)": device side of real installations
SPEC_PORT_KEYS += """
    rs485 rs485_rts rs485_delay_before_ms rs485_delay_after_ms rs485_rx_during_tx
    rs485_terminate tx_char_delay_ms break_on_connect connect_on_line
    disconnect_on_line device_connect_msg device_disconnect_msg
    device_unreachable_msg heartbeat_interval heartbeat_data""".split()
SPEC_PORT_KEYS += "modem modem_phonebook modem_init".split()     # modem emulation
# SPEC "Additions (second round)": operating it
SPEC_PORT_KEYS += "monitor monitor_format trace_max_size".split()
# SPEC "Operating it": DNS-SD
SPEC_PORT_KEYS += "mdns mdns_name mdns_type mdns_txt".split()
SPEC_GLOBAL_KEYS = "log_level log pidfile status user".split()
SPEC_GLOBAL_KEYS += ["log_max_size"]  # bounds the log on a router's RAM-backed /tmp
SPEC_GLOBAL_KEYS += ["status_allow", "control_token", "control_token_file"]  # SPEC "Operating it"


def write_ini(tmp_path, text, name="sertcp.ini"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def check(*args, ini=None):
    """Run --check (with -c ini if given) as its own process; returns the
    CompletedProcess."""
    argv = ["--check"]
    if ini is not None:
        argv += ["-c", ini]
    return run_sertcp(argv + list(args))


def quick_check(*args, ini=None):
    """The same through sertcp.main() in this process: for the long tables
    of values, where starting a process per case would dominate the run."""
    argv = ["--check"] + (["-c", str(ini)] if ini is not None else []) + [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sertcp_module.main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def effective(result):
    """--check output -> {section: {key: value}}."""
    assert result.returncode == 0, result.stderr
    parser = configparser.RawConfigParser(default_section="\0none")
    parser.optionxform = str
    parser.read_string(result.stdout)
    return {name: dict(parser[name]) for name in parser.sections()}


def errors_of(result):
    assert result.returncode == 2, "expected exit 2, got %s:\n%s%s" % (
        result.returncode, result.stdout, result.stderr)
    return result.stderr


# --- --check: the effective configuration ---------------------------------

def test_check_prints_every_key_of_every_port_with_defaults_filled_in():
    config = effective(check("--listen", "127.0.0.1:7000", "/dev/ttyUSB0"))
    assert list(config) == ["global", "cli"]
    assert sorted(config["global"]) == sorted(SPEC_GLOBAL_KEYS)
    assert sorted(config["cli"]) == sorted(SPEC_PORT_KEYS)
    cli = config["cli"]
    assert cli["device"] == "/dev/ttyUSB0"
    assert cli["listen"] == "127.0.0.1:7000"
    defaults = {"baudrate": "9600", "bytesize": "8", "parity": "none", "stopbits": "1",
                "flow": "none", "dtr_active": "on", "rts_active": "on", "dtr_idle": "keep",
                "rts_idle": "keep", "open_on_demand": "no", "reopen_interval": "2",
                "exclusive": "yes", "max_clients": "1", "backlog": "1024", "when_full": "reject",
                "send_to": "all", "receive_from": "all", "client_buffer": "262144",
                "slow_client": "disconnect", "buffer": "0", "buffer_drop": "newest",
                "nodelay": "yes", "keepalive": "60,10,3", "timeout": "0", "pack_size": "0",
                "pack_trailing": "0", "pack_strip": "no", "pack_idle_ms": "0", "pack_max_ms": "0",
                "protocol": "raw", "trace_format": "hex", "identity_timeout": "10"}
    assert {k: cli[k] for k in defaults} == defaults
    assert config["global"]["log_level"] == "info"
    assert config["global"]["log"] == "stderr"


def test_check_opens_no_device_and_binds_no_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        result = check("--listen", "127.0.0.1:%d" % busy, str(tmp_path / "no-such-tty"))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "no-such-tty").exists()


def test_every_key_is_also_a_flag():
    help_text = run_sertcp(["-h"]).stdout
    for key in SPEC_PORT_KEYS + SPEC_GLOBAL_KEYS:
        assert "--" + key.replace("_", "-") in help_text, key
    cli = effective(check("--listen=127.0.0.1:7000", "--baudrate", "115200", "--pack-idle-ms=50",
                          "--nodelay", "no", "--log-level", "debug", "/dev/ttyUSB0"))
    assert cli["cli"]["baudrate"] == "115200"
    assert cli["cli"]["pack_idle_ms"] == "50"
    assert cli["cli"]["nodelay"] == "no"
    assert cli["global"]["log_level"] == "debug"


def test_version_and_help_exit_0():
    version = run_sertcp(["--version"])
    assert version.returncode == 0
    assert version.stdout.startswith("sertcp ")
    usage = run_sertcp(["--help"])
    assert usage.returncode == 0
    assert "usage:" in usage.stdout


# --- the INI file ----------------------------------------------------------

def test_file_ports_plus_the_command_line_port_cli(tmp_path):
    ini = write_ini(tmp_path, """
        [global]
        log_level = warning

        [plc]
        device = /dev/ttyUSB0
        listen = 127.0.0.1:7001
    """)
    config = effective(check("--listen", "127.0.0.1:7002", "--baudrate", "57600",
                             "/dev/ttyUSB1", ini=ini))
    assert list(config) == ["global", "plc", "cli"]
    assert config["global"]["log_level"] == "warning"
    assert config["plc"]["device"] == "/dev/ttyUSB0"
    assert config["plc"]["listen"] == "127.0.0.1:7001"
    assert config["plc"]["baudrate"] == "9600"  # the flags describe the cli port only
    assert config["cli"]["device"] == "/dev/ttyUSB1"
    assert config["cli"]["listen"] == "127.0.0.1:7002"
    assert config["cli"]["baudrate"] == "57600"


def test_a_file_section_named_cli_clashes_with_the_command_line_port(tmp_path):
    ini = write_ini(tmp_path, """
        [cli]
        device = /dev/ttyUSB0
        listen = 7001
    """)
    stderr = errors_of(check("--listen", "7002", "/dev/ttyUSB1", ini=ini))
    assert str(ini) in stderr and "[cli]" in stderr
    assert effective(check(ini=ini))["cli"]["device"] == "/dev/ttyUSB0"  # alone it is fine


def test_global_flags_override_the_file(tmp_path):
    ini = write_ini(tmp_path, """
        [global]
        log_level = warning
        [plc]
        device = /dev/ttyUSB0
        listen = 7001
    """)
    config = effective(check("--log-level", "error", ini=ini))
    assert config["global"]["log_level"] == "error"
    assert list(config) == ["global", "plc"]


def test_default_section_applies_to_every_port_and_a_port_may_override_it(tmp_path):
    ini = write_ini(tmp_path, """
        [DEFAULT]
        baudrate = 115200
        max_clients = 4
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        [b]
        device = /dev/ttyUSB1
        listen = 7002
        max_clients = 2
    """)
    config = effective(check(ini=ini))
    assert list(config) == ["global", "a", "b"]
    assert config["a"]["baudrate"] == config["b"]["baudrate"] == "115200"
    assert config["a"]["max_clients"] == "4"
    assert config["b"]["max_clients"] == "2"


def test_comments_and_blank_lines_are_ignored(tmp_path):
    ini = write_ini(tmp_path, """
        # a comment
        ; another comment

        [a]
        # device = /dev/ttyS9
        device = /dev/ttyUSB0
        listen = 7001
    """)
    assert effective(check(ini=ini))["a"]["device"] == "/dev/ttyUSB0"


@pytest.mark.parametrize("text, shown", [
    ("yes", "yes"), ("no", "no"), ("true", "yes"), ("false", "no"),
    ("on", "yes"), ("off", "no"), ("1", "yes"), ("0", "no"), ("YES", "yes"), ("Off", "no"),
])
def test_booleans_accept_yes_no_true_false_on_off_1_0(tmp_path, text, shown):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        nodelay = %s
        pack_strip = %s
        pack_delimiter = \\n
    """ % (text, text))
    port = effective(quick_check(ini=ini))["a"]
    assert port["nodelay"] == shown
    assert port["pack_strip"] == shown


@pytest.mark.parametrize("text, size", [
    ("4096", 4096), ("64k", 65536), ("64K", 65536), ("1m", 1048576), ("2M", 2097152), ("0", 0),
])
def test_sizes_accept_plain_k_and_m(tmp_path, text, size):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        client_buffer = %s
        buffer = %s
    """ % (text, text))
    port = effective(quick_check(ini=ini))["a"]
    assert int(port["client_buffer"]) == size
    assert int(port["buffer"]) == size


@pytest.mark.parametrize("text, shown", [
    (r"\r\n", r"\r\n"),
    (r"\x03", r"\x03"),
    (r"\x00\xff", r"\x00\xff"),
    (r"\t", r"\t"),
    (r"\\", r"\\"),
    ("%", "%"),
    (r"ab\x0D\x0a", r"ab\r\n"),
])
def test_byte_strings_take_c_escapes(tmp_path, text, shown):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        banner = %s
    """ % text)
    assert effective(quick_check(ini=ini))["a"]["banner"] == shown


def test_parity_letters_and_listen_forms(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = [::1]:7001
        parity = E
        [b]
        device = /dev/ttyUSB1
        listen = 7002
        parity = o
    """)
    config = effective(check(ini=ini))
    assert config["a"]["listen"] == "[::1]:7001"
    assert config["a"]["parity"] == "even"
    assert config["b"]["listen"] == "7002"
    assert config["b"]["parity"] == "odd"


def test_example_file_equals_print_example_and_validates():
    example = ROOT / "sertcp.ini.example"
    printed = run_sertcp(["--print-example"])
    assert printed.returncode == 0, printed.stderr
    assert example.exists(), "sertcp.ini.example is missing (python3 sertcp.py --print-example > sertcp.ini.example)"
    assert example.read_text() == printed.stdout
    config = effective(check(ini=example))
    ports = [name for name in config if name != "global"]
    assert ports
    for name in ports:
        assert sorted(config[name]) == sorted(SPEC_PORT_KEYS)
    # every key appears in the example, set or commented out with its default
    for key in SPEC_PORT_KEYS + SPEC_GLOBAL_KEYS:
        assert ("\n%s = " % key in printed.stdout) or ("\n;%s = " % key in printed.stdout), key


# --- errors: exit 2, naming the file, line and key (or the flag) ------------

def test_unknown_key_names_file_line_and_key(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        baud_rate = 9600
    """)
    stderr = errors_of(check(ini=ini))
    assert "%s:4: baud_rate" % ini in stderr
    assert "unknown key" in stderr


def test_unknown_key_in_global_names_file_line_and_key(tmp_path):
    ini = write_ini(tmp_path, """
        [global]
        loglevel = debug
        [a]
        device = /dev/ttyUSB0
        listen = 7001
    """)
    assert "%s:2: loglevel" % ini in errors_of(check(ini=ini))


def test_global_key_in_a_port_section_is_an_error(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        log_level = debug
    """)
    assert "%s:4: log_level" % ini in errors_of(check(ini=ini))


def test_global_key_in_default_section_is_an_error(tmp_path):
    ini = write_ini(tmp_path, """
        [DEFAULT]
        log_level = debug
        [a]
        device = /dev/ttyUSB0
        listen = 7001
    """)
    assert "%s:2: log_level" % ini in errors_of(check(ini=ini))


def test_unknown_section_is_an_error(tmp_path):
    # every section but [global] and [DEFAULT] is a port, so a misspelt
    # [global] is a port that lacks what a port needs
    ini = write_ini(tmp_path, """
        [globl]
        log = stderr
        [a]
        device = /dev/ttyUSB0
        listen = 7001
    """)
    stderr = errors_of(check(ini=ini))
    assert str(ini) in stderr
    assert "[globl]" in stderr


@pytest.mark.parametrize("key, value", [
    ("baudrate", "fast"),
    ("baudrate", "0"),
    ("bytesize", "9"),
    ("parity", "x"),
    ("stopbits", "3"),
    ("flow", "hardware"),
    ("dtr_active", "maybe"),
    ("open_on_demand", "perhaps"),
    ("reopen_interval", "0"),
    ("listen", "70000"),
    ("listen", "::1:7001"),
    ("listen", "localhost:http"),
    ("timeout", "-1"),
    ("max_clients", "0"),
    ("when_full", "evict"),
    ("send_to", "everyone"),
    ("receive_from", "newest"),
    ("client_buffer", "12q"),
    ("client_buffer", "-5"),
    ("slow_client", "ignore"),
    ("buffer_drop", "middle"),
    ("keepalive", "1,2"),
    ("pack_size", "big"),
    ("pack_delimiter", r"\q"),
    ("pack_delimiter", r"\x4"),
    ("pack_delimiter", "abc"),
    ("pack_trailing", "3"),
    ("pack_idle_ms", "0.5"),
    ("banner", r"\xZZ"),
])
def test_bad_value_names_file_line_and_key(tmp_path, key, value):
    lines = ["[a]", "device = /dev/ttyUSB0"]
    if key != "listen":
        lines.append("listen = 7001")
    if key == "pack_trailing":
        lines.append(r"pack_delimiter = \x03")
    lines.append("%s = %s" % (key, value))
    ini = tmp_path / "bad.ini"
    ini.write_text("\n".join(lines) + "\n")
    stderr = errors_of(quick_check(ini=ini))
    assert "%s:%d: %s" % (ini, len(lines), key) in stderr
    if key != "listen":  # a bad listen also leaves the port without listen or connect
        assert "1 configuration error" in stderr


def test_bad_flag_value_names_the_flag():
    stderr = errors_of(check("--listen", "127.0.0.1:7000", "--max-clients", "many", "/dev/ttyUSB0"))
    assert "--max-clients: bad value 'many'" in stderr


def test_unknown_flag_is_a_usage_error():
    result = run_sertcp(["--listen", "7000", "--frobnicate", "/dev/ttyUSB0"])
    assert "--frobnicate" in errors_of(result)


def test_flag_without_its_value_is_a_usage_error():
    stderr = errors_of(run_sertcp(["/dev/ttyUSB0", "--listen"]))
    assert "--listen" in stderr


def test_two_devices_on_the_command_line_is_a_usage_error():
    stderr = errors_of(run_sertcp(["--listen", "7000", "/dev/ttyUSB0", "/dev/ttyUSB1"]))
    assert "/dev/ttyUSB1" in stderr


def test_both_device_and_virtual_is_an_error(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        virtual = /tmp/ttyV0
        listen = 7001
    """)
    stderr = errors_of(check(ini=ini))
    assert "%s:3: virtual" % ini in stderr
    assert "[a]" in stderr
    stderr = errors_of(check("--listen", "7000", "--virtual", "/tmp/ttyV0", "/dev/ttyUSB0"))
    assert "virtual" in stderr


def test_password_longer_than_a_client_may_send_is_an_error(tmp_path):
    """A password no client could ever send (longer than the 256-byte line
    a client may send) is refused, and password_file is read bounded:
    /dev/zero does not hang the start."""
    stderr = errors_of(check("--listen", "7000", "--password", "x" * 257, "/dev/ttyUSB0"))
    assert "password" in stderr and "longer than 256 bytes" in stderr
    long_line = tmp_path / "long"
    long_line.write_bytes(b"z" * 1000 + b"\n")
    stderr = errors_of(check("--listen", "7000", "--password-file", long_line, "/dev/ttyUSB0"))
    assert "--password-file: the first line of %s is longer than 256 bytes" % long_line in stderr
    secret = tmp_path / "secret"
    secret.write_bytes(b"y" * 256 + b"\r\nsecond line\n")
    assert check("--listen", "7000", "--password-file", str(secret), "/dev/ttyUSB0").returncode == 0


def test_a_path_with_a_nul_character_is_an_error_naming_the_key(tmp_path):
    # found by the property test: open() raised ValueError past --check
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        tls_ca = ca\0.pem
    """)
    stderr = errors_of(check(ini=ini))
    assert "%s:4: tls_ca" % ini in stderr and "NUL" in stderr


def test_neither_device_nor_virtual_is_an_error(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        listen = 7001
    """)
    stderr = errors_of(check(ini=ini))
    assert str(ini) in stderr
    assert "[a]" in stderr
    assert "device" in stderr


def test_neither_listen_nor_connect_is_an_error(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
    """)
    stderr = errors_of(check(ini=ini))
    assert str(ini) in stderr
    assert "[a]" in stderr
    assert "listen" in stderr and "connect" in stderr
    assert "listen" in errors_of(check("/dev/ttyUSB0"))


def test_missing_key_error_names_the_section_line(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001

        [b]
        device = /dev/ttyUSB1
    """)
    assert "%s:5:" % ini in errors_of(check(ini=ini))


def test_packing_rules_that_need_a_delimiter(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        pack_trailing = 1
    """)
    assert "%s:4: pack_trailing" % ini in errors_of(check(ini=ini))


def test_one_device_per_port(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        [b]
        device = /dev/ttyUSB0
        listen = 7002
    """)
    assert "%s:5: device" % ini in errors_of(check(ini=ini))


def test_duplicate_key_and_duplicate_section_are_errors(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        listen = 7002
        [a]
        baudrate = 1200
    """)
    stderr = errors_of(check(ini=ini))
    assert "%s:4: listen" % ini in stderr
    assert "%s:5:" % ini in stderr


def test_key_outside_a_section_and_bad_lines_are_errors(tmp_path):
    ini = write_ini(tmp_path, """
        baudrate = 9600
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        this line has no equals sign
        [broken
    """)
    stderr = errors_of(check(ini=ini))
    assert "%s:1:" % ini in stderr
    assert "%s:5:" % ini in stderr
    assert "%s:6:" % ini in stderr


def test_a_file_with_several_errors_lists_all_of_them(tmp_path):
    ini = write_ini(tmp_path, """
        [global]
        log_level = loud
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        bogus = 1
        parity = x
        [b]
        device = /dev/ttyUSB1
        virtual = /tmp/ttyV1
        listen = 7002
        send_to = everyone
    """)
    stderr = errors_of(check(ini=ini))
    for where in ("%s:2: log_level", "%s:6: bogus", "%s:7: parity", "%s:10: virtual", "%s:12: send_to"):
        assert where % ini in stderr, where
    assert "5 configuration errors" in stderr


def test_missing_file_is_an_error(tmp_path):
    stderr = errors_of(check(ini=tmp_path / "absent.ini"))
    assert "absent.ini" in stderr


def test_no_port_at_all_is_an_error():
    errors_of(check())


def test_flags_without_device_or_virtual_are_an_error():
    stderr = errors_of(check("--listen", "7000", "--baudrate", "115200"))
    assert "--listen" in stderr and "DEVICE" in stderr


def test_configuration_error_without_check_exits_2_before_starting():
    result = run_sertcp(["--listen", "127.0.0.1:7000", "--parity", "x", "/dev/ttyUSB0"])
    assert "--parity" in errors_of(result)
    assert "listening" not in result.stderr


def test_a_listen_address_that_cannot_ever_be_bound_is_a_fatal_runtime_error_exit_1(tmp_path):
    # a link-local IPv6 address without its interface: EINVAL, which no
    # wait cures (an address not there yet, or in use, is retried instead:
    # tests/test_monitor.py)
    result = run_sertcp(["--listen", "[fe80::1]:7000", str(tmp_path / "tty")])
    assert result.returncode == 1, result.stderr
    assert "cannot listen on [fe80::1]:7000" in result.stderr


# --- ranges: every number a key takes is bounded at --check ----------------

# Values that used to pass --check and fail later: a time past epoll's
# 24.8 days ended the process with a traceback, a keepalive past what
# Linux takes failed every connection or half set the keepalive.
@pytest.mark.parametrize("key, value, allowed", [
    ("timeout", "3000000", "0-864000"),
    ("identity_timeout", "3000000", "0.01-3600"),
    ("reopen_interval", "3000000", "0.05-864000"),
    ("reconnect_min", "3000000", "0.01-864000"),
    ("reconnect_max", "3000000", "0.01-864000"),
    ("keepalive", "32768,10,3", "1-32767,1-32767,1-127"),
    ("keepalive", "60,32768,3", "1-32767,1-32767,1-127"),
    ("keepalive", "60,10,128", "1-32767,1-32767,1-127"),
    ("keepalive", "99999999999,10,3", "1-32767,1-32767,1-127"),
    ("baudrate", "99999999999", "50-12000000"),
    ("bytesize", "4", "5-8"),
    ("tx_pause_ms", "60001", "0-60000"),
    ("event_bytes", "99999999999", "0-1048576"),
    ("max_clients", "100001", "1-100000"),
    ("backlog", "65536", "1-65535"),
    ("client_buffer", "100g", "0-1g"),
    ("buffer", "100g", "0-1g"),
    ("pack_size", "2m", "0-1m"),
    ("pack_trailing", "3", "0-2"),
    ("pack_idle_ms", "3600001", "0-3600000"),
    ("pack_max_ms", "3600001", "0-3600000"),
])
def test_a_number_out_of_its_range_is_an_error_naming_key_and_range(tmp_path, key, value, allowed):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        connect = 127.0.0.1:7002
        pack_delimiter = \\n
        %s = %s
    """ % (key, value))
    stderr = errors_of(quick_check(ini=ini))
    assert "%s:6: %s: bad value %r" % (ini, key, value) in stderr
    assert allowed in stderr
    assert "1 configuration error" in stderr


def numeric_keys():
    """Every key whose value is a number (or numbers): by its default."""
    return [k for k in sertcp_module.PORT_KEYS + sertcp_module.GLOBAL_KEYS
            if isinstance(k.default, (int, float)) and not isinstance(k.default, bool)
            or k.name == "keepalive"]


def test_every_numeric_key_has_a_range_and_both_ends_are_checked(tmp_path):
    keys = numeric_keys()
    assert {k.name for k in keys} == set("""
        baudrate bytesize reopen_interval tx_pause_ms event_bytes timeout reconnect_min
        reconnect_max max_clients backlog client_buffer buffer keepalive pack_size
        pack_trailing pack_idle_ms pack_max_ms identity_timeout
        tx_char_delay_ms break_on_connect rs485_delay_before_ms rs485_delay_after_ms
        heartbeat_interval log_max_size trace_max_size""".split()
                                          + "modbus_timeout_ms modbus_retries modbus_frame_gap_ms".split()
                                          + ["udp_multicast_ttl"])
    for key in keys:
        assert key.allowed, "%s has no documented range" % key.name
        if key.name == "keepalive":
            continue                     # three numbers: the table above
        low, high = key.allowed.split("-")
        assert key.parse(low) is not None and key.parse(high) is not None, key.name
        above = high[:-1] + str(int(high[-1]) + 1) if high[-1].isdigit() else str(int(high[:-1]) + 1) + high[-1]
        with pytest.raises(sertcp_module.ValueProblem, match="allowed range is " + key.allowed):
            key.parse(above)
        if float(low.rstrip("kmg")) > 0:
            with pytest.raises(sertcp_module.ValueProblem, match=key.allowed):
                key.parse("0")
        # -h shows it too
        assert key.allowed in key.described


def test_the_example_file_and_the_readme_give_every_range():
    example = (ROOT / "sertcp.ini.example").read_text()
    readme = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", readme.split("### Ranges", 1)[1].split("\n#", 1)[0], re.M))
    for key in numeric_keys():
        assert "; allowed: %s\n" % key.allowed in example, key.name
        assert table.get(key.name) == key.allowed, (key.name, table.get(key.name))
    assert set(table) == {k.name for k in numeric_keys()}


def test_the_largest_times_run_without_ending_the_loop(tmp_path):
    """At the top of the range the timers stay within what epoll takes:
    a missing device with reopen_interval 864000 is retried in 10 days,
    and the process keeps serving and stops cleanly."""
    from conftest import Client, Sertcp, free_port
    port = free_port()
    s = Sertcp([tmp_path / "absent-tty", "--listen", "127.0.0.1:%d" % port, "--reopen-interval", "864000",
                "--timeout", "864000", "--reconnect-max", "864000", "--identity-timeout", "3600",
                "--identity", "x"], tmp_path)
    try:
        s.wait_listening(port)
        s.wait_log("absent-tty")
        c = Client(port)
        c.send(b"x\n")
        s.wait_log("connected")
        c.close()
        s.wait_log("disconnected")
    finally:
        assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log()


def test_a_time_past_epoll_range_is_refused_before_starting(tmp_path):
    """It used to start, and end at the first retry of the missing device
    with OverflowError and exit 1."""
    from conftest import free_port
    result = run_sertcp([tmp_path / "absent-tty", "--listen", "127.0.0.1:%d" % free_port(),
                         "--reopen-interval", "3000000"])
    stderr = errors_of(result)
    assert "--reopen-interval: bad value '3000000': allowed range is 0.05-864000" in stderr
    assert "Traceback" not in stderr


def test_a_rule_broken_once_is_reported_once(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        listen = 7001
        listen_on_open = yes
        strict_baud = yes
    """)
    stderr = errors_of(check(ini=ini))
    assert stderr.count("listen_on_open") == 1, stderr
    assert "%s:4: listen_on_open: applies only to virtual ports" % ini in stderr
    assert "%s:5: strict_baud: applies only to virtual ports" % ini in stderr
    assert "2 configuration errors" in stderr


def test_cross_key_rules_keep_their_messages(tmp_path):
    ini = write_ini(tmp_path, """
        [a]
        device = /dev/ttyUSB0
        connect = 127.0.0.1:7001
        reconnect_min = 100.5
        reconnect_max = 10
        identity = a\\nb
        tls_key = /nonexistent/key.pem
        pack_strip = yes
        password = secret
        password_file = /nonexistent/pw
    """)
    stderr = errors_of(check(ini=ini))
    for where, message in [(4, "reconnect_min: is larger than reconnect_max (100.5 > 10)"),
                           (6, "identity: needs listen"),
                           (6, "identity: must not contain CR or LF (they end an id)"),
                           (7, "tls_key: cannot read /nonexistent/key.pem"),
                           (1, "tls_cert: tls_cert and tls_key go together"),
                           (8, "pack_strip: needs pack_delimiter"),
                           (10, "password_file: set password or password_file, not both")]:
        assert "%s:%d: %s" % (ini, where, message) in stderr, message
    assert "secret" not in stderr


# --- files the configuration names: regular files, read bounded ------------

def test_a_fifo_named_as_a_configuration_file_is_an_error_not_a_hang(tmp_path):
    """--check used to wait forever for a writer on the FIFO."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    stderr = errors_of(run_sertcp(["--check", "-c", fifo], timeout=15))
    assert "%s: is a FIFO, not a regular file" % fifo in stderr
    stderr = errors_of(run_sertcp(["--check", "--listen", "7000", "--password-file", fifo, "--tls-cert", fifo,
                                   "--tls-key", fifo, "--tls-ca", fifo, "/dev/ttyUSB0"], timeout=15))
    for flag in ("--password-file", "--tls-cert", "--tls-key", "--tls-ca"):
        assert "%s: %s is a FIFO, not a regular file" % (flag, fifo) in stderr, flag
    assert "4 configuration errors" in stderr


def test_a_device_or_directory_named_as_a_configuration_file_is_an_error(tmp_path):
    """-c /dev/zero used to read until memory ran out (here the address
    space is capped, so that it would fail instead of taking the machine)."""
    import resource
    import subprocess

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    result = subprocess.run([sys.executable, str(ROOT / "sertcp.py"), "--check", "-c", "/dev/zero"],
                            capture_output=True, text=True, timeout=30, preexec_fn=cap_memory)
    assert "/dev/zero: is a character device, not a regular file" in errors_of(result)
    stderr = errors_of(check("--listen", "7000", "--tls-ca", tmp_path, "--password-file", "/dev/null",
                             "/dev/ttyUSB0"))
    assert "--tls-ca: %s is a directory, not a regular file" % tmp_path in stderr
    assert "--password-file: /dev/null is a character device, not a regular file" in stderr


def test_configuration_files_larger_than_their_kind_may_be_are_errors(tmp_path):
    big_ini = tmp_path / "big.ini"
    with open(big_ini, "wb") as f:
        f.write(b"[a]\ndevice = /dev/ttyUSB0\nlisten = 7001\n")
        f.write(b"#" * (5 << 20))
    assert "%s: is larger than 4m" % big_ini in errors_of(check(ini=big_ini))
    big_pem = tmp_path / "big.pem"
    big_pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (2 << 20))
    big_password = tmp_path / "password"
    big_password.write_bytes(b"letmein\n" + b"#" * (100 << 10))
    stderr = errors_of(check("--listen", "7000", "--tls-ca", big_pem, "--password-file", big_password,
                             "/dev/ttyUSB0"))
    assert "--tls-ca: %s is larger than 1m" % big_pem in stderr
    assert "--password-file: %s is larger than 64k" % big_password in stderr
    # at the limits they are read
    fits = tmp_path / "fits.ini"
    fits.write_bytes(b"[a]\ndevice = /dev/ttyUSB0\nlisten = 7001\n#".ljust(4 << 20, b"x"))
    assert effective(check(ini=fits))["a"]["listen"] == "7001"
