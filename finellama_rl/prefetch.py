"""Download model weights and the dataset into the local Hugging Face cache, on a
login node with internet, for clusters whose compute nodes are offline:

    python -m finellama_rl.prefetch model=qwen2.5-3b data=gsm8k

Jobs then load from the cache (set HF_HUB_OFFLINE=1 on the compute nodes, and
point HF_HOME at a shared filesystem). launch's pre-flight checks the same cache.
"""
from __future__ import annotations

from typing import List

from finellama_rl.compose import load_config, split_argv
from finellama_rl.config import DataSource


def main(argv: List[str]) -> int:
    from huggingface_hub import snapshot_download

    _, overrides = split_argv(argv)
    cfg = load_config(overrides, resolve_paths=False)
    if cfg.model.tiny or cfg.model.path:
        print(f"model {cfg.model.name}: local ({cfg.model.path or 'built on first use'}), nothing to fetch")
    else:
        path = snapshot_download(cfg.model.hub_id, revision=cfg.model.revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"])
        print(f"model {cfg.model.hub_id}@{cfg.model.revision}: {path}")
    if cfg.data.source == DataSource.gsm8k and not cfg.data.path:
        path = snapshot_download(cfg.data.hub_id, repo_type="dataset")
        print(f"dataset {cfg.data.hub_id}: {path}")
    else:
        print(f"data {cfg.data.source.value}: local, nothing to fetch")
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main, overrides=True, multirun=False, resolve_paths=False)
