"""Trackers: values in, exactly those values back out of each backend's own files and readers.

One 2-rank world logs a run to every installed backend (each rank into its own project
folder, so anything rank 1 wrote would show); the tests below read each backend back with
its own reader. The in-process tests cover checking, grouping and the inactive ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.context import Context
from accel.errors import InvalidArgumentError, MissingDependencyError, UnsupportedError
from accel.testing import fake_world, run_world
from accel.tracking import JsonlTracker, Trackers, init_trackers, read_metrics
from accel.tracking.base import require

# Values exact in float32 too (TensorBoard stores float32): read back with ==.
STEPS = (0, 1, 3)
LOSSES = (0.75, 0.5, 0.125)
CONFIG = {"lr": 0.001, "batch_size": 32, "optimizer": {"name": "adamw"}}
TABLE = ("samples", ["input", "score"], [["a", 1], ["b", 2.5]])
WANDB_SETTINGS = {"silent": True, "console": "off", "x_disable_stats": True,
                  "disable_git": True, "x_save_requirements": False}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def skip_unless_installed(package: str) -> None:
    if not installed(package):
        pytest.skip(f"{package} is not installed (pip install 'accel[tracking]')")


def wandb_env(base: Path) -> dict[str, str]:
    """W&B's own logs and staging go to the test's folder, not to the home directory."""
    return {"WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(base / "wandb-cache"),
            "WANDB_DATA_DIR": str(base / "wandb-data"),
            "WANDB_CONFIG_DIR": str(base / "wandb-config")}


def log_a_run(ctx: Context, base: str, names: list[str]) -> dict:
    """Every rank runs the same code, into its own project folder."""
    project = Path(base) / f"rank{ctx.rank}"
    options = {"wandb": {"settings": WANDB_SETTINGS}} if "wandb" in names else {}
    with init_trackers(ctx, names, project, CONFIG, run_name="run1", options=options) as trackers:
        for step, loss in zip(STEPS, LOSSES, strict=True):
            # A 0-d tensor and python numbers, as a training loop logs them.
            trackers.log({"loss": torch.tensor(loss), "lr": 0.5 ** step, "step_time": step}, step)
        trackers.log_table(*TABLE, step=3)
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*")) \
        if project.exists() else []
    return {"active": trackers.active, "files": files}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tracking")
    names = ["jsonl"] + [name for name in ("tensorboard", "mlflow", "wandb") if installed(name)]
    results = run_world(log_a_run, 2, str(base), names, env=wandb_env(base), timeout=240)
    return base / "rank0", results


@pytest.mark.spawned
def test_only_rank0_writes(logged_run):
    _, results = logged_run
    assert results[0]["active"] and results[0]["files"], results[0]
    assert results[1] == {"active": False, "files": []}


@pytest.mark.spawned
def test_jsonl_records_the_logged_values(logged_run):
    project, _ = logged_run
    records = read_metrics(project / "run1")
    assert [r["step"] for r in records] == list(STEPS)
    assert [r["metrics"] for r in records] == [
        {"loss": loss, "lr": 0.5 ** step, "step_time": step}
        for step, loss in zip(STEPS, LOSSES, strict=True)]
    assert json.loads((project / "run1" / "config.json").read_text()) == CONFIG
    table = json.loads((project / "run1" / "tables.jsonl").read_text())
    assert (table["table"], table["columns"], table["rows"], table["step"]) == (*TABLE, 3)


@pytest.mark.spawned
def test_tensorboard_event_files_hold_the_logged_values(logged_run):
    skip_unless_installed("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project, _ = logged_run
    events = EventAccumulator(str(project / "run1" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "step_time"}
    loss = events.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == list(zip(STEPS, LOSSES, strict=True))
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(s, 0.5 ** s) for s in STEPS]
    assert {"config/text_summary", "samples/text_summary"} <= set(events.Tags()["tensors"])


@pytest.mark.spawned
def test_mlflow_store_holds_the_logged_values(logged_run):
    skip_unless_installed("mlflow")
    from mlflow import MlflowClient

    project, _ = logged_run
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("rank0").experiment_id])
    assert run.info.run_name == "run1" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == list(zip(STEPS, LOSSES, strict=True))
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "step_time")]
    assert steps == [(s, float(s)) for s in STEPS]
    assert run.data.params == {"lr": "0.001", "batch_size": "32", "optimizer.name": "adamw"}
    [table_file] = (project / "mlartifacts").rglob("step_3.json")
    assert json.loads(table_file.read_text()) == {"columns": TABLE[1], "data": TABLE[2]}


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the offline run's .wandb log, through W&B's own reader (its CLI)."""
    [log] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent))
    result = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(log)],
                            capture_output=True, text=True, timeout=60, check=True,
                            env={**os.environ, **wandb_env(run_dir.parent.parent)})
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.spawned
def test_wandb_offline_run_holds_the_logged_values(logged_run):
    skip_unless_installed("wandb")
    project, _ = logged_run
    records = wandb_records(project / "run1")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [row["_step"] for row in history] == list(STEPS)
    assert [row["loss"] for row in history] == list(LOSSES)
    assert [row["lr"] for row in history] == [0.5 ** s for s in STEPS]
    assert history[-1]["samples._type"] == "table-file"  # the table, logged at step 3
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "run1" and run["project"] == "rank0"
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == CONFIG


