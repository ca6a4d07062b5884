"""
Dynamic Tanh (DyT), Derf, and the layers they are compared with.

    DyT(x)  = gamma * tanh(alpha * x) + beta        Transformers without Normalization
                                                    (Zhu, Chen, He, LeCun, Liu, 2025)
    Derf(x) = gamma * erf(alpha * x + s) + beta     Stronger Normalization-Free Transformers
                                                    (Chen, Lu, Zhu, Sun, Liu, 2025)

alpha (init alpha0) and Derf's shift s are learnable scalars; gamma (init gamma0) and beta are
per channel, like the affine of the norm each replaces, and carry its names (`weight`, `bias`)
so that code which treats a norm's affine specially (weight decay, loading a checkpoint) keeps
working. Neither computes statistics: each is element-wise, one pass over the activations.

A layer's forward is its definition, run by autograd. On CUDA the same function runs as one
fused Triton kernel (kernel.py): one pass forward and one backward.

Also here: the ablations (other squashing functions, no alpha, one alpha per channel), one
line each in ABLATIONS, all of one shape (class Dynamic); NORMS, every name `--norm` takes,
and make_norm(name, dim, ...), which every `--norm NAME` goes through;
is_dynamic, the one test of "DyT-like"; and convert_to_dyt(model), which swaps the norms of
any model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Dynamic(nn.Module):
    """gamma * f(...) + beta over the channel dimension: what DyT, Derf and the ablations share.

    channels_last=True: x is [..., C] (tokens); False: x is [B, C, *spatial] (conv nets).
    alpha: "scalar" (the papers), "channel" (one per channel) or "none". bias=False drops beta
    (the official LLaMA DyT has none). gamma0 is gamma's init, 1 in both papers; DyT's output
    is bounded by +-gamma, and this project's small GPTs start it higher (model.DYT_OUT_RMS0).
    use_kernel=False keeps DyT and Derf on their definition on CUDA too (benchmarks, tests).
    """

    def __init__(self, dim, alpha0=0.5, channels_last=True, bias=True, gamma0=1.0, alpha="scalar",
                 shift=False):
        super().__init__()
        if alpha not in ("scalar", "channel", "none"):
            raise ValueError(f"unknown alpha {alpha!r}; choose scalar, channel or none")
        self.dim, self.alpha0, self.gamma0, self.channels_last = dim, alpha0, gamma0, channels_last
        n_alpha = {"scalar": 1, "channel": dim, "none": 0}[alpha]
        self.alpha = nn.Parameter(torch.empty(n_alpha)) if n_alpha else None
        self.shift = nn.Parameter(torch.empty(1)) if shift else None  # Derf's s
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.use_kernel = True
        self.reset_parameters()

    def reset_parameters(self):
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.alpha0)
        if self.shift is not None:
            nn.init.zeros_(self.shift)
        nn.init.constant_(self.weight, self.gamma0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def per_channel(self, p, x):
        """A per-channel parameter shaped to broadcast over x's channels."""
        return p if self.channels_last else p.view((-1,) + (1,) * (x.dim() - 2))

    def scale(self, x):
        """alpha * x (x itself without an alpha)."""
        if self.alpha is None:
            return x
        return (self.per_channel(self.alpha, x) if self.alpha.numel() > 1 else self.alpha) * x

    def affine(self, y):
        """gamma * y + beta (y itself once fold_norms has moved them into the next linears)."""
        y = self.per_channel(self.weight, y) * y if self.weight is not None else y
        return y + self.per_channel(self.bias, y) if self.bias is not None else y

    def on_kernel(self, x):
        """Whether kernel.py computes this call: a CUDA tensor it handles, tokens [..., C]."""
        return (self.use_kernel and self.channels_last and x.is_cuda and self.weight is not None
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16))

    def extra_repr(self):
        alpha = "none" if self.alpha is None else ("channel" if self.alpha.numel() > 1 else "scalar")
        return (f"{self.dim}, alpha={alpha}, alpha0={self.alpha0}, gamma0={self.gamma0}, "
                f"channels_last={self.channels_last}, bias={self.bias is not None}")


