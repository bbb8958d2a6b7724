"""The Hugging Face hub cache: which directory, which snapshot, and never a download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from modelfiles import QWEN25_7B, hub_model, write_config

from gpud.errors import InvalidInput
from gpud.estimate.hub import cache_dir, snapshot


def test_cache_directory_precedence() -> None:
    assert cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/huggingface/hub")
    assert cache_dir({"HOME": "/home/u", "XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/huggingface/hub")
    assert cache_dir({"HOME": "/home/u", "XDG_CACHE_HOME": "/xdg", "HF_HOME": "~/hf"}) == Path("/home/u/hf/hub")
    env = {"HOME": "/home/u", "HF_HOME": "/hf", "HUGGINGFACE_HUB_CACHE": "/old"}
    assert cache_dir(env) == Path("/old")
    assert cache_dir({**env, "HF_HUB_CACHE": "/srv/hub"}) == Path("/srv/hub")
    assert cache_dir({"HOME": "/h", "HF_HUB_CACHE": ""}) == Path("/h/.cache/huggingface/hub")  # empty: unset


def test_refs_main_names_the_snapshot(tmp_path: Path) -> None:
    old = hub_model(tmp_path, "Qwen/Qwen2.5-7B-Instruct", lambda d: write_config(d, QWEN25_7B), commit="a" * 40)
    new = hub_model(tmp_path, "Qwen/Qwen2.5-7B-Instruct", lambda d: write_config(d, QWEN25_7B), commit="b" * 40,
                    ref=None)
    os.utime(new, (2e9, 2e9))  # newer, but refs/main still names the old one
    env = {"HF_HUB_CACHE": str(tmp_path)}
    assert snapshot("Qwen/Qwen2.5-7B-Instruct", env) == old
    assert (old / "config.json").is_symlink() and (old / "config.json").read_text().startswith("{")
    (tmp_path / "models--Qwen--Qwen2.5-7B-Instruct" / "refs" / "main").unlink()
    assert snapshot("Qwen/Qwen2.5-7B-Instruct", env) == new  # no ref: the newest snapshot
    assert snapshot("Qwen/Qwen2.5-7B-Instruct", env, revision="a" * 40) == old


def test_revisions_by_ref_and_by_commit(tmp_path: Path) -> None:
    v1 = hub_model(tmp_path, "org/m", lambda d: write_config(d, {}), commit="c" * 40, ref="v1.0")
    env = {"HF_HUB_CACHE": str(tmp_path)}
    assert snapshot("org/m", env, revision="v1.0") == v1
    assert snapshot("org/m", env) == v1  # no refs/main: the only snapshot
    with pytest.raises(InvalidInput, match=r"models--org--m: revision 'v2' is not in the cache; pass --vram SIZE\.$"):
        snapshot("org/m", env, revision="v2")
    with pytest.raises(InvalidInput, match="revision '../..' is not in the cache"):
        snapshot("org/m", env, revision="../..")


def test_a_model_not_in_the_cache_is_refused_without_download(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path)}
    with pytest.raises(InvalidInput) as caught:
        snapshot("meta-llama/Llama-3.1-8B", env)
    assert caught.value.message == (
        f"Cannot compute --vram auto from meta-llama/Llama-3.1-8B: it is not in the Hugging Face cache {tmp_path} "
        "(gpud never downloads; download it first, or give a local path); pass --vram SIZE."
    )
    (tmp_path / "models--org--empty" / "snapshots").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="it holds no snapshot"):
        snapshot("org/empty", env)
