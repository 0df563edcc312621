// The generate form's reference images (uploads, elements, gallery images dragged in) and LoRAs with strength.

import { api, upload } from "./api.js";
import { $, el } from "./dom.js";
import { on, state } from "./state.js";
import { withToken } from "./token.js";

const references = []; // {value: what the API takes (media URL or element id), label, picture}
const loras = []; // {name, strength}

export function referenceValues() {
  return references.map((ref) => ref.value);
}

export function loraValues() {
  return loras.map((lora) => ({ name: lora.name, strength: Number(lora.strength) }));
}

export function addReference(value, label, picture) {
  if (references.some((ref) => ref.value === value)) return;
  if (references.length >= state.config.max_references) {
    $("#g-error").textContent = `reference_images: at most ${state.config.max_references} references`;
    return;
  }
  references.push({ value, label, picture });
  renderReferences();
}

export function setReferences(urls) {
  references.length = 0;
  for (const url of urls || []) references.push({ value: url, label: url.split("/").pop(), picture: url });
  renderReferences();
}

export function setLoras(list) {
  loras.length = 0;
  for (const lora of list || []) loras.push({ name: lora.name, strength: lora.strength ?? 1 });
  renderLoras();
}

function renderReferences() {
  const list = $("#g-ref-list");
  list.replaceChildren(...references.map((ref, i) => el("li", {},
    ref.picture ? el("img", { src: withToken(ref.picture), alt: "" }) : null,
    el("span", { text: ref.label }),
    el("button", { type: "button", "aria-label": `Remove reference ${ref.label}`, text: "×",
      onclick: () => { references.splice(i, 1); renderReferences(); } }))));
}

function renderLoras() {
  const limit = state.config.lora_strength_limit;
  $("#g-lora-list").replaceChildren(...loras.map((lora, i) => el("li", {},
    el("span", { text: lora.name }),
    el("label", { class: "inline" }, "Strength", el("input", { type: "number", step: "0.05", min: -limit, max: limit,
      value: lora.strength, "data-field": "loras", onchange: (e) => { lora.strength = e.target.value; } })),
    el("button", { type: "button", "aria-label": `Remove LoRA ${lora.name}`, text: "×",
      onclick: () => { loras.splice(i, 1); renderLoras(); } }))));
}

export async function setupReferences() {
  const drop = $("#g-ref-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const url = e.dataTransfer.getData("text/x-flux2-image");
    if (url) addReference(url, url.split("/").pop(), url);
  });
  $("#g-ref-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      const sent = await upload(file, state.projectId, "reference");
      addReference(sent.url, file.name, sent.url);
    } catch (err) {
      $("#g-error").textContent = err.message;
    }
    e.target.value = "";
  });
  $("#g-ref-element").addEventListener("change", (e) => {
    const element = state.elements.find((item) => item.id === e.target.value);
    if (element) addReference(element.id, element.name, element.image_path);
    e.target.value = "";
  });
  on("elements", renderElementChoices);
}

function renderElementChoices() {
  const withPicture = state.elements.filter((element) => element.image_path);
  $("#g-ref-element").replaceChildren(el("option", { value: "", text: withPicture.length ? "(choose)" : "(none with a picture)" }),
    ...withPicture.map((element) => el("option", { value: element.id, text: `${element.name} (${element.trigger_word})` })));
}

export async function setupLoras() {
  const offered = await api("/loras");
  const select = $("#g-lora-file");
  select.replaceChildren(...offered.map((lora) => el("option", { value: lora.name, text: lora.name })));
  $("#g-lora-add").disabled = !offered.length;
  select.disabled = !offered.length;
  $("#g-lora-help").textContent = offered.length
    ? `at most ${state.config.max_loras}; strength ${-state.config.lora_strength_limit} to ${state.config.lora_strength_limit}`
    : "No LoRA files yet: put .safetensors files in the data folder's loras/ and reload.";
  $("#g-lora-add").addEventListener("click", () => {
    if (loras.length < state.config.max_loras && select.value) loras.push({ name: select.value, strength: 1 });
    renderLoras();
  });
}
