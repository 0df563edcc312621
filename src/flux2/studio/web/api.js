// Every call to the service goes through here: JSON in and out, the API token when the service wants one, and
// errors that name the field they are about.

import { askForToken, currentToken } from "./token.js";

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field; // the request field the service named, if any
  }
}

// The service answers {"detail": "width must be ..."} (its own checks) or FastAPI's list of {loc, msg}.
function errorOf(status, body) {
  const detail = body && body.detail !== undefined ? body.detail : body;
  if (Array.isArray(detail) && detail.length) {
    const first = detail[0];
    const loc = (first.loc || []).filter((part) => part !== "body");
    const field = loc.find((part) => typeof part === "string");
    return new ApiError(status, `${loc.join(".") || "request"}: ${first.msg}`, field);
  }
  const text = typeof detail === "string" ? detail : `HTTP ${status}`;
  const field = /^([a-z_]+)(\[\d+\])?[ :.,]/.exec(text); // "left, right, top, bottom: ..." is about left first
  return new ApiError(status, text, field ? field[1] : undefined);
}

export async function api(path, { method = "GET", json, form } = {}) {
  const options = { method, headers: {} };
  if (json !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(json);
  } else if (form !== undefined) {
    options.body = form;
  }
  const response = await authorised(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) throw errorOf(response.status, body);
  return body;
}

// The answer to `path`, sent again with the token the user gives while the service answers 401.
async function authorised(path, options) {
  for (;;) {
    const token = currentToken();
    if (token) options.headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new ApiError(0, `the service does not answer (${err.message})`);
    }
    if (response.status !== 401) return response;
    if (currentToken() === token) await askForToken(token); // else another request was just given a new one
  }
}

export async function upload(file, projectId, kind = "general") {
  const form = new FormData();
  form.append("file", file, file.name || "image.png");
  form.append("type", kind);
  if (projectId) form.append("project_id", projectId);
  return api("/upload", { method: "POST", form });
}
