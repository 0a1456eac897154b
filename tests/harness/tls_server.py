"""Certificates made for one test run and a local PostgreSQL that serves TLS with them.

The server plays a cloud cluster's TLS endpoint: the function's role may only
connect over TLS (a `hostssl` line in pg_hba.conf) and authenticates with a password. The
harness's own role `postgres` may connect with or without TLS, so the same server can also
play a server that accepts whatever a client offers.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from psycopg import sql

from tests.harness.local_postgres import LocalPostgres

# A name that no DNS server answers for. Clients reach the server through hostaddr=127.0.0.1
# and libpq checks the certificate against this name.
SERVER_HOST_NAME = "cluster.guide.test"
# node-postgres has no hostaddr, so the certificate also names the loopback host name.
LOOPBACK_HOST_NAME = "localhost"
FUNCTION_ROLE = "app"
CERTIFICATE_LIFETIME = datetime.timedelta(days=2)

# The harness's role may connect with or without TLS, but every other role needs TLS and
# a password, as on a cloud cluster.
HBA_RULES = """\
local   all  all                    trust
host    all  postgres  127.0.0.1/32  trust
hostssl all  all       127.0.0.1/32  scram-sha-256
"""

TLS_SETTINGS = {
    "ssl": "on",
    "ssl_cert_file": "server.crt",
    "ssl_key_file": "server.key",
}


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM-encoded."""

    certificate_pem: bytes
    private_key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys are generated in milliseconds, where RSA keys take far longer.
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + CERTIFICATE_LIFETIME
    )


class CertificateAuthority:
    """A self-signed CA that issues server certificates, like a cluster's private CA."""

    def __init__(self, common_name: str) -> None:
        self._key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public_key = self._key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        self.certificate = _validity(builder).sign(self._key, hashes.SHA256())

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_certificate(self, path: Path) -> Path:
        """Write the CA certificate to *path*, as a function ships it, and return the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.certificate_pem)
        return path

    def issue_server_certificate(self, host_names: tuple[str, ...]) -> IssuedCertificate:
        """Sign a certificate valid for *host_names* (its subject alternative names)."""
        key = _new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in host_names]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        certificate = _validity(builder).sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


class TlsPostgres(LocalPostgres):
    """A LocalPostgres with TLS on, whose function role must use TLS and a password."""

    def __init__(self, certificate: IssuedCertificate) -> None:
        super().__init__()
        self.certificate = certificate

    def initialize(self) -> None:
        """Create the data directory, then install the certificate, settings and rules."""
        super().initialize()
        self._install_certificate()
        with open(self.data_dir / "postgresql.conf", "a") as settings:
            settings.writelines(f"{name} = '{value}'\n" for name, value in TLS_SETTINGS.items())
        (self.data_dir / "pg_hba.conf").write_text(HBA_RULES)

    def _install_certificate(self) -> None:
        certificate_path = self.data_dir / "server.crt"
        key_path = self.data_dir / "server.key"
        certificate_path.write_bytes(self.certificate.certificate_pem)
        key_path.write_bytes(self.certificate.private_key_pem)
        # PostgreSQL refuses a key file that its own user does not own or that others can read.
        key_path.chmod(0o600)
        if self.account is not None:
            for path in (certificate_path, key_path):
                os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def create_role(self, name: str, password: str) -> None:
        """Create a login role with a password, as a cluster's SQL user."""
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )

    def role_url(
        self, role: str, password: str, *, host_name: str = SERVER_HOST_NAME, query: str = ""
    ) -> str:
        """Return a connection URL for *role* that names *host_name* but dials 127.0.0.1."""
        parameters = f"hostaddr=127.0.0.1{'&' + query if query else ''}"
        return (
            f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}"
            f"@{host_name}:{self.port}/postgres?{parameters}"
        )

    def tls_sessions(self, role: str) -> list[bool]:
        """Return, for each open session of *role*, whether the server reports it as using TLS."""
        with psycopg.connect(self.url, autocommit=True) as connection:
            rows = connection.execute(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.usename = %s",
                (role,),
            ).fetchall()
        return [row[0] for row in rows]


def start_tls_server(certificate: IssuedCertificate) -> TlsPostgres:
    """Initialize and start a TlsPostgres. The caller must call remove() on it."""
    server = TlsPostgres(certificate)
    try:
        server.initialize()
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


@contextmanager
def running_tls_server(
    authority: CertificateAuthority, role: str, password: str
) -> Iterator[TlsPostgres]:
    """Start a TlsPostgres signed by *authority* with a login *role*, and remove it afterwards."""
    certificate = authority.issue_server_certificate((SERVER_HOST_NAME, LOOPBACK_HOST_NAME))
    server = start_tls_server(certificate)
    try:
        server.create_role(role, password)
        yield server
    finally:
        server.remove()
