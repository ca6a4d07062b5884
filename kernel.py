"""
Fused Triton kernels for the point-wise "dynamic squash" family over the last dimension:

    DyT   y = gamma * tanh(alpha * x)     + beta       (fn = "tanh")
    Derf  y = gamma * erf(alpha * x + s)  + beta       (fn = "erf", s a learnable scalar shift)

One forward kernel and one backward kernel serve both; the squashing function is a constexpr
(FN), so each compiled variant contains only its own math. The other squashing variants in dyt.py
(hardtanh, sigmoid, softsign, arctan, clamp, gelu_clip, rational, identity, no-alpha) stay plain
PyTorch: they are ablations, not layers anyone trains at scale.

Public API
    dyt(x, alpha, weight, bias=None) -> Tensor
    derf(x, alpha, shift, weight, bias=None) -> Tensor
    squash(x, alpha, weight, bias=None, shift=None, fn="tanh") -> Tensor
        x: [..., C], fp32 / bf16 / fp16, any leading shape, any strides (made contiguous).
        alpha: one scalar ([1] or 0-d) or per channel ([C]); shift (Derf's s): one scalar or
        None; weight (gamma): [C]; bias (beta): [C] or None. Parameters may be fp32 or the
        input's dtype. Returns y in x's dtype; the math is done in fp32. Autograd-aware: the
        backward is one fused pass over x and dy, and only x (plus the parameters) is saved.
    available(x) -> bool
        Whether the kernel can run for tensor x here: a CUDA (or ROCm) tensor with Triton
        compiled, or any CPU tensor when TRITON_INTERPRET=1 was set before this module was
        imported (that is how CI runs it).

Two ways in, one set of launchers:
  - eager: a torch.autograd.Function whose forward/backward call the launchers directly. The
    host path can be slower than the GPU work of a 4096x4096 layer (~40 us for fwd+bwd in bf16
    at ~4 TB/s), so it does as little Python as it can: launch parameters are cached per
    shape, the partial-sum buffers come from one allocation. bench.py measures it with the
    launches stubbed (bench.host_cost_report).
  - torch.compile: torch custom ops (torch.ops.dyt.squash_fwd / squash_bwd) with fake (meta)
    implementations and a registered autograd formula, so Dynamo keeps them in the graph
    without breaks. squash() picks the ops when torch.compiler.is_compiling().
  Autocast passes both through (bf16 input with fp32 parameters is fine); DDP / FSDP2 see
  ordinary parameter gradients.

Design, for memory bandwidth (the layer is element-wise: the floor is moving the activations)
  forward   2-D tiles of BLOCK_M rows x BLOCK_C channels, one tile per program, the grid
            flattened onto axis 0 (no 65,535 limit on rows); gamma/beta/alpha/s loaded once
            per tile. Bytes: read x, write y = 4 B/element in bf16.
  backward  one pass: reads x and dy, recomputes f(alpha*x + s) from x, writes dx and
            accumulates the parameter gradients in fp32 register tiles. Each program owns a
            fixed (row range, column block): a 2-D split, so there are enough programs for
            two resident 8-warp blocks per SM while every program still walks >= 64 rows (the
            partials stay ~1-3% of the bytes); the row loop is software-pipelined (cp.async). Per-program partial rows, then a small second
            kernel sums them in a fixed order over many programs. No atomics: the same inputs
            give the same bits. Everything is a fixed function of (M, C, dtype, SM count):
            nothing is autotuned. See the comment above _squash_bwd_kernel for the
            bytes-in-flight arithmetic and the expected % of copy bandwidth.
"""

import contextlib
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

