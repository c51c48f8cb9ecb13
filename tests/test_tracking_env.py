"""MLflow's and W&B's own variables win over accel's defaults (an argument wins over both).

Each run happens in a fresh process with the variables set (`run_world`, one rank), and
is read back with the ecosystem's own reader: an `MlflowClient()` that finds the store
through `$MLFLOW_TRACKING_URI` itself, and W&B's CLI reading the offline run's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tracking import WANDB_SETTINGS, installed, wandb_env, wandb_records

from accel.testing import run_world
from accel.tracking import init_trackers

LOSSES = (0.75, 0.5)


def log_run(ctx, project: str, names: list[str], options: dict) -> dict:
    with init_trackers(ctx, names, project, {"lr": 0.1}, run_name="r1",
                       options=options) as trackers:
        for step, loss in enumerate(LOSSES):
            trackers.log({"loss": loss}, step)
        seen = {}
        if "mlflow" in names:
            mlflow = trackers.tracker("mlflow")
            seen["mlflow"] = (mlflow.tracking_uri, mlflow.experiment)
        if "wandb" in names:
            seen["wandb_mode"] = trackers.tracker("wandb").run.settings.mode
    return seen


@pytest.fixture(scope="module")
def env_run(tmp_path_factory):
    """One run with MLflow's and W&B's variables set; returns (folders, what it saw)."""
    base = tmp_path_factory.mktemp("tracking-env")
    names = [name for name in ("mlflow", "wandb") if installed(name)]
    if not names:
        pytest.skip("neither mlflow nor wandb is installed (pip install 'accel[tracking]')")
    folders = {"project": base / "project", "store": base / "store" / "mlflow.db",
               "wandb_dir": base / "wandb-dir"}
    env = {**wandb_env(base), "MLFLOW_TRACKING_URI": f"sqlite:///{folders['store']}",
           "MLFLOW_EXPERIMENT_NAME": "from-env", "WANDB_DIR": str(folders["wandb_dir"]),
           "WANDB_PROJECT": "project-from-env"}
    options = {"wandb": {"settings": WANDB_SETTINGS}} if "wandb" in names else {}
    [seen] = run_world(log_run, 1, str(folders["project"]), names, options, env=env,
                       timeout=240)
    return folders, seen


@pytest.mark.spawned
def test_mlflow_store_and_experiment_come_from_mlflows_variables(env_run, monkeypatch):
    if not installed("mlflow"):
        pytest.skip("mlflow is not installed (pip install 'accel[tracking]')")
    import mlflow

    folders, seen = env_run
    store = f"sqlite:///{folders['store']}"
    assert seen["mlflow"] == (store, "from-env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert mlflow.get_tracking_uri() == store       # MLflow's own reading of the variable
    client = mlflow.MlflowClient()                   # no URI given: MLflow finds the store
    [run] = client.search_runs([client.get_experiment_by_name("from-env").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(LOSSES))
    assert not (folders["project"] / "mlflow.db").exists()  # accel's default: not used


@pytest.mark.spawned
def test_wandb_folder_and_project_come_from_wandbs_variables(env_run):
    if not installed("wandb"):
        pytest.skip("wandb is not installed (pip install 'accel[tracking]')")
    folders, seen = env_run
    assert seen["wandb_mode"] == "offline"          # WANDB_MODE unset: accel's default
    records = wandb_records(folders["wandb_dir"])   # W&B's reader, under $WANDB_DIR
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "project-from-env" and run["display_name"] == "r1"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [row["loss"] for row in history] == list(LOSSES)
    assert not list(Path(folders["project"]).rglob("offline-run-*"))


@pytest.mark.spawned
def test_wandb_mode_disabled_wins_over_accels_offline(tmp_path):
    if not installed("wandb"):
        pytest.skip("wandb is not installed (pip install 'accel[tracking]')")
    env = {**wandb_env(tmp_path), "WANDB_MODE": "disabled"}
    [seen] = run_world(log_run, 1, str(tmp_path / "project"), ["wandb"],
                       {"wandb": {"settings": WANDB_SETTINGS}}, env=env, timeout=240)
    assert seen["wandb_mode"] == "disabled"
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("run-*"))


def test_an_argument_wins_over_the_variables(tmp_path, monkeypatch):
    if not (installed("wandb") and installed("mlflow")):
        pytest.skip("needs wandb and mlflow (pip install 'accel[tracking]')")
    from accel.tracking import MLflowTracker, WandbTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    mlflow = MLflowTracker(tmp_path, "r", tracking_uri="sqlite:///mine.db", experiment="mine")
    assert (mlflow.tracking_uri, mlflow.experiment) == ("sqlite:///mine.db", "mine")
    wandb = WandbTracker(tmp_path / "r", "r", project="mine", mode="offline")
    assert wandb.init_kwargs == {"mode": "offline", "project": "mine",
                                 "dir": str(tmp_path / "r")}
