"""``dalle doctor``: versions, devices, the dtype ``auto`` picks and why, cache, disk and config file."""

from __future__ import annotations

from typing import Annotated

import typer

from dallecli.cli.errors import handles_errors


def _size(n: int | None) -> str:
    from dallecli.store.download import human_size

    return "unknown" if n is None else human_size(n)


def _render(report: dict) -> list[str]:
    python = report["python"]
    lines = [f"dalle            {report['dalle']}", f"python           {python['version']} ({python['executable']})",
             f"platform         {report['platform']}"]
    lines += [f"{name:<16} {version or 'not installed'}" for name, version in report["packages"].items()]
    for i, device in enumerate(report["devices"]):
        facts = [device["label"]]
        if device["kind"] == "cuda":
            facts += [f"{_size(device['memory_bytes'])} VRAM ({_size(device['free_memory_bytes'])} free)",
                      f"compute {device['capability']}", "bfloat16" if device["bf16"] else "no bfloat16"]
        elif device["kind"] == "cpu":
            count = device['threads']
            facts.append(f"{count} thread{'' if count == 1 else 's'} ({device['threads_reason']}; "
                         "DALLE_THREADS overrides)")
        lines.append(f"{'devices' if i == 0 else '':<16} {device['name']}: {', '.join(facts)}")
    auto = report["auto"]
    if auto:
        lines.append(f"auto             {auto['device']} ({auto['device_reason']}), {auto['dtype']} ({auto['dtype_reason']})")
    for key, entry in report["defaults"].items():
        value = entry["value"] or "(the model's)"
        lines.append(f"{'defaults' if key == 'model' else '':<16} {key} = {value} ({entry['source']})")
    config = report["config"]
    state = "invalid" if config["error"] else "found" if config["exists"] else "not found; optional"
    lines.append(f"config file      {config['path']} ({state})")
    cache = report["cache"]
    if cache:
        lines.append(f"hf cache         {cache['path']} ({_size(cache['size_bytes']) if cache['exists'] else 'empty'})")
    for where, usage in report["disk"].items():
        if usage:
            lines.append(f"{'free disk' if where == 'cache' else '':<16} {_size(usage['free_bytes'])} of "
                         f"{_size(usage['total_bytes'])} where the {where} folder is ({usage['path']})")
    return lines


@handles_errors(check_environment=False)  # bad DALLE_* values are among the problems it lists
def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Check this machine: versions, devices, dtype, cache, disk, config."""
    from dallecli.cli.console import out, out_json, warn
    from dallecli.doctor import diagnose

    report = diagnose()
    if json_output:
        out_json(report)
        return
    for line in _render(report):
        out(line.rstrip())
    for problem in report["problems"]:
        warn(problem)
