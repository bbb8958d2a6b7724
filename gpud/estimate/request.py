"""`vram: "auto"` on a model request: the spec resolved to the reservation its files call for.

The daemon's service calls this once when a model starts (before placement), and the CLI for
`gpud plan --gpus … --vram auto`. The files are looked for where the replica will look: the
Hugging Face variables come from the environment the replica would get (SPEC §6 order).
"""

from __future__ import annotations

from collections.abc import Mapping

from gpud.config import EstimateSettings
from gpud.estimate.model import estimate_model
from gpud.spec import ModelSpec, merge_env


def resolve(spec: ModelSpec, settings: EstimateSettings, *, daemon_env: Mapping[str, str],
            config_env: Mapping[str, str]) -> ModelSpec:
    """`spec` with its estimate made when it asks for `vram: "auto"` and has none yet; else `spec` itself.
    InvalidInput (nothing changed) when the model's files cannot give one."""
    if not spec.needs_estimate:
        return spec
    environ = merge_env(daemon_env, config_env, spec.env, spec.unset_env, {})
    estimate = estimate_model(
        spec.model,
        args=spec.args,
        gpus_per_replica=spec.gpus_per_replica,
        context_tokens=spec.context_tokens,
        sequences=spec.kv_sequences or settings.kv_sequences,
        overhead_bytes=settings.overhead_bytes,
        environ=environ,
    )
    return spec.with_estimate(estimate)
