"""The TLS page's handler: verified TLS connects, and every kind of wrong server is rejected.

The handler runs against a local PostgreSQL with TLS on and a certificate signed by a CA
made for the test run. The CA certificate is shipped the way the page ships it, as
certs/root.crt in a directory that LAMBDA_TASK_ROOT names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from tests.harness.backends import SOURCE_ENVIRONMENT, BackendInfo
from tests.harness.databases import TestDatabase
from tests.harness.node import Invocation, NodeHandlerProcess, prepare_workspace, require_node
from tests.harness.snippets import SnippetLoader
from tests.harness.tls_server import (
    FUNCTION_ROLE,
    LOOPBACK_HOST_NAME,
    SERVER_HOST_NAME,
    CertificateAuthority,
    TlsPostgres,
    running_tls_server,
)

HANDLER = "tls/handler.py"
PASSWORD = "correct-horse-battery"
OTHER_HOST_NAME = "other.guide.test"
INVOCATIONS = 3
SUBPROCESS_TIMEOUT_SECONDS = 60

runs_handler = pytest.mark.snippet(HANDLER)

# Broken copies of the handler, each weakening the TLS settings the page recommends.
SSLMODE_DISABLE = (('"sslmode": "verify-full"', '"sslmode": "disable"'),)
SSLMODE_VERIFY_CA = (('"sslmode": "verify-full"', '"sslmode": "verify-ca"'),)
SSLMODE_REQUIRE_WITHOUT_CA = (
    ('"sslmode": "verify-full", "sslrootcert": str(CA_CERTIFICATE)', '"sslmode": "require"'),
)
NO_ROOT_CERTIFICATE = (
    ('"sslmode": "verify-full", "sslrootcert": str(CA_CERTIFICATE)', '"sslmode": "verify-full"'),
)
NO_CERTIFICATE_MODE = (('        settings["sslcertmode"] = "disable"\n', "        pass\n"),)
NO_CA_FILE_CHECK = (("    if not CA_CERTIFICATE.is_file():\n", "    if False:\n"),)

# Runs the handler module the way Lambda's runtime does: imported once, invoked repeatedly.
INVOKER = """\
import json
import logging
import sys

logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
)

import handler

outcomes = []
for _ in range(int(sys.argv[1])):
    try:
        outcomes.append(handler.handler({}, None)["statusCode"])
    except Exception as error:
        outcomes.append(f"{type(error).__name__}: {error}")
if handler.pool is not None:
    handler.pool.close()
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority("Guide test cluster CA")


@pytest.fixture(scope="module")
def other_authority() -> CertificateAuthority:
    return CertificateAuthority("Some other CA")


@pytest.fixture(scope="module")
def tls_server(authority: CertificateAuthority) -> Iterator[TlsPostgres]:
    with running_tls_server(authority, FUNCTION_ROLE, PASSWORD) as server:
        yield server


@pytest.fixture
def plain_database(database: TestDatabase, backend: BackendInfo) -> TestDatabase:
    """A database on the run's server, which the harness starts without TLS."""
    if backend.source == SOURCE_ENVIRONMENT:
        pytest.skip("DATABASE_URL may point at a server with TLS, so it cannot play one without")
    return database


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Keeps libpq away from the real ~/.postgresql of the user running the tests.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def make_package(directory: Path, authority: CertificateAuthority | None) -> Path:
    """Lay out a deployment package: certs/root.crt from *authority*, or no certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    if authority is not None:
        authority.write_certificate(directory / "certs" / "root.crt")
    return directory


@pytest.fixture
def function(
    tmp_path: Path,
    authority: CertificateAuthority,
    tls_server: TlsPostgres,
    empty_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """Set the function's environment: a package with the right CA and a verifiable URL."""
    package = make_package(tmp_path / "task", authority)
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(package))
    monkeypatch.setenv("DATABASE_URL", tls_server.role_url(FUNCTION_ROLE, PASSWORD))
    return package


def invoke(handler: ModuleType) -> dict:
    return handler.handler({}, None)


def pool_warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        record.getMessage() for record in caplog.records if record.name.startswith("psycopg")
    )


