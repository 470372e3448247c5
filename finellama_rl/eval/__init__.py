"""Evaluation under named protocols: prompts, stop strings and scorers of each
protocol (protocols.py), batched generation with explicit decoding (generation.py),
accuracy, records and the eval document (core.py), pass@k from sampled completions
(passk.py), Wilson intervals and exact McNemar tests (statistics.py), reading eval
files of every schema version (schema.py) and comparing evaluations (compare.py).
The command-line entry is `python -m finellama_rl.evaluate`.
"""
