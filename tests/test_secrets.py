"""The TLS page's handler keeps the password out of code, logs and errors.

Failed connections are real: a wrong password against a server with password
authentication, and a port on 127.0.0.1 where nothing listens. Every log record at every
level and everything written to stderr is searched for the password.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from psycopg_pool import PoolTimeout

from tests.harness.node import Invocation, NodeHandlerProcess, prepare_workspace, require_node
from tests.harness.processes import free_port
from tests.harness.snippets import SnippetLoader
from tests.harness.tls_server import (
    FUNCTION_ROLE,
    SERVER_HOST_NAME,
    CertificateAuthority,
    TlsPostgres,
    running_tls_server,
)

HANDLER = "tls/handler.py"
PASSWORD = "Pa55-word-for-this-test"
WRONG_PASSWORD = "Wr0ng-password-for-this-test"

runs_handler = pytest.mark.snippet(HANDLER)

# Broken copies of the handler, each letting a secret out.
LOGS_URL = (
    (
        "    with pool_lock:\n        if pool is None:\n",
        "    with pool_lock:\n        if pool is None:\n"
        '            logger.info("connecting to %s", database_url())\n',
    ),
)
ECHOES_PARSE_ERROR = (
    (
        "    except psycopg.ProgrammingError:\n",
        "    except psycopg.ProgrammingError as error:\n"
        '        raise RuntimeError(f"DATABASE_URL is not valid: {error}") from None\n',
    ),
)
URL_IN_CODE = (
    (
        'os.environ.get("DATABASE_URL", "")',
        'os.environ.get("DATABASE_URL", "postgresql://app:hunter2@db.example.test:26257/app")',
    ),
)

MALFORMED_URLS = {
    "bad-percent-encoding": f"postgresql://app:{PASSWORD}%zz@cluster.guide.test:26257/app",
    "space-in-password": f"postgresql://app:{PASSWORD} x@cluster.guide.test:26257/app",
    "unclosed-ipv6-host": f"postgresql://app:{PASSWORD}@[::1:26257/app",
    "no-scheme": f"app:{PASSWORD}@cluster.guide.test:26257/app",
    "unknown-parameter": f"postgresql://app:{PASSWORD}@cluster.guide.test/app?sslmod=verify-full",
}

# A connection string written in code: a scheme followed by user:password@.
URL_CREDENTIALS = re.compile(r"postgres(?:ql)?://([^\s\"'/@:]+):([^\s\"'@]+)@")


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority("Guide test cluster CA")


@pytest.fixture(scope="module")
def tls_server(authority: CertificateAuthority) -> Iterator[TlsPostgres]:
    with running_tls_server(authority, FUNCTION_ROLE, PASSWORD) as server:
        yield server


@pytest.fixture
def function(
    tmp_path: Path, authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Give the function a package with the CA and an empty home directory."""
    package = tmp_path / "task"
    authority.write_certificate(package / "certs" / "root.crt")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(package))
    monkeypatch.setenv("HOME", str(home))
    return package


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def literal_credentials(source: str) -> list[tuple[str, str]]:
    """Return the user and password pairs written in *source*, leaving out placeholders."""
    return [
        (user, password)
        for user, password in URL_CREDENTIALS.findall(source)
        if not (user.isupper() and password.isupper())
    ]


def invoke(handler: ModuleType) -> dict:
    return handler.handler({}, None)


def exception_text(error: BaseException) -> str:
    """Return the error as Lambda reports it: message and the whole traceback."""
    return "".join(traceback.format_exception(error))


