// Pure text helpers of the page: sizes, durations, and the start form's words → a control-API body.
// formatSize and formatDuration say what gpud/units.py format_size and gpud/cli/render.py format_duration
// say (the browser tests check them side by side), so the page and the CLI print the same figures.

const UNITS = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];

/** One decimal, rounding an exact half to even as Python's format() does (toFixed rounds it up). */
function oneDecimal(value) {
  const scaled = value * 10;
  const floor = Math.floor(scaled);
  const tenths = scaled - floor === 0.5 && floor % 2 === 0 ? floor : Math.round(scaled);
  return (tenths / 10).toFixed(1);
}

/** Bytes for people, in binary units: 20 GiB, 1.5 GiB, 512 MiB, 0 B. */
export function formatSize(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  if (n < 0) return "-" + formatSize(-n);
  for (const [unit, factor] of UNITS) {
    if (n >= factor) {
      const text = oneDecimal(n / factor).replace(/\.0$/, "");
      return `${text} ${unit}`;
    }
  }
  return `${Math.trunc(n)} B`;
}

/** `3d 4h`, `1h 2m`, `5m 3s`, `42s`: the two largest units. */
export function formatDuration(seconds) {
  let total = Math.max(0, Math.trunc(seconds));
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
    if (total >= size || (unit === "s" && parts.length === 0)) {
      parts.push(`${Math.floor(total / size)}${unit}`);
      total %= size;
    }
  }
  return parts.slice(0, 2).join(" ");
}

/** Split engine arguments the way a shell would (quotes and backslashes), without running anything. */
export function splitArgs(text) {
  const args = [];
  let current = "";
  let started = false;
  let quote = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < text.length && '"\\$`'.includes(text[i + 1])) current += text[++i];
      else current += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      started = true;
    } else if (c === "\\" && i + 1 < text.length) {
      current += text[++i];
      started = true;
    } else if (/\s/.test(c)) {
      if (started) args.push(current);
      current = "";
      started = false;
    } else {
      current += c;
      started = true;
    }
  }
  if (quote) throw new Error(`Engine arguments: a ${quote} quote is not closed.`);
  if (started) args.push(current);
  return args;
}

/** "KEY=VALUE" lines → an object; blank lines are skipped. The daemon checks names and values. */
export function parseEnv(text) {
  const env = {};
  text.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (!line) return;
    const at = line.indexOf("=");
    if (at <= 0) throw new Error(`Environment line ${i + 1} (${line}) is not KEY=VALUE.`);
    env[line.slice(0, at)] = line.slice(at + 1);
  });
  return env;
}

/** A whole number typed in a field: a number when it is one, else the text as typed, so that the daemon
 * refuses it with its own message. Empty → undefined (the field is left out). */
function wholeOrText(value) {
  const text = value.trim();
  if (text === "") return undefined;
  return /^\d+$/.test(text) ? Number(text) : text;
}

/** A number of seconds typed in a field (a decimal point allowed), else the text as typed; empty → undefined. */
function numberOrText(value) {
  const text = value.trim();
  if (text === "") return undefined;
  return /^\d+(\.\d+)?$/.test(text) ? Number(text) : text;
}

/** The POST /v1/models body for the start form's values (an object of field name → string). Only what the
 * person filled in is sent; the daemon validates everything and its message is what the page shows. */
export function startBody(values) {
  const body = { model: values.model.trim() };
  const optional = {
    name: values.name?.trim() || undefined,
    engine: values.engine || undefined,
    replicas: wholeOrText(values.replicas ?? ""),
    gpus_per_replica: wholeOrText(values.gpus_per_replica ?? ""),
    vram: values.vram?.trim() || undefined,
    placement: values.placement || undefined,
    routing: values.routing || undefined,
    idle_timeout: values.idle_timeout?.trim() || undefined,
    on_demand: values.on_demand ? true : undefined,
    max_replicas: wholeOrText(values.max_replicas ?? ""),
    target_inflight: wholeOrText(values.target_inflight ?? ""),
    context_tokens: wholeOrText(values.context_tokens ?? ""),
    kv_sequences: wholeOrText(values.kv_sequences ?? ""),
    health_path: values.health_path?.trim() || undefined,
    start_timeout_sec: numberOrText(values.start_timeout_sec ?? ""),
  };
  const unset = (values.unset_env ?? "").split(/[\s,]+/).filter(Boolean);
  if (unset.length) optional.unset_env = unset;
  const packages = splitArgs(values.venv_packages ?? "");
  if (packages.length) optional.venv = { packages };
  const gpuIdx = (values.gpu_idx ?? "").trim();
  if (gpuIdx) {
    const parts = gpuIdx.split(",").map((p) => p.trim());
    optional.gpu_idx = parts.every((p) => /^\d+$/.test(p)) ? parts.map(Number) : gpuIdx;
  }
  if (values.engine === "command" || values.command?.trim()) optional.command = values.command?.trim() || undefined;
  const env = parseEnv(values.env ?? "");
  if (Object.keys(env).length) optional.env = env;
  const args = splitArgs(values.args ?? "");
  if (args.length) optional.args = args;
  for (const [key, value] of Object.entries(optional)) if (value !== undefined) body[key] = value;
  return body;
}
