/**
 * The rendermime extension: draws `application/vnd.moe-workbench.routing+json` outputs without a kernel.
 *
 * Rank 0 puts it ahead of the payload's text/html and image/png fallbacks. The payload is plain data and
 * is drawn with DOM and SVG built from text nodes, so the renderer is marked safe and also draws outputs
 * of untrusted (for example freshly opened, saved) notebooks.
 */

import type { IRenderMime } from '@jupyterlab/rendermime-interfaces';

import { rendererFactory } from './renderer';

const extension: IRenderMime.IExtension = {
  id: 'moe-workbench-jupyterlab:routing-renderer',
  description: 'Draws moe-workbench routing summaries (fields and a layer x expert heatmap).',
  rendererFactory,
  rank: 0,
  dataType: 'json'
};

export default extension;
