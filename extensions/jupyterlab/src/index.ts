/**
 * moe-workbench-jupyterlab: the "MoE stores" sidebar (this module) and the routing summary renderer
 * (`mime.ts`, loaded by JupyterLab as this package's mime extension).
 */

import { ILayoutRestorer, type JupyterFrontEnd, type JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, showErrorMessage } from '@jupyterlab/apputils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import type { Widget } from '@lumino/widgets';

import { PANEL_ID, StoresPanel } from './panel';
import { createDashboard, type IStore } from './stores';

const COMMAND_SHOW = 'moe-workbench:show-stores';

/** The parts of a notebook panel used after opening it (it is not imported, to keep dependencies small). */
interface IOpenedDocument {
  context?: {
    ready?: Promise<void>;
    sessionContext?: { ready?: Promise<void>; session?: { kernel?: unknown } | null };
  };
}

/**
 * Run the new dashboard notebook once its kernel is up, if it is still the current widget (the run command
 * acts on the current notebook). Anything unexpected leaves the notebook for the user to run.
 */
async function runWhenReady(app: JupyterFrontEnd, widget: unknown): Promise<void> {
  const context = (widget as IOpenedDocument | undefined)?.context;
  const session = context?.sessionContext;
  if (!context || !session?.ready) {
    return;
  }
  await context.ready;
  await session.ready;
  if (session.session?.kernel && app.shell.currentWidget === (widget as Widget)) {
    await app.commands.execute('notebook:run-all-cells');
  }
}

async function openDashboard(app: JupyterFrontEnd, store: IStore): Promise<void> {
  let path: string;
  try {
    path = await createDashboard(app.serviceManager.contents, store.path);
  } catch (err) {
    await showErrorMessage('Cannot create the dashboard notebook', err instanceof Error ? err : String(err));
    return;
  }
  const widget: unknown = await app.commands.execute('docmanager:open', { path });
  runWhenReady(app, widget).catch(err => console.warn('moe-workbench: dashboard not run automatically', err));
}

const storesPlugin: JupyterFrontEndPlugin<void> = {
  id: 'moe-workbench-jupyterlab:stores',
  description: 'A left sidebar listing the routing stores in the file browser folder, with their provenance.',
  autoStart: true,
  optional: [IDefaultFileBrowser, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    browser: IDefaultFileBrowser | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const panel = new StoresPanel({
      contents: app.serviceManager.contents,
      folder: () => browser?.model.path ?? '',
      openDashboard: store => openDashboard(app, store)
    });
    app.shell.add(panel, 'left', { rank: 600 });
    restorer?.add(panel, PANEL_ID); // reopen the sidebar after a reload if it was open

    if (browser) {
      browser.model.pathChanged.connect(() => panel.invalidate());
      // the browser polls its folder; re-read the stores when the set of *.zarr directories changes
      let seen = '';
      browser.model.refreshed.connect(() => {
        const names = Array.from(browser.model.items())
          .filter(item => item.type === 'directory' && item.name.endsWith('.zarr'))
          .map(item => item.name)
          .sort()
          .join('\n');
        if (names !== seen) {
          seen = names;
          panel.invalidate();
        }
      });
    }

    app.commands.addCommand(COMMAND_SHOW, {
      label: 'Show MoE Stores',
      caption: 'Show the routing stores of the current folder',
      execute: () => app.shell.activateById(PANEL_ID)
    });
    palette?.addItem({ command: COMMAND_SHOW, category: 'MoE Workbench' });
  }
};

export default [storesPlugin];
