// The gallery: every image of the project with its record; reuse its settings or seed, download, delete, edit,
// use it as a reference; compare two side by side, or queue an X/Y grid over seeds or one setting.

import { api } from "./api.js";
import { $, clearErrors, el, showError } from "./dom.js";
import { applySettings, submit } from "./generate.js";
import { addReference } from "./refs.js";
import { emit, on, state } from "./state.js";
import { withToken } from "./token.js";

const picked = new Set(); // asset ids chosen for comparison
let shown = null; // the image open in the details dialog

export function setupGallery() {
  on("ended", ({ name }) => { if (name === "complete") loadGallery(); });
  on("project", loadGallery);
  $("#c-compare").addEventListener("click", () => compare([...picked].map(byId).filter(Boolean)));
  $("#d-reuse").addEventListener("click", () => { applySettings(shown.meta); $("#details").close(); });
  $("#d-reuse-seed").addEventListener("click", () => { $("#g-seed").value = shown.meta.seed; $("#details").close(); });
  $("#d-reference").addEventListener("click", () => {
    addReference(shown.url, shown.filename, shown.url);
    $("#details").close();
  });
  $("#d-edit").addEventListener("click", () => { emit("edit", shown); $("#details").close(); });
  $("#d-delete").addEventListener("click", remove);
  $("#d-grid").addEventListener("click", queueGrid);
}

const byId = (id) => state.images.find((image) => image.id === id);

export async function loadGallery() {
  if (!state.projectId) return;
  const images = await api(`/projects/${state.projectId}/images`);
  // Made by a job: uploads (sources, masks, pictures) are inputs, not the gallery's.
  state.images = images.filter((image) => image.job_id).map((image) => ({ ...image, meta: JSON.parse(image.meta_json) }));
  for (const id of picked) if (!byId(id)) picked.delete(id);
  render();
}

function tile(image) {
  const label = `${image.meta.prompt || image.filename}, seed ${image.meta.seed}`;
  return el("li", { "data-asset": image.id, "data-job": image.job_id || "" },
    el("button", { type: "button", class: "open", "aria-label": `Open ${label}`, onclick: () => open(image) },
      el("img", { src: withToken(image.thumbnail_url || image.url), alt: label, draggable: "true", loading: "lazy",
        ondragstart: (e) => e.dataTransfer.setData("text/x-flux2-image", image.url) })),
    el("label", { class: "pick" }, el("input", { type: "checkbox", checked: picked.has(image.id),
      "aria-label": `Select ${label} for comparison`, onchange: (e) => pick(image.id, e.target.checked) }), "compare"),
    image.meta.seed !== undefined ? el("span", { class: "seed", text: `seed ${image.meta.seed}` }) : null);
}

function render() {
  $("#gallery").replaceChildren(...state.images.map(tile));
  $("#gallery-empty").hidden = state.images.length > 0;
  $("#c-compare").disabled = picked.size < 2;
}

function pick(id, on) {
  if (on) picked.add(id);
  else picked.delete(id);
  $("#c-compare").disabled = picked.size < 2;
}

function recordRows(image) {
  const meta = image.meta;
  const record = meta.record || {};
  const loras = (record.loras || []).map((lora) => `${lora.name} × ${lora.strength}`).join(", ");
  const rows = [["Prompt", meta.prompt], ["Enhanced prompt", record.upsampled_prompt], ["Negative prompt", meta.negative_prompt],
    ["Seed", meta.seed], ["Model", meta.model], ["Size", `${image.width} × ${image.height}`], ["Steps", meta.steps],
    ["Guidance", meta.guidance], ["CFG scale", record.true_cfg_scale], ["Mode", record.mode], ["Strength", record.strength],
    ["Margins", record.mode === "outpaint" ? margins(record.edit) : null], ["Source", meta.original_image],
    ["LoRAs", loras], ["References", (meta.reference_images || []).length || null], ["Watermark", record.watermark],
    ["Software", record.software], ["Note", record.note]];
  return rows.filter(([, value]) => value !== undefined && value !== null && value !== "")
    .flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: String(value) })]);
}

