"""A TCP server that accepts connections and reads from them but never replies.

To a client it looks like a database server that stopped responding after the TCP
handshake: the connection opens, the client sends its first message, and no reply comes.
Only a client-side timeout ends that wait.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from types import TracebackType

HOST = "127.0.0.1"
# Seconds after which the server stops by itself, for a test that never calls stop().
DEFAULT_LIFETIME_SECONDS = 60.0
POLL_SECONDS = 0.05
READ_SIZE = 4096
STOP_TIMEOUT_SECONDS = 5.0


class SilentServer:
    """Listens on a free port of 127.0.0.1 in a background thread until stopped.

    Use it as a context manager. Stopping closes every accepted connection, which ends the
    wait of a client that has no timeout of its own.
    """

    def __init__(self, lifetime: float = DEFAULT_LIFETIME_SECONDS) -> None:
        self.lifetime = lifetime
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._accepted = 0
        self._bytes_received = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)

    def __enter__(self) -> SilentServer:
        self.start()
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, database: str = "guide", user: str = "guide") -> str:
        """Return a PostgreSQL URL that points at this server."""
        return f"postgresql://{user}@{HOST}:{self.port}/{database}"

    @property
    def accepted(self) -> int:
        """How many connections the server has accepted so far."""
        with self._lock:
            return self._accepted

    @property
    def bytes_received(self) -> int:
        """How many bytes clients have sent in total, such as a startup or SSL request."""
        with self._lock:
            return self._bytes_received

    def start(self) -> None:
        self._listener.listen()
        self._listener.setblocking(False)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every accepted connection, then wait for the thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise RuntimeError(
                f"the silent server on port {self.port} did not stop within "
                f"{STOP_TIMEOUT_SECONDS} s"
            )
        self._listener.close()

    def _serve(self) -> None:
        deadline = time.monotonic() + self.lifetime
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set() and time.monotonic() < deadline:
                    for key, _ in selector.select(timeout=POLL_SECONDS):
                        if key.fileobj is self._listener:
                            self._accept(selector)
                        else:
                            self._read(selector, key.fileobj)
            finally:
                for key in list(selector.get_map().values()):
                    if key.fileobj is not self._listener:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            connection, _ = self._listener.accept()
        except BlockingIOError:
            return
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ)
        with self._lock:
            self._accepted += 1

    def _read(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        try:
            data = connection.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The client gave up and closed its end.
            selector.unregister(connection)
            connection.close()
            return
        with self._lock:
            self._bytes_received += len(data)
