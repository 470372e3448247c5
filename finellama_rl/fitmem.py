"""Show or clear the fit memory (finellama_rl/ladder/fitmem.py): the OOM-ladder rung that
worked for a setting, where the next launch of the same setting starts.

    python -m finellama_rl.fitmem                          # what is remembered, and where
    python -m finellama_rl.fitmem --clear                  # forget everything
    python -m finellama_rl.fitmem --clear experiment=seed_ppo_3b   # forget one setting
"""
from __future__ import annotations

import sys
from typing import List

from finellama_rl.ladder.fitmem import fit_memory_path, forget, read_memory


def main(argv: List[str]) -> int:
    from finellama_rl.compose import load_config
    from finellama_rl.errors import UsageError

    clear = "--clear" in argv
    rest = [a for a in argv if a != "--clear"]
    if any(a.startswith("-") for a in rest):
        raise UsageError("usage: python -m finellama_rl.fitmem [--clear] [overrides...]")
    path = fit_memory_path()
    if clear:
        n = forget(load_config(rest, resolve_paths=False) if rest else None, path)
        print(f"forgot {n} fit memory entr{'y' if n == 1 else 'ies'} in {path}")
        return 0
    data = read_memory(path)
    print(f"fit memory: {path} ({len(data)} entr{'y' if len(data) == 1 else 'ies'})")
    for key, entry in sorted(data.items()):
        print(f"  {key}: rung {entry['rung']}, {entry.get('clean_runs', 0)} clean run(s), {entry.get('updated', '?')}")
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main, sys.argv[1:])
