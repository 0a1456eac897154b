"""Run the guide's Node.js code: install its packages once, run files, and drive Lambda handlers.

The packages listed in tests/node are installed with `npm ci` into a cache directory outside
the source tree, keyed by the hash of package-lock.json. Each test gets a working directory
with a `node_modules` symlink to that cache, because ES modules resolve bare imports such as
`pg` through node_modules directories and ignore NODE_PATH.

`python -m tests.harness.node install` installs the packages ahead of a test run.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

HARNESS = Path(__file__).resolve().parent
PACKAGE_DIRECTORY = HARNESS.parent / "node"
DRIVER = HARNESS / "invoke_handler.mjs"

# pg 8 declares `"engines": {"node": ">= 16.0.0"}`. The suite has been run on Node.js 20.
MIN_NODE_MAJOR = 16
INSTALLED_MARKER = ".installed"
INSTALL_TIMEOUT_SECONDS = 600.0
RUN_TIMEOUT_SECONDS = 60.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# Time allowed on top of an invocation's own deadline before the driver counts as hung.
REPLY_GRACE_SECONDS = 10.0
FREEZE_ACK_TIMEOUT_SECONDS = 10.0
POOL_EMPTY_TIMEOUT_SECONDS = 5.0
FAILURE_SETTLE_SECONDS = 1.0
DEFAULT_FUNCTION_NAME = "serverless-guide-handler"
DEFAULT_TIMEOUT_MILLIS = 3000
OUTPUT_TAIL_LINES = 40

# Variables the code under test inherits. The PG* variables stay out on purpose, because
# node-postgres reads them as defaults, and the code under test must rely on DATABASE_URL alone.
INHERITED_VARIABLES = ("PATH", "HOME", "NODE_EXTRA_CA_CERTS")


class NodeSetupError(RuntimeError):
    """The packages in tests/node could not be installed."""


class NodeProcessError(RuntimeError):
    """A node process failed, exited early or stopped replying. The message includes its output."""


def _tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    kept = text.strip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"


@functools.cache
def _node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    result = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def lock_digest() -> str:
    """Return the first 12 hex digits of the SHA-256 of tests/node/package-lock.json."""
    return hashlib.sha256((PACKAGE_DIRECTORY / "package-lock.json").read_bytes()).hexdigest()[:12]


def dependency_directory() -> Path:
    """Return the cache directory for node_modules of the current lock, installed or not."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "serverless-guide" / f"node-{lock_digest()}"


def _is_installed(directory: Path) -> bool:
    return (directory / INSTALLED_MARKER).is_file() and (directory / "node_modules").is_dir()


def node_problem() -> str | None:
    """Return why the Node.js examples cannot run here, or None when they can."""
    version = _node_version()
    if version is None:
        return (
            "Node.js is not installed: no `node` on PATH. Install Node.js "
            f"{MIN_NODE_MAJOR} or newer to run the JavaScript examples."
        )

    match = re.fullmatch(r"v(\d+)\..*", version)
    if match is None:
        return f"`node --version` printed {version!r}, which is not a Node.js version."
    if int(match.group(1)) < MIN_NODE_MAJOR:
        return (
            f"Node.js {version} is too old; the JavaScript examples need Node.js "
            f"{MIN_NODE_MAJOR} or newer."
        )

    if not _is_installed(dependency_directory()) and shutil.which("npm") is None:
        return (
            "npm is not on PATH, so the packages in tests/node cannot be installed. "
            "Install npm, which ships with Node.js."
        )
    return None


