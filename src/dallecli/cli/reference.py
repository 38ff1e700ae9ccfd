"""The command reference in README.md, rendered from every command's ``--help``.

    python -m dallecli.cli.reference            # rewrite the reference in ./README.md
    python -m dallecli.cli.reference --check    # exit 1 when README.md differs from --help

The help is rendered in a child process with plain, fixed-width output (``TERM=dumb``, ``COLUMNS=100``,
``NO_COLOR=1``, ``TYPER_USE_RICH=0``: Typer reads that at import time), so the text does not depend on the
terminal it is run from. ``tests/test_reference.py`` fails when README.md is out of date.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
PLAIN_ENV = {"TERM": "dumb", "COLUMNS": "100", "NO_COLOR": "1", "TYPER_USE_RICH": "0", "LINES": "50"}


def _emit() -> str:
    """Every command's help as Markdown (run in the plain child process)."""
    import typer.main
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    root = typer.main.get_command(app)
    runner = CliRunner()
    sections: list[str] = []

    def walk(command, path: list[str]) -> None:
        result = runner.invoke(app, [*path, "--help"], prog_name="dalle", env=PLAIN_ENV)
        text = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
        sections.append(f"#### `{' '.join(['dalle', *path])}`\n\n```text\n{text}\n```\n")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    return "\n".join(sections)


def render() -> str:
    """The reference block, markers included, rendered in a child process with plain output.

    Raises:
        RuntimeError: the child process failed (its stderr is in the message).
    """
    env = {**os.environ, **PLAIN_ENV}
    done = subprocess.run([sys.executable, "-m", "dallecli.cli.reference", "--emit"], capture_output=True,
                          text=True, env=env, encoding="utf-8")
    if done.returncode != 0:
        raise RuntimeError(f"rendering the help failed:\n{done.stderr}")
    return f"{START}\n{done.stdout.strip()}\n{END}"


def current(readme: str) -> str:
    """The reference block now in ``readme`` (markers included).

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the {START} ... {END} markers")
    return readme[start:end + len(END)]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (default) or ``--check`` the reference in README.md (``--readme PATH`` to choose the file)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--emit"]:
        sys.stdout.write(_emit())
        return 0
    readme = Path(args[args.index("--readme") + 1]) if "--readme" in args else Path("README.md")
    text = readme.read_text(encoding="utf-8")
    old, new = current(text), render()
    if "--check" in args:
        if old != new:
            sys.stderr.write(f"{readme}: the command reference is out of date; run python -m dallecli.cli.reference\n")
            return 1
        return 0
    if old != new:
        readme.write_text(text.replace(old, new), encoding="utf-8")
        sys.stderr.write(f"updated the command reference in {readme}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
