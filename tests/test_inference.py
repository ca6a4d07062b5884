"""After training: folding the norms' affine into the next linears (exact to rounding, for
every norm kind, the GPT, the ViT and models converted by convert_to_dyt), and the KV cache
(the same tokens as the uncached sampler)."""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dyt import NORMS, convert_to_dyt, fold_norms, is_dynamic  # noqa: E402
from model import GPT, GPTConfig, ViT, ViTConfig  # noqa: E402


def randomise(model):
    """Move every 1-d parameter (gamma, beta, alpha, shift) off its init: a fold that forgot
    one would show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def rel(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("norm", list(NORMS))
def test_fold_is_exact_for_the_gpt(norm):
    torch.manual_seed(0)
    model = randomise(GPT(GPTConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, block_size=32,
                                    vocab_size=256, norm=norm))).eval()
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        before = model(idx)[0]
        folded, left = fold_norms(model)
        after = model(idx)[0]
    assert left == [] and len(folded) == (0 if norm == "identity" else 5)
    assert rel(before, after) < 2e-6, rel(before, after)  # fp32 rounding, not a change of function
    for name in folded:  # the layer computes its bare function now
        layer = model.get_submodule(name)
        assert layer.weight is None and getattr(layer, "bias", None) is None
    if is_dynamic(norm) and norm != "dyt_noalpha":
        assert all(model.get_submodule(n).alpha is not None for n in folded)  # alpha stays


@pytest.mark.parametrize("norm, pool", [("ln", "cls"), ("dyt", "avg"), ("derf", "cls"), ("rms", "avg")])
def test_fold_is_exact_for_the_vit(norm, pool):
    torch.manual_seed(0)
    model = randomise(ViT(ViTConfig(img_size=28, patch_size=7, dim=64, depth=2, heads=4, in_chans=1,
                                    num_classes=10, norm=norm, pool=pool))).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        folded, left = fold_norms(model)
        after = model(x)
    assert len(folded) == 5 and left == []
    assert rel(before, after) < 2e-6


class HFLikeLlama(nn.Module):
    """Hugging Face LLaMA's module names (input_layernorm -> self_attn.q/k/v_proj, ...), a
    post-norm block's norm that feeds the residual (no fold possible), and a final norm."""

    def __init__(self, d=32, vocab=50):
        super().__init__()
        layer = lambda: nn.ModuleDict({
            "input_layernorm": nn.RMSNorm(d), "post_attention_layernorm": nn.RMSNorm(d),
            "self_attn": nn.ModuleDict({n: nn.Linear(d, d, bias=False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}),
            "mlp": nn.ModuleDict({"gate_proj": nn.Linear(d, 2 * d, bias=False), "up_proj": nn.Linear(d, 2 * d, bias=False),
                                  "down_proj": nn.Linear(2 * d, d, bias=False)}),
            "post_norm": nn.LayerNorm(d)})
        self.model = nn.ModuleDict({"embed_tokens": nn.Embedding(vocab, d), "layers": nn.ModuleList([layer(), layer()]),
                                    "norm": nn.RMSNorm(d)})
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.model["embed_tokens"](idx)
        for l in self.model["layers"]:
            h = l["input_layernorm"](x)
            a = l["self_attn"]
            q, k, v = a["q_proj"](h), a["k_proj"](h), a["v_proj"](h)
            att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
            x = x + a["o_proj"](att)
            h = l["post_attention_layernorm"](x)
            m = l["mlp"]
            x = l["post_norm"](x + m["down_proj"](nn.functional.silu(m["gate_proj"](h)) * m["up_proj"](h)))
        return self.lm_head(self.model["norm"](x))


@pytest.mark.parametrize("name", ["dyt", "derf"])
def test_fold_is_exact_for_a_converted_model_and_leaves_what_cannot_fold(name):
    torch.manual_seed(0)
    model, count = convert_to_dyt(HFLikeLlama(), alpha0=0.7, name=name)
    assert count == 7
    randomise(model).eval()
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(idx)
        folded, left = fold_norms(model)
        after = model(idx)
    assert sorted(left) == ["model.layers.0.post_norm", "model.layers.1.post_norm"]  # feeds the residual
    assert len(folded) == 5 and "model.norm" in folded
    assert rel(before, after) < 2e-6
    assert model.get_submodule("model.layers.0.post_norm").weight is not None  # left alone


@pytest.mark.parametrize("norm, n_kv_head", [("dyt", 2), ("rms", 4)])
def test_kv_cache_samples_the_same_tokens(norm, n_kv_head):
    """Greedy and sampled, under a fixed seed, past block_size (where the window slides): the
    cached sampler gives the uncached one's ids."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(dim=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, block_size=48, vocab_size=256,
                          norm=norm)).eval()
    idx = torch.randint(0, 256, (2, 7))
    for temperature in (0, 0.9):
        runs = []
        for cache in (False, True):
            torch.manual_seed(1)
            runs.append(model.generate(idx, 60, temperature=temperature, top_k=50, cache=cache))
        assert runs[0].shape == (2, 67) and torch.equal(runs[0], runs[1]), temperature


def test_cache_prefill_and_steps_give_the_full_forwards_logits():
    torch.manual_seed(0)
    model = randomise(GPT(GPTConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, block_size=32, vocab_size=256))).eval()
    idx = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        full = model(idx)[0]
        caches = [{} for _ in model.blocks]
        steps = [model(idx[:, :12], caches=caches)[0]]
        steps += [model(idx[:, t:t + 1], caches=caches, pos=t)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
