"""Certificates and TLS helpers for the security tests, made at test time.

`certs` (a session fixture) writes, under one temporary directory:

- ca.pem: the test CA ("sertcp test CA")
- server.pem / server.key: for localhost, 127.0.0.1 and ::1, signed by ca
- client.pem / client.key: a client certificate signed by ca
- other_ca.pem: a second, unrelated CA
- other_server.pem / other_server.key: for localhost, 127.0.0.1 and ::1,
  signed by other_ca (a server a sertcp client must not trust)
- other_client.pem / other_client.key: a client certificate signed by other_ca

Keys are EC P-256: quick to make and to handshake on a small machine.
`TlsClient` is conftest's Client over TLS; `TlsServer` is a loopback TLS
server in a thread that sertcp's client role dials."""
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import Client

SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_cert(cert, path):
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(directory, stem, common_name):
    """A self-signed CA; returns (certificate, key) and writes STEM.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_cert(cert, Path(directory) / ("%s.pem" % stem))
    return cert, key


def make_leaf(directory, stem, common_name, ca, server):
    """A certificate signed by ca = (certificate, key): for a server
    (localhost, 127.0.0.1, ::1) or a client; writes STEM.pem and STEM.key."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        names = [x509.DNSName(n) for n in SERVER_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_cert(cert, Path(directory) / ("%s.pem" % stem))
    _write_key(key, Path(directory) / ("%s.key" % stem))


class Certs:
    """Paths (as str) of everything make_certs wrote."""

    def __init__(self, directory):
        d = Path(directory)
        self.dir = d
        for stem in ("ca", "other_ca"):
            setattr(self, stem, str(d / ("%s.pem" % stem)))
        for stem in ("server", "client", "other_server", "other_client"):
            setattr(self, stem, (str(d / ("%s.pem" % stem)), str(d / ("%s.key" % stem))))

    def server_flags(self, mutual=False):
        """sertcp flags that make a listener serve TLS (mutual: require a
        client certificate from ca)."""
        flags = ["--tls-cert", self.server[0], "--tls-key", self.server[1]]
        if mutual:
            flags += ["--tls-ca", self.ca]
        return flags

    def client_context(self, cert=None, ca=None):
        """A Python client context trusting ca (default: the test CA),
        presenting cert = (pem, key) if given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=ca or self.ca)
        if cert is not None:
            context.load_cert_chain(*cert)
        return context

    def server_context(self, cert=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*(cert or self.server))
        return context


def make_certs(directory):
    ca = make_ca(directory, "ca", "sertcp test CA")
    other = make_ca(directory, "other_ca", "unrelated test CA")
    make_leaf(directory, "server", "localhost", ca, server=True)
    make_leaf(directory, "client", "sertcp test client", ca, server=False)
    make_leaf(directory, "other_server", "localhost", other, server=True)
    make_leaf(directory, "other_client", "unrelated client", other, server=False)
    return Certs(directory)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


class TlsClient(Client):
    """conftest's Client, over TLS: connect, then handshake (an ssl.SSLError
    or OSError escapes when the server refuses during the handshake)."""

    def __init__(self, port, context, host="127.0.0.1", server_name="localhost", timeout=10.0, source=None):
        Client.__init__(self, port, host, timeout=timeout, source=source)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_name)
        except BaseException:
            self.sock.close()
            raise


def refused_in_tls(port, context, timeout=10.0, **kw):
    """True if the server ends a TLS connection during or right after the
    handshake (with TLS 1.3 a client learns that its certificate was refused
    only on its first read)."""
    try:
        c = TlsClient(port, context, timeout=timeout, **kw)
    except (ssl.SSLError, OSError):
        return True
    try:
        return c.closed_by_peer(timeout)
    finally:
        c.close()


class TlsServer:
    """A TLS server on loopback for sertcp's client role to dial: each
    accepted connection is handshaken in the serving thread; the last one
    that succeeded is `connection` (blocking, with a timeout)."""

    def __init__(self, context, host="127.0.0.1"):
        self.context = context
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0          # TCP connections accepted
        self.failed = 0            # of which the handshake failed
        self.connections = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            sock.settimeout(5.0)
            try:
                tls = self.context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                self.failed += 1
                sock.close()
                continue
            self.connections.append(tls)

    def wait_connection(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.connections:
            if time.monotonic() > deadline:
                raise AssertionError("no TLS connection within %.1fs (%d accepted, %d failed)"
                                     % (timeout, self.accepted, self.failed))
            time.sleep(0.01)
        return self.connections[-1]

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        for c in self.connections:
            try:
                c.close()
            except OSError:
                pass


def recv_exactly(sock, n, timeout=10.0):
    """n bytes from a blocking socket (plain or TLS), or AssertionError."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("got %d of %d bytes" % (len(out), n))
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(65536, n - len(out)))
        except socket.timeout:
            continue
        if not chunk:
            raise AssertionError("closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)
