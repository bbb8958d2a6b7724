"""The engine args `--vram auto` reads: `--max-model-len` (the context) and `--kv-cache-dtype` (the cache's
element size), and `--revision` (which snapshot of a cached Hugging Face model). Both `--flag value` and
`--flag=value` are read, and vLLM's underscore spelling (`--max_model_len`); the last one given wins, as
argparse decides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gpud.estimate.refusal import cannot_estimate

MAX_MODEL_LEN = "--max-model-len"
KV_CACHE_DTYPE = "--kv-cache-dtype"
REVISION = "--revision"

# vLLM reads human-readable lengths: 32k = 32,000 and 25.6k = 25,600 (decimal), 32K = 32,768 (binary).
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_LENGTH = re.compile(r"^(\d+)(?:\.(\d+))?([kmgtKMGT]?)$")


def engine_arg(args: Sequence[str], flag: str) -> str | None:
    """The value of the last `flag` in `args` (None when absent); InvalidInput when it has no value."""
    spellings = {flag, "--" + flag[2:].replace("-", "_")}
    found: str | None = None
    for i, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name not in spellings:
            continue
        if sep:
            found = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            found = args[i + 1]
        else:
            raise cannot_estimate(f"the engine arg {flag}", "it has no value")
    return found


def max_model_len(args: Sequence[str]) -> int | None:
    """`--max-model-len` as a number of tokens, None when not given."""
    text = engine_arg(args, MAX_MODEL_LEN)
    if text is None:
        return None
    match = _LENGTH.match(text.strip())
    tokens: int | None = None
    if match:
        whole, fraction, unit = match.groups()
        if unit in _BINARY and fraction is None:
            tokens = int(whole) * _BINARY[unit]
        elif unit in _DECIMAL or not unit:
            scale = 10 ** len(fraction or "")
            factor = _DECIMAL.get(unit, 1)
            value = (int(whole) * scale + int(fraction or "0")) * factor
            tokens = value // scale if value % scale == 0 else None
    if not tokens:
        raise cannot_estimate(f"the engine arg {MAX_MODEL_LEN} {text}",
                              "it is not a number of tokens (use --context-tokens N to give one)")
    return tokens


def kv_cache_bytes(args: Sequence[str]) -> tuple[str, int | None]:
    """(`--kv-cache-dtype` as given or "auto", its bytes per element); None bytes: the model's dtype."""
    text = engine_arg(args, KV_CACHE_DTYPE)
    if text is None or text == "auto":
        return "auto", None
    if text.startswith("fp8"):
        return text, 1
    if text in ("float16", "bfloat16", "half"):  # exact where SPEC §11's rule (the model's dtype) would over-count
        return text, 2
    return text, None  # SPEC §11: any other value counts as the model's torch_dtype (the engine checks the name)
