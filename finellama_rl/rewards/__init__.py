"""Reward sources for RL training and the scorers evaluation shares with them:
one scoring interface (scoring.py: math-verify through math_verify_scorer.py,
strict/lenient `####` extraction from extraction.py, lm-evaluation-harness's GSM8K
filters reproduced in lm_eval.py), rule rewards built for an evaluation protocol
(rules.py: correctness, format, digits), frozen reward models (reward_model.py: ORM
or Qwen2.5-Math-PRM format) and LLM judges (judge.py), loaded alike (frozen.py), and
the registry behind trainer.rewards that weights and names them all (sources.py).

Every reward follows TRL's calling convention
`f(completions, **dataset_columns) -> list[float]`, so both trainers call them alike.
"""
