"""Rebuild the results index (`<results_dir>/eval_results.json`, finellama_rl/eval/results_index.py)
from the run folders' eval files and print one line per entry.

    python -m finellama_rl.index results
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List

from finellama_rl.eval.results_index import index_path, rebuild


def main(argv: List[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m finellama_rl.index <results_dir>   (rebuilds <results_dir>/eval_results.json)", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_dir():
        print(f"error: results_dir: {argv[0]} is not a folder; pass the folder that holds the sweeps", file=sys.stderr)
        return 2
    entries = rebuild(Path(argv[0]))
    for e in entries:
        primary, ci = e["primary"], e["ci95"].get(e["primary"])
        ci_txt = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
        print(f"{e['sweep']}/{e['run']} {e['checkpoint']}: {e['protocol']['name']}/{primary} "
              f"{e['accuracy'][primary]:.1%}{ci_txt} (n={e['n']}) {e['path']}")
    print(f"{len(entries)} entries in {index_path(Path(argv[0]))}")
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cli_main(main)
