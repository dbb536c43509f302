"""Codecs for float32 weights: lossless ``shuffle-zstd``, and the lossy ``fp16``, ``bf16`` and ``int8`` (blockwise).

Each is a :class:`~.tensor_codecs.Codec` over one ``.npy`` member, registered here, and travels marked
(:data:`~.tensor_codecs.MARKED_METHOD`): an archive using one is readable only where the codec is
registered, and a server accepts one only where its branch advertises it (see :mod:`.codec_choice`). The
member decodes to the ``.npy`` bytes of float32 values (the lossy ones: the dequantized values), so every
reader, check and fold downstream sees plain float32; a member that is not float32 (the weighting, an int
counter) travels as it is.

The encoded member is a series of frames, each ``<type u8><payload u32><decoded u32>`` then the payload,
decoding to at most :data:`FRAME_VALUES` values: the decoder (:class:`FramedDecoder`) holds one frame, checks
its declared sizes against what is left of the member's declared size before allocating anything, and
refuses a block scale that is NaN, infinite, negative, or zero under non-zero values.

``shuffle-zstd`` rotates each value's sign bit below its exponent, splits the values into byte planes and
compresses the two high planes with zstd (the ``[zstd]`` extra; registered only where it is installed): the
two low planes are mantissa, which no compressor shrinks, so they travel as they are (and cost no time).
A uint32 member (the XOR of float32 bit patterns that a delta upload sends, :mod:`.delta`) it writes as frames of
bits (type 2): all four byte planes zstd-compressed, since there the low planes are partly zero too.

Example:
    >>> values = np.linspace(-1, 1, 1000, dtype=np.float32)
    >>> out = INT8.dequantized(values)
    >>> bool(np.abs(out - values).max() <= 1 / 127 / 2 + 1e-7), out.dtype.name
    (True, 'float32')
    >>> header, data = npy_member("layer_0", values, False)
    >>> decoded = INT8.decode(INT8.encode(header + bytes(data)))
    >>> np.array_equal(np.frombuffer(decoded[len(header):], np.float32), out)
    True
"""

from __future__ import annotations

import io
import struct
from typing import ClassVar, Sequence

import numpy as np

from .errors import ArchiveError
from .npy import npy_member  # noqa: F401 - the example above uses it
from .tensor_codecs import Codec, Pieces, RawMember, crc32, register_codec

try:  # the optional extra [zstd]
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the environment
    _zstd = None  # type: ignore[assignment]

#: values in one frame: 1 MiB of float32, what the decoder holds at most
FRAME_VALUES = 1 << 18
#: values sharing one int8 scale
INT8_BLOCK = 256
_FRAME = struct.Struct("<BII")
#: frame types: bytes as they are; float32 values; 4-byte bit patterns (a delta upload's XOR, :mod:`.delta`)
_RAW, _VALUES, _BITS = 0, 1, 2
_F32, _U32 = np.dtype("<f4"), np.dtype("<u4")


def _header_dtype(header: bytes) -> np.dtype | None:
    """The dtype the ``.npy`` ``header`` describes; None for a header numpy cannot read."""
    try:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return np.dtype(reader(stream)[2])
    except ValueError:
        return None


def _float32_header(header: bytes) -> bool:
    """Whether the ``.npy`` ``header`` describes little-endian float32 values (what the lossy codecs compress)."""
    return _header_dtype(header) == _F32


def is_float32_header(header: bytes) -> bool:
    """Whether a member with this ``.npy`` ``header`` is encoded as values (little-endian float32) or raw."""
    return _float32_header(header)


def frame_prefix(kind: int, payload: int, decoded: int) -> bytes:
    """The header of one frame: its type (0: raw bytes, 1: values), payload bytes and decoded bytes."""
    return _FRAME.pack(kind, payload, decoded)


