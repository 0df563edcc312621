// The generate form: a model picker that shows only the controls that model uses, sizes on the 16 px grid, seed
// control, batch count; it queues one job per image of the batch.

import { api } from "./api.js";
import { $, $$, clearErrors, el, randomSeed, showError } from "./dom.js";
import { loraValues, referenceValues, setLoras, setReferences } from "./refs.js";
import { emit, state } from "./state.js";

const SIZES = [[256, 256], [512, 512], [768, 768], [1024, 1024], [1024, 768], [768, 1024], [1344, 768], [768, 1344]];
const form = () => $("#panel-generate");

export function chosenModel() {
  return state.config.models.find((model) => model.name === $("#g-model").value);
}

export function snap(value) {
  const grid = state.config.grid;
  return Math.max(grid, Math.round(Number(value) / grid) * grid);
}

export function setupGenerate() {
  const { models, served } = state.config;
  $("#g-model").replaceChildren(...models.map((model) => el("option", { value: model.name,
    text: model.served ? `${model.name} (running)` : model.name })));
  $("#g-model").value = served;
  $("#g-model").addEventListener("change", showModelControls);
  setupSizes();
  $("#g-guidance").addEventListener("input", () => { $("#g-guidance-value").textContent = $("#g-guidance").value; });
  $("#g-dice").addEventListener("click", () => { $("#g-seed").value = randomSeed(); });
  $("#g-reuse-seed").addEventListener("click", () => {
    if (state.images.length) $("#g-seed").value = state.images[0].meta.seed;
  });
  const enhance = state.config.enhance_available;
  $("#g-enhance").disabled = !enhance;
  $("#g-enhance-help").textContent = enhance ? "the service rewrites the prompt before the model sees it"
    : "off: start the service with --upsample local or --upsample openrouter to use it";
  form().addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  showModelControls();
}

function setupSizes() {
  const select = $("#g-size");
  select.replaceChildren(...SIZES.map(([w, h]) => el("option", { value: `${w}x${h}`, text: `${w} × ${h}` })),
    el("option", { value: "custom", text: "Custom" }));
  select.addEventListener("change", () => {
    if (select.value === "custom") return $("#g-width").focus();
    const [w, h] = select.value.split("x");
    $("#g-width").value = w;
    $("#g-height").value = h;
  });
  for (const input of [$("#g-width"), $("#g-height")]) {
    input.addEventListener("change", () => {
      if (input.value !== "") input.value = snap(input.value); // the models' grid: 16 px
      const preset = `${$("#g-width").value}x${$("#g-height").value}`;
      select.value = SIZES.some(([w, h]) => `${w}x${h}` === preset) ? preset : "custom";
    });
  }
}

// What the chosen model uses: steps and guidance unless distilled to fixed values; a negative prompt and a CFG
// scale only when it runs classifier-free guidance (two passes per step).
function showModelControls() {
  const model = chosenModel();
  const show = { steps: !model.fixed.includes("num_steps"), guidance: !model.fixed.includes("guidance"), cfg: model.uses_cfg };
  for (const node of $$("[data-when]", form())) node.hidden = !show[node.dataset.when];
  $("[data-label=guidance]").textContent = model.uses_cfg ? "CFG scale" : "Guidance";
  $("#g-steps").value = model.num_steps;
  $("#g-guidance").value = model.guidance;
  $("#g-guidance-value").textContent = model.guidance;
  $("#g-width").value = model.width;
  $("#g-height").value = model.height;
  $("#g-size").value = `${model.width}x${model.height}`;
  const note = model.served ? `${model.description}. ${model.licence || ""}`
    : `This service runs ${state.config.served}: start it with “flux2 serve --model ${model.name}” to use this one.`;
  $("#g-model-note").textContent = note;
  $("#g-submit").disabled = !model.served;
}

function body(seed) {
  const model = chosenModel();
  const number = (selector) => ($(selector).value === "" ? null : Number($(selector).value));
  return {
    project_id: state.projectId,
    prompt: $("#g-prompt").value,
    negative_prompt: model.uses_cfg ? $("#g-negative").value : "",
    width: number("#g-width"),
    height: number("#g-height"),
    num_inference_steps: model.fixed.includes("num_steps") ? null : number("#g-steps"),
    guidance_scale: model.fixed.includes("guidance") ? null : number("#g-guidance"),
    seed,
    reference_images: referenceValues(),
    loras: loraValues(),
    enhance_prompt: $("#g-enhance").checked,
  };
}

function batchSeeds() {
  const count = Number($("#g-batch").value);
  if (!Number.isInteger(count) || count < 1 || count > 16) {
    throw Object.assign(new Error("batch count must be a whole number from 1 to 16"), { field: "batch" });
  }
  const given = $("#g-seed").value;
  if (count === 1 && given === "") return [null]; // the service draws and records one
  const first = given === "" ? randomSeed() : Number(given);
  return Array.from({ length: count }, (_, i) => first + i);
}

export async function submit(overrides = {}) {
  clearErrors(form());
  try {
    if (!(overrides.body?.prompt ?? $("#g-prompt").value).trim()) {
      throw Object.assign(new Error("prompt: describe the image to make"), { field: "prompt" });
    }
    const seeds = overrides.seeds || batchSeeds();
    const jobs = [];
    for (const seed of seeds) {
      const sent = { ...body(seed), ...overrides.body };
      const queued = await api("/generate/image", { method: "POST", json: sent });
      jobs.push(queued.job_id);
      emit("queued", { job_id: queued.job_id, prompt: sent.prompt });
    }
    return jobs;
  } catch (err) {
    showError(form(), err, $("#g-error"));
    return [];
  }
}

// "Reuse settings" of a gallery image: its prompt, seed, size, steps, guidance, references and LoRAs.
export function applySettings(meta) {
  const record = meta.record || {};
  if (record.model && state.config.models.some((model) => model.name === record.model)) {
    $("#g-model").value = record.model;
    showModelControls();
  }
  $("#g-prompt").value = record.prompt ?? meta.prompt ?? "";
  $("#g-negative").value = record.negative_prompt ?? meta.negative_prompt ?? "";
  $("#g-seed").value = meta.seed;
  $("#g-width").value = meta.width;
  $("#g-height").value = meta.height;
  $("#g-width").dispatchEvent(new Event("change"));
  $("#g-steps").value = meta.steps ?? meta.num_inference_steps;
  $("#g-guidance").value = meta.guidance ?? meta.guidance_scale;
  $("#g-guidance-value").textContent = $("#g-guidance").value;
  $("#g-batch").value = 1;
  setReferences(meta.reference_images);
  setLoras((record.loras || []).filter((lora) => !lora.fused));
  $("#g-prompt").focus();
}
