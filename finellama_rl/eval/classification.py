"""Binary classification figures of a reward model on held-out examples: accuracy at a
threshold, precision, recall, F1, AUROC, and the majority-class baseline to read them
against. Pure Python (no sklearn); used by trainers/rm.py.

    binary_metrics([0.9, 0.2, 0.7], [1, 0, 0])["auroc"]   # 0.5
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def auroc(scores: Sequence[float], labels: Sequence[int]) -> Optional[float]:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties
    counting one half (Mann-Whitney U from average ranks). None without both classes."""
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if not pos or not neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks: List[float] = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average rank over each run of equal scores
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def binary_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> Dict[str, Optional[float]]:
    """Accuracy, precision, recall, F1 (predicted positive: score >= threshold), AUROC, counts."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pred = [1 if s >= threshold else 0 for s in scores]
    tp = sum(1 for p, y in zip(pred, labels) if p and y)
    fp = sum(1 for p, y in zip(pred, labels) if p and not y)
    fn = sum(1 for p, y in zip(pred, labels) if not p and y)
    n, positives = len(labels), sum(1 for y in labels if y)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    return {
        "n": n, "positives": positives, "threshold": threshold,
        "accuracy": sum(1 for p, y in zip(pred, labels) if p == y) / n if n else None,
        "precision": precision, "recall": recall, "f1": f1, "auroc": auroc(scores, labels),
        "majority_baseline": max(positives, n - positives) / n if n else None,
    }
