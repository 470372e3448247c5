"""Host-memory snapshots (finellama_rl/job/snapshot.py): a snapshot taken after a
step reuses the buffers of the one before the latest, never the latest's, and holds
values, not references to live tensors."""
from __future__ import annotations

import random

import torch

from finellama_rl.job.snapshot import SnapshotHolder, host_copy, rng_state


def _live():
    """An optimizer-state-like nest: tensors, a scalar step tensor, plain data."""
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}, 1: {"exp_avg": torch.randn(5)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]}


def _write(folder, payload):
    raise AssertionError("not written in this test")


def test_host_copy_is_a_copy_with_the_same_structure():
    live = _live()
    snap = host_copy(live)
    assert snap["param_groups"] == live["param_groups"] and snap["param_groups"][0]["params"] is not live["param_groups"][0]["params"]
    for k in (0, 1):
        assert torch.equal(snap["state"][k]["exp_avg"], live["state"][k]["exp_avg"])
        assert snap["state"][k]["exp_avg"].data_ptr() != live["state"][k]["exp_avg"].data_ptr()
    live["state"][0]["exp_avg"].add_(1.0)
    live["state"][0]["step"].add_(1.0)
    assert not torch.equal(snap["state"][0]["exp_avg"], live["state"][0]["exp_avg"]) and snap["state"][0]["step"] == 3.0


def test_snapshots_reuse_the_spare_and_never_write_into_the_latest():
    live, holder = _live(), SnapshotHolder()
    first = host_copy(live, holder.spare)
    holder.take(1, first, _write)
    assert holder.spare is None
    live["state"][0]["exp_avg"].add_(1.0)
    second = host_copy(live, holder.spare)
    holder.take(2, second, _write)
    assert holder.spare is first
    kept = second["state"][0]["exp_avg"].clone()  # the latest: step 2's values
    live["state"][0]["exp_avg"].add_(1.0)
    third = host_copy(live, holder.spare)  # step 3 goes into step 1's buffers
    assert third["state"][0]["exp_avg"].data_ptr() == first["state"][0]["exp_avg"].data_ptr()
    assert torch.equal(third["state"][0]["exp_avg"], live["state"][0]["exp_avg"])
    assert torch.equal(holder.latest.payload["state"][0]["exp_avg"], kept)  # untouched until step 3 is taken
    holder.take(3, third, _write)
    assert holder.latest.payload is third and holder.spare is second


def test_host_copy_allocates_when_the_spare_does_not_match():
    live = _live()
    spare = host_copy(live)
    live["state"][1]["exp_avg"] = torch.randn(7)  # another shape
    again = host_copy(live, spare)
    assert torch.equal(again["state"][1]["exp_avg"], live["state"][1]["exp_avg"])
    assert again["state"][1]["exp_avg"].data_ptr() != spare["state"][1]["exp_avg"].data_ptr()


def test_rng_state_is_a_fresh_copy():
    """capture keeps rng_state() as it is: later draws must not change it."""
    state = rng_state()
    before = (state["cpu"].clone(), state["python"], state["numpy"][1].copy())
    torch.rand(100)
    random.random()
    import numpy as np

    np.random.rand(10)
    assert torch.equal(state["cpu"], before[0]) and state["python"] == before[1]
    assert (state["numpy"][1] == before[2]).all()
