"""The daemon's min-max codec (docs/kernels.md) run where a tensor lives, in torch, so a
quantized call of a CUDA tensor moves codes and per-block (lo, scale) over PCIe instead of
float32 values (``stage="gpu_quant"``).

The blocks are the daemon's: the bucket cut into ``world`` chunks (``split``), each chunk
into blocks of ``block_bytes`` of float32 (``pieces``), one (lo, scale) per block. The
per-block parameters are computed with numpy from the blocks' min and max exactly as the
kernel computes them; the code pass is ``trunc(clamp((x - lo) * inv + 0.5, 0, M))``, one
torch operation per step (each rounded to float32, no fused multiply-add), so the codes
are the kernel's bit for bit, on a GPU or a CPU.

The host dequantizes the codes into the shared memory the daemon reads. Each block then
holds values on its own grid, and the daemon's quantization of them finds the same lo
and the same codes (``x == lo`` decodes to ``lo`` exactly); its scale can differ from
ours by float32 rounding of ``hi``, so a value moves by a few ulps, not a quantization
step. If the daemon's world size or ``quant_block_bytes`` differ from what the client
assumed, the values are quantized once more on other blocks: still correct, within two
quantization steps instead of one.
"""

from __future__ import annotations

import numpy as np

from pccl_py import kernels as K
from pccl_py.client.copies import run_all
from pccl_py.collectives.base import pieces, split

BLOCK_BYTES = 1 << 20  # the daemon's default quant_block_bytes (DataPlaneConfig)
MAXC = {"uint8": 255.0, "uint4": 15.0}


def blocks(count: int, world: int, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """[(start, stop)] in elements: the blocks of the daemon's quantized all-reduce."""
    belems = max(2, (block_bytes // 4) & ~1)
    bounds = split(count, max(1, world))
    out: list[tuple[int, int]] = []
    for c in range(len(bounds) - 1):
        out.extend(pieces(bounds[c], bounds[c + 1], belems))
    return out


def _runs(bl: list[tuple[int, int]]):
    """Consecutive blocks of one length grouped: (start, rows, length, first block index)."""
    i = 0
    while i < len(bl):
        a, b = bl[i]
        j = i + 1
        while j < len(bl) and bl[j][1] - bl[j][0] == b - a and bl[j][0] == bl[j - 1][1]:
            j += 1
        yield a, j - i, b - a, i
        i = j


def plan(lo: np.ndarray, hi: np.ndarray, maxc: float):
    """Per block, from its min and max (float32): (mode, lo, scale, inv32, inv64) as the
    kernel computes them. mode 0: every code 0 (lo and scale NaN for a non-finite block,
    scale 0 for a constant one); 1: the float32 rule; 2: the float64 rule of tiny ranges."""
    f32 = np.float32
    lo = lo.astype(f32) + f32(0.0)  # -0.0 -> +0.0
    hi = hi.astype(f32) + f32(0.0)
    with np.errstate(all="ignore"):
        r = (hi - lo).astype(f32)
        bad = ~(np.isfinite(lo) & np.isfinite(hi) & np.isfinite(r))
        flat_ = ~bad & (r == 0)
        scale = (r / f32(maxc)).astype(f32)
        inv = (f32(maxc) / r).astype(f32)
        inv64 = np.float64(maxc) / (hi.astype(np.float64) - lo.astype(np.float64))
    mode = np.where(bad | flat_, 0, np.where(np.isfinite(inv), 1, 2))
    lo = np.where(bad, f32(np.nan), lo).astype(f32)
    scale = np.where(bad, f32(np.nan), np.where(flat_, f32(0.0), scale)).astype(f32)
    inv = np.where(mode == 1, inv, f32(0.0)).astype(f32)
    return mode, lo, scale, inv, inv64


def quantize(torch, x, bl: list[tuple[int, int]], quant: str):
    """Codes of the flat float32 tensor ``x`` on its device (uint8, one per value; two per
    byte for uint4, low nibble first, over the whole tensor), and per block lo and scale
    (numpy float32). One synchronisation: the blocks' min and max come to the host."""
    maxc = MAXC[quant]
    runs = list(_runs(bl))
    mins, maxs = [], []
    for a, rows, n, _ in runs:
        v = x[a:a + rows * n].view(rows, n)
        mins.append(v.amin(dim=1))
        maxs.append(v.amax(dim=1))
    lo_hi = torch.stack([torch.cat(mins), torch.cat(maxs)]).cpu().numpy() if runs else np.zeros((2, 0), np.float32)
    mode, lo, scale, inv, inv64 = plan(lo_hi[0], lo_hi[1], maxc)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
    lo_t = torch.from_numpy(lo).to(x.device)
    inv_t = torch.from_numpy(inv).to(x.device)
    zero_t = torch.from_numpy(mode == 0).to(x.device)
    for a, rows, n, i in runs:
        v = x[a:a + rows * n].view(rows, n)
        q = torch.sub(v, lo_t[i:i + rows, None])
        q.mul_(inv_t[i:i + rows, None]).add_(0.5)
        q.masked_fill_(zero_t[i:i + rows, None], 0.0)
        for k in np.nonzero(mode[i:i + rows] == 2)[0]:  # tiny ranges: the rule in float64
            w = (v[k].double() - float(lo[i + k])) * float(inv64[i + k]) + 0.5
            q[k] = w.clamp_(0.0, maxc).trunc_().float()  # truncated before narrowing
        q.clamp_(0.0, maxc).trunc_()
        codes[a:a + rows * n].view(rows, n).copy_(q)
    if quant == "uint4":
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, lo, scale


def dequantize_into(codes: np.ndarray, lo: np.ndarray, scale: np.ndarray, bl: list[tuple[int, int]],
                    quant: str, dst: np.ndarray) -> None:
    """dst (float32, one per value) = code * scale + lo per block, with the native kernel,
    blocks over the copy threads when large (the kernel releases the GIL)."""

    def job(i: int, a: int, b: int):
        def run() -> None:
            c = codes[a:b]
            if quant == "uint4":  # this block's nibbles (the tensor is packed as a whole)
                packed = codes[a // 2:(b + 1) // 2]
                full = np.empty(2 * packed.size, np.uint8)
                np.bitwise_and(packed, 15, out=full[0::2])
                np.right_shift(packed, 4, out=full[1::2])
                c = full[a % 2:a % 2 + b - a]
            K.dequantize_u8(c, float(lo[i]), float(scale[i]), dst[a:b])
        return run

    run_all([job(i, a, b) for i, (a, b) in enumerate(bl)], 4 * dst.size)
