"""Run copies of a snippet in separate processes, as concurrent instances of one function.

Each instance is a Python process that loads the snippet as a fresh module, so it has a
pool of its own, and calls the snippet's `fetch(query, params)` from several threads at
once. It then reports the outcome of every call as one JSON line on stdout and keeps its
pool, and so its connections, open until the test closes its stdin. Run as a program, this
module is the instance:

    python -m tests.harness.function_instances SNIPPET SOURCE_FILE THREADS SLEEP_SECONDS

SNIPPET is the path under snippets/ that the copy in SOURCE_FILE was made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.snippets import ROOT, close_pools, load_module

REPORT_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class CallOutcome:
    """One call of `fetch` in an instance: None for success, or the error it raised."""

    error_type: str | None
    message: str | None
    sqlstate: str | None


@dataclass(frozen=True)
class InstanceReport:
    """What one instance reported, with everything it wrote to stderr (such as pool logs)."""

    calls: tuple[CallOutcome, ...]
    stderr: str

    @property
    def succeeded(self) -> bool:
        return all(call.error_type is None for call in self.calls)


class FunctionInstances:
    """Running instances, as `running_instances()` starts them."""

    def __init__(self, processes: list[subprocess.Popen[str]], stderr_paths: list[Path]) -> None:
        self._processes = processes
        self._stderr_paths = stderr_paths
        self._lines: list[str | None] = [None] * len(processes)
        self._readers = [
            threading.Thread(target=self._read_report, args=(index,), daemon=True)
            for index in range(len(processes))
        ]
        for reader in self._readers:
            reader.start()

    def _read_report(self, index: int) -> None:
        stdout = self._processes[index].stdout
        if stdout is not None:
            self._lines[index] = stdout.readline()

    def all_reported(self) -> bool:
        return all(not reader.is_alive() for reader in self._readers)

    def reports(self, timeout: float = REPORT_TIMEOUT_SECONDS) -> list[InstanceReport]:
        """Wait until every instance reported its calls and return the reports.

        Raises RuntimeError with the instance's stderr when one exits without a report or
        has not reported after *timeout* seconds.
        """
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))

        reports = []
        for index, line in enumerate(self._lines):
            stderr = self._stderr_paths[index].read_text(errors="replace")
            if not line:
                raise RuntimeError(
                    f"function instance {index} sent no report within {timeout:.0f} s; "
                    f"its stderr:\n{stderr[-4000:] or '(empty)'}"
                )
            calls = tuple(CallOutcome(**call) for call in json.loads(line)["calls"])
            reports.append(InstanceReport(calls, stderr))
        return reports


@contextmanager
def running_instances(
    snippet: str,
    source: str,
    *,
    count: int,
    threads: int,
    sleep_seconds: float,
    database_url: str,
    directory: Path,
) -> Iterator[FunctionInstances]:
    """Start *count* instances of *source*, a copy of *snippet*, and stop them afterwards.

    Each instance runs `fetch("SELECT pg_sleep(%s)", (sleep_seconds,))` from *threads*
    threads at once, with DATABASE_URL set to *database_url*.
    """
    directory.mkdir(parents=True, exist_ok=True)
    source_file = directory / "instance_snippet.py"
    source_file.write_text(source)
    environment = {**os.environ, "DATABASE_URL": database_url}

    processes: list[subprocess.Popen[str]] = []
    stderr_paths: list[Path] = []
    try:
        for index in range(count):
            stderr_path = directory / f"instance-{index}.stderr"
            stderr_paths.append(stderr_path)
            with open(stderr_path, "w") as stderr:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "tests.harness.function_instances",
                            snippet,
                            str(source_file),
                            str(threads),
                            str(sleep_seconds),
                        ],
                        cwd=ROOT,
                        env=environment,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        text=True,
                    )
                )
        yield FunctionInstances(processes, stderr_paths)
    finally:
        stop_processes(processes)


def stop_processes(processes: list[subprocess.Popen[str]]) -> None:
    """Close each instance's stdin so it closes its pool and exits, and kill it if it hangs."""
    for process in processes:
        if process.stdin is not None:
            with suppress(BrokenPipeError, ValueError):
                process.stdin.close()
    for process in processes:
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        if process.stdout is not None:
            process.stdout.close()


def _call(module: Any, sleep_seconds: float) -> dict[str, str | None]:
    try:
        module.fetch("SELECT pg_sleep(%s)", (sleep_seconds,))
    except Exception as error:
        return {
            "error_type": f"{type(error).__module__}.{type(error).__qualname__}",
            "message": str(error),
            "sqlstate": getattr(error, "sqlstate", None),
        }
    return {"error_type": None, "message": None, "sqlstate": None}


def main(arguments: list[str]) -> int:
    snippet, source_file = arguments[0], Path(arguments[1])
    threads, sleep_seconds = int(arguments[2]), float(arguments[3])
    module = load_module(snippet, source_file.read_text())

    outcomes: list[dict[str, str | None]] = [{} for _ in range(threads)]

    def call(index: int) -> None:
        outcomes[index] = _call(module, sleep_seconds)

    workers = [threading.Thread(target=call, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    print(json.dumps({"calls": outcomes}), flush=True)
    # Keep the pool's connections open until the test has looked at the server.
    sys.stdin.read()
    close_pools(module)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
