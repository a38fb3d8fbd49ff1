"""The data sources: where each comes from, its licence, and how it is fetched into the cache folder.

Nothing here runs at chattui run time; the archives are only needed to rebuild the default model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    name: str  # short id used in the corpus records
    title: str  # what the model card calls it
    fetch: str  # "pip" or "apt"
    package: str  # the package name in that registry
    version: str  # the version the default model was built from
    licence: str  # as stated in the package metadata
    url: str  # the upstream project
    use: str  # what the build takes from it


SOURCES = (
    Source(
        "chitchat", "Chit-Chat dataset (BYU PCC lab)", "pip", "chitchat-dataset", "0.9.0", "MIT",
        "https://github.com/BYU-PCCL/chitchat-dataset",
        "~7k two-person English conversations: the chat backbone",
    ),
    Source(
        "wordnet", "WordNet 3.0 (Princeton University)", "apt", "wordnet-base", "1:3.0-37",
        "WordNet 3.0 licence (permissive, notice kept in LICENSE-WordNet)",
        "https://wordnet.princeton.edu/",
        "definitions, examples and synonyms of common words, turned into questions and answers",
    ),
    Source(
        "chatterbot", "ChatterBot corpus (English)", "pip", "chatterbot-corpus", "1.3.3", "BSD (PyPI classifier)",
        "https://github.com/gunthercox/chatterbot-corpus",
        "short question-and-answer dialogs on everyday topics",
    ),
)

SOURCE_BY_NAME = {s.name: s for s in SOURCES}


def archive_path(cache: Path, source: Source) -> Path | None:
    """The downloaded archive of source in cache, if present."""
    if source.fetch == "pip":
        stem = source.package.replace("-", "_")
        found = sorted(cache.glob(f"{stem}-{source.version}*.whl")) + sorted(cache.glob(f"{stem}-{source.version}*.tar.gz"))
    else:
        found = sorted(cache.glob(f"{source.package}_*.deb"))
    return found[0] if found else None


def fetch(cache: Path, source: Source) -> Path:
    """Download source's archive into cache (pip download --no-deps / apt-get download) unless present."""
    cache.mkdir(parents=True, exist_ok=True)
    existing = archive_path(cache, source)
    if existing is not None:
        return existing
    if source.fetch == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache),
               f"{source.package}=={source.version}"]
        _run(cmd, cache)
    else:
        try:
            _run(["apt-get", "download", f"{source.package}={source.version}"], cache)
        except subprocess.CalledProcessError:
            log.info("apt-get download failed; running apt-get update once and retrying")
            _run(["apt-get", "update"], cache)
            _run(["apt-get", "download", source.package], cache)
    path = archive_path(cache, source)
    if path is None:
        raise RuntimeError(f"{source.package}: downloaded, but no archive found in {cache}")
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
