"""
After training, measured: how exact folding is, and what folding and the KV cache buy.

    python studies/inference.py --out results          # results/inference_<device>.md

Equivalence: fp32 logits before and after dyt.fold_norms for the GPT with every norm, the ViT
and a model converted by convert_to_dyt; the max absolute and relative difference. DyT issue
#5's linearised fold of alpha (tanh(alpha x) ~ alpha x, so alpha into the linear too) is
measured beside it, as the error it makes: it is not exact and fold_norms does not do it.

Speed: sampling tokens/s of the default GPT (train_gpt.py's shape) for --sample_tokens tokens
from a one-token prompt, with and without the KV cache and the fold; and evaluation tokens/s
(train_gpt.py eval's forward passes) with and without the fold. Paired rounds: every variant
once a round, the order rotated from round to round, the ratio to the plain variant taken
within each round; the median ratio and its quartiles are reported.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from dyt import NORMS, Dynamic, convert_to_dyt, fold_norms  # noqa: E402
from model import GPT, GPTConfig, ViT, ViTConfig  # noqa: E402
from train_gpt import GPTTrainConfig  # noqa: E402


def randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def differences(model, inputs, fold):
    with torch.no_grad():
        before = model(inputs)
        before = before[0] if isinstance(before, tuple) else before
        fold(model)
        after = model(inputs)
        after = after[0] if isinstance(after, tuple) else after
    return (after - before).abs().max().item(), ((after - before).norm() / before.norm()).item()


def linearised_alpha_fold(model):
    """DyT issue #5's proposal: treat tanh(alpha x) as alpha * tanh(x) and move alpha into the
    next linears with gamma. Only a measurement of its error."""
    fold_norms(model)
    consumers = model.norm_consumers()
    with torch.no_grad():
        for name, lins in consumers.items():
            layer = model.get_submodule(name)
            if isinstance(layer, Dynamic) and layer.alpha is not None:
                for lin in lins:
                    model.get_submodule(lin).weight.mul_(layer.alpha)
                layer.alpha.fill_(1.0)


def equivalence():
    rows = []
    gpt = lambda norm: randomise(GPT(GPTConfig(dim=128, n_layer=4, n_head=4, n_kv_head=4, block_size=256,
                                               vocab_size=256, norm=norm)))
    idx = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    for norm in NORMS:
        if norm == "identity":
            continue
        torch.manual_seed(0)
        rows.append(("GPT (default shape)", norm, "fold_norms", *differences(gpt(norm), idx, fold_norms)))
    for norm in ("ln", "dyt", "derf"):
        torch.manual_seed(0)
        vit = randomise(ViT(ViTConfig(img_size=28, patch_size=7, dim=64, depth=4, heads=4, in_chans=1,
                                      num_classes=10, norm=norm, pool="avg")))
        x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        rows.append(("ViT (default shape)", norm, "fold_norms", *differences(vit, x, fold_norms)))
    torch.manual_seed(0)
    converted, _ = convert_to_dyt(randomise(GPT(GPTConfig(dim=128, n_layer=4, n_head=4, n_kv_head=4,
                                                          block_size=256, vocab_size=256, norm="rms"))), 0.7)
    rows.append(("RMSNorm GPT through convert_to_dyt", "dyt", "fold_norms",
                 *differences(randomise(converted), idx, fold_norms)))
    for norm in ("dyt",):
        torch.manual_seed(0)
        model = gpt(norm)
        with torch.no_grad():
            for n, m in model.named_modules():
                if isinstance(m, Dynamic):
                    m.alpha.fill_(0.5)  # alpha as a trained model might have it, not 1
        rows.append(("GPT (default shape)", norm, "linearised alpha fold (DyT issue #5)",
                     *differences(model, idx, linearised_alpha_fold)))
    return rows


def default_gpt(norm, seed=0):
    cfg = GPTTrainConfig().model
    torch.manual_seed(seed)
    return randomise(GPT(GPTConfig(**{**cfg.__dict__, "vocab_size": 256, "norm": norm})))


def paired_rounds(variants, rounds):
    """{name: [seconds per round]}: every variant once a round, the order rotated."""
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratios(times, base):
    out = {}
    for name, ts in times.items():
        rs = sorted(b / t for b, t in zip(times[base], ts))  # > 1: faster than the base
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
        out[name] = (statistics.median(rs), q[0], q[2], statistics.median(ts))
    return out


def speed(norm, sample_tokens, eval_batches, rounds):
    plain, folded = default_gpt(norm), default_gpt(norm)
    fold_norms(folded)
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def sampler(model, cache):
        def go():
            torch.manual_seed(0)
            model.generate(prompt, sample_tokens, temperature=0.8, top_k=40, cache=cache)
        return go
    sampling = paired_rounds({"no cache": sampler(plain, False), "KV cache": sampler(plain, True),
                              "KV cache + fold": sampler(folded, True)}, rounds)
    x = torch.randint(0, 256, (16, 256), generator=torch.Generator().manual_seed(1))

    def evaluator(model):
        def go():
            with torch.no_grad():
                for _ in range(eval_batches):
                    model(x, x)
        return go
    evaluation = paired_rounds({"plain": evaluator(plain), "fold": evaluator(folded)}, rounds)
    return ratios(sampling, "no cache"), ratios(evaluation, "plain"), x.numel() * eval_batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    p.add_argument("--out", default=os.path.join("out", "inference"), help="where the Markdown goes "
                   "(the committed one: --out results)")
    p.add_argument("--norms", default="dyt,rms")
    p.add_argument("--sample_tokens", default="200,600", help="sample lengths (the default GPT's "
                   "block is 256: past it the window slides and each step runs the whole window)")
    p.add_argument("--eval_batches", type=int, default=4, help="batches of 16 x 256 tokens a round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    lines = ["# Inference: folding and the KV cache, measured", "",
             f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {a.threads} thread(s)), "
             f"torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Command: `python studies/inference.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
             f"Load average while running: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.", "",
             "## Folding is exact (fp32 logits before and after)", "",
             "| model | norm | fold | max abs diff | relative diff (norm) |", "|---|---|---|---|---|"]
    for model, norm, how, mx, rel in equivalence():
        lines.append(f"| {model} | {norm} | {how} | {mx:.2e} | {rel:.2e} |")
        print(lines[-1], flush=True)
    lines += ["", f"## Speed, paired rounds ({a.rounds}, order rotated): speedup over the plain variant, "
              "median (quartiles), and the median seconds a round", "",
              "| norm | what | variant | speedup | seconds | tokens/s |", "|---|---|---|---|---|---|"]
    for norm in a.norms.split(","):
        results = []
        for n in (int(t) for t in a.sample_tokens.split(",")):
            sampling, evaluation, eval_tokens = speed(norm, n, a.eval_batches, a.rounds)
            results.append((f"sampling {n} tokens", sampling, n))
        results.append((f"eval {eval_tokens:,} tokens", evaluation, eval_tokens))
        for what, res, tokens in results:
            for name, (med, q1, q3, secs) in res.items():
                lines.append(f"| {norm} | {what} | {name} | {med:.2f}x ({q1:.2f}-{q3:.2f}) | {secs:.3f} | {tokens / secs:,.0f} |")
                print(lines[-1], flush=True)
    path = os.path.join(a.out, "inference_cpu.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
