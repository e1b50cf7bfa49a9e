"""`pccl bench kernels`: the C kernels against the best numpy (or torch) equivalent.

GB/s is the size of the array the kernel works on (the float32 or bfloat16 array; for
dequantize, the float32 array written), in bytes (1 GB = 1e9 bytes), divided by the
median wall time of one call. Every row reports the median of --repeat calls (kernel and
baseline alternating) after two warm-up calls of each; the ratio is kernel GB/s over
baseline GB/s (> 1: the kernel is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from pccl_py.kernels import _native as N
from pccl_py.kernels import reference as R


def _median_pair(fn: Callable[[], object], base_fn: Callable[[], object], repeat: int):
    """Median seconds of fn and of base_fn, timed alternately (load on a shared machine
    then hits both alike), after warm-up calls (page faults, caches, clock ramp-up)."""
    for _ in range(2):
        fn()
        base_fn()
    times: list[float] = []
    base_times: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        base_fn()
        t2 = time.perf_counter()
        times.append(t1 - t0)
        base_times.append(t2 - t1)
    return statistics.median(times), statistics.median(base_times)


def _torch():
    try:
        import torch
    except Exception:  # torch is optional; any import failure means "not available"
        return None
    return torch


def _rows(size_mib: int, repeat: int) -> list[dict]:
    nbytes = size_mib << 20
    n = nbytes // 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    rows: list[dict] = []

    def row(kernel: str, fn, baseline: str, base_fn, array_bytes: int = nbytes) -> None:
        t, tb = _median_pair(fn, base_fn, repeat)
        gbps, bgbps = array_bytes / t / 1e9, array_bytes / tb / 1e9
        rows.append(
            {
                "kernel": kernel,
                "gbps": round(gbps, 2),
                "baseline": baseline,
                "baseline_gbps": round(bgbps, 2),
                "ratio": round(gbps / bgbps, 2),
                "seconds": t,
                "baseline_seconds": tb,
                "bytes": array_bytes,
            }
        )

    # --- float32 sum / max / avg finish
    a = x.copy()
    row(
        "reduce sum float32",
        lambda: N.reduce(a, y, "sum", "float32"),
        "np.add(a, b, out=a)",
        lambda: np.add(a, y, out=a),
    )
    row(
        "reduce max float32",
        lambda: N.reduce(a, y, "max", "float32"),
        "np.maximum(a, b, out=a)",
        lambda: np.maximum(a, y, out=a),
    )
    row(
        "finish_avg float32",
        lambda: N.finish_avg(a, 3, "float32"),
        "np.divide(a, 3, out=a)",
        lambda: np.divide(a, np.float32(3), out=a),
    )

    # --- bfloat16 sum (nbytes of bf16 words)
    hb = R.f32_to_bf16(x[: nbytes // 2])
    hs = R.f32_to_bf16(y[: nbytes // 2])
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(1)  # the kernels run on one thread; so does the baseline
        ta = torch.from_numpy(hb.view(np.int16).copy()).view(torch.bfloat16)
        tb = torch.from_numpy(hs.view(np.int16).copy()).view(torch.bfloat16)
        base_name, base_fn = "torch bf16 a.add_(b), 1 thread", lambda: ta.add_(tb)
    else:
        base_name = "numpy via float32 (widen, add, round)"

        def base_fn() -> None:
            hb[...] = R.f32_to_bf16(R.bf16_to_f32(hb) + R.bf16_to_f32(hs))

    row(
        "reduce sum bfloat16",
        lambda: N.reduce(hb, hs, "sum", "bfloat16"),
        base_name,
        base_fn,
    )

    # --- float16 sum (nbytes of float16): numpy computes it in float32 too
    fa = x[: nbytes // 2].astype(np.float16)
    fb = y[: nbytes // 2].astype(np.float16)
    row(
        "reduce sum float16",
        lambda: N.reduce(fa, fb, "sum", "float16"),
        "np.add(a, b, out=a) on float16",
        lambda: np.add(fa, fb, out=fa),
    )

    # --- quantize
    codes8 = np.empty(n, np.uint8)
    codes4 = np.empty((n + 1) // 2, np.uint8)
    tmp = np.empty(n, np.float32)

    def np_quant_u8() -> None:
        lo, hi = x.min(), x.max()
        inv = np.float32(255) / (hi - lo)
        np.subtract(x, lo, out=tmp)
        np.multiply(tmp, inv, out=tmp)
        np.add(tmp, np.float32(0.5), out=tmp)
        codes8[...] = tmp  # float -> uint8 truncation

    def np_quant_u4() -> None:
        lo, hi = x.min(), x.max()
        inv = np.float32(15) / (hi - lo)
        np.subtract(x, lo, out=tmp)
        np.multiply(tmp, inv, out=tmp)
        np.add(tmp, np.float32(0.5), out=tmp)
        c = tmp.astype(np.uint8)
        codes4[...] = c[0::2] | (c[1::2] << np.uint8(4))

    row(
        "quantize_u8",
        lambda: N.quantize_u8(x, codes8),
        "numpy min/max + (x-lo)*inv+0.5 -> uint8",
        np_quant_u8,
    )
    row(
        "quantize_u4",
        lambda: N.quantize_u4(x, codes4),
        "numpy as u8 + nibble packing",
        np_quant_u4,
    )

    # --- dequantize (+ accumulate)
    lo8, sc8 = N.quantize_u8(x, codes8)
    lo4, sc4 = N.quantize_u4(x, codes4)
    dst = y.copy()
    f_sc8, f_lo8 = np.float32(sc8), np.float32(lo8)
    f_sc4, f_lo4 = np.float32(sc4), np.float32(lo4)

    def np_dequant_add_u8() -> None:
        t = codes8.astype(np.float32) * f_sc8 + f_lo8
        dst.__iadd__(t)

    def np_dequant_add_u4() -> None:
        c = np.empty(2 * codes4.size, np.uint8)
        c[0::2] = codes4 & np.uint8(15)
        c[1::2] = codes4 >> np.uint8(4)
        t = c[:n].astype(np.float32) * f_sc4 + f_lo4
        dst.__iadd__(t)

    row(
        "dequant_add_u8",
        lambda: N.dequant_add_u8(codes8, lo8, sc8, dst),
        "numpy tmp = codes.astype(f32)*scale+lo; dst += tmp",
        np_dequant_add_u8,
    )
    row(
        "dequant_add_u4",
        lambda: N.dequant_add_u4(codes4, lo4, sc4, dst),
        "numpy unpack nibbles + the u8 sequence",
        np_dequant_add_u4,
    )
    row(
        "dequantize_u8",
        lambda: N.dequantize_u8(codes8, lo8, sc8, dst),
        "numpy np.multiply(codes, scale, out=dst); dst += lo",
        lambda: (np.multiply(codes8, f_sc8, out=dst), dst.__iadd__(f_lo8)),
    )
    # the copy back of a large all-reduce result (client): an array larger than the cache
    # shows what streaming stores save; one that fits shows what they cost
    row("copy_stream", lambda: N.copy_stream(dst, x), "numpy np.copyto(dst, src)", lambda: np.copyto(dst, x))
    _seal_rows(row, x, dst)
    return rows


def _seal_rows(row, x: np.ndarray, out: np.ndarray) -> None:
    """A data frame's tag (GMAC) and its encryption, one core, from the system's libcrypto
    (transport/seal.py) against the same cipher through ``cryptography``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pccl_py.transport import seal as S

    if S.Seal is None or S.SEAL_UNAVAILABLE is not None:
        return
    key, iv = bytes(32), S.iv(0)
    x = memoryview(x).cast("B")  # (cryptography takes bytes-like objects, not arrays)
    gmac, enc, ref = S.Seal(key, True), S.Seal(key, True, True), AESGCM(key)

    def tag(seal, data) -> None:
        seal.begin(0)
        seal.absorb(data)
        seal.tag()

    def encrypt() -> None:
        enc.begin(0)
        enc.crypt(x, out)
        enc.tag()

    row("seal_gmac", lambda: tag(gmac, x), "cryptography AESGCM.encrypt(iv, b'', aad=data)",
        lambda: ref.encrypt(iv, b"", x))
    row("seal_encrypt", encrypt, "cryptography AESGCM.encrypt(iv, data, None)", lambda: ref.encrypt(iv, x, None))


