"""Training-batch augmentation on the device, one random draw per image, for whole batches at once.

torchvision's v2 transforms accept batched tensors but draw once per call: a batch would get one
crop, one TrivialAugment op and one erasing box for all its images. Here every draw is per image
(or, for mixup and cutmix, per batch as the papers and timm do) and comes from the loader's CPU
generator seeded by (seed, epoch), made for the *global* batch and then sliced to this process's
rows: one process, N processes and a resumed run see exactly the same images.

The pipeline, in order (each stage off unless the config turns it on):

1. ``crop-flip``: random crop of a zero-padded image (pad = side / 8) and a horizontal flip;
2. ``trivial`` / ``randaugment`` (after 1): TrivialAugmentWide (Müller & Hutter, ICCV 2021) or
   RandAugment (Cubuk et al., NeurIPS 2020), with torchvision's operation set and magnitude bins,
   on 0..1 images before normalisation (their colour operations are defined there);
3. normalisation (mean/std), when not already done for the whole chunk;
4. ``random_erasing``: a box of 2-33 % of the image, aspect 0.3-3.3, set to 0 after normalisation
   (the dataset's mean), with the given probability per image (Zhong et al., AAAI 2020);
5. ``mixup`` / ``cutmix`` (Zhang et al., ICLR 2018; Yun et al., ICCV 2019): each image mixed with
   its mirror in the global batch (``x.flip(0)``, as timm does); one lambda per batch from
   Beta(alpha, alpha); with both on, one of the two per batch. Labels become (B, K) probabilities.

The per-operation kernels reuse ``torchvision.transforms.v2.functional`` wherever it works on a
batch (equalize, autocontrast, and each colour operation's degenerate image); only the per-image
blend factors and the per-image affine matrices (one ``grid_sample`` for all geometric ops) are
written here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_MODES", "Augmentation", "Draws"]

AUGMENT_MODES = ("none", "crop-flip", "trivial", "randaugment")
_BINS = 31  # torchvision's magnitude bins for both policies
_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
_GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}

Draws = dict[str, torch.Tensor]
"""The random numbers of one global batch: per-image tensors (leading dimension = batch size) and
per-batch scalars (names starting with ``batch_``)."""


@functools.lru_cache(maxsize=16)
def _table(policy: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ops, bins) magnitudes and which operations take a random sign: made once per policy and
    size, not once per batch (building them was a third of a batch's draws). Never written to."""
    table = _magnitudes(policy, side)
    values = torch.stack([table[name] for name in _OPS])
    return values, torch.tensor([name in _SIGNED for name in _OPS])


def _magnitudes(policy: str, side: int) -> dict[str, torch.Tensor]:
    """The 31 magnitude bins of each operation, as torchvision's TrivialAugmentWide and RandAugment
    define them (translations in pixels, rotation in degrees, posterize in bits kept)."""
    wide = policy == "trivial"
    linspace = lambda stop: torch.linspace(0.0, stop, _BINS)  # noqa: E731
    bits = 6 if wide else 4
    return {
        "Identity": torch.zeros(_BINS),
        "ShearX": linspace(0.99 if wide else 0.3),
        "ShearY": linspace(0.99 if wide else 0.3),
        "TranslateX": linspace(32.0 if wide else 150.0 / 331.0 * side),
        "TranslateY": linspace(32.0 if wide else 150.0 / 331.0 * side),
        "Rotate": linspace(135.0 if wide else 30.0),
        "Brightness": linspace(0.99 if wide else 0.9),
        "Color": linspace(0.99 if wide else 0.9),
        "Contrast": linspace(0.99 if wide else 0.9),
        "Sharpness": linspace(0.99 if wide else 0.9),
        "Posterize": 8 - (torch.arange(_BINS) / ((_BINS - 1) / bits)).round(),
        "Solarize": torch.linspace(1.0, 0.0, _BINS),
        "AutoContrast": torch.zeros(_BINS),
        "Equalize": torch.zeros(_BINS),
    }