function margins(edit) {
  return ["left", "right", "top", "bottom"].filter((side) => edit?.[side]).map((side) => `${side} ${edit[side]} px`).join(", ");
}

async function open(image) {
  shown = image;
  clearErrors($("#details"));
  $("#d-image").src = withToken(image.url);
  $("#d-image").alt = image.meta.prompt || image.filename;
  $("#d-record").replaceChildren(...recordRows(image));
  $("#d-download").href = withToken(image.url);
  $("#d-download").setAttribute("download", image.filename);
  $("#d-values").value = "";
  $("#d-watermark").textContent = "checking the watermark…";
  $("#details").showModal();
  try {
    const check = await api(`/web/assets/${image.id}/watermark`);
    $("#d-watermark").textContent = check.detected ? `✓ ${check.detail}` : check.detail;
  } catch (err) {
    $("#d-watermark").textContent = `watermark: ${err.message}`;
  }
}

async function remove() {
  if (!confirm("Delete this image and its files?")) return;
  await api(`/assets/${shown.id}`, { method: "DELETE" });
  $("#details").close();
  loadGallery();
}

function figure(caption, src) {
  return el("figure", {}, el("img", { src: withToken(src) || "", alt: src ? caption : `${caption} (waiting)` }),
    el("figcaption", { text: caption }));
}

function compare(images) {
  const body = $("#c-body");
  body.style.setProperty("--columns", Math.min(images.length, 4));
  body.replaceChildren(...images.map((image) => figure(`seed ${image.meta.seed}, ${image.meta.steps} steps, guidance ${image.meta.guidance}: ${image.meta.prompt}`, image.url)));
  $("#c-title").textContent = "Compare";
  $("#compare").showModal();
}

// One job per value of the chosen setting, every other setting as this image's; the grid fills in as they end.
async function queueGrid() {
  clearErrors($("#details"));
  const axis = $("#d-axis").value;
  const values = $("#d-values").value.split(",").map((v) => v.trim()).filter(Boolean).map(Number);
  if (!values.length || values.some((v) => !Number.isFinite(v)) || values.length > 16) {
    return showError($("#details"), { field: "values", message: "values: 1 to 16 numbers, separated by commas" }, $("#d-error"));
  }
  const meta = shown.meta;
  const base = { prompt: meta.prompt, negative_prompt: meta.negative_prompt || "", width: meta.width, height: meta.height,
    num_inference_steps: meta.steps, guidance_scale: meta.guidance, reference_images: meta.reference_images || [] };
  const jobs = [];
  for (const value of values) {
    const seed = axis === "seed" ? value : meta.seed;
    const [job] = await submit({ seeds: [seed], body: { ...base, seed, ...(axis === "seed" ? {} : { [axis]: value }) } });
    if (!job) return showError($("#details"), { message: $("#g-error").textContent || "the grid could not be queued" }, $("#d-error"));
    jobs.push([job, `${$("#d-axis").selectedOptions[0].text} ${value}`]);
  }
  $("#details").close();
  showGrid(jobs);
}

function showGrid(jobs) {
  const body = $("#c-body");
  body.style.setProperty("--columns", Math.min(jobs.length, 4));
  const cells = new Map(jobs.map(([job, caption]) => [job, figure(caption, null)]));
  body.replaceChildren(...cells.values());
  $("#c-title").textContent = "X/Y grid";
  $("#compare").showModal();
  on("ended", ({ name, job }) => {
    const cell = cells.get(job.job_id);
    if (!cell) return;
    const img = cell.querySelector("img");
    if (name === "complete") img.src = withToken(job.url);
    img.alt = `${cell.textContent} (${job.status})`;
  });
}
