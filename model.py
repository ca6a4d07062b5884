"""
The two models of the DyT papers, with any norm from dyt.py in place of LayerNorm/RMSNorm.

  ViT  - the Vision Transformer in timm's shapes (pre-norm blocks, conv patch embedding,
         class token or average pooling, learnable position embedding, qkv bias, stochastic
         depth). Parameter counts equal timm's for the same settings.
  GPT  - a LLaMA-style language model: untied token embedding and output head, rotary
         position embedding, grouped-query attention via F.scaled_dot_product_attention,
         SwiGLU MLP, pre-norm. With DyT (the paper's LLM recipe): a learnable scalar that
         multiplies the token embedding, init sqrt(dim), and separate alpha0 for the DyT
         before attention and for the others, by model width (alpha0_for_width).

`python model.py --preset llama70b` builds a preset on the meta device (nothing allocated)
and prints its shape and parameter count.
"""

import math
from dataclasses import asdict, dataclass, field

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from dyt import NORMS, is_dynamic, make_norm

# ---------------------------------------------------------------------------------------------
# Shared pieces


def check_norm(name):
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(NORMS)}")


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale the rest by
    1/(1-p) so the expected output is unchanged."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def param_groups(model, weight_decay):
    """AdamW parameter groups: decay on matrices (linear, conv, embedding tables), none on
    anything with fewer than 2 dims: norm and DyT alpha/gamma/beta, biases, the embedding
    scale. The ViT's position embedding and class token are excluded too (model.no_decay)."""
    skip = getattr(model, "no_decay", set())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def dyt_layers(model):
    """(name, module) of every DyT-like layer in the model: the trainers log their alpha."""
    return [(n, m) for n, m in model.named_modules() if is_dynamic(m)]


# ---------------------------------------------------------------------------------------------
# ViT


@dataclass
class ViTConfig:
    """The ViT's shape and init. The trainer's flags are these fields (train_vit.py --dim ...),
    except the two the data sets (in_chans, num_classes)."""
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = field(default=3, metadata={"flag": None})       # from the data
    num_classes: int = field(default=1000, metadata={"flag": None})
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool: str = field(default="cls", metadata={"choices": ["cls", "avg"],
                                               "help": "cls: class token; avg: mean of the patch tokens"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the last block "
                                                    "(linear in depth)"})
    norm: str = field(default="ln", metadata={"choices": list(NORMS)})
    alpha0: float = field(default=0.5, metadata={"help": "DyT's alpha init (the papers': 0.5 for ViTs)"})
    gamma0: float = field(default=1.0, metadata={"flag": "dyt_gamma0",
                                                 "help": "DyT/Derf gamma init (the papers': 1)"})
    norm_eps: float = 1e-6


VIT_PRESETS = {  # timm's shapes: dim, depth, heads
    "vit_tiny": dict(dim=192, depth=12, heads=3),
    "vit_small": dict(dim=384, depth=12, heads=6),
    "vit_base": dict(dim=768, depth=12, heads=12),
    "vit_large": dict(dim=1024, depth=24, heads=16),
    "vit_huge": dict(dim=1280, depth=32, heads=16),
}


class ViTAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ViTBlock(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.alpha0, eps=cfg.norm_eps, gamma0=cfg.gamma0)
        self.attn = ViTAttention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.alpha0, eps=cfg.norm_eps, gamma0=cfg.gamma0)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        check_norm(cfg.norm)
        if cfg.pool not in ("cls", "avg"):
            raise ValueError(f"unknown pool {cfg.pool!r}; choose cls or avg")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not a multiple of heads {cfg.heads}")
        self.cfg = cfg
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        n_tokens = n_patches + (cfg.pool == "cls")
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([ViTBlock(cfg, r) for r in rates])
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.alpha0, eps=cfg.norm_eps, gamma0=cfg.gamma0)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.no_decay = {"pos_embed", "cls_token"}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # timm's scheme: truncated normal(0.02) for linears, position embedding and class
        # token (class token 1e-6 in timm; 0.02 here as in the original ViT code), zero biases;
        # the patch embedding as a linear layer (lecun-normal-like via its default init).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "reset_parameters") and not isinstance(m, (nn.Linear, ViT)):
                m.reset_parameters()  # conv patch embedding, norms, DyT

    def norm_consumers(self):
        """{norm: the linears that read it} (dyt.fold_norms): the pooling before the head is
        linear (a token or a mean), so the final norm folds into the head too."""
        out = {f"blocks.{i}.norm1": [f"blocks.{i}.attn.qkv"] for i in range(len(self.blocks))}
        out.update({f"blocks.{i}.norm2": [f"blocks.{i}.mlp.0"] for i in range(len(self.blocks))})
        return {**out, **({"norm": ["head"]} if isinstance(self.head, nn.Linear) else {})}

    def features(self, x):
        """The final-norm output of every token, [B, T, dim]."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        x = self.features(x)
        return self.head(x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1))


def vit_config(preset, **overrides):
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; choose one of {', '.join(VIT_PRESETS)}")
    return ViTConfig(**{**VIT_PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------
# GPT (LLaMA style)

# The DyT paper's alpha0 for LLaMA models by width (Tables 11-12): (attention, other), where
# "other" is the DyT before the MLP and the final one.
ALPHA0_BY_WIDTH = {1024: (1.0, 1.0), 2048: (1.0, 0.5), 4096: (0.8, 0.2), 8192: (0.2, 0.05)}


def alpha0_for_width(dim):
    """(alpha0_attn, alpha0_other) for a model of width `dim`.

    Between the table's widths, alpha0 is interpolated linearly in log2(width): the widths
    double from row to row and the values change about as much per doubling. This reproduces
    the paper's own 13B values (width 5120 -> 0.61/0.15; the paper used 0.6/0.15). Below 1024
    and above 8192 the nearest row is used.
    """
    widths = sorted(ALPHA0_BY_WIDTH)
    if dim <= widths[0]:
        return ALPHA0_BY_WIDTH[widths[0]]
    if dim >= widths[-1]:
        return ALPHA0_BY_WIDTH[widths[-1]]
    lo = max(w for w in widths if w <= dim)
    hi = min(w for w in widths if w > dim)
    t = math.log2(dim / lo) / math.log2(hi / lo)
    (a_lo, o_lo), (a_hi, o_hi) = ALPHA0_BY_WIDTH[lo], ALPHA0_BY_WIDTH[hi]
    return a_lo + t * (a_hi - a_lo), o_lo + t * (o_hi - o_lo)


# The output RMS at init of every DyT-like layer in a GPT narrower than the papers' models:
# this project's rule, not the papers' (both initialise gamma to 1). See dyt_out_rms_at_gamma1.
DYT_OUT_RMS0 = 2.5


def dyt_out_rms_at_gamma1(norm, alpha0, input_rms):
    """RMS of a DyT-like layer's output with gamma 1 and beta 0 (its squash f alone) for
    inputs ~ N(0, input_rms^2): sqrt(E[f(alpha0 x)^2]), by 64-point Gauss-Hermite quadrature.

    Why a GPT's DyT gamma is set from this (this project's finding; the measurements are in
    docs/small_gpt.md). DyT(x) = gamma tanh(alpha x) is not scale-invariant: at init its output RMS is gamma * rms(tanh(alpha0 x0)), with x0 the scaled embedding (RMS
    init_std * sqrt(dim): 0.23 at width 128). With the papers' gamma 1 that is ~0.2, five times
    below RMSNorm's 1, and the ceiling +-1 is lower than the outputs the loss asks for; a
    short run reaches them the cheapest way, by growing one token-independent residual vector
    until every tanh saturates (the unigram loss; tanh' ~ 0 blocks the gradient). Too large an
    output at init fails too: the attention and SwiGLU inputs are too big and the first
    steps blow the residual up (width 384 with gamma sqrt(dim): init output RMS 6.8, stuck).
    So gamma0 is chosen to give every DyT-like layer the same output RMS at init,
    DYT_OUT_RMS0 = 2.5, at any width and alpha0: gamma0 = 2.5 / dyt_out_rms_at_gamma1(...).
    Why 2.5: the pilots in results/analysis/pilots_gpt_init.md (2-3 alike, 1 clearly worse);
    RMSNorm too gains from a gain init of 2.5 here (the control in docs/small_gpt.md).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)  # for the weight exp(-x^2 / 2)
    weights = weights / weights.sum()
    with torch.device("cpu"):  # a tiny probe layer, also when the model is built on meta
        layer = make_norm(norm, 1, alpha0, bias=False, gamma0=1.0)
        with torch.no_grad():
            y = layer(torch.tensor(nodes * input_rms, dtype=torch.float64).unsqueeze(-1))
    return float(np.sqrt(weights @ y.squeeze(-1).numpy() ** 2))


