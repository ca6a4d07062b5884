"""
Fused Triton kernels for DyT:  y = gamma * tanh(alpha * x) + beta  over the last dimension.

Only tanh (DyT itself) is fused here. The other squashing variants in dyt.py (hardtanh, sigmoid,
softsign, arctan, clamp, gelu_clip, rational, identity, no-alpha) stay plain PyTorch.

Public API
    dyt(x, alpha, weight, bias=None) -> Tensor
        x: [..., C], fp32 / bf16 / fp16, any leading shape, any strides (made contiguous).
        alpha: one scalar ([1] or 0-d) or per channel ([C]); weight (gamma): [C];
        bias (beta): [C] or None. Parameters may be fp32 or the input's dtype.
        Returns y in x's dtype; the math is done in fp32. Autograd-aware: the backward is one
        fused pass over x and dy, and only x (plus the parameters) is saved for it.
    available(x) -> bool
        Whether the kernel can run for tensor x here: a CUDA (or ROCm) tensor with Triton
        compiled, or any CPU tensor when TRITON_INTERPRET=1 was set before this module was
        imported (that is how CI runs it).

Both directions are torch custom ops (torch.ops.dyt.dyt_fwd / dyt_bwd) with fake (meta)
implementations and a registered autograd formula, so torch.compile keeps them in the graph
without breaks, autocast passes them through (bf16 input with fp32 parameters is fine), and
DDP / FSDP2 see ordinary parameter gradients (FSDP2 hands the unsharded parameters in as plain
tensors at call time).

Design, for memory bandwidth (DyT is element-wise; the floor is reading x and writing y):
  forward   2-D tiles of BLOCK_M rows x BLOCK_C channels, one tile per program, the grid
            flattened onto axis 0 (no 65,535 limit on rows); gamma/beta/alpha loaded once per
            tile. Narrow C gets many rows per tile, wide C (e.g. 4097) is split into several
            column blocks.
  backward  one pass: reads x and dy, recomputes t = tanh(alpha*x), writes dx, and accumulates
            the parameter gradients in fp32 register tiles. A persistent grid of G programs,
            each owning a fixed range of rows, writes one partial row per program
            ([G, C] fp32 buffers); a second small kernel sums the partials over G in a fixed
            order. No atomics, so the same inputs give the same bits. G and the block sizes
            are fixed functions of (M, C, dtype, device) -- nothing is autotuned -- so the
            partial layout (and with it the summation order) never changes between runs.
"""

import contextlib
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old/new triton layouts
    _InterpretedFunction = ()

Tensor = torch.Tensor

# How tanh is computed inside the kernels:
#   "auto"      libdevice tanh on a GPU (accurate to a few ulp), the portable formula under the
#               interpreter (which cannot call libdevice).
#   "portable"  the formula in _tanh below, everywhere (what CI tests).
#   "libdevice" libdevice tanh (GPU only).
#   "approx"    PTX tanh.approx.f32 (NVIDIA sm_75+, rel. error ~2^-11) for bf16/fp16 inputs only;
#               fp32 inputs still use libdevice. Opt-in: measure before you trust it.
TANH = os.environ.get("DYT_TANH", "auto")
_TANH_PORTABLE, _TANH_LIBDEVICE, _TANH_APPROX = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# tanh in fp32.
#
# Near 0 (where most DyT inputs sit) tanh(z) ~ z, and an absolute error of one fp32 ulp of 1.0
# would be a huge relative error. So:
#   |z| <  0.5: the Taylor series  tanh z = z + z^3 * P(z^2),  P(z^2) = -1/3 + 2/15 z^2 - ...
#               Terms up to z^17 are kept; the first dropped one is ~2e-9 relative at |z| = 0.5.
#               The result is z plus a correction of at most 8% of z: relative error ~1 ulp.
#   |z| >= 0.5: tanh|z| = (1 - e) / (1 + e) with e = exp(-2|z|) in (0, 0.37]: no cancellation
#               worth speaking of, and exp of a non-positive number never overflows: for huge |z|
#               e underflows to 0 and t = 1 exactly (no inf/inf = NaN). The sign is put back.
# Measured against float64 under the interpreter: max relative error 1.9e-7 (~3 ulp of 2^-24),
# at |z| just above 0.5, for |z| from 1e-8 to 30. NaN gives NaN (via the exp branch), +-inf +-1.
# Not 2*sigmoid(2z)-1, which loses all relative precision as z -> 0.

