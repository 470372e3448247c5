"""Evaluation: generating completions for test problems (generation.py), scoring
them into accuracy and per-example records (core.py), and pass@k from sampled
completions (passk.py). The command-line entry is `python -m finellama_rl.evaluate`.
"""
