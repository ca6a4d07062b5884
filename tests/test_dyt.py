"""dyt.py: every layer against a float64 reference, gradients, channels-first, the converter."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dyt import ABLATIONS, Derf, DyT, NORMS, convert_to_dyt, is_dynamic, make_norm


def squash_reference(name, z):
    """The squashing function of each DyT-like --norm, written independently of dyt.py, in
    float64. A new ablation in dyt.ABLATIONS needs its line here (and nothing else)."""
    return {
        "dyt": lambda: torch.tanh(z),
        "hardtanh": lambda: torch.where(z.abs() <= 1, z, z.sign()),
        "sigmoid": lambda: 1 / (1 + torch.exp(-z)),
        "softsign": lambda: z / (1 + z.abs()),
        "arctan": lambda: torch.atan(z),
        "clamp": lambda: torch.minimum(torch.maximum(z, -torch.ones_like(z)), torch.ones_like(z)),
        "gelu_clip": lambda: torch.minimum(0.5 * z * (1 + torch.erf(z / math.sqrt(2))), torch.ones_like(z)),
        "rational": lambda: (z * (15 + z ** 2) / (15 + 6 * z ** 2)).clamp(-1, 1),
        "dyt_identity": lambda: z,
        "dyt_noalpha": lambda: torch.tanh(z),
        "dyt_channel": lambda: torch.tanh(z),
    }[name]()


def randomise(layer):
    """Move every parameter away from its init so that the test sees gamma, beta and alpha."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def test_dyt_matches_definition_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 17, dtype=torch.float64) * 3
    layer = randomise(DyT(17, alpha0=0.7).double())
    expected = layer.weight * torch.tanh(layer.alpha * x) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-14)


def test_dyt_init_and_parameters():
    layer = DyT(8, alpha0=0.3)
    assert layer.alpha.shape == (1,) and layer.alpha.item() == pytest.approx(0.3)
    assert torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    no_bias = DyT(8, bias=False)
    assert no_bias.bias is None and sum(p.numel() for p in no_bias.parameters()) == 9
    x = torch.randn(2, 8)
    torch.testing.assert_close(no_bias(x), torch.tanh(0.5 * x))


def test_derf_matches_definition_in_float64():
    # Derf (Chen, Lu, Zhu, Sun, Liu 2025): gamma * erf(alpha x + s) + beta, erf written out
    # independently of torch.erf as its Maclaurin series (exact to float64 for |z| < 3).
    torch.manual_seed(5)
    x = torch.randn(3, 5, 17, dtype=torch.float64) * 1.5
    layer = randomise(Derf(17, alpha0=0.7).double())
    z = layer.alpha * x + layer.shift
    assert z.abs().max() < 3
    erf = sum((-1) ** n * z ** (2 * n + 1) / float(math.factorial(n) * (2 * n + 1)) for n in range(60))
    expected = layer.weight * (2 / math.sqrt(math.pi)) * erf + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_derf_init_and_parameters():
    layer = make_norm("derf", 8, alpha0=0.4, bias=False)
    assert isinstance(layer, Derf)
    assert layer.alpha.item() == pytest.approx(0.4) and layer.shift.item() == 0.0
    assert torch.equal(layer.weight, torch.ones(8)) and layer.bias is None
    assert sorted(n for n, _ in layer.named_parameters()) == ["alpha", "shift", "weight"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), torch.erf(0.4 * x))


