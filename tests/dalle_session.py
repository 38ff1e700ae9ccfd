"""Run several ``dalle`` commands in one process (one torch/diffusers import instead of one per command).

    python tests/dalle_session.py < commands.json > results.json

stdin: a JSON list of argument lists; stdout: a JSON list of ``{"argv", "code", "stdout", "stderr"}``. Each
command runs through the real entry point (``dallecli.cli.app.main``) with file descriptors 1 and 2 redirected
to files, so Rich consoles and child libraries are captured too. The environment is the process's own (set
HF_HUB_OFFLINE / HF_ENDPOINT before starting it: huggingface_hub reads them at import).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def run(argv: list[str]) -> dict:
    from dallecli.cli.app import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        sys.argv = ["dalle", *argv]
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - a traceback is a finding; report it as stderr
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        out.seek(0), err.seek(0)
        return {"argv": argv, "code": code, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    commands = json.load(sys.stdin)
    results = [run(argv) for argv in commands]
    sys.stdout.write(json.dumps(results))
