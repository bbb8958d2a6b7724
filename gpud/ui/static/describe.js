// Pure descriptions of a model for the page: its settings in one line, its memory estimate, a last exit.
// Fields that only newer daemons send (routing, estimate, idle timers…) are shown when present, and
// leave no gap when absent.

import { formatDuration, formatSize } from "./format.js";

/** The LAST EXIT in short: `SIGKILL`, `code 1`, or a dash. */
export function exitShort(last) {
  if (!last) return "–";
  if (last.signal) return last.signal;
  if (last.code !== null && last.code !== undefined) return `code ${last.code}`;
  return "?";
}

/** SPEC §11's breakdown of a `--vram auto` reservation, for people. */
export function estimateText(e, k) {
  const kv = (e.kv_bytes_per_token ?? 0) * (e.context_tokens ?? 0) * (e.sequences ?? 0);
  const split = k > 1 ? ` ÷ ${k} GPUs` : "";
  return `vram auto: ${formatSize(e.per_gpu_bytes)} per GPU = (weights ${formatSize(e.weights_bytes)} + KV ${formatSize(e.kv_bytes_per_token)}/token × ${e.context_tokens} tokens × ${e.sequences} sequences = ${formatSize(kv)})${split} + overhead ${formatSize(e.overhead_bytes)}`;
}

/** Engine, model, memory per GPU, placement, routing and the demand settings, in one line. */
export function modelMeta(m, now = Date.now()) {
  const bits = [m.engine];
  if (m.model && m.model !== m.name) bits.push(m.model);
  bits.push(typeof m.vram_bytes === "number" ? `${formatSize(m.vram_bytes)} per GPU` : "whole GPUs");
  if (m.gpus_per_replica > 1) bits.push(`${m.gpus_per_replica} GPUs per replica`);
  if (m.placement) bits.push(m.placement);
  if (m.routing) bits.push(`routing ${m.routing}`);
  if (m.idle_timeout_sec) bits.push(`idle after ${formatDuration(m.idle_timeout_sec)}`);
  if (m.on_demand) bits.push("on demand");
  if (m.max_replicas) bits.push(`up to ${m.max_replicas} replicas`);
  const last = m.last_request_at ? Date.parse(m.last_request_at) : NaN;
  if (Number.isFinite(last)) bits.push(`last request ${formatDuration((now - last) / 1000)} ago`);
  return bits.filter(Boolean).join(" · ");
}
