"""curves.png: two panels (loss, accuracy), train and test apart, the best epoch marked (issue #9)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnnkit.rundir import RunDir
from cnnkit.training import handlers


def fake_run(tmp_path: Path, losses: list[tuple[float, float]], accs: list[tuple[float, float]]) -> Any:
    history = [
        {"epoch": i + 1, "train_loss": tl, "val_loss": vl, "train_acc": ta, "val_acc": va}
        for i, ((tl, vl), (ta, va)) in enumerate(zip(losses, accs, strict=True))
    ]
    best = max(range(len(history)), key=lambda i: history[i]["val_acc"])
    return SimpleNamespace(
        history=history, best_epoch=best + 1, best_acc=history[best]["val_acc"], dir=RunDir(tmp_path),
        config=SimpleNamespace(epochs=len(history), model="resnet18", dataset="coil20"),
    )  # fmt: skip


def test_curves_have_a_loss_panel_and_an_accuracy_panel_with_the_best_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    def no_global_backend(*args: object, **kwargs: object) -> None:
        raise AssertionError("curves must not set matplotlib's global backend")

    monkeypatch.setattr(matplotlib, "use", no_global_backend)
    run = fake_run(tmp_path, [(3.4, 135.7), (6.8, 372.2), (2.4, 4.4)], [(0.26, 0.05), (0.21, 0.05), (0.47, 0.16)])
    plot = handlers.CurvesPlot()
    figure = plot.figure(run)
    loss_axes, acc_axes = figure.axes
    assert loss_axes.get_yscale() == "log" and "loss" in loss_axes.get_ylabel()  # 2.4 .. 372: log scale
    assert acc_axes.get_ylabel() == "accuracy" and acc_axes.get_ylim()[1] <= 1.01
    # Train and test differ in colour and in line style.
    train, test = acc_axes.get_lines()[:2]
    assert train.get_color() != test.get_color() and train.get_linestyle() != test.get_linestyle()
    labels = [text.get_text() for text in acc_axes.get_legend().get_texts()]
    assert labels == ["train", "val", "best val 0.160 (epoch 3)"]
    # The best epoch is a vertical line on both panels.
    for axes in (loss_axes, acc_axes):
        assert any(list(line.get_xdata()) == [3, 3] for line in axes.get_lines())
    plot.plot(run)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_is_freed_before_plot_returns(tmp_path: Path) -> None:
    # Else the garbage collector frees it at a random later moment, and a Ctrl-C landing in one
    # of matplotlib's weakref callbacks then is only printed: the run would not stop.
    import weakref

    plot, refs = handlers.CurvesPlot(), []
    draw = plot.figure

    def recorded(run: Any) -> Any:
        figure = draw(run)
        refs.append(weakref.ref(figure))
        return figure

    plot.figure = recorded  # type: ignore[method-assign]
    plot.plot(fake_run(tmp_path, [(0.9, 0.5), (0.4, 0.4)], [(0.6, 0.8), (0.8, 0.85)]))
    assert refs and refs[0]() is None


def test_small_losses_keep_a_linear_axis(tmp_path: Path) -> None:
    run = fake_run(tmp_path, [(0.93, 0.52), (0.43, 0.41)], [(0.65, 0.79), (0.84, 0.85)])
    loss_axes, _ = handlers.CurvesPlot().figure(run).axes
    assert loss_axes.get_yscale() == "linear"
