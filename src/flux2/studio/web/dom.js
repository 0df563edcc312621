// Small DOM helpers: building elements, and showing a message next to the field it is about.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export function clearErrors(root) {
  for (const node of $$("[aria-invalid]", root)) {
    node.removeAttribute("aria-invalid");
    const kept = (node.getAttribute("aria-describedby") || "").split(" ").filter((id) => id && !id.endsWith("-error"));
    node.setAttribute("aria-describedby", kept.join(" "));
  }
  for (const node of $$(".field-error", root)) node.remove();
  for (const node of $$(".error", root)) node.textContent = "";
}

// The message goes right after the field named `field` (its data-field), linked for screen readers; a message
// about no field of this form goes to the form's general error line.
export function showError(root, err, fallback) {
  const target = err.field && $(`[data-field="${err.field}"]`, root);
  if (!target) {
    fallback.textContent = err.message;
    return;
  }
  const id = `${target.id || err.field}-error`;
  const message = el("p", { class: "error field-error", id, role: "alert", text: err.message });
  const field = target.closest(".field") || target.parentElement;
  field.append(message);
  target.setAttribute("aria-invalid", "true");
  target.setAttribute("aria-describedby", [target.getAttribute("aria-describedby"), id].filter(Boolean).join(" "));
  if (target.focus) target.focus();
}

export function randomSeed() {
  return Math.floor(Math.random() * 2 ** 31); // the service's own range for a drawn seed
}
