"""
Dynamic Tanh (DyT) and the layers it is compared with.

    DyT(x) = gamma * tanh(alpha * x) + beta

from "Transformers without Normalization" (Zhu, Chen, He, LeCun, Liu, 2025). `alpha` is one
learnable scalar (init `alpha0`, 0.5 by default); `gamma` and `beta` are per-channel, like the
affine of the norm that DyT replaces. Unlike a norm, DyT computes no statistics: it is
element-wise, so it costs one pass over the activations.

This file holds
  - DyT itself (the plain PyTorch definition; on CUDA it calls the fused Triton kernel from
    kernel.py, which computes exactly the same function, and elsewhere DyTFunction: the
    definition's ops with a hand-written backward that reuses its buffers),
  - Derf: gamma * erf(alpha * x + s) + beta, with a learnable scalar shift s ("Stronger
    Normalization-Free Transformers", Chen, Lu, Zhu, Sun, Liu, 2025); on CUDA it calls the
    same fused kernel with erf in place of tanh, elsewhere DerfFunction (as DyTFunction),
  - DynamicSquash: the same layer with another squashing function or alpha shape, for the
    ablations of the DyT paper (Tables 8-9) and of the ViT study (Table 5, section 5),
  - make_norm(name, dim, alpha0): one factory for every layer, used by the models and by
    the trainers' `--norm NAME`,
  - convert_to_dyt(model): swap every LayerNorm/RMSNorm of any model for DyT.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what kernel.py computes


class DyT(nn.Module):
    """gamma * tanh(alpha * x) + beta over the channel dimension.

    channels_last=True: x is [..., C] (tokens). channels_last=False: x is [B, C, *spatial]
    (conv nets). bias=False drops beta (the official LLaMA variant has none).
    `weight` is gamma and `bias` is beta: the names of the norm DyT replaces, so that code
    which treats a norm's affine specially (weight decay, copying a checkpoint) still works.
    gamma0 is gamma's init: 1 in both papers. DyT's output is bounded by +-gamma, so gamma0
    sets its ceiling; this project's small GPTs need more than 1 (model.DYT_OUT_RMS0).
    """

    def __init__(self, dim, alpha0=0.5, channels_last=True, bias=True, gamma0=1.0):
        super().__init__()
        self.dim, self.alpha0, self.gamma0, self.channels_last = dim, alpha0, gamma0, channels_last
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.use_kernel = True  # False: always dyt_reference, under autograd (benchmarks, tests)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.constant_(self.weight, self.gamma0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if self.use_kernel and self.channels_last and self.alpha.numel() == 1:
            if x.is_cuda and x.dtype in _KERNEL_DTYPES:
                import kernel  # the fused Triton kernel: same function, one pass over memory
                return kernel.dyt(x, self.alpha, self.weight, self.bias)
            # elsewhere (the CPU): the same ops, with a hand-written backward
            return DyTFunction.apply(x, self.alpha, self.weight, self.bias)
        return dyt_reference(x, self.alpha, self.weight, self.bias, self.channels_last)

    def extra_repr(self):
        return (f"{self.dim}, alpha0={self.alpha0}, gamma0={self.gamma0}, "
                f"channels_last={self.channels_last}, bias={self.bias is not None}")


def dyt_reference(x, alpha, weight, bias=None, channels_last=True):
    """The definition, in plain PyTorch. alpha is a scalar ([1]) or per channel ([C])."""
    if not channels_last:  # [B, C, H, W]: broadcast the per-channel tensors over the spatial dims
        shape = (-1,) + (1,) * (x.dim() - 2)
        alpha = alpha.view(shape) if alpha.numel() > 1 else alpha
        weight = weight.view(shape)
        bias = bias.view(shape) if bias is not None else None
    y = weight * torch.tanh(alpha * x)
    return y + bias if bias is not None else y


class DyTFunction(torch.autograd.Function):
    """dyt_reference for tokens [..., C] and a scalar alpha, with a hand-written backward:
    the forward's ops and values are dyt_reference's, and in fp32 the gradients are bitwise
    those autograd computes from it (tests/test_dyt.py). What differs is memory traffic: tanh and
    its gradient run in place on temporaries, dx is written into dL/dz's buffer and u x into
    g t's, where autograd's graph allocates a fresh tensor for every op; on a CPU a pass that
    writes fresh memory costs ~3x one that rewrites a buffer just used. `python bench.py
    --device cpu` (results/bench_cpu.md, 1 thread, fp32 fwd+bwd): 8-34% less time than
    autograd's graph over the shapes and runs of 2026-12-03, e.g. 6.9 ms instead of 8.7 at
    2048x384 (torch's fused LayerNorm: 2.4); in bf16 a few percent. Saved for backward: x and
    t = tanh(alpha x), as autograd saves.

    With z = alpha x, t = tanh(z), y = gamma t + beta, and g = dL/dy:
        dL/dgamma = sum over tokens of g t,        dL/dbeta = sum over tokens of g,
        u = dL/dz = g gamma (1 - t^2)              (aten's tanh_backward(g gamma, t), one pass),
        dL/dx = alpha u,                           dL/dalpha = sum over all elements of u x.
    """

    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        t = (alpha * x).tanh_()  # in place on the temporary: one buffer fewer
        ctx.save_for_backward(x, alpha, weight, t)
        ctx.has_bias = bias is not None
        y = weight * t
        return y.add_(bias) if bias is not None else y  # in place: the same rounding as y + bias

    @staticmethod
    def backward(ctx, g):
        x, alpha, weight, t = ctx.saved_tensors
        need_x, need_alpha, need_weight, need_bias = ctx.needs_input_grad
        C = g.shape[-1]
        gt = g * t if need_weight else None
        g_weight = gt.reshape(-1, C).sum(0) if need_weight else None
        g_bias = g.reshape(-1, C).sum(0) if ctx.has_bias and need_bias else None
        g_x = g_alpha = None
        if need_x or need_alpha:
            gw = g * weight
            u = torch.ops.aten.tanh_backward.grad_input(gw, t, grad_input=gw)  # into gw
            if need_alpha:  # not torch.dot: 2x faster, but it adds in fp32 20x less exactly
                ux = torch.mul(u, x, out=gt) if gt is not None and gt.dtype == u.dtype else u * x
                g_alpha = ux.sum().reshape(1).to(alpha.dtype)
            if need_x:
                g_x = u.mul_(alpha).to(x.dtype)
        return g_x, g_alpha, g_weight, g_bias


class Derf(nn.Module):
    """gamma * erf(alpha * x + s) + beta over the channel dimension (Derf).

    From "Stronger Normalization-Free Transformers" (Chen, Lu, Zhu, Sun, Liu, 2025): erf in
    place of tanh, and a learnable scalar shift s (init 0) inside it, so the S-curve can move
    off-centre. alpha (init alpha0, 0.5) and s are scalars; gamma (init gamma0) and beta are
    per channel. The paper reports Derf ahead of LayerNorm and DyT on ViT-B (82.8 vs 82.3 /
    82.5) and level with LayerNorm on GPT-2 124M (2.94; DyT 2.97); those are its numbers.
    The arguments are DyT's.
    """

    def __init__(self, dim, alpha0=0.5, channels_last=True, bias=True, gamma0=1.0):
        super().__init__()
        self.dim, self.alpha0, self.gamma0, self.channels_last = dim, alpha0, gamma0, channels_last
        self.alpha = nn.Parameter(torch.empty(1))
        self.shift = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.use_kernel = True  # set False to force the plain PyTorch path (benchmarks, tests)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.zeros_(self.shift)
        nn.init.constant_(self.weight, self.gamma0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if self.use_kernel and self.channels_last:
            if x.is_cuda and x.dtype in _KERNEL_DTYPES:
                import kernel  # the same fused Triton kernel as DyT's, with erf and the shift
                return kernel.derf(x, self.alpha, self.shift, self.weight, self.bias)
            return DerfFunction.apply(x, self.alpha, self.shift, self.weight, self.bias)
        return derf_reference(x, self.alpha, self.shift, self.weight, self.bias, self.channels_last)

    def extra_repr(self):
        return (f"{self.dim}, alpha0={self.alpha0}, gamma0={self.gamma0}, "
                f"channels_last={self.channels_last}, bias={self.bias is not None}")


def derf_reference(x, alpha, shift, weight, bias=None, channels_last=True):
    """Derf's definition, in plain PyTorch: weight * erf(alpha * x + shift) + bias."""
    if not channels_last:
        shape = (-1,) + (1,) * (x.dim() - 2)
        weight = weight.view(shape)
        bias = bias.view(shape) if bias is not None else None
    y = weight * torch.erf(alpha * x + shift)
    return y + bias if bias is not None else y


class DerfFunction(torch.autograd.Function):
    """derf_reference for tokens [..., C] (alpha and shift scalars) with a hand-written
    backward, as DyTFunction is for DyT: the same ops in the same order, so that in fp32 the
    output and every gradient are bitwise autograd's (tests/test_dyt.py), with the
    temporaries rewritten in place instead of a fresh tensor for every op.

    With z = alpha x + s, e = erf(z), y = gamma e + beta, and g = dL/dy:
        dL/dgamma = sum over tokens of g e,        dL/dbeta = sum over tokens of g,
        u = dL/dz = (2/sqrt(pi)) exp(-z^2) (g gamma)   (autograd's formula for erf, its order),
        dL/dx = alpha u,   dL/dalpha = sum of u x,   dL/ds = sum of u.
    Saved for backward: x and e. z is recomputed from x (the same two ops, so the same bits),
    where autograd's graph keeps it as well: one activation fewer held from forward to backward.
    """

    @staticmethod
    def forward(ctx, x, alpha, shift, weight, bias):
        e = (alpha * x).add_(shift).erf_()  # z, then e, in one buffer
        ctx.save_for_backward(x, alpha, shift, weight, e)
        ctx.has_bias = bias is not None
        y = weight * e
        return y.add_(bias) if bias is not None else y

    @staticmethod
    def backward(ctx, g):
        x, alpha, shift, weight, e = ctx.saved_tensors
        need_x, need_alpha, need_shift, need_weight, need_bias = ctx.needs_input_grad
        C = g.shape[-1]
        g_weight = (g * e).reshape(-1, C).sum(0) if need_weight else None
        g_bias = g.reshape(-1, C).sum(0) if ctx.has_bias and need_bias else None
        g_x = g_alpha = g_shift = None
        if need_x or need_alpha or need_shift:
            ge = g * weight  # dL/de
            u = (alpha * x).add_(shift)  # z again
            u.square_().neg_().exp_().mul_(2 / math.sqrt(math.pi)).mul_(ge)  # erf'(z) dL/de
            if need_shift:
                g_shift = u.sum().reshape(1).to(shift.dtype)
            if need_alpha:
                ux = torch.mul(u, x, out=ge) if ge.dtype == u.dtype else u * x  # into ge
                g_alpha = ux.sum().reshape(1).to(alpha.dtype)
            if need_x:
                g_x = u.mul_(alpha).to(x.dtype)
        return g_x, g_alpha, g_shift, g_weight, g_bias


# ---------------------------------------------------------------------------------------------
# The ablations: other squashing functions, no alpha, per-channel alpha.
# Each maps alpha*x to a bounded range (except `identity`, which the DyT paper shows diverges).

def _gelu_clip(x):
    # DyGC: GELU clipped from above at 1 (GELU is already bounded below, by about -0.17).
    return F.gelu(x).clamp(max=1.0)


def _rational(x):
    # DyPR: the [3/2] Pade approximant of tanh, x(15 + x^2) / (15 + 6x^2), clipped to [-1, 1]
    # (the rational function alone grows like x/6 for large |x|; it first reaches 1 near 2.9).
    x2 = x * x
    return (x * (15 + x2) / (15 + 6 * x2)).clamp(-1.0, 1.0)


SQUASH = {
    "tanh": torch.tanh,                          # DyT
    "hardtanh": F.hardtanh,                      # clip to [-1, 1], piecewise linear
    "sigmoid": torch.sigmoid,                    # DyS: range (0, 1), not zero-centred
    "softsign": F.softsign,                      # DySs: x / (1 + |x|)
    "arctan": torch.atan,                        # DyA: range (-pi/2, pi/2)
    "clamp": lambda x: x.clamp(-1.0, 1.0),       # DyCL: the same function as hardtanh, kept
                                                 # under the ViT study's name for its table
    "gelu_clip": _gelu_clip,                     # DyGC
    "rational": _rational,                       # DyPR
    "identity": lambda x: x,                     # alpha * x: no squashing (diverges)
}


class DynamicSquash(nn.Module):
    """gamma * f(alpha * x) + beta for any f in SQUASH; DyT is f = tanh.

    alpha: "scalar" (the paper), "channel" (one alpha per channel, the ViT study's section 5)
    or "none" (f(x) with no alpha at all, the DyT paper's Table 9).
    """

    def __init__(self, dim, squash="tanh", alpha0=0.5, alpha="scalar", channels_last=True,
                 bias=True, gamma0=1.0):
        super().__init__()
        if squash not in SQUASH:
            raise ValueError(f"unknown squash {squash!r}; choose one of {', '.join(SQUASH)}")
        if alpha not in ("scalar", "channel", "none"):
            raise ValueError(f"unknown alpha {alpha!r}; choose scalar, channel or none")
        self.dim, self.squash, self.alpha0, self.alpha_kind = dim, squash, alpha0, alpha
        self.gamma0, self.channels_last = gamma0, channels_last
        self.fn = SQUASH[squash]
        n_alpha = {"scalar": 1, "channel": dim, "none": 0}[alpha]
        self.alpha = nn.Parameter(torch.empty(n_alpha)) if n_alpha else None
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.alpha0)
        nn.init.constant_(self.weight, self.gamma0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        shape = (-1,) if self.channels_last else (-1,) + (1,) * (x.dim() - 2)
        if self.alpha is not None:
            x = (self.alpha.view(shape) if self.alpha.numel() > 1 else self.alpha) * x
        y = self.weight.view(shape) * self.fn(x)
        return y + self.bias.view(shape) if self.bias is not None else y

    def extra_repr(self):
        return (f"{self.dim}, squash={self.squash}, alpha={self.alpha_kind}, alpha0={self.alpha0}, "
                f"gamma0={self.gamma0}, channels_last={self.channels_last}, bias={self.bias is not None}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] tensor (ConvNeXt-style channels-first)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class RMSNorm2d(nn.RMSNorm):
    """RMSNorm over the channels of a [B, C, H, W] tensor."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


# ---------------------------------------------------------------------------------------------
# One factory for every layer: what `--norm NAME` means.

NORMS = {
    # normalisations
    "ln": "LayerNorm",
    "rms": "RMSNorm",
    "identity": "no normalisation at all (nn.Identity)",
    # DyT and its squashing-function variants, all with a learnable scalar alpha
    "dyt": "gamma * tanh(alpha x) + beta",
    "derf": "Derf: gamma * erf(alpha x + s) + beta, s a learnable scalar shift",
    "hardtanh": "gamma * hardtanh(alpha x) + beta",
    "sigmoid": "DyS: gamma * sigmoid(alpha x) + beta",
    "softsign": "DySs: gamma * softsign(alpha x) + beta",
    "arctan": "DyA: gamma * arctan(alpha x) + beta",
    "clamp": "DyCL: gamma * clamp(alpha x, -1, 1) + beta",
    "gelu_clip": "DyGC: gamma * min(gelu(alpha x), 1) + beta",
    "rational": "DyPR: gamma * pade_tanh(alpha x) + beta",
    "dyt_identity": "gamma * alpha x + beta (no squashing; diverges)",
    # alpha variants of DyT
    "dyt_noalpha": "gamma * tanh(x) + beta (DyT paper Table 9)",
    "dyt_channel": "gamma * tanh(alpha_c x) + beta, one alpha per channel (ViT study sec. 5)",
}


def make_norm(name, dim, alpha0=0.5, channels_last=True, bias=True, eps=1e-6, gamma0=1.0):
    """The layer called `name` (a key of NORMS) over `dim` channels.

    alpha0 and gamma0 (the init of alpha and of gamma) are ignored by the norms, whose gamma
    starts at 1; bias=False drops LayerNorm's and DyT's beta; eps is the norms' epsilon.
    """
    if gamma0 <= 0:
        raise ValueError(f"gamma0 must be > 0, got {gamma0}")
    if name == "ln":
        return (nn.LayerNorm if channels_last else LayerNorm2d)(dim, eps=eps, bias=bias)
    if name == "rms":
        return (nn.RMSNorm if channels_last else RMSNorm2d)(dim, eps=eps)
    if name == "identity":
        return nn.Identity()
    if name == "dyt":
        return DyT(dim, alpha0, channels_last, bias, gamma0)
    if name == "derf":
        return Derf(dim, alpha0, channels_last, bias, gamma0)
    if name == "dyt_identity":
        return DynamicSquash(dim, "identity", alpha0, "scalar", channels_last, bias, gamma0)
    if name == "dyt_noalpha":
        return DynamicSquash(dim, "tanh", alpha0, "none", channels_last, bias, gamma0)
    if name == "dyt_channel":
        return DynamicSquash(dim, "tanh", alpha0, "channel", channels_last, bias, gamma0)
    if name in SQUASH:
        return DynamicSquash(dim, name, alpha0, "scalar", channels_last, bias, gamma0)
    raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(NORMS)}")


def is_dynamic(module):
    """True for DyT, Derf and the variants (the layers with an alpha, a gamma and a beta)."""
    return isinstance(module, (DyT, Derf, DynamicSquash))


# ---------------------------------------------------------------------------------------------
# Converting an existing model.

def _norm_kind(module):
    """'ln' / 'rms' and channels_last for a normalisation layer from any library, else None.

    Matches torch's nn.LayerNorm / nn.RMSNorm and, by class name, the norms that other
    libraries define themselves (timm's LayerNorm2d, Hugging Face's LlamaRMSNorm, T5LayerNorm
    which is an RMSNorm, ...). A '2d' in the name means channels-first.
    """
    cls = type(module).__name__.lower()
    channels_last = "2d" not in cls
    if isinstance(module, nn.RMSNorm) or "rmsnorm" in cls or cls == "t5layernorm":
        return "rms", channels_last
    if isinstance(module, nn.LayerNorm) or "layernorm" in cls:
        return "ln", channels_last
    return None


def _norm_dim(module):
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            raise ValueError(f"{type(module).__name__} normalises over {shape}; DyT replaces "
                             "norms over one (channel) dimension only")
        return shape[0]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    raise ValueError(f"cannot tell the channel count of {type(module).__name__}; give it a "
                     "1-d `weight` or `normalized_shape`")


def convert_to_dyt(model, alpha0=0.5, name="dyt", copy_affine=True, gamma0=1.0):
    """Replace every LayerNorm/RMSNorm inside `model` by `make_norm(name, dim, alpha0)`, in place.

    Everything else in the model stays as it was; name may be any DyT-like layer ("derf", ...).
    alpha0 and gamma0 may be numbers or functions of the dotted module name (e.g. a larger
    alpha0 for the norms before attention). With copy_affine, a norm's weight (and bias)
    become DyT's gamma (and beta), on the norm's device and dtype, so a pretrained model keeps
    its affine and gamma0 applies only to norms without a weight; without it, gamma starts at
    gamma0. DyT keeps a beta only where the norm had one. Returns the model and the number of
    layers replaced.
    """
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            kind = _norm_kind(child)
            if kind is None:
                continue
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            a0 = alpha0(full_name) if callable(alpha0) else alpha0
            g0 = gamma0(full_name) if callable(gamma0) else gamma0
            old_weight = getattr(child, "weight", None)
            old_bias = getattr(child, "bias", None)
            has_bias = isinstance(old_bias, torch.Tensor)
            new = make_norm(name, _norm_dim(child), a0, channels_last=kind[1], bias=has_bias,
                            gamma0=g0)
            if isinstance(old_weight, torch.Tensor):
                new.to(device=old_weight.device, dtype=old_weight.dtype)
                if copy_affine and hasattr(new, "weight"):
                    with torch.no_grad():
                        new.weight.copy_(old_weight)
                        if has_bias and getattr(new, "bias", None) is not None:
                            new.bias.copy_(old_bias)
            setattr(parent, child_name, new)
            count += 1
    return model, count
