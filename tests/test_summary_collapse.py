"""``cnnkit summary``'s warning when the feature maps collapse to 1x1, and the smallest input that
avoids it (issue #9)."""

from __future__ import annotations

import re

import pytest

from cnnkit.cli.app import app

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_warns_when_the_maps_collapse_to_1x1(runner) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["summary", "googlenet", "--input", "1x8x8"])
    assert result.exit_code == 0 and "Total params" in result.stdout
    warning = result.stderr.strip()
    assert warning.count("\n") == 0 and warning.startswith("cnnkit: warning: googlenet at 1x8x8")
    assert re.search(r"1x1 from b2\.\d+ \(MaxPool2d\) on", warning), warning
    assert warning.endswith("an input of at least 1x33x33 avoids it")
    result = runner.invoke(app, ["summary", "googlenet", "--input", "1x1x1"])
    assert result.exit_code == 0 and "1x1 from the input on" in result.stderr


def test_the_smallest_uncollapsed_input_is_exact() -> None:
    from cnnkit.summary import summarize

    assert summarize("googlenet", (1, 33, 33)).collapsed_at is None
    assert summarize("googlenet", (1, 32, 32)).uncollapsed_side == 33


@pytest.mark.parametrize(
    "model",
    ["lenet", "lenet_bn", "alexnet", "vgg11", "nin", "googlenet", pytest.param("resnet18", marks=pytest.mark.slow),
     "densenet"],
)  # fmt: skip
def test_no_collapse_warning_at_the_recipe_size(model: str) -> None:
    from cnnkit.summary import summarize

    assert summarize(model).collapse_warning is None