class DyT(Dynamic):
    """Dynamic Tanh: gamma * tanh(alpha * x) + beta."""

    def forward(self, x):
        # DyT is the last line. On CUDA kernel.dyt computes that formula fused; an edit of the
        # line reaches CUDA runs with use_kernel(model, False) (the trainers' --kernel false).
        if self.on_kernel(x):
            import kernel  # the same function, fused (Triton: imported only where it runs)
            return kernel.dyt(x, self.alpha, self.weight, self.bias)
        return self.affine(torch.tanh(self.alpha * x))


class Derf(Dynamic):
    """gamma * erf(alpha * x + s) + beta: erf in place of tanh, and a learnable scalar shift s
    (init 0) inside it, so the S-curve can move off-centre. The paper reports Derf ahead of
    LayerNorm and DyT on ViT-B (82.8 vs 82.3 / 82.5) and level with LayerNorm on GPT-2 124M
    (2.94; DyT 2.97): its numbers, not this project's."""

    def __init__(self, dim, alpha0=0.5, channels_last=True, bias=True, gamma0=1.0):
        super().__init__(dim, alpha0, channels_last, bias, gamma0, shift=True)

    def forward(self, x):
        # As DyT's: kernel.derf is this formula fused, on CUDA unless use_kernel(model, False).
        if self.on_kernel(x):
            import kernel
            return kernel.derf(x, self.alpha, self.shift, self.weight, self.bias)
        return self.affine(torch.erf(self.alpha * x + self.shift))


# ---------------------------------------------------------------------------------------------
# The ablations: gamma * f(alpha x) + beta for another squashing function f, or DyT without its
# alpha or with one alpha per channel. One line each, (f, alpha, what it computes): make_norm,
# --norm, analyze.py and the tests all read this table.

def _gelu_clip(x):
    # DyGC: GELU clipped from above at 1 (GELU is already bounded below, by about -0.17).
    return F.gelu(x).clamp(max=1.0)


def _rational(x):
    # DyPR: the [3/2] Pade approximant of tanh, x(15 + x^2) / (15 + 6x^2), clipped to [-1, 1]
    # (the rational function alone grows like x/6 for large |x|; it first reaches 1 near 2.9).
    x2 = x * x
    return (x * (15 + x2) / (15 + 6 * x2)).clamp(-1.0, 1.0)


ABLATIONS = {
    "hardtanh": (F.hardtanh, "scalar", "gamma * hardtanh(alpha x) + beta: clip to [-1, 1]"),
    "sigmoid": (torch.sigmoid, "scalar", "DyS: gamma * sigmoid(alpha x) + beta, range (0, 1), not zero-centred"),
    "softsign": (F.softsign, "scalar", "DySs: gamma * softsign(alpha x) + beta, softsign(z) = z / (1 + |z|)"),
    "arctan": (torch.atan, "scalar", "DyA: gamma * arctan(alpha x) + beta, range (-pi/2, pi/2)"),
    "clamp": (lambda x: x.clamp(-1.0, 1.0), "scalar",
              "DyCL: gamma * clamp(alpha x, -1, 1) + beta (hardtanh, under the ViT study's name)"),
    "gelu_clip": (_gelu_clip, "scalar", "DyGC: gamma * min(gelu(alpha x), 1) + beta"),
    "rational": (_rational, "scalar", "DyPR: gamma * pade_tanh(alpha x) + beta"),
    "dyt_identity": (lambda x: x, "scalar", "gamma * alpha x + beta: no squashing (diverges at scale)"),
    "dyt_noalpha": (torch.tanh, "none", "gamma * tanh(x) + beta (DyT paper Table 9)"),
    "dyt_channel": (torch.tanh, "channel", "gamma * tanh(alpha_c x) + beta, one alpha per channel (ViT study sec. 5)"),
}


