"""``cnnkit list models|datasets|trainers [PATTERN]``: what is registered, read from metadata."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from cnnkit._console import warn
from cnnkit.cli._common import Format, FormatOption, guarded
from cnnkit.errors import CnnkitError
from cnnkit.registry import DATASETS, MODELS, TRAINERS, Registry

app = typer.Typer(help="List registered models, datasets and trainers (built-in and from plugins).")



Pattern = Annotated[str | None, typer.Argument(help="fnmatch pattern, e.g. 'res*' or '*bn'.")]
Long = Annotated[bool, typer.Option("--long", "-l", help="Import each entry and show its details.")]


def _details(registry: Registry[Any], name: str) -> dict[str, Any]:
    obj = registry.get(name)
    row: dict[str, Any] = {"summary": getattr(obj, "summary", "")}
    recipe = getattr(obj, "recipe", None)
    if recipe is not None:
        row["input_size"] = recipe.input_size
        if getattr(recipe, "per_dataset", None):
            row["per_dataset"] = recipe.per_dataset  # the recipe's changes on those datasets
    classes = getattr(obj, "classes", None)
    if classes:
        row["classes"] = len(classes)
    schema = getattr(obj, "options", None)
    if schema is not None and hasattr(schema, "model_fields"):
        row["options"] = {
            key: {"default": field.default, "description": field.description or ""}
            for key, field in schema.model_fields.items()
        }
    return row


def _show(registry: Registry[Any], pattern: str | None, long: bool, fmt: Format) -> None:
    rows: list[dict[str, Any]] = []
    for name in registry.names(pattern):
        entry = registry.entry(name)
        row: dict[str, Any] = {"name": name, "provider": entry.distribution, "version": entry.version}
        if long:
            try:
                row.update(_details(registry, name))
            except Exception as exc:  # a broken plugin is reported and listed, never fatal
                warn(exc.format_message() if isinstance(exc, CnnkitError) else f"{name}: {exc}")
                row["summary"] = "(failed to load)"
        rows.append(row)
    if fmt is Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        where = f" matching '{pattern}'" if pattern else ""
        typer.echo(f"no {registry.kind}s{where}; registered: {', '.join(registry.names()) or 'none'}")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        options = ", ".join(f"{k}={v['default']!r}" for k, v in r.get("options", {}).items())
        extra = f"  {r.get('input_size', '')!s:>4}  {r.get('summary', '')}" if long else ""
        extra += f" (options: {options})" if long and options else ""
        tuned = "; ".join(f"{d}: " + ", ".join(f"{k}={v}" for k, v in changes.items())
                          for d, changes in r.get("per_dataset", {}).items())  # fmt: skip
        extra += f" (recipe on {tuned})" if long and tuned else ""
        provider = "" if r["provider"] == "cnnkit" else f"  [{r['provider']} {r['version']}]"
        typer.echo(f"{r['name']:<{width}}{extra}{provider}".rstrip())


@app.command("models")
@guarded
def models(pattern: Pattern = None, long: Long = False, fmt: FormatOption = Format.table) -> None:
    """Registered architectures (with --long: default input size and summary)."""
    _show(MODELS, pattern, long, fmt)


@app.command("datasets")
@guarded
def datasets(pattern: Pattern = None, long: Long = False, fmt: FormatOption = Format.table) -> None:
    """Registered datasets."""
    _show(DATASETS, pattern, long, fmt)


@app.command("trainers")
@guarded
def trainers(pattern: Pattern = None, long: Long = False, fmt: FormatOption = Format.table) -> None:
    """Registered trainers."""
    _show(TRAINERS, pattern, long, fmt)
