"""`accel plot` / `plot_metrics`: one PNG per chart, whose pixels show the logged lines."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from accel.cli.main import main
from accel.errors import InvalidArgumentError
from accel.tracking import JsonlTracker
from accel.tracking.plot import HEIGHT, WIDTH, plot_metrics

pytest.importorskip("matplotlib", reason="matplotlib is not installed "
                                         "(pip install 'accel[tracking]')")

# Matplotlib's first two line colours (C0, C1) as RGB.
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def write_run(run_dir: Path) -> None:
    """A run as the jsonl tracker writes it: losses and lr every step, throughput every 5."""
    tracker = JsonlTracker(run_dir)
    tracker.start({"lr": 1e-3})
    for step in range(40):
        metrics = {"train/loss": 2.0 / (step + 1), "eval/loss": 2.5 / (step + 1),
                   "lr": 1e-3 * min(1.0, (step + 1) / 10)}
        if step % 5 == 0:
            metrics["throughput"] = 100.0 + step
        tracker.log(metrics, step)
    tracker.finish()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def pixels_of(path: Path, rgb: tuple[int, int, int]) -> int:
    from matplotlib.image import imread

    image = (imread(path)[..., :3] * 255).round().astype(int)
    return int((np.abs(image - np.array(rgb)).sum(axis=-1) <= 12).sum())


def test_one_chart_per_group_with_its_lines_and_points(tmp_path):
    write_run(tmp_path / "run")
    charts = plot_metrics(tmp_path / "run")
    assert [(c.path.name, c.lines, c.points) for c in charts] == [
        ("loss.png", ("train/loss", "eval/loss"), (40, 40)),
        ("lr.png", ("lr",), (40,)),
        ("throughput.png", ("throughput",), (8,)),
    ]
    assert all(c.path.parent == tmp_path / "run" / "plots" for c in charts)
    assert {png_size(c.path) for c in charts} == {(WIDTH, HEIGHT)}
    loss, lr, throughput = (pixels_of(c.path, BLUE) for c in charts)
    # Two lines on the loss chart (blue and orange), one (blue only) on the others.
    assert pixels_of(charts[0].path, ORANGE) > 500 and loss > 500
    assert pixels_of(charts[1].path, ORANGE) == 0 and lr > 500
    assert pixels_of(charts[2].path, ORANGE) == 0 and throughput > 200


def test_accel_plot_command_draws_the_chosen_groups(tmp_path, capsys):
    write_run(tmp_path / "run")
    code = main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png"),
                 "--metrics", "train/loss,lr", "throughput"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{tmp_path / 'png' / 'train_loss_lr.png'}: train/loss (40 points), lr (40 points)",
        f"{tmp_path / 'png' / 'throughput.png'}: throughput (8 points)",
    ]
    assert png_size(tmp_path / "png" / "train_loss_lr.png") == (WIDTH, HEIGHT)
    assert pixels_of(tmp_path / "png" / "train_loss_lr.png", ORANGE) > 500


def test_bad_runs_and_names_are_reported(tmp_path, capsys):
    write_run(tmp_path / "run")
    with pytest.raises(InvalidArgumentError, match=r"cannot plot \['los'\]; the run logged"):
        plot_metrics(tmp_path / "run", metrics=["los"])
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
