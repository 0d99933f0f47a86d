import { LabIcon } from '@jupyterlab/ui-components';

/** A router fanning out to three experts; `jp-icon3` lets the theme colour it. */
const svgstr = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <path class="jp-icon3" stroke="#616161" stroke-width="1.6" fill="none" d="M7.5 12 15 5.5M7.5 12H15M7.5 12 15 18.5"/>
  <g class="jp-icon3" fill="#616161">
    <circle cx="5" cy="12" r="3"/>
    <rect x="15" y="2.5" width="6.5" height="6" rx="1.2"/>
    <rect x="15" y="9" width="6.5" height="6" rx="1.2"/>
    <rect x="15" y="15.5" width="6.5" height="6" rx="1.2"/>
  </g>
</svg>`;

export const storesIcon = new LabIcon({ name: 'moe-workbench:stores', svgstr });
