// The queue: the running job with live progress (SSE from /events), the queued jobs in the order they will run,
// which the user can change (POST /queue/order) or cancel, and the last few that ended.

import { api } from "./api.js";
import { $, el } from "./dom.js";
import { emit, on } from "./state.js";
import { withToken } from "./token.js";

const RECENT = 5; // ended jobs kept in view, newest first
let running = null;
let queued = [];
const recent = [];
const prompts = new Map(); // job id -> prompt (events carry no prompt)

export function setupQueue() {
  const events = new EventSource(withToken("/events")); // started once the token, if any, is known
  events.addEventListener("open", refresh); // after a reconnect too: events missed meanwhile are not replayed
  for (const name of ["progress", "complete", "error", "cancelled"]) {
    events.addEventListener(name, (e) => onEvent(name, JSON.parse(e.data)));
  }
  $("#q-clear").addEventListener("click", async () => {
    await api("/queue/clear", { method: "POST" });
    refresh();
  });
  on("queued", ({ job_id, prompt }) => {
    prompts.set(job_id, prompt);
    refresh();
  });
}

async function refresh() {
  const now = await api("/queue");
  running = now.running;
  queued = now.queued;
  for (const job of [running, ...queued]) if (job && job.prompt) prompts.set(job.job_id, job.prompt);
  render();
}

function onEvent(name, job) {
  if (name === "progress" && running && running.job_id === job.job_id) {
    running = { ...running, ...job };
    return showProgress(running);
  }
  if (name !== "progress") {
    recent.unshift({ ...job, prompt: prompts.get(job.job_id) || job.job_id });
    recent.length = Math.min(recent.length, RECENT);
    emit("ended", { name, job });
  }
  refresh();
}

// In place: a button the user is about to press must not be replaced under the pointer at every step.
function showProgress(job) {
  const item = $(`#q-list li[data-job="${job.job_id}"]`);
  if (!item) return render();
  item.dataset.status = job.status;
  item.querySelector("progress").value = job.progress;
  item.querySelector(".status").textContent = `${job.status_message}${timeLeft(job)}`;
}

function timeLeft(job) {
  return job.eta_seconds === null || job.eta_seconds === undefined ? "" : ` · about ${Math.ceil(job.eta_seconds)} s left`;
}

function runningItem(job) {
  return el("li", { "data-job": job.job_id, "data-status": job.status },
    el("div", { class: "line" }, el("span", { class: "prompt", text: job.prompt || job.job_id, title: job.job_id }),
      el("button", { type: "button", text: "Cancel", "aria-label": `Cancel the running job ${job.job_id}`,
        onclick: () => cancel(job.job_id) })),
    el("progress", { max: 100, value: job.progress, "aria-label": `Progress of ${job.job_id}` }),
    el("span", { class: "help status", text: `${job.status_message}${timeLeft(job)}` }));
}

function queuedItem(job, i) {
  const last = i === queued.length - 1;
  return el("li", { "data-job": job.job_id, "data-status": job.status },
    el("div", { class: "line" }, el("span", { class: "prompt", text: `${i + 1}. ${job.prompt || job.job_id}` }),
      el("span", { class: "group" },
        el("button", { type: "button", text: "↑", disabled: i === 0, "aria-label": `Run ${job.job_id} earlier`,
          onclick: () => move(i, -1) }),
        el("button", { type: "button", text: "↓", disabled: last, "aria-label": `Run ${job.job_id} later`,
          onclick: () => move(i, 1) }),
        el("button", { type: "button", text: "Cancel", "aria-label": `Cancel ${job.job_id}`, onclick: () => cancel(job.job_id) }))),
    el("span", { class: "help status", text: "queued" }));
}

function endedItem(job) {
  const text = job.status === "failed" ? `failed: ${job.error_message}` : job.status;
  return el("li", { "data-job": job.job_id, "data-status": job.status, class: "ended" },
    el("div", { class: "line" }, el("span", { class: "prompt", text: job.prompt || job.job_id }),
      el("span", { class: "help status", text })));
}

function render() {
  const items = [...(running ? [runningItem(running)] : []), ...queued.map(queuedItem), ...recent.map(endedItem)];
  $("#q-list").replaceChildren(...items);
  $("#q-empty").hidden = items.length > 0;
  $("#q-clear").disabled = queued.length === 0;
}

async function move(i, step) {
  const ids = queued.map((job) => job.job_id);
  [ids[i], ids[i + step]] = [ids[i + step], ids[i]];
  const now = await api("/queue/order", { method: "POST", json: { job_ids: ids } });
  running = now.running;
  queued = now.queued;
  render();
  const button = $(`[data-job="${ids[i + step]}"] button[aria-label^="Run"]${step < 0 ? "" : ":last-of-type"}`);
  if (button && !button.disabled) button.focus(); // keyboard users keep their place
}

async function cancel(jobId) {
  await api(`/jobs/${jobId}/cancel`, { method: "POST" });
  refresh();
}
