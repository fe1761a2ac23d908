"""``cnnkit plugins [--format]`` and ``cnnkit plugins check DIST``: what each distribution provides, and
whether it honours cnnkit's contracts."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cnnkit.cli._common import Format, FormatOption, guarded

app = typer.Typer(
    help=(
        "Distributions that register cnnkit models, datasets or trainers (cnnkit included): version, "
        "names, status (ok, disabled, failed with the reason) and name clashes. Imports every entry."
    ),
    invoke_without_command=True,
)


@app.callback()
@guarded
def plugins(ctx: typer.Context, fmt: FormatOption = Format.table) -> None:
    """Distributions that register cnnkit entries: version, names, status, clashes."""
    if ctx.invoked_subcommand is not None:
        return
    from cnnkit.plugins import clashes, survey

    distributions, clashing = survey(), clashes()
    if fmt is Format.json:
        document = {
            "distributions": [d.to_dict() for d in distributions],
            "clashes": [
                {"group": c.group, "name": c.name, "winner": c.winner, "loser": c.loser, "use": c.qualified}
                for c in clashing
            ],
        }
        typer.echo(json.dumps(document, indent=2))
        return
    width = max((len(group) for d in distributions for group in d.entries), default=0)
    for dist in distributions:
        status = dist.status if dist.reason is None else f"{dist.status}: {dist.reason}"
        typer.echo(f"{dist.name} {dist.version}  {status}".rstrip())
        for group, names in dist.entries.items():
            typer.echo(f"  {group:<{width}}  {', '.join(names)}")
    for clash in clashing:
        typer.echo(
            f"clash: {clash.group[:-1]} '{clash.name}' is registered by {clash.winner} and {clash.loser}; "
            f"{clash.winner}'s is used ('{clash.qualified}' picks the other)"
        )


@app.command("check")
@guarded
def check(
    distribution: Annotated[str, typer.Argument(help="An installed distribution, e.g. cnnkit-efficientnet.")],
) -> None:
    """Import each entry of DISTRIBUTION and run cnnkit.testing's contract check on it: one line per entry.

    Models are built on the meta device and trained one step at a small input; datasets are
    loaded only where their data is found. Exit 0 when every entry passes, 1 when any fails, 2 for
    a distribution that registers nothing (the error names those that do).
    """
    from cnnkit.plugins import CheckResult, ChecksFailed, check_distribution

    def report(result: CheckResult) -> None:
        mark = "pass" if result.passed else "FAIL"
        typer.echo(f"{mark}  {result.group[:-1]} {result.name}  ({result.seconds:.1f} s)  {result.detail}")

    results = check_distribution(distribution, report)
    failed = [r for r in results if not r.passed]
    if failed:
        raise ChecksFailed(
            f"{len(failed)} of {len(results)} entries of '{distribution}' failed their contract checks: "
            f"{', '.join(r.name for r in failed)}"
        )
    typer.echo(f"{distribution}: all {len(results)} entries pass")
