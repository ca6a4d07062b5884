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
import re  # noqa: E402

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

def reference(x, alpha, weight, bias, dy, shift=None, fn="tanh"):
    """y and every gradient in float64, plus for every parameter gradient the same sum taken over
    absolute values of its terms (the scale that the rounding error of a sum is relative to).
    fn "tanh": DyT, gamma tanh(alpha x) + beta; "erf": Derf, gamma erf(alpha x + shift) + beta."""
    xd = x.detach().double().requires_grad_()
    ad = alpha.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    sd = shift.detach().double().requires_grad_() if shift is not None else None
    C = x.shape[-1]
    z = ad * xd + (sd if sd is not None else 0.0)
    f = torch.erf(z) if fn == "erf" else torch.tanh(z)
    y = wd * f + (bd if bd is not None else 0.0)
    y.backward(dy.double())
    with torch.no_grad():
        # f'(z): erf' = 2/sqrt(pi) exp(-z^2), tanh' = 1 - tanh^2
        fp = 2 / math.sqrt(math.pi) * torch.exp(-z * z) if fn == "erf" else 1 - f * f
        dyd, fpr = dy.double().reshape(-1, C), fp.reshape(-1, C)
        xr, fr = xd.reshape(-1, C), f.reshape(-1, C)
        g = (dyd * wd * fpr).abs()
        term_alpha = (g * xr.abs()).sum(0)
        scale = {
            "dalpha": term_alpha if alpha.numel() > 1 else term_alpha.sum().reshape(alpha.shape),
            "dweight": (dyd * fr).abs().sum(0),
            "dbias": dyd.abs().sum(0),
            "dshift": g.sum().reshape(shift.shape) if shift is not None else None,
        }
    grads = {"dx": xd.grad, "dalpha": ad.grad, "dweight": wd.grad,
             "dbias": bd.grad if bd is not None else None,
             "dshift": sd.grad if sd is not None else None}
    return y.detach(), grads, scale


def rel_err(got, ref, scale=None):
    """||got - ref|| / ||scale|| (scale = ref by default), in float64."""
    diff = (got.double() - ref).norm().item()
    den = (ref if scale is None else scale).double().norm().item()
    return diff / den if den > 0 else diff


def make(shape, dtype=torch.float32, param_dtype=torch.float32, per_channel=False, bias=True,
         x_scale=2.0, device=DEVICE, seed=0, shift=False):
    """x, alpha, weight, bias, dy (and, with shift=True, a sixth: Derf's shift), drawn on the
    device itself (a CPU generator would take minutes for the GPU tests' 8x4096x4096)."""
    g = torch.Generator(device=device).manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g, device=device) * x_scale).to(dtype)
    alpha = (torch.rand(C, generator=g, device=device) + 0.25 if per_channel else torch.tensor([0.7]))
    weight = torch.randn(C, generator=g, device=device)
    b = torch.randn(C, generator=g, device=device) if bias else None
    dy = torch.randn(shape, generator=g, device=device).to(dtype)
    s = torch.tensor([0.3]) if shift else None
    to = dict(device=device, dtype=param_dtype)
    alpha, weight = alpha.to(**to).requires_grad_(), weight.to(**to).requires_grad_()
    b = b.to(**to).requires_grad_() if b is not None else None
    if shift:
        return x.requires_grad_(), alpha, weight, b, dy, s.to(**to).requires_grad_()
    return x.requires_grad_(), alpha, weight, b, dy


def run_kernel(x, alpha, weight, bias, dy, shift=None, fn="tanh"):
    for p in (x, alpha, weight, bias, shift):
        if p is not None:
            p.grad = None
    if not x.is_leaf:
        x.retain_grad()  # a view (the non-contiguous test): keep its own gradient
    y = kernel.squash(x, alpha, weight, bias, shift, fn)
    y.backward(dy)
    grads = {"dx": x.grad, "dalpha": alpha.grad, "dweight": weight.grad,
             "dbias": bias.grad if bias is not None else None,
             "dshift": shift.grad if shift is not None else None}
    return y, grads


