"""analyze.py on CPU: the measures on data with known answers, hooks that leave no trace, and
every subcommand end to end on tiny checkpoints (2-block ViTs on synthetic Fashion-MNIST-format
IDX files, a 1-layer GPT on the built-in corpus), a few training steps each."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import analyze  # noqa: E402
from run import RunLogger  # noqa: E402
import train_common as tc  # noqa: E402
import train_gpt  # noqa: E402
import train_vit  # noqa: E402
from test_data_vision import write_fashion_mnist  # noqa: E402

torch.set_num_threads(2)
HAVE_MPL = analyze.pyplot() is not None
VIT_TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--batch_size", "16", "--eval_batch", "100",
            "--warmup_steps", "2", "--log_interval", "2", "--lr", "3e-3", "--hflip", "false"]
GPT_TINY = ["--dim", "32", "--n_layer", "1", "--n_head", "2", "--n_kv_head", "2", "--seq_len", "32",
            "--micro_batch", "4", "--global_batch_tokens", "128", "--warmup_steps", "1",
            "--eval_tokens", "512", "--log_interval", "1", "--eval_interval", "0",
            "--sample_tokens", "0", "--ckpt_interval", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Synthetic IDX data, LN and DyT ViTs (12 steps, DyT readouts every 4), a DyT GPT."""
    root = tmp_path_factory.mktemp("analyze")
    idx = root / "idx"
    idx.mkdir()
    write_fashion_mnist(idx, 320, 200)
    for norm in ("ln", "dyt"):
        train_vit.main(VIT_TINY + ["--norm", norm, "--max_steps", "12", "--dyt_std_interval", "4",
                                   "--data_dir", str(idx), "--out_dir", str(root / f"vit_{norm}")])
    train_gpt.main(GPT_TINY + ["--norm", "dyt", "--max_steps", "4", "--out_dir", str(root / "gpt_dyt")])
    return root


def outputs(results, name, tables=("",)):
    """The table files exist; the PNG too when matplotlib is installed."""
    for t in tables:
        assert (results / f"{name}{t}.md").exists() and (results / f"{name}{t}.csv").exists(), name + t
    if HAVE_MPL:
        png = results / f"{name}.png"
        assert png.exists() and png.stat().st_size < 300_000


# ---------------------------------------------------------------------------------------------
# The measures


def test_effective_rank_of_known_spectra():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(20000, 32, generator=g)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    for of in ("covariance", "singular_values"):
        assert 30 < analyze.effective_rank(iso, of=of) <= 32
        for k in (1, 5, 12):
            low = torch.randn(20000, k, generator=g) @ q[:k]  # k orthonormal directions in 64-d
            assert abs(analyze.effective_rank(low, of=of) - k) < 0.05 * k + 0.05, (of, k)
    # the two definitions part on a spectrum that is not flat: singular values 2 and 1 give the
    # paper's (squared) p = (0.8, 0.2) and Roy & Vetterli's p = (2/3, 1/3)
    two = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [0.0, -1.0]])  # centred already
    h = lambda p: math.exp(-sum(x * math.log(x) for x in p))
    assert analyze.effective_rank(two) == pytest.approx(h([0.8, 0.2]), rel=1e-12)
    assert analyze.effective_rank(two, of="singular_values") == pytest.approx(h([2 / 3, 1 / 3]), rel=1e-12)
    # the paper's covariance is centred: a shared offset does not count as a direction
    assert analyze.effective_rank(iso + 100, of="singular_values") < 3 < 30 < analyze.effective_rank(iso + 100)


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 24, generator=g, dtype=torch.float64)  # exact up to rounding
    y = x @ torch.randn(24, 16, generator=g, dtype=torch.float64) + 0.5 * torch.randn(500, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    base = analyze.linear_cka(x, y)
    assert analyze.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert analyze.linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)   # orthogonal
    assert analyze.linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)  # isotropic scale
    assert analyze.linear_cka(x, torch.randn(500, 16, generator=g)) < 0.2
    assert 0 < base < 1


def test_fit_tanh_recovers_alpha():
    x = np.linspace(-6, 6, 2001)
    alpha, scale, r2 = analyze.fit_tanh(x, 1.7 * np.tanh(0.37 * x))
    assert alpha == pytest.approx(0.37, rel=1e-5) and scale == pytest.approx(1.7, rel=1e-5) and r2 > 0.999999
    alpha, scale, _ = analyze.fit_tanh(x, np.tanh(2.5 * x), free_scale=False)
    assert alpha == pytest.approx(2.5, rel=1e-5) and scale == 1.0


