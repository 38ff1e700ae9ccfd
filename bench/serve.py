"""`dalle serve`: what a warm server saves a CLI call, and what dynamic batching buys under concurrency.

    python -m bench.serve [--repeats 5] [--clients 8] [--requests 4] [--threads N]

(a) Per image, same prompt and seed, the embedded model: `dalle generate --server URL` against a warm server, a
    cold `dalle generate` (process start, imports, model load, image), and the warm image itself (one HTTP request
    from a kept-open client). The part of the CLI call that is Python start-up and imports is measured apart:
    `dalle --help` (Python, Typer and the CLI modules) and the imports of the `--server` path
    (:data:`SERVER_PATH_IMPORTS`) against a bare `python -c pass`. Target: warm CLI call <= 1.5 x warm image + 0.3 s.
(b) `--clients` threads each sending `--requests` requests one after another (n=1, same settings, own seeds):
    images/s and p50/p95 latency with dynamic batching (the defaults: --batch-window 50 --max-batch 8) against
    the same requests served one by one (--batch-window 0 --max-batch 1). Target: batching >= 1.8 x one by one.

Every arm runs in its own server process, started fresh; the arms alternate (A B A B ...) and the medians are
kept. `--threads N` sets DALLE_THREADS for every child (the server and the CLI calls alike); on a machine shared
with other work, 1 avoids OpenMP threads spinning against each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import PYTHON, machine, run_process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PROMPT = "a red circle on a blue background"
# what `dalle generate --server` imports: the CLI, the request/image modules, the client and PIL's PNG writer
SERVER_PATH_IMPORTS = ("import dallecli.cli.app, dallecli.engine.lora, dallecli.engine.request, dallecli.images, "
                       "dallecli.serve.client, http.client, PIL.PngImagePlugin")


def cpu_flags_line() -> str:
    """The CPU flags that matter for torch on the CPU, and the load average when the benchmark started."""
    from dallecli.engine.device import cpu_flags

    flags = cpu_flags()
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"flags: {' '.join(wanted) or 'none of avx2/avx512/amx'}; load average {os.getloadavg()[0]:.2f}"


def start(folder: Path, *args: str, threads: str | None):
    from serve_helpers import ServeProcess

    return ServeProcess.start(folder, *args, env={"DALLE_THREADS": threads or ""})  # "": the default choice


def warm_cli(args, work: Path) -> dict:
    """Section (a): seconds per image for each arm (medians)."""
    import httpx

    env = {"HF_HUB_OFFLINE": "1", "DALLE_THREADS": args.threads or ""}
    server = start(work / "server-a", threads=args.threads)
    counter = iter(range(10**6))
    try:
        with httpx.Client(timeout=600) as client:
            def warm_image() -> float:
                started = time.perf_counter()
                answer = client.post(f"{server.url}/v1/images/generations",
                                     json={"prompt": PROMPT, "seed": 1, "response_format": "b64_json"})
                answer.raise_for_status()
                return time.perf_counter() - started

            warm_image()  # the first pass pays one-off costs
            runs = {"warm image (HTTP request)": [], "dalle generate --server (warm)": [], "dalle generate (cold)": [],
                    "python -c pass": [], "dalle --help": [], "CLI imports for --server": []}
            for _ in range(args.repeats):
                runs["warm image (HTTP request)"].append(warm_image())
                runs["dalle generate --server (warm)"].append(run_process(
                    [PYTHON, "-m", "dallecli", "generate", PROMPT, "--seed", "1", "--server", server.url, "--out",
                     str(work / f"remote{next(counter)}")], env))
                runs["dalle generate (cold)"].append(run_process(
                    [PYTHON, "-m", "dallecli", "generate", PROMPT, "--seed", "1", "--out",
                     str(work / f"cold{next(counter)}")], env))
                runs["python -c pass"].append(run_process([PYTHON, "-c", "pass"], env))
                runs["dalle --help"].append(run_process([PYTHON, "-m", "dallecli", "--help"], env))
                runs["CLI imports for --server"].append(run_process(
                    [PYTHON, "-c", SERVER_PATH_IMPORTS], env))
    finally:
        server.stop()
    return {name: statistics.median(values) for name, values in runs.items()}


def concurrency(args, work: Path) -> dict:
    """Section (b): images/s, p50 and p95 latency per arm (medians over the repeats)."""
    import httpx

    arms = {"dynamic batching": ["--batch-window", "50", "--max-batch", "8"],
            "one by one": ["--batch-window", "0", "--max-batch", "1"]}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for repeat in range(max(1, args.repeats // 2)):
        for name, options in arms.items():
            server = start(work / f"server-b-{name.replace(' ', '-')}-{repeat}", "--max-queue", "256", *options,
                           threads=args.threads)
            try:
                httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, "seed": 0},
                           timeout=600).raise_for_status()  # warm-up
                latencies: list[float] = []
                lock = threading.Lock()

                def client(index: int) -> None:
                    with httpx.Client(timeout=600) as session:
                        for k in range(args.requests):
                            started = time.perf_counter()
                            answer = session.post(f"{server.url}/v1/images/generations", json={
                                "prompt": PROMPT, "seed": 1000 * index + k, "response_format": "b64_json"})
                            answer.raise_for_status()
                            with lock:
                                latencies.append(time.perf_counter() - started)

                threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall = time.perf_counter() - started
                passes = server.log_text().count(" image(s) from ")
            finally:
                server.stop()
            latencies.sort()
            results[name].append({"images_per_s": len(latencies) / wall, "p50": statistics.median(latencies),
                                  "p95": latencies[max(0, int(round(0.95 * len(latencies))) - 1)],
                                  "passes": passes - 1})
    return {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--threads", default=None, help="DALLE_THREADS for every child process (default: unset)")
    parser.add_argument("--only", choices=("warm", "concurrency"), default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dalle-bench-serve-"))
    print(f"Machine: {machine()}; {cpu_flags_line()}; DALLE_THREADS={args.threads or 'unset'}")
    if args.only in (None, "warm"):
        figures = warm_cli(args, work)
        image, warm, cold = (figures["warm image (HTTP request)"], figures["dalle generate --server (warm)"],
                             figures["dalle generate (cold)"])
        print(f"\n(a) one image, embedded model, 64x64, 12 steps (median of {args.repeats})\n")
        print("| what | seconds |\n|---|---|")
        for name, value in figures.items():
            print(f"| {name} | {value:.3f} |")
        target = 1.5 * image + 0.3
        print(f"\nwarm CLI call {warm:.3f} s vs target 1.5 x {image:.3f} + 0.3 = {target:.3f} s: "
              f"{'met' if warm <= target else 'NOT met'}; cold/warm = {cold / warm:.1f}x; Python start-up + imports "
              f"of the --server path: {figures['CLI imports for --server']:.3f} s "
              f"({figures['CLI imports for --server'] - figures['python -c pass']:.3f} s above a bare interpreter)")
    if args.only in (None, "concurrency"):
        arms = concurrency(args, work)
        print(f"\n(b) {args.clients} clients x {args.requests} requests, n=1 each, same settings\n")
        print("| arm | images/s | p50 latency | p95 latency | passes |\n|---|---|---|---|---|")
        for name, row in arms.items():
            print(f"| {name} | {row['images_per_s']:.2f} | {row['p50']:.2f} s | {row['p95']:.2f} s | {row['passes']:.0f} |")
        ratio = arms["dynamic batching"]["images_per_s"] / arms["one by one"]["images_per_s"]
        print(f"\ndynamic batching / one by one = {ratio:.2f}x (target >= 1.8x: {'met' if ratio >= 1.8 else 'NOT met'})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
