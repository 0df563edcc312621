// The picture being edited, and the inpainting canvas: paint (brush, eraser), click to segment (through the
// service's segmentation route), a mask from words, invert, feather; the mask is uploaded as black and white
// (white: regenerate) with the job.

import { api, upload } from "./api.js";
import { $, $$, clearErrors, showError } from "./dom.js";
import { emit, on, state } from "./state.js";
import { withToken } from "./token.js";

const PAINT = [255, 30, 110]; // how painted areas show over the picture
let source = null; // {url, width, height}
let tool = "brush";
let points = []; // click-to-segment points [[x, y], ...] and their labels
let labels = [];
const canvas = () => $("#e-mask");
const panel = () => $("#panel-edit");

export function setupCanvas() {
  on("edit", (image) => startEditing(image.url, image.meta?.prompt || ""));
  $("#e-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      const sent = await upload(file, state.projectId, "general");
      await startEditing(sent.url, "");
    } catch (err) {
      showError(panel(), err, $("#e-error"));
    }
    e.target.value = "";
  });
  for (const button of $$("[data-tool]", panel())) button.addEventListener("click", () => chooseTool(button.dataset.tool));
  $("#e-invert").addEventListener("click", invert);
  $("#e-clear").addEventListener("click", clear);
  $("#e-text-go").addEventListener("click", maskFromWords);
  for (const name of ["brush", "feather", "strength"]) {
    const input = $(`#e-${name}`);
    const show = () => { $(`#e-${name}-value`).textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }
  setupPainting();
}

async function startEditing(url, prompt) {
  emit("tab", "edit");
  const img = $("#e-image");
  img.src = withToken(url);
  await img.decode();
  source = { url, width: img.naturalWidth, height: img.naturalHeight };
  canvas().width = source.width;
  canvas().height = source.height;
  clear();
  $("#e-prompt").value = prompt;
  $("#e-stage").hidden = false;
  $("#e-empty").hidden = true;
  $("#e-status").textContent = `Editing ${url.split("/").pop()} (${source.width} × ${source.height})`;
  emit("editing", source);
}

export const editedSource = () => source; // {url, width, height}: the clean media URL, for the service's routes

function chooseTool(name) {
  tool = name;
  for (const button of $$("[data-tool]", panel())) button.setAttribute("aria-pressed", String(button.dataset.tool === name));
}

function toImage(event) {
  const box = canvas().getBoundingClientRect();
  return [(event.clientX - box.left) * (source.width / box.width), (event.clientY - box.top) * (source.height / box.height)];
}

function setupPainting() {
  let last = null;
  const context = () => canvas().getContext("2d");
  const stroke = (from, to) => {
    const ctx = context();
    ctx.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = `rgb(${PAINT.join(",")})`;
    ctx.lineWidth = Number($("#e-brush").value) * (source.width / canvas().getBoundingClientRect().width);
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  };
  canvas().addEventListener("pointerdown", (e) => {
    if (!source) return;
    if (tool === "segment") return segmentAt(toImage(e), e.shiftKey ? 0 : 1);
    canvas().setPointerCapture(e.pointerId);
    last = toImage(e);
    stroke(last, last);
  });
  canvas().addEventListener("pointermove", (e) => {
    if (!last) return;
    const point = toImage(e);
    stroke(last, point);
    last = point;
  });
  const end = () => { last = null; };
  canvas().addEventListener("pointerup", end);
  canvas().addEventListener("pointercancel", end);
}

function clear() {
  canvas().getContext("2d").clearRect(0, 0, canvas().width, canvas().height);
  points = [];
  labels = [];
}

// Each pixel's mask value (0 or 255) through `change`, then shown as paint again.
function remap(change) {
  const ctx = canvas().getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  const pixels = ctx.getImageData(0, 0, canvas().width, canvas().height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const value = change(data[i + 3] > 127 ? 255 : 0, data, i);
    data.set(value ? [...PAINT, 255] : [0, 0, 0, 0], i);
  }
  ctx.putImageData(pixels, 0, 0);
}

function invert() {
  remap((value) => 255 - value);
}

async function showMask(blob) {
  const mask = await createImageBitmap(blob);
  const scratch = new OffscreenCanvas(source.width, source.height).getContext("2d");
  scratch.drawImage(mask, 0, 0, source.width, source.height);
  const grey = scratch.getImageData(0, 0, source.width, source.height).data;
  remap((_, data, i) => (grey[i] > 127 ? 255 : 0));
}

async function segmentAt(point, label) {
  clearErrors(panel());
  points.push(point.map(Math.round));
  labels.push(label);
  const form = new FormData();
  form.append("image", await (await fetch(withToken(source.url))).blob(), "image.png");
  form.append("points", JSON.stringify(points));
  form.append("labels", JSON.stringify(labels));
  try {
    await showMask(await api("/edit/segment", { method: "POST", form }));
    $("#e-status").textContent = `Mask from ${points.length} point(s); shift-click marks background`;
  } catch (err) {
    points.pop();
    labels.pop();
    showError(panel(), err, $("#e-error"));
  }
}

async function maskFromWords() {
  clearErrors(panel());
  try {
    const made = await api("/edit/segment-text", { method: "POST", json: { image_path: source.url, text: $("#e-text").value } });
    await showMask(await (await fetch(withToken(made.mask_path))).blob());
  } catch (err) {
    showError(panel(), err, $("#e-error"));
  }
}

async function maskFile() {
  const out = new OffscreenCanvas(source.width, source.height);
  const ctx = out.getContext("2d");
  const painted = canvas().getContext("2d").getImageData(0, 0, source.width, source.height);
  const data = painted.data;
  for (let i = 0; i < data.length; i += 4) {
    const value = data[i + 3] > 127 ? 255 : 0;
    data.set([value, value, value, 255], i);
  }
  ctx.putImageData(painted, 0, 0);
  const blob = await out.convertToBlob({ type: "image/png" });
  return new File([blob], "mask.png", { type: "image/png" });
}

export async function inpaint() {
  clearErrors(panel());
  const seed = $("#e-seed").value;
  try {
    const mask = await upload(await maskFile(), state.projectId, "general");
    const queued = await api("/edit/inpaint", { method: "POST", json: {
      image_path: source.url, mask_path: mask.url, prompt: $("#e-prompt").value,
      mask_blur: Number($("#e-feather").value), strength: Number($("#e-strength").value),
      seed: seed === "" ? null : Number(seed) } });
    $("#e-status").textContent = `Queued inpainting job ${queued.job_id}`;
    $("#e-status").dataset.job = queued.job_id;
    $("#e-status").dataset.mask = queued.mask_path;
    emit("queued", { job_id: queued.job_id, prompt: `inpaint: ${$("#e-prompt").value}` });
  } catch (err) {
    showError(panel(), err, $("#e-error"));
  }
}
