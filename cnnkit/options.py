"""Validating ``key=value`` options against a model's or a dataset's pydantic schema (torch-free)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cnnkit.errors import UsageError

__all__ = ["parse_options"]

O = TypeVar("O", bound=BaseModel)


def parse_options(name: str, schema: type[O], options: dict[str, Any], kind: str = "model") -> O:
    """Validate the options of model (or dataset: ``kind``) ``name``; a bad one is a one-line UsageError
    naming every option the schema takes."""
    try:
        return schema(**options)
    except ValidationError as exc:
        fields = ", ".join(f"{k} ({_describe(f)})" for k, f in schema.model_fields.items()) or "none"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in exc.errors()
        )
        raise UsageError(f"bad option for {kind} '{name}': {problems}. Options it takes: {fields}") from exc


def _describe(field: Any) -> str:
    annotation = getattr(field.annotation, "__name__", str(field.annotation))
    return f"{annotation}, default {field.default!r}"
