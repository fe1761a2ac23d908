"""The run's report lines (an epoch's line, the closing lines): the one owner of their wording,
which the console prints and the log file records."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["epoch_line", "closing_lines", "per_class_lines"]


def _pair(m: dict[str, float], split: str) -> str:
    return f"{split} loss {m[f'{split}_loss']:.3f}  {split} acc {m[f'{split}_acc']:.3f}  " if f"{split}_loss" in m else ""


def epoch_line(run: Run) -> str:
    """The line of the epoch that just completed (``run.metrics``)."""
    m = run.metrics
    return (
        f"epoch {int(m['epoch'])}/{run.config.epochs}  loss {m['train_loss']:.3f}  train acc {m['train_acc']:.3f}  "
        f"{_pair(m, 'val')}{_pair(m, 'test')}lr {m['lr']:.3g}  {m['examples_per_s']:.0f} ex/s  {m['epoch_seconds']:.1f}s"
    )


def closing_lines(run: Run) -> list[str]:
    """d2l's closing line (the final epoch's training figures and test accuracy), the best epoch by
    validation with its val and test accuracy, and where the run, curves and weights are."""
    m = run.metrics
    report = run.test_report
    final_test = report.get("final", {}).get("test_acc", m.get("test_acc"))
    examples_per_s = run.train_examples / max(run.train_seconds, 1e-9)
    test = f", test acc {final_test:.3f}" if final_test is not None else ""
    lines = [
        f"loss {m['train_loss']:.3f}, train acc {m['train_acc']:.3f}{test}",
        f"{examples_per_s:.1f} examples/sec on {run.device}",
    ]
    monitor = run.config.monitor.replace("_", " ")
    if run.should_stop:
        lines.append(f"stopped early after epoch {run.epoch}: no better {monitor} for {run.config.patience} epochs")
    if run.best_epoch:
        best = run.history[run.best_epoch - 1] if run.best_epoch <= len(run.history) else {}
        best_test = report.get("best", {}).get("test_acc")
        lines.append(
            f"best epoch {run.best_epoch} by {monitor}: val acc {best.get('val_acc', run.best_acc):.3f}"
            + (f", test acc {best_test:.3f}" if best_test is not None else "")
            + (f"; final epoch {run.epoch}: test acc {final_test:.3f}" if final_test is not None else "")
        )
        lines.append(f"run {run.dir}  curves {run.dir.curves}  best weights {run.dir.best}")
    else:
        lines.append(
            f"no validation split, so no best epoch: run {run.dir}  curves {run.dir.curves}  weights {run.dir.last}"
        )
    return lines


def per_class_lines(run: Run, most: int = 20) -> list[str]:
    """The test accuracy of each class with the best weights (the final ones without a val split);
    with more than ``most`` classes, the ``most`` weakest."""
    report = run.test_report.get("best") or run.test_report.get("final")
    if not report:
        return []
    rows = sorted(report["per_class"].items(), key=lambda item: item[1]["acc"]) if len(report["per_class"]) > most \
        else list(report["per_class"].items())  # fmt: skip
    width = max(len(name) for name, _ in rows[:most])
    which = "best" if run.test_report.get("best") else "final"
    head = f"test accuracy per class ({which} weights, epoch {report['epoch']})"
    if len(rows) > most:
        head += f", the {most} weakest of {len(rows)}"
    return [head + ":"] + [f"  {name:<{width}}  {s['acc']:.3f}  ({s['support']} images)" for name, s in rows[:most]]
