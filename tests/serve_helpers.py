"""Start a real ``dalle serve`` for tests: a subprocess on 127.0.0.1 with a free port (``--port 0``), the
embedded model, an isolated home and cache, offline, one torch thread (``DALLE_THREADS=1``: on a shared 2-core
machine, two spinning OpenMP threads per process make a 0.4 s image take 14 s); its stderr (the log) goes to a file
the tests can read. :func:`run_dalle_commands` runs reference ``dalle`` commands the same way, in one process.

    server = ServeProcess.start(tmp_path, "--api-key", KEY)
    server.url, server.out, server.log_text(), server.stop()  # stop: SIGTERM, returns the exit code
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def isolated_env(home: Path, **extra: str) -> dict:
    """The environment of a test server or reference run: its own home and caches, offline, one thread."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", DALLE_THREADS="1",
               XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"),
               XDG_DATA_HOME=str(home / "data"))
    for name in ("DALLE_API_KEY", "DALLE_MODEL", "DALLE_OUTPUT_DIR", "DALLE_DEVICE", "DALLE_DTYPE", "HF_HUB_CACHE",
                 "DALLE_SERVER", "OMP_NUM_THREADS"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_dalle_commands(folder: Path, commands: list[list[str]]) -> list[dict]:
    """Run ``dalle`` commands in one process (``tests/dalle_session.py``) in ``folder`` with :func:`isolated_env`;
    returns ``{"argv", "code", "stdout", "stderr"}`` per command."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("dalle_session.py"))], input=json.dumps(commands),
                          capture_output=True, text=True, env=isolated_env(folder / "home"), cwd=folder, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class ServeProcess:
    """A running ``dalle serve`` (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, port: int, out: Path, log: Path):
        self.proc, self.port, self.out, self.log = proc, port, out, log
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, folder: Path, *args: str, env: dict | None = None, timeout: float = 120) -> "ServeProcess":
        """Start the server with ``args`` (and ``env`` added to its environment) and wait until it listens."""
        folder.mkdir(parents=True, exist_ok=True)
        out, log = folder / "out", folder / "serve.log"
        env = isolated_env(folder / "home", **(env or {}))
        with open(log, "wb") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "dallecli", "serve", "--port", "0", "--out", str(out), *args],
                                    stdout=subprocess.DEVNULL, stderr=handle, env=env, cwd=folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if found:
                return cls(proc, int(found.group(1)), out, log)
            if proc.poll() is not None:
                raise RuntimeError(f"dalle serve exited {proc.returncode}:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        proc.kill()
        raise RuntimeError(f"dalle serve did not start:\n{log.read_text(errors='replace')}")

    def log_text(self) -> str:
        """Everything the server logged so far."""
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, wait, and return the exit code (killed after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
