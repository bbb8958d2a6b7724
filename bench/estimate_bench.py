"""Benchmark `--vram auto`: how long the estimate takes, and what it says next to other rules.

Run from the repository root:  .venv/bin/python bench/estimate_bench.py [--runs 20] [--shards 64]

1. Time: the estimate of Llama-3.1-70B split over `--shards` safetensors files (723 tensors; 141 GB of
   holes: the files are sparse, only their headers exist), and of a Llama-3.2-1B Q8_0 GGUF with a real-sized
   tokenizer (128,256 tokens, 280,147 merges). Median and worst of `--runs` runs with a warm page cache, and
   the first run. Target: < 50 ms for 64 shards.
2. Comparison, for models whose config.json and tensor list are written by hand from their public model
   cards: the plain size of the weight files, GPUStack's rule (file size × 1.2 + 2 GiB: no context, no
   replica count), and gpud's estimate at 8,192 tokens and at the model's own trained context, 4 sequences
   each, 2 GiB overhead, one GPU per replica; then Llama-3.1-70B per GPU at tensor parallelism 2, 4 and 8.

Everything is written to a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The bench runs from a checkout; the model-file writers are the tests' (tests/modelfiles.py).
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import modelfiles as mf  # noqa: E402 - after the path setup above

from gpud.estimate.formula import Estimate  # noqa: E402
from gpud.estimate.model import estimate_model  # noqa: E402
from gpud.units import format_size  # noqa: E402

GiB = 2**30
OVERHEAD = 2 * GiB
SEQUENCES = 4


def estimate(path: Path, *, context: int | None = None, gpus: int = 1) -> Estimate:
    return estimate_model(str(path), args=[], gpus_per_replica=gpus, context_tokens=context, sequences=SEQUENCES,
                          overhead_bytes=OVERHEAD, environ={})


def timed(runs: int, work: Callable[[], object]) -> tuple[float, float, float]:
    """(first, median, worst) in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000)
    return times[0], statistics.median(times), max(times)


def files_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--shards", type=int, default=64)
    args = parser.parse_args(argv)
    print(f"# {platform.node()}: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="gpud-estimate-bench-") as tmp:
        root = Path(tmp)
        big = root / "Llama-3.1-70B-64"
        mf.write_config(big, mf.LLAMA31_70B)
        weights = mf.write_sharded(big, mf.transformer_tensors(mf.LLAMA31_70B), args.shards)
        gguf = root / "Llama-3.2-1B-Instruct-Q8_0.gguf"
        mf.llama_gguf(gguf, vocab_strings=128256, merges=280147)
        print(f"\n## Time of the estimate ({args.runs} runs)\n")
        print("| model | files | header bytes read | first (ms) | median (ms) | worst (ms) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        first, median, worst = timed(args.runs, lambda: estimate(big))
        headers = sum(8 + int.from_bytes(_head(p), "little") for p in big.glob("*.safetensors"))
        print(f"| Llama-3.1-70B, {format_size(weights)} of weights | {args.shards} safetensors | {headers:,} "
              f"| {first:.1f} | {median:.1f} | {worst:.1f} |")
        g_first, g_median, g_worst = timed(args.runs, lambda: estimate(gguf))
        g_header = gguf.stat().st_size - estimate(gguf).weights_bytes  # header + alignment padding
        print(f"| Llama-3.2-1B Q8_0, 408,403 tokenizer strings | 1 GGUF | ~{g_header:,} | {g_first:.1f} "
              f"| {g_median:.1f} | {g_worst:.1f} |")
        verdict = "meets" if median < 50 else "MISSES"
        print(f"\n{args.shards}-shard estimate: median {median:.1f} ms — {verdict} the < 50 ms target.")

        print(f"\n## gpud's estimate next to other rules (GiB; {SEQUENCES} sequences, {format_size(OVERHEAD)} "
              "overhead, 1 GPU per replica)\n")
        models: list[tuple[str, Path]] = []
        for name, config, shards in (("Qwen2.5-7B-Instruct", mf.QWEN25_7B, 4),
                                     ("Llama-3.1-8B-Instruct", mf.LLAMA31_8B, 4),
                                     ("Llama-3.1-70B-Instruct", mf.LLAMA31_70B, 30),
                                     ("Mixtral-8x7B-Instruct-v0.1", mf.MIXTRAL_8X7B, 19)):
            mf.write_hf_model(root / name, config, shards=shards)
            models.append((name, root / name))
        models.append(("Llama-3.2-1B-Instruct Q8_0 (GGUF)", gguf))
        print("| model | KV per token | file size | GPUStack (×1.2 + 2 GiB) | gpud @ 8,192 tokens "
              "| gpud @ trained context |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, path in models:
            size = files_size(path)
            gpustack = int(size * 1.2) + 2 * GiB
            short, full = estimate(path, context=8192), estimate(path)
            print(f"| {name} | {format_size(short.kv_bytes_per_token)} | {gib(size)} | {gib(gpustack)} "
                  f"| {gib(short.per_gpu_bytes)} | {gib(full.per_gpu_bytes)} ({full.context_tokens:,} tokens) |")
        print("\nLlama-3.1-70B-Instruct per GPU with tensor parallelism (8,192 tokens × 4 sequences):",
              ", ".join(f"TP {k}: {gib(estimate(root / 'Llama-3.1-70B-Instruct', context=8192, gpus=k).per_gpu_bytes)}"
                        " GiB" for k in (2, 4, 8)))
    return 0


def _head(path: Path) -> bytes:
    """A safetensors file's first 8 bytes: its header's length."""
    with open(path, "rb") as fh:
        return fh.read(8)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
