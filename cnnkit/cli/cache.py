"""``cnnkit cache info|clear``: what the decoded-image cache holds, and freeing it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cnnkit.cli._common import Format, FormatOption, guarded
from cnnkit.errors import UsageError

app = typer.Typer(help="Show and clear the cache of decoded images ($CNNKIT_CACHE).")


@app.command("info")
@guarded
def info(fmt: FormatOption = Format.table) -> None:
    """The cache folder, its size and every entry: what made it, its size, when made and last used."""
    from cnnkit.data.cache_admin import cache_report

    report = cache_report()
    if fmt is Format.json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"cache     {report['folder']}")
    count = report["entries"]
    typer.echo(f"size      {report['bytes_human']} ({report['bytes']:,} bytes) in {count} entr{'y' if count == 1 else 'ies'}")
    if report["unfinished_builds"]:
        typer.echo(
            f"unfinished builds: {report['unfinished_builds']} ({report['unfinished_bytes']:,} bytes; "
            "cnnkit cache clear removes those idle for an hour)"
        )
    for item in report["items"]:
        made = f"{item['dataset'] or '?'}, {item['files'] if item['files'] is not None else '?'} files"
        if item["size"]:
            made += f" at {item['size']} px"
        if item["channels"]:
            made += f", {item['channels']} channel{'s' if item['channels'] > 1 else ''}"
        if item["resize"]:
            made += f", {item['resize']}"
        typer.echo(
            f"  {item['kind']:<7} {item['bytes_human']:>9}  {made}  created {item['created']}, "
            f"last used {item['last_used']}  {item['path']}"
        )


@app.command("clear")
@guarded
def clear(
    older_than: Annotated[
        float | None,
        typer.Option("--older-than", metavar="DAYS", help="Only entries not used for this many days (default: all)."),
    ] = None,
) -> None:
    """Remove cached decoded images (all, or those not used for DAYS days); they are rebuilt when needed."""
    from cnnkit.data.cache_admin import clear_cache
    from cnnkit.data.locate import decoded_cache
    from cnnkit.units import human_bytes

    if older_than is not None and older_than < 0:
        raise UsageError(f"--older-than must be a number of days >= 0, got {older_than:g}")
    removed, freed = clear_cache(older_than)
    which = f" not used for {older_than:g} day{'' if older_than == 1 else 's'}" if older_than is not None else ""
    if not removed and not freed:
        typer.echo(f"nothing to remove in {decoded_cache()}: no entry{which}")
        return
    entries = f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'}"
    typer.echo(f"removed {entries}{which}, freed {human_bytes(freed)} ({freed:,} bytes) in {decoded_cache()}")
