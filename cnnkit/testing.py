"""Contract checks for plugin authors: call them from your own tests.

.. code-block:: python

    from cnnkit.testing import check_dataset_spec, check_model_spec

    def test_model_contract():
        check_model_spec(EFFICIENTNET_B0)

    def test_dataset_contract(tmp_path):
        check_dataset_spec(MY_DATASET, data=make_tiny_copy(tmp_path))

Each check raises ``AssertionError`` with a message naming the spec and what to fix, so any test
runner reports it; the module itself does not need pytest. cnnkit runs the same checks on every
built-in, and ``cnnkit plugins check DIST`` runs them on an installed distribution's entries
(``check_dataset_attributes`` and ``check_trainer`` check what needs neither data nor training).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from cnnkit.errors import UsageError
from cnnkit.protocols import DatasetSpec, DatasetSplits, ImageTensors, ModelSpec, Recipe, Trainer

__all__ = ["check_model_spec", "check_dataset_spec", "write_fashion_mnist_folder", "check_dataset_attributes", "check_trainer"]

_UNKNOWN_OPTION = "cnnkit_contract_check_no_such_option"
_BATCH = 2  # the smallest batch that batch norm can train on


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _check_text(owner: str, spec: object, attribute: str, *, allow_empty: bool = False) -> None:
    value = getattr(spec, attribute, None)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        _fail(f"{owner}: '{attribute}' must be a non-empty str, got {value!r}")


def _check_options_schema(owner: str, options: object) -> type[BaseModel]:
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        _fail(f"{owner}: 'options' must be a pydantic BaseModel class, got {options!r}")
    if options.model_config.get("extra") != "forbid":
        _fail(
            f"{owner}: options model {options.__name__} must reject unknown keys; "
            f'set model_config = ConfigDict(extra="forbid")'
        )
    undocumented = [name for name, info in options.model_fields.items() if not (info.description or "").strip()]
    if undocumented:
        _fail(
            f"{owner}: options {', '.join(undocumented)} of {options.__name__} have no description; "
            f"add Field(..., description='...') (cnnkit shows it in 'cnnkit list')"
        )
    try:
        options()
    except ValidationError as exc:
        _fail(f"{owner}: options model {options.__name__} needs a default for every field ({exc.error_count()} missing)")
    return options


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _pairs(in_channels: Sequence[int], num_classes: Sequence[int]) -> list[tuple[int, int]]:
    # Each value of either sequence appears at least once, without the full product of real builds.
    count = max(len(in_channels), len(num_classes))
    return [(in_channels[i % len(in_channels)], num_classes[i % len(num_classes)]) for i in range(count)]


def _check_output(owner: str, output: object, batch: int, num_classes: int) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        _fail(f"{owner}: forward returned {type(output).__name__}, expected a logits tensor")
    if tuple(output.shape) != (batch, num_classes):
        _fail(f"{owner}: forward gave shape {tuple(output.shape)}, expected (N, num_classes) = ({batch}, {num_classes})")
    if not output.is_floating_point():
        _fail(f"{owner}: forward gave dtype {output.dtype}, expected floating-point logits")
    if output.device.type != "meta" and not torch.isfinite(output).all():
        _fail(f"{owner}: forward gave non-finite logits (NaN or inf) on a random batch; check the initialisation")
    return output


def _check_real_step(
    owner: str, spec: ModelSpec, channels: int, classes: int, side: int, options: dict[str, Any], device: torch.device
) -> None:
    generator = torch.Generator().manual_seed(0)
    model = spec.build(channels, classes, **options).to(device)
    model.train()
    images = torch.randn(_BATCH, channels, side, side, generator=generator).to(device)
    targets = torch.randint(0, classes, (_BATCH,), generator=generator).to(device)
    try:
        logits = model(images)
    except Exception as exc:  # the model's own code can raise anything
        _fail(
            f"{owner}: forward in train mode on a {_BATCH}x{channels}x{side}x{side} batch raised "
            f"{type(exc).__name__}: {exc}"
        )
    _check_output(owner, logits, _BATCH, classes)
    nn.functional.cross_entropy(logits, targets).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        _fail(f"{owner}: the model has no trainable parameters")
    missing = [name for name, p in trainable if p.grad is None]
    if missing:
        _fail(
            f"{owner}: {len(missing)} parameters got no gradient (first: {missing[0]}); "
            f"remove unused modules or make forward use them"
        )
    bad = [name for name, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        _fail(f"{owner}: non-finite gradients in {len(bad)} parameters (first: {bad[0]})")
    # Prediction and evaluation run single images in eval mode.
    model.eval()
    with torch.no_grad():
        try:
            single = model(images[:1])
        except Exception as exc:  # the model's own code can raise anything
            _fail(f"{owner}: forward in eval mode on one image raised {type(exc).__name__}: {exc}")
    _check_output(owner, single, 1, classes)


def _check_head(owner: str, model: nn.Module, head: str, classes: int) -> None:
    try:
        module = model.get_submodule(head)
    except AttributeError:
        _fail(f"{owner}: 'head' is {head!r}, but the built module has no such submodule")
    last = list(module.parameters())[-1:]
    if not last or last[0].shape[0] != classes:
        _fail(f"{owner}: the head {head!r} must end in the layer whose outputs are the {classes} classes")


def check_model_spec(
    spec: ModelSpec,
    *,
    in_channels: Sequence[int] = (1, 3),
    num_classes: Sequence[int] = (10, 7),
    input_size: int | None = None,
    options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Check that ``spec`` honours cnnkit's ``ModelSpec`` contract; ``AssertionError`` says what is wrong.

    Checked: the protocol attributes (``name`` a str; ``summary`` and ``paper`` non-empty;
    ``recipe`` a :class:`~cnnkit.protocols.Recipe`; the optional ``head`` the path of a submodule that
    ends in the layer whose outputs are the classes; ``options`` a pydantic model that forbids
    unknown keys, documents each field and has all defaults); ``build()`` on the ``meta`` device
    for every combination of ``in_channels`` and ``num_classes`` returns an ``nn.Module`` whose
    tensors all live on ``meta`` (``cnnkit summary`` relies on that) and maps
    (2, C, S, S) to (2, num_classes); a real forward in train mode on a random batch of 2 gives
    finite logits and every trainable parameter a finite gradient, and one image in eval mode
    works (run once per ``in_channels`` value, paired with ``num_classes`` in turn); an unknown
    option raises :class:`cnnkit.errors.UsageError`.

    ``input_size`` is the square side S (default: the recipe's); ``options`` go to every
    ``build()``; ``device`` runs the real forward elsewhere than the CPU.
    """
    owner = f"model '{getattr(spec, 'name', spec)}'"
    _check_text(owner, spec, "name")
    owner = f"model '{spec.name}'"
    _check_text(owner, spec, "summary")
    _check_text(owner, spec, "paper")
    recipe = getattr(spec, "recipe", None)
    if not isinstance(recipe, Recipe):
        _fail(f"{owner}: 'recipe' must be a cnnkit.protocols.Recipe, got {type(recipe).__name__}")
    schema = _check_options_schema(owner, getattr(spec, "options", None))
    if not callable(getattr(spec, "build", None)):
        _fail(f"{owner}: has no build(in_channels, num_classes, **options) method")
    if not isinstance(spec, ModelSpec):
        _fail(f"{owner}: does not satisfy cnnkit.protocols.ModelSpec")
    head = getattr(spec, "head", None)
    if head is not None and (not isinstance(head, str) or not head):
        _fail(f"{owner}: 'head' must be the dotted path of a submodule (e.g. 'fc') or None, got {head!r}")
    options = dict(options or {})
    try:
        schema(**options)
    except ValidationError as exc:
        _fail(f"{owner}: the options passed to the check do not validate against {schema.__name__}: {exc}")
    side = input_size if input_size is not None else recipe.input_size
    if not in_channels or not num_classes:
        _fail("check_model_spec: in_channels and num_classes need at least one value each")

    for channels in in_channels:
        for classes in num_classes:
            where = f"{owner} (in_channels={channels}, num_classes={classes}, options={options})"
            with torch.device("meta"):
                model = spec.build(channels, classes, **options)
                if not isinstance(model, nn.Module):
                    _fail(f"{where}: build() returned {type(model).__name__}, expected an nn.Module")
                model.eval()
                try:
                    output = model(torch.empty(_BATCH, channels, side, side))
                except Exception as exc:  # the model's own code can raise anything
                    _fail(
                        f"{where}: forward on the meta device at {channels}x{side}x{side} raised "
                        f"{type(exc).__name__}: {exc}; pass a valid input_size or fix the model"
                    )
            _check_output(where, output, _BATCH, classes)
            if head is not None:
                _check_head(where, model, head, classes)
            elsewhere = [f"{name} ({t.device})" for name, t in _tensors(model) if t.device.type != "meta"]
            if elsewhere:
                _fail(
                    f"{where}: build() under torch.device('meta') put {len(elsewhere)} tensors elsewhere "
                    f"(first: {elsewhere[0]}); create tensors without an explicit device"
                )

    target = torch.device(device)
    for channels, classes in _pairs(in_channels, num_classes):
        where = f"{owner} (in_channels={channels}, num_classes={classes}, options={options})"
        _check_real_step(where, spec, channels, classes, side, options, target)

    def build_with_unknown_option() -> None:
        with torch.device("meta"):
            spec.build(in_channels[0], num_classes[0], **{_UNKNOWN_OPTION: 1})

    _expect_usage_error(owner, "build()", build_with_unknown_option)