# How tanh is computed inside the kernels (read at every call, so a benchmark can switch it):
#   "auto"      libdevice tanh on a GPU (accurate to a few ulp), the portable formula under the
#               interpreter (which cannot call libdevice).
#   "portable"  the formula in _tanh below, everywhere (what CI tests).
#   "libdevice" libdevice tanh (GPU only).
#   "approx"    PTX tanh.approx.f32 (NVIDIA sm_75+, max rel. error ~2^-11) for bf16/fp16 inputs
#               only; fp32 inputs still use libdevice. Opt-in: bench.py times it beside the
#               default ("DyT fused tanh.approx" rows); it is never assumed.
# erf (Derf) has one implementation: tl.erf, libdevice's erff on a GPU, math.erf under the
# interpreter.
TANH = os.environ.get("DYT_TANH", "auto")
_TANH_PORTABLE, _TANH_LIBDEVICE, _TANH_APPROX = 0, 1, 2
FNS = {"tanh": 0, "erf": 1}  # the constexpr FN of the kernels
_FN_TANH, _FN_ERF = 0, 1


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
#
# Cost per element (static sm_90 SASS, see tests/test_kernel.py::test_sm90_*): libdevice tanh
# ~30-39 instructions, tanh.approx (one MUFU.TANH) ~8-18. On an H200 (132 SMs, a device copy
# measured at ~4.3 TB/s, SM clock up to ~1.98 GHz) a bf16 forward (4 B per element) streams
# ~1075 elements/ns, 8.1 per SM per ns, ~4.1 per SM per clock; an SM issues 4 warp-instructions
# (128 thread-instructions) per clock, so the budget is ~31 instructions per element (~39 on an
# H100 at ~3.0 TB/s). libdevice tanh needs about all of it, which is why tanh.approx is worth
# measuring.

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


# f(z) for the family. erf: tl.erf (libdevice erff, max error ~2 ulp; math.erf in the
# interpreter). erf saturates to +-1 exactly for |z| > ~3.9, and erf(NaN) = NaN.
@triton.jit
def _squash(z, FN: tl.constexpr, MODE: tl.constexpr):
    if FN == 1:
        f = tl.erf(z)
    else:
        f = _tanh(z, MODE)
    return f


# f'(z), given z and f = f(z):
#   tanh: d tanh/dz = 1 - tanh^2 = (1 - t)(1 + t)   (cosh^2 - sinh^2 = 1). (1-t) is exact for
#         t >= 1/2 (Sterbenz), which avoids the extra rounding of t*t where f' is small.
#   erf:  d erf/dz = 2/sqrt(pi) * exp(-z^2)          (erf z = 2/sqrt(pi) int_0^z exp(-u^2) du).
#         exp(-z^2) underflows to 0 for |z| > ~9.4 and is 0 at |z| = inf: no NaN from
#         saturated inputs.
@triton.jit
def _squash_grad(z, f, FN: tl.constexpr):
    if FN == 1:
        g = 1.1283791670955126 * tl.exp(-(z * z))
    else:
        g = (1.0 - f) * (1.0 + f)
    return g


# ---------------------------------------------------------------------------------------------
# Forward: y = gamma * f(alpha * x [+ s]) + beta on a [M, C] row-major tensor.
# Bytes: 2 x M x C x e (read x, write y). ~16 KiB of input per program, 8 warps: 128-bit loads
# and stores (static check), 60-ish registers -> 4 blocks of 8 warps per SM, 64 KiB in flight
# per SM at most, over the ~22 KiB/SM that 4.3 TB/s x ~0.7 us of latency needs. Expected: 90%+ of
# copy when tanh is cheap enough (approx, erf) and ~80-90% with libdevice tanh (issue-bound near
# 70% of slots, see above). Estimates: no GPU has timed this kernel yet.

