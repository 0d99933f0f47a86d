/**
 * The "MoE stores" sidebar: the routing stores in the file browser's current folder, with their provenance
 * and a button that opens a dashboard notebook next to each.
 */

import { refreshIcon } from '@jupyterlab/ui-components';
import type { Contents } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { storesIcon } from './icon';
import { listStores, provenance, summaryLine, type IFolderListing, type IStore } from './stores';

export const PANEL_ID = 'moe-workbench-stores';

export interface IStoresPanelOptions {
  contents: Contents.IManager;
  /** The folder to list (server path, '' for the root). */
  folder: () => string;
  /** Called by a store's "Open dashboard" button. */
  openDashboard: (store: IStore) => Promise<void>;
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/**
 * The panel's node carries `data-state`: "loading" while a listing is read, then "ready" or "error", so
 * that scripts can wait for it.
 */
export class StoresPanel extends Widget {
  constructor(options: IStoresPanelOptions) {
    super();
    this._options = options;
    this.id = PANEL_ID;
    this.addClass('mwb-stores-panel');
    this.title.icon = storesIcon;
    this.title.caption = 'MoE stores';

    const header = element('div', 'mwb-stores-header');
    header.appendChild(element('span', 'mwb-stores-heading', 'MoE stores'));
    const refresh = element('button', 'mwb-refresh jp-Button jp-mod-minimal');
    refresh.type = 'button';
    refresh.title = 'Refresh the list of routing stores';
    refresh.setAttribute('aria-label', 'Refresh');
    refresh.appendChild(refreshIcon.element({ tag: 'span', elementPosition: 'center', height: '16px', width: '16px' }));
    refresh.addEventListener('click', () => void this.refresh());
    header.appendChild(refresh);

    this._folderNode = element('div', 'mwb-stores-folder');
    this._statusNode = element('div', 'mwb-stores-status');
    this._listNode = element('ul', 'mwb-stores');
    this._skippedNode = element('div', 'mwb-skipped');
    this.node.append(header, this._folderNode, this._statusNode, this._listNode, this._skippedNode);
    this.node.dataset.state = 'idle';
  }

  /** Re-read the folder's stores now if the panel is showing, or when it is next shown. */
  invalidate(): void {
    if (this.isVisible) {
      void this.refresh();
    } else {
      this._stale = true;
    }
  }

  /** Read the current folder's stores and redraw. Overlapping calls: the last one wins. */
  async refresh(): Promise<void> {
    const generation = ++this._generation;
    const folder = this._options.folder();
    this._stale = false;
    this.node.dataset.state = 'loading';
    this._folderNode.textContent = `in /${folder}`;
    this._folderNode.title = `/${folder}`;
    this._statusNode.textContent = 'Reading stores\u2026';
    let listing: IFolderListing;
    try {
      listing = await listStores(this._options.contents, folder);
    } catch (err) {
      if (generation === this._generation) {
        this._listNode.replaceChildren();
        this._skippedNode.replaceChildren();
        this._statusNode.textContent = `Cannot list /${folder}: ${err instanceof Error ? err.message : String(err)}`;
        this.node.dataset.state = 'error';
      }
      return;
    }
    if (generation === this._generation) {
      this._draw(listing);
      this.node.dataset.state = 'ready';
    }
  }

  protected override onAfterShow(): void {
    if (this._stale || this._generation === 0) {
      void this.refresh();
    }
  }

  private _draw(listing: IFolderListing): void {
    const { stores, skipped } = listing;
    this._statusNode.textContent = stores.length
      ? ''
      : 'No routing stores (directories named *.zarr) in this folder. Browse to a folder that holds one in the file browser.';
    this._listNode.replaceChildren(...stores.map(store => this._storeItem(store)));
    if (skipped.length) {
      const note = element('details', 'mwb-skipped-note');
      note.appendChild(element('summary', undefined, `${skipped.length} other *.zarr ${skipped.length === 1 ? 'directory' : 'directories'} skipped`));
      const list = element('ul');
      for (const s of skipped) {
        const item = element('li', 'mwb-skipped-store');
        item.dataset.path = s.path;
        item.textContent = `${s.name}: ${s.reason}`;
        list.appendChild(item);
      }
      note.appendChild(list);
      this._skippedNode.replaceChildren(note);
    } else {
      this._skippedNode.replaceChildren();
    }
  }

  private _storeItem(store: IStore): HTMLLIElement {
    const item = element('li', 'mwb-store');
    item.dataset.path = store.path;
    const name = element('div', 'mwb-store-name', store.name);
    name.title = store.path;
    const summary = element('div', 'mwb-store-summary', summaryLine(store.attributes));
    if (store.attributes.complete === false) {
      item.classList.add('mwb-incomplete');
    }

    const details = element('details', 'mwb-store-details');
    details.appendChild(element('summary', undefined, 'provenance'));
    const list = element('dl', 'mwb-provenance');
    for (const [label, value] of provenance(store.attributes)) {
      list.append(element('dt', undefined, label), element('dd', undefined, value));
    }
    details.appendChild(list);

    const open = element('button', 'mwb-open-dashboard jp-Button jp-mod-styled jp-mod-accept', 'Open dashboard');
    open.type = 'button';
    open.title = `Create a notebook next to ${store.name} that shows its RoutingDashboard`;
    open.addEventListener('click', async () => {
      open.disabled = true;
      try {
        await this._options.openDashboard(store);
      } finally {
        open.disabled = false;
      }
    });

    item.append(name, summary, details, open);
    return item;
  }

  private _options: IStoresPanelOptions;
  private _folderNode: HTMLDivElement;
  private _statusNode: HTMLDivElement;
  private _listNode: HTMLUListElement;
  private _skippedNode: HTMLDivElement;
  private _generation = 0;
  private _stale = true;
}
