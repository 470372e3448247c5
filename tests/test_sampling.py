"""Keyed sampling (finellama_rl/job/sampling.py): what a sequence samples depends on (seed,
step, its index, the token position) only, never on the batch it was generated in, and it
is exactly softmax of the warped logits (Gumbel-max)."""
from __future__ import annotations

import pytest
import torch

from finellama_rl.job.sampling import (RowSampler, _vocab_hash, generate_keyed, gumbel_noise, keyed_generate,
                                       position_keys, row_keys)


@pytest.fixture(scope="module")
def model():
    """A random Qwen2 with untied embeddings (init std 0.1: varied text at temperature 0.7)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False,
                                        initializer_range=0.1, eos_token_id=1, pad_token_id=0)).eval()


def _prompts(n: int, seed: int = 1):
    """Left-padded prompts of uneven lengths (n, 7) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 8, (n,), generator=g)
    ids = torch.randint(2, 96, (n, 7), generator=g)
    mask = (torch.arange(7).unsqueeze(0) >= 7 - lengths.unsqueeze(1)).long()
    return ids * mask, mask


SAMPLE = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=10, pad_token_id=0, eos_token_id=1)


def test_a_batch_of_16_samples_what_16_batches_of_1_sample():
    z = torch.randn(16, 512)
    keys = row_keys(0, 3, range(100, 116))
    ids = torch.zeros(16, 5, dtype=torch.long)
    full = RowSampler(keys)(ids, z.clone()).argmax(-1)
    single = torch.cat([RowSampler(keys[i:i + 1])(ids[:1], z[i:i + 1].clone()).argmax(-1) for i in range(16)])
    assert torch.equal(full, single) and len(set(full.tolist())) > 8


def test_keys_differ_by_seed_step_index_and_stream():
    keys = [row_keys(1, 2, [3])[0], row_keys(2, 2, [3])[0], row_keys(1, 3, [3])[0], row_keys(1, 2, [4])[0],
            row_keys(1, 2, [3], stream=1)[0], row_keys(1 << 32 | 1, 2, [3])[0], row_keys(-1, 2, [3])[0]]
    assert len(set(keys)) == len(keys) and row_keys(1, 2, [3]) == row_keys(1, 2, [3])
    per_position = position_keys(keys[:2], range(4))
    assert per_position.shape == (2, 4) and len(set(per_position.flatten().tolist())) == 8