def check_all(shape, dtype=torch.float32, param_dtype=torch.float32, per_channel=False,
              bias=True, tol_y=1e-5, tol_dx=1e-5, tol_sum=1e-5, x=None, fn="tanh", **kw):
    """Kernel vs float64 for y and every gradient; fn="erf" checks Derf (with its shift)."""
    made = make(shape, dtype, param_dtype, per_channel, bias, shift=fn == "erf", **kw)
    x_, alpha, weight, b, dy = made[:5]
    shift = made[5] if fn == "erf" else None
    x = x_ if x is None else x
    y, grads = run_kernel(x, alpha, weight, b, dy, shift, fn)
    y_ref, g_ref, scale = reference(x, alpha, weight, b, dy, shift, fn)

    assert y.dtype == x.dtype and y.shape == x.shape
    assert grads["dx"].dtype == x.dtype and grads["dx"].shape == x.shape
    for name, p in (("dalpha", alpha), ("dweight", weight), ("dbias", b), ("dshift", shift)):
        if p is not None:
            assert grads[name].dtype == p.dtype and grads[name].shape == p.shape, name
    assert rel_err(y, y_ref) <= tol_y, rel_err(y, y_ref)
    assert rel_err(grads["dx"], g_ref["dx"]) <= tol_dx, rel_err(grads["dx"], g_ref["dx"])
    for name in ("dalpha", "dweight", "dbias", "dshift"):
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
    cfg = kernel._bwd_cfg(300, 193, torch.device("cpu"))
    G, rows = cfg["g_rows"], cfg["rows"]
    assert G > 1 and G * rows >= 300 > (G - 1) * rows and cfg["n_cblocks"] == 1
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
        g1 = {k: v.clone() for k, v in g1.items() if v is not None}
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
        torch.library.opcheck(torch.ops.dyt.squash_fwd, (x, alpha, None, weight, b, 0))
        # the backward op has no autograd of its own (no double backward): plain tensors
        detached = [t.detach() if t is not None else None for t in (dy, x, alpha, None, weight, b)]
        torch.library.opcheck(torch.ops.dyt.squash_bwd, tuple(detached) + (0,))


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
# Derf: gamma * erf(alpha x + s) + beta, the same kernels with FN = erf and the shift's gradient

@cpu_only
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["alpha1", "alphaC"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_derf_fp32_against_float64(shape, per_channel, bias):
    check_all(shape, per_channel=per_channel, bias=bias, fn="erf")


@cpu_only
def test_derf_many_programs_and_non_contiguous():
    for per_channel in (False, True):
        check_all((300, 193), per_channel=per_channel, fn="erf")
    base = (torch.randn(193, 12) * 2).requires_grad_()
    check_all((12, 193), x=base.t(), fn="erf")
    assert base.grad is not None


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["fp32", "same"])
def test_derf_half_precision(dtype, param_dtype):
    pdt = torch.float32 if param_dtype == "fp32" else dtype
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    tol_sum = 1e-5 if pdt == torch.float32 else 2 * eps
    for shape in ((6, 193), (3, 4097)):
        for per_channel in (False, True):
            check_all(shape, dtype, pdt, per_channel, tol_y=2 * eps, tol_dx=2 * eps,
                      tol_sum=tol_sum, fn="erf")


@cpu_only
def test_derf_catches_a_wrong_shift_and_a_wrong_function():
    # The checks can fail: a shift off by 0.05, or tanh in place of erf, is seen.
    x, alpha, weight, b, dy, s = make((6, 193), shift=True)
    y_ref, _, _ = reference(x, alpha, weight, b, dy, s, "erf")
    assert rel_err(kernel.derf(x, alpha, s + 0.05, weight, b), y_ref) > 1e-3
    assert rel_err(kernel.squash(x, alpha, weight, b, s, "tanh"), y_ref) > 1e-3
    assert rel_err(kernel.derf(x, alpha, s, weight, b), y_ref) <= 1e-6


