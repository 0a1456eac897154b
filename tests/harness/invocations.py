"""Run a function handler the way a serverless platform does, and report what the server saw.

A *deployment* is one function as a platform would deploy it: its files, its settings and
the program that hosts it (a Lambda runtime interface client, a Functions Framework server, an
Azure Functions worker). `deployment.start()` is a cold start: a new process that imports the
handler's module afresh. The process is a *function instance*, and the pool the module keeps
lives exactly as long as it does.

The platform modules build deployments: `lambda_functions`, `cloud_run_functions` and
`azure_functions`. This module contains what they share:

- `HttpRequest` and `Invocation`: what a client sends and what an invocation returned,
  including its latency as the harness measured it, from sending to receiving the outcome;
- `FunctionInstance`: the process, with `freeze()` and `thaw()` (SIGSTOP and SIGCONT on its
  process group, so no timer or background thread of the pool runs while it is frozen) and
  `output`, everything it logged;
- `InstanceSet`: starts instances and stops every one of them when the block ends, also when a
  test fails;
- the invocation patterns: `warm_invocations`, `cold_starts`, `concurrent_instances`,
  `threaded_invocations`, `frozen`, and `idle_gap` with `set_idle_session_timeout`;
- `ServerReport`: the connections the server counted and the states of the sessions it has open.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from tests.harness.databases import TestDatabase

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 10.0
FREEZE_TIMEOUT_SECONDS = 5.0
# Time allowed past an invocation's own timeout before the harness gives up waiting.
REPLY_GRACE_SECONDS = 10.0
# Margin on top of the server's idle_session_timeout before the sessions must be gone.
IDLE_GAP_MARGIN_SECONDS = 5.0
OUTPUT_TAIL_CHARACTERS = 4000

# Variables a function process inherits from the test run. Database settings such as the
# PG* variables stay out, so the code under test relies on DATABASE_URL alone.
INHERITED_VARIABLES = ("PATH", "HOME", "LANG", "NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE")


class InstanceError(RuntimeError):
    """A function instance failed to start, exited, or stopped responding. Includes its output."""


def inherited_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """Return a few variables of the test run plus *variables*, for a function process."""
    inherited = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
    return {**inherited, **variables}


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request to a function, which each platform turns into its own invocation."""

    body: bytes = b""
    method: str = "POST"
    content_type: str | None = "application/json"
    path: str = "/events"

    @classmethod
    def json(cls, payload: Any) -> HttpRequest:
        return cls(json.dumps(payload).encode())

    @classmethod
    def message(cls, message: str) -> HttpRequest:
        """The request the guide's functions store: a JSON object with one `message`."""
        return cls.json({"message": message})

    def headers(self) -> dict[str, str]:
        return {"content-type": self.content_type} if self.content_type else {}

    def body_for_event(self) -> tuple[str, bool]:
        """Return the body as an event carries it: text, or base64 when it is not UTF-8."""
        try:
            return self.body.decode("utf-8"), False
        except UnicodeDecodeError:
            return base64.b64encode(self.body).decode("ascii"), True


@dataclass(frozen=True)
class Invocation:
    """The outcome of one invocation.

    `status` and `body` are the HTTP status and the decoded body the function returned (text
    when the body is not JSON). `error` is set instead when the invocation failed as a whole,
    as when the handler raised or the instance died. `latency_seconds` runs from sending the
    request to receiving the outcome, measured by the harness.
    """

    status: int | None
    body: Any
    error: str | None
    latency_seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and self.status < 500


def decode_body(body: bytes | str) -> Any:
    """Return a response body as JSON when it parses, or as text."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _stat_fields(pid: int) -> list[str]:
    # The command name in parentheses may contain spaces, so the fields start after it.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_stopped(pid: int) -> bool:
    """Return whether process *pid* is stopped by a signal: state T in /proc."""
    try:
        return _stat_fields(pid)[0] == "T"
    except (FileNotFoundError, ProcessLookupError):
        return False


def process_running(pid: int) -> bool:
    """Return whether process *pid* exists and is neither stopped nor a zombie."""
    try:
        return _stat_fields(pid)[0] not in ("T", "Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def process_group(group: int) -> list[int]:
    """Return the ids of the processes in process group *group*, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == group:
            members.append(int(stat.parent.name))
    return members


