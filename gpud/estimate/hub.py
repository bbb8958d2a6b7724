"""Where a Hugging Face model id lives in the local hub cache, found the way huggingface_hub finds it.

Cache: `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
`$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A model `ORG/NAME` is
`models--ORG--NAME/`; its files are in `snapshots/REV/`, REV being the commit that `refs/main` (or the
`--revision` given) names, else the newest snapshot. Nothing is ever downloaded: a model that is not there
is a refusal that says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gpud.estimate.refusal import cannot_estimate


def _expand(value: str, environ: Mapping[str, str]) -> Path:
    if value.startswith("~") and environ.get("HOME"):
        value = environ["HOME"] + value[1:]
    return Path(os.path.expanduser(value))


def cache_dir(environ: Mapping[str, str]) -> Path:
    """The hub cache directory for this environment (the replica's, so gpud looks where the engine looks)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(var):
            return _expand(environ[var], environ)
    if environ.get("HF_HOME"):
        return _expand(environ["HF_HOME"], environ) / "hub"
    if environ.get("XDG_CACHE_HOME"):
        return _expand(environ["XDG_CACHE_HOME"], environ) / "huggingface" / "hub"
    return _expand("~/.cache", environ) / "huggingface" / "hub"


def repo_dir(cache: Path, model_id: str) -> Path:
    return cache / ("models--" + model_id.replace("/", "--"))


def _commit(ref: Path) -> str | None:
    """The commit a `refs/NAME` file names, None when there is no readable, sane one."""
    try:
        commit = ref.read_text().strip()
    except OSError:  # absent, a directory, unreadable
        return None
    return commit if commit and "/" not in commit and commit not in (".", "..") else None


def snapshot(model_id: str, environ: Mapping[str, str], revision: str | None = None) -> Path:
    """The snapshot directory of `model_id`; InvalidInput naming the cache when it is not there."""
    cache = cache_dir(environ)
    repo = repo_dir(cache, model_id)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        raise cannot_estimate(model_id, f"it is not in the Hugging Face cache {cache} (gpud never downloads; "
                                        "download it first, or give a local path)")
    if revision is not None:
        commit = _commit(repo / "refs" / revision) if "/" not in revision else None
        commit = commit or revision
        if "/" in commit or commit in (".", "..") or not (snapshots / commit).is_dir():
            raise cannot_estimate(repo, f"revision {revision!r} is not in the cache")
        return snapshots / commit
    commit = _commit(repo / "refs" / "main")
    if commit is not None and (snapshots / commit).is_dir():
        return snapshots / commit
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    if not candidates:
        raise cannot_estimate(snapshots, "it holds no snapshot (an interrupted download?)")
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name))