def _check_split(owner: str, split_name: str, split: object, num_classes: int) -> ImageTensors:
    where = f"{owner}: split '{split_name}'"
    if not isinstance(split, ImageTensors):
        _fail(f"{where} is {type(split).__name__}, expected cnnkit.protocols.ImageTensors")
    images, labels = split.images, split.labels
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        _fail(f"{where}: images must be a uint8 tensor (N, C, H, W), got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        _fail(f"{where}: labels must be an int64 tensor (N,), got {got}")
    if images.shape[0] != labels.shape[0]:
        _fail(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if len(split) == 0:
        _fail(f"{where} is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        _fail(f"{where}: labels span {low}..{high}, outside 0..{num_classes - 1} for {num_classes} classes")
    return split


def _check_statistics(owner: str, name: str, claimed: object, actual: list[float], channels: int) -> None:
    if not isinstance(claimed, tuple) or len(claimed) != channels:
        _fail(f"{owner}: '{name}' must be a tuple with one float per channel ({channels}), got {claimed!r}")
    for channel, (value, truth) in enumerate(zip(claimed, actual, strict=True)):
        if not isinstance(value, float) or not math.isfinite(value):
            _fail(f"{owner}: {name}[{channel}] must be a finite float, got {value!r}")
        # Loaders may estimate from a sample; a wrong scale (0..255) or a swap is what matters.
        if abs(value - truth) > 0.02:
            _fail(
                f"{owner}: {name}[{channel}] is {value:.4f} but the training images give {truth:.4f} "
                f"(on the 0..1 scale)"
            )


def check_dataset_attributes(spec: DatasetSpec) -> None:
    """The part of :func:`check_dataset_spec` that needs no data files: ``name`` and ``summary``
    non-empty str; ``classes`` a tuple of str; ``channels`` a positive int; ``image_size`` a pair of
    ints; ``options`` a pydantic model that forbids unknown keys, documents each field and has all
    defaults; callable ``locate()`` and ``load()``. ``AssertionError`` says what is wrong."""
    owner = f"dataset '{getattr(spec, 'name', spec)}'"
    _check_text(owner, spec, "name")
    owner = f"dataset '{spec.name}'"
    _check_text(owner, spec, "summary")
    declared = getattr(spec, "classes", None)
    if not isinstance(declared, tuple) or not all(isinstance(c, str) for c in declared):
        _fail(f"{owner}: 'classes' must be a tuple of str (empty when the files name them), got {declared!r}")
    channels = getattr(spec, "channels", None)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        _fail(f"{owner}: 'channels' must be a positive int, got {channels!r}")
    size = getattr(spec, "image_size", None)
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s >= 0 for s in size)):
        _fail(f"{owner}: 'image_size' must be (height, width) ints, (0, 0) when sizes vary; got {size!r}")
    _check_options_schema(owner, getattr(spec, "options", None))
    for method in ("locate", "load"):
        if not callable(getattr(spec, method, None)):
            _fail(f"{owner}: has no {method}() method")
    if not isinstance(spec, DatasetSpec):
        _fail(f"{owner}: does not satisfy cnnkit.protocols.DatasetSpec")


def check_trainer(trainer: Trainer) -> None:
    """Check that ``trainer`` (an instance) honours cnnkit's ``Trainer`` protocol without training:
    ``name`` and ``summary`` non-empty str; ``options`` a pydantic model that forbids unknown keys,
    documents each field and has all defaults; a callable ``fit(model, data, config, run)``; the
    optional ``state_dict``/``load_state_dict`` both or neither.
    ``AssertionError`` says what is wrong."""
    if isinstance(trainer, type):
        _fail(f"trainer {trainer.__name__}: pass an instance (cnnkit creates one with no arguments)")
    owner = f"trainer '{getattr(trainer, 'name', trainer)}'"
    _check_text(owner, trainer, "name")
    owner = f"trainer '{trainer.name}'"
    _check_text(owner, trainer, "summary")
    _check_options_schema(owner, getattr(trainer, "options", None))
    fit = getattr(trainer, "fit", None)
    if not callable(fit):
        _fail(f"{owner}: has no fit(model, data, config, run) method")
    try:
        signature = inspect.signature(fit)
    except ValueError:
        signature = None  # a builtin or C callable without a signature: nothing to check
    if signature is not None:
        try:
            signature.bind(None, None, None, None)
        except TypeError:
            _fail(f"{owner}: fit({', '.join(signature.parameters)}) must take (model, data, config, run)")
    own = [name for name in ("state_dict", "load_state_dict") if callable(getattr(trainer, name, None))]
    if len(own) == 1:
        other = ({"state_dict", "load_state_dict"} - set(own)).pop()
        _fail(f"{owner}: has {own[0]}() but no {other}(); a trainer's own state needs both (see docs/plugins.md)")
    if not isinstance(trainer, Trainer):
        _fail(f"{owner}: does not satisfy cnnkit.protocols.Trainer")


def check_dataset_spec(spec: DatasetSpec, data: Path | None = None, **options: Any) -> None:
    """Check that ``spec`` honours cnnkit's ``DatasetSpec`` contract; ``AssertionError`` says what is wrong.

    Checked: the attributes (:func:`check_dataset_attributes`); ``load(data, **options)`` returns a
    :class:`~cnnkit.protocols.DatasetSplits` whose splits hold uint8 (N, C, H, W) images and
    int64 (N,) labels within the class list, train and test with the same C, H, W; ``classes``
    unique non-empty names, equal to the spec's when it declares them; for fixed-format datasets
    (``image_size`` not (0, 0)) images of the declared channels and size; ``mean`` and ``std``
    one float per channel, matching the training images on the 0..1 scale within 0.02; an
    unknown option raises :class:`cnnkit.errors.UsageError`.
    """
    check_dataset_attributes(spec)
    owner = f"dataset '{spec.name}'"
    declared, channels, size = spec.classes, spec.channels, spec.image_size

    splits = spec.load(data, **options)
    if not isinstance(splits, DatasetSplits):
        _fail(f"{owner}: load() returned {type(splits).__name__}, expected cnnkit.protocols.DatasetSplits")
    classes = splits.classes
    if not isinstance(classes, tuple) or not classes or not all(isinstance(c, str) and c for c in classes):
        _fail(f"{owner}: loaded 'classes' must be a non-empty tuple of non-empty str, got {classes!r}")
    if len(set(classes)) != len(classes):
        _fail(f"{owner}: loaded class names repeat: {classes!r}")
    if declared and classes != declared:
        _fail(f"{owner}: loaded classes {classes!r} differ from the spec's {declared!r}")
    train = _check_split(owner, "train", splits.train, len(classes))
    test = _check_split(owner, "test", splits.test, len(classes))
    if train.images.shape[1:] != test.images.shape[1:]:
        _fail(
            f"{owner}: train images are {tuple(train.images.shape[1:])} but test images "
            f"{tuple(test.images.shape[1:])}; both splits must share C, H, W"
        )
    c, h, w = (int(d) for d in train.images.shape[1:])
    height, width = size
    if (height, width) != (0, 0) and ((h, w) != (height, width) or c != channels):
        _fail(f"{owner}: images are {c}x{h}x{w} but the spec declares {channels}x{height}x{width}")
    if not isinstance(splits.split_files, dict):
        _fail(f"{owner}: 'split_files' must map split name -> file list, got {type(splits.split_files).__name__}")

    # Exact statistics in float64, one channel at a time to bound memory on large datasets.
    means, stds = [], []
    for channel in range(c):
        values = train.images[:, channel].to(torch.float64).div_(255)
        means.append(float(values.mean()))
        stds.append(float(values.std(correction=0)))
    _check_statistics(owner, "mean", splits.mean, means, c)
    _check_statistics(owner, "std", splits.std, stds, c)

    _expect_usage_error(owner, "load()", lambda: spec.load(data, **options, **{_UNKNOWN_OPTION: 1}))


def _expect_usage_error(owner: str, what: str, call: Callable[[], object]) -> None:
    """``call`` passes an unknown option: it must raise UsageError (a one-line exit 2), nothing else."""
    try:
        call()
    except UsageError:
        return
    except Exception as exc:  # anything but UsageError would show the user a traceback
        _fail(f"{owner}: an unknown option raised {type(exc).__name__}, expected cnnkit.errors.UsageError")
    _fail(f"{owner}: {what} accepted the unknown option '{_UNKNOWN_OPTION}'; raise cnnkit.errors.UsageError")


def write_fashion_mnist_folder(folder: Path, train: int = 320, test: int = 80, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST-format folder (the four gzipped IDX files, 28x28, 10 classes) for tests.

    Each class is a bright horizontal band at its own rows over noise, so a small model learns it in
    an epoch or two. Pass the folder as ``--data`` with the ``fashion-mnist`` dataset.
    """
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = torch.arange(n) % 10
        images = torch.rand(n, 28, 28, generator=generator) * 80
        for c in range(10):
            images[labels == c, 2 * c + 3 : 2 * c + 7, :] += 150
        pixels = images.clamp(0, 255).to(torch.uint8).numpy().tobytes()
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb", compresslevel=1) as handle:
            handle.write(struct.pack(">IIII", 2051, n, 28, 28) + pixels)
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb", compresslevel=1) as handle:
            handle.write(struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())
    return folder
