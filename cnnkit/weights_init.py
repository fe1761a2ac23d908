"""``--init-from``: start a freshly built model from weights trained elsewhere.

A source is one of

- a cnnkit run directory (its ``best.safetensors``, else ``last.safetensors``) or weights file:
  its metadata names the model, channels and classes; it must be the same registered model;
- a state dict in torchvision's layout (or the model's own keys), as ``.pth``/``.pt`` (read with
  ``torch.load(..., weights_only=True)`` only, so a pickle that would run code is refused before
  anything in it runs) or ``.safetensors``; the key mapping of each family is
  :mod:`cnnkit.models.torchvision_weights`;
- ``torchvision:NAME``: the file torchvision's weights enum names for ``NAME``, looked up in torch
  hub's cache (``$TORCH_HOME/hub/checkpoints``). cnnkit never downloads: when it is not there, one
  line names the URL and the exact path to put it at (exit 2).

What does not fit is handled and said in one line each: another class count replaces the layers
of the head whose outputs are the classes (freshly initialised); another channel count adapts the
first convolution (to one channel: the sum of the kernels over the input channels, as timm's
``adapt_input_conv``; to more: the kernels repeated and scaled by old/new channels, so 1 -> 3
repeats the gray kernel scaled by 1/3). Any other missing, unexpected or misshapen tensor is a
:class:`~cnnkit.errors.WeightsError` (exit 4) listing the first few of each and their count.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.errors import UsageError, WeightsError

__all__ = ["TORCHVISION_PREFIX", "InitRecord", "initialise", "torchvision_file", "sha256_of"]

TORCHVISION_PREFIX = "torchvision:"
_TORCH_SUFFIXES = (".pth", ".pt")
_SHOWN = 3  # keys listed per kind of mismatch


@dataclass
class InitRecord:
    """Where a model's initial weights came from, and what was done to fit them."""

    source: str
    """As given (a path, or ``torchvision:NAME``)."""
    path: str
    """The file read, absolute."""
    sha256: str
    format: str
    """``cnnkit`` (a cnnkit weights file) or ``torchvision`` (a plain state dict)."""
    notes: list[str] = field(default_factory=list)
    """One line per thing done to fit (the summary first)."""

    def to_dict(self) -> dict[str, Any]:
        """What config.json and the weights' metadata record."""
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "format": self.format,
                "notes": list(self.notes)}  # fmt: skip


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's refusal of a pickle is a paragraph; the line naming the blocked global is the one to show.
    telling = [line for line in lines if re.search(r"unsupported|GLOBAL", line, re.IGNORECASE)]
    return ((telling or lines or [type(exc).__name__])[0])[:200]


def torchvision_file(name: str) -> tuple[str, Path]:
    """(URL, path in torch hub's cache) of the weights torchvision's enum gives ``name`` by default."""
    from urllib.parse import urlparse

    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
    except (ValueError, KeyError) as exc:
        raise UsageError(
            f"--init-from torchvision:{name}: torchvision has no model '{name}' with weights "
            "(e.g. torchvision:resnet18, torchvision:vgg16_bn, torchvision:densenet121)"
        ) from exc
    url = str(weights.url)
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"--init-from {path} refused: its pickle holds more than tensors ({_reason(exc)}); "
            "torch.load(weights_only=True) ran none of it. Save a plain state dict (torch.save(model.state_dict()))"
        ) from exc
    except Exception as exc:  # a truncated zip, a file that is no torch file: one message
        raise WeightsError(f"--init-from {path} is truncated or not a torch file ({_reason(exc)}); save it again") from exc


