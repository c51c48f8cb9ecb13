"""Tutorial 10 runs as documented: PP 2 x FSDP 2 on 4 processes, resumed on one process
without a pipeline, both runs exported for from_pretrained."""

from __future__ import annotations

import re

from helpers import accel_cli

SCRIPT = "tutorials/10_pipeline_parallel_llama.py"


def test_10_pipeline_x_fsdp_resumes_without_a_pipeline_and_exports(tmp_path):
    first = accel_cli("launch", "-n", "4", SCRIPT, "--dir", str(tmp_path), "--mesh", "pp2xdp2",
                      "--steps", "3", timeout=600)
    assert first.returncode == 0, first.stderr
    assert ("pipeline_parallel(pp=2, stages=2, 1f1b, microbatches=4) -> shard_model(fsdp)"
            in first.stdout), first.stdout
    second = accel_cli("launch", "-n", "1", SCRIPT, "--dir", str(tmp_path), "--mesh", "none",
                       "--steps", "5", timeout=600)
    assert second.returncode == 0, second.stderr
    assert "resumed step 3 on mesh dp_shard=1" in second.stdout
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", first.stdout + second.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3, losses
    # one model of 4 layers, whether a pipeline of 2 stages or one process exported it
    assert first.stdout.count("from_pretrained: 164416 parameters") == 1, first.stdout
    assert "from_pretrained: 164416 parameters" in second.stdout