@dataclass
class GPTConfig:
    """The GPT's shape and init. The trainer's flags are these fields (train_gpt.py --dim ...);
    0 means "automatic" wherever a field has a rule."""
    vocab_size: int = field(default=256, metadata={"help": "0: from the data"})
    block_size: int = field(default=256, metadata={"flag": "seq_len", "help": "context length"})
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = field(default=4, metadata={"help": "< n_head: grouped-query attention"})
    dim: int = 128
    ffn_dim: int = field(default=0, metadata={"help": "SwiGLU hidden size; 0: LLaMA's 8/3*dim rule"})
    rope_theta: float = 10000.0
    norm: str = field(default="rms", metadata={"help": "rms, ln, dyt, derf, or any of dyt.NORMS"})
    alpha0_attn: float = field(default=0.0, metadata={"help": "DyT alpha0 before attention; 0: by width"})
    alpha0_other: float = field(default=0.0, metadata={"help": "before the MLP; 0: by width"})
    alpha0_final: float = field(default=0.0, metadata={"help": "the final DyT's; 0: alpha0_other's"})
    dyt_gamma0: float = field(default=0.0, metadata={"help": "DyT/Derf gamma init, every layer; "
                                                     "0: from norm_out_rms"})
    norm_out_rms: float = field(default=0.0, metadata={"help": "each norm layer's output RMS at "
        "init (DyT-like: gamma set for it; RMSNorm/LN: their weight); 0: 2.5 for DyT-like layers "
        "below width 1024, gamma 1 (the papers') from 1024 up, 1 for RMSNorm/LN"})
    dyt_bias: bool = field(default=False, metadata={"help": "DyT's beta (the official LLaMA DyT has none)"})
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def ffn_hidden(self):
        # LLaMA: 2/3 of 4*dim (SwiGLU has three matrices instead of two), rounded up to 256.
        if self.ffn_dim:
            return self.ffn_dim
        return 256 * math.ceil(int(2 * 4 * self.dim / 3) / 256)

    def alpha0s(self):
        """(attention, other, final) alpha0."""
        table_attn, table_other = alpha0_for_width(self.dim)
        other = self.alpha0_other or table_other
        return self.alpha0_attn or table_attn, other, self.alpha0_final or other

    def gamma0(self, alpha0):
        """gamma init of a DyT-like layer whose alpha starts at alpha0 (1 for the norms)."""
        if not is_dynamic(self.norm):
            return 1.0
        if self.dyt_gamma0:
            return self.dyt_gamma0
        out_rms = self.norm_out_rms or (DYT_OUT_RMS0 if self.dim < 1024 else 0.0)
        if not out_rms:
            return 1.0
        # the input at init: the embedding (std init_std) times its scale sqrt(dim)
        return out_rms / dyt_out_rms_at_gamma1(self.norm, alpha0, self.init_std * math.sqrt(self.dim))

    def gamma0s(self):
        """(attention, other, final) gamma init of DyT-like layers."""
        return tuple(self.gamma0(a) for a in self.alpha0s())


GPT_PRESETS = {
    # small ones that train on a CPU in minutes
    "nano": dict(dim=128, n_layer=4, n_head=4, n_kv_head=4, block_size=256),
    "micro": dict(dim=256, n_layer=6, n_head=8, n_kv_head=4, block_size=256),
    # GPT-2-small shape (768 wide, 12 layers, 12 heads) with LLaMA blocks; 124M parameters
    # with GPT-2's vocabulary would need tied embeddings: untied it is 162M (50,304 vocab).
    "gpt2_small": dict(dim=768, n_layer=12, n_head=12, n_kv_head=12, ffn_dim=2048,
                       block_size=1024, vocab_size=50304, dyt_gamma0=1.0),  # the Derf paper's
    # the DyT paper's LLaMA runs (LLaMA-2 shapes) with its alpha0 (attention / other: 7B and
    # 34B/70B are the width table, 13B its rounded log-linear interpolation) and gamma 1
    "llama7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=32, ffn_dim=11008,
                    vocab_size=32000, block_size=4096, alpha0_attn=0.8, alpha0_other=0.2, dyt_gamma0=1.0),
    "llama13b": dict(dim=5120, n_layer=40, n_head=40, n_kv_head=40, ffn_dim=13824,
                     vocab_size=32000, block_size=4096, alpha0_attn=0.6, alpha0_other=0.15, dyt_gamma0=1.0),
    "llama34b": dict(dim=8192, n_layer=48, n_head=64, n_kv_head=8, ffn_dim=22016,
                     vocab_size=32000, block_size=4096, alpha0_attn=0.2, alpha0_other=0.05, dyt_gamma0=1.0),
    "llama70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, ffn_dim=28672,
                     vocab_size=32000, block_size=4096, alpha0_attn=0.2, alpha0_other=0.05, dyt_gamma0=1.0),
}


