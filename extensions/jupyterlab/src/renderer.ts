/**
 * The widget that draws a routing summary in an output area: title, a table of fields and the heatmap.
 * Text goes in through textContent only, so the renderer is safe for untrusted notebooks.
 */

import type { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { renderHeatmap } from './heatmap';
import { MIME_TYPE, parseSummary, type IRoutingSummary } from './payload';

function div(className: string, text?: string): HTMLDivElement {
  const node = document.createElement('div');
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** The DOM of a valid summary. */
export function renderSummary(summary: IRoutingSummary): HTMLDivElement {
  const root = div('mwb-routing');
  root.dataset.kind = summary.kind;
  root.appendChild(div('mwb-title', summary.title));
  if (summary.fields.length) {
    const table = document.createElement('table');
    table.className = 'mwb-fields';
    const body = document.createElement('tbody');
    for (const [label, value] of summary.fields) {
      const row = document.createElement('tr');
      const th = document.createElement('th');
      th.scope = 'row';
      th.textContent = label;
      const td = document.createElement('td');
      td.textContent = value;
      row.append(th, td);
      body.appendChild(row);
    }
    table.appendChild(body);
    root.appendChild(table);
  }
  if (summary.heatmap) {
    const box = div('mwb-heatmap-box');
    box.appendChild(renderHeatmap(summary.heatmap));
    root.appendChild(box);
  }
  return root;
}

/** The DOM shown in place of a payload that does not match the contract. */
export function renderError(message: string): HTMLDivElement {
  const root = div('mwb-routing');
  root.appendChild(div('mwb-error', `Cannot show this moe-workbench routing summary: ${message}.`));
  return root;
}

export class RoutingRenderer extends Widget implements IRenderMime.IRenderer {
  constructor(options: IRenderMime.IRendererOptions) {
    super();
    this._mimeType = options.mimeType;
    this.addClass('mwb-routing-output');
  }

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    let content: HTMLDivElement;
    try {
      const parsed = parseSummary(model.data[this._mimeType]);
      content = parsed.ok ? renderSummary(parsed.summary) : renderError(parsed.error);
    } catch (err) {
      // a bug in drawing must not break the notebook: say what went wrong instead
      content = renderError(err instanceof Error ? err.message : String(err));
    }
    this.node.replaceChildren(content);
    return Promise.resolve();
  }

  private _mimeType: string;
}

export const rendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [MIME_TYPE],
  defaultRank: 0,
  createRenderer: options => new RoutingRenderer(options)
};
