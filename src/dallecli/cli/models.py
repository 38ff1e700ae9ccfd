"""``dalle models``: list, inspect and remove models (embedded and downloaded); never touches the network."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors

models_app = typer.Typer(help="List, inspect and remove models.", invoke_without_command=True, no_args_is_help=False,
                         rich_markup_mode=None)  # plain help: see app.py

CacheDir = Annotated[Optional[Path], typer.Option(help="HF cache folder (default: $HF_HUB_CACHE or $HF_HOME/hub).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _print_list(cache_dir: Path | None, json_output: bool) -> None:
    from dallecli.cli.console import info, out, out_json
    from dallecli.store.cache import list_models
    from dallecli.store.download import human_size
    from dallecli.store.registry import REGISTRY

    models = list_models(cache_dir)
    if json_output:
        downloaded = {m.repo_id for m in models if m.repo_id}
        out_json({"models": [m.as_dict() for m in models],
                  "available": [s.as_dict() for s in REGISTRY.values() if s.repo_id and s.repo_id not in downloaded]})
        return
    rows = [("NAME", "REPO", "REVISION", "SIZE", "FAMILY")]
    rows += [(m.name, m.repo_id or "(embedded)", m.revision[:12], human_size(m.size_bytes),
              m.family if m.kind == "pipeline" else f"{m.family} ({m.kind})") for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for m in models:
        if m.missing:
            info(f"{m.name} is only partly downloaded ({', '.join(m.missing)} missing); run `dalle download {m.name}` again")
    listed = {m.repo_id for m in models}
    more = [f"{s.alias} ({s.size_gb:g} GB)" for s in REGISTRY.values() if s.repo_id and s.repo_id not in listed]
    if more:
        info(f"available to download (`dalle download NAME`): {', '.join(more)}")


@models_app.callback()
@handles_errors
def models(
    ctx: typer.Context,
    cache_dir: CacheDir = None,
    json_output: JsonFlag = False,
) -> None:
    """List, inspect and remove models; with no subcommand, list them."""
    if ctx.invoked_subcommand is None:
        _print_list(cache_dir, json_output)


@models_app.command("list")
@handles_errors
def list_(cache_dir: CacheDir = None, json_output: JsonFlag = False) -> None:
    """List the embedded model and the downloaded ones: alias, repo, revision, size on disk, family."""
    _print_list(cache_dir, json_output)


@models_app.command("info")
@handles_errors
def info_(
    name: Annotated[str, typer.Argument(help="Registry alias or org/name repo id.")],
    cache_dir: CacheDir = None,
    json_output: JsonFlag = False,
) -> None:
    """Show a model's registry data, downloaded files and generation defaults."""
    from dallecli.cli.console import out, out_json
    from dallecli.store.cache import model_details
    from dallecli.store.download import human_size

    details = model_details(name, cache_dir)
    if json_output:
        out_json(details)
        return
    out(f"name: {details['name']}")
    out(f"repo: {details['repo_id'] or '(embedded)'}")
    for key, value in (details["registry"] or {}).items():
        if key not in ("alias", "repo_id") and value not in (None, ""):
            out(f"{key}: {value}")
    defaults = details["defaults"]
    if defaults is not None and "scale" in defaults:  # an upscaler: the output size follows the input
        out(f"defaults: steps={defaults['steps']} guidance={defaults['guidance']} scale={defaults['scale']}"
            + (f" noise_level={defaults['noise_level']}" if defaults["noise_level"] is not None else ""))
    elif defaults is not None:
        out(f"defaults: steps={defaults['steps']} guidance={defaults['guidance']} "
            f"size={defaults['width']}x{defaults['height']}")
    if not details["downloaded"]:
        out(f"downloaded: no (run `dalle download {name}`)")
    for entry in details["downloaded"]:
        refs = f" ({', '.join(entry['refs'])})" if entry["refs"] else ""
        out(f"downloaded: {entry['revision']}{refs}, {human_size(entry['size_bytes'])} in {entry['path']}")
        for path in entry["files"]:
            out(f"  {path}")


@models_app.command("rm")
@handles_errors
def rm(
    name: Annotated[str, typer.Argument(help="Registry alias or org/name repo id.")],
    revision: Annotated[Optional[str], typer.Option(help="Remove only this commit (default: every revision).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Remove a downloaded model from the HF cache (shows what goes and the space freed, then asks)."""
    from dallecli.cli.console import info, out
    from dallecli.errors import UsageError
    from dallecli.store.cache import plan_removal, remove
    from dallecli.store.download import human_size

    plan = plan_removal(name, cache_dir, revision)
    info(f"{plan.repo_id}: {len(plan.revisions)} revision(s), frees {human_size(plan.freed_bytes)}")
    for path in plan.paths:
        info(f"  delete {path}")
    if dry_run:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("stdin is not interactive, so dalle will not ask; pass --yes to delete")
        if not typer.confirm(f"Delete {plan.repo_id}?", default=False, err=True):
            info("nothing deleted")
            return
    freed = remove(plan)
    info(f"removed {plan.repo_id}; freed {human_size(freed)}")
    out(plan.repo_id)
