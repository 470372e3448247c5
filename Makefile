# finellama_rl developer entry points.
#   make run    install (first time) and run the learning demo locally: SFT of a tiny model (cached
#               after the first time), GRPO from that adapter, the report (ARGS="-m trainer=ppo,grpo" for both)
#   make test   install (first time) and run the whole test suite (CI calls this): the tests not
#               marked slurm with the SLURM binaries hidden (a fresh machine), then the slurm tests
#               on the local cluster (installed and started if needed, stopped if it was not up)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fresh test-fast slurm-up slurm-down bench bench-training bench-slurm clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.installed-*; touch $@

run: $(STAMP)
	$(PY) -m finellama_rl.demo $(ARGS)

test: $(STAMP)
	bash scripts/run_tests.sh $(ARGS)

test-fresh: $(STAMP)  # phase 1 only: no SLURM on PATH, no cluster
	FINELLAMA_TEST_PHASES=1 bash scripts/run_tests.sh $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" $(ARGS)

slurm-up:  # two nodes, as the tests use it (tests/slurm_cluster.py)
	bash scripts/slurm_cluster/cluster.sh start --nodes 2

slurm-down:
	bash scripts/slurm_cluster/cluster.sh stop

bench: $(STAMP)
	$(PY) benchmarks/bench_ladder.py
	$(PY) benchmarks/bench_ppo_grpo.py

bench-training: $(STAMP)  # issue 10's training benchmark (~30 min on 2 cores, so not part of `make bench`)
	$(PY) benchmarks/bench_training.py $(ARGS)

bench-slurm: $(STAMP)  # the 100-run grid on the local cluster (starts it)
	bash scripts/slurm_cluster/cluster.sh start --nodes 2
	$(PY) benchmarks/bench_launch_grid.py

clean:
	rm -rf $(VENV) .pytest_cache
