"""Helpers shared by the benches that run their own parts as child processes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time


def spawn(script: str, args: list[str], cpu: str | None) -> subprocess.Popen[str]:
    """Run `script` again with `args` (a serving role), pinned to `cpu` when taskset exists."""
    prefix = ["taskset", "-c", cpu] if cpu is not None and shutil.which("taskset") else []
    return subprocess.Popen(
        [*prefix, sys.executable, script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def wait_port(port: int, within: float = 15.0) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; raise after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