@dataclass(frozen=True)
class Augmentation:
    """What the training loader does to each batch (see the module docstring for the order)."""

    mode: str = "none"
    """One of :data:`AUGMENT_MODES`."""
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int = 0
    """Needed for the probability labels of mixup and cutmix."""

    def __post_init__(self) -> None:
        if self.mode not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, not {self.mode!r}")
        if self.mixing and self.num_classes < 1:
            raise ValueError("mixup and cutmix need num_classes")

    @classmethod
    def from_config(cls, config: Any, num_classes: int) -> Augmentation:
        """The training augmentation a run's config asks for."""
        return cls(
            mode=config.augment, randaugment_ops=config.randaugment_ops,
            randaugment_magnitude=config.randaugment_magnitude, random_erasing=config.random_erasing,
            mixup=config.mixup, cutmix=config.cutmix, num_classes=num_classes,
        )  # fmt: skip

    @property
    def active(self) -> bool:
        return self.mode != "none" or self.random_erasing > 0 or self.mixing

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def policy(self) -> bool:
        """TrivialAugment or RandAugment: needs the batch before normalisation."""
        return self.mode in ("trivial", "randaugment")

    # -- drawing (CPU generator, for the whole global batch) ----------------------------------------
    def draw(self, size: int, side: int, generator: torch.Generator) -> Draws:
        """Every random number batch augmentation needs for a global batch of ``size`` images of
        ``side`` px. The order of the draws is fixed (crop-flip first, as it always was).

        Only the generator's own calls happen here, once per batch; what follows from them (the
        flip and erase decisions, the operations' signed magnitudes) is worked out once per chunk
        of batches in :meth:`apply`: the derived ops were two thirds of a batch's draws, at ~10 us
        of fixed cost each."""
        draws: Draws = {}
        if self.mode != "none":
            pad = max(1, round(side / 8))
            draws["dy"] = torch.randint(0, 2 * pad + 1, (size,), generator=generator)
            draws["dx"] = torch.randint(0, 2 * pad + 1, (size,), generator=generator)
            draws["flip_u"] = torch.rand(size, generator=generator)  # flipped below 0.5
        if self.policy:
            rounds = self.randaugment_ops if self.mode == "randaugment" else 1
            # (size, rounds): image first, like every other per-image draw, so rows slice them.
            draws["op"] = torch.randint(0, len(_OPS), (size, rounds), generator=generator)
            if self.mode == "trivial":  # RandAugment's bin is its fixed magnitude
                draws["bin"] = torch.randint(0, _BINS, (size, rounds), generator=generator)
            draws["sign_u"] = torch.rand((size, rounds), generator=generator)  # negative below 0.5
        if self.random_erasing > 0:
            draws["erase_u"] = torch.rand(size, generator=generator)  # erased below the probability
            draws["erase_area"] = torch.empty(size).uniform_(0.02, 1 / 3, generator=generator)
            # exp here, on the global batch: on a process's rows its rounding could differ in the
            # last bit (vectorised or not by position), and every process must find the same boxes.
            draws["erase_ratio"] = torch.empty(size).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator).exp()
            draws["erase_top"] = torch.rand(size, generator=generator)
            draws["erase_left"] = torch.rand(size, generator=generator)
        if self.mixing:
            # torch has no seeded Beta sampler: a seed drawn from the generator feeds numpy's.
            import numpy as np

            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
            use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
            alpha = self.cutmix if use_cutmix else self.mixup
            lam = float(rng.beta(alpha, alpha))
            # (cutmix or not, lambda, box centre y, x) in one tensor: one allocation, not four.
            draws["batch_mix"] = torch.tensor([float(use_cutmix), lam, rng.random(), rng.random()])
        return draws

    @staticmethod
    def mixing_of(draws: Draws) -> tuple[bool, float, float, float]:
        """A mixed batch's (cutmix?, lambda, box centre y, box centre x) from its draws."""
        cut, lam, cy, cx = draws["batch_mix"].tolist()
        return bool(cut), lam, cy, cx

    def magnitudes(self, draws: Draws, side: int) -> torch.Tensor:
        """(images, rounds) signed magnitude of each image's TrivialAugment/RandAugment operations."""
        values, signed = _table(self.mode, side)  # (ops, bins), (ops,)
        op = draws["op"]
        bins = draws["bin"] if "bin" in draws else torch.full_like(op, self.randaugment_magnitude)
        value = values[op, bins]
        return torch.where(signed[op] & (draws["sign_u"] < 0.5), -value, value)

    @staticmethod
    def rows(draws: Draws, rows: slice) -> Draws:
        """The per-image draws of rows ``rows`` of a global batch."""
        mine = {k: v for k, v in draws.items() if not k.startswith("batch_")}
        size = len(next(iter(mine.values()))) if mine else 0
        if rows.indices(size) == (0, size, 1):  # one process's whole batch: no views to make
            return mine
        return {k: v[rows] for k, v in mine.items()}

    @staticmethod
    def concat(parts: list[Draws]) -> Draws:
        """Per-image draws of several row ranges, in order (the rows of a chunk of batches)."""
        if len(parts) == 1:
            return dict(parts[0])
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]} if parts else {}

    # -- applying (on the device) ---------------------------------------------------------------
    def apply(
        self,
        x: torch.Tensor,
        draws: Draws,
        rows: slice = slice(None),
        *,
        normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
        pad_value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stages 1-4 for ``x``, the rows ``rows`` of the draws' images. ``normalize``: (mean, std)
        when ``x`` is still 0..1 and must be normalised here; ``pad_value``: a black pixel in ``x``."""
        # The draws stay on the CPU: choosing images there (each operation's, the flipped and the
        # erased ones) costs the device no sync; only what the kernels read is moved.
        mine = self.rows(draws, rows)
        if self.mode != "none":
            x = _crop_flip(x, mine["dy"], mine["dx"], mine["flip_u"] < 0.5, pad_value)
        if self.policy:
            value = self.magnitudes(mine, x.shape[-1])
            for round_ in range(mine["op"].shape[1]):
                x = _apply_ops(x, mine["op"][:, round_], value[:, round_])
        if normalize is not None:
            x = x.sub(normalize[0]).div_(normalize[1])
        if self.random_erasing > 0:
            # In place on a tensor of this method's own; the caller's is copied first.
            fresh = self.mode != "none" or normalize is not None
            x = _erase(x if fresh else x.clone(), mine, self.random_erasing)
        return x

    def mix(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        partner: tuple[torch.Tensor, torch.Tensor],
        batches: Sequence[tuple[Draws, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 5 for consecutive batches at once: ``x``'s rows are ``batches[0][1]`` rows of the
        batch drawn as ``batches[0][0]``, then the next batch's, ...; each row is mixed with the
        same row of ``partner`` (images and labels, already in partner order) by its batch's lambda
        (mixup) or box (cutmix). The labels become probabilities (rows, num_classes).

        Images batch by batch (a batch's images stay in the cache between the reads and the write;
        one interpolation over a whole chunk, with a per-pixel weight for cutmix's box, measured 1.4x
        slower than this on a CPU), the labels for all the rows at once."""
        other, other_labels = partner
        h, w = x.shape[-2:]
        mixed = torch.empty_like(x)
        lams: list[float] = []
        start = 0
        for draws, count in batches:
            use_cutmix, lam, centre_y, centre_x = self.mixing_of(draws)
            rows = slice(start, start + count)
            start += count
            if use_cutmix:
                cut = math.sqrt(1.0 - lam)
                ch, cw = int(h * cut), int(w * cut)
                cy, cx = int(centre_y * h), int(centre_x * w)
                top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
                left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
                mixed[rows] = x[rows]
                mixed[rows, :, top:bottom, left:right] = other[rows, :, top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # the area actually pasted
            else:
                torch.lerp(other[rows], x[rows], lam, out=mixed[rows])
            lams.append(lam)
        weight = torch.tensor(lams).repeat_interleave(torch.tensor([count for _, count in batches]))
        target = torch.lerp(
            F.one_hot(other_labels, self.num_classes).float(), F.one_hot(labels, self.num_classes).float(),
            weight.to(labels.device).view(-1, 1),
        )
        return mixed, target


def _crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad_value: torch.Tensor | None
) -> torch.Tensor:
    """Random crop from a padded image and a horizontal flip, per example."""
    b, c, h, w = x.shape
    if b == 0:
        return x
    pad = max(1, round(max(h, w) / 8))
    height, width = h + 2 * pad, w + 2 * pad
    padded = F.pad(x, (pad, pad, pad, pad)).contiguous()
    if pad_value is not None:
        # Zero-padded, then the value added on the border only (0 + v is v, x + 0 is x, exactly):
        # one pass, where filling a new tensor and copying the image into its middle took three.
        border = torch.ones((1, 1, height, width), device=x.device)
        border[..., pad : pad + h, pad : pad + w] = 0
        padded.add_(border * pad_value)
    # Every window of every image as one overlapping view, indexed by its first element: image i's
    # window at (dy, dx) starts at i * image + dy * width + dx. One index_select copies whole windows
    # (4x faster than indexing an unfold view per pixel, which this replaced); then the flipped
    # images alone are flipped.
    image = c * height * width
    span = (c - 1) * height * width + (h - 1) * width + w
    windows = padded.as_strided((padded.numel() - span + 1, c, h, w), (1, height * width, width, 1))
    starts = torch.arange(b) * image + dy * width + dx
    out = windows.index_select(0, starts.to(x.device))
    flipped = flip.nonzero().view(-1).to(x.device)
    return out.index_copy_(0, flipped, out.index_select(0, flipped).flip(3))


def _apply_ops(x: torch.Tensor, ops: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Operation ``_OPS[ops[i]]`` with value ``values[i]`` on image i (0..1 floats); ``ops`` and
    ``values`` are on the CPU, so choosing each operation's images costs the device no sync.

    The batch is sorted by operation once (one gather), each operation works in place on its
    contiguous slice, and one scatter puts the images back: two copies of the batch in all,
    instead of a gather and a scatter per operation (on a CPU at 28 px those dominated)."""
    import torchvision.transforms.v2.functional as TF

    order = torch.argsort(ops, stable=True)
    counts = torch.bincount(ops, minlength=len(_OPS)).tolist()
    where = order.to(x.device)
    xs, vs = x.index_select(0, where), values[order]
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    # The geometric operations are consecutive in _OPS: one grid_sample for all their images.
    first, last = _OPS.index("ShearX"), _OPS.index("Rotate")
    lo, hi = bounds[first], bounds[last + 1]
    if hi > lo:
        xs[lo:hi] = _affine(xs[lo:hi], ops[order][lo:hi], vs[lo:hi])
    value_on_device = vs.to(x.device).view(-1, 1, 1, 1)
    for k, name in enumerate(_OPS):
        lo, hi = bounds[k], bounds[k + 1]
        if name in _GEOMETRIC or name == "Identity" or hi == lo:
            continue
        part, value = xs[lo:hi], value_on_device[lo:hi]
        if name == "Brightness":
            part = _blend(torch.zeros_like(part), part, 1.0 + value)
        elif name == "Color":
            part = _blend(TF.adjust_saturation(part, 0.0), part, 1.0 + value) if part.shape[1] == 3 else part
        elif name == "Contrast":
            part = _blend(TF.adjust_contrast(part, 0.0), part, 1.0 + value)
        elif name == "Sharpness":
            part = _blend(_smoothed(part), part, 1.0 + value)
        elif name == "Posterize":
            # Bits kept differ per image: the low bits masked off by hand (an AND with 256 - 2^dropped,
            # exactly torchvision's floor(v / 2^dropped) * 2^dropped; integer division cost 10x more).
            mask = (256 - 2 ** (8 - value)).to(torch.uint8)
            part = part.mul(255).round_().to(torch.uint8).bitwise_and_(mask).float().div_(255)
        elif name == "Solarize":
            part = torch.where(part >= value, 1.0 - part, part)
        elif name == "AutoContrast":
            part = TF.autocontrast(part)
        elif name == "Equalize":
            part = TF.equalize(part)
        xs[lo:hi] = part
    # Back in batch order by a gather with the inverse permutation (index_copy_ cost twice as much).
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return xs.index_select(0, inverse.to(x.device))


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (what torchvision's sharpness blends with): the 3x3 kernel of ones with 5
    in the centre, over 13, borders kept. As a 3x3 box sum (three shifted row sums, then three
    shifted column sums) plus 4x the centre: a depthwise convolution cost 30x more on a CPU, and
    ``avg_pool2d`` 7x more."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x
    out = x.clone()
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4.0).div_(13.0)
    return out


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor * (image - degenerate)``, clamped to 0..1."""
    return degenerate.add(image.sub(degenerate).mul_(factor)).clamp_(0.0, 1.0)


def _affine(x: torch.Tensor, ops: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Shear, translate or rotate each image about its centre (nearest neighbour, black fill, as
    torchvision's policies do), all in one ``grid_sample`` with a matrix per image (made on the CPU
    from ``ops`` and ``values``, then moved)."""
    b, _, h, w = x.shape
    kind = {name: ops == _OPS.index(name) for name in _GEOMETRIC}
    v = values.float()
    angle = torch.where(kind["Rotate"], v, 0.0).deg2rad()
    cos, sin = angle.cos(), angle.sin()
    # theta maps output coordinates to input ones in [-1, 1] (the inverse of the transform); the
    # h/w factors keep shears and rotations true in pixels on non-square images.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = cos, cos
    theta[:, 0, 1] = torch.where(kind["ShearX"], -v, -sin) * h / w
    theta[:, 1, 0] = torch.where(kind["ShearY"], -v, sin) * w / h
    theta[:, 0, 2] = torch.where(kind["TranslateX"], -2.0 * v / w, 0.0)
    theta[:, 1, 2] = torch.where(kind["TranslateY"], -2.0 * v / h, 0.0)
    theta = theta.to(x.device).view(b, 2, 3, 1, 1)
    # The sampling grid by broadcasting (affine_grid's batched matmul is slow on a CPU for this):
    # a column term plus a row-and-offset term, so only one pass per coordinate is image-sized,
    # written straight into the grid. (The same sums as a * x + b * y + c: one of the two
    # products or the offset is 0 for every single operation.)
    ys = (torch.arange(h, device=x.device, dtype=torch.float32) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) * 2 + 1) / w - 1
    grid = x.new_empty((b, h, w, 2))
    for axis in (0, 1):
        torch.add(theta[:, axis, 0] * xs.view(1, 1, w), theta[:, axis, 1] * ys.view(1, h, 1) + theta[:, axis, 2],
                  out=grid[..., axis])  # fmt: skip
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _erase(x: torch.Tensor, draws: Draws, probability: float) -> torch.Tensor:
    """Random erasing, in place: each chosen image's box set to 0 (after normalisation: the
    dataset's mean). Only the chosen images (a quarter at p = 0.25) are copied out, masked and put back: a mask and
    a fill over the whole chunk cost 2.5x more."""
    _, _, h, w = x.shape
    chosen = (draws["erase_u"] < probability).nonzero().view(-1)
    if chosen.numel() == 0:
        return x
    area, ratio = draws["erase_area"][chosen], draws["erase_ratio"][chosen]
    eh = (area * ratio).sqrt().mul(h).round().clamp(1, h)
    ew = (area / ratio).sqrt().mul(w).round().clamp(1, w)
    top = (draws["erase_top"][chosen] * (h - eh + 1)).floor()
    left = (draws["erase_left"][chosen] * (w - ew + 1)).floor()
    # The boxes are worked out on the CPU (a few numbers an image); the masks on the device.
    eh, ew, top, left, chosen = (t.to(x.device) for t in (eh, ew, top, left, chosen))
    ys = torch.arange(h, device=x.device).view(1, h)
    xs = torch.arange(w, device=x.device).view(1, w)
    # The box is a row range times a column range: two small masks, one AND of image size.
    rows = (ys >= top.view(-1, 1)) & (ys < (top + eh).view(-1, 1))
    cols = (xs >= left.view(-1, 1)) & (xs < (left + ew).view(-1, 1))
    inside = rows.view(-1, 1, h, 1) & cols.view(-1, 1, 1, w)
    return x.index_copy_(0, chosen, x.index_select(0, chosen).masked_fill_(inside, 0.0))
