// The front end of workbench.widgets.figure.FigureWidget: plotly's widget module, loaded once per page and
// shared by every figure. First from the Jupyter server (moe-workbench-jupyterlab's server extension serves it
// at the model's `_plotly_bundle` path); where that fails (no extension, another plotly version, another
// front end), from the kernel in numbered chunks.
const SERVED = Symbol.for("moe-workbench.plotly-served");
const SENT = Symbol.for("moe-workbench.plotly-sent");

function once(table, key, make) {
  const cache = (globalThis[table] ??= new Map());
  if (!cache.has(key)) {
    const made = make();
    made.catch(() => cache.delete(key));  // a later figure tries again
    cache.set(key, made);
  }
  return cache.get(key);
}

async function fromServer(path) {
  const config = document.getElementById("jupyter-config-data");
  if (!config) return null;
  const base = (JSON.parse(config.textContent).baseUrl || "/").replace(/\/?$/, "/");
  const url = new URL(base + path, window.location.origin).href;
  try {
    return await import(/* webpackIgnore: true */ url);
  } catch (error) {
    console.info(`moe-workbench: plotly's bundle is not served at ${url}; asking the kernel`, error);
    return null;
  }
}

function fromKernel(model) {
  return new Promise((resolve, reject) => {
    const parts = [];
    let received = 0;
    const listener = (msg, buffers) => {
      if (!msg || msg.mwb !== "plotly-chunk" || parts[msg.index] !== undefined) return;
      parts[msg.index] = buffers[0];
      if (++received < msg.count) return;
      model.off("msg:custom", listener);
      const url = URL.createObjectURL(new Blob(parts, { type: "text/javascript" }));
      import(/* webpackIgnore: true */ url).then(resolve, reject).finally(() => URL.revokeObjectURL(url));
    };
    model.on("msg:custom", listener);
    model.send({ mwb: "plotly-bundle" });
  });
}

export default () => {
  let ready;  // plotly's widget for this model, once its bundle is here
  return {
    async initialize(context) {
      const path = context.model.get("_plotly_bundle");
      const start = (plotly) => {
        const figure = plotly.default();
        figure.initialize(context);
        return figure;
      };
      // A served bundle is awaited here, so that plotly sees every later update of the model. The kernel's
      // chunks would queue behind this very initialisation, so that path is awaited in render instead.
      const served = await once(SERVED, path, () => fromServer(path));
      ready = served ? Promise.resolve(start(served)) : once(SENT, path, () => fromKernel(context.model)).then(start);
    },
    async render(context) {
      return (await ready).render(context);
    },
  };
};
