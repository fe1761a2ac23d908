"""What a run that starts from other weights adds to the driver, done before anything is written:
the checks of ``--freeze`` and ``--head-lr-mult``, the initial weights (``--init-from``, through
:mod:`cnnkit.weights_init`), and the two pieces the freezing handler and the optimiser share
(the head's parameters; freezing the rest)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from cnnkit._console import warn
from cnnkit.checkpoint import unwrap
from cnnkit.config import TrainConfig
from cnnkit.errors import UsageError
from cnnkit.protocols import DatasetSplits, model_head
from cnnkit.training.strategy import SingleDevice, Strategy

__all__ = ["Frozen", "check", "head_of", "head_parameters", "freeze_backbone", "start_weights"]


def head_of(config: TrainConfig) -> str | None:
    """Where the config's model keeps its head (the spec's ``head`` attribute), or None."""
    from cnnkit.registry import MODELS

    return model_head(MODELS.get(config.model))


def check(config: TrainConfig, model: nn.Module, strategy: Strategy) -> None:
    """UsageError (exit 2) for a freezing or head-rate request this model or run cannot honour."""
    if config.freeze_epochs is not None and config.freeze == "none":
        raise UsageError(f"--freeze-epochs {config.freeze_epochs} unfreezes a frozen backbone; add --freeze backbone")
    wants = [flag for flag, on in (("--freeze backbone", config.freeze != "none"),
                                   ("--head-lr-mult", config.head_lr_mult != 1)) if on]  # fmt: skip
    if not wants:
        return
    head = head_of(config)
    if head is None:
        raise UsageError(
            f"{' and '.join(wants)} need to know where model '{config.model}' keeps its head, and its spec does not "
            "say (a 'head' attribute naming the submodule; see docs/plugins.md)"
        )
    try:
        model.get_submodule(head)
    except AttributeError as exc:
        raise UsageError(
            f"model '{config.model}' says its head is '{head}', but the module it builds has no such submodule"
        ) from exc
    if config.freeze != "none":
        if not isinstance(strategy, SingleDevice):
            raise UsageError(
                "--freeze backbone trains in one process only (DDP fixes the trainable parameters when it wraps "
                "the model); drop --nproc or --freeze"
            )
        if config.init_from is None:
            warn("--freeze backbone without --init-from trains the head on a randomly initialised backbone")


def start_weights(
    model: nn.Module, config: TrainConfig, data: DatasetSplits, recorded: Mapping[str, Any] | None, say: bool
) -> dict[str, Any] | None:
    """Load ``config.init_from`` into the freshly built ``model`` (printing what was fitted when ``say``);
    the record config.json keeps. ``recorded``: a resumed run's own record (its weights are restored
    from its resume point instead)."""
    if config.init_from is None:
        return None
    if recorded is not None:
        return dict(recorded)
    from cnnkit.weights_init import initialise

    record = initialise(
        model, config.model, config.model_options, config.init_from, head=head_of(config),
        in_channels=data.channels, num_classes=len(data.classes),
    )  # fmt: skip
    if say:
        for line in record.notes:
            print(line, flush=True)
    return record.to_dict()


def head_parameters(model: nn.Module, head: str) -> list[nn.Parameter]:
    """The parameters of the head of ``model`` (also inside DDP or torch.compile wrappers)."""
    return list(unwrap(model).get_submodule(head).parameters())


def _keep_eval(module: nn.Module, args: Any) -> None:
    """A frozen BatchNorm normalises with its running statistics, and never updates them."""
    if module.training:
        module.train(False)


@dataclass
class Frozen:
    """The part of a model :func:`freeze_backbone` froze; :meth:`release` unfreezes it."""

    parameters: list[nn.Parameter]
    hooks: list[RemovableHandle] = field(default_factory=list)
    total: int = 0
    """Parameters (elements) of the whole model."""

    @property
    def trainable(self) -> int:
        return self.total - sum(p.numel() for p in self.parameters)

    def release(self) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(True)
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def freeze_backbone(model: nn.Module, head: str) -> Frozen:
    """Stop gradients everywhere but in ``head``, and keep the BatchNorm layers outside it in eval mode
    (a forward pre-hook: the trainer's ``model.train()`` each epoch cannot undo it)."""
    model = unwrap(model)
    head_module = model.get_submodule(head)
    in_head = {id(p) for p in head_module.parameters()}
    head_modules = {id(m) for m in head_module.modules()}
    parameters = [p for p in model.parameters() if p.requires_grad and id(p) not in in_head]
    for parameter in parameters:
        parameter.requires_grad_(False)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head_modules]
    hooks = [norm.register_forward_pre_hook(_keep_eval) for norm in norms]
    return Frozen(parameters, hooks, total=sum(p.numel() for p in model.parameters()))

