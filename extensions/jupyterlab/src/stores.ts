/**
 * Routing stores in a folder, read through the Jupyter server's contents API only.
 *
 * A routing store is a directory named `*.zarr` whose root `zarr.json` (zarr v3 group metadata) holds the
 * store's provenance in `attributes`. The contents API is authenticated and confined to the server's root
 * folder, so no server-side handler is needed.
 */

import type { Contents } from '@jupyterlab/services';

/** Attribute keys that mark a zarr group as a moe-workbench routing store (any one of them is enough). */
const MARKER_KEYS = ['workbench_store', 'committed_tokens', 'n_experts', 'workbench_version'];

/** Provenance shown in a store's details, in this order, with these labels; missing keys are left out. */
const PROVENANCE: [key: string, label: string][] = [
  ['source', 'model'],
  ['revision', 'revision'],
  ['commit', 'commit'],
  ['model_type', 'model type'],
  ['committed_tokens', 'committed tokens'],
  ['tokens_total', 'tokens to trace'],
  ['complete', 'complete'],
  ['n_experts', 'experts'],
  ['k', 'top-k'],
  ['layers', 'layers'],
  ['routed_layers', 'routed layers'],
  ['backend', 'backend'],
  ['dtype', 'dtype'],
  ['world_size', 'ranks'],
  ['created', 'created'],
  ['workbench_version', 'workbench']
];

export type Attributes = Record<string, unknown>;

export interface IStore {
  /** Server path of the store directory (relative to the server root). */
  path: string;
  name: string;
  attributes: Attributes;
}

export interface ISkipped {
  path: string;
  name: string;
  reason: string;
}

export interface IFolderListing {
  folder: string;
  stores: IStore[];
  skipped: ISkipped[];
}

export function joinPath(folder: string, name: string): string {
  return folder ? `${folder.replace(/\/+$/, '')}/${name}` : name;
}

export function dirname(path: string): string {
  const i = path.lastIndexOf('/');
  return i < 0 ? '' : path.slice(0, i);
}

export function basename(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

/** The store's attributes, or why the directory is not shown as a store. */
export function storeAttributes(zarrJson: string): { attributes: Attributes } | { reason: string } {
  let meta: unknown;
  try {
    meta = JSON.parse(zarrJson);
  } catch {
    return { reason: 'zarr.json is not valid JSON' };
  }
  if (!isRecord(meta) || !isRecord(meta.attributes)) {
    return { reason: 'zarr.json has no attributes' };
  }
  const attributes = meta.attributes;
  if (!MARKER_KEYS.some(key => key in attributes)) {
    return { reason: 'no moe-workbench provenance in its attributes' };
  }
  return { attributes };
}

/**
 * Read one candidate directory's `zarr.json`. The directory is listed first so that a missing file is
 * noticed without a failing request (a 404 shows up as an error in the browser console).
 */
export async function readStore(contents: Contents.IManager, path: string): Promise<IStore | ISkipped> {
  const name = basename(path);
  let text: string;
  try {
    const listing = await contents.get(path, { type: 'directory', content: true });
    const children: Contents.IModel[] = Array.isArray(listing.content) ? listing.content : [];
    if (!children.some(child => child.name === 'zarr.json' && child.type !== 'directory')) {
      return { path, name, reason: 'no zarr.json' };
    }
    const model = await contents.get(joinPath(path, 'zarr.json'), { type: 'file', format: 'text', content: true });
    if (typeof model.content !== 'string') {
      return { path, name, reason: 'zarr.json could not be read as text' };
    }
    text = model.content;
  } catch {
    return { path, name, reason: 'zarr.json could not be read' };
  }
  const parsed = storeAttributes(text);
  return 'reason' in parsed ? { path, name, reason: parsed.reason } : { path, name, attributes: parsed.attributes };
}

/** The `*.zarr` directories in `folder`, each read as a store or noted as skipped. */
export async function listStores(contents: Contents.IManager, folder: string): Promise<IFolderListing> {
  const listing = await contents.get(folder, { type: 'directory', content: true });
  const items: Contents.IModel[] = Array.isArray(listing.content) ? listing.content : [];
  const candidates = items
    .filter(item => item.type === 'directory' && item.name.endsWith('.zarr'))
    .map(item => item.path)
    .sort((a, b) => a.localeCompare(b));
  const read = await Promise.all(candidates.map(path => readStore(contents, path)));
  const stores: IStore[] = [];
  const skipped: ISkipped[] = [];
  for (const entry of read) {
    if ('reason' in entry) {
      skipped.push(entry);
    } else {
      stores.push(entry);
    }
  }
  return { folder, stores, skipped };
}

function asInt(x: unknown): number | null {
  return typeof x === 'number' && Number.isInteger(x) ? x : null;
}

function count(n: number, word: string): string {
  return `${n.toLocaleString('en-US')} ${word}${n === 1 ? '' : 's'}`;
}

/** [0, 1, 2, 5] -> "0-2, 5". */
export function ranges(xs: number[]): string {
  const parts: string[] = [];
  let i = 0;
  while (i < xs.length) {
    let j = i;
    while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) {
      j++;
    }
    parts.push(i === j ? String(xs[i]) : `${xs[i]}-${xs[j]}`);
    i = j + 1;
  }
  return parts.join(', ');
}