def test_derf_gradcheck_float64():
    # every gradient: x, alpha, the shift s, gamma, beta
    torch.manual_seed(6)
    layer = randomise(Derf(7).double())
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["alpha", "shift", "weight", "bias"]
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    params = tuple(p.detach().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(fn, (x,) + params)


@pytest.mark.parametrize("name", ["dyt", "derf", "hardtanh", "dyt_channel"])
def test_gamma0_sets_gamma_init(name):
    layer = make_norm(name, 6, alpha0=0.5, gamma0=3.0)
    assert torch.equal(layer.weight, torch.full((6,), 3.0))
    layer.weight.data.zero_()
    layer.reset_parameters()  # a meta-built model is initialised through reset_parameters
    assert torch.equal(layer.weight, torch.full((6,), 3.0))
    assert torch.equal(make_norm("rms", 6, gamma0=3.0).weight, torch.ones(6))  # norms keep 1
    with pytest.raises(ValueError, match="gamma0"):
        make_norm(name, 6, gamma0=0.0)


def test_every_ablation_is_a_norm_name():
    assert set(ABLATIONS) < set(NORMS) and all(is_dynamic(n) for n in ABLATIONS)


@pytest.mark.parametrize("name", [n for n in NORMS if n not in ("ln", "rms", "identity", "derf")])
def test_every_dynamic_variant_against_float64_reference(name):
    torch.manual_seed(1)
    dim = 11
    layer = randomise(make_norm(name, dim, alpha0=0.8).double())
    x = torch.randn(4, 6, dim, dtype=torch.float64) * 4
    if name == "dyt_noalpha":
        assert not any(n == "alpha" for n, _ in layer.named_parameters())
        z = x
    else:
        expected_alpha_shape = (dim,) if name == "dyt_channel" else (1,)
        assert layer.alpha.shape == expected_alpha_shape
        z = layer.alpha * x
    expected = layer.weight * squash_reference(name, z) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_norms_against_float64_reference():
    torch.manual_seed(2)
    x = torch.randn(3, 10, dtype=torch.float64) * 2 + 1
    ln = randomise(make_norm("ln", 10, eps=1e-6).double())
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mean) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias)
    rms = randomise(make_norm("rms", 10, eps=1e-6).double())
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight)
    assert torch.equal(make_norm("identity", 10)(x), x)


def test_dyt_gradcheck_float64():
    torch.manual_seed(3)
    for layer in (randomise(DyT(7).double()), randomise(make_norm("dyt_channel", 7).double()),
                  randomise(make_norm("derf", 7, channels_last=False).double())):
        shape = (3, 7) if layer.channels_last else (2, 7, 3, 2)  # [B, C, H, W]
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        params = tuple(layer.parameters())
        names = [n for n, _ in layer.named_parameters()]

        def fn(x, *ps):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(fn, (x,) + tuple(p.detach().requires_grad_() for p in params))


@pytest.mark.parametrize("name", ["dyt", "derf", "dyt_channel", "sigmoid", "ln", "rms"])
def test_channels_first_equals_channels_last(name):
    torch.manual_seed(4)
    last = randomise(make_norm(name, 6, alpha0=0.9))
    first = make_norm(name, 6, alpha0=0.9, channels_last=False)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 6, 5, 4)  # [B, C, H, W]
    expected = last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(first(x), expected)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'layernorm'; choose one of ln, rms, identity, dyt"):
        make_norm("layernorm", 4)


class LlamaRMSNorm(nn.Module):
    """Like Hugging Face's: its own class, a `weight` and no `normalized_shape`."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class LayerNorm2d(nn.LayerNorm):
    """Like timm's channels-first LayerNorm2d."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def test_convert_model_with_layernorm():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(),
                          nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    linear_before = model[0].weight.clone()
    model, count = convert_to_dyt(model, alpha0=0.25)
    assert count == 2
    assert isinstance(model[1], DyT) and isinstance(model[3][1], DyT)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert model[1].alpha.item() == pytest.approx(0.25)
    assert torch.equal(model[0].weight, linear_before)  # the rest of the model is untouched
    assert model(torch.randn(3, 4)).shape == (3, 2)
    x = torch.randn(3, 8)
    expected = model[1].weight * torch.tanh(0.25 * x) + model[1].bias
    torch.testing.assert_close(model[1](x), expected)
    assert model[1].weight.min() >= 0.5  # the LayerNorm's affine was carried over


