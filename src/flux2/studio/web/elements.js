// Projects (the header's picker) and the project's elements: characters, locations and objects with a trigger
// word and a picture, usable as references.

import { api, upload } from "./api.js";
import { $, clearErrors, el, showError } from "./dom.js";
import { addReference } from "./refs.js";
import { emit, on, state } from "./state.js";
import { withToken } from "./token.js";

const PAGE_PROJECT = "flux2 web page"; // the project made on first use
const REMEMBERED = "flux2.project";

export async function setupProjects() {
  let projects = await api("/projects");
  if (!projects.length) projects = [await api("/projects", { method: "POST", json: { name: PAGE_PROJECT } })];
  const remembered = localStorage.getItem(REMEMBERED);
  renderProjects(projects, projects.some((p) => p.id === remembered) ? remembered : projects[0].id);
  $("#project").addEventListener("change", (e) => choose(e.target.value));
  $("#new-project").addEventListener("click", async () => {
    const name = prompt("Name of the new project");
    if (!name) return;
    const made = await api("/projects", { method: "POST", json: { name } });
    renderProjects(await api("/projects"), made.id);
  });
  $("#el-form").addEventListener("submit", (e) => { e.preventDefault(); addElement(); });
  on("ended", ({ name, job }) => { if (name === "complete" && job.type === "visualize") loadElements(); });
}

function renderProjects(projects, chosen) {
  $("#project").replaceChildren(...projects.map((p) => el("option", { value: p.id, text: p.name })));
  $("#project").value = chosen;
  choose(chosen);
}

function choose(projectId) {
  state.projectId = projectId;
  localStorage.setItem(REMEMBERED, projectId);
  emit("project", projectId);
  loadElements();
}

export async function loadElements() {
  state.elements = await api(`/projects/${state.projectId}/elements`);
  $("#el-list").replaceChildren(...state.elements.map(card));
  emit("elements", state.elements);
}

function card(element) {
  return el("li", { "data-element": element.id },
    element.image_path ? el("img", { src: withToken(element.image_path), alt: "" }) : null,
    el("div", { class: "grow" }, el("strong", { text: element.name }), " ",
      el("span", { class: "help", text: `${element.type} · ${element.trigger_word}` }),
      el("p", { class: "help", text: element.description || "" })),
    el("div", { class: "group" },
      element.image_path ? el("button", { type: "button", text: "Use", "aria-label": `Use ${element.name} as a reference`,
        onclick: () => addReference(element.id, element.name, element.image_path) }) : null,
      el("button", { type: "button", text: "Visualize", "aria-label": `Make a picture of ${element.name}`,
        onclick: () => api(`/elements/${element.id}/visualize`, { method: "POST", json: {} }).then((q) => emit("queued", { job_id: q.job_id, prompt: `picture of ${element.name}` })) }),
      el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${element.name}`,
        onclick: () => api(`/elements/${element.id}`, { method: "DELETE" }).then(loadElements) })));
}

async function addElement() {
  const form = $("#el-form");
  clearErrors(form);
  try {
    const file = $("#el-file").files[0];
    const picture = file ? (await upload(file, state.projectId, "element")).url : null;
    await api(`/projects/${state.projectId}/elements`, { method: "POST", json: {
      name: $("#el-name").value, type: $("#el-type").value, description: $("#el-description").value, image_path: picture } });
    form.reset();
    loadElements();
  } catch (err) {
    showError(form, err, $("#el-error"));
  }
}
