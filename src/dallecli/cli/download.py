"""``dalle download``: fetch what a pipeline (or a VAE, LoRA or CLIP scorer) loads from the Hugging Face Hub into
the shared HF cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors


@handles_errors
def download(
    name: Annotated[str, typer.Argument(help="Registry alias (see `dalle models`) or org/name Hub repo id.")],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag, refs/pr/N or commit (default: the registry's, else main).")] = None,
    variant: Annotated[Optional[str], typer.Option(help="Weights variant, e.g. fp16 (default: the registry's).")] = None,
    token: Annotated[Optional[str], typer.Option(help="Hub token for gated models (default: $HF_TOKEN or `hf auth login`).",
                                                 show_default=False)] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="HF cache folder (default: $HF_HUB_CACHE or $HF_HOME/hub).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and total size; download nothing.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of lines.")] = False,
) -> None:
    """Download a model, VAE, LoRA or CLIP scorer from the Hugging Face Hub (only the files dalle loads)."""
    from dallecli.cli.console import info, out, out_json, progress_bar
    from dallecli.store.download import human_size, missing_bytes, plan_download
    from dallecli.store.download import download as fetch

    if cache_dir is not None:
        from dallecli.images import prepare_output_folder

        prepare_output_folder(cache_dir, "--cache-dir")
    plan = plan_download(name, revision=revision, variant=variant, token=token)
    if plan.notice:
        info(plan.notice)
    for companion in plan.companions:
        info(f"with {companion.repo_id} @ {companion.commit} ({companion.spec.note if companion.spec else 'VAE'})")
    files = [{"path": f.path, "size": f.size} for f in plan.files]
    companions = [{"repo_id": c.repo_id, "commit": c.commit, "files": [{"path": f.path, "size": f.size} for f in c.files]}
                  for c in plan.companions]
    if dry_run:
        if json_output:
            out_json({"repo_id": plan.repo_id, "revision": plan.revision, "commit": plan.commit,
                      "variant": plan.variant, "files": files, "companions": companions,
                      "total_bytes": plan.total_bytes, "skipped": [{"path": p, "reason": r} for p, r in plan.skipped]})
            return
        for part in (plan, *plan.companions):
            prefix = "" if part is plan else f"{part.repo_id}: "
            for f in part.files:
                out(f"{human_size(f.size or 0):>10}  {prefix}{f.path}")
        count = sum(len(p.files) for p in (plan, *plan.companions))
        out(f"{human_size(plan.total_bytes):>10}  total, {count} files ({plan.repo_id} @ {plan.commit})")
        for path, reason in plan.skipped:
            info(f"skipped {path}: {reason}")
        return
    needed, missing = missing_bytes(plan, cache_dir)
    if missing:
        info(f"{plan.repo_id} @ {plan.commit}: {len(missing)} file(s) missing, {human_size(needed)}"
             + (f" (variant {plan.variant})" if plan.variant else ""))
    with progress_bar(needed or None, "downloading", unit="bytes", elapsed=False) as bar:
        result = fetch(plan, token=token, cache_dir=cache_dir,
                       on_progress=lambda n, expected: bar.update(advance=n, total=max(needed, expected) or None))
    if result.already_cached:
        info(f"{plan.repo_id} @ {result.commit} is already downloaded; nothing fetched")
    info(f"verified {len(result.verified)} .safetensors file(s); revision {result.commit}")
    if plan.spec is not None and plan.spec.gated:
        info(f"licence: {plan.spec.licence}")
    if json_output:
        out_json({"repo_id": plan.repo_id, "name": plan.name, "revision": plan.revision, "commit": result.commit,
                  "variant": plan.variant, "path": str(result.folder), "fetched_bytes": result.fetched_bytes,
                  "files": files, "companions": [dict(c, path=str(r.folder)) for c, r in zip(companions, result.companions)]})
    else:
        out(str(result.folder))
