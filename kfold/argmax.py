"""Class maps from probabilities on CPU: the argmax over classes, alone or fused with bilinear upsampling.

Scoring a store at label resolution upsamples (n, C, h, w) probabilities and takes their argmax, and the
blend's fit takes the argmax of class-major (C, P) samples. Torch is slow at both on CPU: its argmax over a
non-innermost axis reads the classes with a stride, and its upsampling writes a full-resolution temporary per
image that the argmax reads back. No library offers a faster one, hence two small numba kernels: a running
max and index over the classes, branch-free so that LLVM vectorises it over pixels, and the same loop over
rows upsampled on the fly (``bench/bench_argmax.py`` times both against torch).

The upsampling is torch's bilinear formula (``align_corners=False``): each output is
``fma(t0, wy0, t1 * wy1)`` of the two width-interpolated rows ``t = fma(x0, wx0, x1 * wx1)``, with torch's
source indices and weights. Torch's own CPU kernel rounds differently along different code paths (for some
shapes the result depends on the thread count set before its first call), so no result can equal all of
them. This one is the same in every process; its class maps differ from torch's only where two classes are
within float rounding of each other.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from torch import Tensor

_BLOCK = 2048  # pixels per block: the running max and index stay in L1 cache while the classes stream by


@numba.njit(nogil=True, cache=True)
def _argmax_class_major(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[i, p] = the first c with x[i, c, p] maximal; x (n, C, P), out (n, P) uint8."""
    n, num_classes, pixels = x.shape
    best = np.empty(_BLOCK, x.dtype)
    index = np.empty(_BLOCK, np.uint8)
    for i in range(n):
        for start in range(0, pixels, _BLOCK):
            stop = min(start + _BLOCK, pixels)
            first = x[i, 0, start:stop]
            for p in range(stop - start):
                best[p] = first[p]
                index[p] = 0
            for c in range(1, num_classes):
                row = x[i, c, start:stop]
                for p in range(stop - start):
                    higher = row[p] > best[p]  # strictly: the first of tied classes stays, as in torch
                    best[p] = row[p] if higher else best[p]
                    index[p] = c if higher else index[p]
            out[i, start:stop] = index[: stop - start]


def class_argmax(x: Tensor, dim: int = 1) -> Tensor:
    """``x.argmax(dim)`` as uint8 (at most 256 classes): the same indices, the first of tied classes as torch.

    Args:
        x: scores with classes along ``dim`` (no NaN); CPU tensors of float32 / float64 take the compiled
            kernel (float16 is widened first), others torch's argmax.
        dim: class axis.
    """
    dim = dim % x.ndim
    num_classes = x.shape[dim]
    if num_classes > 256:
        raise ValueError(f"class_argmax returns uint8: at most 256 classes, got {num_classes}")
    if x.stride(dim) == 1 or x.device.type != "cpu" or not x.dtype.is_floating_point or x.numel() == 0:
        return x.argmax(dim).to(torch.uint8)  # classes innermost: torch's own kernel is the fast one
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    shape = x.shape[:dim] + x.shape[dim + 1 :]
    grouped = x.detach().contiguous().reshape(int(np.prod(x.shape[:dim], dtype=np.int64)), num_classes, -1)
    out = np.empty((grouped.shape[0], grouped.shape[2]), dtype=np.uint8)
    _argmax_class_major(grouped.numpy(), out)
    return torch.from_numpy(out).reshape(shape)


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
    """float32 a * b + c rounded once (LLVM's fma): the rounding torch's kernel gets from its compiler."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fma, args)

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _source_index(out_size: int, in_size: int):  # pragma: no cover - compiled
    """Torch's bilinear (align_corners=False) source indices and weights: (i0, i1, w0, w1), each (out_size,)."""
    scale = np.float32(in_size) / np.float32(out_size)
    i0, i1 = np.empty(out_size, np.int64), np.empty(out_size, np.int64)
    w0, w1 = np.empty(out_size, np.float32), np.empty(out_size, np.float32)
    for d in range(out_size):
        src = max(_fma(scale, np.float32(d) + np.float32(0.5), np.float32(-0.5)), np.float32(0))
        i = min(int(np.floor(src)), in_size - 1)
        lam = min(max(src - np.float32(i), np.float32(0)), np.float32(1))
        i0[d], i1[d], w0[d], w1[d] = i, min(i + 1, in_size - 1), np.float32(1) - lam, lam
    return i0, i1, w0, w1


@numba.njit(nogil=True, cache=True)
def _upsampled_argmax(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out (n, H, W) uint8 = argmax over classes of x (n, C, h, w) float32 upsampled bilinearly to (H, W)."""
    n, num_classes, h, w = x.shape
    height, width = out.shape[1], out.shape[2]
    y0, y1, wy0, wy1 = _source_index(height, h)
    x0, x1, wx0, wx1 = _source_index(width, w)
    rows = np.empty((num_classes, h, width), np.float32)  # width-interpolated: each made once, used by 2 rows
    best, index = np.empty(width, np.float32), np.empty(width, np.uint8)
    for i in range(n):
        for c in range(num_classes):
            for r in range(h):
                for o in range(width):
                    rows[c, r, o] = _fma(x[i, c, r, x0[o]], wx0[o], x[i, c, r, x1[o]] * wx1[o])
        for y in range(height):
            a, b, wa, wb = y0[y], y1[y], wy0[y], wy1[y]
            for o in range(width):
                best[o] = _fma(rows[0, a, o], wa, rows[0, b, o] * wb)
                index[o] = 0
            for c in range(1, num_classes):
                for o in range(width):
                    value = _fma(rows[c, a, o], wa, rows[c, b, o] * wb)
                    higher = value > best[o]  # the first of tied classes stays
                    best[o] = value if higher else best[o]
                    index[o] = c if higher else index[o]
            out[i, y] = index


def upsampled_argmax(probs: Tensor, size: tuple[int, int]) -> Tensor:
    """Class ids (n, H, W) uint8 of probabilities (n, C, h, w) upsampled bilinearly to ``size``.

    Args:
        probs: scores (any float dtype, no NaN), at most 256 classes; on another device than the CPU, torch's
            interpolate and argmax.
        size: (H, W) of the class map.
    """
    if probs.shape[1] > 256:
        raise ValueError(f"upsampled_argmax returns uint8: at most 256 classes, got {probs.shape[1]}")
    if tuple(probs.shape[-2:]) == tuple(size):
        return class_argmax(probs, 1)
    if probs.device.type != "cpu":
        up = F.interpolate(probs.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return up.argmax(1).to(torch.uint8)
    x = probs.detach().to(torch.float32).contiguous().numpy()
    out = np.empty((x.shape[0], *size), dtype=np.uint8)
    if out.size:
        _upsampled_argmax(x, out)
    return torch.from_numpy(out)