# ---- in-process: checking values, grouping, inactive ranks ----

class ListTracker:
    """A custom tracker: any object with name, start, log and finish."""

    name = "list"

    def __init__(self):
        self.calls: list[tuple] = []

    def start(self, config):
        self.calls.append(("start", config))

    def log(self, metrics, step):
        self.calls.append(("log", metrics, step))

    def finish(self):
        self.calls.append(("finish",))


def test_custom_tracker_gets_python_numbers(tmp_path):
    custom = ListTracker()
    with init_trackers(Context(), [custom], tmp_path, {"seed": 1}, run_name="r") as trackers:
        trackers.log({"loss": torch.tensor(0.5), "n": np.int64(3), "ok": True}, step=2)
    assert custom.calls == [("start", {"seed": 1}), ("log", {"loss": 0.5, "n": 3, "ok": 1}, 2),
                            ("finish",)]
    assert type(custom.calls[1][1]["n"]) is int
    assert trackers.tracker("list") is custom and not tmp_path.joinpath("r").exists()


@pytest.mark.parametrize(("metrics", "step", "message"), [
    ({"loss": torch.ones(2)}, 0, "'loss' is a Tensor of shape (2,); metrics must be scalars"),
    ({"loss": np.zeros(1)}, 0, "'loss' is a ndarray of shape (1,)"),
    ({"name": "adam"}, 0, "metric 'name' is 'adam' of type str; metrics must be numbers"),
    ({}, 0, "non-empty dict"),
    ({"loss": 1.0}, -1, "step must be an int >= 0"),
    ({"loss": 1.0}, 1.5, "step must be an int >= 0"),
])
def test_bad_values_are_refused_on_every_rank(tmp_path, metrics, step, message):
    with fake_world(rank=1, world_size=2) as ctx:
        trackers = init_trackers(ctx, ["jsonl"], tmp_path)
        with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(
                ")", r"\)")):
            trackers.log(metrics, step)


def test_inactive_rank_writes_nothing_and_names_why(tmp_path):
    with fake_world(rank=1, world_size=2) as ctx:
        with init_trackers(ctx, ["jsonl", ListTracker()], tmp_path, run_name="r") as trackers:
            trackers.log({"loss": 1.0}, step=0)
            # Same errors as on the main rank: ListTracker has no log_table.
            with pytest.raises(UnsupportedError, match=r"\['list'\] cannot log tables"):
                trackers.log_table(*TABLE, step=0)
            with pytest.raises(UnsupportedError, match="main process only"):
                trackers.tracker("jsonl")
    assert not trackers.active and list(tmp_path.iterdir()) == []
    assert trackers.run_dir == tmp_path / "r"


def test_images_refused_when_a_tracker_cannot_log_them(tmp_path):
    with init_trackers(Context(), ["jsonl"], tmp_path, run_name="r") as trackers:
        with pytest.raises(UnsupportedError, match=r"\['jsonl'\] cannot log images; nothing"):
            trackers.log_images({"sample": np.zeros((4, 4, 3), np.uint8)}, step=0)
        with pytest.raises(UnsupportedError, match=r"\['list'\] cannot log tables"):
            Trackers((ListTracker(),), tmp_path, active=True).log_table(*TABLE, step=0)
        with pytest.raises(InvalidArgumentError, match="CHW tensor"):
            Trackers((), tmp_path, active=True).log_images({"x": torch.zeros(3, 8, 8)}, 0)


@pytest.mark.parametrize(("trackers", "options", "message"), [
    (["jsonl", "comet"], None, "unknown tracker 'comet'; built-in trackers are"),
    (["jsonl", "jsonl"], None, r"unique, \['jsonl'\] appear more than once"),
    ([object()], None, "is not a tracker: it lacks"),
    (["jsonl"], {"tensorbord": {}}, r"options for unknown tracker\(s\) \['tensorbord'\]"),
])
def test_bad_tracker_lists_are_refused(tmp_path, trackers, options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        init_trackers(Context(), trackers, tmp_path, options=options)


def test_jsonl_refuses_to_mix_runs_unless_resuming(tmp_path):
    with init_trackers(Context(), ["jsonl"], tmp_path, run_name="r") as trackers:
        trackers.log({"loss": 1.0}, step=0)
    with pytest.raises(InvalidArgumentError, match="already exists: choose another run_name"):
        init_trackers(Context(), ["jsonl"], tmp_path, run_name="r")
    tracker = JsonlTracker(tmp_path / "r", resume=True)
    tracker.start(None)
    tracker.log({"loss": 0.5}, step=1)
    tracker.finish()
    assert [r["metrics"]["loss"] for r in read_metrics(tmp_path / "r")] == [1.0, 0.5]
    with pytest.raises(InvalidArgumentError, match="not running: call start"):
        tracker.log({"loss": 0.25}, step=2)


def test_missing_library_names_the_extra():
    with pytest.raises(MissingDependencyError, match=r"pip install 'accel\[tracking\]'"):
        require("no_such_tracking_library", "no-such-tracking-library", "the test tracker")
