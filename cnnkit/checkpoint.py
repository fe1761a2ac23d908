"""Weights files: safetensors tensors plus cnnkit's metadata, written atomically, loaded safely.

A weights file is self-describing: the JSON under the safetensors metadata key ``cnnkit`` says
which registered model to build (and with which options), the input size, channels, class names
and normalisation it was trained with, so ``cnnkit eval``/``predict``/``export`` and
``load_model`` need nothing but the file. Tensors are plain safetensors: no pickle is ever read.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from cnnkit._version import __version__
from cnnkit.errors import (
    CnnkitError,
    UnknownNameError,
    UsageError,
    WeightsError,
    closest,
)
from cnnkit.fs import atomic_write
from cnnkit.rundir import BEST_NAME, LAST_NAME

__all__ = [
    "META_KEY",
    "WeightsMeta",
    "save_weights",
    "read_meta",
    "load_weights",
    "load_model",
    "resolve_weights",
    "export_weights",
    "provider_of",
    "unwrap",
]

META_KEY = "cnnkit"
"""The safetensors metadata key holding :class:`WeightsMeta` as JSON."""


class WeightsMeta(BaseModel):
    """Everything needed to rebuild, feed and label a model from its weights file alone."""

    # Older readers must survive keys added by newer cnnkit versions.
    model_config = ConfigDict(extra="ignore")

    format_version: int = 1
    model: str
    """Registered model name."""
    model_options: dict[str, Any] = {}
    """The ``-o key=value`` options the model was built with."""
    in_channels: int
    num_classes: int
    input_size: int
    """Square side in pixels the model was trained at."""
    classes: list[str]
    """Class names in label order."""
    dataset: str | None = None
    """Registered dataset name it was trained on."""
    dataset_options: dict[str, Any] = {}
    data: str | None = None
    """The folder the dataset was loaded from (so ``cnnkit eval`` finds it again); None: unknown."""
    model_distribution: str | None = None
    """The distribution that registers ``model`` (``cnnkit`` or a plugin such as ``cnnkit-efficientnet``)."""
    model_distribution_version: str | None = None
    dataset_distribution: str | None = None
    """The distribution that registers ``dataset`` (so eval can name what to install)."""
    dataset_distribution_version: str | None = None
    validation: dict[str, Any] | None = None
    """How the run's val split was made: ``{"from": "dataset"}``, or ``{"from": "train", "fraction",
    "seed"}`` (carved from the loaded training split); None: the run had none."""
    mean: list[float] | None = None
    """Per-channel mean on the 0..1 scale; None: inputs are only scaled to 0..1 (the d2l recipe)."""
    std: list[float] | None = None
    ema: float | None = None
    """The decay when these weights are an exponential moving average of the trained ones (``--ema``);
    None: the trained weights themselves."""
    init_from: dict[str, Any] | None = None
    """Where the run's initial weights came from (``--init-from``): ``source`` as given, ``path``,
    ``sha256`` and ``format``; None: the model's own initialisation."""
    epoch: int | None = None
    metrics: dict[str, float | None] = {}
    """E.g. ``{"val_acc": 0.91}`` at that epoch."""
    weights_dtype: str = "float32"
    """Floating dtype the tensors are stored in (``float16`` after ``cnnkit export --half``);
    loading always casts back to the model's float32."""
    cnnkit_version: str = __version__


def provider_of(model: str, kind: str = "model") -> tuple[str | None, str | None]:
    """(distribution, version) that registers the ``kind`` (model or dataset) of that name here,
    read from metadata (nothing imported)."""
    from cnnkit.registry import DATASETS, MODELS

    try:
        entry = (MODELS if kind == "model" else DATASETS).entry(model)
    except CnnkitError:
        return None, None
    return entry.distribution, entry.version or None


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside torch.compile and DistributedDataParallel wrappers: what weights files,
    the resume point and evaluation use (compile prefixes every key with ``_orig_mod.``, DDP with
    ``module.``)."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net) if type(net).__name__ == "DistributedDataParallel" else net


def _float_dtype(model: nn.Module) -> str:
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "float32"


def save_weights(path: str | Path, model: nn.Module, meta: WeightsMeta) -> None:
    """Write ``model``'s state dict and ``meta`` to a safetensors file, atomically.

    Tensors are saved contiguous and on the CPU; tied (shared) tensors are stored once, their
    other names recorded in the metadata so :func:`load_weights` restores them. The folder is
    created when missing (library callers save into fresh run folders); ``cnnkit export``
    checks its ``--out`` folder first (:func:`export_weights`).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    meta = meta.model_copy(update={"weights_dtype": _float_dtype(model)})
    metadata = {META_KEY: meta.model_dump_json()}
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=metadata, force_contiguous=True))


def resolve_weights(path: str | Path) -> Path:
    """A run directory -> its ``best.safetensors`` (else ``last.safetensors``); a file -> itself."""
    given = Path(path)
    if given.is_dir():
        for name in (BEST_NAME, LAST_NAME):
            if (given / name).is_file():
                return given / name
        raise WeightsError(
            f"run directory {given} holds neither {BEST_NAME} nor {LAST_NAME}; "
            "pass a .safetensors file or the folder of a run that saved weights"
        )
    if not given.exists():
        raise WeightsError(f"weights {given} do not exist; pass a .safetensors file or a run directory")
    return given


def _read_header(path: Path) -> dict[str, str]:
    """The safetensors metadata of ``path``; WeightsError when the file is not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # SafetensorError, OSError, …: any unreadable file is one message
        size = path.stat().st_size if path.is_file() else 0
        what = "is empty" if size == 0 else f"is not a readable safetensors file ({_reason(exc)})"
        raise WeightsError(f"weights {path} {what}; re-export it or point at another checkpoint") from exc


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def read_meta(path: str | Path) -> WeightsMeta:
    """The :class:`WeightsMeta` stored in a weights file (or a run directory's best weights)."""
    file = resolve_weights(path)
    header = _read_header(file)
    raw = header.get(META_KEY)
    if raw is None:
        raise WeightsError(
            f"weights {file} are safetensors but carry no cnnkit metadata; "
            "only files written by 'cnnkit train' or 'cnnkit export' can be used"
        )
    try:
        return WeightsMeta.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise WeightsError(f"weights {file} have corrupt cnnkit metadata ({_reason(exc)}); re-export them") from exc