class FunctionInstance(ABC):
    """One running instance of a function: a process group that the harness started.

    Subclasses start the process in `start()` and implement `invoke()`. The process runs in a
    session of its own, so `freeze()`, `thaw()` and `close()` reach every process it spawned,
    such as a gunicorn worker.
    """

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @abstractmethod
    def start(self) -> None:
        """Start the process and return once it can take an invocation."""

    @abstractmethod
    def invoke(self, request: HttpRequest) -> Invocation:
        """Send *request* to the instance and wait for its outcome."""

    def wait_until_idle(self, timeout: float = IDLE_TIMEOUT_SECONDS) -> None:  # noqa: B027
        """Return once the instance is between invocations.

        The harness invokes instances synchronously, so an instance is idle whenever no call to
        `invoke` is running. A subclass overrides this where the platform marks the point.
        """

    @property
    def output(self) -> str:
        """Everything the instance wrote to stdout and stderr so far, such as its logs."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _popen(
        self, command: Sequence[str], *, cwd: Path, env: Mapping[str, str], **options: Any
    ) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env),
                stdout=options.pop("stdout", log),
                stderr=log,
                start_new_session=True,
                **options,
            )

    def _signal(self, signal_number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal_number)

    def failure(self, message: str) -> InstanceError:
        """Return an InstanceError for *message* with the exit status and end of the output."""
        status = self.process.poll() if self.process is not None else None
        exited = f" (the process exited with code {status})" if status is not None else ""
        tail = self.output[-OUTPUT_TAIL_CHARACTERS:] or "(no output)"
        return InstanceError(f"{self.name}: {message}{exited}. Its output:\n{tail}")

    def require_running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise InstanceError(f"{self.name} was never started")
        if self.process.poll() is not None:
            raise self.failure("the instance is not running")
        return self.process

    def freeze(self) -> None:
        """Stop every process of the instance with SIGSTOP, as a platform freezes it.

        Returns once the kernel reports each process of the group as stopped, because signal
        delivery is asynchronous.
        """
        process = self.require_running()
        self._signal(signal.SIGSTOP)
        self.frozen = True
        deadline = time.monotonic() + FREEZE_TIMEOUT_SECONDS
        while any(process_running(pid) for pid in process_group(process.pid)):
            if time.monotonic() > deadline:
                raise self.failure(
                    f"the instance was not stopped {FREEZE_TIMEOUT_SECONDS} s after SIGSTOP"
                )
            time.sleep(0.005)

    def thaw(self) -> None:
        """Resume a frozen instance with SIGCONT, and return once its processes run again."""
        self._signal(signal.SIGCONT)
        self.frozen = False
        if self.process is None:
            return
        deadline = time.monotonic() + FREEZE_TIMEOUT_SECONDS
        while any(process_stopped(pid) for pid in process_group(self.process.pid)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def close(self) -> None:
        """Stop the instance: SIGTERM to its process group, then SIGKILL if it lingers."""
        process = self.process
        if process is None:
            return
        if self.frozen:
            # A stopped process does not act on SIGTERM until it is resumed.
            self.thaw()
        self._signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        # Worker processes of the group may outlive the leader for a moment.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


class Deployment(Protocol):
    """A function ready to run: `start()` returns a new instance that is not started yet."""

    name: str

    def start(self) -> FunctionInstance: ...


class InstanceSet:
    """Starts instances of deployments and stops all of them when the `with` block ends."""

    def __init__(self) -> None:
        self._instances: list[FunctionInstance] = []
        self._lock = threading.Lock()

    def __enter__(self) -> InstanceSet:
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, deployment: Deployment) -> FunctionInstance:
        """Cold-start one instance of *deployment* and return it once it is ready."""
        instance = deployment.start()
        with self._lock:
            self._instances.append(instance)
        instance.start()
        return instance

    def stop(self, instance: FunctionInstance) -> None:
        instance.close()

    def close(self) -> None:
        with self._lock:
            instances, self._instances = self._instances, []
        errors = []
        for instance in instances:
            try:
                instance.close()
            except Exception as error:  # every instance gets its turn to stop
                errors.append(error)
        if errors:
            raise errors[0]

    @property
    def outputs(self) -> str:
        """The output of every instance started so far, one after another."""
        with self._lock:
            return "".join(instance.output for instance in self._instances)


def warm_invocations(
    instance: FunctionInstance, requests: Sequence[HttpRequest]
) -> list[Invocation]:
    """Invoke one instance with each request in turn, as a platform reuses a warm instance."""
    return [instance.invoke(request) for request in requests]


def cold_starts(
    instances: InstanceSet, deployment: Deployment, requests: Sequence[HttpRequest]
) -> list[Invocation]:
    """Invoke each request on a new instance, stopping each instance after its invocation."""
    outcomes = []
    for request in requests:
        instance = instances.start(deployment)
        outcomes.append(instance.invoke(request))
        instances.stop(instance)
    return outcomes


def _invoke_together(
    jobs: Sequence[Callable[[], list[Invocation]]],
) -> list[list[Invocation]]:
    barrier = threading.Barrier(len(jobs))

    def run(job: Callable[[], list[Invocation]]) -> list[Invocation]:
        barrier.wait(timeout=START_TIMEOUT_SECONDS)
        return job()

    with ThreadPoolExecutor(max_workers=len(jobs)) as executor:
        futures = [executor.submit(run, job) for job in jobs]
        return [future.result() for future in futures]


def concurrent_instances(
    instances: InstanceSet,
    deployment: Deployment,
    *,
    count: int,
    requests: Callable[[int], Sequence[HttpRequest]],
) -> list[list[Invocation]]:
    """Start *count* instances, then invoke all of them at once; return each one's outcomes.

    `requests(index)` gives the requests for instance *index*, sent to it one after another,
    as a platform sends one request at a time to an instance whose concurrency is 1.
    """
    started = [instances.start(deployment) for _ in range(count)]
    jobs = [
        (lambda instance=instance, index=index: warm_invocations(instance, requests(index)))
        for index, instance in enumerate(started)
    ]
    return _invoke_together(jobs)


def threaded_invocations(
    instance: FunctionInstance,
    *,
    threads: int,
    requests: Callable[[int], Sequence[HttpRequest]],
) -> list[list[Invocation]]:
    """Invoke one instance from *threads* threads at once, for an instance whose concurrency
    is above 1; `requests(index)` gives the requests that thread *index* sends in turn."""
    jobs = [
        (lambda index=index: warm_invocations(instance, requests(index)))
        for index in range(threads)
    ]
    return _invoke_together(jobs)


@contextmanager
def frozen(instance: FunctionInstance) -> Iterator[FunctionInstance]:
    """Freeze *instance* between invocations for the block, and thaw it afterwards."""
    instance.wait_until_idle()
    instance.freeze()
    try:
        yield instance
    finally:
        instance.thaw()


def set_idle_session_timeout(database: TestDatabase, seconds: float) -> None:
    """Make the server end sessions of *database* that stay idle for *seconds*.

    PostgreSQL applies the setting to sessions opened afterwards, so call it before the
    function opens its connection.
    """
    milliseconds = int(seconds * 1000)
    # NOTE: run only against PostgreSQL so far; on CockroachDB this statement is untried.
    with database.connect() as connection:
        connection.execute(
            f"ALTER DATABASE {database.name} SET idle_session_timeout = {milliseconds}"
        )


def idle_gap(database: TestDatabase, seconds: float) -> float:
    """Wait out the server's idle timeout of *seconds*: return once the server has ended every
    session of the function, and return how long that took.

    Raises TimeoutError when sessions are still open well after the timeout.
    """
    started = time.monotonic()
    time.sleep(seconds)
    deadline = started + seconds + IDLE_GAP_MARGIN_SECONDS
    while database.view.sessions():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"sessions of {database.name} were still open "
                f"{seconds + IDLE_GAP_MARGIN_SECONDS} s after an idle timeout of {seconds} s"
            )
        time.sleep(0.05)
    return time.monotonic() - started


@dataclass(frozen=True)
class ServerReport:
    """The database server's account of a function: connections opened, and sessions open now."""

    connections_opened: int
    session_states: tuple[str, ...]

    @property
    def sessions_open(self) -> int:
        return len(self.session_states)

    @classmethod
    def read(cls, database: TestDatabase) -> ServerReport:
        sessions = database.view.sessions()
        return cls(
            connections_opened=database.view.connections_opened(),
            session_states=tuple(sorted(session.state for session in sessions)),
        )
