"""pass@k from n sampled completions per problem, under every scorer (the protocol's primary first).

Why: greedy accuracy says what the model answers; pass@k says whether a right
answer is within reach in k tries, which is what RL with sampled groups (GRPO)
can turn into greedy accuracy. We use the unbiased estimator of Chen et al. 2021
("Evaluating Large Language Models Trained on Code"): with n samples of which c
are correct, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems, computed
as a product so that it never forms huge binomials.

    python -m finellama_rl.evaluate run=results/<sweep>/<run> eval.samples=8 eval.sample_temperature=0.7
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from finellama_rl.task.scoring import ALL_SCORERS, Scorer, cut_at_stop, judge_all

Problem = Dict[str, str]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def k_values(n: int) -> List[int]:
    """The k we report for n samples: 1, 2, 4, ... below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def sample_completions(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float,
                       batch_size: int, seed: int, stops: Sequence[str] = (), desc: str = "samples"):
    """`n` sampled completions per prompt (pure temperature sampling: top_p=1, top_k off),
    cut at `stops`. About `batch_size` sequences per generate call: max(1, batch_size // n)
    prompts, each expanded to n sequences. Returns (texts per prompt, Generated, Decoding)."""
    from finellama_rl.eval.generation import Decoding, generate_completions

    decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                        num_return_sequences=n, seed=seed)
    gen = generate_completions(model, tokenizer, prompts, decoding, stops, batch_size, desc)
    texts = [c.text for c in gen.completions]
    return [texts[j * n : (j + 1) * n] for j in range(len(prompts))], gen, decoding  # a prompt's n samples are adjacent


def score_samples(problems: Sequence[Problem], samples: Sequence[Sequence[str]], temperature: float, seed: int,
                  primary: Scorer = Scorer.strict, stops: Sequence[str] = ()) -> Dict[str, Any]:
    """pass@k (mean over problems) under every scorer, plus per-problem counts.

    Returns {"summary": {samples, temperature, ..., "primary", "<scorer>": {"1": p, ..., "n": p}},
    "per_problem": [{"samples": [...], "correct": {scorer: c}}]}."""
    n = len(samples[0]) if samples else 0
    ks = k_values(n) if n else []
    names = [s.value for s in ALL_SCORERS]
    per_problem, totals = [], {s: [0.0] * len(ks) for s in names}
    for p, texts in zip(problems, samples):
        texts = [cut_at_stop(t, stops)[0] for t in texts]
        verdicts = [judge_all(t, p["answer"]) for t in texts]
        c = {s: sum(v[s].correct for v in verdicts) for s in names}
        for s in names:
            for j, k in enumerate(ks):
                totals[s][j] += pass_at_k(n, c[s], k)
        per_problem.append({"samples": list(texts), "correct": c})
    m = max(1, len(per_problem))
    summary = {
        "samples": n, "temperature": temperature, "top_p": 1.0, "top_k": None, "seed": seed, "primary": Scorer(primary).value,
        "estimator": "unbiased, Chen et al. 2021: 1 - C(n-c,k)/C(n,k), mean over problems",
        **{s: {str(k): totals[s][j] / m for j, k in enumerate(ks)} for s in names},
    }
    return {"summary": summary, "per_problem": per_problem}


def add_pass_at_k(result: Dict[str, Any], scored: Dict[str, Any]) -> Dict[str, Any]:
    """Attach pass@k to a greedy `score()` result: summary at the top, samples per record."""
    result["pass_at_k"] = scored["summary"]
    for record, extra in zip(result["records"], scored["per_problem"]):
        record.update({"samples": extra["samples"], "samples_correct": extra["correct"]})
    return result


def add_sampled_pass_at_k(result: Dict[str, Any], model, tokenizer, setup, samples: int, temperature: float, seed: int,
                          desc: str = "samples") -> Dict[str, Any]:
    """Sample `samples` completions per problem of an EvalSetup and attach pass@1..k to a
    greedy evaluate_model() result (the evaluate command and training-time evaluations)."""
    texts, gen, decoding = sample_completions(model, tokenizer, setup.prompts, samples, setup.decoding.max_new_tokens,
                                              temperature, setup.batch_size, seed, setup.stops, desc=desc)
    add_pass_at_k(result, score_samples(setup.problems, texts, temperature, seed, setup.fmt.spec.primary, setup.stops))
    result["pass_at_k"]["decoding"] = decoding.record()
    result["pass_at_k"]["problems_per_s"] = round(gen.problems_per_s, 3)
    return result


def format_pass_at_k(summary: Dict[str, Any]) -> str:
    k, primary = str(summary["samples"]), summary.get("primary", "strict")
    others = "".join(f", {s} {summary[s][k]:.1%}" for s in ("strict", "lenient") if s != primary and s in summary)
    return f"pass@{k} {primary} {summary[primary][k]:.1%}{others} (T={summary['temperature']})"
