// The GPU ledger as bar segments: pure, so what is drawn follows from /v1/gpus and the models alone.
//
// A bar is the GPU's total memory, left to right: each replica's reservation (labelled model#index),
// memory used by processes gpud does not own, the headroom gpud keeps free, and what is available.
// The segments add up to the total unless the GPU is overcommitted; the bar is then scaled to their sum.

/** Bytes a replica reserves on this GPU. The ledger lists holders without amounts (unless a newer daemon
 * sends `reserved_bytes` per holder): a sole holder has all of the GPU's reserved memory (an exclusive
 * replica's reservation is whatever was available); shared GPUs hold fixed --vram reservations, which
 * `model show` gives as the replica's vram_bytes. */
function reservedOn(gpu, holder, replica) {
  if (typeof holder.reserved_bytes === "number") return holder.reserved_bytes;
  const holders = gpu.replicas ?? [];
  if (holders.length === 1) return gpu.reserved_bytes ?? 0;
  if (replica && typeof replica.vram_bytes === "number") return replica.vram_bytes;
  return (gpu.reserved_bytes ?? 0) / Math.max(1, holders.length);
}

/** Memory a replica's processes use on this GPU, when the daemon measures it (NVML): the holder's own
 * figure, else the replica's when it has this GPU alone. */
function measuredOn(holder, replica) {
  for (const key of ["used_bytes", "measured_bytes"]) if (typeof holder[key] === "number") return holder[key];
  if (replica && typeof replica.measured_bytes === "number" && (replica.gpus ?? []).length <= 1) return replica.measured_bytes;
  return null;
}

/**
 * The segments of one GPU's bar: [{kind, label, bytes, fraction, model?, index?, state?, measured?}],
 * kind ∈ reservation | others | headroom | available, plus the totals the legend prints.
 * `models` maps a model name to its `model show` object.
 */
export function gpuLayout(gpu, models) {
  const total = gpu.total_bytes ?? 0;
  const others = gpu.used_by_others_bytes ?? 0;
  const reserved = gpu.reserved_bytes ?? 0;
  const available = gpu.available_bytes ?? 0;
  const headroom = typeof gpu.headroom_bytes === "number"
    ? gpu.headroom_bytes
    : Math.max(0, total - others - reserved - available);
  const segments = (gpu.replicas ?? []).map((holder) => {
    const show = models.get(holder.model);
    const replica = show?.replicas?.find((r) => r.index === holder.index);
    return {
      kind: "reservation",
      label: `${holder.model}#${holder.index}`,
      model: holder.model,
      index: holder.index,
      state: replica?.state ?? null,
      bytes: reservedOn(gpu, holder, replica),
      measured: measuredOn(holder, replica),
    };
  });
  segments.push({ kind: "others", label: "used by others", bytes: others });
  segments.push({ kind: "headroom", label: "headroom", bytes: headroom });
  segments.push({ kind: "available", label: "available", bytes: available });
  const sum = segments.reduce((acc, s) => acc + s.bytes, 0);
  const scale = Math.max(total, sum, 1);
  for (const s of segments) s.fraction = s.bytes / scale;
  return { total, others, reserved, headroom, available, segments, overcommitted: sum > total };
}
