"""RunFiles: writes the run's record (config.json: config and environment) and its split files at the start."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit.training.events import Events, Handler

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["RunFiles"]


class RunFiles:
    """config.json (the resolved config and the environment it ran in), the split files, and test.json
    (the test metrics of the final and the best weights) at the end."""

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.STARTED, self.started), (Events.COMPLETED, self.completed)]

    def completed(self, run: Run) -> None:
        if run.test_report:
            run.dir.write_test_report(run.test_report)

    def started(self, run: Run) -> None:
        run.dir.remove_stale_temporaries()
        # The record names the folder the run is in, also when --out was not given.
        config = run.config.model_copy(update={"out": str(run.dir)}).model_dump(mode="json")
        run.dir.write_record(config, run.environment, [r.to_dict() for r in run.resumes])
        run.dir.write_split_files(run.data.split_files, run.data.source)
