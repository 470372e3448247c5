"""Keyed sampling (finellama_rl/job/sampling.py, issue 20): what it costs and whether it
samples what it should.

  A. generate() time, plain sampling (transformers' warpers, softmax, multinomial) against
     keyed sampling (our warpers, hashed Gumbel noise, argmax; generate() runs greedy), on
     a 2-layer Qwen2 with the tiny vocabulary (512) and with Qwen2.5's (151,936): 16
     sequences x 32 new tokens, paired and interleaved, median ratio. The model costs
     little, so the difference is the sampler's.
  B. The sampler alone per token at rows x 151,936 (and, on CUDA, what a GPU pays).
  C. Independence: chi-square contingency p-values over 20 seeds (rows i and i+1, positions
     0 and 1, steps s and s+1, seeds s and s+100, the marginal) should look uniform (mean
     about 0.5, about 1 of 20 below 0.05).
  D. Dispersion of the token counts over 500 seeds against torch.rand's (subtle dependence
     between the rows of one seed shows here first).

    .venv/bin/python benchmarks/bench_sampling.py              # ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_sampling.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from finellama_rl.job.sampling import RowSampler, _vocab_hash, generate_keyed, gumbel_noise, position_keys, row_keys


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _clock(device):
    """CPU seconds of this (one-thread) process on CPU: steadier than wall time on a shared
    machine; wall time on a GPU."""
    return time.perf_counter() if torch.device(device).type == "cuda" else time.process_time()


def part_a(device, repeats):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    print(f"\nA. generate() 16 sequences x 32 new tokens, plain sampling vs keyed (T 0.7), 1 thread, "
          f"{'wall' if torch.device(device).type == 'cuda' else 'CPU'} seconds")
    for vocab in (512, 151936):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128,
                                             tie_word_embeddings=True)).eval().to(device)
        ids = torch.randint(5, vocab, (16, 24), device=device)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32, do_sample=True,
                  top_k=0, top_p=1.0, temperature=0.7, pad_token_id=0, eos_token_id=None)

        def run(keyed):
            _sync(device)
            t0 = _clock(device)
            with torch.no_grad():
                generate_keyed(model, row_keys(0, 1, range(16)), **kw) if keyed else model.generate(**kw)
            _sync(device)
            return _clock(device) - t0

        run(False), run(True)
        plain, keyed = [], []
        for i in range(repeats):
            for k in ((False, True) if i % 2 == 0 else (True, False)):
                (keyed if k else plain).append(run(k))
        ratios = [k / p for k, p in zip(keyed, plain)]
        print(f"   V={vocab:>6}: plain {statistics.median(plain):.3f} s, keyed {statistics.median(keyed):.3f} s, "
              f"keyed / plain {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}, n={repeats})")


def part_b(device, rows_list):
    print(f"\nB. per token at V = 151,936 on {device}: RowSampler (T 0.7) vs temperature + softmax + multinomial")
    for rows in rows_list:
        z = torch.randn(rows, 151936, device=device)
        ids = torch.zeros(rows, 4, dtype=torch.long, device=device)
        sampler = RowSampler(row_keys(0, 1, range(rows)), 0.7)

        def keyed(step):
            return sampler(ids if step == 0 else torch.zeros(rows, 4 + step, dtype=torch.long, device=device), z.clone())

        def plain(step):
            return torch.multinomial(torch.softmax(z.clone() / 0.7, -1), 1)

        out = {}
        for name, fn in (("keyed", keyed), ("plain", plain)):
            fn(0)
            _sync(device)
            t0 = _clock(device)
            for step in range(1, 17):
                fn(step)
            _sync(device)
            out[name] = (_clock(device) - t0) / 16 * 1e3
        print(f"   rows {rows:>3}: keyed {out['keyed']:.2f} ms/token, plain {out['plain']:.2f} ms/token")


def _chi2_sf(x, dof):
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)).item()


def _contingency_p(a, b, vocab):
    table = torch.zeros(vocab, vocab, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return _chi2_sf(((table - expected) ** 2 / expected).sum().item(), (vocab - 1) ** 2)


def part_c(seeds=20, vocab=8, n=200_000):
    print(f"\nC. independence of argmax draws ({n} rows, V={vocab}, flat logits): chi-square p-values over {seeds} seeds")
    vh = _vocab_hash(vocab, "cpu")

    def draw(seed, step, position):
        return gumbel_noise(position_keys(row_keys(seed, step, range(n)), [position]), vh)[:, 0].argmax(-1)

    ps = {"rows i x i+1": [], "positions 0 x 1": [], "steps s x s+1": [], "seeds s x s+100": [], "marginal": []}
    for s in range(seeds):
        g = draw(s, 1, 0)
        ps["rows i x i+1"].append(_contingency_p(g[:-1:2], g[1::2], vocab))
        ps["positions 0 x 1"].append(_contingency_p(g, draw(s, 1, 1), vocab))
        ps["steps s x s+1"].append(_contingency_p(g, draw(s, 2, 0), vocab))
        ps["seeds s x s+100"].append(_contingency_p(g, draw(s + 100, 1, 0), vocab))
        counts = torch.bincount(g, minlength=vocab).double()
        ps["marginal"].append(_chi2_sf(((counts - n / vocab) ** 2 / (n / vocab)).sum().item(), vocab - 1))
    for name, values in ps.items():
        print(f"   {name:>16}: mean p {statistics.fmean(values):.3f} (uniform: 0.5), min {min(values):.3f}, "
              f"below 0.05: {sum(v < 0.05 for v in values)} of {seeds}")


def part_d(seeds=500, vocab=8, n=200_000):
    """Over-dispersion: rows of one seed that share structure inflate the spread of the
    token counts across seeds; torch.rand's Gumbel draws are the reference."""
    print(f"\nD. dispersion of the token counts ({n} rows, V={vocab}) over {seeds} seeds: chi-square(7) has mean 7, "
          f"variance 14, 5% past 14.07")
    vh = _vocab_hash(vocab, "cpu")
    for name in ("keyed", "torch.rand"):
        chis = []
        for s in range(seeds):
            if name == "keyed":
                g = gumbel_noise(position_keys(row_keys(s, 1, range(n)), [0]), vh)[:, 0]
            else:
                g = -torch.log(-torch.log(torch.rand(n, vocab, generator=torch.Generator().manual_seed(s))))
            counts = torch.bincount(g.argmax(-1), minlength=vocab).double()
            chis.append((((counts - n / vocab) ** 2) / (n / vocab)).sum().item())
        print(f"   {name:>10}: mean {statistics.fmean(chis):.2f}, variance {statistics.variance(chis):.1f}, "
              f"past 14.07: {sum(c > 14.07 for c in chis)} of {seeds}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="ABCD")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"bench_sampling: {time.strftime('%Y-%m-%d %H:%M')}, {args.device}, load {os.getloadavg()[0]:.1f}")
    if "A" in args.parts:
        part_a(args.device, args.repeat)
    if "B" in args.parts:
        part_b(args.device, (1, 16, 64) if args.device == "cpu" else (16, 64, 128))
    if "C" in args.parts:
        part_c()
    if "D" in args.parts:
        part_d()
    return 0


if __name__ == "__main__":
    sys.exit(main())