def _table(rows: list[dict], size_mib: int, repeat: int) -> str:
    lines = [
        f"pccl kernels: {size_mib} MiB arrays, median of {repeat} calls, "
        f"{platform.machine()}, numpy {np.__version__}, kernels ISA {N._isa()[0]}",
        "GB/s = bytes of the float32/bfloat16 array processed per second (1 GB = 1e9 B); "
        "ratio = kernel / baseline",
        "",
        f"{'kernel':<22} {'GB/s':>7}  {'baseline':<52} {'GB/s':>7} {'ratio':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r['kernel']:<22} {r['gbps']:>7.2f}  {r['baseline']:<52} "
            f"{r['baseline_gbps']:>7.2f} {r['ratio']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pccl bench kernels",
        description="Throughput of the C kernels against numpy/torch equivalents.",
    )
    p.add_argument("--size-mib", type=int, default=64, help="array size in MiB (default 64)")
    p.add_argument("--repeat", type=int, default=9, help="timed calls per row (default 9)")
    p.add_argument("--json", action="store_true", help="one JSON object per row instead")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        p.error("--size-mib and --repeat must be >= 1")
    rows = _rows(args.size_mib, args.repeat)
    if args.json:
        for r in rows:
            print(json.dumps({**r, "size_mib": args.size_mib, "repeat": args.repeat}))
    else:
        print(_table(rows, args.size_mib, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
