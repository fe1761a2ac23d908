"""The run's report lines (an epoch's line, the closing lines): the one owner of their wording,
which the console prints and the log file records."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["epoch_line", "closing_lines"]


def epoch_line(run: Run) -> str:
    """The line of the epoch that just completed (``run.metrics``)."""
    m = run.metrics
    return (
        f"epoch {int(m['epoch'])}/{run.config.epochs}  loss {m['train_loss']:.3f}  train acc {m['train_acc']:.3f}  "
        f"test loss {m['test_loss']:.3f}  test acc {m['test_acc']:.3f}  lr {m['lr']:.3g}  "
        f"{m['examples_per_s']:.0f} ex/s  {m['epoch_seconds']:.1f}s"
    )


def closing_lines(run: Run) -> list[str]:
    """d2l's closing lines, then where the run, curves and weights are."""
    m = run.metrics
    examples_per_s = run.train_examples / max(run.train_seconds, 1e-9)
    lines = [
        f"loss {m['train_loss']:.3f}, train acc {m['train_acc']:.3f}, test acc {m['test_acc']:.3f}",
        f"{examples_per_s:.1f} examples/sec on {run.device}",
    ]
    if run.should_stop:
        lines.append(
            f"stopped early after epoch {run.epoch}: no better test acc for {run.config.patience} epochs"
        )
    lines.append(
        f"run {run.dir}  curves {run.dir.curves}  best weights {run.dir.best} "
        f"(epoch {run.best_epoch}, test acc {run.best_acc:.3f})"
    )
    return lines