def gpt_config(preset, **overrides):
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose one of {', '.join(GPT_PRESETS)}")
    return GPTConfig(**{**GPT_PRESETS[preset], **overrides})


def rope_rotation(head_dim, length, theta, device=None):
    """The rotary angles t * theta^(-2i/head_dim) as unit complex numbers cos + i sin,
    [length, head_dim/2], complex64.

    Complex rather than two real tables so that FSDP2's mixed precision leaves them alone: it
    casts every floating-point input of a block to the parameter dtype, and bf16 tables would
    both lose the angles' precision and fail in torch.complex; complex tensors are not cast."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return torch.complex(angles.cos(), angles.sin())


def apply_rope(x, rotation):
    """Rotate each (even, odd) pair of channels of x [B, T, H, D] by the angle of its position
    (rotation: [T, D/2] from rope_rotation): the dot product of a rotated query and key then
    depends only on their distance.

    Meta's interleaved layout (channels 2i, 2i+1 are a pair), computed as LLaMA's reference
    code does: each pair is a complex number times cos + i sin, one elementwise pass forward
    and one backward. x is rotated in the [B, T, H, D] layout the projection writes, before
    the heads are transposed, so the complex view needs no copy of x."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation.unsqueeze(-2)).flatten(-2).type_as(x)  # every head alike


class GPTAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wq = nn.Linear(cfg.dim, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, rope, cache=None):
        """cache (sampling): a dict holding the keys and values of the tokens before x, which
        this call extends; x is then the whole prompt (an empty cache) or one new token."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # causal over the prompt; one new token sees every cached one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GPTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        alpha_attn, alpha_other, _ = cfg.alpha0s()
        norm = lambda a0: make_norm(cfg.norm, cfg.dim, a0, bias=cfg.dyt_bias, eps=cfg.norm_eps,
                                    gamma0=cfg.gamma0(a0))
        self.attn_norm = norm(alpha_attn)
        self.attn = GPTAttention(cfg)
        self.mlp_norm = norm(alpha_other)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden())

    def forward(self, x, rope, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        check_norm(cfg.norm)
        if cfg.dim % cfg.n_head or cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"dim {cfg.dim}, n_head {cfg.n_head}, n_kv_head {cfg.n_kv_head}: "
                             "need dim % n_head == 0 and n_head % n_kv_head == 0")
        if (cfg.dim // cfg.n_head) % 2:
            raise ValueError("the head dimension dim/n_head must be even for rotary embeddings")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        # The DyT LLM recipe: without a norm to rescale it, the embedding is multiplied by a
        # learnable scalar initialised to sqrt(dim). Norms don't need it.
        self.emb_scale = nn.Parameter(torch.empty(1)) if is_dynamic(cfg.norm) else None
        self.blocks = nn.ModuleList([GPTBlock(cfg) for _ in range(cfg.n_layer)])
        alpha_final = cfg.alpha0s()[2]
        self.norm = make_norm(cfg.norm, cfg.dim, alpha_final, bias=cfg.dyt_bias, eps=cfg.norm_eps,
                              gamma0=cfg.gamma0(alpha_final))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # The rotary table: a buffer, so it follows .to(device); not saved in checkpoints.
        self.register_buffer("rope", torch.empty(0, dtype=torch.complex64), persistent=False)
        if self.head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter and buffer in place, on whatever device they are.

        Separate from __init__ so that a model built on the meta device can be materialised
        (to_empty) and initialised shard by shard under FSDP. The scheme (GPT-2 / LLaMA):
        normal(0, init_std) for the embedding and every linear layer, with the two matrices
        that write into the residual stream (attention wo, MLP w2) scaled by 1/sqrt(2*n_layer)
        so that the residual's variance does not grow with depth; norms and DyT at their own
        init (beta 0, alpha alpha0, gamma cfg.gamma0(alpha0); a norm's weight 1 or
        cfg.norm_out_rms); the embedding scale at sqrt(dim).
        """
        cfg = self.cfg
        std = cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        if self.emb_scale is not None:
            nn.init.constant_(self.emb_scale, math.sqrt(cfg.dim))
        for block in self.blocks:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.mlp.w1, block.mlp.w3):
                nn.init.normal_(lin.weight, std=std)
            for lin in (block.attn.wo, block.mlp.w2):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * cfg.n_layer))
        for m in self.modules():
            if m is not self and not isinstance(m, (nn.Linear, nn.Embedding)) and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, (nn.RMSNorm, nn.LayerNorm)) and cfg.norm_out_rms:
                nn.init.constant_(m.weight, cfg.norm_out_rms)  # a norm's output RMS is its gain
        self.rope = rope_rotation(cfg.dim // cfg.n_head, cfg.block_size, cfg.rope_theta,
                                  device=self.head.weight.device)

    def forward(self, idx, targets=None, reduction="mean", caches=None, pos=0):
        """Logits [B, T, vocab]; with targets also the cross-entropy (targets -1 are ignored;
        reduction 'sum' lets a trainer normalise by a global token count). caches (sampling):
        one dict per block for its keys and values, idx then starting at position pos."""
        B, T = idx.shape
        if pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        rope = self.rope[pos:pos + T]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches is not None else None)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, loss

    def norm_consumers(self):
        """{norm: the linears that read it} (dyt.fold_norms)."""
        out = {"norm": ["head"]}
        for i in range(len(self.blocks)):
            out[f"blocks.{i}.attn_norm"] = [f"blocks.{i}.attn.{w}" for w in ("wq", "wk", "wv")]
            out[f"blocks.{i}.mlp_norm"] = [f"blocks.{i}.mlp.{w}" for w in ("w1", "w3")]
        return out

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cache=True):
        """Append max_new_tokens sampled tokens to idx [B, T]. temperature 0 is greedy.

        With cache, the prompt runs once and each new token alone against the cached keys and
        values: one token's work per step instead of the whole prefix's. Past block_size the
        window slides, and the rotary positions of cached keys would no longer be the window's:
        from there each step runs the last block_size tokens whole, as without the cache."""
        caches = None
        for _ in range(max_new_tokens):
            if not cache or idx.size(1) > self.cfg.block_size:
                logits, _ = self(idx[:, -self.cfg.block_size:])
            elif caches is None:  # the prompt
                caches = [{} for _ in self.blocks]
                logits, _ = self(idx, caches=caches)
            else:
                logits, _ = self(idx[:, -1:], caches=caches, pos=idx.size(1) - 1)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_tok = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_tok = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_tok], dim=1)
        return idx

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6 per parameter of the matrices a
        token passes through, plus attention's 12 * layers * dim * seq_len (PaLM, appendix B).
        The embedding lookup is not a matmul and is left out."""
        T = seq_len or self.cfg.block_size
        n = sum(p.numel() for p in self.parameters()) - self.tok_emb.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.dim * T


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build a preset on the meta device and print "
                                     "its shape and parameter count.")
    parser.add_argument("--preset", default="llama7b",
                        help=f"one of {', '.join(list(GPT_PRESETS) + list(VIT_PRESETS))}")
    parser.add_argument("--norm", default=None, help=f"one of {', '.join(NORMS)}")
    args = parser.parse_args()
    try:
        overrides = {"norm": args.norm} if args.norm else {}
        if args.preset in VIT_PRESETS:
            cfg, build = vit_config(args.preset, **overrides), ViT
        elif args.preset in GPT_PRESETS:
            cfg, build = gpt_config(args.preset, **overrides), GPT
        else:
            raise ValueError(f"unknown preset {args.preset!r}; choose one of "
                             f"{', '.join(list(GPT_PRESETS) + list(VIT_PRESETS))}")
        check_norm(cfg.norm)
    except ValueError as e:
        parser.error(str(e))
    with torch.device("meta"):
        model = build(cfg)
    shown = asdict(cfg)
    uses_alpha = is_dynamic(cfg.norm)
    if not uses_alpha:  # alpha0 means nothing to a norm: do not print DyT values beside 'rms'
        shown = {k: v for k, v in shown.items() if not k.startswith(("alpha0", "dyt_gamma0"))}
    print(f"{args.preset}: {shown}")
    if isinstance(model, GPT):
        gammas = ", ".join(f"{g:.3g}" for g in cfg.gamma0s())
        alpha = (f"alpha0 (attention, other, final): {cfg.alpha0s()}; gamma0 ({gammas}); "
                 if uses_alpha else "")
        print(f"{alpha}SwiGLU hidden: {cfg.ffn_hidden()}")
    print(f"parameters: {num_params(model):,}")