class FloatCodec(Codec):
    """A codec of frames (see the module): ``encode_frame``/``decode_frame`` of float32 values, the rest raw."""

    name: ClassVar[str] = ""
    #: True for a codec whose decoded values differ from the original (opt-in: ``quantize=``)
    lossy: ClassVar[bool] = False
    #: True for a codec that also encodes uint32 members (bit patterns: a delta upload's XOR) in frames of bits
    encodes_bits: ClassVar[bool] = False

    def encode_frame(self, values: np.ndarray) -> bytes:
        raise NotImplementedError

    def decode_frame(self, payload: memoryview, count: int) -> np.ndarray:
        raise NotImplementedError

    def encode_bits_frame(self, bits: np.ndarray) -> bytes:
        raise NotImplementedError(f"codec {self.name!r} encodes no bits frames")

    def decode_bits_frame(self, payload: memoryview, count: int) -> np.ndarray:
        raise ArchiveError(f"A {self.name} member holds a frame of bits, which {self.name} never writes; corrupt.")

    def payload_bound(self, count: int) -> int:
        """The most payload bytes a frame of ``count`` values may hold (larger is refused unread)."""
        return 4 * count + 64

    def encode(self, data: bytes) -> bytes:
        view = memoryview(data)
        length = np.lib.format.MAGIC_LEN + (2 if data[6:7] == b"\x01" else 4)
        length += int.from_bytes(data[8:length], "little")
        return b"".join(self._frames(bytes(view[:length]), view[length:]))

    def encode_members(self, raws: Sequence[RawMember], level: int) -> list[Pieces]:
        return [tuple(self._frames(header, data)) for header, data in raws]

    def _frames(self, header: bytes, data: memoryview) -> list[bytes]:
        frames = [_FRAME.pack(_RAW, len(header), len(header)) + header]
        dtype = _header_dtype(header)
        bits = self.encodes_bits and dtype == _U32
        if dtype != _F32 and not bits:
            return frames + ([_FRAME.pack(_RAW, data.nbytes, data.nbytes), bytes(data)] if data.nbytes else [])
        values = np.frombuffer(data, _U32 if bits else _F32)
        for start in range(0, values.size, FRAME_VALUES):
            piece = values[start:start + FRAME_VALUES]
            payload = self.encode_bits_frame(piece) if bits else self.encode_frame(piece)
            frames.append(_FRAME.pack(_BITS if bits else _VALUES, len(payload), piece.nbytes) + payload)
        return frames

    def decode(self, data: bytes) -> bytes:
        decoder = FramedDecoder(self, len(data), None)
        decoder.feed(data)
        out = []
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
        if not decoder.done:
            raise ArchiveError(f"A {self.name} member ends early; it is truncated.")
        return b"".join(out)

    def sized_decoder(self, compressed_size: int, decoded_size: int | None) -> FramedDecoder:
        return FramedDecoder(self, compressed_size, decoded_size)

    def decoder(self, compressed_size: int) -> FramedDecoder:
        return FramedDecoder(self, compressed_size, None)

    def decoded_crc(self, header: bytes, data: memoryview) -> int:
        if not self.lossy or not _float32_header(header):
            return super().decoded_crc(header, data)
        crc, values = crc32(header), np.frombuffer(data, _F32)
        for start in range(0, values.size, FRAME_VALUES):
            crc = crc32(self.dequantized(values[start:start + FRAME_VALUES]), crc)
        return crc

    def dequantized(self, values: np.ndarray) -> np.ndarray:
        """What a reader decodes ``values`` (float32) to: the values themselves for a lossless codec."""
        flat = np.ascontiguousarray(values, _F32).reshape(-1)
        out = np.empty_like(flat)
        for start in range(0, flat.size, FRAME_VALUES):
            piece = flat[start:start + FRAME_VALUES]
            out[start:start + piece.size] = self.decode_frame(memoryview(self.encode_frame(piece)), piece.size)
        return out.reshape(np.shape(values))


