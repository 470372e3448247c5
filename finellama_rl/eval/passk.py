"""pass@k from n sampled completions per problem, under strict and lenient extraction.

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

from finellama_rl.data import Problem
from finellama_rl.rewards.rules import extract_lenient, extract_strict, is_correct, reference_answer


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
                       batch_size: int, seed: int, desc: str = "samples") -> List[List[str]]:
    """`n` sampled completions per prompt (pure temperature sampling: top_p=1, top_k off).

    About `batch_size` sequences go through each generate call, i.e.
    max(1, batch_size // n) prompts, each expanded to n sequences.
    """
    import torch

    from finellama_rl.eval.generation import generate_batched

    torch.manual_seed(seed)
    texts = generate_batched(model, tokenizer, prompts, max(1, batch_size // n), desc, max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=n)
    return [texts[j * n : (j + 1) * n] for j in range(len(prompts))]  # the n samples of a prompt are adjacent


def score_samples(problems: Sequence[Problem], samples: Sequence[Sequence[str]], temperature: float, seed: int) -> Dict[str, Any]:
    """pass@k (mean over problems) for strict and lenient, plus per-problem counts.

    Returns {"summary": {...}, "per_problem": [{"samples": [...], "correct_strict": c, ...}]}.
    """
    n = len(samples[0]) if samples else 0
    ks = k_values(n) if n else []
    per_problem, totals = [], {"strict": [0.0] * len(ks), "lenient": [0.0] * len(ks)}
    for p, texts in zip(problems, samples):
        ref = reference_answer(p["answer"])
        c = {"strict": sum(is_correct(extract_strict(t), ref) for t in texts),
             "lenient": sum(is_correct(extract_lenient(t), ref) for t in texts)}
        for rule in totals:
            for j, k in enumerate(ks):
                totals[rule][j] += pass_at_k(n, c[rule], k)
        per_problem.append({"samples": list(texts), "correct_strict": c["strict"], "correct_lenient": c["lenient"]})
    m = max(1, len(per_problem))
    summary = {
        "samples": n, "temperature": temperature, "top_p": 1.0, "top_k": None, "seed": seed,
        "estimator": "unbiased, Chen et al. 2021: 1 - C(n-c,k)/C(n,k), mean over problems",
        "strict": {str(k): totals["strict"][j] / m for j, k in enumerate(ks)},
        "lenient": {str(k): totals["lenient"][j] / m for j, k in enumerate(ks)},
    }
    return {"summary": summary, "per_problem": per_problem}


def add_pass_at_k(result: Dict[str, Any], scored: Dict[str, Any]) -> Dict[str, Any]:
    """Attach pass@k to a greedy `score()` result: summary at the top, samples per record."""
    result["pass_at_k"] = scored["summary"]
    for record, extra in zip(result["records"], scored["per_problem"]):
        record.update({"samples": extra["samples"], "samples_correct_strict": extra["correct_strict"],
                       "samples_correct_lenient": extra["correct_lenient"]})
    return result


def format_pass_at_k(summary: Dict[str, Any]) -> str:
    k = str(summary["samples"])
    return f"pass@{k} strict {summary['strict'][k]:.1%}, lenient {summary['lenient'][k]:.1%} (T={summary['temperature']})"
