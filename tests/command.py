"""Running the `flux2` command as a user does: a separate process, in a folder of its own."""

import subprocess
import sys


def flux2(*args: str, cwd, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m flux2 ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "flux2", *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