function layerList(x: unknown): number[] | null {
  return Array.isArray(x) && x.every(v => Number.isInteger(v)) ? (x as number[]) : null;
}

/** One line: tokens, layers, experts and whether the trace is complete. */
export function summaryLine(attrs: Attributes): string {
  const parts: string[] = [];
  const committed = asInt(attrs.committed_tokens);
  const total = asInt(attrs.tokens_total);
  if (committed !== null) {
    parts.push(
      total !== null && attrs.complete !== true && total !== committed
        ? `${committed.toLocaleString('en-US')} of ${count(total, 'token')}`
        : count(committed, 'token')
    );
  }
  const layers = layerList(attrs.layers);
  const routed = layerList(attrs.routed_layers);
  if (layers) {
    parts.push(count(layers.length, 'layer') + (routed && routed.length !== layers.length ? ` (${routed.length} routed)` : ''));
  } else if (routed) {
    parts.push(count(routed.length, 'routed layer'));
  }
  const experts = asInt(attrs.n_experts);
  const k = asInt(attrs.k);
  if (experts !== null) {
    parts.push(count(experts, 'expert') + (k !== null ? `, top-${k}` : ''));
  }
  if (typeof attrs.complete === 'boolean') {
    parts.push(attrs.complete ? 'complete' : 'incomplete');
  }
  return parts.join(' · ');
}

function describe(value: unknown): string {
  if (typeof value === 'boolean') {
    return value ? 'yes' : 'no';
  }
  if (typeof value === 'number') {
    return Number.isInteger(value) ? value.toLocaleString('en-US') : String(value);
  }
  if (typeof value === 'string') {
    return value;
  }
  const list = layerList(value);
  if (list) {
    return ranges(list);
  }
  return JSON.stringify(value);
}

/** The provenance rows that exist in `attrs`, as [label, text] pairs. */
export function provenance(attrs: Attributes): [string, string][] {
  return PROVENANCE.filter(([key]) => attrs[key] !== undefined && attrs[key] !== null).map(([key, label]) => [
    label,
    describe(attrs[key])
  ]);
}

/** A fresh cell id (nbformat 4.5 wants one per cell). */
function cellId(): string {
  return Array.from({ length: 8 }, () => Math.floor(Math.random() * 16).toString(16)).join('');
}

/**
 * The dashboard notebook for the store `name` (a path relative to the notebook's folder). A JSON string
 * literal is also a valid Python string literal for any name, so the name needs no further escaping.
 */
export function dashboardNotebook(name: string): Record<string, unknown> {
  return {
    nbformat: 4,
    nbformat_minor: 5,
    metadata: {
      kernelspec: { name: 'python3', display_name: 'Python 3 (ipykernel)', language: 'python' },
      language_info: { name: 'python' }
    },
    cells: [
      { cell_type: 'markdown', id: cellId(), metadata: {}, source: `# Routing dashboard: ${name}` },
      {
        cell_type: 'code',
        id: cellId(),
        metadata: {},
        execution_count: null,
        outputs: [],
        source: `from workbench.widgets import RoutingDashboard\nRoutingDashboard(${JSON.stringify(name)})`
      }
    ]
  };
}

/**
 * Create the dashboard notebook next to the store and return its path: a new untitled notebook, filled in,
 * then renamed to `<store>-dashboard.ipynb` where that name is still free.
 */
export async function createDashboard(contents: Contents.IManager, storePath: string): Promise<string> {
  const folder = dirname(storePath);
  const name = basename(storePath);
  const created = await contents.newUntitled({ path: folder, type: 'notebook' });
  await contents.save(created.path, { type: 'notebook', format: 'json', content: dashboardNotebook(name) });
  const wanted = `${name.replace(/\.zarr$/, '')}-dashboard.ipynb`;
  try {
    const listing = await contents.get(folder, { type: 'directory', content: true });
    const taken = Array.isArray(listing.content) && listing.content.some((item: Contents.IModel) => item.name === wanted);
    if (taken) {
      return created.path; // keep the untitled name rather than overwrite another notebook
    }
    return (await contents.rename(created.path, joinPath(folder, wanted))).path;
  } catch {
    return created.path;
  }
}
