"""A real browser for the console's tests: Debian's chromium driven by Playwright.

Playwright comes from PyPI (the test extra); its own browser downloads are never used. Chromium
is taken from PATH, or installed from Debian's packages when missing and apt is there (as
``fleet.ops.launch`` installs redis-server); without either the tests fail saying so, they do
not skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Flags that work on a machine without a display, a GPU or network access beyond the stack.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_binary() -> str:
    """Path of chromium, installing Debian's package when it is missing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
        found = shutil.which("chromium")
        if found:
            return found
    raise RuntimeError("chromium not found and not installable here: apt-get install chromium")


@contextmanager
def browser_context(**options: object) -> Iterator[object]:
    """A fresh chromium profile (its own user data directory) in a Playwright context."""
    from playwright.sync_api import sync_playwright

    binary = chromium_binary()
    with tempfile.TemporaryDirectory(prefix="fleet-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(Path(profile)), executable_path=binary, headless=True, args=FLAGS, **options)
        try:
            yield context
        finally:
            context.close()
