"""`--vram auto`: a model's per-GPU memory computed from its own files (SPEC §11), stdlib only.

    model.estimate_model("Qwen/Qwen2.5-7B-Instruct", args=[...], environ=replica_env, ...) → Estimate

Where the files are (a directory of config.json + safetensors, a .gguf file, or a Hugging Face id in the
local hub cache), what their headers declare (safetensors.py, gguf.py, hfconfig.py, hub.py), the engine
args that change the answer (args.py), and the formula (formula.py). Only headers are read; nothing is
downloaded. Every refusal is one InvalidInput sentence that names the path and ends "pass --vram SIZE".

The CLI runs this in its own process for `gpud plan --gpus … --vram auto`, so nothing here may import
aiohttp, psutil or any other part of the daemon. This file imports nothing: `gpud.spec` needs only
`estimate.formula.Estimate`, and the CLI must not pay for the file readers on every command.
"""
