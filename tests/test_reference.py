"""The command reference in README.md is the current `--help` of every command."""

from pathlib import Path

from dallecli.cli.reference import START, current, render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_matches_help():
    rendered = render()
    assert rendered.startswith(START) and "#### `dalle generate`" in rendered and "#### `dalle models rm`" in rendered
    assert current(README.read_text(encoding="utf-8")) == rendered, (
        "README.md's command reference differs from `--help`; regenerate it with "
        "`python -m dallecli.cli.reference` (run from the repository root) and commit README.md"
    )
