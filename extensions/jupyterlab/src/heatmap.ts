/**
 * The layer x expert heatmap of a routing summary, drawn as plain SVG.
 *
 * Colours diverge around the heatmap's baseline (what a uniform router would give): red above, blue below,
 * the theme's background at the baseline. Cells are painted with a saturated colour at an opacity that
 * grows with the distance from the centre, over a background rect filled with the theme's layout colour, so
 * the scale reads the same way in light and dark themes and follows a theme switch without redrawing. The
 * scale is linear and matches the PNG fallback of `workbench.display`: fully blue at 0, fully red at twice
 * the baseline.
 */

import type { IHeatmap } from './payload';

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Saturated ends of the diverging scale (the same as the Python PNG fallback). */
const ABOVE = 'rgb(178, 24, 43)';
const BELOW = 'rgb(33, 102, 172)';

/** The plot area aims for about this size; cells shrink to fit and stop at the limits below. */
const PLOT_WIDTH = 880;
const PLOT_HEIGHT = 560;
const MAX_CELL = 24;
const MIN_CELL_WIDTH = 1.5;
const MIN_CELL_HEIGHT = 3;

const FONT_SIZE = 10;
const TITLE_FONT_SIZE = 12;
/** A rough width of one digit at FONT_SIZE, for spacing labels without measuring text. */
const DIGIT_WIDTH = 6.2;

/**
 * Up to this many cells every cell gets its `<title>` tooltip when drawn; a larger grid adds each one on
 * the first pointer hover instead (see renderHeatmap).
 */
export const MAX_EAGER_TITLES = 16384;

const LEGEND_STEPS = 11;
const LEGEND_SWATCH_WIDTH = 20;
const LEGEND_SWATCH_HEIGHT = 12;

const LABEL_STEPS = [1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 250, 256, 500, 1000];

/** Where a value sits on the colour scale. */
export interface IColourScale {
  /** The value drawn neutral: the baseline, or the mean of the values when there is none. */
  centre: number;
  /** The distance from the centre that is drawn fully saturated. */
  span: number;
  /** Whether `centre` is a uniform-router baseline (so ratios to it are meaningful). */
  fromBaseline: boolean;
}

export function colourScale(values: (number | null)[][], baseline: number | null): IColourScale {
  const finite: number[] = [];
  for (const row of values) {
    for (const v of row) {
      if (v !== null && Number.isFinite(v)) {
        finite.push(v);
      }
    }
  }
  const fromBaseline = baseline !== null && baseline !== 0;
  let centre: number;
  if (fromBaseline) {
    centre = baseline;
  } else {
    centre = finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : 0;
  }
  let span = centre;
  if (!(centre > 0)) {
    span = finite.reduce((m, v) => Math.max(m, Math.abs(v - centre)), 0) || 1;
  }
  return { centre, span, fromBaseline };
}

/** Position on the scale in [-1, 1]: -1 fully blue, 0 neutral, 1 fully red. */
export function scalePosition(value: number, scale: IColourScale): number {
  const t = (value - scale.centre) / scale.span;
  return Math.max(-1, Math.min(1, t));
}

/** Fill colour and opacity for a position on the scale. */
export function cellPaint(t: number): { fill: string; opacity: number } {
  return t >= 0 ? { fill: ABOVE, opacity: t } : { fill: BELOW, opacity: -t };
}

/** A short, readable rendering of a (rounded) value: three significant digits. */
export function formatValue(v: number): string {
  if (v === 0) {
    return '0';
  }
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-4) {
    return v.toExponential(2);
  }
  return String(Number(v.toPrecision(3)));
}

/** The tooltip of one cell. */
export function cellLabel(layer: number, expert: number, value: number | null, scale: IColourScale): string {
  const where = `layer ${layer}, expert ${expert}`;
  if (value === null) {
    return `${where}: no data`;
  }
  let text = `${where}: ${formatValue(value)}`;
  if (scale.fromBaseline && scale.centre > 0) {
    text += ` (${(value / scale.centre).toFixed(2)}x uniform)`;
  }
  return text;
}

function el<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number> = {},
  text?: string
): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    node.setAttribute(name, String(value));
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** The smallest "round" label step that leaves at least `minIndexGap` cells between labels. */
function labelStep(minIndexGap: number): number {
  const need = Math.max(1, Math.ceil(minIndexGap));
  return LABEL_STEPS.find(s => s >= need) ?? need;
}

function maxDigits(xs: number[]): number {
  return xs.reduce((m, x) => Math.max(m, String(x).length), 1);
}

