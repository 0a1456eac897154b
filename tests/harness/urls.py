"""Parse, check and rewrite PostgreSQL connection URLs without ever printing a password."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

URL_SCHEMES = ("postgresql", "postgres", "cockroachdb")


class InvalidDatabaseURL(ValueError):
    """A connection URL that cannot be used, with the reason and the fix in the message."""


@dataclass(frozen=True)
class Endpoint:
    """Host and port of a server, the parts of a URL that are safe to print."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(url: str, *, variable: str = "DATABASE_URL") -> Endpoint:
    """Check that *url* is a usable PostgreSQL URL and return its host and port.

    Raises InvalidDatabaseURL naming *variable* and the problem; the message never
    contains the password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidDatabaseURL(
            f"{variable} is not a valid URL ({error}). Use the form "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=verify-full, "
            f"or unset {variable} to let the tests start a database."
        ) from None

    if parts.scheme not in URL_SCHEMES:
        raise InvalidDatabaseURL(
            f"{variable} has the scheme {parts.scheme!r}, expected one of "
            f"{', '.join(URL_SCHEMES)}. Use the form postgresql://USER:PASSWORD@HOST:PORT/DATABASE."
        )
    if not parts.hostname:
        raise InvalidDatabaseURL(
            f"{variable} names no host. Use the form postgresql://USER:PASSWORD@HOST:PORT/DATABASE."
        )
    return Endpoint(parts.hostname, port or 5432)


def redact(url: str) -> str:
    """Return *url* with its password replaced by three asterisks."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = quote(parts.username or "", safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def replace_database(url: str, database: str) -> str:
    """Return *url* pointing at *database* on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def set_query_parameter(url: str, name: str, value: str) -> str:
    """Return *url* with the query parameter *name* set to *value*."""
    parts = urlsplit(url)
    query = [(key, old) for key, old in parse_qsl(parts.query) if key != name]
    query.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(query)))


def to_libpq(url: str) -> str:
    """Return *url* with a scheme that libpq and node-postgres accept."""
    parts = urlsplit(url)
    if parts.scheme == "cockroachdb":
        return urlunsplit(parts._replace(scheme="postgresql"))
    return url