class FramedDecoder:
    """Decodes a :class:`FloatCodec` member one frame at a time, with zlib's decompress-object interface.

    ``decoded_size``: the member's declared size (its zip entry); a frame that would decode past it, or past
    :data:`FRAME_VALUES` values, is refused before its output is allocated.
    """

    def __init__(self, codec: FloatCodec, compressed_size: int, decoded_size: int | None) -> None:
        self._codec, self._left_in = codec, compressed_size
        self._left_out = decoded_size
        self._input = bytearray()
        self._output = memoryview(b"")
        self.eof = compressed_size == 0
        self.unconsumed_tail = b""

    def decompress(self, data: bytes | memoryview, max_length: int) -> bytes:
        if self._output.nbytes:
            self.unconsumed_tail = bytes(data)
            return self._hand_out(max_length)
        self.feed(data)
        self.unconsumed_tail = b""
        frame = self.next_frame()
        if frame is None:
            return b""
        self._output = memoryview(frame)
        return self._hand_out(max_length)

    def feed(self, data: bytes | memoryview) -> None:
        """Take more of the member's encoded bytes (held until a whole frame is in)."""
        self._input += data
        if len(self._input) > self._left_in:
            raise ArchiveError(f"A {self._codec.name} member holds more bytes than its zip entry declares.")

    @property
    def done(self) -> bool:
        """Whether every encoded byte was decoded."""
        return self._left_in == 0

    def _hand_out(self, max_length: int) -> bytes:
        out, self._output = bytes(self._output[:max_length]), self._output[max_length:]
        self.eof = not self._output.nbytes and self._left_in == 0
        return out

    def next_frame(self) -> bytes | None:
        """The next frame's decoded bytes; None until all of it is in."""
        if len(self._input) < _FRAME.size:
            return None
        kind, size, decoded = _FRAME.unpack_from(self._input)
        name = self._codec.name
        if kind not in (_RAW, _VALUES, _BITS) or (kind != _RAW and decoded % 4):
            raise ArchiveError(f"A {name} member holds a malformed frame (type {kind}, {decoded} bytes); corrupt.")
        if self._left_out is not None and decoded > self._left_out:
            raise ArchiveError(f"A {name} frame decodes to {decoded} bytes, past the {self._left_out} its member "
                               "has left of its declared size; refused before decoding.")
        bound = decoded if kind == _RAW else self._codec.payload_bound(decoded // 4)
        if (kind != _RAW and decoded > 4 * FRAME_VALUES) or size > bound:
            raise ArchiveError(f"A {name} frame declares {size} bytes decoding to {decoded}; the most a frame holds "
                               f"is {FRAME_VALUES} values. Refused before decoding.")
        if len(self._input) < _FRAME.size + size:
            return None
        payload = memoryview(self._input)[_FRAME.size:_FRAME.size + size]
        if kind == _RAW:
            if size != decoded:
                raise ArchiveError(f"A {name} raw frame holds {size} bytes but declares {decoded}; corrupt.")
            out = bytes(payload)
        else:
            decode = self._codec.decode_frame if kind == _VALUES else self._codec.decode_bits_frame
            values = decode(payload, decoded // 4)
            if values.nbytes != decoded:
                raise ArchiveError(f"A {name} frame decoded to {values.nbytes} bytes; it declares {decoded}.")
            out = values.tobytes()
        payload.release()
        del self._input[:_FRAME.size + size]
        self._left_in -= _FRAME.size + size
        if self._left_out is not None:
            self._left_out -= decoded
        return out


class Float16Codec(FloatCodec):
    """IEEE half precision: half the bytes; values beyond +-65504 are refused when encoding (use ``bf16``)."""

    name = "fp16"
    lossy = True

    def encode_frame(self, values: np.ndarray) -> bytes:
        if values.size and float(np.abs(values).max()) > 65504.0:
            raise ValueError(f"A value of magnitude {float(np.abs(values).max()):.4g} is beyond float16's range "
                             "(65504); quantize with 'bf16' or 'int8' instead.")
        return values.astype("<f2").tobytes()

    def payload_bound(self, count: int) -> int:
        return 2 * count

    def decode_frame(self, payload: memoryview, count: int) -> np.ndarray:
        if payload.nbytes != 2 * count:
            raise ArchiveError(f"An fp16 frame holds {payload.nbytes} bytes for {count} values; corrupt.")
        return np.frombuffer(payload, "<f2").astype(_F32)


class BFloat16Codec(FloatCodec):
    """bfloat16 (float32's top 16 bits, rounded to nearest even): half the bytes, float32's range."""

    name = "bf16"
    lossy = True

    def encode_frame(self, values: np.ndarray) -> bytes:
        bits = values.view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return np.minimum(rounded, 0xFFFF).astype("<u2").tobytes()

    def payload_bound(self, count: int) -> int:
        return 2 * count

    def decode_frame(self, payload: memoryview, count: int) -> np.ndarray:
        if payload.nbytes != 2 * count:
            raise ArchiveError(f"A bf16 frame holds {payload.nbytes} bytes for {count} values; corrupt.")
        return (np.frombuffer(payload, "<u2").astype("<u4") << 16).view(_F32)


class Int8BlockCodec(FloatCodec):
    """Blockwise int8: per :data:`INT8_BLOCK` values one float32 scale (the block's largest magnitude / 127)."""

    name = "int8"
    lossy = True

    def encode_frame(self, values: np.ndarray) -> bytes:
        blocks = -(-values.size // INT8_BLOCK)
        padded = np.zeros(blocks * INT8_BLOCK, _F32)
        padded[:values.size] = values
        grid = padded.reshape(blocks, INT8_BLOCK)
        scales = (np.abs(grid).max(axis=1) / np.float32(127)).astype(_F32)
        safe = np.where(scales > 0, scales, np.float32(1))
        q = np.clip(np.rint(grid / safe[:, None]), -127, 127).astype(np.int8)
        return scales.astype("<f4").tobytes() + q.reshape(-1)[:values.size].tobytes()

    def payload_bound(self, count: int) -> int:
        return count + 4 * -(-count // INT8_BLOCK)

    def decode_frame(self, payload: memoryview, count: int) -> np.ndarray:
        blocks = -(-count // INT8_BLOCK)
        if payload.nbytes != count + 4 * blocks:
            raise ArchiveError(f"An int8 frame holds {payload.nbytes} bytes for {count} values; corrupt.")
        scales = np.frombuffer(payload, "<f4", blocks)
        q = np.zeros(blocks * INT8_BLOCK, np.int8)
        q[:count] = np.frombuffer(payload, np.int8, count, 4 * blocks)
        grid = q.reshape(blocks, INT8_BLOCK)
        bad = ~np.isfinite(scales) | (scales < 0) | ((scales == 0) & grid.any(axis=1))
        if bad.any():
            block = int(np.argmax(bad))
            raise ArchiveError(f"An int8 block holds scale {float(scales[block])!r} for values that are not all "
                               "zero (block scales must be finite, > 0 where a value is non-zero); corrupt.")
        return (grid * scales[:, None]).astype(_F32).reshape(-1)[:count]


class ShuffleZstdCodec(FloatCodec):
    """Lossless: sign bit rotated below the exponent, byte planes split, the two high planes zstd-compressed."""

    name = "shuffle-zstd"
    level: ClassVar[int] = 1
    #: the XOR of float32 bit patterns that a delta upload sends (:mod:`.delta`): its four byte planes are compressed
    #: (the low ones too: where weights moved little, their high bits are zero as well)
    encodes_bits = True

    def encode_frame(self, values: np.ndarray) -> bytes:
        bits = values.view("<u4")
        engine = _zstd.ZstdCompressor(level=self.level)
        exponent = engine.compress((bits >> np.uint32(23)).astype(np.uint8).tobytes())
        mantissa_top = engine.compress((bits >> np.uint32(15)).astype(np.uint8).tobytes())
        # the sign below the low 15 mantissa bits: little-endian, the low two byte planes of the rotated value
        low = (((bits & np.uint32(0x7FFF)) << np.uint32(1)) | (bits >> np.uint32(31))).astype("<u2")
        return struct.pack("<II", len(exponent), len(mantissa_top)) + exponent + mantissa_top + low.tobytes()

    def payload_bound(self, count: int) -> int:
        return 16 + 4 * (count + (count >> 7) + 512)  # zstd's worst case per plane, generously, for 2 or 4 planes

    def encode_bits_frame(self, bits: np.ndarray) -> bytes:
        engine = _zstd.ZstdCompressor(level=self.level)
        planes = bits.view(np.uint8).reshape(-1, 4)
        packed = [engine.compress(np.ascontiguousarray(planes[:, byte]).tobytes()) for byte in (3, 2, 1, 0)]
        return struct.pack("<4I", *map(len, packed)) + b"".join(packed)

    def decode_bits_frame(self, payload: memoryview, count: int) -> np.ndarray:
        if payload.nbytes < 16:
            raise ArchiveError("A shuffle-zstd frame of bits is shorter than its plane sizes; corrupt.")
        sizes = struct.unpack_from("<4I", payload)
        if 16 + sum(sizes) != payload.nbytes:
            raise ArchiveError(f"A shuffle-zstd frame of bits: its planes ({sizes}) do not fit its {payload.nbytes} "
                               "bytes; corrupt.")
        out, start = np.empty((count, 4), np.uint8), 16
        for byte, size in zip((3, 2, 1, 0), sizes):
            out[:, byte] = np.frombuffer(self._plane(payload[start:start + size], count), np.uint8)
            start += size
        return out.reshape(-1).view(_U32)

    def _plane(self, compressed: memoryview, count: int) -> bytes:
        """One byte plane of ``count`` values, decompressed; refused when corrupt or of another length."""
        try:
            plane = _zstd.ZstdDecompressor().decompress(bytes(compressed), max_output_size=count)
        except _zstd.ZstdError as exc:
            raise ArchiveError(f"A shuffle-zstd plane is corrupt: {exc}.") from None
        if len(plane) != count:
            raise ArchiveError(f"A shuffle-zstd plane decoded to {len(plane)} bytes for {count} values; corrupt.")
        return plane

    def decode_frame(self, payload: memoryview, count: int) -> np.ndarray:
        if payload.nbytes < 8:
            raise ArchiveError("A shuffle-zstd frame is shorter than its plane sizes; corrupt.")
        size3, size2 = struct.unpack_from("<II", payload)
        if 8 + size3 + size2 + 2 * count != payload.nbytes:
            raise ArchiveError(f"A shuffle-zstd frame's planes ({size3}, {size2} bytes) do not fit its "
                               f"{payload.nbytes} bytes for {count} values; corrupt.")
        engine = _zstd.ZstdDecompressor()
        planes = []
        for start, size in ((8, size3), (8 + size3, size2)):
            try:
                plane = engine.decompress(bytes(payload[start:start + size]), max_output_size=count)
            except _zstd.ZstdError as exc:
                raise ArchiveError(f"A shuffle-zstd plane is corrupt: {exc}.") from None
            if len(plane) != count:
                raise ArchiveError(f"A shuffle-zstd plane decoded to {len(plane)} bytes for {count} values; corrupt.")
            planes.append(np.frombuffer(plane, np.uint8).astype(np.uint32))
        low = np.frombuffer(payload, "<u2", count, 8 + size3 + size2).astype(np.uint32)
        bits = (planes[0] << np.uint32(23)) | (planes[1] << np.uint32(15)) | (low >> np.uint32(1))
        bits |= (low & np.uint32(1)) << np.uint32(31)
        return bits.view(_F32)


FP16, BF16, INT8 = Float16Codec(), BFloat16Codec(), Int8BlockCodec()
#: the lossy codecs by their ``quantize=`` name
QUANTIZERS: dict[str, FloatCodec] = {codec.name: codec for codec in (FP16, BF16, INT8)}
#: the lossless codec that beats deflate on float weights; None where zstandard is not installed
SHUFFLE_ZSTD: ShuffleZstdCodec | None = ShuffleZstdCodec() if _zstd is not None else None
for _codec in (FP16, BF16, INT8, SHUFFLE_ZSTD):
    if _codec is not None:
        register_codec(_codec)

__all__ = ["FloatCodec", "FramedDecoder", "Float16Codec", "BFloat16Codec", "Int8BlockCodec", "ShuffleZstdCodec",
           "FP16", "BF16", "INT8", "SHUFFLE_ZSTD", "QUANTIZERS", "FRAME_VALUES", "INT8_BLOCK",
           "frame_prefix", "is_float32_header"]