@triton.jit
def _tanh(z, MODE: tl.constexpr):
    if MODE == 1:
        t = libdevice.tanh(z)
    elif MODE == 2:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        a = tl.abs(z)
        zs = tl.where(a < 0.5, z, 0.0)  # keeps the unused polynomial branch finite for huge z
        z2 = zs * zs
        p = 6404582.0 / 10854718875.0
        p = p * z2 + (-929569.0 / 638512875.0)
        p = p * z2 + (21844.0 / 6081075.0)
        p = p * z2 + (-1382.0 / 155925.0)
        p = p * z2 + (62.0 / 2835.0)
        p = p * z2 + (-17.0 / 315.0)
        p = p * z2 + (2.0 / 15.0)
        p = p * z2 + (-1.0 / 3.0)
        small = zs + (zs * z2) * p
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        big = tl.where(z < 0.0, -big, big)
        t = tl.where(a < 0.5, small, big)  # 0.5: see the comment above
    return t


# ---------------------------------------------------------------------------------------------
# Forward: y = gamma * tanh(alpha * x) + beta on a [M, C] row-major tensor.

@triton.jit
def _dyt_fwd_kernel(X, Y, A, W, B, M, C, n_cblocks,
                    ALPHA_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    TANH_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # one flat axis: rows never touch the 65,535 limit of axes 1/2
    pid_m = pid // n_cblocks
    pid_c = pid % n_cblocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]  # int64: M*C may exceed 2^31

    x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if ALPHA_PER_CHANNEL:
        a = tl.load(A + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        a = tl.load(A).to(tl.float32)

    y = w[None, :] * _tanh(a * x, TANH_MODE)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward. With z = alpha*x, t = tanh(z), y = gamma*t + beta and upstream gradient dy:
#
#   d tanh(z)/dz = 1 - tanh(z)^2 = 1 - t^2 =: s        (sech^2; from tanh = sinh/cosh and
#                                                        cosh^2 - sinh^2 = 1)
#   dy/dx     = gamma * s * dz/dx     = gamma * s * alpha
#   dy/dalpha = gamma * s * dz/dalpha = gamma * s * x
#   dy/dgamma = t,   dy/dbeta = 1
#
# Chain rule; alpha, gamma, beta are shared by every row (alpha also by every channel when it is
# a scalar), so their gradients sum over everything they touch:
#
#   dx[r,c]   = dy[r,c] * gamma[c] * alpha * s[r,c]
#   dalpha    = sum_{r,c} dy[r,c] * gamma[c] * x[r,c] * s[r,c]     (per channel: sum over r only)
#   dgamma[c] = sum_r dy[r,c] * t[r,c]
#   dbeta[c]  = sum_r dy[r,c]
#
# t is recomputed from x (so only x is saved). s is computed as (1-t)(1+t): 1-t is exact for
# t >= 1/2 (Sterbenz), which avoids the extra rounding of t*t where s is small.
#
# Program p owns rows [p*rows_per_prog, (p+1)*rows_per_prog). For each block of BLOCK_C channels
# it walks its rows in BLOCK_M-row tiles, adding into [BLOCK_M, BLOCK_C] fp32 accumulators
# (element-wise adds, no cross-thread reduction inside the loop), then reduces them over rows
# once and writes one partial row per program: PG[p, c], PB[p, c], PA[p, c] (per-channel alpha)
# or PA[p] (scalar alpha, whose accumulator lives across all column blocks).

@triton.jit
def _dyt_bwd_kernel(X, DY, DX, A, W, PG, PB, PA, M, C, rows_per_prog,
                    ALPHA_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    TANH_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    if not ALPHA_PER_CHANNEL:
        a_scalar = tl.load(A).to(tl.float32)
    acc_alpha_all = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # scalar alpha only

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if ALPHA_PER_CHANNEL:
            a = tl.load(A + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            a = a_scalar
        acc_gamma = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc_beta = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        acc_alpha = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # per-channel alpha only

        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            mask = (rows < row_end)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
            # masked lanes load 0: then t = 0 and dy = 0, so they add nothing to the sums
            x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            t = _tanh(a * x, TANH_MODE)
            s = (1.0 - t) * (1.0 + t)
            gdy_s = dy * w * s
            tl.store(DX + offs, (gdy_s * a).to(DX.dtype.element_ty), mask=mask)
            acc_gamma += dy * t
            if HAS_BIAS:
                acc_beta += dy
            if ALPHA_PER_CHANNEL:
                acc_alpha += gdy_s * x
            else:
                acc_alpha_all += gdy_s * x

        prow = pid.to(tl.int64) * C + cols
        tl.store(PG + prow, tl.sum(acc_gamma, axis=0), mask=cmask)
        if HAS_BIAS:
            tl.store(PB + prow, tl.sum(acc_beta, axis=0), mask=cmask)
        if ALPHA_PER_CHANNEL:
            tl.store(PA + prow, tl.sum(acc_alpha, axis=0), mask=cmask)

    if not ALPHA_PER_CHANNEL:
        tl.store(PA + pid, tl.sum(tl.sum(acc_alpha_all, axis=1), axis=0))


# Sum the [G, C] partials over G, in a fixed order, and write the gradients in the parameters'
# dtypes (the sum stays fp32 until this single final cast). Program 0 also sums the [G] partials
# of a scalar alpha.
@triton.jit
def _dyt_bwd_reduce_kernel(PG, PB, PA, DW, DB, DA, G, C,
                           ALPHA_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_gamma = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    acc_beta = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    acc_alpha = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask = (gs < G)[:, None] & cmask[None, :]
        offs = gs.to(tl.int64)[:, None] * C + cols[None, :]
        acc_gamma += tl.load(PG + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc_beta += tl.load(PB + offs, mask=mask, other=0.0)
        if ALPHA_PER_CHANNEL:
            acc_alpha += tl.load(PA + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc_gamma, axis=0).to(DW.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(acc_beta, axis=0).to(DB.dtype.element_ty), mask=cmask)
    if ALPHA_PER_CHANNEL:
        tl.store(DA + cols, tl.sum(acc_alpha, axis=0).to(DA.dtype.element_ty), mask=cmask)
    else:
        if pid == 0:
            acc = tl.zeros([BLOCK_G], dtype=tl.float32)
            for g0 in range(0, G, BLOCK_G):
                gs = g0 + tl.arange(0, BLOCK_G)
                acc += tl.load(PA + gs, mask=gs < G, other=0.0)
            tl.store(DA, tl.sum(acc, axis=0).to(DA.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Host side: launch parameters (fixed functions of the shape, dtype and device; no autotuning).

_INTERPRET = isinstance(_dyt_fwd_kernel, _InterpretedFunction) if _InterpretedFunction else False
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(x):
    """True if dyt() can run on tensor x here (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        return False
    if _INTERPRET:
        return x.device.type == "cpu"
    return x.is_cuda


def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _tanh_mode(dtype):
    mode = TANH
    if _INTERPRET or mode == "portable":
        return _TANH_PORTABLE
    if mode == "approx" and dtype in (torch.bfloat16, torch.float16) and torch.version.hip is None:
        return _TANH_APPROX
    return _TANH_LIBDEVICE


def _fwd_blocks(M, C, elem_bytes):
    # ~16 KiB of input per program: enough bytes in flight per SM to stream at full bandwidth.
    tile = 16384 // elem_bytes
    block_c = min(_next_pow2(C), 1024)
    block_m = min(max(1, tile // block_c), _next_pow2(M))
    num_warps = 8 if block_m * block_c >= 4096 else 4
    return block_m, block_c, num_warps


def _bwd_blocks(M, C):
    # 4096-element tiles: x, dy and three fp32 accumulators stay in registers at 8 warps.
    block_c = min(_next_pow2(C), 1024)
    block_m = min(max(1, 4096 // block_c), _next_pow2(M))
    num_warps = 8 if block_m * block_c >= 2048 else 4
    return block_m, block_c, num_warps


_SM_COUNT = {}


def _bwd_programs(M, block_m, device):
    """(G, rows_per_prog): the persistent grid of the backward kernel.

    About two programs per SM, but at least 32 rows each, so that the [G, C] partials stay a few
    percent of the traffic. rows_per_prog is a multiple of block_m (no ragged tiles inside a
    program's range); G then covers M with no empty program.
    """
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = 2 * _SM_COUNT[idx]
    else:
        target = 4  # interpreter: a few programs, so the partial reduction is exercised
    rows = max(triton.cdiv(M, target), 32)
    rows = triton.cdiv(rows, block_m) * block_m
    return triton.cdiv(M, rows), rows


def _check(x, alpha, weight, bias):
    if x.dim() == 0:
        raise ValueError("dyt: x must have at least one dimension (the channels)")
    C = x.shape[-1]
    if weight.dim() != 1 or weight.numel() != C:
        raise ValueError(f"dyt: weight must have shape [{C}], got {tuple(weight.shape)}")
    if alpha.numel() not in (1, C) or alpha.dim() > 1:
        raise ValueError(f"dyt: alpha must have shape [1] or [{C}], got {tuple(alpha.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != C):
        raise ValueError(f"dyt: bias must have shape [{C}], got {tuple(bias.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"dyt: unsupported dtype {x.dtype}")
    for name, p in (("alpha", alpha), ("weight", weight), ("bias", bias)):
        if p is not None and p.device != x.device:
            raise ValueError(f"dyt: {name} is on {p.device}, x on {x.device}")


def _on_device(x):
    # Triton launches on the current CUDA device: make that x's device (multi-GPU processes).
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Custom ops.

@torch.library.custom_op("dyt::dyt_fwd", mutates_args=())
def _dyt_fwd(x: Tensor, alpha: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    C = x.shape[-1]
    M = math.prod(x.shape[:-1])
    x2 = x.contiguous().view(M, C)
    y = torch.empty_like(x2)
    if y.numel() == 0:
        return y.view(x.shape)
    alpha, weight = alpha.contiguous(), weight.contiguous()
    bias_ = bias.contiguous() if bias is not None else weight  # dummy pointer when no bias
    block_m, block_c, num_warps = _fwd_blocks(M, C, x2.element_size())
    n_cblocks = triton.cdiv(C, block_c)
    grid = (triton.cdiv(M, block_m) * n_cblocks,)
    with _on_device(x):
        _dyt_fwd_kernel[grid](
            x2, y, alpha, weight, bias_, M, C, n_cblocks,
            ALPHA_PER_CHANNEL=alpha.numel() > 1, HAS_BIAS=bias is not None,
            TANH_MODE=_tanh_mode(x.dtype), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return y.view(x.shape)


@_dyt_fwd.register_fake
def _dyt_fwd_fake(x, alpha, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("dyt::dyt_bwd", mutates_args=())
def _dyt_bwd(dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor,
             bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dweight, dbias); dbias is empty when bias is None. `bias` is only read for
    its dtype. Gradients come back in the parameters' dtypes, dx in x's."""
    C = x.shape[-1]
    M = math.prod(x.shape[:-1])
    x2 = x.contiguous().view(M, C)
    dy2 = dy.contiguous().view(M, C)
    per_channel = alpha.numel() > 1
    has_bias = bias is not None
    dx = torch.empty_like(x2)
    dalpha = torch.empty_like(alpha, memory_format=torch.contiguous_format)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if has_bias \
        else weight.new_empty(0)
    if M == 0 or C == 0:
        dalpha.zero_(), dweight.zero_(), dbias.zero_()
        return dx.view(x.shape), dalpha, dweight, dbias

    alpha, weight = alpha.contiguous(), weight.contiguous()
    block_m, block_c, num_warps = _bwd_blocks(M, C)
    G, rows_per_prog = _bwd_programs(M, block_m, x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    part_gamma = torch.empty((G, C), **f32)
    part_beta = torch.empty((G, C), **f32) if has_bias else part_gamma  # dummy when unused
    part_alpha = torch.empty((G, C) if per_channel else (G,), **f32)
    # the reduce kernel's blocks are fixed too: its summation order is part of the bits
    red_block_c = min(_next_pow2(C), 256)
    red_block_g = min(_next_pow2(G), 8)
    with _on_device(x):
        _dyt_bwd_kernel[(G,)](
            x2, dy2, dx, alpha, weight, part_gamma, part_beta, part_alpha, M, C, rows_per_prog,
            ALPHA_PER_CHANNEL=per_channel, HAS_BIAS=has_bias, TANH_MODE=_tanh_mode(x.dtype),
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
        _dyt_bwd_reduce_kernel[(triton.cdiv(C, red_block_c),)](
            part_gamma, part_beta, part_alpha, dweight, dbias if has_bias else dweight, dalpha,
            G, C, ALPHA_PER_CHANNEL=per_channel, HAS_BIAS=has_bias,
            BLOCK_G=red_block_g, BLOCK_C=red_block_c, num_warps=4)
    return dx.view(x.shape), dalpha, dweight, dbias


@_dyt_bwd.register_fake
def _dyt_bwd_fake(dy, x, alpha, weight, bias):
    dbias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return x.new_empty(x.shape), alpha.new_empty(alpha.shape), weight.new_empty(weight.shape), dbias


def _setup_context(ctx, inputs, output):
    x, alpha, weight, bias = inputs
    ctx.save_for_backward(x, alpha, weight, bias)  # x only: t is recomputed, y is not kept


def _backward(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    dx, dalpha, dweight, dbias = torch.ops.dyt.dyt_bwd(dy, x, alpha, weight, bias)
    return dx, dalpha, dweight, (dbias if bias is not None else None)


_dyt_fwd.register_autograd(_backward, setup_context=_setup_context)


def dyt(x, alpha, weight, bias=None):
    """gamma * tanh(alpha * x) + beta over the last dim of x, fused (see the module docstring).

    alpha: [1] (or 0-d) or [C]; weight: [C]; bias: [C] or None. Output in x's dtype.
    """
    _check(x, alpha, weight, bias)
    if not available(x):
        raise RuntimeError("dyt: the Triton kernel cannot run on this tensor "
                           f"({x.device}, {x.dtype}); use dyt.dyt_reference, or set "
                           "TRITON_INTERPRET=1 before importing kernel to run it on CPU")
    return torch.ops.dyt.dyt_fwd(x, alpha, weight, bias)