@runs_handler
def test_verified_connection_succeeds(function, tls_server, snippets: SnippetLoader):
    handler = snippets.load(HANDLER)

    result = invoke(handler)

    assert result["statusCode"] == 200
    assert json.loads(result["body"])["database_time"]
    assert tls_server.tls_sessions(FUNCTION_ROLE) == [True]


@runs_handler
def test_ca_path_is_absolute(function, snippets: SnippetLoader):
    expected = function / "certs" / "root.crt"

    handler = snippets.load(HANDLER)
    ca_path = handler.CA_CERTIFICATE

    assert ca_path.is_absolute()
    assert ca_path == expected


@runs_handler
def test_wrong_ca_rejected(
    function, other_authority, snippets: SnippetLoader, caplog: pytest.LogCaptureFixture
):
    make_package(function, other_authority)
    handler = snippets.load(HANDLER)

    with pytest.raises(PoolTimeout):
        invoke(handler)

    assert "SSL error: certificate verify failed" in pool_warnings(caplog)


@runs_handler
def test_wrong_host_name_rejected(
    function, tls_server, snippets: SnippetLoader, monkeypatch, caplog
):
    url = tls_server.role_url(FUNCTION_ROLE, PASSWORD, host_name=OTHER_HOST_NAME)
    monkeypatch.setenv("DATABASE_URL", url)
    handler = snippets.load(HANDLER)

    with pytest.raises(PoolTimeout):
        invoke(handler)

    # The server's certificate also names localhost, which libpq counts as one other name.
    expected = (
        f'server certificate for "{SERVER_HOST_NAME}" (and 1 other name) '
        f'does not match host name "{OTHER_HOST_NAME}"'
    )
    assert expected in pool_warnings(caplog)


@runs_handler
@pytest.mark.parametrize("query", ["", "&sslmode=disable"], ids=["as-given", "url-says-disable"])
def test_server_without_tls_rejected(
    function, plain_database, snippets: SnippetLoader, monkeypatch, caplog, query
):
    monkeypatch.setenv("DATABASE_URL", plain_database.url + query)
    handler = snippets.load(HANDLER)

    with pytest.raises(PoolTimeout):
        invoke(handler)

    assert "server does not support SSL, but SSL was required" in pool_warnings(caplog)
    assert plain_database.view.connections_opened() == 0


@runs_handler
def test_missing_ca_named(function, snippets: SnippetLoader):
    (function / "certs" / "root.crt").unlink()
    handler = snippets.load(HANDLER)

    with pytest.raises(RuntimeError) as raised:
        invoke(handler)

    assert str(function / "certs" / "root.crt") in str(raised.value)
    assert "certs/root.crt" in str(raised.value)