/** The heatmap as an `<svg class="mwb-heatmap">`, sized for its grid and scaled down by CSS to fit. */
export function renderHeatmap(heatmap: IHeatmap): SVGSVGElement {
  const { layers, experts, values } = heatmap;
  const nL = layers.length;
  const nE = experts.length;
  const scale = colourScale(values, heatmap.baseline);

  const cellW = Math.max(MIN_CELL_WIDTH, Math.min(MAX_CELL, PLOT_WIDTH / Math.max(nE, 1)));
  const cellH = Math.max(MIN_CELL_HEIGHT, Math.min(MAX_CELL, PLOT_HEIGHT / Math.max(nL, 1)));
  const plotW = cellW * nE;
  const plotH = cellH * nL;

  const layerLabelWidth = maxDigits(layers) * DIGIT_WIDTH;
  const left = 16 + layerLabelWidth + 6; // rotated "layer" axis name, then the layer numbers
  const top = TITLE_FONT_SIZE + 14;
  const expertAxisY = top + plotH + 4 + FONT_SIZE;
  const legendY = expertAxisY + FONT_SIZE + 14;
  const legendH = LEGEND_SWATCH_HEIGHT + FONT_SIZE + 6;
  const anyMissing = values.some(row => row.some(v => v === null));

  const titleWidth = heatmap.title.length * TITLE_FONT_SIZE * 0.55;
  const width = Math.ceil(Math.max(left + plotW + 12, titleWidth + 12, left + legendWidth(scale, anyMissing) + 12));
  const height = Math.ceil(legendY + legendH + 4);

  const svg = el('svg', {
    class: 'mwb-heatmap',
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: 'img',
    'font-size': FONT_SIZE
  });
  svg.setAttribute('aria-label', heatmap.title || 'layer by expert heatmap');

  svg.appendChild(el('text', { class: 'mwb-heatmap-title', x: 4, y: TITLE_FONT_SIZE + 2, 'font-size': TITLE_FONT_SIZE }, heatmap.title));

  // the grid, over a background in the theme's colour that shows through at the baseline
  const grid = el('g', { class: 'mwb-grid', transform: `translate(${left},${top})`, 'shape-rendering': 'crispEdges' });
  grid.appendChild(el('rect', { class: 'mwb-plot-bg', x: 0, y: 0, width: plotW, height: plotH }));
  const eagerTitles = nL * nE <= MAX_EAGER_TITLES;
  const fragment = document.createDocumentFragment();
  for (let i = 0; i < nL; i++) {
    const row = values[i];
    const y = String(i * cellH);
    for (let j = 0; j < nE; j++) {
      const v = row[j];
      const rect = document.createElementNS(SVG_NS, 'rect');
      rect.setAttribute('class', v === null ? 'mwb-cell mwb-missing' : 'mwb-cell');
      rect.setAttribute('x', String(j * cellW));
      rect.setAttribute('y', y);
      rect.setAttribute('width', String(cellW));
      rect.setAttribute('height', String(cellH));
      rect.setAttribute('data-layer', String(layers[i]));
      rect.setAttribute('data-expert', String(experts[j]));
      if (v !== null) {
        const paint = cellPaint(scalePosition(v, scale));
        rect.setAttribute('fill', paint.fill);
        rect.setAttribute('fill-opacity', paint.opacity.toFixed(3));
        rect.setAttribute('data-value', String(v));
      }
      if (eagerTitles) {
        rect.appendChild(el('title', {}, cellLabel(layers[i], experts[j], v, scale)));
      }
      fragment.appendChild(rect);
    }
  }
  if (!eagerTitles) {
    // a very large grid gets each cell's tooltip when the pointer first reaches it: tens of thousands of
    // <title> nodes up front would double the time the browser takes to lay the output out
    grid.addEventListener('mouseover', event => {
      const rect = event.target;
      if (rect instanceof SVGRectElement && rect.classList.contains('mwb-cell') && !rect.firstChild) {
        const value = rect.getAttribute('data-value');
        const label = cellLabel(
          Number(rect.getAttribute('data-layer')),
          Number(rect.getAttribute('data-expert')),
          value === null ? null : Number(value),
          scale
        );
        rect.appendChild(el('title', {}, label));
      }
    });
  }
  grid.appendChild(fragment);
  svg.appendChild(grid);

  // layer numbers at the left, expert numbers along the bottom (every n-th where they would collide)
  const axes = el('g', { class: 'mwb-axis' });
  const layerStep = labelStep((FONT_SIZE + 1) / cellH);
  for (let i = 0; i < nL; i += layerStep) {
    axes.appendChild(
      el('text', { x: left - 4, y: top + (i + 0.5) * cellH, 'text-anchor': 'end', 'dominant-baseline': 'central' }, String(layers[i]))
    );
  }
  const expertStep = labelStep((maxDigits(experts) * DIGIT_WIDTH + 6) / cellW);
  for (let j = 0; j < nE; j += expertStep) {
    axes.appendChild(el('text', { x: left + (j + 0.5) * cellW, y: expertAxisY, 'text-anchor': 'middle' }, String(experts[j])));
  }
  axes.appendChild(
    el(
      'text',
      {
        class: 'mwb-axis-name',
        x: 0,
        y: 0,
        transform: `translate(10,${top + plotH / 2}) rotate(-90)`,
        'text-anchor': 'middle'
      },
      'layer'
    )
  );
  axes.appendChild(
    el('text', { class: 'mwb-axis-name', x: left + plotW / 2, y: expertAxisY + FONT_SIZE + 4, 'text-anchor': 'middle' }, 'expert')
  );
  svg.appendChild(axes);

  svg.appendChild(renderLegend(scale, left, legendY, anyMissing));
  return svg;
}

