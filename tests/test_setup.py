"""The README's set-up lines, run as written on this Debian 12 machine.

Each block marked `<!-- set-up: NAME -->` in the README is taken from there,
not copied here: its install line runs as it stands (without `sudo` as root,
with a throw-away home so that nothing lands in the real one), and its start
line runs with only the virtual port's path and the TCP port swapped for
ones of the test's own.  The start must then bridge bytes both ways.

- debian: Debian's own /usr/bin/python3 (externally managed, PEP 668) with
  Debian's python3-serial, and no pip site on the path.
- pipx and venv: `pyproject.toml` builds, the `sertcp` command exists and
  the module it runs is byte for byte the repository's sertcp.py.
"""
import os
import re
import shutil
import subprocess
import tty

from conftest import ROOT, SERTCP, Client, free_port, need_programs, wait_for

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_ON = {"http_proxy", "https_proxy", "no_proxy", "ssl_cert_file", "requests_ca_bundle"}


def readme_block(name):
    """The shell lines of the README block marked `<!-- set-up: NAME -->`."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- set-up: %s -->\s*```sh\n(.*?)```" % re.escape(name), text, re.S)
    assert m, "README.md has no set-up block %r" % name
    return [line for line in m.group(1).splitlines() if line.strip()]


def as_root(line):
    return line[len("sudo "):] if line.startswith("sudo ") and os.geteuid() == 0 else line


def project_copy(tmp_path):
    """What a clone holds that the install needs, in a directory of its own,
    so that a build leaves nothing behind in the repository."""
    src = tmp_path / "clone"
    src.mkdir()
    for name in ("sertcp.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def run_line(line, cwd, env, timeout=240):
    done = subprocess.run(line, shell=True, cwd=str(cwd), env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert done.returncode == 0, "%r failed (%d):\n%s" % (line, done.returncode,
                                                          done.stdout.decode(errors="replace"))
    return done.stdout.decode(errors="replace")


def bridges(start_line, cwd, env, tmp_path):
    """Start the README's start line on a path and port of our own; check
    that bytes cross both ways, then stop it."""
    link = tmp_path / "ttyV0"
    port = free_port()
    line = start_line.replace("/tmp/ttyV0", str(link)).replace("127.0.0.1:7000", "127.0.0.1:%d" % port)
    assert line != start_line, "the README's start line no longer names /tmp/ttyV0 and port 7000"
    log = open(tmp_path / "start.log", "wb")
    proc = subprocess.Popen("exec " + line, shell=True, cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: link.exists() and b"listening" in (tmp_path / "start.log").read_bytes()
                 or proc.poll() is not None, 20, message="the start line to come up")
        assert proc.poll() is None, (tmp_path / "start.log").read_text()
        fd = os.open(str(link), os.O_RDWR | os.O_NOCTTY)
        c = Client(port)
        try:
            tty.setraw(fd)
            c.send(b"to the device\n")
            got = b""
            while len(got) < 14:
                got += os.read(fd, 64)
            assert got == b"to the device\n"
            os.write(fd, b"to the network\n")
            assert c.recv(15) == b"to the network\n"
        finally:
            c.close()
            os.close(fd)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        log.close()


def clean_env(tmp_path, **extra):
    """A PATH of the system's own (so that `python3` is Debian's, not the
    suite's interpreter), and a home of the test's own."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": SYSTEM_PATH, "HOME": str(home), "LANG": "C.UTF-8"}
    # how this machine reaches the package registries (index, proxy, CA) stays
    for name, value in os.environ.items():
        if name.startswith("PIP_") or name.lower() in PASSED_ON:
            env[name] = value
    env.update(extra)
    return env


def test_debian_python_with_python3_serial(tmp_path):
    assert os.path.exists("/usr/bin/python3") and os.path.exists("/usr/bin/apt"), \
        "this test runs the README's Debian lines: it needs Debian's apt and python3"
    install, start = readme_block("debian")
    env = clean_env(tmp_path, DEBIAN_FRONTEND="noninteractive")
    run_line(as_root(install), tmp_path, env)
    # the python3 of that PATH is Debian's, with Debian's pyserial
    where = run_line("python3 -c 'import serial, sys; print(sys.executable, serial.__file__)'", tmp_path, env)
    exe, module = where.split()
    assert exe == "/usr/bin/python3" and module.startswith("/usr/lib/python3/dist-packages/serial/"), where
    bridges(start, ROOT, env, tmp_path)


def test_pipx_install_gives_a_sertcp_command(tmp_path):
    need_programs("pipx")
    install, start = readme_block("pipx")
    src = project_copy(tmp_path)
    env = clean_env(tmp_path, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    run_line(install, src, env)
    env["PATH"] = str(tmp_path / "bin") + ":" + env["PATH"]
    installed = list((tmp_path / "pipx").glob("venvs/sertcp/lib/python3*/site-packages/sertcp.py"))
    assert len(installed) == 1 and installed[0].read_bytes() == SERTCP.read_bytes()
    assert run_line("sertcp --version", tmp_path, env).startswith("sertcp ")
    bridges(start, tmp_path, env, tmp_path)


def test_venv_install_gives_a_sertcp_command(tmp_path):
    install, start = readme_block("venv")
    src = project_copy(tmp_path)
    env = clean_env(tmp_path)
    run_line(install, src, env)
    home = tmp_path / "home"
    installed = list(home.glob("sertcp-env/lib/python3*/site-packages/sertcp.py"))
    assert len(installed) == 1 and installed[0].read_bytes() == SERTCP.read_bytes()
    bridges(start, tmp_path, env, tmp_path)