def run_function_process(
    package: Path,
    source: str,
    *,
    home: Path,
    database_url: str,
    invocations: int = INVOCATIONS,
    without_privileges: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the handler in a new Python process, as one execution environment, and invoke it.

    With *without_privileges*, a process running as root drops every capability first, so
    file permissions bind it as they bind any other user.
    """
    (package / "handler.py").write_text(source)
    invoker = package.parent / "invoke.py"
    invoker.write_text(INVOKER)
    command = [sys.executable, str(invoker), str(invocations)]
    if without_privileges and os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-all", "--", *command]
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "LAMBDA_TASK_ROOT": str(package),
        "PYTHONPATH": str(package),
        "DATABASE_URL": database_url,
    }
    return subprocess.run(
        command,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )


def outcomes(result: subprocess.CompletedProcess[str]) -> list:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def process_package(tmp_path: Path, authority: CertificateAuthority) -> Path:
    return make_package(tmp_path / "task", authority)


def home_directory(tmp_path: Path, kind: str) -> Path:
    home = tmp_path / f"home-{kind}"
    if kind == "missing":
        return home
    home.mkdir()
    if kind == "unreadable":
        home.chmod(0)
    return home


@runs_handler
@pytest.mark.parametrize("kind", ["empty", "missing", "unreadable"])
def test_home_directory_not_needed(
    process_package, tls_server, snippets: SnippetLoader, tmp_path, kind
):
    home = home_directory(tmp_path, kind)

    result = run_function_process(
        process_package,
        snippets.source(HANDLER),
        home=home,
        database_url=tls_server.role_url(FUNCTION_ROLE, PASSWORD),
        without_privileges=True,
    )

    assert outcomes(result) == [200] * INVOCATIONS


@runs_handler
def test_libpq_version_logged_once(process_package, tls_server, snippets: SnippetLoader, tmp_path):
    version = psycopg.pq.version()

    result = run_function_process(
        process_package,
        snippets.source(HANDLER),
        home=home_directory(tmp_path, "empty"),
        database_url=tls_server.role_url(FUNCTION_ROLE, PASSWORD),
    )

    version_lines = [line for line in result.stderr.splitlines() if " libpq " in line]
    assert outcomes(result) == [200] * INVOCATIONS
    assert len(version_lines) == 1
    assert f"libpq {version // 10000}.{version % 10000} " in version_lines[0]


@runs_handler
def test_process_output_hides_password(
    process_package, tls_server, snippets: SnippetLoader, tmp_path
):
    result = run_function_process(
        process_package,
        snippets.source(HANDLER),
        home=home_directory(tmp_path, "empty"),
        database_url=tls_server.role_url(FUNCTION_ROLE, PASSWORD),
    )

    assert outcomes(result) == [200] * INVOCATIONS
    assert PASSWORD not in result.stderr
    assert PASSWORD not in result.stdout


@runs_handler
class TestBrokenCopiesFail:
    """Each check above goes red when the handler loses part of its TLS settings."""

    def test_sslmode_disable_reaches_plain_server(
        self, function, plain_database, snippets: SnippetLoader, monkeypatch
    ):
        monkeypatch.setenv("DATABASE_URL", plain_database.url)
        handler = snippets.load(HANDLER, SSLMODE_DISABLE)

        result = invoke(handler)

        assert result["statusCode"] == 200
        assert plain_database.view.connections_opened() == 1

    def test_require_without_ca_trusts_any_certificate(
        self, function, other_authority, tls_server, snippets: SnippetLoader
    ):
        make_package(function, other_authority)
        handler = snippets.load(HANDLER, SSLMODE_REQUIRE_WITHOUT_CA)

        result = invoke(handler)

        assert result["statusCode"] == 200

    def test_verify_ca_accepts_wrong_host_name(
        self, function, tls_server, snippets: SnippetLoader, monkeypatch
    ):
        url = tls_server.role_url(FUNCTION_ROLE, PASSWORD, host_name=OTHER_HOST_NAME)
        monkeypatch.setenv("DATABASE_URL", url)
        handler = snippets.load(HANDLER, SSLMODE_VERIFY_CA)

        result = invoke(handler)

        assert result["statusCode"] == 200

    def test_no_root_certificate_needs_home(
        self, process_package, tls_server, snippets: SnippetLoader, tmp_path
    ):
        home = home_directory(tmp_path, "empty")

        result = run_function_process(
            process_package,
            snippets.source(HANDLER, NO_ROOT_CERTIFICATE),
            home=home,
            database_url=tls_server.role_url(FUNCTION_ROLE, PASSWORD),
            invocations=1,
        )

        assert outcomes(result) == ["PoolTimeout: couldn't get a connection after 5.00 sec"]
        assert f'root certificate file "{home}/.postgresql/root.crt" does not exist' in (
            result.stderr
        )

    def test_client_certificate_lookup_needs_readable_home(
        self, process_package, tls_server, snippets: SnippetLoader, tmp_path
    ):
        home = home_directory(tmp_path, "unreadable")

        result = run_function_process(
            process_package,
            snippets.source(HANDLER, NO_CERTIFICATE_MODE),
            home=home,
            database_url=tls_server.role_url(FUNCTION_ROLE, PASSWORD),
            invocations=1,
            without_privileges=True,
        )

        assert outcomes(result) == ["PoolTimeout: couldn't get a connection after 5.00 sec"]
        expected = (
            f'could not open certificate file "{home}/.postgresql/postgresql.crt": '
            "Permission denied"
        )
        assert expected in result.stderr

    def test_unchecked_missing_ca_times_out(
        self, function, snippets: SnippetLoader, caplog: pytest.LogCaptureFixture
    ):
        (function / "certs" / "root.crt").unlink()
        handler = snippets.load(HANDLER, NO_CA_FILE_CHECK)

        with pytest.raises(PoolTimeout):
            invoke(handler)

        expected = f'root certificate file "{function}/certs/root.crt" does not exist'
        assert expected in pool_warnings(caplog)


# What libpq does in each sslmode when the function's CA file is given as sslrootcert, except
# in the last case. "no TLS" means it connected without encryption. The harness's role on
# the TLS server may connect with or without TLS, as a server in the middle would let it.
SERVERS = (
    "server without TLS",
    "certificate from another CA",
    "certificate for another host",
    "no CA file",
)
SSLMODE_OUTCOMES = {
    "disable": ("no TLS", "no TLS", "no TLS", "no TLS"),
    "allow": ("no TLS", "no TLS", "no TLS", "no TLS"),
    "prefer": ("no TLS", "no TLS", "TLS", "TLS"),
    "require": ("rejected", "rejected", "TLS", "TLS"),
    "verify-ca": ("rejected", "rejected", "TLS", "rejected"),
    "verify-full": ("rejected", "rejected", "rejected", "rejected"),
}
SSLMODE_CASES = [
    pytest.param(mode, server, outcome, id=f"{mode}-{server.replace(' ', '-')}")
    for mode, outcomes_by_server in SSLMODE_OUTCOMES.items()
    for server, outcome in zip(SERVERS, outcomes_by_server, strict=True)
]


@pytest.fixture(scope="module")
def ca_files(
    tmp_path_factory: pytest.TempPathFactory,
    authority: CertificateAuthority,
    other_authority: CertificateAuthority,
) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("ca-files")
    return {
        "right": authority.write_certificate(directory / "right.crt"),
        "other": other_authority.write_certificate(directory / "other.crt"),
    }


def harness_url(server: TlsPostgres, host_name: str) -> str:
    return f"postgresql://postgres@{host_name}:{server.port}/postgres?hostaddr=127.0.0.1"


def connection_outcome(url: str, **parameters: str) -> str:
    try:
        with psycopg.connect(url, connect_timeout=5, **parameters) as connection:
            return "TLS" if connection.pgconn.ssl_in_use else "no TLS"
    except psycopg.OperationalError:
        return "rejected"


@pytest.mark.parametrize(("mode", "server", "expected"), SSLMODE_CASES)
def test_sslmode_outcome(
    mode, server, expected, tls_server, ca_files, empty_home, request: pytest.FixtureRequest
):
    if server == "server without TLS":
        plain: TestDatabase = request.getfixturevalue("plain_database")
        url, parameters = plain.url, {"sslrootcert": str(ca_files["right"])}
    elif server == "certificate from another CA":
        url = harness_url(tls_server, SERVER_HOST_NAME)
        parameters = {"sslrootcert": str(ca_files["other"])}
    elif server == "certificate for another host":
        url = harness_url(tls_server, OTHER_HOST_NAME)
        parameters = {"sslrootcert": str(ca_files["right"])}
    else:
        url, parameters = harness_url(tls_server, SERVER_HOST_NAME), {}

    outcome = connection_outcome(url, sslmode=mode, **parameters)

    assert outcome == expected


NODE_HANDLER = "tls/handler.mjs"
runs_node_handler = pytest.mark.snippet(NODE_HANDLER)

# A broken copy that passes sslmode and the other TLS parameters on to pg-connection-string.
NODE_KEEPS_URL_TLS_PARAMETERS = (
    (
        "  for (const name of URL_TLS_PARAMETERS) {\n    url.searchParams.delete(name);\n  }\n",
        "",
    ),
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    return require_node()


def node_url(server: TlsPostgres, host_name: str = LOOPBACK_HOST_NAME, query: str = "") -> str:
    return f"postgresql://{FUNCTION_ROLE}:{PASSWORD}@{host_name}:{server.port}/postgres{query}"


def invoke_node(
    package: Path, source: str, database_url: str, invocations: int = 1
) -> tuple[list[Invocation], str]:
    """Import the Node.js handler once in a new node process, invoke it, and return the output."""
    prepare_workspace(package, {"handler.mjs": source})
    environment = {"DATABASE_URL": database_url, "LAMBDA_TASK_ROOT": str(package)}
    with NodeHandlerProcess(package / "handler.mjs", environment) as function_process:
        results = [function_process.invoke({}) for _ in range(invocations)]
        return results, function_process.output


@runs_node_handler
def test_node_verified_connection_succeeds(
    node_modules, process_package, tls_server, snippets: SnippetLoader
):
    results, output = invoke_node(
        process_package, snippets.source(NODE_HANDLER), node_url(tls_server), INVOCATIONS
    )

    assert [result.status_code for result in results] == [200] * INVOCATIONS
    assert output.count("OpenSSL") == 1
    assert PASSWORD not in output


@runs_node_handler
def test_node_connection_uses_tls(
    node_modules, process_package, tls_server, snippets: SnippetLoader
):
    prepare_workspace(process_package, {"handler.mjs": snippets.source(NODE_HANDLER)})
    environment = {"DATABASE_URL": node_url(tls_server), "LAMBDA_TASK_ROOT": str(process_package)}

    with NodeHandlerProcess(process_package / "handler.mjs", environment) as function_process:
        function_process.invoke({})
        sessions = tls_server.tls_sessions(FUNCTION_ROLE)

    assert sessions == [True]


@runs_node_handler
def test_node_wrong_ca_rejected(
    node_modules, tmp_path, other_authority, tls_server, snippets: SnippetLoader
):
    package = make_package(tmp_path / "task", other_authority)

    results, _ = invoke_node(package, snippets.source(NODE_HANDLER), node_url(tls_server))

    assert str(results[0].error) == (
        "Error [UNABLE_TO_VERIFY_LEAF_SIGNATURE]: unable to verify the first certificate"
    )


@runs_node_handler
def test_node_wrong_host_name_rejected(
    node_modules, process_package, tls_server, snippets: SnippetLoader
):
    url = node_url(tls_server, host_name="127.0.0.1")

    results, _ = invoke_node(process_package, snippets.source(NODE_HANDLER), url)

    assert results[0].error is not None
    assert results[0].error.code == "ERR_TLS_CERT_ALTNAME_INVALID"
    assert "IP: 127.0.0.1 is not in the cert's list" in results[0].error.message


@runs_node_handler
@pytest.mark.parametrize("query", ["", "&sslmode=disable"], ids=["as-given", "url-says-disable"])
def test_node_server_without_tls_rejected(
    node_modules, process_package, plain_database, snippets: SnippetLoader, query
):
    url = plain_database.url + query

    results, _ = invoke_node(process_package, snippets.source(NODE_HANDLER), url)

    assert str(results[0].error) == "Error: The server does not support SSL connections"
    assert plain_database.view.connections_opened() == 0


@runs_node_handler
def test_node_url_sslmode_keeps_ca(
    node_modules, process_package, tls_server, snippets: SnippetLoader
):
    url = node_url(tls_server, query="?sslmode=verify-full")

    results, _ = invoke_node(process_package, snippets.source(NODE_HANDLER), url)

    assert results[0].status_code == 200


@runs_node_handler
def test_node_missing_ca_named(node_modules, tmp_path, tls_server, snippets: SnippetLoader):
    package = make_package(tmp_path / "task", None)

    results, _ = invoke_node(package, snippets.source(NODE_HANDLER), node_url(tls_server))

    assert results[0].error is not None
    assert str(package / "certs" / "root.crt") in results[0].error.message


@runs_node_handler
class TestNodeBrokenCopiesFail:
    """The Node.js checks go red when the URL's TLS parameters reach pg-connection-string."""

    def test_url_sslmode_drops_ca(
        self, node_modules, process_package, tls_server, snippets: SnippetLoader
    ):
        url = node_url(tls_server, query="?sslmode=verify-full")
        source = snippets.source(NODE_HANDLER, NODE_KEEPS_URL_TLS_PARAMETERS)

        results, _ = invoke_node(process_package, source, url)

        assert results[0].error is not None
        assert results[0].error.code == "UNABLE_TO_VERIFY_LEAF_SIGNATURE"

    def test_url_sslmode_disable_reaches_plain_server(
        self, node_modules, process_package, plain_database, snippets: SnippetLoader
    ):
        url = plain_database.url + "&sslmode=disable"
        source = snippets.source(NODE_HANDLER, NODE_KEEPS_URL_TLS_PARAMETERS)

        results, _ = invoke_node(process_package, source, url)

        assert results[0].status_code == 200
        assert plain_database.view.connections_opened() == 1