@triton.jit
def _squash_fwd_kernel(X, Y, A, S, W, B, M, C, n_cblocks,
                       FN: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, TANH_MODE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # one flat axis: rows never touch the 65,535 limit of axes 1/2
    pid_m = pid // n_cblocks  # once per program, not in a loop
    pid_c = pid - pid_m * n_cblocks
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
    z = a * x
    if HAS_SHIFT:
        z = z + tl.load(S).to(tl.float32)
    y = w[None, :] * _squash(z, FN, TANH_MODE)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward. With z = alpha*x + s, f = f(z), y = gamma*f + beta, upstream gradient dy, f' = f'(z):
#
#   dy/dx = gamma f' alpha,   dy/dalpha = gamma f' x,   dy/ds = gamma f',
#   dy/dgamma = f,            dy/dbeta = 1.
#
# Chain rule; alpha, s, gamma, beta are shared by every row (alpha and s also by every channel
# when they are scalars), so their gradients sum over everything they touch. With
# g[r,c] = dy[r,c] * gamma[c] * f'[r,c]:
#
#   dx[r,c]   = g[r,c] * alpha
#   dalpha    = sum_{r,c} g[r,c] * x[r,c]        (per-channel alpha: sum over r only)
#   ds        = sum_{r,c} g[r,c]                 (Derf)
#   dgamma[c] = sum_r dy[r,c] * f[r,c]
#   dbeta[c]  = sum_r dy[r,c]
#
# f is recomputed from x (so only x is saved). Masked lanes load x = dy = 0, so g = 0 and
# dy*f = 0 there: they add nothing, even with a shift (f(s) != 0).
#
# Work split: the [M, C] tensor is cut into n_cblocks column blocks of BLOCK_C channels and
# G_rows row ranges of rows_per_prog rows; program pid = (row range r, column block c) with
# c = pid mod n_cblocks. It walks its rows in BLOCK_M-row tiles (BLOCK_M x BLOCK_C = 2048
# elements: 8 per thread at 8 warps, one 128-bit load per thread of bf16 x and of dy), adding
# into [BLOCK_M, BLOCK_C] fp32 accumulators (element-wise adds, no cross-thread traffic in the
# loop), reduces them over rows once at the end, and writes one partial row: PG[r, cols],
# PB[r, cols], PA[r, cols] (per-channel alpha). Scalar alpha and s write one number per
# program: PA[pid], PS[pid].
#
# Sizes for 4096 x 4096 bf16 on an H200 (132 SMs, ~4.3 TB/s copy measured, 60 MB L2):
#   bytes       x + dy + dx = 96 MiB; floor 96 MiB / 4.3 TB/s = 23.4 us. (x alone, 32 MiB, fits
#               in the L2: bench.py's headline rows are at 8 x 4096 x 4096, 8x the bytes.)
#   programs    2 per SM, never more (a 265th program would be a second wave): 16 column
#               blocks x 16 row ranges of 256 rows = 256 programs.
#   partials    256 x 256 channels x 4 B x 2 (gamma, beta) = 0.5 MiB written, read again by
#               the reduce: 1 MiB, 1% of the backward's bytes (8% in the previous design).
#   in flight   Little's law: 4.3 TB/s x ~0.7 us of DRAM latency / 132 SMs ~ 22 KiB per SM must
#               be outstanding. One tile of x + dy is 2048 x 2 x 2 B = 8 KiB; with NUM_STAGES=2
#               the next tile's cp.async is in flight while this one is computed, so each
#               program keeps 8-16 KiB outstanding and the 2 resident programs 16-32 KiB per SM
#               (fp32: twice that): at the edge for bf16 on an H200, which is what
#               `studies/kernel_lab.py --bwd_stages 1,3` measures. Registers: 80 (tanh) / 111 (erf) for bf16 scalar alpha on
#               Triton 3.9, <= 128 in every variant the static test compiles: 2 blocks of 8
#               warps fit (65,536 registers per SM).
#   expected    80-90% of copy for the backward kernel (the previous design: one 8-warp block
#               per SM at 149 registers, no pipelining, ~16 KiB in flight: est. 65-85%).
#               With the reduce (~1 MiB, a few us of latency) fwd+bwd at 4096^2 bf16 has a
#               floor of 160 MiB / 4.3 TB/s = 39 us. All estimates: no GPU has run this.

@triton.jit
def _squash_bwd_kernel(X, DY, DX, A, S, W, P, M, C, rows_per_prog, n_cblocks, pb_off, pa_off,
                       ps_off, FN: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, HAS_SHIFT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, TANH_MODE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    pid_r = pid // n_cblocks  # once per program
    pid_c = pid - pid_r * n_cblocks
    PG, PB, PA, PS = P, P + pb_off, P + pa_off, P + ps_off  # one fp32 buffer, see _backward
    row_start = pid_r * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ALPHA_PER_CHANNEL:
        a = tl.load(A + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        a = tl.load(A).to(tl.float32)
    if HAS_SHIFT:
        s = tl.load(S).to(tl.float32)
    acc_gamma = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_beta = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_alpha = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)

    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        z = a * x
        if HAS_SHIFT:
            z = z + s
        f = _squash(z, FN, TANH_MODE)
        g = dy * w * _squash_grad(z, f, FN)
        tl.store(DX + offs, (g * a).to(DX.dtype.element_ty), mask=mask)
        acc_gamma += dy * f
        if HAS_BIAS:
            acc_beta += dy
        acc_alpha += g * x
        if HAS_SHIFT:
            acc_shift += g

    prow = pid_r.to(tl.int64) * C + cols
    tl.store(PG + prow, tl.sum(acc_gamma, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(PB + prow, tl.sum(acc_beta, axis=0), mask=cmask)
    if ALPHA_PER_CHANNEL:
        tl.store(PA + prow, tl.sum(acc_alpha, axis=0), mask=cmask)
    else:
        tl.store(PA + pid, tl.sum(tl.sum(acc_alpha, axis=1), axis=0))
    if HAS_SHIFT:
        tl.store(PS + pid, tl.sum(tl.sum(acc_shift, axis=1), axis=0))


# Sum the partials in a fixed order and write the gradients in the parameters' dtypes (the sum
# stays fp32 until this single final cast). Programs 0..n_col-1 each own BLOCK_C = 32 channels
# and sum their [G_rows, 32] strip of each per-channel partial in BLOCK_G-row passes (4096
# channels -> 128 programs; 32 row ranges -> one or two dependent passes). The last program sums
# the per-program scalars (alpha, s) in BLOCK_S chunks: G_all = G_rows x n_cblocks values.
# This is latency, not bandwidth: ~2 MiB in total, a few microseconds (the old reduce ran 16
# programs x 16-33 serial passes, then program 0 another pass series for alpha: est. 5-20 us).

@triton.jit
def _squash_reduce_kernel(P, DW, DB, DA, DS, G_rows, G_all, C, n_col, pb_off, pa_off, ps_off,
                          ALPHA_PER_CHANNEL: tl.constexpr, HAS_SHIFT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    PG, PB, PA, PS = P, P + pb_off, P + pa_off, P + ps_off
    if pid < n_col:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc_gamma = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        acc_beta = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        acc_alpha = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        for g0 in range(0, G_rows, BLOCK_G):
            gs = g0 + tl.arange(0, BLOCK_G)
            mask = (gs < G_rows)[:, None] & cmask[None, :]
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
        acc_a = tl.zeros([BLOCK_S], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_S], dtype=tl.float32)
        for g0 in range(0, G_all, BLOCK_S):
            gs = g0 + tl.arange(0, BLOCK_S)
            if not ALPHA_PER_CHANNEL:
                acc_a += tl.load(PA + gs, mask=gs < G_all, other=0.0)
            if HAS_SHIFT:
                acc_s += tl.load(PS + gs, mask=gs < G_all, other=0.0)
        if not ALPHA_PER_CHANNEL:
            tl.store(DA, tl.sum(acc_a, axis=0).to(DA.dtype.element_ty))
        if HAS_SHIFT:
            tl.store(DS, tl.sum(acc_s, axis=0).to(DS.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Host side: launch parameters (fixed functions of the shape, dtype and device; no autotuning).

_INTERPRET = isinstance(_squash_fwd_kernel, _InterpretedFunction) if _InterpretedFunction else False
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

BWD_TILE = 2048          # elements per backward tile: 8 per thread at 8 warps
BWD_WARPS = 8
BWD_PROGRAMS_PER_SM = 2  # the occupancy the backward is designed for: registers <= 128
                         # (asserted by the static sm_90 test), so 2 blocks of 8 warps fit
BWD_MIN_ROWS = 64        # rows per program at least: partials <= ~3% of the bytes
# tl.range software-pipelining depth of the backward's row loop: 2 = the next tile's x and dy
# are fetched by cp.async (LDGSTS) into shared memory while this tile is computed. 1 turns it
# off (plain loads into registers); studies/kernel_lab.py --bwd_stages times the choices.
BWD_STAGES = int(os.environ.get("DYT_BWD_STAGES", "2"))
RED_BLOCK_C, RED_BLOCK_G, RED_BLOCK_S = 32, 64, 1024


def available(x):
    """True if the kernels can run on tensor x here (see the module docstring)."""
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
    # 2048-element tiles, at most 256 channels wide: narrow column blocks keep the partials
    # small (their size is programs x BLOCK_C, not G x C) and give a 4096-wide layer 16 blocks.
    # 8 elements per thread at 8 warps: one 128-bit load of bf16 x (two of fp32).
    block_c = min(_next_pow2(C), 256)
    block_m = min(max(1, BWD_TILE // block_c), _next_pow2(M))
    tile = block_m * block_c
    num_warps = BWD_WARPS if tile >= 2048 else (4 if tile >= 512 else 2)
    return block_m, block_c, num_warps


_SM_COUNT = {}


def _sm_count(device):
    if device.type != "cuda":
        return 2  # interpreter: a few programs, so the partial reduction is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _bwd_grid(M, C, block_m, block_c, n_sm, min_rows=BWD_MIN_ROWS):
    """(G_rows, rows_per_prog, n_cblocks): the backward's 2-D split (see the kernel comment).

    At most BWD_PROGRAMS_PER_SM programs per SM in all (floor, not ceil: one program more
    than fits would run as a second wave, doubling the tail), but at least min_rows rows per
    program; rows_per_prog is a multiple of block_m (no ragged tile inside a range) and G_rows
    covers M with no empty range.
    """
    n_cblocks = triton.cdiv(C, block_c)
    target_rows = max(1, (BWD_PROGRAMS_PER_SM * n_sm) // n_cblocks)
    rows = max(triton.cdiv(M, target_rows), min_rows)
    rows = triton.cdiv(rows, block_m) * block_m
    return triton.cdiv(M, rows), rows, n_cblocks


def _check(x, alpha, weight, bias, shift):
    # On every eager call: shape comparisons only (cheap), the messages built on failure.
    shape = x.shape
    if not shape:
        raise ValueError("dyt: x must have at least one dimension (the channels)")
    C = shape[-1]
    if weight.shape != (C,):
        raise ValueError(f"dyt: weight must have shape [{C}], got {tuple(weight.shape)}")
    if alpha.shape not in ((1,), (C,), ()):
        raise ValueError(f"dyt: alpha must have shape [1] or [{C}], got {tuple(alpha.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"dyt: bias must have shape [{C}], got {tuple(bias.shape)}")
    if shift is not None and shift.shape not in ((1,), ()):
        raise ValueError(f"dyt: shift must be one scalar ([1] or 0-d), got {tuple(shift.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"dyt: unsupported dtype {x.dtype}")
    dev = x.device
    if (alpha.device != dev or weight.device != dev or (bias is not None and bias.device != dev)
            or (shift is not None and shift.device != dev)):
        raise ValueError(f"dyt: the parameters must be on x's device ({dev})")


_MULTI_GPU = None


def _on_device(x):
    # Triton launches on the current CUDA device: make that x's device (multi-GPU processes).
    # Skipped on a one-GPU process, where it can only be right (and costs host time).
    global _MULTI_GPU
    if not x.is_cuda:
        return contextlib.nullcontext()
    if _MULTI_GPU is None:
        _MULTI_GPU = torch.cuda.device_count() > 1
    return torch.cuda.device(x.device) if _MULTI_GPU else contextlib.nullcontext()


# Launch parameters, cached per (M, C, dtype, device): the grid arithmetic is host time.
_FWD_CFG, _BWD_CFG = {}, {}


def _fwd_cfg(M, C, x):
    key = (M, C, x.dtype)
    cfg = _FWD_CFG.get(key)
    if cfg is None:
        block_m, block_c, num_warps = _fwd_blocks(M, C, x.element_size())
        n_cblocks = triton.cdiv(C, block_c)
        cfg = (block_m, block_c, num_warps, n_cblocks, (triton.cdiv(M, block_m) * n_cblocks,))
        _FWD_CFG[key] = cfg
    return cfg


def _bwd_plan(M, C, n_sm, min_rows=BWD_MIN_ROWS):
    """Every launch parameter of the backward and its reduce, for n_sm multiprocessors."""
    block_m, block_c, num_warps = _bwd_blocks(M, C)
    g_rows, rows, n_cblocks = _bwd_grid(M, C, block_m, block_c, n_sm, min_rows)
    n_col = triton.cdiv(C, RED_BLOCK_C)
    return dict(block_m=block_m, block_c=block_c, num_warps=num_warps, g_rows=g_rows,
                rows=rows, n_cblocks=n_cblocks, n_col=n_col, grid=(g_rows * n_cblocks,),
                red_grid=(n_col + 1,), red_block_g=min(_next_pow2(g_rows), RED_BLOCK_G))


def _bwd_cfg(M, C, device):
    key = (M, C, device)
    cfg = _BWD_CFG.get(key)
    if cfg is None:
        # interpreter: 2 programs' worth, 32-row minimum, so the tests see several row ranges
        cfg = _bwd_plan(M, C, _sm_count(device), BWD_MIN_ROWS if device.type == "cuda" else 32)
        _BWD_CFG[key] = cfg
    return cfg


# ---------------------------------------------------------------------------------------------
# Launchers: plain functions on tensors, shared by the eager autograd.Function and the ops.

def _forward(x, alpha, shift, weight, bias, fn):
    # The kernels take data pointers: a contiguous x of any shape is its own [M, C] view.
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty_like(x)
    C = x.shape[-1]
    M = x.numel() // C if C else 0
    if M == 0:
        return y
    block_m, block_c, num_warps, n_cblocks, grid = _fwd_cfg(M, C, x)
    with _on_device(x):
        _squash_fwd_kernel[grid](
            x, y, alpha, shift if shift is not None else alpha, weight,
            bias if bias is not None else weight, M, C, n_cblocks,
            FN=fn, ALPHA_PER_CHANNEL=alpha.numel() > 1, HAS_SHIFT=shift is not None,
            HAS_BIAS=bias is not None, TANH_MODE=_tanh_mode(x.dtype),
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return y


def _backward(dy, x, alpha, shift, weight, bias, fn):
    """(dx, dalpha, dshift, dweight, dbias): dshift / dbias are None without shift / bias.
    Gradients come back in the parameters' dtypes, dx in x's."""
    if not x.is_contiguous():
        x = x.contiguous()
    if not dy.is_contiguous():
        dy = dy.contiguous()
    per_channel = alpha.numel() > 1
    has_bias, has_shift = bias is not None, shift is not None
    dx = torch.empty_like(x)
    dalpha = torch.empty_like(alpha)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(bias) if has_bias else None
    dshift = torch.empty_like(shift) if has_shift else None
    C = x.shape[-1]
    M = x.numel() // C if C else 0
    if M == 0:
        for t in (dalpha, dweight, dbias, dshift):
            if t is not None:
                t.zero_()
        return dx, dalpha, dshift, dweight, dbias

    cfg = _bwd_cfg(M, C, x.device)
    g_rows, g_all = cfg["g_rows"], cfg["grid"][0]
    # One fp32 buffer for every partial, passed as a pointer plus element offsets:
    # [gamma: G_rows x C][beta: G_rows x C, if bias][alpha: G_rows x C, if per channel]
    # [alpha: G_all, if scalar][shift: G_all]. One allocation instead of four slices.
    rows_c = g_rows * C
    pb_off = rows_c if has_bias else 0
    pa_off = (1 + has_bias) * rows_c
    ps_off = pa_off + (rows_c if per_channel else g_all)
    part = torch.empty(ps_off + g_all, dtype=torch.float32, device=x.device)
    with _on_device(x):
        _squash_bwd_kernel[cfg["grid"]](
            x, dy, dx, alpha, shift if has_shift else alpha, weight, part,
            M, C, cfg["rows"], cfg["n_cblocks"], pb_off, pa_off, ps_off,
            FN=fn, ALPHA_PER_CHANNEL=per_channel, HAS_SHIFT=has_shift, HAS_BIAS=has_bias,
            TANH_MODE=_tanh_mode(x.dtype), BLOCK_M=cfg["block_m"], BLOCK_C=cfg["block_c"],
            NUM_STAGES=BWD_STAGES, num_warps=cfg["num_warps"])
        _squash_reduce_kernel[cfg["red_grid"]](
            part, dweight, dbias if has_bias else dweight, dalpha,
            dshift if has_shift else dalpha, g_rows, g_all, C, cfg["n_col"], pb_off, pa_off, ps_off,
            ALPHA_PER_CHANNEL=per_channel, HAS_SHIFT=has_shift, HAS_BIAS=has_bias,
            BLOCK_G=cfg["red_block_g"], BLOCK_C=RED_BLOCK_C, BLOCK_S=RED_BLOCK_S, num_warps=4)
    return dx, dalpha, dshift, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Eager path: one autograd.Function, no dispatcher round trips.

class _SquashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, shift, weight, bias, fn):
        ctx.fn = fn
        ctx.save_for_backward(x, alpha, shift, weight, bias)  # x only: f is recomputed
        return _forward(x, alpha, shift, weight, bias, fn)

    @staticmethod
    def backward(ctx, dy):
        x, alpha, shift, weight, bias = ctx.saved_tensors
        dx, dalpha, dshift, dweight, dbias = _backward(dy, x, alpha, shift, weight, bias, ctx.fn)
        return dx, dalpha, dshift, dweight, dbias, None


# ---------------------------------------------------------------------------------------------
# torch.compile path: custom ops with fake kernels and an autograd formula.

@torch.library.custom_op("dyt::squash_fwd", mutates_args=())
def _squash_fwd_op(x: Tensor, alpha: Tensor, shift: Optional[Tensor], weight: Tensor,
                   bias: Optional[Tensor], fn: int) -> Tensor:
    return _forward(x, alpha.contiguous(), shift, weight.contiguous(),
                    bias.contiguous() if bias is not None else None, fn)


@_squash_fwd_op.register_fake
def _squash_fwd_fake(x, alpha, shift, weight, bias, fn):
    return x.new_empty(x.shape)


@torch.library.custom_op("dyt::squash_bwd", mutates_args=())
def _squash_bwd_op(dy: Tensor, x: Tensor, alpha: Tensor, shift: Optional[Tensor], weight: Tensor,
                   bias: Optional[Tensor], fn: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dshift, dweight, dbias); dshift / dbias are empty when shift / bias is None
    (custom ops cannot return None)."""
    dx, dalpha, dshift, dweight, dbias = _backward(
        dy, x, alpha.contiguous(), shift, weight.contiguous(),
        bias.contiguous() if bias is not None else None, fn)
    # (a fresh empty tensor for each absent one: outputs may not alias each other)
    return (dx, dalpha, dshift if dshift is not None else weight.new_empty(0), dweight,
            dbias if dbias is not None else weight.new_empty(0))


@_squash_bwd_op.register_fake
def _squash_bwd_fake(dy, x, alpha, shift, weight, bias, fn):
    return (x.new_empty(x.shape), alpha.new_empty(alpha.shape),
            shift.new_empty(shift.shape) if shift is not None else weight.new_empty(0),
            weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, alpha, shift, weight, bias, fn = inputs
    ctx.fn = fn
    ctx.save_for_backward(x, alpha, shift, weight, bias)


def _op_backward(ctx, dy):
    x, alpha, shift, weight, bias = ctx.saved_tensors
    dx, dalpha, dshift, dweight, dbias = torch.ops.dyt.squash_bwd(dy, x, alpha, shift, weight,
                                                                  bias, ctx.fn)
    return (dx, dalpha, dshift if shift is not None else None, dweight,
            dbias if bias is not None else None, None)


_squash_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry points.

def squash(x, alpha, weight, bias=None, shift=None, fn="tanh"):
    """gamma * f(alpha * x [+ shift]) + beta over the last dim of x, fused; f = tanh or erf.

    alpha: [1] (or 0-d) or [C]; shift: [1] (or 0-d) or None; weight: [C]; bias: [C] or None.
    Output in x's dtype.
    """
    fn_id = FNS[fn]
    if torch.compiler.is_compiling():
        _check(x, alpha, weight, bias, shift)
        return torch.ops.dyt.squash_fwd(x, alpha, shift, weight, bias, fn_id)
    _check(x, alpha, weight, bias, shift)
    if not available(x):
        raise RuntimeError("dyt: the Triton kernel cannot run on this tensor "
                           f"({x.device}, {x.dtype}); use the layers in dyt.py, or set "
                           "TRITON_INTERPRET=1 before importing kernel to run it on CPU")
    if not alpha.is_contiguous():
        alpha = alpha.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return _SquashFunction.apply(x, alpha, shift, weight, bias, fn_id)


def dyt(x, alpha, weight, bias=None):
    """DyT: gamma * tanh(alpha * x) + beta over the last dim of x, fused."""
    return squash(x, alpha, weight, bias, None, "tanh")


def derf(x, alpha, shift, weight, bias=None):
    """Derf: gamma * erf(alpha * x + shift) + beta over the last dim of x, fused."""
    return squash(x, alpha, weight, bias, shift, "erf")
