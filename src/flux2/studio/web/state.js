// What the page's parts share: the service's configuration, the current project, and a few events between parts.

export const state = {
  config: null, // GET /web/config
  projectId: null,
  images: [], // the project's gallery, newest first
  elements: [],
};

const listeners = new Map();

export function on(name, callback) {
  if (!listeners.has(name)) listeners.set(name, []);
  listeners.get(name).push(callback);
}

export function emit(name, detail) {
  for (const callback of listeners.get(name) || []) callback(detail);
}
