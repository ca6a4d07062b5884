"""Tests of kernel.py, the fused Triton DyT, against a float64 reference.

On CPU the kernels run under Triton's interpreter, which must be switched on before kernel.py
(whose @triton.jit decorators read TRITON_INTERPRET) is imported: the line below does that,
and tests/conftest.py does it for the whole session. setdefault, not overwrite, so that on a GPU
machine `TRITON_INTERPRET=0 pytest tests/test_kernel.py` compiles the real kernels and runs the
GPU tests at full size (with the interpreter on, those are skipped, and vice versa).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernel  # noqa: E402

INTERPRET = kernel._INTERPRET
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests need TRITON_INTERPRET=1 set "
                              "before kernel is imported")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                              reason="GPU tests need CUDA and compiled kernels: run "
                              "`TRITON_INTERPRET=0 pytest tests/test_kernel.py -k gpu`")
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"


# ---------------------------------------------------------------------------------------------
# Reference and error measures

def reference(x, alpha, weight, bias, dy):
    """y and the four gradients in float64, plus for every gradient the same sum taken over
    absolute values of its terms (the scale that the rounding error of a sum is relative to)."""
    xd = x.detach().double().requires_grad_()
    ad = alpha.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    C = x.shape[-1]
    t = torch.tanh(ad * xd)
    y = wd * t + (bd if bd is not None else 0.0)
    y.backward(dy.double())
    with torch.no_grad():
        dyd, s = dy.double().reshape(-1, C), (1 - t * t).reshape(-1, C)
        xr, tr = xd.reshape(-1, C), t.reshape(-1, C)
        term_alpha = (dyd * wd * xr * s).abs().sum(0)
        scale = {
            "dalpha": term_alpha if alpha.numel() > 1 else term_alpha.sum().reshape(alpha.shape),
            "dweight": (dyd * tr).abs().sum(0),
            "dbias": dyd.abs().sum(0),
        }
    grads = {"dx": xd.grad, "dalpha": ad.grad, "dweight": wd.grad,
             "dbias": bd.grad if bd is not None else None}
    return y.detach(), grads, scale


def rel_err(got, ref, scale=None):
    """||got - ref|| / ||scale|| (scale = ref by default), in float64."""
    diff = (got.double() - ref).norm().item()
    den = (ref if scale is None else scale).double().norm().item()
    return diff / den if den > 0 else diff


def make(shape, dtype=torch.float32, param_dtype=torch.float32, per_channel=False, bias=True,
         x_scale=2.0, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * x_scale).to(device=device, dtype=dtype)
    alpha = (torch.rand(C, generator=g) + 0.25 if per_channel else torch.tensor([0.7]))
    weight = torch.randn(C, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    to = dict(device=device, dtype=param_dtype)
    alpha, weight = alpha.to(**to).requires_grad_(), weight.to(**to).requires_grad_()
    b = b.to(**to).requires_grad_() if b is not None else None
    return x.requires_grad_(), alpha, weight, b, dy


def run_kernel(x, alpha, weight, bias, dy):
    for p in (x, alpha, weight, bias):
        if p is not None:
            p.grad = None
    if not x.is_leaf:
        x.retain_grad()  # a view (the non-contiguous test): keep its own gradient
    y = kernel.dyt(x, alpha, weight, bias)
    y.backward(dy)
    grads = {"dx": x.grad, "dalpha": alpha.grad, "dweight": weight.grad,
             "dbias": bias.grad if bias is not None else None}
    return y, grads


def check_all(shape, dtype=torch.float32, param_dtype=torch.float32, per_channel=False,
              bias=True, tol_y=1e-5, tol_dx=1e-5, tol_sum=1e-5, x=None, **kw):
    x_, alpha, weight, b, dy = make(shape, dtype, param_dtype, per_channel, bias, **kw)
    x = x_ if x is None else x
    y, grads = run_kernel(x, alpha, weight, b, dy)
    y_ref, g_ref, scale = reference(x, alpha, weight, b, dy)

    assert y.dtype == x.dtype and y.shape == x.shape
    assert grads["dx"].dtype == x.dtype and grads["dx"].shape == x.shape
    for name, p in (("dalpha", alpha), ("dweight", weight), ("dbias", b)):
        if p is not None:
            assert grads[name].dtype == p.dtype and grads[name].shape == p.shape, name
    assert rel_err(y, y_ref) <= tol_y, rel_err(y, y_ref)
    assert rel_err(grads["dx"], g_ref["dx"]) <= tol_dx, rel_err(grads["dx"], g_ref["dx"])
    for name in ("dalpha", "dweight", "dbias"):
        if g_ref[name] is None:
            continue
        # A reduction is judged against the sum of |terms| (its condition), and its plain
        # relative error must still be small unless that sum cancels badly.
        e = rel_err(grads[name], g_ref[name], scale[name])
        assert e <= tol_sum, (name, e)
    return y, grads


# ---------------------------------------------------------------------------------------------
# CPU, under the interpreter

SHAPES = [(4, 1), (5, 3), (6, 193), (3, 4097), (1, 193), (1, 1), (2, 3, 193), (70, 64)]


@cpu_only
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["alpha1", "alphaC"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_against_float64(shape, per_channel, bias):
    check_all(shape, per_channel=per_channel, bias=bias)


@cpu_only
def test_fp32_many_programs():
    # 300 rows: the backward runs several persistent programs, so the partial-sum reduction
    # over programs is exercised (and the last program's range is ragged).
    G, rows = kernel._bwd_programs(300, kernel._bwd_blocks(300, 193)[0], torch.device("cpu"))
    assert G > 1 and G * rows >= 300 > (G - 1) * rows
    for per_channel in (False, True):
        check_all((300, 193), per_channel=per_channel)


@cpu_only
@pytest.mark.parametrize("per_channel", [False, True], ids=["alpha1", "alphaC"])
def test_non_contiguous_input(per_channel):
    base = (torch.randn(193, 12) * 2).requires_grad_()
    x = base.t()  # [12, 193], stride (1, 12)
    assert not x.is_contiguous()
    y, grads = check_all((12, 193), per_channel=per_channel, x=x)
    assert base.grad is not None and base.grad.shape == base.shape


@cpu_only
def test_non_contiguous_grad_output():
    x, alpha, weight, b, dy = make((8, 33))
    dy_nc = dy.t().contiguous().t()
    assert not dy_nc.is_contiguous()
    y, grads = run_kernel(x, alpha, weight, b, dy_nc)
    y_ref, g_ref, scale = reference(x, alpha, weight, b, dy)
    assert rel_err(grads["dx"], g_ref["dx"]) <= 1e-5


@cpu_only
@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (2, 0, 5)], ids=str)
def test_empty(shape):
    x, alpha, weight, b, dy = make(shape)
    y, grads = run_kernel(x, alpha, weight, b, dy)
    assert y.shape == x.shape and grads["dx"].shape == x.shape
    assert torch.all(grads["dalpha"] == 0) and torch.all(grads["dweight"] == 0)
    assert grads["dbias"].shape == b.shape


@cpu_only
def test_more_than_65535_rows():
    check_all((70000, 2), x_scale=1.0)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["fp32", "same"])
@pytest.mark.parametrize("shape", [(6, 193), (3, 4097)], ids=str)
def test_half_precision(dtype, param_dtype, shape):
    # The reference takes the same (rounded) half-precision inputs, so this measures the
    # kernel's own rounding: outputs and dx are rounded to the input dtype once (bf16: 2^-9
    # relative, fp16: 2^-12). Parameter gradients of fp32 parameters are fp32 sums.
    pdt = torch.float32 if param_dtype == "fp32" else dtype
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    tol_sum = 1e-5 if pdt == torch.float32 else 2 * eps
    for per_channel in (False, True):
        check_all(shape, dtype, pdt, per_channel, tol_y=2 * eps, tol_dx=2 * eps, tol_sum=tol_sum)


@cpu_only
def test_half_precision_catches_a_wrong_result():
    # The half-precision tolerances are tight enough to see a real error (alpha off by 5%).
    x, alpha, weight, b, dy = make((6, 193), torch.bfloat16)
    y = kernel.dyt(x, alpha * 1.05, weight, b)
    y_ref, _, _ = reference(x, alpha, weight, b, dy)
    assert rel_err(y, y_ref) > 2 * 2.0 ** -8


@cpu_only
def test_backward_is_bitwise_deterministic():
    for per_channel in (False, True):
        x, alpha, weight, b, dy = make((300, 193), per_channel=per_channel, x_scale=3.0)
        _, g1 = run_kernel(x, alpha, weight, b, dy)
        g1 = {k: v.clone() for k, v in g1.items()}
        _, g2 = run_kernel(x, alpha, weight, b, dy)
        for k in g1:
            assert torch.equal(g1[k], g2[k]), k


@cpu_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: 100 * 3e38 overflows to inf, on purpose
def test_large_inputs_saturate_without_nan():
    big = torch.tensor([[0.0, 1.0, -1.0, 50.0, -50.0, 1e4, -1e4, 3e38, -3e38,
                         float("inf"), -float("inf")]])
    C = big.shape[-1]
    x = big.clone().requires_grad_()
    alpha = torch.tensor([100.0], requires_grad=True)
    weight = torch.full((C,), 2.0, requires_grad=True)
    bias = torch.full((C,), 0.5, requires_grad=True)
    y = kernel.dyt(x, alpha, weight, bias)
    y.backward(torch.ones_like(y))
    expect = 2.0 * torch.tanh(100.0 * big.double()) + 0.5
    assert torch.isfinite(y).all()
    assert torch.equal(y.double(), expect.float().double())
    # finite x: finite grads (tanh' = 0 exactly once saturated); inf*0 in dalpha would be NaN,
    # so the alpha gradient is checked on the finite inputs only
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
    alpha.grad = None
    kernel.dyt(big[:, :9].clone(), alpha, weight[:9], bias[:9]).sum().backward()
    assert torch.isfinite(alpha.grad).all()


@cpu_only
def test_nan_propagates():
    x = torch.tensor([[float("nan"), 1.0]])
    y = kernel.dyt(x, torch.tensor([1.0]), torch.ones(2), torch.zeros(2))
    assert torch.isnan(y[0, 0]) and torch.isfinite(y[0, 1])


@cpu_only
def test_tanh_relative_accuracy():
    # y = tanh(x) with alpha = gamma = 1 and no beta, on |x| from 1e-8 to 30 (both signs, and
    # densely around the 0.5 switch between the series and the exp formula).
    mag = torch.cat([torch.logspace(-8, math.log10(30.0), 4001, dtype=torch.float64),
                     torch.linspace(0.45, 0.55, 1001, dtype=torch.float64)])
    z = torch.cat([mag, -mag]).float()
    t = kernel.dyt(z[None], torch.ones(1), torch.ones(z.numel()))[0]
    ref = torch.tanh(z.double())
    rel = ((t.double() - ref).abs() / ref.abs()).max().item()
    assert rel <= 5e-7, rel  # a few fp32 ulp
    # ...a bound that the formulas the spec rules out would fail near zero:
    via_sigmoid = 2 * torch.sigmoid(2 * z) - 1
    assert ((via_sigmoid.double() - ref).abs() / ref.abs()).max().item() > 1e-3
    assert torch.equal(kernel.dyt(torch.zeros(1, 1), torch.ones(1), torch.ones(1)),
                       torch.zeros(1, 1))


@cpu_only
def test_finite_differences():
    # gradcheck-like: the kernel's own forward, differenced along a random direction, against
    # the directional derivative from its backward (fp32 forward, so h is not tiny).
    for per_channel in (False, True):
        x, alpha, weight, b, dy = make((7, 29), per_channel=per_channel, x_scale=1.0, seed=3)
        _, grads = run_kernel(x, alpha, weight, b, dy)
        inputs = [x, alpha, weight, b]
        names = ["dx", "dalpha", "dweight", "dbias"]
        g = torch.Generator().manual_seed(1)
        for i, name in enumerate(names):
            v = torch.randn(inputs[i].shape, generator=g)
            h = 1e-2

            def loss(sign):
                args = [p.detach() for p in inputs]
                args[i] = args[i] + sign * h * v
                return (kernel.dyt(*args).double() * dy.double()).sum().item()

            numeric = (loss(1) - loss(-1)) / (2 * h)
            analytic = (grads[name].double() * v.double()).sum().item()
            assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (name, numeric,
                                                                              analytic)


@cpu_only
def test_only_x_is_saved_for_backward():
    # The memory promise: besides the parameters, backward keeps exactly x (not y, not tanh).
    x, alpha, weight, b, dy = make((16, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kernel.dyt(x, alpha, weight, b)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved) == x.numel() + alpha.numel() + 2 * 64


@cpu_only
def test_custom_op_registration():
    # schema, fake (meta) kernel, autograd registration: torch's own consistency checks
    for per_channel, bias in ((False, True), (True, False)):
        x, alpha, weight, b, dy = make((5, 17), per_channel=per_channel, bias=bias)
        torch.library.opcheck(torch.ops.dyt.dyt_fwd, (x, alpha, weight, b))
        # the backward op has no autograd of its own (no double backward): plain tensors
        detached = [t.detach() if t is not None else None for t in (dy, x, alpha, weight, b)]
        torch.library.opcheck(torch.ops.dyt.dyt_bwd, tuple(detached))


@cpu_only
def test_torch_compile_fullgraph():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    # the fake kernels and the registered autograd formula, then runs the real kernels.
    x, alpha, weight, b, dy = make((4, 6, 33))

    def f(x, alpha, weight, b):
        return kernel.dyt(x * 2, alpha, weight, b).float().square().sum()

    assert torch._dynamo.explain(f)(x, alpha, weight, b).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, alpha, weight, b)
    grads_c = torch.autograd.grad(loss_c, (x, alpha, weight, b))
    loss_e = f(x, alpha, weight, b)
    grads_e = torch.autograd.grad(loss_e, (x, alpha, weight, b))
    assert torch.equal(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        assert torch.equal(gc, ge)


@cpu_only
def test_autocast_bf16_input_fp32_params():
    x, alpha, weight, b, dy = make((6, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernel.dyt(x.to(torch.bfloat16), alpha, weight, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert alpha.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.float32


@cpu_only
def test_matches_the_dyt_layer():
    import dyt
    torch.manual_seed(0)
    layer = dyt.DyT(48, alpha0=0.8)
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    x = torch.randn(3, 5, 48)
    ref = layer(x)  # CPU: the plain PyTorch path
    out = kernel.dyt(x, layer.alpha, layer.weight, layer.bias)
    assert rel_err(out, ref.double()) <= 1e-6


@cpu_only
def test_available_and_argument_checks():
    assert kernel.available(torch.zeros(2, 3))
    assert kernel.available(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not kernel.available(torch.zeros(2, 3, dtype=torch.float64))
    assert not kernel.available(torch.zeros(2, 3, dtype=torch.int32))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError):
        kernel.dyt(x, torch.ones(1), torch.ones(4))
    with pytest.raises(ValueError):
        kernel.dyt(x, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError):
        kernel.dyt(x, torch.ones(1), torch.ones(3), torch.ones(2))
    a0 = torch.tensor(0.5, requires_grad=True)  # a 0-d alpha works like [1]
    kernel.dyt(x, a0, torch.ones(3)).sum().backward()
    assert a0.grad.shape == () and torch.isfinite(a0.grad)
    with pytest.raises(TypeError):
        kernel.dyt(x.double(), torch.ones(1), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# GPU, compiled kernels at real sizes

@gpu_only
@pytest.mark.parametrize("tanh", ["auto", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(8, 4096, 4096), (70000, 4097), (3, 4097), (1, 193),
                                   (4, 1), (2, 3, 193)], ids=str)
def test_gpu_against_float64(monkeypatch, tanh, dtype, shape):
    monkeypatch.setattr(kernel, "TANH", tanh)
    eps = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    tol = max(2 * eps, 2e-6)
    for per_channel in (False, True):
        check_all(shape, dtype, torch.float32, per_channel, tol_y=tol, tol_dx=tol, tol_sum=1e-5)
        torch.cuda.empty_cache()


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_tanh_approx_half(monkeypatch, dtype):
    if torch.version.hip is not None:
        pytest.skip("tanh.approx.f32 is NVIDIA PTX")
    monkeypatch.setattr(kernel, "TANH", "approx")
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    check_all((4096, 4096), dtype, dtype, False, tol_y=2 * eps, tol_dx=4 * eps, tol_sum=4 * eps)


@gpu_only
@pytest.mark.parametrize("tanh", ["auto", "portable"])
def test_gpu_tanh_relative_accuracy(monkeypatch, tanh):
    monkeypatch.setattr(kernel, "TANH", tanh)
    mag = torch.cat([torch.logspace(-8, math.log10(30.0), 100001, dtype=torch.float64),
                     torch.linspace(0.45, 0.55, 10001, dtype=torch.float64)])
    z = torch.cat([mag, -mag]).float().cuda()
    t = kernel.dyt(z[None], torch.ones(1, device="cuda"), torch.ones(z.numel(), device="cuda"))[0]
    ref = torch.tanh(z.double())
    rel = ((t.double() - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-6, rel


@gpu_only
@pytest.mark.parametrize("per_channel", [False, True], ids=["alpha1", "alphaC"])
def test_gpu_backward_is_bitwise_deterministic(per_channel):
    x, alpha, weight, b, dy = make((8, 4096, 4096), torch.bfloat16, torch.float32, per_channel)
    _, g1 = run_kernel(x, alpha, weight, b, dy)
    g1 = {k: v.clone() for k, v in g1.items()}
    for _ in range(3):
        _, g2 = run_kernel(x, alpha, weight, b, dy)
        for k in g1:
            assert torch.equal(g1[k], g2[k]), k


@gpu_only
def test_gpu_large_inputs_no_nan():
    x = torch.tensor([[0.0, 50.0, -50.0, 1e4, -1e4, 3e38, -3e38]], device="cuda")
    x = x.repeat(1000, 1).requires_grad_()
    C = x.shape[-1]
    alpha = torch.tensor([100.0], device="cuda", requires_grad=True)
    weight = torch.ones(C, device="cuda", requires_grad=True)
    y = kernel.dyt(x, alpha, weight, None)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(alpha.grad).all() and torch.isfinite(weight.grad).all()


@gpu_only
def test_gpu_dyt_layer_and_inductor():
    import dyt
    layer = dyt.DyT(4096).cuda()
    x = torch.randn(4, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x)
    y.float().square().sum().backward()
    layer.use_kernel = False
    ref = layer(x.detach().float())
    assert rel_err(y, ref.double()) <= 2 * 2.0 ** -8
    assert layer.alpha.grad.dtype == torch.float32
