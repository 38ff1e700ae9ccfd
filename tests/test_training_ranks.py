"""Data-parallel training (issue 18, item 2): each rank draws its own noise; a NaN on one rank stops all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).parent / "ddp_probe.py"


def test_rank_seeds_differ_and_checkpoints_restore_each_rank(tmp_path):
    from dallecli.training.trainer import rank_seed

    seeds = {rank_seed(7, rank) for rank in range(64)}
    assert len(seeds) == 64 and rank_seed(7, 0) == rank_seed(7, 0) != rank_seed(8, 0)
    streams = [torch.randn(4, generator=torch.Generator().manual_seed(rank_seed(7, r))) for r in range(2)]
    assert not torch.equal(streams[0], streams[1])


def _launch(out: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is not installed next to this Python"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(PROBE), str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_ranks_draw_different_noise_and_a_nan_on_one_stops_both(tmp_path):
    done = _launch(tmp_path / "ok", 29541)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ok" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(rank["ended"] == "finished" for rank in ranks)
    assert len(ranks[0]["noise"]) == len(ranks[1]["noise"]) == 3
    for step in range(3):  # the same step on two ranks: different noise (not one batch computed twice)
        assert ranks[0]["noise"][step] != ranks[1]["noise"][step]

    stopped = _launch(tmp_path / "nan", 29542, "--nan-rank", "1")  # a hang would hit the 300 s timeout
    assert stopped.returncode != 0
    ranks = [json.loads((tmp_path / "nan" / f"rank{r}.json").read_text()) for r in range(2)]
    assert "loss became nan (on 1 of 2 processes) at step 2" in ranks[1]["ended"]
    assert "another process's loss became NaN/Inf (on 1 of 2 processes) at step 2" in ranks[0]["ended"]