class DynamicSquash(Dynamic):
    """An ablation of DyT: gamma * f(alpha * x) + beta with f, alpha ("scalar": the papers';
    "channel": one per channel; "none": f(x)) from ABLATIONS[name]."""

    def __init__(self, dim, name, alpha0=0.5, channels_last=True, bias=True, gamma0=1.0):
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; choose one of {', '.join(ABLATIONS)}")
        fn, alpha, _ = ABLATIONS[name]
        super().__init__(dim, alpha0, channels_last, bias, gamma0, alpha)
        self.name, self.fn = name, fn

    def forward(self, x):
        return self.affine(self.fn(self.scale(x)))

    def extra_repr(self):
        return f"{self.name}, " + super().extra_repr()


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
    # DyT, Derf, and the ablations (all of them is_dynamic)
    "dyt": "gamma * tanh(alpha x) + beta",
    "derf": "Derf: gamma * erf(alpha x + s) + beta, s a learnable scalar shift",
    **{name: what for name, (_, _, what) in ABLATIONS.items()},
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
    if name in ABLATIONS:
        return DynamicSquash(dim, name, alpha0, channels_last, bias, gamma0)
    raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(NORMS)}")


def use_kernel(model, on=True):
    """Every DyT/Derf layer of model on kernel.py's fused kernel where it runs (CUDA), or, with
    on=False, on its forward's formula everywhere. Returns the model."""
    for m in model.modules():
        if isinstance(m, Dynamic):
            m.use_kernel = on
    return model


def is_dynamic(layer):
    """True for DyT, Derf and the ablations, given a layer or a --norm name: the layers with
    an alpha, a gamma and a beta and no statistics (not LayerNorm, RMSNorm or Identity)."""
    if isinstance(layer, str):
        return layer in NORMS and layer not in ("ln", "rms", "identity")
    return isinstance(layer, Dynamic)


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


# ---------------------------------------------------------------------------------------------
# Folding for inference. A layer whose output feeds only linear layers can hand them its affine:
# W (gamma * f(x) + beta) + b = (W diag(gamma)) f(x) + (W beta + b), exactly (FlashNorm,
# arXiv 2407.09577, for RMSNorm). The layer is left computing f(x) alone: tanh(alpha x),
# erf(alpha x + s), or the normalisation. alpha stays where it is: tanh(alpha x) is not linear
# in alpha, so no fold of it is exact.

# Where a norm's output goes in layouts known by name: (the norm's name, the linears that read
# it, named from the norm's parent). A model can say it itself with a norm_consumers() method
# ({norm name: [linear names]}), as model.GPT and model.ViT do.
CONSUMERS_BY_NAME = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),  # Hugging Face
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),                     # LLaMA
    ("norm1", ["attn.qkv"]), ("norm2", ["mlp.fc1"]),                                    # timm's ViT
]
FINAL_BY_NAME = {"model.norm": ["lm_head"], "norm": ["head"]}  # the final norm, before the head


def norm_consumers(model):
    """{norm layer name: [names of the linear layers that read its output, and nothing else]}."""
    if hasattr(model, "norm_consumers"):
        return model.norm_consumers()
    modules = dict(model.named_modules())
    out = {}
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        linears = FINAL_BY_NAME.get(name) or [prefix + l for rule, lins in CONSUMERS_BY_NAME if rule == leaf
                                              for l in lins]
        if linears and all(isinstance(modules.get(f), nn.Linear) for f in linears):
            out[name] = linears
    return out


@torch.no_grad()
def fold_norms(model):
    """Move the affine (gamma, beta) of every DyT-like layer and LayerNorm/RMSNorm whose output
    feeds only linear layers into those linears, in place (for inference: the model is not
    meant to train on afterwards). Returns (folded, left): the layer names folded, and those
    left as they were (no known consumers, e.g. a norm that feeds a residual directly)."""
    modules = dict(model.named_modules())
    consumers = norm_consumers(model)
    folded, left = [], []
    for name, layer in modules.items():
        if not (isinstance(layer, Dynamic) or _norm_kind(layer)) or getattr(layer, "weight", None) is None:
            continue
        if name not in consumers:
            left.append(name)
            continue
        gamma, beta = layer.weight, getattr(layer, "bias", None)
        for lin in (modules[n] for n in consumers[name]):
            shift = lin.weight @ beta.to(lin.weight.dtype) if beta is not None else None
            lin.weight.mul_(gamma.to(lin.weight.dtype))
            if shift is not None and lin.bias is None:
                lin.bias = nn.Parameter(shift)
            elif shift is not None:
                lin.bias.add_(shift)
        layer.weight = None
        if beta is not None:
            layer.bias = None
        folded.append(name)
    return folded, left
