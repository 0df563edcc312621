// The API token of a service started with one (flux2 serve --api-token): asked for on the first 401, kept for this
// tab only (sessionStorage), sent as Authorization: Bearer on fetches and as ?token= on the URLs the browser
// fetches itself (images, downloads, the event stream), which carry no headers.

import { $ } from "./dom.js";

const KEY = "flux2.token";
let asking = null; // one prompt answers every request refused meanwhile
const keepOpen = (e) => e.preventDefault(); // Escape does not close it: nothing works without the token

export const currentToken = () => sessionStorage.getItem(KEY) || "";

export function withToken(url) {
  const token = currentToken();
  if (!token || !url) return url;
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

// Resolves once the user has entered a token; `refused` is the token the service just turned down, if any.
export function askForToken(refused) {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dialog = $("#token");
    const input = $("#t-token");
    $("#t-error").textContent = refused
      ? "The service did not accept that token: check it (flux2 serve --api-token) and enter it again."
      : "";
    input.value = "";
    if (refused) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
    const submit = (e) => {
      e.preventDefault();
      const token = input.value.trim();
      if (!token) {
        $("#t-error").textContent = "API token: enter the token the service was started with.";
        return;
      }
      sessionStorage.setItem(KEY, token);
      $("#t-form").removeEventListener("submit", submit);
      dialog.close();
      asking = null;
      resolve();
    };
    $("#t-form").addEventListener("submit", submit);
    dialog.addEventListener("cancel", keepOpen);
    dialog.showModal();
    input.focus();
  });
  return asking;
}
