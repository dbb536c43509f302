"""A TCP proxy that loses one answer on purpose: it holds the first response of a chosen status on its
way to the client, then cuts the connection when the test says so (the client never reads it).

That is the fault of a network that drops a connection while the server's answer travels: the server
has done the work, the client does not know it. Everything else is forwarded byte for byte, both ways,
so the client, its retries and its WebSocket all go through the proxy as they would through a real
network hop.
"""

from __future__ import annotations

import socket
import threading


class AnswerCutter:
    """Forward ``127.0.0.1:<port>`` to ``target_port``; hold the first answer whose bytes hold ``status_line``."""

    def __init__(self, target_port: int, status_line: bytes = b"HTTP/1.1 201") -> None:
        self.target_port = target_port
        self.status_line = status_line
        self.held = threading.Event()  # an answer is held: the server did the work
        self._cut = threading.Event()
        self._armed = True
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Close the connection whose answer is held, without sending it."""
        self._cut.set()

    def close(self) -> None:
        self._cut.set()
        self._listener.close()
        for sock in list(self._sockets):
            close_socket(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                close_socket(client)  # the server is down: the client sees a refused-like reset and retries
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while chunk := source.recv(1 << 16):
                if answers and self._should_hold(chunk):
                    self.held.set()
                    self._cut.wait()
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            close_socket(source)
            close_socket(sink)

    def _should_hold(self, chunk: bytes) -> bool:
        with self._lock:
            if self._armed and self.status_line in chunk:
                self._armed = False
                return True
            return False


def close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
