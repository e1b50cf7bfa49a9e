"""Typed surface of the C extension pccl_py.kernels._native (see docs/kernels.md).

Buffers: any object with the buffer protocol (numpy array, memoryview, bytearray,
shared-memory view), C-contiguous, at any byte alignment, byte length a multiple of
the dtype's itemsize, writable where written. bfloat16 data is raw 2-byte words.
Errors: TypeError for a non-buffer or a non-str name, ValueError for a bad value
(unknown dtype/op, non-contiguous, read-only dst, lengths that do not match, partial
overlap). The GIL is released while a kernel runs over 64 KiB or more.
"""

from typing import Final, Literal, SupportsIndex

from typing_extensions import Buffer

DType = Literal[
    "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8"
]
Op = Literal["sum", "prod", "min", "max"]

DTYPES: Final[tuple[str, ...]]
OPS: Final[tuple[str, ...]]

def reduce(dst: Buffer, src: Buffer, op: Op, dtype: DType) -> None:
    """dst = dst (op) src elementwise. dst and src: same byte length; dst may be src itself."""

def finish_avg(dst: Buffer, n: SupportsIndex, dtype: DType) -> None:
    """dst = dst / n, 1 <= n < 2**31. Floats: IEEE division (f16/bf16 via float32);
    integers: truncation toward zero."""

def quantize_u8(src_f32: Buffer, codes_u8: Buffer) -> tuple[float, float]:
    """Min-max affine quantization; len(codes) == n. Returns (lo, scale), float32 values."""

def quantize_u4(src_f32: Buffer, codes_u8: Buffer) -> tuple[float, float]:
    """As quantize_u8 with 4-bit codes; len(codes) == ceil(n/2), low nibble first."""

def dequantize_u8(codes: Buffer, lo: float, scale: float, dst_f32: Buffer) -> None:
    """dst = code * scale + lo (float32); len(codes) == n."""

def dequantize_u4(codes: Buffer, lo: float, scale: float, dst_f32: Buffer) -> None:
    """dst = code * scale + lo (float32); len(codes) == ceil(n/2)."""

def dequant_add_u8(codes: Buffer, lo: float, scale: float, dst_f32: Buffer) -> None:
    """dst += code * scale + lo, fused (no temporary)."""

def dequant_add_u4(codes: Buffer, lo: float, scale: float, dst_f32: Buffer) -> None:
    """dst += code * scale + lo, fused (no temporary)."""

def copy(dst: Buffer, src: Buffer) -> None:
    """memcpy of equal-sized, non-overlapping buffers; the GIL is released for large ones."""

def copy_stream(dst: Buffer, src: Buffer) -> None:
    """copy() whose stores bypass the cache (x86-64; memcpy elsewhere); GIL released."""

def arrive(buf: Buffer, offset: int, ident: int, rank: int) -> int:
    """Atomically set bit ``rank`` (0..31) of the aligned word ident(32 bits) << 32 | mask,
    after a full fence: the new mask, or -1 (nothing written) when the word holds another
    ident."""

def load_u64(buf: Buffer, offset: int) -> int:
    """8-byte load at an aligned offset, after a full memory fence (reads before it are done)."""

def store_u64(buf: Buffer, offset: int, value: int) -> None:
    """8-byte store at an aligned offset, followed by a full memory fence."""

# -- I/O loops of the data plane's threads (native/io.c; nothing else here knows sockets) --

def recv_fill(fd: int, buf: Buffer, pos: int, timeout_ms: int, acc: Buffer | None = None,
              other: Buffer | None = None, op: Op = "sum", dtype: DType = "uint8",
              done: int = 0) -> tuple[int, int]:
    """Fill buf[pos:] from a non-blocking socket, GIL released; waits at most timeout_ms per
    poll and then returns. With acc and other (as long as buf, disjoint): acc (op)= other
    over the bytes received, from byte ``done`` on, in pieces of at least 64 KiB and at the
    end. Returns (pos, done). ConnectionResetError at end of file, OSError on errors."""

def send_all(fd: int, header: Buffer, payload: Buffer, sent: int, timeout_ms: int) -> int:
    """Write header then payload from byte ``sent`` on (MSG_NOSIGNAL), GIL released; returns
    the bytes written so far when a poll waits longer than timeout_ms. OSError on errors."""