def test_argmax_counts_follow_chi_square_across_seeds():
    """Across seeds, the chi-square of the token counts of 100,000 flat-logit draws follows
    chi-square(7) (mean 7, about 5% past 14.07). A broken hash fails this at once; the
    subtle over-dispersion of a weaker key chain (8% past over 500 seeds) needs
    benchmarks/bench_sampling.py's 500 seeds to show."""
    vocab, n, seeds = 8, 100_000, 60
    vh = _vocab_hash(vocab, "cpu")
    chis = []
    for seed in range(seeds):
        draws = gumbel_noise(position_keys(row_keys(seed, 1, range(n)), [0]), vh)[:, 0].argmax(-1)
        counts = torch.bincount(draws, minlength=vocab).double()
        chis.append((((counts - n / vocab) ** 2) / (n / vocab)).sum().item())
    chis = torch.tensor(chis)
    assert 6.0 < chis.mean().item() < 8.2 and (chis > 14.07).sum().item() <= 8, chis


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 6, 1.0)])
def test_draws_follow_the_warped_softmax(temperature, top_k, top_p):
    """Chi-square of 100,000 keyed draws from fixed logits against transformers' own warpers."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    V, N = 20, 100_000
    z = torch.randn(V) * 2
    out = RowSampler(row_keys(5, 1, range(N)), temperature, top_k, top_p)(torch.zeros(N, 3, dtype=torch.long),
                                                                          z.expand(N, V).clone())
    assert torch.isfinite(out).sum(-1).eq(1).all() and out.max(-1).values.eq(0).all()  # one-hot rows
    warped = TemperatureLogitsWarper(temperature)(None, z.unsqueeze(0))
    warped = TopKLogitsWarper(top_k)(None, warped) if top_k else warped
    warped = TopPLogitsWarper(top_p)(None, warped) if top_p < 1 else warped
    p = torch.softmax(warped, -1)[0].double()
    counts = torch.bincount(out.argmax(-1), minlength=V).double()
    assert counts[p == 0].sum() == 0  # nothing outside top-k / the nucleus
    keep = p > 0
    chi2 = ((counts[keep] - N * p[keep]) ** 2 / (N * p[keep])).sum().item()
    assert chi2 / (int(keep.sum()) - 1) < 3.0, chi2  # about 1 expected; a wrong distribution gives hundreds


def test_gumbel_noise_has_the_gumbel_moments():
    g = gumbel_noise(position_keys(row_keys(9, 9, range(500)), [3]), _vocab_hash(1000, "cpu"))
    assert g.shape == (500, 1, 1000)
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - 1.6449) < 0.03
    assert -2.9 < g.min().item() and g.max().item() < 16.7  # the 23-bit uniform's range


def test_noise_blocks_of_positions_equal_one_position_at_a_time(monkeypatch):
    import finellama_rl.job.sampling as sampling

    z, keys = torch.randn(3, 40), row_keys(2, 2, range(3))
    picks = {}
    for span in (1 << 16, 1):
        monkeypatch.setattr(sampling, "SPAN_ELEMENTS", span)
        sampler = RowSampler(keys)
        picks[span] = [sampler(torch.zeros(3, 4 + t, dtype=torch.long), z.clone()).argmax(-1) for t in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(picks[1 << 16], picks[1]))


def test_generated_completions_do_not_depend_on_the_batch(model):
    """Six prompts of uneven lengths: one call, calls of 4 + 2, and one call per prompt
    sample the same completions (left padding differs in each); the global RNG is untouched."""
    ids, mask = _prompts(6)
    keys = row_keys(0, 7, range(6))
    rng = torch.random.get_rng_state()
    with torch.no_grad():
        whole = generate_keyed(model, keys, input_ids=ids, attention_mask=mask, **SAMPLE)[:, 7:]
        pieces = []
        for rows in ([0, 1, 2, 3], [4, 5]) + tuple([i] for i in range(6)):
            sub_ids, sub_mask = ids[rows], mask[rows]
            width = int(sub_mask.sum(-1).max())  # trimmed to the chunk's own longest prompt
            out = generate_keyed(model, [keys[i] for i in rows], input_ids=sub_ids[:, 7 - width:],
                                 attention_mask=sub_mask[:, 7 - width:], **SAMPLE)
            pieces.append(out[:, width:])
    assert torch.equal(torch.random.get_rng_state(), rng)
    texts = [row[:10].tolist() for row in whole]
    assert len({tuple(t) for t in texts}) == 6, "the test needs distinct completions"

    def rows_of(t):
        return [row.tolist() + [0] * (10 - len(row)) for row in t]
    assert rows_of(pieces[0]) + rows_of(pieces[1]) == texts
    assert sum((rows_of(p) for p in pieces[2:]), []) == texts


def test_num_return_sequences_are_keyed_rows(model):
    ids, mask = _prompts(2)
    keys = row_keys(3, 0, range(6), stream=1)
    with torch.no_grad():
        grouped = generate_keyed(model, keys, input_ids=ids, attention_mask=mask, num_return_sequences=3, **SAMPLE)
        repeated = generate_keyed(model, keys, input_ids=ids.repeat_interleave(3, 0),
                                  attention_mask=mask.repeat_interleave(3, 0), **SAMPLE)
    assert grouped.shape[0] == 6 and torch.equal(grouped, repeated)
    assert not torch.equal(grouped[0], grouped[1])  # a prompt's samples differ


def test_greedy_calls_pass_through_and_other_warpers_are_refused(model):
    ids, mask = _prompts(2)
    with torch.no_grad():
        greedy = generate_keyed(model, [1, 2], input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5)
        plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5)
    assert torch.equal(greedy, plain)
    with pytest.raises(ValueError, match="typical_p"):
        generate_keyed(model, [1, 2], input_ids=ids, attention_mask=mask, **{**SAMPLE, "typical_p": 0.9})


def test_keyed_generate_shadows_generate_and_restores_it(model):
    """What TRL's GRPO path uses: generate(generation_config=...) from someone else's code."""
    from transformers import GenerationConfig

    ids, mask = _prompts(2)
    config = GenerationConfig(**SAMPLE)
    with torch.no_grad():
        direct = generate_keyed(model, [5, 6], input_ids=ids, attention_mask=mask, **SAMPLE)
        with keyed_generate(model, [5, 6]) as seen:
            shadowed = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert seen.calls == 1 and torch.equal(direct, shadowed)
    assert "generate" not in vars(model) and config.do_sample  # the caller's config is not changed


def test_an_eos_bias_shortens_completions(model):
    ids, mask = _prompts(6)
    keys = row_keys(0, 1, range(6))
    with torch.no_grad():
        plain = generate_keyed(model, keys, input_ids=ids, attention_mask=mask, **SAMPLE)[:, 7:]
        biased = generate_keyed(model, keys, {1: 4.0}, input_ids=ids, attention_mask=mask, **SAMPLE)[:, 7:]
    assert (biased == 1).sum() > (plain == 1).sum()
