"""What `--help` prints, for every command (`compose.cli_main` handles the flag): the
command's own docstring (what it does, why, and the commands that run it), and for the
commands that take config overrides (launch, train, plan, prefetch, demo) the groups of
conf/ with their options and defaults, the common settings with their defaults and the
doc line that config.py keeps under each field, and the shared flags.

    python -m finellama_rl.launch --help
    python -m finellama_rl.train --cfg job experiment=smoke     # the composed config, nothing runs

Pure: reads conf/ and config.py's source (for the field docs); no torch, no Hydra.
"""
from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from finellama_rl.config import Config

GROUPS = ("model", "trainer", "hardware", "data", "experiment")
COMMON = ("trainer.max_steps", "trainer.learning_rate", "trainer.prompts_per_step", "trainer.num_generations",
          "trainer.micro_batch", "trainer.save_every", "trainer.eval_every", "trainer.seed", "model.adapter",
          "eval.protocol", "eval.num_examples", "run.results_dir", "run.sweep", "run.name", "run.dir", "run.resume",
          "hardware.slurm.partition", "hardware.slurm.account", "hardware.slurm.timeout_min", "launcher", "dry_run",
          "tracking", "site")
FLAGS = [("-m, --multirun", "a sweep: every combination of comma-separated values (trainer=ppo,grpo)"),
         ("--cfg job", "print the composed config of every run (YAML, as config.yaml keeps it) and exit; nothing runs"),
         ("-h, --help", "this text")]
ROOT_CONFIG = "config"  # conf/<this>.yaml: Hydra's root config (compose's config_name), whose defaults list names the groups
CFG_VALUES = ("job", "all")  # Hydra's spellings; both print the job's config (there is no Hydra config of ours)


def field_docs() -> Dict[str, str]:
    """{"trainer.max_steps": "Global steps to train, both trainers.", ...}: the docstring under
    every field of config.py's dataclasses, by dotted key (read from the source: the schema
    documents each field once, right under it)."""
    tree = ast.parse(Path(sys.modules[Config.__module__].__file__).read_text())
    by_class: Dict[str, Dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs, body = {}, node.body
            for stmt, nxt in zip(body, body[1:]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                        and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[stmt.target.id] = " ".join(nxt.value.value.split())
            by_class[node.name] = docs
    out: Dict[str, str] = {}

    def walk(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints.get(f.name)):
                walk(hints[f.name], key + ".")
            elif f.name in by_class.get(cls.__name__, {}):
                out[key] = by_class[cls.__name__][f.name]

    walk(Config, "")
    return out


def first_sentence(text: str, limit: int = 110) -> str:
    cut = text.split(". ")[0].rstrip(".")
    return cut if len(cut) <= limit else cut[: limit - 3].rstrip() + "..."


def group_lines(conf_dir: Path) -> List[str]:
    """One line per group: its options, the default marked with *."""
    import yaml

    defaults: Dict[str, Optional[str]] = {}
    for entry in (yaml.safe_load((conf_dir / f"{ROOT_CONFIG}.yaml").read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict):
            defaults.update({str(k): v for k, v in entry.items()})
    lines = []
    for group in GROUPS:
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        shown = [f"{o}*" if o == defaults.get(group) else o for o in options]
        none = "" if defaults.get(group) else " (default: none)"
        lines.append(f"  {group:<11} {'|'.join(shown)}{none}")
    return lines


def setting_lines(defaults: Optional[Config]) -> List[str]:
    """One line per common setting: key, its default in the default composition, its doc line."""
    docs = field_docs()
    lines = []
    for key in COMMON:
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part, None) if value is not None else None
        value = getattr(value, "value", value)  # enums
        shown = "-" if defaults is None else ("null" if value is None else str(value))
        lines.append(f"  {key:<26} {shown:<14} {first_sentence(docs.get(key, ''))}")
    return lines


def command_help(module_doc: str, prog: str, overrides: bool, conf_dir: Path, defaults: Optional[Config] = None,
                 multirun: bool = True, preset: Sequence[str] = ()) -> str:
    """The whole --help text of a command: its docstring (usage lines and examples come first
    in every command's docstring), and for a command of config overrides the groups, the
    common settings and the flags."""
    if not overrides:
        return f"python -m {prog}: {module_doc.strip()}\n\nflags:\n  {FLAGS[-1][0]:<16} {FLAGS[-1][1]}\n"
    flags = [f for f in FLAGS if multirun or not f[0].startswith("-m")]
    usage = f"usage: python -m {prog} {'[-m] ' if multirun else ''}[--cfg job] [-h] [group=option ...] [key=value ...]"
    first = f" (this command composes {' '.join(preset)} first)" if preset else ""
    parts = [usage, "", module_doc.strip(), "",
             f"config groups (group=option; * = default; files in {conf_dir}){first}:", *group_lines(conf_dir), "",
             "common settings (key=value; default as composed without overrides; every field is documented in "
             "finellama_rl/config.py):", *setting_lines(defaults), "",
             "flags:", *[f"  {name:<16} {text}" for name, text in flags], ""]
    return "\n".join(parts)


def cfg_flag(args: Sequence[str]) -> Optional[List[str]]:
    """The arguments without `--cfg job` (also `--cfg=job`, `-c job`, `--cfg all`), or None
    when there is no such flag; UsageError for another value."""
    from finellama_rl.errors import UsageError

    rest, found = [], False
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        if a in ("--cfg", "-c"):
            value = args[i + 1] if i + 1 < len(args) else ""
            next(it, None)
        elif a.startswith("--cfg="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
            continue
        if value not in CFG_VALUES:
            raise UsageError(f"--cfg takes `job` (print the composed config and exit), got {value!r}")
        found = True
    return rest if found else None