/** The legend's labels: the values at both ends of the scale and at its centre. */
function legendLabels(scale: IColourScale): [string, string, string] {
  const lo = scale.centre - scale.span;
  const hi = scale.centre + scale.span;
  if (scale.fromBaseline && scale.centre > 0) {
    return [`${formatValue(Math.max(lo, 0))} (0x)`, `${formatValue(scale.centre)} (uniform)`, `\u2265${formatValue(hi)} (2x)`];
  }
  return [`\u2264${formatValue(lo)}`, `${formatValue(scale.centre)} (mean)`, `\u2265${formatValue(hi)}`];
}

/**
 * A strip of swatches from fully blue through neutral to fully red: the low end's value under its left end,
 * the centre's under its middle, the high end's to its right, then a grey swatch for missing cells if any.
 */
function renderLegend(scale: IColourScale, x: number, y: number, showMissing: boolean): SVGGElement {
  const legend = el('g', { class: 'mwb-legend', transform: `translate(${x},${y})` });
  const w = LEGEND_STEPS * LEGEND_SWATCH_WIDTH;
  legend.appendChild(el('rect', { class: 'mwb-plot-bg', x: 0, y: 0, width: w, height: LEGEND_SWATCH_HEIGHT }));
  for (let s = 0; s < LEGEND_STEPS; s++) {
    const paint = cellPaint(-1 + (2 * s) / (LEGEND_STEPS - 1));
    legend.appendChild(
      el('rect', {
        class: 'mwb-legend-swatch',
        x: s * LEGEND_SWATCH_WIDTH,
        y: 0,
        width: LEGEND_SWATCH_WIDTH,
        height: LEGEND_SWATCH_HEIGHT,
        fill: paint.fill,
        'fill-opacity': paint.opacity.toFixed(3)
      })
    );
  }
  legend.appendChild(el('rect', { class: 'mwb-legend-frame', x: 0, y: 0, width: w, height: LEGEND_SWATCH_HEIGHT, fill: 'none' }));

  const [lo, mid, hi] = legendLabels(scale);
  const below = LEGEND_SWATCH_HEIGHT + FONT_SIZE + 2;
  legend.appendChild(el('text', { x: 0, y: below, 'text-anchor': 'start' }, lo));
  legend.appendChild(el('text', { x: w / 2, y: below, 'text-anchor': 'middle' }, mid));
  const middle = LEGEND_SWATCH_HEIGHT / 2;
  legend.appendChild(el('text', { x: w + 6, y: middle, 'dominant-baseline': 'central' }, hi));
  if (showMissing) {
    const mx = w + 6 + hi.length * DIGIT_WIDTH + 16;
    legend.appendChild(
      el('rect', { class: 'mwb-missing', x: mx, y: 0, width: LEGEND_SWATCH_WIDTH, height: LEGEND_SWATCH_HEIGHT })
    );
    legend.appendChild(el('text', { x: mx + LEGEND_SWATCH_WIDTH + 4, y: middle, 'dominant-baseline': 'central' }, 'no data'));
  }
  return legend;
}

/** The width the legend takes, for sizing the SVG. */
function legendWidth(scale: IColourScale, showMissing: boolean): number {
  const hi = legendLabels(scale)[2];
  const w = LEGEND_STEPS * LEGEND_SWATCH_WIDTH + 6 + hi.length * DIGIT_WIDTH;
  return showMissing ? w + 16 + LEGEND_SWATCH_WIDTH + 4 + 7 * DIGIT_WIDTH : w;
}