@runs_handler
def test_missing_url_named(function, snippets: SnippetLoader, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    handler = snippets.load(HANDLER)

    with pytest.raises(RuntimeError) as raised:
        invoke(handler)

    assert str(raised.value).startswith("DATABASE_URL is not set:")
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None
    assert handler.pool is None


@runs_handler
def test_blank_url_named(function, snippets: SnippetLoader, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "  ")
    handler = snippets.load(HANDLER)

    with pytest.raises(RuntimeError) as raised:
        invoke(handler)

    assert str(raised.value).startswith("DATABASE_URL is not set:")


@runs_handler
@pytest.mark.parametrize("url", MALFORMED_URLS.values(), ids=MALFORMED_URLS.keys())
def test_malformed_url_named_without_password(
    function, snippets: SnippetLoader, monkeypatch, all_logs, url
):
    monkeypatch.setenv("DATABASE_URL", url)
    handler = snippets.load(HANDLER)

    with pytest.raises(RuntimeError) as raised:
        invoke(handler)

    assert str(raised.value).startswith("DATABASE_URL is not a valid connection string:")
    assert PASSWORD not in exception_text(raised.value)
    assert PASSWORD not in all_logs.text
    assert handler.pool is None


@runs_handler
def test_url_without_host_named(function, snippets: SnippetLoader, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{PASSWORD}@/app")
    handler = snippets.load(HANDLER)

    with pytest.raises(RuntimeError) as raised:
        invoke(handler)

    assert str(raised.value).startswith("DATABASE_URL names no host:")
    assert PASSWORD not in str(raised.value)


@runs_handler
def test_wrong_password_kept_secret(
    function, tls_server, snippets: SnippetLoader, monkeypatch, all_logs, capfd
):
    monkeypatch.setenv("DATABASE_URL", tls_server.role_url(FUNCTION_ROLE, WRONG_PASSWORD))
    handler = snippets.load(HANDLER)

    with pytest.raises(PoolTimeout) as raised:
        invoke(handler)

    stderr = capfd.readouterr().err
    assert f'password authentication failed for user "{FUNCTION_ROLE}"' in all_logs.text
    assert WRONG_PASSWORD not in exception_text(raised.value)
    assert WRONG_PASSWORD not in all_logs.text
    assert WRONG_PASSWORD not in stderr


@runs_handler
def test_unreachable_port_kept_secret(
    function, snippets: SnippetLoader, monkeypatch, all_logs, capfd
):
    url = f"postgresql://app:{PASSWORD}@{SERVER_HOST_NAME}:{free_port()}/app?hostaddr=127.0.0.1"
    monkeypatch.setenv("DATABASE_URL", url)
    handler = snippets.load(HANDLER)

    with pytest.raises(PoolTimeout) as raised:
        invoke(handler)

    stderr = capfd.readouterr().err
    assert "Connection refused" in all_logs.text
    assert PASSWORD not in exception_text(raised.value)
    assert PASSWORD not in all_logs.text
    assert PASSWORD not in stderr


@runs_handler
def test_successful_invocations_log_no_password(
    function, tls_server, snippets: SnippetLoader, monkeypatch, all_logs, capfd
):
    monkeypatch.setenv("DATABASE_URL", tls_server.role_url(FUNCTION_ROLE, PASSWORD))
    handler = snippets.load(HANDLER)

    statuses = [invoke(handler)["statusCode"] for _ in range(3)]

    assert statuses == [200, 200, 200]
    assert PASSWORD not in all_logs.text
    assert PASSWORD not in capfd.readouterr().err


@runs_handler
def test_snippet_holds_no_credentials(snippets: SnippetLoader):
    source = snippets.source(HANDLER)

    assert literal_credentials(source) == []


@runs_handler
class TestBrokenCopiesFail:
    """Each check above goes red when the handler lets the password out."""

    def test_logged_url_leaks_password(
        self, function, tls_server, snippets: SnippetLoader, monkeypatch, all_logs
    ):
        monkeypatch.setenv("DATABASE_URL", tls_server.role_url(FUNCTION_ROLE, PASSWORD))
        handler = snippets.load(HANDLER, LOGS_URL)

        invoke(handler)

        assert PASSWORD in all_logs.text

    def test_echoed_parse_error_leaks_password(
        self, function, snippets: SnippetLoader, monkeypatch
    ):
        monkeypatch.setenv("DATABASE_URL", MALFORMED_URLS["bad-percent-encoding"])
        handler = snippets.load(HANDLER, ECHOES_PARSE_ERROR)

        with pytest.raises(RuntimeError) as raised:
            invoke(handler)

        assert PASSWORD in str(raised.value)

    def test_url_in_code_detected(self, snippets: SnippetLoader):
        source = snippets.source(HANDLER, URL_IN_CODE)

        assert literal_credentials(source) == [("app", "hunter2")]


NODE_HANDLER = "tls/handler.mjs"
runs_node_handler = pytest.mark.snippet(NODE_HANDLER)


def invoke_node_once(package: Path, source: str, environment: dict[str, str]) -> Invocation:
    prepare_workspace(package, {"handler.mjs": source})
    with NodeHandlerProcess(package / "handler.mjs", environment) as function_process:
        return function_process.invoke({})


@runs_node_handler
def test_node_missing_url_named(function, snippets: SnippetLoader):
    require_node()

    result = invoke_node_once(
        function, snippets.source(NODE_HANDLER), {"LAMBDA_TASK_ROOT": str(function)}
    )

    assert result.error is not None
    assert result.error.message.startswith("DATABASE_URL is not set:")


@runs_node_handler
def test_node_malformed_url_without_password(function, snippets: SnippetLoader):
    require_node()
    environment = {
        "LAMBDA_TASK_ROOT": str(function),
        "DATABASE_URL": MALFORMED_URLS["unclosed-ipv6-host"],
    }

    result = invoke_node_once(function, snippets.source(NODE_HANDLER), environment)

    assert result.error is not None
    assert result.error.message.startswith("DATABASE_URL is not a valid connection string:")
    assert PASSWORD not in str(result.error)
    assert PASSWORD not in result.error.stack