def test_convert_model_with_rmsnorm_and_channels_first():
    model = nn.ModuleDict({"attn_norm": LlamaRMSNorm(6), "ffn_norm": nn.RMSNorm(6),
                           "stem_norm": LayerNorm2d(6)})
    model, count = convert_to_dyt(model, alpha0=lambda name: 0.8 if "attn" in name else 0.2)
    assert count == 3
    assert model["attn_norm"].alpha.item() == pytest.approx(0.8)
    assert model["ffn_norm"].alpha.item() == pytest.approx(0.2)
    assert model["attn_norm"].bias is None  # an RMSNorm has no beta, so neither does its DyT
    assert model["stem_norm"].channels_last is False
    x = torch.randn(2, 6, 3, 3)
    assert model["stem_norm"](x).shape == x.shape
    torch.testing.assert_close(model["stem_norm"](x), torch.tanh(0.2 * x))


def test_convert_to_derf_with_gamma0():
    # Derf through the converter; without copy_affine gamma starts at gamma0 (a number or a
    # function of the layer name), with it the norm's weight wins.
    model = nn.ModuleDict({"attn_norm": nn.LayerNorm(6), "final_norm": nn.RMSNorm(6)})
    model, count = convert_to_dyt(model, alpha0=0.5, name="derf", copy_affine=False,
                                  gamma0=lambda name: 4.0 if "final" in name else 2.0)
    assert count == 2 and all(isinstance(m, Derf) for m in model.values())
    assert torch.equal(model["attn_norm"].weight, torch.full((6,), 2.0))
    assert torch.equal(model["final_norm"].weight, torch.full((6,), 4.0))
    assert model["attn_norm"].bias is not None and model["final_norm"].bias is None
    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.fill_(0.7)
    kept, _ = convert_to_dyt(nn.Sequential(ln), gamma0=9.0)
    assert torch.equal(kept[0].weight, torch.full((6,), 0.7))


# What runs off CUDA is the definition under autograd: its gradients in mixed precision, with
# frozen inputs, and under torch.compile.

def plain(layer, x):
    """The layer's definition, written out."""
    z = layer.alpha * x + (layer.shift if isinstance(layer, Derf) else 0)
    y = layer.weight * (torch.erf(z) if isinstance(layer, Derf) else torch.tanh(z))
    return y + layer.bias if layer.bias is not None else y


@pytest.mark.parametrize("cls", [DyT, Derf])
def test_forward_is_the_definition_bitwise_on_the_cpu(cls):
    torch.manual_seed(6)
    layer = randomise(cls(48, alpha0=0.8))
    x = torch.randn(4, 33, 48) * 3
    y = layer(x)
    assert torch.equal(y, plain(layer, x))
    assert type(y.grad_fn).__name__ == "AddBackward0"  # autograd's own graph, no Function


@pytest.mark.parametrize("cls", [DyT, Derf])
def test_mixed_dtypes_and_frozen_inputs(cls):
    """bf16 activations with fp32 parameters (CPU autocast leaves these ops alone) give each
    gradient in its input's dtype, and inputs that need no gradient get none."""
    torch.manual_seed(7)
    x = (torch.randn(5, 16) * 2).bfloat16().requires_grad_()
    layer = randomise(cls(16, bias=False))
    layer(x).float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.alpha.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    plain(layer.double(), x64).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=1e-2)
    layer = randomise(cls(16))
    layer.weight.requires_grad_(False)
    xf = torch.randn(3, 16)  # no grad wanted for x
    layer(xf).sum().backward()
    assert layer.weight.grad is None and layer.alpha.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("cls", [DyT, Derf])
def test_traces_under_torch_compile(cls):
    torch.manual_seed(8)
    layer = randomise(cls(16))
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    plain(layer, x).square().sum().backward()
    for a, b in zip(got, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)


def test_one_predicate_for_dyt_like():
    for name in NORMS:
        assert is_dynamic(name) == is_dynamic(make_norm(name, 8)) == (name not in ("ln", "rms", "identity"))
    assert not is_dynamic("nonsense")