def _as_state_dict(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    """The tensors of a loaded file: a state dict, also inside ``{"state_dict": ...}`` or ``{"model": ...}``,
    without the ``module.``/``_orig_mod.`` prefix of a DDP or compiled model."""
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            inner = loaded.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                loaded = inner
                break
    if not (isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise WeightsError(
            f"--init-from {path} holds a {type(loaded).__name__}, not a state dict of tensors; "
            "save one with torch.save(model.state_dict(), path)"
        )
    state = {str(k): v for k, v in loaded.items()}
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _plain_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # a truncated or corrupt file
            raise WeightsError(f"--init-from {path} is truncated or corrupt ({_reason(exc)}); save it again") from exc
    return _as_state_dict(path, _torch_load(path))


def _describe(model: str, options: dict[str, Any]) -> str:
    return f"'{model}'" + "".join(f" -o {k}={v}" for k, v in options.items())


def _read(source: str, model: str, typed: Any, options: dict[str, Any]) -> tuple[Path, str, dict[str, torch.Tensor], Any]:
    """(file, format, tensors, cnnkit metadata or None) of a source."""
    from cnnkit.checkpoint import META_KEY, load_weights, resolve_weights
    from cnnkit.models.torchvision_weights import torchvision_layout

    if source.startswith(TORCHVISION_PREFIX):
        name = source[len(TORCHVISION_PREFIX):]
        layout = torchvision_layout(model, typed)
        if isinstance(layout, str):
            raise UsageError(f"--init-from {source}: {layout}")
        if layout is not None and layout.arch != name:
            raise UsageError(
                f"--init-from {source} holds torchvision's {name}; model {_describe(model, options)} takes "
                f"torchvision:{layout.arch}"
            )
        url, path = torchvision_file(name)
        if not path.is_file():
            raise UsageError(
                f"--init-from {source}: {path} is not there, and cnnkit never downloads; "
                f"fetch {url} and put it at {path}"
            )
        return path, "torchvision", _plain_file(path), None
    given = Path(source).expanduser()
    if not given.exists():
        raise UsageError(f"--init-from {source} does not exist; pass a run directory, a weights file or torchvision:NAME")
    if given.is_dir():
        given = resolve_weights(given)
    if given.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(given), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as exc:  # a truncated or corrupt header
            raise WeightsError(f"--init-from {given} is truncated or corrupt ({_reason(exc)}); save it again") from exc
        if META_KEY in header:
            source_model, meta = load_weights(given)
            if meta.model != model:
                raise WeightsError(
                    f"--init-from {given} holds weights of cnnkit model '{meta.model}'; model '{model}' cannot "
                    f"start from them (pass a run of '{model}', or a torchvision state dict)"
                )
            return given, "cnnkit", source_model.state_dict(), meta
        return given, "torchvision", _plain_file(given), None
    if given.suffix not in _TORCH_SUFFIXES:
        raise UsageError(
            f"--init-from {given}: '{given.suffix}' is not a weights format here; pass a run directory, "
            "a .safetensors, .pth or .pt file, or torchvision:NAME"
        )
    return given, "torchvision", _plain_file(given), None


def _renamed(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], model: str, typed: Any
) -> tuple[dict[str, torch.Tensor], str, str]:
    """The tensors under this model's keys, what was left out on purpose, and a hint for errors."""
    from cnnkit.models.torchvision_weights import DROP, torchvision_layout

    layout = torchvision_layout(model, typed)
    if set(state) <= set(target) or layout is None or isinstance(layout, str):
        # The model's own keys (a state dict saved from cnnkit's model), or no mapping to try.
        return state, "", f" ({layout})" if isinstance(layout, str) else ""
    renamed: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, tensor in state.items():
        new = layout.rename(key)
        if new == DROP:
            dropped += 1
        else:
            renamed[new if new is not None else key] = tensor
    left_out = f"{layout.dropped} left out ({dropped} tensors, used in training only)" if dropped else ""
    return renamed, left_out, f" (mapped as torchvision's {layout.arch})"


def _adapt_channels(kernel: torch.Tensor, channels: int) -> tuple[torch.Tensor, str]:
    """A first convolution's kernel for ``channels`` inputs, and how it was made."""
    old = kernel.shape[1]
    weight = kernel.float()
    if channels == 1:
        return weight.sum(dim=1, keepdim=True), "the kernels summed over the input channels"
    repeat = -(-channels // old)
    adapted = weight.repeat(1, repeat, 1, 1)[:, :channels] * (old / channels)
    return adapted, f"the kernels repeated, scaled by {old}/{channels}"


def _listed(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{label} {len(items)}: {', '.join(items[:_SHOWN])}{more}"


def _fit(
    model: nn.Module, state: dict[str, torch.Tensor], head: str | None, in_channels: int, num_classes: int
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(the state dict to load, the lines of what was fitted, the mismatches that cannot be)."""
    target = model.state_dict()
    first_conv = next((k for k, t in target.items() if t.ndim == 4 and t.is_floating_point()), None)
    merged: dict[str, torch.Tensor] = {}
    missing, misshapen, fresh = [], [], []
    adapted: tuple[str, int, str] | None = None
    for key, mine in target.items():
        theirs = state.get(key)
        if theirs is None:
            if key.endswith("num_batches_tracked"):  # a counter older checkpoints do not carry
                merged[key] = mine
            else:
                missing.append(key)
            continue
        if theirs.shape == mine.shape:
            merged[key] = theirs
        elif (
            key == first_conv and theirs.ndim == 4 and mine.shape[1] == in_channels
            and (theirs.shape[0], *theirs.shape[2:]) == (mine.shape[0], *mine.shape[2:])
        ):  # fmt: skip
            merged[key], how = _adapt_channels(theirs, in_channels)
            adapted = (key.rpartition(".")[0], int(theirs.shape[1]), how)
        elif (
            (head is None or key == head or key.startswith(head + "."))
            and mine.ndim >= 1 and mine.shape[0] == num_classes and theirs.ndim == mine.ndim
            and theirs.shape[0] != num_classes
        ):  # fmt: skip
            merged[key] = mine  # the model's own fresh initialisation
            fresh.append((key, int(theirs.shape[0])))
        else:
            misshapen.append(f"{key} {tuple(theirs.shape)} vs {tuple(mine.shape)}")
    unexpected = [k for k in state if k not in target]
    problems = [_listed(label, items) for label, items in (
        ("missing", missing), ("unexpected", unexpected), ("shape file vs model", misshapen)) if items]  # fmt: skip
    notes = []
    if adapted is not None:
        layer, old, how = adapted
        notes.append(f"first convolution {layer} adapted: {old} -> {in_channels} input channels ({how})")
    if fresh:
        layers = list(dict.fromkeys(key.rpartition(".")[0] for key, _ in fresh))
        old = fresh[0][1]
        notes.append(
            f"classifier {', '.join(layers)} replaced: {old} -> {num_classes} classes (freshly initialised)"
        )
    return merged, notes, problems


def initialise(
    model: nn.Module, name: str, options: dict[str, Any], source: str, *, head: str | None,
    in_channels: int, num_classes: int,
) -> InitRecord:  # fmt: skip
    """Load ``source`` into ``model`` (registered as ``name``, built with ``options``), fitting what can
    be fitted; the record says what it read and did. Nothing is loaded unless everything fits."""
    from cnnkit.options import parse_options
    from cnnkit.registry import MODELS

    typed = parse_options(name, MODELS.get(name).options, options, kind="model")
    path, kind, state, meta = _read(source, name, typed, options)
    sha = sha256_of(path)
    _check_hub_hash(source, path, sha)
    target = model.state_dict()
    hint, left_out = "", ""
    if meta is None:
        state, left_out, hint = _renamed(state, target, name, typed)
    merged, notes, problems = _fit(model, state, head, in_channels, num_classes)
    if problems:
        raise WeightsError(
            f"--init-from {path} does not fit model {_describe(name, options)}{hint}: {'; '.join(problems)}"
        )
    model.load_state_dict(merged, strict=True)
    loaded = sum(1 for key in target if key in state and state[key].shape == target[key].shape)
    if meta is not None:
        what = f"cnnkit {meta.model} ({meta.dataset or 'unknown data'}, {meta.num_classes} classes)"
    elif source.startswith(TORCHVISION_PREFIX):
        what = f"torchvision's {source[len(TORCHVISION_PREFIX):]}"
    else:
        what = f"state dict{hint}"
    summary = f"initial weights: {what} from {path} (sha256 {sha[:12]}): {loaded} of {len(target)} tensors loaded"
    record = InitRecord(source, str(path.resolve()), sha, kind, [summary, *notes])
    if left_out:
        record.notes.append(left_out)
    return record


def _check_hub_hash(source: str, path: Path, sha: str) -> None:
    """torch hub's file names carry the first hex digits of their sha256: a damaged download is named."""
    if not source.startswith(TORCHVISION_PREFIX):
        return
    match = re.search(r"-([a-f0-9]+)\.", path.name)
    if match is not None and not sha.startswith(match[1]):
        raise WeightsError(
            f"--init-from {source}: {path} is damaged (its sha256 starts {sha[:len(match[1])]}, its name says "
            f"{match[1]}); delete it and fetch it again"
        )