@cpu_only
def test_derf_backward_is_bitwise_deterministic():
    for per_channel in (False, True):
        x, alpha, weight, b, dy, s = make((300, 193), per_channel=per_channel, x_scale=3.0,
                                          shift=True)
        _, g1 = run_kernel(x, alpha, weight, b, dy, s, "erf")
        g1 = {k: v.clone() for k, v in g1.items() if v is not None}
        _, g2 = run_kernel(x, alpha, weight, b, dy, s, "erf")
        for k in g1:
            assert torch.equal(g1[k], g2[k]), k


@cpu_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_derf_large_inputs_saturate_without_nan():
    big = torch.tensor([[0.0, 1.0, -1.0, 50.0, -50.0, 1e4, -1e4, 3e38, -3e38,
                         float("inf"), -float("inf")]])
    C = big.shape[-1]
    x = big.clone().requires_grad_()
    alpha = torch.tensor([100.0], requires_grad=True)
    shift = torch.tensor([0.25], requires_grad=True)
    weight = torch.full((C,), 2.0, requires_grad=True)
    bias = torch.full((C,), 0.5, requires_grad=True)
    y = kernel.derf(x, alpha, shift, weight, bias)
    y.backward(torch.ones_like(y))
    expect = 2.0 * torch.erf(100.0 * big.double() + 0.25) + 0.5
    assert torch.isfinite(y).all()
    assert rel_err(y, expect) <= 1e-6
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.isfinite(shift.grad).all()
    alpha.grad = None
    kernel.derf(big[:, :9].clone(), alpha, shift, weight[:9], bias[:9]).sum().backward()
    assert torch.isfinite(alpha.grad).all()
    y = kernel.derf(torch.tensor([[float("nan"), 1.0]]), torch.ones(1), torch.zeros(1),
                    torch.ones(2), torch.zeros(2))
    assert torch.isnan(y[0, 0]) and torch.isfinite(y[0, 1])


@cpu_only
def test_derf_finite_differences():
    for per_channel in (False, True):
        x, alpha, weight, b, dy, s = make((7, 29), per_channel=per_channel, x_scale=1.0, seed=3,
                                          shift=True)
        _, grads = run_kernel(x, alpha, weight, b, dy, s, "erf")
        inputs = [x, alpha, weight, b, s]
        names = ["dx", "dalpha", "dweight", "dbias", "dshift"]
        g = torch.Generator().manual_seed(1)
        for i, name in enumerate(names):
            v = torch.randn(inputs[i].shape, generator=g)
            h = 1e-2

            def loss(sign):
                args = [p.detach() for p in inputs]
                args[i] = args[i] + sign * h * v
                xx, aa, ww, bb, ss = args
                return (kernel.derf(xx, aa, ss, ww, bb).double() * dy.double()).sum().item()

            numeric = (loss(1) - loss(-1)) / (2 * h)
            analytic = (grads[name].double() * v.double()).sum().item()
            assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (name, numeric,
                                                                              analytic)


@cpu_only
def test_derf_only_x_is_saved_and_custom_ops():
    x, alpha, weight, b, dy, s = make((16, 64), shift=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernel.derf(x, alpha, s, weight, b)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved) == x.numel() + 1 + 1 + 2 * 64
    for per_channel, bias in ((False, True), (True, False)):
        x, alpha, weight, b, dy, s = make((5, 17), per_channel=per_channel, bias=bias, shift=True)
        torch.library.opcheck(torch.ops.dyt.squash_fwd, (x, alpha, s, weight, b, 1))
        detached = [t.detach() if t is not None else None for t in (dy, x, alpha, s, weight, b)]
        torch.library.opcheck(torch.ops.dyt.squash_bwd, tuple(detached) + (1,))


