"""Reward sources for RL training: rule functions on the completion text
(rules.py: answer extraction, correctness, format, digits), and, as they are
added, scoring through math-verify, frozen reward models and LLM judges.

Every reward follows TRL's calling convention
`f(completions, **dataset_columns) -> list[float]`, so both trainers call them alike.
"""