def test_cka_of_a_model_with_itself_is_one(runs):
    model, kind, state = analyze.load_model(str(runs / "vit_dyt"))
    x, _ = analyze.analysis_batch(kind, state, 16, str(runs / "idx"))
    feats = analyze.block_outputs(model, x)
    for _, f in feats:
        assert analyze.linear_cka(f, f) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Hooks leave no trace


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


@pytest.mark.parametrize("name", ["vit_ln", "vit_dyt", "gpt_dyt"])
def test_hooks_leave_the_model_unchanged(runs, name):
    model, kind, state = analyze.load_model(str(runs / name))
    x, y = analyze.analysis_batch(kind, state, 8, str(runs / "idx") if kind == "vit" else "")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x) if kind == "vit" else model(x)[0]
    layers = analyze.norm_layers(model)
    assert hook_count(model) == 0 and len(layers) >= 3
    analyze.capture_norm_io(model, layers, x)
    analyze.block_outputs(model, x)
    analyze.gradient_ratios(model, kind, x, y)
    analyze.dyt_readout_now(model, x)
    stats = analyze.input_stats(model, layers, x)
    masks = analyze.channel_masks(layers, stats, 0)
    for what, amount in (("noise", 1.0), ("scale", 100.0), ("bias", 2.0)):
        with analyze.perturbed(model, layers, what, amount, stats, masks, 0):
            with torch.no_grad():
                changed = model(x) if kind == "vit" else model(x)[0]
        assert not torch.equal(changed, before), what  # the hooks did act
    with pytest.raises(RuntimeError):  # an error inside still removes the hooks
        with analyze.perturbed(model, layers, "scale", 2.0, stats, masks, 0):
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    with torch.no_grad():
        after = model(x) if kind == "vit" else model(x)[0]
    assert torch.equal(before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


# ---------------------------------------------------------------------------------------------
# Every subcommand end to end


def test_s_curves(runs, tmp_path):
    rows = analyze.main(["s_curves", "--ckpt", str(runs / "vit_ln"), "--data_dir", str(runs / "idx"),
                         "--n", "16", "--fit_points", "5000", "--results", str(tmp_path)])
    outputs(tmp_path, "s_curves_vit_ln")
    assert [r["layer"] for r in rows] == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                          "blocks.1.norm2", "norm"]
    assert all(r["alpha_fit"] > 0 and 0 < r["r2"] <= 1 for r in rows)
    # on DyT layers the fit recovers each layer's own alpha: a check of the whole pipeline
    rows = analyze.main(["s_curves", "--ckpt", str(runs / "vit_dyt"), "--data_dir", str(runs / "idx"),
                         "--n", "8", "--fit_points", "5000", "--layers", "0,norm",
                         "--results", str(tmp_path)])
    assert len(rows) == 2
    for r in rows:
        assert r["alpha_fit"] == pytest.approx(r["alpha_learnt"], rel=1e-4)
    analyze.main(["s_curves", "--ckpt", str(runs / "gpt_dyt"), "--n", "2", "--fit_points", "2000",
                  "--results", str(tmp_path)])
    outputs(tmp_path, "s_curves_gpt_dyt")


def test_alpha_std(runs, tmp_path):
    rows, summary = analyze.main(["alpha_std", "--run", str(runs / "vit_dyt"), "--run",
                                  str(runs / "gpt_dyt"), "--data_dir", str(runs / "idx"), "--n", "8",
                                  "--results", str(tmp_path)])
    outputs(tmp_path, "alpha_std_vit_dyt_gpt_dyt", ("", "_summary"))
    vit = [r for r in rows if r["run"] == "vit_dyt"]
    assert len(vit) == 5 and all(r["readouts"] == 4 for r in vit)  # steps 4, 8, 12 + final eval
    assert all(r["inv_std_end"] > 0 for r in rows)
    assert len(summary) == 2


