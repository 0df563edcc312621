// The Edit view's modes: inpainting (the mask canvas, canvas.js), outpainting (margins added around the picture,
// previewed around it) and image-to-image (the picture noised to a strength, then redrawn). Each mode shows only
// its own controls and queues its own job; the result comes to the gallery with its record.

import { api } from "./api.js";
import { editedSource, inpaint } from "./canvas.js";
import { $, $$, clearErrors, showError } from "./dom.js";
import { emit, on, state } from "./state.js";

const MODES = {
  inpaint: { prompt: "Prompt for the masked area", submit: "Inpaint", job: "inpainting",
    strength: "1: the masked area is drawn anew; lower keeps more of what is there" },
  outpaint: { prompt: "Prompt for the wider picture", submit: "Outpaint", job: "outpainting" },
  img2img: { prompt: "Prompt for the new picture", submit: "Image to image", job: "image-to-image",
    strength: "low: close to the picture; 1: only the prompt and the seed count" },
};
const strengths = { inpaint: 1, img2img: 0.8 }; // each mode keeps its own, starting at the service's default
const SIDES = ["left", "right", "top", "bottom"];
let mode = "inpaint";
const panel = () => $("#panel-edit");

export function setupEditModes() {
  for (const radio of $$("input[name=e-mode]")) radio.addEventListener("change", () => choose(radio.value));
  for (const side of SIDES) {
    $(`#e-${side}`).addEventListener("input", () => {
      clearErrors(panel()); // a message about the old margins no longer applies
      showMargins();
    });
  }
  on("editing", showMargins);
  $("#e-submit").addEventListener("click", submit);
  choose(mode);
}

function choose(name) {
  const slider = $("#e-strength");
  if (mode in strengths) strengths[mode] = Number(slider.value);
  mode = name;
  for (const node of $$("[data-modes]", panel())) node.hidden = !node.dataset.modes.split(" ").includes(name);
  $("#e-prompt-label").textContent = MODES[name].prompt;
  $("#e-submit").textContent = MODES[name].submit;
  if (name in strengths) {
    slider.value = strengths[name];
    slider.dispatchEvent(new Event("input")); // its shown value
    $("#e-strength-help").textContent = MODES[name].strength;
  }
  clearErrors(panel());
  showMargins();
}

function margins() {
  return Object.fromEntries(SIDES.map((side) => [side, Number($(`#e-${side}`).value) || 0]));
}

// The new border drawn around the picture, to scale: padding in % of the frame's width.
function showMargins() {
  const source = editedSource();
  const frame = $("#e-wrap");
  frame.classList.toggle("growing", mode === "outpaint" && Boolean(source));
  if (mode !== "outpaint" || !source) {
    frame.style.padding = "";
    return;
  }
  const m = margins();
  const width = source.width + m.left + m.right;
  const height = source.height + m.top + m.bottom;
  const share = (px) => `${(100 * Math.max(0, px)) / width}%`;
  frame.style.padding = [m.top, m.right, m.bottom, m.left].map(share).join(" ");
  const grid = state.config.grid;
  const off = width % grid || height % grid ? ` (each side must be a multiple of ${grid} px)` : "";
  $("#e-result-size").textContent = `Result: ${width} × ${height} px${off}`;
}

async function submit() {
  if (mode === "inpaint") return inpaint();
  clearErrors(panel());
  const source = editedSource();
  const seed = $("#e-seed").value;
  const prompt = $("#e-prompt").value;
  const own = mode === "outpaint"
    ? { ...margins(), mask_blur: Number($("#e-feather").value) }
    : { strength: Number($("#e-strength").value) };
  try {
    const queued = await api(`/edit/${mode}`, { method: "POST", json: {
      image_path: source.url, prompt, seed: seed === "" ? null : Number(seed), ...own } });
    $("#e-status").textContent = `Queued ${MODES[mode].job} job ${queued.job_id}`;
    $("#e-status").dataset.job = queued.job_id;
    emit("queued", { job_id: queued.job_id, prompt: `${mode}: ${prompt}` });
  } catch (err) {
    showError(panel(), err, $("#e-error"));
  }
}
