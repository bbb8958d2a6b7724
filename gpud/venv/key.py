"""The identity of a per-model virtualenv: its key (pure logic, no I/O besides reading config files).

Key = sha256 of a layout version, the interpreter (path, version and the daemon's package dirs layered
beneath the venv), the normalized requirement set, and the index settings that change what gets installed:
pip's (pip.conf files, then PIP_* variables) and uv's (UV_* variables), from the daemon's environment under
the config's [env]. Requirements are normalized here without `packaging` (it may not be installed, and the
key must not depend on whether it is): PEP 503 names, sorted extras and specifiers, collapsed whitespace.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import json
import os
import re
import site
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gpud
from gpud.errors import InvalidInput

LAYOUT_VERSION = 1          # bump when the on-disk layout or the layering changes: old keys stop matching
KEY_LENGTH = 20             # hex digits of sha256 kept: 80 bits, and short enough for shebang lines

# PEP 508 names: letters/digits, with . _ - inside. PEP 503 normalizes runs of -_. to one "-", lowercased.
_NAME_RE = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*")
_NAME_ONLY_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_SPEC_RE = re.compile(r"^(~=|===|==|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+$")
_QUOTED_RE = re.compile(r"('[^']*'|\"[^\"]*\")")

# Settings of pip (environment, then pip.conf keys) and of uv that change which distributions get installed.
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "no-index", "constraint", "pre")
UV_INDEX_ENV = ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_FIND_LINKS",
                "UV_NO_INDEX")
UV_OTHER_ENV = ("UV_CONSTRAINT", "UV_INDEX_STRATEGY", "UV_PRERELEASE")
_LIST_SETTINGS = ("extra-index-url", "find-links", "constraint")


# ---- requirements --------------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """PEP 503: `Foo.Bar__baz` → `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _collapse_outside_quotes(text: str) -> str:
    parts = _QUOTED_RE.split(text.strip())
    return "".join(p if i % 2 else re.sub(r"\s+", " ", p) for i, p in enumerate(parts))


def normalize_requirement(req: str) -> str:
    """One PEP 508 requirement in a canonical spelling: name normalized, extras and specifiers sorted,
    whitespace removed where it carries no meaning. Installer options and bare paths/URLs are refused:
    the first could change the index behind the key's back, the second has no name to key on."""
    bad = InvalidInput(
        f"Invalid venv package {req!r}: expected a requirement such as 'vllm==0.6.3', 'name[extra]>=1' "
        "or 'name @ https://…'."
    )
    if not isinstance(req, str) or "\0" in req or not req.strip():
        raise bad
    if req.strip().startswith("-"):
        raise InvalidInput(
            f"Invalid venv package {req!r}: installer options are not accepted; set index settings such as "
            "PIP_INDEX_URL in the daemon's environment or the config's [env]."
        )
    m = _NAME_RE.match(req)
    if m is None:
        raise bad
    name, rest = normalize_name(m.group(1)), req[m.end():]
    extras = ""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise bad
        names = [e.strip() for e in rest[1:close].split(",") if e.strip()]
        if not all(_NAME_ONLY_RE.match(e) for e in names):
            raise bad
        extras = f"[{','.join(sorted({normalize_name(e) for e in names}))}]" if names else ""
        rest = rest[close + 1:].strip()
    if rest.startswith("@"):
        body = rest[1:]
        split = re.search(r"\s;", body)  # PEP 508: a marker after a URL needs whitespace before its ';'
        url, marker = (body[: split.start()], body[split.end():]) if split else (body, "")
        url, marker = url.strip(), marker.strip()
        if not url or re.search(r"\s", url) or (split and not marker):
            raise bad
        return f"{name}{extras} @ {url}" + (f" ; {_collapse_outside_quotes(marker)}" if marker else "")
    spec, semi, marker = rest.partition(";")
    spec = re.sub(r"\s+", "", spec)
    if spec.startswith("(") and spec.endswith(")"):
        spec = spec[1:-1]
    clauses = spec.split(",") if spec else []
    if not all(_SPEC_RE.match(c) for c in clauses):
        raise bad
    if semi and not marker.strip():
        raise bad
    out = name + extras + ",".join(sorted({c.lower() for c in clauses}))
    return out + (f"; {_collapse_outside_quotes(marker)}" if semi else "")


def normalize_requirements(packages: Iterable[str]) -> tuple[str, ...]:
    """The requirement set: normalized, deduplicated, sorted."""
    return tuple(sorted({normalize_requirement(p) for p in packages}))


# ---- index settings ------------------------------------------------------------------------------------


def _pip_config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's config files in its order of precedence (later wins), without the site-level one (that belongs
    to the interpreter pip runs in, which for a new venv has none)."""
    if environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(dirs.split(":")) if d]
    files.append(Path("/etc/pip.conf"))
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    files.append(home / ".pip" / "pip.conf")
    files.append(Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "pip" / "pip.conf")
    if environ.get("PIP_CONFIG_FILE"):
        files.append(Path(environ["PIP_CONFIG_FILE"]))
    return files


def pip_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The pip settings that change what gets installed: pip.conf ([global], then [install]), then PIP_*."""
    found: dict[str, str] = {}
    for path in _pip_config_files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            for key in PIP_SETTINGS:
                if parser.has_option(section, key):
                    found[key] = parser.get(section, key)
    for key in PIP_SETTINGS:
        value = environ.get("PIP_" + key.upper().replace("-", "_"))
        if value is not None and value != "":
            found[key] = value
    out: dict[str, Any] = {}
    for key, value in found.items():
        if key in _LIST_SETTINGS:
            out[key] = value.split()
        elif key in ("no-index", "pre"):
            if value.strip().lower() in ("1", "true", "yes", "on"):
                out[key] = True
        elif value.strip():
            out[key] = value.strip()
    return out


def uv_settings(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: environ[k] for k in UV_INDEX_ENV + UV_OTHER_ENV if environ.get(k)}


def _file_digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path.removeprefix("file://")).read_bytes()).hexdigest()
    except OSError:
        return None


def index_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Everything about package sources that is part of the key. Constraint files count by content."""
    pip = pip_settings(environ)
    uv = uv_settings(environ)
    constraints = list(pip.get("constraint", [])) + environ.get("UV_CONSTRAINT", "").split()
    return {"pip": pip, "uv": uv, "constraint_digests": {c: _file_digest(c) for c in constraints}}


def uv_args(environ: Mapping[str, str]) -> list[str]:
    """uv reads neither pip.conf nor PIP_*: pass the pip settings as flags, so that switching installer
    never switches package source. UV_* settings, where given, are uv's own and win."""
    pip, args = pip_settings(environ), []
    if not any(environ.get(k) for k in UV_INDEX_ENV):
        if "index-url" in pip:
            args += ["--index-url", pip["index-url"]]
        for url in pip.get("extra-index-url", []):
            args += ["--extra-index-url", url]
        for link in pip.get("find-links", []):
            args += ["--find-links", link]
        if pip.get("no-index"):
            args.append("--no-index")
        # pip picks the best version across all indexes; uv's default stops at the first index that knows
        # the name. Keep pip's meaning when pip's extra indexes are what we pass on.
        if pip.get("extra-index-url") and not environ.get("UV_INDEX_STRATEGY"):
            args += ["--index-strategy", "unsafe-best-match"]
    if not environ.get("UV_CONSTRAINT"):
        for constraint in pip.get("constraint", []):
            args += ["--constraint", constraint]
    if pip.get("pre") and not environ.get("UV_PRERELEASE"):
        args += ["--prerelease", "allow"]
    return args


# ---- interpreter and key -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interpreter:
    """The interpreter venvs are made from, and the daemon's package dirs layered beneath them."""

    path: str
    version: str
    layer: tuple[str, ...]


def current_interpreter() -> Interpreter:
    """The daemon's own interpreter; its site dirs (and gpud's source root if gpud lives elsewhere) form
    the layer that keeps gpud, aiohttp and the rest importable from inside every venv."""
    dirs: list[str] = []
    candidates = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    for d in candidates:
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    root = str(Path(gpud.__file__).resolve().parent.parent)
    if root not in dirs:
        dirs.append(root)
    return Interpreter(sys.executable, f"{sys.implementation.name}-{sys.version.split()[0]}", tuple(dirs))


def venv_key(requirements: Sequence[str], interpreter: Interpreter, index: Mapping[str, Any]) -> str:
    """The content hash naming a venv. `requirements` must already be normalized (normalize_requirements)."""
    payload = {
        "layout": LAYOUT_VERSION,
        "python": [interpreter.path, interpreter.version, list(interpreter.layer)],
        "requirements": sorted(set(requirements)),
        "index": index,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def template_key(interpreter: Interpreter, virtualenv_version: str, seed_pip: bool) -> str:
    """Names the empty base venv every build copies: one per interpreter, layer, virtualenv and seeding."""
    payload = [LAYOUT_VERSION, interpreter.path, interpreter.version, list(interpreter.layer), virtualenv_version,
               seed_pip]
    return "base" + hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