def _build(file: Path, meta: WeightsMeta) -> nn.Module:
    from cnnkit.registry import MODELS

    # An unknown or unbuildable model is a usage error elsewhere; here the file is what is wrong.
    try:
        spec = MODELS.get(meta.model)
    except UnknownNameError as exc:
        provider = meta.model_distribution
        if provider and provider != "cnnkit":
            # The file says which plugin registered the model: name it, with how to get it.
            saved_by = f" {meta.model_distribution_version}" if meta.model_distribution_version else ""
            raise WeightsError(
                f"weights {file} were saved from model '{meta.model}' of {provider}{saved_by}, which is not "
                f"installed here; install {provider} (pip install {provider})"
            ) from exc
        hint = closest(meta.model, exc.known)
        similar = f" (similar: {', '.join(hint)})" if hint else ""
        raise WeightsError(
            f"weights {file} were saved from model '{meta.model}', which is not registered here"
            f"{similar}; install the plugin that provides it ('cnnkit list models' shows what is)"
        ) from exc
    except CnnkitError as exc:
        raise WeightsError(f"weights {file} need model '{meta.model}': {exc.format_message()}") from exc
    try:
        return spec.build(meta.in_channels, meta.num_classes, **meta.model_options)
    except CnnkitError as exc:
        raise WeightsError(
            f"weights {file} record options {meta.model_options} that model '{meta.model}' "
            f"does not accept: {exc.format_message()}"
        ) from exc


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _describe_mismatch(file: Path, meta: WeightsMeta, state: dict[str, torch.Tensor], model: nn.Module) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape file vs model", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return (
        f"weights {file} do not fit model '{meta.model}' ({_count(meta.in_channels, 'channel')}, "
        f"{_count(meta.num_classes, 'class', 'classes')}): {'; '.join(parts)}; "
        "the tensors come from another architecture or size than its metadata says"
    )


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, WeightsMeta]:
    """Rebuild the registered model described by a weights file and load its tensors (strict).

    ``path`` is a ``.safetensors`` file or a run directory. The model comes back in eval mode,
    in float32, on ``device``. Any mismatch is a one-line :class:`WeightsError` naming it.
    """
    file = resolve_weights(path)
    meta = read_meta(file)
    model = _build(file, meta)
    try:
        state = load_file(str(file), device="cpu")
    except Exception as exc:  # a truncated or corrupt tensor section
        raise WeightsError(f"weights {file} are corrupt ({_reason(exc)}); re-export them") from exc

    # save_model stored tied tensors once and recorded "dropped name -> kept name" in the metadata.
    header = _read_header(file)
    expected = model.state_dict()
    for alias, kept in header.items():
        if alias != META_KEY and alias in expected and alias not in state and kept in state:
            state[alias] = state[kept]

    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise WeightsError(_describe_mismatch(file, meta, state, model))
    # load_state_dict copies into the float32 parameters, so float16 files are cast back here.
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model in a weights file or run directory, ready for inference (eval mode)."""
    return load_weights(path, device)[0]


def export_weights(source: str | Path, out: str | Path, half: bool = False, force: bool = False) -> Path:
    """Copy a run's weights into one standalone file with the same metadata (float16 with ``half``).

    The source is loaded and checked against its model first, so a bad file is never exported.
    An existing ``out`` is kept unless ``force``; its folder must exist (OSError naming it).
    """
    target = Path(out)
    if target.suffix != ".safetensors":
        raise UsageError(f"--out {target} must end in .safetensors (e.g. --out {target.with_suffix('.safetensors')})")
    if target.is_dir():
        raise UsageError(f"--out {target} is a folder; name the file, e.g. --out {target / 'model.safetensors'}")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it or choose another --out")
    if not target.parent.is_dir():
        # An explicit output file never gets folders made up for it: a typo would scatter files.
        code, what = (errno.ENOTDIR, "is not a folder") if target.parent.exists() else (errno.ENOENT, "does not exist")
        raise OSError(
            code, f"the folder of --out {target.name} {what}; create it first or fix the path", str(target.parent)
        )
    model, meta = load_weights(source)
    if half:
        model = model.half()
    save_weights(target, model, meta)
    return target
