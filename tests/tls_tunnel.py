"""What an operator runs beside a client that cannot speak TLS (stunnel in client mode): plain TCP on a loopback
port, forwarded over TLS to a server whose certificate is verified against a CA bundle.

The official 2.7.1 client opens plain AMQP only (``pika.ConnectionParameters`` without ``ssl_options``), so
its leaf reaches an ``amqps://`` broker through one of these; its REST calls verify https themselves.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path


class TlsTunnel:
    """Forward ``127.0.0.1:port`` (plain) to ``host:target_port`` over TLS verified with ``ca``; :meth:`close`."""

    def __init__(self, host: str, target_port: int, ca: Path) -> None:
        self.host, self.target_port = host, target_port
        self.context = ssl.create_default_context(cafile=str(ca))  # verifies the broker's certificate and name
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._forward, "127.0.0.1", 0))
        ready.set()
        self.loop.run_forever()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port, ssl=self.context,
                                                                 server_hostname=self.host)
        except (OSError, ssl.SSLError):
            writer.close()
            return
        self.connections += 1

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
