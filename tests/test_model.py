"""model.py: parameter counts, causality, RoPE, GQA, DyT wiring, meta-device presets."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyt import Derf, DyT
from model import (GPT, GPTConfig, ViT, alpha0_for_width, apply_rope, dyt_layers,
                   DYT_OUT_RMS0, dyt_out_rms_at_gamma1, gpt_config, num_params, param_groups, rope_rotation, vit_config)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset,expected", [
    ("vit_tiny", 5_717_416), ("vit_small", 22_050_664), ("vit_base", 86_567_656),
    ("vit_large", 304_326_632)])
def test_vit_parameter_counts_equal_timm(preset, expected):
    with torch.device("meta"):
        model = ViT(vit_config(preset))
    assert num_params(model) == expected


def test_vit_dyt_adds_one_alpha_per_norm_and_runs():
    cfg = dict(img_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=3)
    ln, dyt = ViT(vit_config("vit_tiny", **cfg)), ViT(vit_config("vit_tiny", **cfg, norm="dyt"))
    assert num_params(dyt) - num_params(ln) == 2 * 2 + 1
    assert len(dyt_layers(dyt)) == 5 and all(m.alpha.item() == 0.5 for _, m in dyt_layers(dyt))
    for pool in ("cls", "avg"):
        model = ViT(vit_config("vit_tiny", **cfg, norm="dyt", pool=pool, drop_path=0.1))
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("preset,expected", [("llama7b", 6_738_415_616), ("llama13b", 13_015_864_320),
                                             ("llama70b", 68_976_648_192)])
def test_llama_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = GPT(gpt_config(preset, norm="rms"))
    assert num_params(model) == expected


def test_meta_build_of_70b_allocates_nothing():
    out = subprocess.run([sys.executable, "model.py", "--preset", "llama70b", "--norm", "dyt"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "alpha0 (attention, other, final): (0.2, 0.05, 0.05); gamma0 (1, 1, 1);" in out.stdout
    # RMSNorm's 68,976,648,192 plus one alpha per DyT (2 per layer + final) and the emb scale
    assert f"parameters: {68_976_648_192 + 2 * 80 + 1 + 1:,}" in out.stdout
    with torch.device("meta"):
        model = GPT(gpt_config("llama70b", norm="dyt"))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_preset_is_one_line_error():
    out = subprocess.run([sys.executable, "model.py", "--preset", "llama8b"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown preset 'llama8b'; choose one of nano" in out.stderr
    with pytest.raises(ValueError, match="unknown GPT preset 'x'; choose one of nano"):
        gpt_config("x")


def test_alpha0_width_table_and_interpolation():
    assert alpha0_for_width(1024) == (1.0, 1.0)
    assert alpha0_for_width(2048) == (1.0, 0.5)
    assert alpha0_for_width(4096) == (0.8, 0.2)
    assert alpha0_for_width(8192) == (0.2, 0.05)
    assert alpha0_for_width(256) == (1.0, 1.0) and alpha0_for_width(16384) == (0.2, 0.05)
    attn, other = alpha0_for_width(5120)  # the paper's 13B used 0.6 / 0.15
    assert attn == pytest.approx(0.6, abs=0.01) and other == pytest.approx(0.15, abs=0.005)
    a, o = alpha0_for_width(2 ** 11.5)  # halfway in log2 between 2048 and 4096
    assert a == pytest.approx(0.9) and o == pytest.approx(0.35)


def small_gpt(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                              dim=32, norm="dyt"), **kw})
    return GPT(cfg).eval()


def test_gpt_dyt_wiring():
    model = small_gpt(dim=2048, n_head=16, n_kv_head=16, n_layer=1, vocab_size=10)
    assert model.emb_scale.item() == pytest.approx(math.sqrt(2048))
    assert isinstance(model.blocks[0].attn_norm, DyT) and model.blocks[0].attn_norm.bias is None
    assert model.blocks[0].attn_norm.alpha.item() == 1.0
    assert model.blocks[0].mlp_norm.alpha.item() == 0.5 and model.norm.alpha.item() == 0.5
    explicit = small_gpt(alpha0_attn=0.3, alpha0_other=0.1)
    assert explicit.blocks[1].attn_norm.alpha.item() == pytest.approx(0.3)
    assert explicit.norm.alpha.item() == pytest.approx(0.1)
    assert small_gpt(norm="rms").emb_scale is None
    # gamma0: below width 1024 set so that each DyT-like layer's output RMS at init is 2.5 (this
    # project's small-width rule), the papers' 1 from 1024 up; alpha0_final defaults to
    # alpha0_other
    assert torch.equal(model.norm.weight, torch.ones(2048))
    small = small_gpt(norm="derf", alpha0_other=0.3)
    x0 = small.tok_emb.weight * small.emb_scale  # what the layers see at init
    for layer in (small.blocks[0].attn_norm, small.blocks[1].mlp_norm, small.norm):
        assert isinstance(layer, Derf)
        assert layer(x0).pow(2).mean().sqrt().item() == pytest.approx(DYT_OUT_RMS0, rel=0.15)
        assert torch.equal(layer.weight, torch.full((32,), layer.weight[0].item()))
    # the gain follows alpha0: alpha 0.3 before the MLP needs a larger gamma than 1.0 before attention
    assert small.blocks[0].mlp_norm.weight[0] > 2.5 * small.blocks[0].attn_norm.weight[0]
    assert small.norm.alpha.item() == pytest.approx(0.3)
    final = small_gpt(alpha0_other=0.3, alpha0_final=0.05, dyt_gamma0=2.0)
    assert final.norm.alpha.item() == pytest.approx(0.05)
    assert final.blocks[0].mlp_norm.alpha.item() == pytest.approx(0.3)
    assert torch.equal(final.blocks[0].attn_norm.weight, torch.full((32,), 2.0))
    assert torch.equal(final.norm.weight, torch.full((32,), 2.0))
    assert [GPTConfig(dim=d, norm="dyt").gamma0s() for d in (1024, 8192)] == [(1.0,) * 3] * 2
    # --norm_out_rms: a DyT's gamma for that output RMS, an RMSNorm's weight itself
    assert small_gpt(norm="rms", norm_out_rms=2.5).blocks[0].attn_norm.weight.eq(2.5).all()
    assert small_gpt(norm="rms").norm.weight.eq(1.0).all()
    assert GPTConfig(dim=4096, norm="dyt", norm_out_rms=1.0).gamma0(0.8) > 1.0


def test_dyt_out_rms_at_gamma1_is_the_gaussian_expectation():
    # quadrature against a float64 Monte-Carlo estimate, and the small-input limits:
    # tanh(a x) ~ a x, erf(a x) ~ 2/sqrt(pi) a x, so the RMS is a*s (times 2/sqrt(pi) for erf)
    z = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for norm, f in (("dyt", torch.tanh), ("derf", torch.erf)):
        for alpha0, s in ((1.0, 0.23), (0.5, 2.0), (3.0, 1.0)):
            mc = f(alpha0 * s * z).pow(2).mean().sqrt().item()
            assert dyt_out_rms_at_gamma1(norm, alpha0, s) == pytest.approx(mc, rel=2e-3)
    assert dyt_out_rms_at_gamma1("dyt", 1.0, 1e-4) == pytest.approx(1e-4, rel=1e-6)
    assert dyt_out_rms_at_gamma1("derf", 1.0, 1e-4) == pytest.approx(2 / math.sqrt(math.pi) * 1e-4, rel=1e-6)
    with torch.device("meta"):  # the model may be built on the meta device
        assert GPTConfig(dim=128, n_head=4, n_kv_head=4, norm="dyt").gamma0(1.0) > 1


def test_param_groups_exclude_norms_biases_and_scales():
    model = small_gpt()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "emb_scale" in no_decay_names and "norm.alpha" in no_decay_names
    assert "blocks.0.attn_norm.weight" in no_decay_names
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2 + 2 * 7
    vit = ViT(vit_config("vit_tiny", img_size=32, patch_size=8, dim=24, depth=1, heads=2))
    _, vit_no_decay = param_groups(vit, 0.05)
    vit_names = {id(p): n for n, p in vit.named_parameters()}
    assert {"pos_embed", "cls_token", "head.bias"} <= {vit_names[id(p)] for p in vit_no_decay["params"]}


@pytest.mark.parametrize("norm", ["rms", "dyt"])
def test_gpt_is_causal(norm):
    model = small_gpt(norm=norm)
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    t = 11
    changed[:, t] = (idx[:, t] + 1) % 50
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    rotation = rope_rotation(head_dim, 64, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m, n):  # rotate q to position m and k to position n
        qm = apply_rope(q.view(1, 1, 1, -1), rotation[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, -1), rotation[n:n + 1])
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    # a rotation keeps the norm
    rotated = apply_rope(q.view(1, 1, 1, -1), rotation[7:8])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = small_gpt(n_head=4, n_kv_head=2)
    full = small_gpt(n_head=4, n_kv_head=4)
    head_dim = 8
    with torch.no_grad():  # copy gqa's weights into full, repeating each kv head twice
        full.load_state_dict({k: v for k, v in gqa.state_dict().items() if ".wk." not in k and ".wv." not in k},
                             strict=False)
        for bg, bf in zip(gqa.blocks, full.blocks):
            for name in ("wk", "wv"):
                w = getattr(bg.attn, name).weight.view(2, head_dim, -1)
                getattr(bf.attn, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1))
    assert gqa.blocks[0].attn.wk.weight.shape == (16, 32)
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)


def test_gpt_loss_sum_reduction_and_ignore_index():
    model = small_gpt()
    idx = torch.randint(0, 50, (2, 10))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    _, mean = model(idx, targets)
    _, total = model(idx, targets, reduction="sum")
    torch.testing.assert_close(total / 18, mean)


def test_generate_greedy_and_top_k():
    model = small_gpt()
    idx = torch.randint(0, 50, (2, 5))
    out = model.generate(idx, 40, temperature=0)  # past block_size: the context is cropped
    assert out.shape == (2, 45) and torch.equal(out[:, :5], idx)
    torch.manual_seed(0)
    sampled = model.generate(idx, 10, temperature=1.0, top_k=1)
    torch.testing.assert_close(sampled, model.generate(idx, 10, temperature=0))


def test_meta_model_materialises_with_init_weights():
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_kv_head=1, dim=16, norm="dyt")
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.emb_scale.item() == pytest.approx(4.0)
    assert model.rope.shape == (16, 4) and model.rope.dtype == torch.complex64
    logits, loss = model(torch.randint(0, 40, (1, 16)), torch.randint(0, 40, (1, 16)))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(40)) < 1.0


def test_rope_rotates_interleaved_pairs():
    # the layout the checkpoints and the Hugging Face mapping below rely on: channels 2i and
    # 2i+1 are one pair, rotated by position * theta^(-2i/D)
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64).float()  # [B, T, H, D]
    rotation = rope_rotation(8, 10, 10000.0)
    got = apply_rope(x, rotation)
    angles = torch.outer(torch.arange(10.0), 10000.0 ** (-torch.arange(0, 8, 2) / 8))
    torch.testing.assert_close(rotation, torch.polar(torch.ones_like(angles), angles))
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = rotation.real[:, None], rotation.imag[:, None]  # every head at position t turns alike
    want = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert apply_rope(x.bfloat16(), rotation).dtype == torch.bfloat16
    # gradients flow through the complex view
    xg = x.clone().requires_grad_()
    apply_rope(xg, rotation).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, 2 * x, rtol=1e-5, atol=1e-5)  # a rotation keeps |x|^2


def hf_llama_from(model):
    """A transformers LlamaForCausalLM with `model`'s weights (RMSNorm GPT). Hugging Face's
    rotary pairs channel i with i + D/2 where this model pairs 2i with 2i+1, so wq and wk
    rows are permuted per head as in transformers' convert_llama_weights_to_hf.py."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.cfg
    head_dim = c.dim // c.n_head
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_hidden(),
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=False,
        attn_implementation="eager")).eval()

    def to_half_split(w, heads):  # rows (h, i, pair) -> (h, pair, i)
        return w.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
    state = {"model.embed_tokens.weight": model.tok_emb.weight, "lm_head.weight": model.head.weight,
             "model.norm.weight": model.norm.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": to_half_split(b.attn.wq.weight, c.n_head),
            p + "self_attn.k_proj.weight": to_half_split(b.attn.wk.weight, c.n_kv_head),
            p + "self_attn.v_proj.weight": b.attn.wv.weight, p + "self_attn.o_proj.weight": b.attn.wo.weight,
            p + "mlp.gate_proj.weight": b.mlp.w1.weight, p + "mlp.up_proj.weight": b.mlp.w3.weight,
            p + "mlp.down_proj.weight": b.mlp.w2.weight,
            p + "input_layernorm.weight": b.attn_norm.weight,
            p + "post_attention_layernorm.weight": b.mlp_norm.weight})
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def test_gpt_logits_equal_hf_llama():
    pytest.importorskip("transformers")
    model = small_gpt(norm="rms", n_head=4, n_kv_head=2, block_size=32)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = hf_llama_from(model)
    idx = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)
