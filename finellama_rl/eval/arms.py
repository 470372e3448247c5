"""Arms of a sweep: runs whose configs differ only by seed form one arm (e.g. `-m trainer=ppo,grpo
trainer.seed=0,1,2` gives two arms of three seeds), and the report's two seed tables: each arm
across its seeds (mean accuracy with a hierarchical-bootstrap 95% interval, min-max, std) and
every two arms compared on their pooled common problems (difference with its interval, the
probability that one beats the other). The statistics are eval/bootstrap.py's.

What "differ only by seed" means: the run's config.yaml, flattened, with these keys left out:
trainer.seed, the run section (name, folder, sweep, results folder, resume), ladder.start_rung
(the rung launch picked), and launch-only or bookkeeping keys (dry_run, launcher, site, tracking).
Everything else (model, trainer, data, evaluation protocol, hardware) must be equal.

Used by the sweep report (eval/sweep_report.py). Pure: numpy through eval/bootstrap.py, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from finellama_rl.eval.bootstrap import ArmEstimate, compare_arms, estimate_arm

IGNORED_KEYS = ("trainer.seed", "ladder.start_rung", "dry_run", "launcher", "site", "tracking")
IGNORED_SECTIONS = ("run.",)
LABEL_FIRST = ("trainer.algo", "model.name", "hardware.name", "data.source", "eval.protocol", "model.adapter")
ARM_HEADERS = ["arm", "seeds", "runs", "protocol", "common n", "mean %", "95% CI (seeds × problems)", "min–max %",
               "std (pp)", "per seed %"]
ARM_PAIR_HEADERS = ["arm A", "arm B", "protocol", "pooled n", "A %", "B %", "Δ B−A (pp)", "Δ 95% CI", "P(B > A)",
                    "P 95% CI", "verdict"]


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def identity(config: Dict[str, Any]) -> Dict[str, str]:
    """The keys that define an arm: the flattened config without seed, run and launch bookkeeping."""
    return {k: repr(v) for k, v in flatten(config).items()
            if k not in IGNORED_KEYS and not k.startswith(IGNORED_SECTIONS)}


@dataclass
class Arm:
    label: str
    runs: List[Any]  # RunSummary objects (eval/sweep_report.py), in seed order
    identity: Dict[str, str] = field(default_factory=dict)


def label_keys(idents: Sequence[Dict[str, str]]) -> List[str]:
    """Few keys that tell the arms apart: the group choices first (LABEL_FIRST), then whichever key
    splits the most arms still alike, each kept only if it splits some; a key that only follows
    another (trainer=ppo brings its own learning rate) is never shown."""
    varying = sorted({k for d in idents for k in d if len({d.get(k) for d in idents}) > 1})
    chosen: List[str] = []

    def groups(keys: Sequence[str]) -> int:
        return len({tuple(d.get(k) for k in keys) for d in idents})

    for key in [k for k in LABEL_FIRST if k in varying]:
        if groups([*chosen, key]) > groups(chosen):
            chosen.append(key)
    rest = [k for k in varying if k not in chosen]
    while groups(chosen) < len(idents) and rest:
        best = max(rest, key=lambda k: (groups([*chosen, k]), -rest.index(k)))
        if groups([*chosen, best]) == groups(chosen):
            break
        chosen.append(best)
        rest.remove(best)
    return chosen


def group_arms(runs: Sequence[Any]) -> List[Arm]:
    """Runs with a config grouped into arms, labelled by the keys that tell the arms apart."""
    groups: Dict[Tuple[Tuple[str, str], ...], List[Any]] = {}
    for r in runs:
        if r.config:
            groups.setdefault(tuple(sorted(identity(r.config).items())), []).append(r)
    shown = label_keys([dict(k) for k in groups])
    arms = []
    for key, members in groups.items():
        ident = dict(key)
        label = " ".join(f"{k}={_plain(ident.get(k, '-'))}" for k in shown) or "all runs"
        members = sorted(members, key=_seed_order)
        arms.append(Arm(label, members, ident))
    return sorted(arms, key=lambda a: a.label)


def _plain(value: str) -> str:
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] == "'" else value


def problem_order(key: Tuple[Any, str]) -> Tuple[int, Any, str]:
    """Problems in split order (index 0, 1, 2, ..., 10), whatever the type of the index."""
    index, question = key
    return (0, index, question) if isinstance(index, int) and not isinstance(index, bool) else (1, str(index), question)


def _seed_order(run: Any) -> Tuple[int, Any, str]:
    seed = flatten(run.config).get("trainer.seed")
    return (0, seed, run.name) if isinstance(seed, int) else (1, str(seed), run.name)


def arm_matrix(arm: Arm, keys: Optional[Sequence[Tuple[Any, str]]] = None) -> Tuple[List[List[float]], List[Tuple[Any, str]]]:
    """(seeds x problems 0/1 rows, the problem keys): the final evaluations' verdicts on the problems
    every run of the arm evaluated (or on `keys`)."""
    finals = [r.final for r in arm.runs if r.final is not None and r.final.per_problem]
    if not finals:
        return [], []
    if keys is None:
        keys = sorted(set.intersection(*(set(f.per_problem) for f in finals)), key=problem_order)
    return [[float(f.per_problem[k]) for k in keys] for f in finals], list(keys)


def _protocol(arm: Arm) -> Optional[Tuple[str, str]]:
    keys = {r.final.key for r in arm.runs if r.final is not None}
    return next(iter(keys)) if len(keys) == 1 else None


def _why_not(arm: Arm) -> str:
    """Why an arm has no estimate (no protocol shared by its final evaluations, or no records)."""
    keys = {r.final.key for r in arm.runs if r.final is not None}
    if not keys:
        return "no final evaluation"
    return "protocols differ" if len(keys) > 1 else "no per-problem records"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(ci: Tuple[float, float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def arm_row(arm: Arm) -> Tuple[List[str], Optional[ArmEstimate]]:
    matrix, keys = arm_matrix(arm)
    protocol = _protocol(arm)
    names = ", ".join(r.name for r in arm.runs)
    if not matrix or not keys or protocol is None:
        return [arm.label, str(len(arm.runs)), names, "/".join(protocol or ("-",)), "-", "-", _why_not(arm), "-", "-",
                "-"], None
    est = estimate_arm(matrix)
    std = "-" if est.seeds < 2 else f"{100 * est.std:.1f}"
    return [arm.label, str(est.seeds), names, "/".join(protocol), str(est.problems), _pct(est.mean), _interval(est.ci),
            f"{_pct(est.spread[0])}–{_pct(est.spread[1])}", std, " ".join(_pct(v) for v in est.per_seed)], est


def arm_rows(arms: Sequence[Arm]) -> List[List[str]]:
    return [arm_row(a)[0] for a in arms]


def arm_pair_row(a: Arm, b: Arm) -> List[str]:
    """B against A under one protocol, paired on the problems every run of both evaluated."""
    pa, pb = _protocol(a), _protocol(b)
    if pa is None or pb is None or pa != pb:
        missing = a if pa is None else b
        why = "protocols differ" if pa and pb else f"{missing.label}: {_why_not(missing)}"
        return [a.label, b.label, "differ" if pa and pb else "-", "-", "-", "-", "-", "-", "-", "-", why]
    common = sorted(set(arm_matrix(a)[1]) & set(arm_matrix(b)[1]), key=problem_order)
    if not common:
        return [a.label, b.label, "/".join(pa), "0", "-", "-", "-", "-", "-", "-", "no common problems"]
    cmp = compare_arms(arm_matrix(a, common)[0], arm_matrix(b, common)[0])
    verdict = {"B better": f"{b.label} better", "A better": f"{a.label} better"}.get(cmp.verdict, cmp.verdict)
    return [a.label, b.label, "/".join(pa), str(cmp.problems), _pct(cmp.a.mean), _pct(cmp.b.mean),
            f"{100 * cmp.delta:+.1f}", _interval(cmp.delta_ci), f"{cmp.p_improvement:.2f}",
            f"[{cmp.p_improvement_ci[0]:.2f}, {cmp.p_improvement_ci[1]:.2f}]", verdict]


def arm_pair_rows(arms: Sequence[Arm]) -> List[List[str]]:
    """Every two arms (A before B in label order)."""
    return [arm_pair_row(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]


ARM_NOTES = [
    "Arms: runs whose config.yaml agree except trainer.seed, run.* and launch bookkeeping (ladder.start_rung, "
    "dry_run, launcher, site, tracking); labelled by the keys on which arms differ.",
    "mean %: mean over seeds of each seed's final accuracy on the problems every run of the arm evaluated. 95% CI: "
    "hierarchical bootstrap, 2000 replicates drawing the seeds and the problems with replacement (numpy seed 0: "
    "the same runs give the same interval). min–max and std: across seeds.",
    "Arms compared on their pooled common problems: Δ B−A with its bootstrap interval (each replicate draws the "
    "problems once for both arms and the seeds of each); P(B > A): the share of (run of A, run of B) pairs in which "
    "B's run is more accurate, ties half (rliable's probability of improvement, Agarwal et al. 2021); 'better' "
    "when Δ's interval excludes 0.",
]