def install_dependencies() -> Path:
    """Install the packages of tests/node into the cache once and return that directory.

    Safe to call from several pytest-xdist workers at once, because a file lock lets one
    process install while the others wait. Raises NodeSetupError when npm fails.
    """
    target = dependency_directory()
    if _is_installed(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if _is_installed(target):
            return target
        _run_npm_ci(target)
        (target / INSTALLED_MARKER).write_text(lock_digest() + "\n")
    return target


def _run_npm_ci(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise NodeSetupError(
            f"npm is not on PATH, so the packages in {PACKAGE_DIRECTORY} cannot be installed. "
            "Install npm, which ships with Node.js."
        )

    target.mkdir(exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(PACKAGE_DIRECTORY / name, target / name)

    environment = {**os.environ, "npm_config_update_notifier": "false"}
    command = [npm, "ci", "--no-audit", "--no-fund"]
    try:
        result = subprocess.run(
            command,
            cwd=target,
            env=environment,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NodeSetupError(
            f"`npm ci` in {target} did not finish within {INSTALL_TIMEOUT_SECONDS:.0f} s. "
            "Check that the package registry is reachable, then run "
            "`python -m tests.harness.node install` again."
        ) from None
    if result.returncode != 0:
        raise NodeSetupError(
            f"`npm ci` in {target} failed with exit code {result.returncode}. "
            f"Last lines of its error output:\n{_tail(result.stderr)}"
        )


def require_node() -> Path:
    """Return the installed dependency directory, or skip the test with the reason it cannot run."""
    problem = node_problem()
    if problem is not None:
        pytest.skip(problem)
    return install_dependencies()


def prepare_workspace(directory: Path, files: Mapping[str, str]) -> Path:
    """Write *files* (name to text) into *directory*, beside a node_modules symlink."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "node_modules"
    if not link.is_symlink():
        link.symlink_to(install_dependencies() / "node_modules", target_is_directory=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def node_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """Return the environment for node: a few inherited variables plus *variables*."""
    inherited = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
    return {**inherited, **variables}


def _node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise NodeProcessError("no `node` on PATH. Install Node.js to run the JavaScript examples.")
    return node


def run_javascript(
    directory: Path,
    source: str,
    *,
    env: Mapping[str, str],
    filename: str = "main.mjs",
    timeout: float = RUN_TIMEOUT_SECONDS,
) -> subprocess.CompletedProcess[str]:
    """Write *source* into a workspace at *directory* and run it with node until it exits.

    Returns the completed process; the caller checks its exit code. Raises NodeProcessError
    when node is still running after *timeout* seconds.
    """
    prepare_workspace(directory, {filename: source})
    command = [_node_executable(), filename]
    try:
        return subprocess.run(
            command,
            cwd=directory,
            env=node_environment(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise NodeProcessError(
            f"node {filename} was still running after {timeout:.0f} s and was stopped. A pool "
            "or client that is never ended keeps Node.js running. Its output:\n"
            f"{_tail(_decode(error.stdout) + _decode(error.stderr))}"
        ) from None


def _decode(captured: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even when the process ran in text mode.
    if isinstance(captured, bytes):
        return captured.decode(errors="replace")
    return captured or ""


@dataclass(frozen=True)
class HandlerError:
    """An error that a handler threw or that ended its invocation, as the driver reported it."""

    name: str
    message: str
    code: str | None
    stack: str

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        return f"{self.name}{code}: {self.message}"


@dataclass(frozen=True)
class Invocation:
    """The outcome of one handler invocation."""

    request_id: str
    result: Any
    error: HandlerError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status_code(self) -> int | None:
        if isinstance(self.result, dict):
            return self.result.get("statusCode")
        return None

    @property
    def body(self) -> Any:
        """The decoded JSON body of an HTTP-style result."""
        return json.loads(self.result["body"])


@dataclass(frozen=True)
class PoolStats:
    """A pg Pool's counts: clients in total, idle in the pool, and requests waiting for one."""

    total: int
    idle: int
    waiting: int

    @property
    def checked_out(self) -> int:
        return self.total - self.idle


class NodeHandlerProcess:
    """One long-lived node process that imports a handler module and invokes it on request.

    Like a warm function instance, the module is imported once, so its module-scope state
    (such as a pool) lasts across invocations. Use it as a context manager: leaving the
    block closes stdin, waits for node to exit, and kills it if it does not.
    """

    def __init__(self, module: Path, env: Mapping[str, str]) -> None:
        self.module = module
        self.env = node_environment(env)
        self._process: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._output: list[str] = []
        self._output_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._next_id = 0

    def __enter__(self) -> NodeHandlerProcess:
        self.start()
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def output(self) -> str:
        """Everything node wrote to stdout and stderr so far, such as the handler's logs."""
        with self._output_lock:
            return "".join(self._output)

    def start(self) -> None:
        """Start node, import the module, and wait until the driver reports it is ready."""
        reply_read, reply_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [_node_executable(), str(DRIVER), str(self.module), str(reply_write)],
                cwd=self.module.parent,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                pass_fds=(reply_write,),
            )
        finally:
            os.close(reply_write)

        self._start_thread(self._read_replies, os.fdopen(reply_read, encoding="utf-8"))
        self._start_thread(self._read_output, self._process.stdout)

        self._receive(START_TIMEOUT_SECONDS, doing=f"importing {self.module.name}")

    def _start_thread(self, target: Callable[[Any], None], stream: Any) -> None:
        thread = threading.Thread(target=target, args=(stream,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_replies(self, stream: Any) -> None:
        with stream:
            for line in stream:
                try:
                    self._replies.put(json.loads(line))
                except json.JSONDecodeError:
                    self._replies.put({"failure": f"a reply is not JSON: {line!r}"})
        self._replies.put(None)

    def _read_output(self, stream: Any) -> None:
        for line in stream:
            with self._output_lock:
                self._output.append(line)

    def _fail(self, message: str) -> NodeProcessError:
        process = self._process
        status = None
        if process is not None:
            # The pipes close before node exits, so a short wait lets the message include the
            # exit code and node's last output.
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=FAILURE_SETTLE_SECONDS)
            status = process.poll()
        if status is not None:
            for thread in self._threads:
                thread.join(timeout=FAILURE_SETTLE_SECONDS)
        exit_note = f" (node exited with code {status})" if status is not None else ""
        return NodeProcessError(f"{message}{exit_note}. Output of node:\n{_tail(self.output)}")

    def _send(self, message: dict[str, Any]) -> int:
        if self._process is None or self._process.stdin is None:
            raise NodeProcessError("the handler process is not running. Call start() first.")
        self._next_id += 1
        message["id"] = self._next_id
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            raise self._fail(f"node stopped reading requests before {message['op']}") from None
        return self._next_id

    def _receive(self, timeout: float, *, doing: str, request_id: int | None = None) -> dict:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise self._fail(f"node sent no reply within {timeout:.0f} s while {doing}") from None
        if reply is None:
            self._replies.put(None)
            raise self._fail(f"node closed its reply channel while {doing}")
        if request_id is not None and reply.get("id") != request_id:
            raise self._fail(f"node replied to request {reply.get('id')}, expected {request_id}")
        if "failure" in reply:
            raise self._fail(f"the driver could not handle the request: {reply['failure']}")
        return reply

    @staticmethod
    def _invocation_request(
        event: Any, request_id: str | None, function_name: str, timeout_ms: int
    ) -> dict[str, Any]:
        context = {"functionName": function_name, "timeoutMillis": timeout_ms}
        if request_id is not None:
            context["awsRequestId"] = request_id
        return {"event": event, "context": context}

    @staticmethod
    def _invocation(reply: dict[str, Any]) -> Invocation:
        error = reply.get("error")
        return Invocation(
            request_id=reply["requestId"],
            result=reply.get("result"),
            error=HandlerError(**error) if error else None,
        )

    def invoke(
        self,
        event: Any,
        *,
        request_id: str | None = None,
        function_name: str = DEFAULT_FUNCTION_NAME,
        timeout_ms: int = DEFAULT_TIMEOUT_MILLIS,
    ) -> Invocation:
        """Invoke the handler once and wait for its result or error.

        *request_id* becomes `context.awsRequestId` (a new UUID when None). The invocation
        fails with a TimeoutError when the handler runs past *timeout_ms*, as Lambda's
        deadline would end it.
        """
        request = self._invocation_request(event, request_id, function_name, timeout_ms)
        sent = self._send({"op": "invoke", **request})
        reply = self._receive(
            timeout_ms / 1000 + REPLY_GRACE_SECONDS, doing="invoking the handler", request_id=sent
        )
        return self._invocation(reply)

    def invoke_concurrently(
        self, events: Sequence[Any], *, timeout_ms: int = DEFAULT_TIMEOUT_MILLIS
    ) -> list[Invocation]:
        """Start one invocation per event at the same moment in the one process; wait for all."""
        invocations = [
            self._invocation_request(event, None, DEFAULT_FUNCTION_NAME, timeout_ms)
            for event in events
        ]
        sent = self._send({"op": "invoke_batch", "invocations": invocations})
        reply = self._receive(
            timeout_ms / 1000 + REPLY_GRACE_SECONDS,
            doing=f"invoking the handler {len(events)} times at once",
            request_id=sent,
        )
        return [self._invocation(item) for item in reply["results"]]

    def invoke_after_freeze(
        self,
        event: Any,
        while_frozen: Callable[[], object],
        *,
        request_id: str | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MILLIS,
    ) -> Invocation:
        """Block node's event loop, run *while_frozen*, then start an invocation at once.

        A function instance runs no JavaScript between invocations. When it thaws, the
        invocation can start before Node.js reads sockets that the server closed meanwhile,
        so the pool still has clients whose connections are gone. This reproduces that
        order every time: the invocation starts in the same turn of the event loop that ends
        the block.
        """
        request = self._invocation_request(event, request_id, DEFAULT_FUNCTION_NAME, timeout_ms)
        with self._thaw_file() as thaw_file:
            sent = self._send({"op": "invoke", "freezeUntil": str(thaw_file), **request})
            acknowledged = self._receive(
                FREEZE_ACK_TIMEOUT_SECONDS, doing="freezing the event loop", request_id=sent
            )
            if not acknowledged.get("frozen"):
                raise self._fail(f"node did not report its event loop frozen: {acknowledged}")
            try:
                while_frozen()
            finally:
                # Thawed even when *while_frozen* fails, so node does not stay blocked.
                thaw_file.touch()
            reply = self._receive(
                timeout_ms / 1000 + REPLY_GRACE_SECONDS,
                doing="invoking the handler after the freeze",
                request_id=sent,
            )
        return self._invocation(reply)

    @contextmanager
    def _thaw_file(self) -> Iterator[Path]:
        path = self.module.parent / f"thaw-{uuid.uuid4().hex}"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def pool_stats(self) -> PoolStats | None:
        """Return the counts of the pool that the module's getPool() returns, or None without it."""
        sent = self._send({"op": "pool_stats"})
        reply = self._receive(REPLY_GRACE_SECONDS, doing="reading pool counts", request_id=sent)
        stats = reply.get("stats")
        if stats is None:
            return None
        return PoolStats(stats["totalCount"], stats["idleCount"], stats["waitingCount"])

    def wait_until_pool_empty(self, timeout: float = POOL_EMPTY_TIMEOUT_SECONDS) -> None:
        """Poll the pool until it has no client, as after it noticed a lost connection.

        Raises NodeProcessError when the module has no getPool(), node exits, or the pool
        still has a client after *timeout* seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            stats = self.pool_stats()
            if stats is None:
                raise self._fail("the module exports no getPool(), so its pool cannot be read")
            if stats.total == 0:
                return
            if time.monotonic() > deadline:
                raise self._fail(f"the pool still held {stats.total} client(s) after {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        """Close stdin so that the driver ends the pool and exits, and kill node if it hangs."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            with suppress(BrokenPipeError):
                process.stdin.close()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        for thread in self._threads:
            thread.join(timeout=STOP_TIMEOUT_SECONDS)
        if process.stdout is not None:
            process.stdout.close()


def main(arguments: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.node",
        description="Prepare Node.js for the guide's JavaScript examples.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "install",
        help="install the packages of tests/node into the cache (no-op when already installed)",
    )
    parser.parse_args(arguments)

    problem = node_problem()
    if problem is not None:
        # Not an error, because the tests then skip the JavaScript examples with this reason.
        print(f"JavaScript examples will be skipped: {problem}", file=sys.stderr)
        return 0
    try:
        directory = install_dependencies()
    except NodeSetupError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"Node.js packages installed in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
