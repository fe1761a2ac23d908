"""README's command lines use options that exist (a renamed or removed flag fails here, not for a
reader), and its bold bench figures are in the committed results it links."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main

from cnnkit.cli.app import app

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """Every ``cnnkit ...`` line inside the README's fenced code blocks, split like a shell would."""
    commands, inside = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        text = line.split("#", 1)[0].strip()
        if inside and text.startswith("cnnkit "):
            commands.append(shlex.split(text)[1:])
    return commands


def test_every_flag_in_the_readme_is_an_option_of_its_command() -> None:
    group = typer.main.get_command(app)
    checked = 0
    for words in readme_commands():
        command, rest = group, list(words)
        while rest and hasattr(command, "commands") and rest[0] in command.commands:  # type: ignore[attr-defined]
            command = command.commands[rest.pop(0)]  # type: ignore[attr-defined]
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in rest:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag):
                assert flag in known, f"README: `cnnkit {' '.join(words)}`: {flag} is not an option of that command"
                checked += 1
    assert checked > 20  # the README's examples were found and read


def test_a_bold_figure_beside_a_bench_result_is_in_that_result() -> None:
    """A README paragraph that links a committed bench output quotes its headline figures in bold
    (``**0.88x**``): each must be in the linked file, so a re-run bench that changes them fails
    here until the README is updated, instead of the README quoting a stale run."""
    root = README.parent
    checked = 0
    for paragraph in re.split(r"\n\s*\n", README.read_text(encoding="utf-8")):
        links = re.findall(r"\((bench/results/[^)\s]+)\)", paragraph)
        figures = re.findall(r"\*\*(\d[\d.,]*x?)\*\*", paragraph)
        if not links or not figures:
            continue
        results = "".join((root / link).read_text(encoding="utf-8") for link in links).replace(",", "")
        for figure in figures:
            assert figure.replace(",", "") in results, (
                f"README quotes **{figure}** beside {links}, which do not hold it"
            )
            checked += 1
    assert checked >= 2  # the recipe kit's speed paragraph at least
