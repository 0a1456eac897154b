"""CockroachDB servers for the run: a local `cockroach` binary or a Docker container."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

from tests.harness.processes import free_port, log_tail, stop_process, wait_until

# Overridable so a run can pin the CockroachDB release it tests against.
DEFAULT_IMAGE = "cockroachdb/cockroach:latest-v25.2"
DOCKER_SOCKET = "/var/run/docker.sock"


class CockroachUnavailable(RuntimeError):
    """CockroachDB could not be started, with the reason in the message."""


class CockroachBinary:
    """A single-node, insecure CockroachDB started from the `cockroach` binary on PATH.

    The shared server of a run keeps its store in memory. A server that a test restarts
    keeps it on disk, because an in-memory store is empty after a restart.
    """

    def __init__(self, *, in_memory: bool = True) -> None:
        executable = shutil.which("cockroach")
        if executable is None:
            raise CockroachUnavailable("no `cockroach` binary on PATH")
        self.executable = executable
        self.in_memory = in_memory
        self.directory = Path(tempfile.mkdtemp(prefix="serverless-guide-crdb-"))
        self.log_path = None
        self.port = free_port()
        self.http_port = free_port()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://root@127.0.0.1:{self.port}/defaultdb?sslmode=disable"

    def start(self) -> None:
        """Start the node and wait until it writes its SQL URL."""
        url_file = self.directory / "listening-url"
        url_file.unlink(missing_ok=True)
        store = "type=mem,size=2GiB" if self.in_memory else f"path={self.directory / 'store'}"
        output = self.directory / "cockroach.out"
        with open(output, "ab") as log:
            self._process = subprocess.Popen(
                [
                    self.executable,
                    "start-single-node",
                    "--insecure",
                    f"--store={store}",
                    f"--listen-addr=127.0.0.1:{self.port}",
                    f"--http-addr=127.0.0.1:{self.http_port}",
                    f"--listening-url-file={url_file}",
                    f"--log-dir={self.directory / 'logs'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_until(url_file.exists, timeout=90, process=self._process):
            self.stop()
            raise CockroachUnavailable(
                f"cockroach start-single-node did not become ready on 127.0.0.1:{self.port}; "
                f"last lines of its output:\n{log_tail(output)}"
            )

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, signal_number=signal.SIGTERM, timeout=60)
            self._process = None

    def restart(self) -> None:
        if self.in_memory:
            raise CockroachUnavailable("an in-memory store does not survive a restart")
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def docker_engine_problem() -> str | None:
    """Return why no Docker engine can be used, or None when one responds to a ping."""
    try:
        import docker
    except ImportError:
        return "the docker Python package is not installed"
    if not os.environ.get("DOCKER_HOST") and not Path(DOCKER_SOCKET).exists():
        return f"no Docker engine: DOCKER_HOST is not set and {DOCKER_SOCKET} does not exist"

    # A failed client construction leaves its socket for the garbage collector to close.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        client = None
        try:
            client = docker.from_env(timeout=5)
            client.ping()
        except Exception as error:  # docker raises several unrelated types for "no engine"
            return f"no Docker engine answered ({type(error).__name__}: {str(error)[:160]})"
        finally:
            if client is not None:
                client.close()
            gc.collect()
    return None


class CockroachContainer:
    """CockroachDB in a Docker container, through testcontainers."""

    def __init__(self) -> None:
        problem = docker_engine_problem()
        if problem:
            raise CockroachUnavailable(problem)
        # The community module is the current home of the class; the old path warns.
        from testcontainers.community.cockroachdb import CockroachDBContainer

        image = os.environ.get("COCKROACH_IMAGE", DEFAULT_IMAGE)
        # The class always sets a password, so the node runs in secure mode and the URL
        # sets sslmode=require; the plain dialect gives a URL that psycopg accepts.
        self._container = CockroachDBContainer(image, dialect="postgresql")
        self.log_path = None

    @property
    def url(self) -> str:
        return self._container.get_connection_url()

    def start(self) -> None:
        try:
            self._container.start()
        except Exception as error:  # image pulls and engine errors have no common base class
            raise CockroachUnavailable(
                f"the CockroachDB container did not start: {error}"
            ) from error

    def restart(self) -> None:
        # Docker can map the ports anew on a restart, which would change the URL under the test.
        raise CockroachUnavailable("a container's published ports may change across a restart")

    def stop(self) -> None:
        self._container.stop()

    def remove(self) -> None:
        self._container.stop()