def test_ablations_and_alpha0(runs, tmp_path):
    sweep = ["--steps", "2", "--train_args", "--dim 16 --depth 1 --heads 2 --batch_size 16 --eval_batch 100",
             "--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path)]
    rows = analyze.main(["ablations", "--norms", "ln,dyt,dyt_identity,dyt_channel",
                         "--data_dir", str(runs / "idx")] + sweep)
    outputs(tmp_path, "ablations")
    assert [r["norm"] for r in rows] == ["ln", "dyt", "dyt_identity", "dyt_channel"]
    assert all(r["steps"] == 2 and 0 <= r["test_top1"] <= 1 for r in rows if r["status"] == "ok")
    rows = analyze.main(["alpha0", "--model", "vit", "--alpha0", "0.5,2", "--data_dir", str(runs / "idx")]
                        + sweep + ["--reuse"])
    outputs(tmp_path, "alpha0_vit")
    assert [r["alpha0"] for r in rows] == [0.5, 2.0]
    rows = analyze.main(["alpha0", "--model", "gpt", "--alpha0_attn", "0.5,2", "--alpha0_other", "1",
                         "--steps", "2", "--train_args", " ".join(GPT_TINY),
                         "--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path)])
    outputs(tmp_path, "alpha0_gpt")
    assert len(rows) == 2 and all(np.isfinite(r["val_loss"]) for r in rows)


def test_diverged_runs_are_marked(tmp_path):
    class Exploding:
        @staticmethod
        def main(argv):
            log = RunLogger(argv[argv.index("--out_dir") + 1])
            log.log({"step": 1, "loss": 2.3})
            log.log({"step": 2, "loss": float("nan")})
            raise tc.TrainingDiverged("loss is nan at step 2: training diverged")
    result = analyze.train_one(Exploding, [], str(tmp_path))
    assert result["status"].startswith("diverged") and "test_top1" not in result
    assert analyze.train_one(None, [], str(tmp_path), reuse=True) == result  # read back


def test_robustness_and_representations(runs, tmp_path):
    ckpts = ["--ckpt", str(runs / "vit_ln"), "--ckpt", str(runs / "vit_dyt"), "--data_dir",
             str(runs / "idx"), "--results", str(tmp_path)]
    # the paper's protocol: one layer at a time, the first norm of a shallow and a deep block
    rows = analyze.main(["robustness", "--n", "100"] + ckpts)
    outputs(tmp_path, "robustness_vit_ln_vs_vit_dyt")
    assert [r["perturbation"] for r in rows][:3] == ["clean", "noise (replace, 1 std)", "scale x0.5"]
    assert [r["layer"] for r in rows] == ["blocks.0.norm1"] * 8 + ["blocks.1.norm1"] * 8
    assert rows[0]["vit_ln drop"] == 0 and len(rows) == 16
    assert "one norm layer at a time" in (tmp_path / "robustness_vit_ln_vs_vit_dyt.md").read_text()
    rows = analyze.main(["robustness", "--n", "100", "--protocol", "all_layers", "--tag", "all"] + ckpts)
    assert len(rows) == 8 and {r["layer"] for r in rows} == {"all"} and rows[1]["perturbation"].startswith("noise (add")
    assert "not the paper's" in (tmp_path / "robustness_all.md").read_text()
    rows, cka, grads = analyze.main(["representations", "--n", "16", "--grad_n", "8"] + ckpts)
    outputs(tmp_path, "representations_vit_ln_vs_vit_dyt", ("_erank", "_grad", "_cka"))
    assert cka.shape == (2, 2) and ((0 <= cka) & (cka <= 1 + 1e-9)).all()
    assert set(grads) == {"vit_ln", "vit_dyt"} and all(len(g) == 5 for g in grads.values())
    assert all(1 <= r["effective_rank"] <= 32 and 1 <= r["effective_rank_sv"] <= 32 for r in rows)
    analyze.main(["representations", "--ckpt", str(runs / "gpt_dyt"), "--n", "2", "--grad_n", "2",
                  "--results", str(tmp_path)])
    outputs(tmp_path, "representations_gpt_dyt", ("_erank", "_grad", "_cka"))


def test_paper_protocol_replaces_one_layers_channels(runs):
    """The paper's noise replaces the chosen channels of ONE layer's input: that layer sees
    noise there and its clean input elsewhere, and no other layer's input changes."""
    model, kind, state = analyze.load_model(str(runs / "vit_ln"))
    x, _ = analyze.analysis_batch(kind, state, 8, str(runs / "idx"))
    layers = analyze.norm_layers(model)
    target = analyze.paper_layers(model, layers)[0]
    stats = analyze.input_stats(model, layers, x)
    masks = analyze.channel_masks(layers, stats, 0)
    clean = analyze.capture_norm_io(model, layers, x)
    with analyze.perturbed(model, [target], "replace", 1.0, stats, masks, 0):
        seen = analyze.capture_norm_io(model, layers, x)
    m = masks[target.name]
    assert torch.equal(seen[target.name][0][..., ~m], clean[target.name][0][..., ~m])
    noise = seen[target.name][0][..., m]
    assert not torch.equal(noise, clean[target.name][0][..., m])
    assert noise.mean().abs() < 0.2 * stats[target.name][0]
    assert noise.std().item() == pytest.approx(stats[target.name][0], rel=0.15)
    before = [l.name for l in layers[:layers.index(target)]]
    for name in before:  # upstream of the target: untouched
        assert torch.equal(seen[name][0], clean[name][0]), name


def test_tables_without_matplotlib(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(analyze, "pyplot", lambda: None)
    analyze.main(["robustness", "--n", "50", "--ckpt", str(runs / "vit_dyt"), "--layers", "norm",
                  "--data_dir", str(runs / "idx"), "--results", str(tmp_path)])
    assert (tmp_path / "robustness_vit_dyt.md").exists()
    assert not (tmp_path / "robustness_vit_dyt.png").exists()


def test_moved_studies_name_their_new_command(capsys):
    with pytest.raises(SystemExit) as e:
        tc.main_guard(analyze.main, ["norms", "--widths", "64"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: `analyze.py norms` moved") and "studies/gpt_norms.py norms" in err


def test_bad_input_is_one_line(runs, tmp_path):
    script = os.path.join(ROOT, "analyze.py")
    for args in (["nope"], ["s_curves"], ["s_curves", "--ckpt", str(tmp_path / "missing")],
                 ["alpha0", "--alpha0", "x,1"]):
        p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, p.stderr)
    with pytest.raises(tc.UserError, match="no norm layer"):
        analyze.main(["s_curves", "--ckpt", str(runs / "vit_ln"), "--data_dir", str(runs / "idx"),
                      "--layers", "blocks.9.norm1", "--results", str(tmp_path)])
    with pytest.raises(tc.UserError, match="alpha/"):
        analyze.main(["alpha_std", "--run", str(runs / "vit_ln"), "--results", str(tmp_path)])
    # one vocabulary: the ablations take --norm names, and the old spellings name the new
    for old, new in (("tanh", "'dyt'"), ("identity", "'dyt_identity'")):
        with pytest.raises(tc.UserError, match=f"is called {new} now"):
            analyze.main(["ablations", "--norms", f"ln,{old}", "--results", str(tmp_path)])


def test_training_sweeps_write_under_their_tag(tmp_path, monkeypatch):
    # --tag names the files: a tagged sweep into results/analysis must not replace the untagged one
    monkeypatch.setattr(analyze, "train_one", lambda trainer, argv, out_dir, reuse=False:
                        {"status": "ok", "steps": 1, "test_top1": 0.5, "val_loss": 1.0})
    analyze.main(["ablations", "--norms", "ln,dyt", "--tag", "_mine", "--results", str(tmp_path)])
    analyze.main(["alpha0", "--alpha0", "0.5", "--tag", "_mine", "--results", str(tmp_path)])
    analyze.main(["alpha0", "--model", "gpt", "--alpha0_attn", "1", "--alpha0_other", "1", "--tag", "_mine",
                  "--results", str(tmp_path)])
    names = {p.name.split(".")[0] for p in tmp_path.iterdir()}
    assert names == {"ablations_mine", "alpha0_vit_mine", "alpha0_gpt_mine"}, names


def test_curves_of_runs_and_groups(runs, tmp_path, capsys):
    """Two runs as curves, the pair as a group (mean with a min-max band), a table at chosen
    points; a run without logs is named and left out."""
    vit_ln, vit_dyt = str(runs / "vit_ln"), str(runs / "vit_dyt")
    rows, no_logs = analyze.main(["curves", "--run", vit_ln, "--run", vit_dyt, "--run", str(tmp_path / "gone"),
                                  "--group", f"both={vit_ln},{vit_dyt}", "--at", "6,12",
                                  "--results", str(tmp_path)])
    outputs(tmp_path, "curves")
    assert no_logs == [str(tmp_path / "gone")] and "has no metrics.jsonl" in capsys.readouterr().out
    by = {r["run"]: r for r in rows}
    assert set(by) == {"vit_ln", "vit_dyt", "both"} and by["both"]["runs"] == 2
    logged = {r["step"]: r["loss"] for r in analyze.read_log(vit_ln) if "loss" in r}
    assert by["vit_ln"]["loss @ 6"] == round(logged[6], 4)
    assert by["both"]["loss @ 12"] == pytest.approx((by["vit_ln"]["loss @ 12"] + by["vit_dyt"]["loss @ 12"]) / 2, abs=1e-4)
    assert "test_top1 @ 12" in by["vit_ln"]
    rows, _ = analyze.main(["curves", "--run", str(runs / "gpt_dyt"), "--x", "tokens", "--results", str(tmp_path),
                            "--tag", "_gpt"])
    assert any(k.startswith("val_loss @ ") for k in rows[0])
    with pytest.raises(tc.UserError, match="logs no tokens"):
        analyze.main(["curves", "--run", vit_ln, "--x", "tokens", "--results", str(tmp_path)])
    with pytest.raises(tc.UserError, match="none of the runs has a metrics.jsonl"):
        analyze.main(["curves", "--run", str(tmp_path / "gone"), "--results", str(tmp_path)])
