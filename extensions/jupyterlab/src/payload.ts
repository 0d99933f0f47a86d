/**
 * The routing summary payload (`application/vnd.moe-workbench.routing+json`, version 1) and its validation.
 *
 * The payload is produced by `workbench.display.routing_summary`; anything that does not match the
 * contract is reported as a readable error instead of being drawn.
 */

export const MIME_TYPE = 'application/vnd.moe-workbench.routing+json';
export const PAYLOAD_VERSION = 1;
export const KINDS = ['store', 'trace', 'analysis'] as const;

export type RoutingKind = (typeof KINDS)[number];

/** A layer x expert grid of floats; `null` marks a missing cell. */
export interface IHeatmap {
  title: string;
  layers: number[];
  experts: number[];
  values: (number | null)[][];
  /** The value a uniform router would give; null when the metric has none. */
  baseline: number | null;
}

export interface IRoutingSummary {
  version: 1;
  kind: RoutingKind;
  title: string;
  fields: [string, string][];
  heatmap: IHeatmap | null;
}

export type ParseResult =
  | { ok: true; summary: IRoutingSummary }
  | { ok: false; error: string };

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

function isFiniteNumber(x: unknown): x is number {
  return typeof x === 'number' && Number.isFinite(x);
}

function isIntList(x: unknown): x is number[] {
  return Array.isArray(x) && x.every(v => Number.isInteger(v));
}

/** A scalar shown as text; numbers and booleans are accepted and written out. */
function asText(x: unknown): string | null {
  if (typeof x === 'string') {
    return x;
  }
  if (typeof x === 'number' || typeof x === 'boolean') {
    return String(x);
  }
  return null;
}

function parseHeatmap(raw: unknown): { heatmap: IHeatmap } | { error: string } {
  if (!isRecord(raw)) {
    return { error: 'heatmap is not an object' };
  }
  const title = raw.title === undefined || raw.title === null ? '' : asText(raw.title);
  if (title === null) {
    return { error: 'heatmap.title is not a string' };
  }
  const { layers, experts, values } = raw;
  if (!isIntList(layers)) {
    return { error: 'heatmap.layers is not a list of integers' };
  }
  if (!isIntList(experts)) {
    return { error: 'heatmap.experts is not a list of integers' };
  }
  if (!Array.isArray(values) || values.length !== layers.length) {
    return {
      error: `heatmap.values should have one row per layer (${layers.length})`
    };
  }
  const rows: (number | null)[][] = [];
  for (let i = 0; i < values.length; i++) {
    const row: unknown = values[i];
    if (!Array.isArray(row) || row.length !== experts.length) {
      return {
        error: `heatmap.values row ${i} should have one value per expert (${experts.length})`
      };
    }
    const cells: (number | null)[] = [];
    for (const v of row) {
      if (v === null || isFiniteNumber(v)) {
        cells.push(v);
      } else {
        return { error: `heatmap.values row ${i} holds a value that is not a number or null` };
      }
    }
    rows.push(cells);
  }
  const baseline = raw.baseline;
  if (baseline !== undefined && baseline !== null && !isFiniteNumber(baseline)) {
    return { error: 'heatmap.baseline is not a number' };
  }
  return {
    heatmap: {
      title,
      layers,
      experts,
      values: rows,
      baseline: isFiniteNumber(baseline) ? baseline : null
    }
  };
}

/**
 * Check a payload against the version 1 contract. A JSON string is parsed first (some front ends hand
 * JSON MIME data over unparsed).
 */
export function parseSummary(data: unknown): ParseResult {
  let raw = data;
  if (typeof raw === 'string') {
    try {
      raw = JSON.parse(raw);
    } catch {
      return { ok: false, error: 'the payload is not valid JSON' };
    }
  }
  if (!isRecord(raw)) {
    return { ok: false, error: 'the payload is not a JSON object' };
  }
  if (raw.version !== PAYLOAD_VERSION) {
    return {
      ok: false,
      error:
        `unsupported payload version ${JSON.stringify(raw.version ?? null)}; this extension ` +
        `draws version ${PAYLOAD_VERSION} (update moe-workbench-jupyterlab to match moe-workbench)`
    };
  }
  const kind = raw.kind;
  if (typeof kind !== 'string' || !(KINDS as readonly string[]).includes(kind)) {
    return { ok: false, error: `unknown kind ${JSON.stringify(kind ?? null)}` };
  }
  const title = asText(raw.title);
  if (title === null) {
    return { ok: false, error: 'title is not a string' };
  }
  const fields: [string, string][] = [];
  const rawFields = raw.fields ?? [];
  if (!Array.isArray(rawFields)) {
    return { ok: false, error: 'fields is not a list' };
  }
  for (const pair of rawFields) {
    const label = Array.isArray(pair) && pair.length === 2 ? asText(pair[0]) : null;
    const value = Array.isArray(pair) && pair.length === 2 ? asText(pair[1]) : null;
    if (label === null || value === null) {
      return { ok: false, error: 'fields should be a list of [label, value] string pairs' };
    }
    fields.push([label, value]);
  }
  let heatmap: IHeatmap | null = null;
  if (raw.heatmap !== undefined && raw.heatmap !== null) {
    const parsed = parseHeatmap(raw.heatmap);
    if ('error' in parsed) {
      return { ok: false, error: parsed.error };
    }
    heatmap = parsed.heatmap;
  }
  return {
    ok: true,
    summary: { version: 1, kind: kind as RoutingKind, title, fields, heatmap }
  };
}
