"""An archive encoded while it is sent: members encoded in a thread of their own, read as they are made.

For the lossy float codecs whose encoded size depends on the shapes alone (:data:`STREAMED_CODECS`: ``int8``
and ``bf16``), the archive's size is known before a value is encoded, so an upload can declare its length and
start sending as soon as the first member is ready, while the next ones are encoded (one pass per frame:
encode, decode, CRC of the decoded values and, with error feedback, the residual, all at once; the whole-archive
path encodes each frame three times). A member's local header carries the CRC of its decoded values, so a
member goes out only once all of it is encoded; the thread runs ahead of the link and keeps what it made,
so a retried upload sends the very same bytes again without encoding anything twice. The bytes are those of
:func:`~.archive_write.prepare` with the same codec.

``fp16`` is not streamed: it refuses values beyond its range while encoding, which would end an upload midway.

Example:
    >>> layers = [np.linspace(-1, 1, 1000, dtype=np.float32)]
    >>> streamed = StreamedArchive.of_layers(layers, 2.0, "int8")
    >>> data = b"".join(streamed.chunks())
    >>> data == prepare(layers, 2.0, compression="int8").getvalue(), len(data) == streamed.size
    (True, True)
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterator, Sequence, Union

import numpy as np

from .archive_write import CHUNK, prepare  # noqa: F401 - prepare: the example above compares with it
from .errors import ArchiveError
from .float_codecs import FRAME_VALUES, FloatCodec, frame_prefix, is_float32_header
from .npy import npy_member
from .payload_kinds import FEDERATED_LEARNING
from .tensor_codecs import codec_named, crc32, marker
from .zipformat import ZipLayout

logger = logging.getLogger(__name__)

#: codecs whose encoded size is known from the shapes and whose encoding of finite values cannot fail
STREAMED_CODECS = frozenset({"int8", "bf16"})
Piece = Union[bytes, memoryview]


def streams(codec: str) -> bool:
    """Whether an upload in ``codec`` is encoded while it is sent (:class:`StreamedArchive`).

    Example:
        >>> streams("int8"), streams("none"), streams("fp16")
        (True, False, False)
    """
    return codec in STREAMED_CODECS


class StreamedArchive:
    """A model archive of ``members`` (name, array) in ``codec``, encoded by a thread that starts at once.

    ``settle``: arrays (error feedback's residual buffers, which are also the arrays encoded) that each become
    what the codec dropped of them once encoded (``values - decoded(values)``), frame by frame; ``compensate``:
    for each of them, the values added into it just before it is encoded (this round's layer: the first
    member goes out without waiting for the whole model to be compensated), or None. ``size`` is the
    archive's length before anything is encoded; :meth:`chunks` yields its bytes as they are made (each call
    from the start), and re-raises the encoding's error, if any. The arrays must not change until :meth:`wait`
    returns. Memory: the encoded archive (a quarter of float32 for int8) and one frame's temporaries.
    """

    def __init__(self, members: Sequence[tuple[str, np.ndarray]], codec: FloatCodec,
                 settle: Sequence[np.ndarray] = (), compensate: Sequence[np.ndarray | None] = ()) -> None:
        if codec.name not in STREAMED_CODECS:
            raise ValueError(f"Expected a codec in {sorted(STREAMED_CODECS)}. Received: codec={codec.name!r}")
        self.codec = codec
        self._settle = {id(array) for array in settle}
        self._compensate = {id(array): added for array, added in zip(settle, compensate) if added is not None}
        self._plan = [(key, np.asarray(array), *npy_member(key, np.asarray(array))) for key, array in members]
        sizes, layout, tag = [], ZipLayout(), marker(codec)
        for key, _, header, data in self._plan:
            csize = self._encoded_size(header, data)
            sizes.append(csize)
            layout.member(key, codec.method, 0, len(header) + data.nbytes, csize, tag)  # same length, any CRC
        self._sizes = sizes
        self.size = layout.offset + len(layout.end())
        self._pieces: list[Piece] = []
        self._done = False
        self._error: BaseException | None = None
        self._ready = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._produce, name=f"bk-encode-{codec.name}", daemon=True)
        self._thread.start()

    @classmethod
    def of_layers(cls, layers: Sequence[np.ndarray], weighting: float | None, codec: str,
                  settle: Sequence[np.ndarray] = (), controls: Sequence[np.ndarray] = (),
                  compensate: Sequence[np.ndarray | None] = ()) -> "StreamedArchive":
        """A model upload (``weighting`` checked by the caller, as :func:`~.archive_write.prepare` with
        ``checked=True``) of ``layers`` and SCAFFOLD's ``controls`` in the codec named ``codec``."""
        found = codec_named(codec)
        if not isinstance(found, FloatCodec):
            raise ValueError(f"Expected a codec in {sorted(STREAMED_CODECS)}. Received: codec={codec!r}")
        return cls(FEDERATED_LEARNING.members(layers, weighting, controls), found, settle, compensate)

    def _encoded_size(self, header: bytes, data: memoryview) -> int:
        size = len(frame_prefix(0, 0, 0)) + len(header)
        if not is_float32_header(header):
            return size + (len(frame_prefix(0, 0, 0)) + data.nbytes if data.nbytes else 0)
        count = data.nbytes // 4
        for start in range(0, count, FRAME_VALUES):
            size += len(frame_prefix(0, 0, 0)) + self.codec.payload_bound(min(FRAME_VALUES, count - start))
        return size

    def _produce(self) -> None:
        layout, tag = ZipLayout(), marker(self.codec)
        try:
            for (key, array, header, data), csize in zip(self._plan, self._sizes):
                pieces, crc = self._member(array, header, data)
                made = sum(len(piece) for piece in pieces)
                if made != csize:  # the size was declared before encoding: a codec that broke its promise
                    raise ArchiveError(f"{key}: {self.codec.name} encoded {made} bytes where {csize} were declared.")
                local = layout.member(key, self.codec.method, crc, len(header) + data.nbytes, csize, tag)
                self._publish([local, *pieces])
            self._publish([layout.end()])
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            logger.debug("encoding the streamed archive failed: %s", exc)
            with self._ready:
                self._error = exc
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()
                listeners = list(self._listeners)
            for listener in listeners:
                listener()

    def _member(self, array: np.ndarray, header: bytes, data: memoryview) -> tuple[list[Piece], int]:
        """One member's frames and the CRC of its decoded bytes, the residual settled on the way."""
        pieces: list[Piece] = [frame_prefix(0, len(header), len(header)) + header]
        crc = crc32(header)
        if not is_float32_header(header):
            if data.nbytes:
                pieces += [frame_prefix(0, data.nbytes, data.nbytes), bytes(data)]
            return pieces, crc32(data, crc)
        added = self._compensate.pop(id(array), None)
        if added is not None:  # a view of ``array``'s memory is what ``data`` is: it sees the sum
            np.add(array, added, out=array)
        values = np.frombuffer(data, np.float32)
        residual = array.reshape(-1) if id(array) in self._settle and array.flags.c_contiguous else None
        for start in range(0, values.size, FRAME_VALUES):
            piece = values[start:start + FRAME_VALUES]
            payload = self.codec.encode_frame(piece)
            decoded = self.codec.decode_frame(memoryview(payload), piece.size)
            crc = crc32(decoded, crc)
            if residual is not None:  # after encoding it: what was sent is kept only as bytes from here on
                residual[start:start + piece.size] -= decoded
            pieces += [frame_prefix(1, len(payload), piece.nbytes), payload]
        return pieces, crc

    def _publish(self, pieces: list[Piece]) -> None:
        with self._ready:
            self._pieces.extend(pieces)
            self._ready.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from the encoding thread: it must not block) whenever more bytes are ready or the
        encoding ended, so a reader on an event loop can wait without a thread (:meth:`ready`)."""
        with self._ready:
            self._listeners.append(listener)
        listener()

    def ready(self, index: int) -> tuple[list[Piece], bool]:
        """Without waiting: the pieces made from ``index`` on (indices count pieces, not bytes) and whether that
        is all of them; re-raises the encoding's error."""
        with self._ready:
            if self._error is not None:
                raise self._error
            return self._pieces[index:], self._done

    def chunks(self, limit: int = CHUNK) -> Iterator[Piece]:
        """The archive's bytes in order, each piece as soon as its member is encoded (views of at most ``limit``)."""
        index = 0
        while True:
            with self._ready:
                while index >= len(self._pieces) and not self._done:
                    self._ready.wait()
                if self._error is not None:
                    raise self._error
                batch = self._pieces[index:]
            if not batch:
                return
            index += len(batch)
            for piece in batch:
                view = memoryview(piece)
                for start in range(0, len(view), limit):
                    yield view[start:start + limit]

    def wait(self) -> None:
        """Until every member is encoded (and each residual settled); re-raises the encoding's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error


__all__ = ["STREAMED_CODECS", "StreamedArchive", "streams"]
