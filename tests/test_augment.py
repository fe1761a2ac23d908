"""Batch augmentation (cnnkit.data.augment): one draw per image, the operations as torchvision defines
them, random erasing, mixup and cutmix, and the same images for one process or several."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cnnkit.data.augment import _OPS, Augmentation, _apply_ops
from cnnkit.data.batches import BatchLoader
from cnnkit.protocols import ImageTensors


def images(n: int = 8, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def one_op(x: torch.Tensor, name: str, value: float) -> torch.Tensor:
    n = x.shape[0]
    return _apply_ops(x, torch.full((n,), _OPS.index(name)), torch.full((n,), float(value)))


@pytest.mark.parametrize(
    ("name", "value", "reference"),
    [
        ("Brightness", 0.4, lambda x: TF.adjust_brightness(x, 1.4)),
        ("Brightness", -0.5, lambda x: TF.adjust_brightness(x, 0.5)),
        ("Color", 0.7, lambda x: TF.adjust_saturation(x, 1.7)),
        ("Contrast", -0.3, lambda x: TF.adjust_contrast(x, 0.7)),
        ("Sharpness", 0.9, lambda x: TF.adjust_sharpness(x, 1.9)),
        ("Solarize", 0.6, lambda x: TF.solarize(x, 0.6)),
        ("AutoContrast", 0.0, TF.autocontrast),
        ("Equalize", 0.0, TF.equalize),
        ("Identity", 0.0, lambda x: x),
    ],
)
def test_colour_operations_match_torchvision(name: str, value: float, reference: Any) -> None:
    x = images()
    assert torch.allclose(one_op(x, name, value), reference(x).clamp(0, 1), atol=1e-6)


def test_posterize_keeps_the_top_bits_like_torchvision() -> None:
    x = images()
    expected = TF.posterize((x * 255).round().to(torch.uint8), 3).float() / 255
    assert torch.equal(one_op(x, "Posterize", 3), expected)


def test_translation_shifts_by_whole_pixels_and_fills_black() -> None:
    x = images(2, 1, 8)
    moved = one_op(x, "TranslateX", 2)
    assert torch.equal(moved[..., 2:], x[..., :-2]) and (moved[..., :2] == 0).all()
    moved = one_op(x, "TranslateY", -3)
    assert torch.equal(moved[..., :-3, :], x[..., 3:, :]) and (moved[..., -3:, :] == 0).all()


def test_a_quarter_turn_is_a_rotation_of_the_pixel_grid() -> None:
    x = images(2, 1, 8)
    turned = one_op(x, "Rotate", 90)
    assert torch.equal(turned, torch.rot90(x, 1, (-2, -1))) or torch.equal(turned, torch.rot90(x, -1, (-2, -1)))


def test_each_image_gets_its_own_operation_and_magnitude() -> None:
    # torchvision's v2 TrivialAugmentWide on a batch tensor would give every image the same op.
    same = images(1).expand(64, -1, -1, -1).contiguous()
    plan = Augmentation(mode="trivial")
    draws = plan.draw(64, 16, torch.Generator().manual_seed(0))
    assert len(set(draws["op"][:, 0].tolist())) > 8
    out = plan.apply(same, draws, slice(0, 64))
    distinct = {tuple(row.flatten()[:64].tolist()) for row in out}
    assert len(distinct) > 32


def test_randaugment_applies_n_operations_at_magnitude_m() -> None:
    plan = Augmentation(mode="randaugment", randaugment_ops=3, randaugment_magnitude=30)
    draws = plan.draw(16, 16, torch.Generator().manual_seed(1))
    assert draws["op"].shape == (16, 3)
    rotations = plan.magnitudes(draws, 16)[draws["op"] == _OPS.index("Rotate")]
    assert rotations.numel() == 0 or (rotations.abs() == 30).all()  # the top bin of RandAugment's 30 degrees


def test_random_erasing_sets_one_box_per_chosen_image_to_zero() -> None:
    plan = Augmentation(random_erasing=0.5)
    x = images(400, 1, 20) + 1.0  # no pixel is 0 before erasing
    out = plan.apply(x, plan.draw(400, 20, torch.Generator().manual_seed(2)), slice(0, 400))
    erased = (out == 0).flatten(1)
    chosen = erased.any(1)
    assert 0.4 < chosen.float().mean() < 0.6
    for image in out[chosen][:50, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == rows.numel()  # a filled rectangle
        assert 0.02 * 400 * 0.5 <= box <= 400 / 3 * 1.5  # of 2-33 % of the image (rounding aside)


def test_mixup_blends_each_image_with_its_mirror_and_mixes_the_labels() -> None:
    plan = Augmentation(mixup=0.4, num_classes=4)
    x, y = images(6), torch.tensor([0, 1, 2, 3, 0, 1])
    draws = plan.draw(6, 16, torch.Generator().manual_seed(3))
    mixed, target = plan.mix(x, y, (x.flip(0), y.flip(0)), [(draws, 6)])
    lam = plan.mixing_of(draws)[1]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(6)) and torch.allclose(target[0, 0], torch.tensor(lam))
    assert torch.allclose(target[0, 1], torch.tensor(1 - lam))  # image 0's partner is image 5 (class 1)


def test_cutmix_pastes_a_box_of_the_partner_and_weighs_labels_by_its_area() -> None:
    plan = Augmentation(cutmix=1.0, num_classes=4)
    x, y = images(4, 1, 32), torch.tensor([0, 1, 2, 3])
    for seed in range(20):
        draws = plan.draw(4, 32, torch.Generator().manual_seed(seed))
        assert plan.mixing_of(draws)[0]
        mixed, target = plan.mix(x, y, (x.flip(0), y.flip(0)), [(draws, 4)])
        pasted = (mixed != x).flatten(1).float().mean(1)
        assert torch.allclose(target[:, y.flip(0)].diagonal(), pasted, atol=0.02)


def test_with_mixup_and_cutmix_each_batch_takes_one_of_the_two() -> None:
    plan = Augmentation(mixup=0.2, cutmix=1.0, num_classes=2)
    chosen = [plan.mixing_of(plan.draw(4, 8, torch.Generator().manual_seed(s)))[0] for s in range(60)]
    assert 15 < sum(chosen) < 45


def test_mixing_consecutive_batches_gives_each_its_own_lambda_or_box() -> None:
    # The loader mixes a chunk of batches in one call: each batch's rows must get that batch's draws.
    plan = Augmentation(mixup=0.4, cutmix=1.0, num_classes=5)
    draws = [plan.draw(4, 16, torch.Generator().manual_seed(s)) for s in range(12)]
    cut = [d for d in draws if plan.mixing_of(d)[0]][:2]
    blend = [d for d in draws if not plan.mixing_of(d)[0]][:2]
    batches = [(blend[0], 4), (cut[0], 3), (blend[1], 2), (cut[1], 4)]
    x, y = images(13, 1, 16), torch.arange(13) % 5
    partner = (images(13, 1, 16, seed=1), (torch.arange(13) + 2) % 5)
    mixed, target = plan.mix(x, y, partner, batches)
    start = 0
    for batch_draws, count in batches:
        rows = slice(start, start + count)
        start += count
        alone, alone_target = plan.mix(x[rows], y[rows], (partner[0][rows], partner[1][rows]), [(batch_draws, count)])
        assert torch.equal(mixed[rows], alone) and torch.equal(target[rows], alone_target)
    lam = plan.mixing_of(blend[0])[1]
    assert torch.allclose(mixed[:4], lam * x[:4] + (1 - lam) * partner[0][:4], atol=1e-6)
    pasted = mixed[4:7] == partner[0][4:7]
    assert pasted.any() and (mixed[4:7][~pasted] == x[4:7][~pasted]).all()  # cutmix: the partner's box, else x


KIT: list[dict[str, Any]] = [
    {"augment": True},
    {"augmentation": Augmentation(mode="trivial", random_erasing=0.5)},
    {"augmentation": Augmentation(mode="randaugment", mixup=0.3, cutmix=1.0, random_erasing=0.25, num_classes=70)},
    {"augmentation": Augmentation(mode="crop-flip", mixup=0.5, num_classes=70)},
]


@pytest.mark.parametrize("kit", KIT, ids=["crop-flip", "trivial+erasing", "randaugment+mix+erasing", "mixup"])
def test_processes_together_see_exactly_the_batches_of_one_process(kit: dict[str, Any]) -> None:
    split = ImageTensors(torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8), torch.arange(70))
    options: dict[str, Any] = {"batch_size": 16, "image_size": 8, "shuffle": True, "seed": 3,
                               "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), **kit}  # fmt: skip
    whole = list(BatchLoader(split, **options).epoch(2))
    parts = [list(BatchLoader(split, shard=(rank, 3), **options).epoch(2)) for rank in range(3)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
        assert torch.allclose(torch.cat([p[step][0] for p in parts]), x, atol=1e-6)
    again = list(BatchLoader(split, **options).epoch(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again, strict=True))  # reproducible per (seed, epoch)
    other = list(BatchLoader(split, **options).epoch(3))
    assert not torch.equal(whole[0][0], other[0][0])


def test_without_augmentation_nothing_is_drawn_and_batches_stay_plain() -> None:
    split = ImageTensors(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8), torch.arange(20) % 2)
    loader = BatchLoader(split, batch_size=10, image_size=8)
    assert not loader.augment
    x, y = next(iter(loader))
    assert torch.equal(x, split.images[:10].float() / 255) and y.dtype == torch.long