@cpu_only
def test_derf_torch_compile_fullgraph():
    x, alpha, weight, b, dy, s = make((4, 6, 33), shift=True)

    def f(x, alpha, s, weight, b):
        return kernel.derf(x * 2, alpha, s, weight, b).float().square().sum()

    args = (x, alpha, s, weight, b)
    assert torch._dynamo.explain(f)(*args).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = f(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    assert torch.equal(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        assert torch.equal(gc, ge)


@cpu_only
def test_derf_matches_the_derf_layer():
    import dyt
    torch.manual_seed(0)
    layer = dyt.Derf(48, alpha0=0.8)
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_(), layer.shift.fill_(-0.2)
    x = torch.randn(3, 5, 48)
    ref = layer(x)  # CPU: the plain PyTorch path
    out = kernel.derf(x, layer.alpha, layer.shift, layer.weight, layer.bias)
    assert rel_err(out, ref.double()) <= 1e-6
    with pytest.raises(ValueError):
        kernel.derf(x, layer.alpha, torch.zeros(2), layer.weight, layer.bias)


# ---------------------------------------------------------------------------------------------
# Static sm_90 checks: no GPU needed. The kernels are compiled for sm_90 exactly as the launchers
# would launch them (the launch calls of kernel._forward/_backward are captured with CPU tensors
# of the real shape, then compiled with the argument specialisation Triton's JIT would use), and
# the wheel's own cuobjdump reads registers, stack/local memory and SASS. This runs in a
# subprocess with TRITON_INTERPRET=0, because this session's kernels are interpreted.

SM90_M, SM90_C, SM90_SMS = 4096, 4096, 132  # LLaMA-7B width, one 4096-token sequence; H100 SXM and H200 both have 132 SMs
REGS_PER_SM = 65536


def _nvidia_tools():
    import triton
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if all(os.path.exists(os.path.join(d, t)) for t in ("ptxas", "cuobjdump")):
        return d
    return None


def _sm90_compile(jitfn, args, kwargs):
    """triton.compile for sm_90 with the JIT's own specialisation of these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jitfn.signature, jitfn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jitfn._pack_args(backend, kwargs, bound_args,
                                                             specialization, options)
    return triton.compile(ASTSource(jitfn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_summary(sass):
    """Global memory instructions in loop bodies and in the whole kernel. A loop body is the
    address range [target, branch] of a backward BRA."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, op, rest in ins:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
    in_loop = lambda a: any(lo <= a <= hi for lo, hi in loops)  # noqa: E731
    glob = [(a, op) for a, op, _ in ins if op.startswith(("LDG", "STG", "LDGSTS"))]
    return dict(
        loops=len(loops),
        loop_loads=sorted({op for a, op in glob if in_loop(a) and op.startswith(("LDG", "LDGSTS"))
                           and op != "LDGDEPBAR"}),
        loop_stores=sorted({op for a, op in glob if in_loop(a) and op.startswith("STG")}),
        stream_loads=sorted({op for a, op in glob if ".EF" in op or op.startswith("LDGSTS")}),
        stores=sorted({op for a, op in glob if op.startswith("STG")}),
        local_ops=sorted({op for _, op, _ in ins if op.startswith(("LDL", "STL"))}),
        n_instructions=len(ins))


def sm90_report():
    """Compile every variant as launched at [4096, 4096]; returns a list of dicts (one per
    compiled kernel). Call with TRITON_INTERPRET=0 (see test_sm90_static_compile)."""
    import subprocess
    import tempfile
    assert not kernel._INTERPRET, "needs compiled (not interpreted) kernels"
    tools = _nvidia_tools()
    captured = []
    real = {n: getattr(kernel, n) for n in ("_squash_fwd_kernel", "_squash_bwd_kernel",
                                            "_squash_reduce_kernel")}

    class Capture:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: captured.append((self.name, grid, args, kw))

    variants = []
    for dtype in (torch.bfloat16, torch.float32):
        for per_channel in (False, True):
            variants.append(("tanh", dtype, per_channel, "auto"))
        variants.append(("erf", dtype, False, "auto"))
    variants += [("tanh", torch.bfloat16, False, "approx"), ("tanh", torch.bfloat16, True, "approx")]
    saved = dict(sm_count=kernel._sm_count, tanh=kernel.TANH)
    rows = []
    try:
        kernel._sm_count = lambda device: SM90_SMS
        for name in real:
            setattr(kernel, name, Capture(name))
        for fn, dtype, per_channel, tanh in variants:
            kernel.TANH = tanh
            kernel._BWD_CFG.clear()
            x = torch.empty(SM90_M, SM90_C, dtype=dtype)  # CPU, never touched: no real memory
            alpha = torch.ones(SM90_C if per_channel else 1)
            shift = torch.zeros(1) if fn == "erf" else None
            weight, bias = torch.ones(SM90_C), torch.zeros(SM90_C)
            captured.clear()
            kernel._forward(x, alpha, shift, weight, bias, kernel.FNS[fn])
            kernel._backward(x, x, alpha, shift, weight, bias, kernel.FNS[fn])
            for kname, grid, args, kw in list(captured):
                compiled = _sm90_compile(real[kname], args, kw)
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name],
                                           capture_output=True, text=True, check=True).stdout
                    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name],
                                          capture_output=True, text=True, check=True).stdout
                field = lambda k: int(re.search(k + r":(\d+)", usage).group(1))  # noqa: E731
                warps = kw["num_warps"]
                regs = field("REG")
                row = dict(kernel=kname.strip("_").replace("_kernel", ""), fn=fn,
                           dtype=str(dtype).replace("torch.", ""), alpha="C" if per_channel else "1",
                           tanh=tanh, grid=grid[0], warps=warps, stages=kw.get("NUM_STAGES", 1),
                           regs=regs, stack=field("STACK"), local=field("LOCAL"),
                           shared=compiled.metadata.shared,
                           blocks_per_sm_by_regs=REGS_PER_SM // (max(regs, 1) * 32 * warps))
                row.update(sass_summary(sass))
                rows.append(row)
    finally:
        for name, fnobj in real.items():
            setattr(kernel, name, fnobj)
        kernel._sm_count, kernel.TANH = saved["sm_count"], saved["tanh"]
        kernel._BWD_CFG.clear()
    return rows


def _sm90_main():  # python -c "import test_kernel; test_kernel._sm90_main()" (TRITON_INTERPRET=0)
    import json
    print("SM90_JSON " + json.dumps(sm90_report()))


def _sm90_rows():
    import json
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", "import test_kernel; test_kernel._sm90_main()"],
                          cwd=here, env=dict(env, PYTHONPATH=os.pathsep.join(
                              [here, os.path.dirname(here), env.get("PYTHONPATH", "")])),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SM90_JSON "))
    return json.loads(line[len("SM90_JSON "):])


@pytest.fixture(scope="module")
def sm90_rows():
    if _nvidia_tools() is None:
        pytest.skip("this triton wheel has no ptxas/cuobjdump")
    return _sm90_rows()


def test_sm90_static_compile(sm90_rows):
    """128-bit global loads/stores where the activations stream, no local memory anywhere,
    registers low enough for the designed occupancy: backward >= 2 blocks of 8 warps per SM,
    forward >= 2 blocks per SM (it has 4-8 warps and no loop)."""
    rows = sm90_rows
    kinds = {(r["kernel"], r["fn"], r["dtype"], r["alpha"], r["tanh"]) for r in rows}
    for dtype in ("bfloat16", "float32"):
        for alpha in ("1", "C"):
            assert ("squash_fwd", "tanh", dtype, alpha, "auto") in kinds
            assert ("squash_bwd", "tanh", dtype, alpha, "auto") in kinds
        assert ("squash_bwd", "erf", dtype, "1", "auto") in kinds
    for r in rows:
        tag = {k: r[k] for k in ("kernel", "fn", "dtype", "alpha", "tanh", "regs")}
        assert r["stack"] == 0 and r["local"] == 0 and not r["local_ops"], (tag, r)
        if r["kernel"] == "squash_bwd":
            assert r["loops"] >= 1, tag
            assert r["loop_loads"] and all(op.endswith(".128") for op in r["loop_loads"]), (tag, r)
            assert r["loop_stores"] and all(op.endswith(".128") for op in r["loop_stores"]), (tag, r)
            assert r["warps"] == kernel.BWD_WARPS and r["grid"] <= 2 * SM90_SMS, tag
            assert r["blocks_per_sm_by_regs"] >= kernel.BWD_PROGRAMS_PER_SM, tag
            if r["stages"] > 1:
                assert any(op.startswith("LDGSTS") for op in r["loop_loads"]), (tag, r)
        elif r["kernel"] == "squash_fwd":
            assert r["stream_loads"] and all(op.endswith(".128") for op in r["stream_loads"]), (tag, r)
            assert r["stores"] and all(op.endswith(".128") for op in r["stores"]), (tag, r)
            assert r["blocks_per_sm_by_regs"] >= 2, tag


def test_sm90_sass_parser_can_fail():
    # The checks above read SASS through sass_summary; on a hand-written loop with a 64-bit
    # store and a local-memory spill it must report both (so the assertions can fail).
    sass = """
        /*0100*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   STG.E.64 desc[UR4][R6.64], R8 ;
        /*0120*/                   STL [R1], R4 ;
        /*0130*/              @!P1 BRA 0x100 ;
        /*0140*/                   STG.E.128 desc[UR4][R6.64], R8 ;
    """
    s = sass_summary(sass)
    assert s["loops"] == 1 and s["loop_loads"] == ["LDG.E.EF.128"]
    assert s["loop_stores"] == ["STG.E.64"] and s["local_ops"] == ["STL"]
    assert s["stores"] == ["STG.E.128", "STG.E.64"]


# ---------------------------------------------------------------------------------------------
# GPU, compiled kernels at real sizes

# The GPU tests are sized to one short device call: every kernel variant they compile (a
# distinct set of constexprs, block sizes and divisibility of the sizes) costs a Triton compile
# of ~1-2 s, and each case draws its data on the device. gpu_compile_plan() counts the compiles
# and prints them with an estimate before the first GPU test runs.
#   core: tanh and erf, bf16 and fp32, a working set many times the L2 and an odd width, y and
#         every gradient against float64 (the GPU check's first part: -k gpu_core)
#   more: fp16, the portable tanh, rows past 65,535 programs, tiny shapes, erf with a
#         per-channel alpha (no layer uses it; the kernel takes it) (-k "gpu and not core")

GPU_CORE = [(fn, dtype, shape, per_channel)
            for fn in ("tanh", "erf") for dtype in (torch.bfloat16, torch.float32)
            for shape in ((8, 4096, 4096), (3, 4097))
            for per_channel in ((False, True) if fn == "tanh" else (False,))]
GPU_MORE = [("tanh", torch.float16, (70000, 4097), True), ("erf", torch.float16, (2, 3, 193), False),
            ("tanh", torch.float32, (1, 193), False), ("tanh", torch.bfloat16, (4, 1), True),
            ("erf", torch.float32, (70000, 4097), False), ("erf", torch.bfloat16, (3, 4097), True)]
SECONDS_PER_COMPILE = 1.5  # an estimate for these kernels (Triton 3.x, one process)


def gpu_compile_plan(cases, tanh_modes=("auto",)):
    """The number of distinct kernels `cases` compile (forward, backward, reduce)."""
    return len(_compile_keys(cases, tanh_modes))


def _compile_keys(cases, tanh_modes):
    """The kernels as Triton tells them apart: by the constexprs, the launch configuration and
    the sizes' divisibility by 16."""
    keys = set()
    for fn, dtype, shape, per_channel in cases:
        C, M = shape[-1], math.prod(shape[:-1])
        div = (C % 16 == 0, M * C % 16 == 0)
        for tanh in tanh_modes:
            flags = (fn, dtype, per_channel, fn == "erf", True, tanh)
            keys.add(("fwd",) + flags + kernel._fwd_blocks(M, C, torch.finfo(dtype).bits // 8) + div)
            plan = kernel._bwd_plan(M, C, 132)
            keys.add(("bwd",) + flags + (plan["block_m"], plan["block_c"], plan["num_warps"]) + div)
        keys.add(("reduce", per_channel, fn == "erf", C % 16 == 0, plan["red_block_g"]))
    return keys


@pytest.fixture(scope="module")
def announce_compiles(request):
    """Before the first GPU test: the compiles of the GPU tests that -k selected."""
    keys = set()
    for item in request.session.items:
        if "announce_compiles" in item.fixturenames and hasattr(item, "callspec"):
            p = item.callspec.params
            keys |= _compile_keys([(p["fn"], p["dtype"], p["shape"], p["per_channel"])], (p.get("tanh", "auto"),))
    n = len(keys)
    print(f"\nGPU kernel tests: about {n} Triton compiles, ~{n * SECONDS_PER_COMPILE:.0f} s "
          f"at {SECONDS_PER_COMPILE} s each (an estimate), plus the runs", flush=True)


def test_gpu_compile_plan_counts_distinct_variants():
    one = [("tanh", torch.bfloat16, (8, 4096, 4096), False)]
    assert gpu_compile_plan(one) == 3  # forward, backward, reduce
    assert gpu_compile_plan(one * 5) == 3  # the same kernels again: nothing new to compile
    assert gpu_compile_plan(one, ("auto", "portable")) == 5  # the reduce has no tanh
    assert gpu_compile_plan(GPU_CORE) < 3 * len(GPU_CORE)  # shared variants are counted once


def _gpu_check(fn, dtype, shape, per_channel):
    eps = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    tol = max(2 * eps, 2e-6)
    check_all(shape, dtype, torch.float32, per_channel, tol_y=tol, tol_dx=tol, tol_sum=1e-5, fn=fn)
    torch.cuda.empty_cache()


@gpu_only
@pytest.mark.parametrize("fn, dtype, shape, per_channel", GPU_CORE, ids=str)
def test_gpu_core_against_float64(announce_compiles, fn, dtype, shape, per_channel):
    _gpu_check(fn, dtype, shape, per_channel)


@gpu_only
@pytest.mark.parametrize("tanh", ["auto", "portable"])
@pytest.mark.parametrize("fn, dtype, shape, per_channel", GPU_MORE, ids=str)
def test_gpu_more_against_float64(announce_compiles, monkeypatch, tanh, fn, dtype, shape, per_channel):
    monkeypatch.setattr(kernel, "TANH", tanh)
    _gpu_check(fn, dtype, shape, per_channel)


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
    g1 = {k: v.clone() for k, v in g1.items() if v is not None}
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


@gpu_only
def test_gpu_derf_layer_and_inductor():
    import dyt
    layer = dyt.Derf(4096).cuda()
    with torch.no_grad():
        layer.shift.fill_(0.1)
    x = torch.randn(4, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x)
    y.float().square().sum().backward()
    layer.use_kernel = False
    ref = layer(x.detach().float())
    assert rel_err(y, ref.double()) <= 2 * 2.0 ** -8
    assert layer.alpha.grad.dtype == layer.shift.grad.dtype == torch.float32
