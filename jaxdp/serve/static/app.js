// The service's page: sign in; datasets (perturbed here, then uploaded); jobs (submitted,
// followed through server-sent events, downloaded and verified). The lists come from the API, so
// they survive a reload, and a job that is still running is followed again after one.
"use strict";

const $ = id => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "cancelled"];
const state = {
  key: sessionStorage.getItem("jaxdp-key") || "", records: [], perturbed: [],
  following: null, datasets: [], jobs: [],
};

// ---- Talking to the server, and errors in words ---------------------------------------------

class ApiError extends Error {}

function explain(status, detail) {
  if (status === 401) return "This API key was not accepted: it is wrong, or it was revoked or replaced. Ask your administrator for a valid key.";
  if (status === 404) return "That no longer exists: it was deleted, or it belongs to someone else.";
  if (status === 413) return `Too large. ${detail}`;
  if (status === 429) return `A limit of your account is reached. ${detail}`;
  if (status >= 500) return "The server failed to answer. Try again in a minute; if it keeps failing, tell your administrator.";
  if (status === 422 && /^(body|query|header)\./.test(detail)) return `Please check the form: ${detail.replace(/\b(body|query|header)\./g, "")}`;
  return detail || `The server refused the request (${status}).`;
}

async function api(path, options = {}) {
  const headers = {...(options.headers || {}), Authorization: `Bearer ${state.key}`};
  let r;
  try {
    r = await fetch(path, {...options, headers});
  } catch (e) {
    throw new ApiError("The server cannot be reached. Check your connection, then try again.");
  }
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new ApiError(explain(r.status, typeof body.detail === "string" ? body.detail : ""));
  }
  return r;
}

function show(id, text, kind = "note") { $(id).textContent = text; $(id).className = kind; }
function cell(tr, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  tr.appendChild(td);
  return td;
}
function button(text, onclick, id) {
  const b = document.createElement("button");
  b.textContent = text; b.onclick = onclick; if (id) b.id = id;
  return b;
}
function when(seconds) { return new Date(seconds * 1000).toLocaleString(); }
function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), b => b.toString(16).padStart(2, "0")).join("");
}

// ---- Sign in ----------------------------------------------------------------------------------

async function signIn(quiet = false) {
  try {
    const me = await (await api("/api/me")).json();
    sessionStorage.setItem("jaxdp-key", state.key);
    show("who", `Signed in as ${me.tenant}: ε cap ${me.epsilon_cap} per record, at δ = ${me.delta}.`, "ok");
    $("sign-out").className = "";
    const models = await (await api("/api/models")).json();  // the admin's registered models
    $("base").replaceChildren(...models.map(name => new Option(name, name)));
    if (!models.length) show("job-status", "No base model is registered yet: ask your administrator to add one.", "error");
    await refreshDatasets();
    await refreshJobs();
    const followed = sessionStorage.getItem("jaxdp-job");
    const running = state.jobs.filter(j => !TERMINAL.includes(j.state)).map(j => j.id);
    const again = state.jobs.some(j => j.id === followed) ? followed : running[running.length - 1];
    if (again) followJob(again);
  } catch (e) {
    if (!quiet) show("who", e.message, "error");
    else show("who", "Your saved key was not accepted: sign in again.", "error");
  }
}

$("key").value = state.key;
$("use-key").onclick = () => { state.key = $("key").value.trim(); signIn(); };
$("sign-out").onclick = () => { sessionStorage.clear(); location.reload(); };

// ---- Datasets ---------------------------------------------------------------------------------

async function refreshDatasets(select) {
  state.datasets = await (await api("/api/datasets")).json();
  const rows = $("dataset-rows");
  rows.replaceChildren();
  const choice = select || $("dataset").value;
  $("dataset").replaceChildren(...state.datasets.map(d => new Option(`${d.name} (${d.records} records)`, d.id)));
  for (const d of state.datasets) {
    const tr = document.createElement("tr");
    const pick = button("Train on this", () => { $("dataset").value = d.id; $("dataset").focus(); });
    cell(tr, pick); cell(tr, d.name); cell(tr, String(d.records));
    cell(tr, d.local_epsilon_declared_by_uploader == null ? "none declared" : `${d.local_epsilon_declared_by_uploader} per word`);
    cell(tr, when(d.created_at));
    cell(tr, button("Delete", () => deleteDataset(d)));
    rows.appendChild(tr);
  }
  if (state.datasets.some(d => d.id === choice)) $("dataset").value = choice;
  $("no-datasets").className = state.datasets.length ? "hidden" : "note";
  $("train").disabled = !state.datasets.length;
}

async function deleteDataset(d) {
  if (!confirm(`Delete "${d.name}" and every copy of its text on the server? Trained models and the privacy ledger stay.`)) return;
  try {
    await api(`/api/datasets/${d.id}`, {method: "DELETE"});
    show("dataset-status", `Deleted "${d.name}".`, "ok");
    await refreshDatasets();
  } catch (e) { show("dataset-status", e.message, "error"); }
}

function parseRecords(text, format) {  // as the server does: non-blank lines, or JSONL "text"
  const lines = text.split(/\r?\n/).filter(l => l.trim());
  if (format === "text") return lines;
  return lines.map((l, n) => {
    let r;
    try { r = JSON.parse(l); } catch (e) { throw new Error(`Line ${n + 1} of the file is not JSON: choose the "text" format for plain text.`); }
    if (typeof r.text !== "string" || !r.text.trim()) throw new Error(`Line ${n + 1} of the file has no "text" field.`);
    return r.text;
  });
}

let embeddings = null;
for (const preset of document.querySelectorAll("[data-eps]")) {
  preset.onclick = () => { $("eps-word").value = preset.dataset.eps; $("perturb").click(); };
}

$("perturb").onclick = async () => {
  const file = $("file").files[0];
  if (!file) { show("perturb-status", "Choose a file first.", "error"); return; }
  const epsilon = parseFloat($("eps-word").value);
  if (!(epsilon > 0 && epsilon <= 1000)) { show("perturb-status", "ε per word must be a number above 0 (and at most 1000).", "error"); return; }
  try {
    show("perturb-status", "Loading the vocabulary...", "busy");
    try { embeddings = embeddings || await JaxdpPerturb.loadEmbeddings(); }
    catch (e) { throw new Error("The server has no vocabulary for perturbing text yet: ask your administrator to build it."); }
    // A text repeated in the file is one record: dropped here, BEFORE perturbing (perturbed
    // apart, its copies would arrive as different records, each trained on and charged).
    // Each record in the server's canonical form (NFC, trimmed): two lines that differ only in
    // Unicode form or surrounding spaces are one record, dropped here before perturbing.
    const all = parseRecords(await file.text(), $("format").value)
      .map(r => r.replace(/\r\n/g, "\n").normalize("NFC").trim()).filter(r => r);
    if (!all.length) throw new Error("The file has no text in it.");
    state.records = [...new Set(all)];
    state.repeats = all.length - state.records.length;
    let words = 0;
    state.perturbed = state.records.map(r => { const p = JaxdpPerturb.perturbText(r, epsilon, embeddings); words = Math.max(words, p.words); return p.text; });
    state.localEpsilon = epsilon;
    renderPreview(true);
    const fraction = JaxdpPerturb.changedFraction(state.records, state.perturbed);
    show("plain", `At this setting ${Math.round(100 * fraction)}% of the words in your file were replaced by other words before anything leaves this computer; the rest were kept. Words that are not in the public vocabulary (most names, rare words, words in other scripts) are always replaced. Whoever reads the uploaded text cannot tell for sure which words you wrote; the lower the ε, the more words change and the stronger that doubt. The punctuation, the spacing and how many words each line has are kept as they are.`, "ok");
    show("changed", `${(100 * fraction).toFixed(1)}% of words changed`);
    show("guarantee", `${state.records.length} records perturbed${state.repeats ? ` (${state.repeats} repeated lines dropped: a text is one record)` : ""}. Formal local guarantee: ${JaxdpPerturb.guarantee(epsilon, words)} (longest record: ${words} words).`);
    $("preview").className = "";
    $("upload").disabled = false;
    show("upload-status", "");
    show("perturb-status", "Done: compare, then upload.", "ok");
  } catch (e) { show("perturb-status", e.message, "error"); }
};

function renderPreview(withOriginals) {
  const rows = $("preview-rows");
  rows.replaceChildren();
  $("original-head").className = withOriginals ? "" : "hidden";
  state.perturbed.slice(0, 20).forEach((p, i) => {
    const tr = document.createElement("tr");
    const original = cell(tr, withOriginals ? state.records[i] : "");
    if (!withOriginals) original.className = "hidden";
    cell(tr, p);
    rows.appendChild(tr);
  });
}

$("upload").onclick = async () => {
  const body = state.perturbed.map(t => JSON.stringify({text: t})).join("\n") + "\n";
  const form = new FormData();
  form.append("file", new Blob([body], {type: "application/jsonl"}), "perturbed.jsonl");
  form.append("format", "jsonl");
  form.append("local_epsilon", String(state.localEpsilon));
  form.append("name", $("dataset-name").value.trim() || `dataset of ${new Date().toLocaleString()}`);
  $("upload").disabled = true;
  show("upload-status", "Uploading...", "busy");
  try {
    const d = await (await api("/api/datasets", {method: "POST", body: form})).json();
    // From here on the page holds only what was uploaded: the originals are dropped.
    state.records = [];
    $("file").value = "";
    renderPreview(false);
    show("plain", "Uploaded. Only the perturbed text (right) left this computer; your originals are no longer shown.", "ok");
    show("upload-status", `Uploaded: ${d.records} records as "${d.name}".`, "ok");
    await refreshDatasets(d.id);
  } catch (e) { show("upload-status", e.message, "error"); $("upload").disabled = false; }
};

// ---- Jobs -------------------------------------------------------------------------------------

async function refreshJobs() {
  state.jobs = await (await api("/api/jobs")).json();
  const names = Object.fromEntries(state.datasets.map(d => [d.id, d.name]));
  const rows = $("job-rows");
  rows.replaceChildren();
  for (const job of [...state.jobs].reverse()) {
    const tr = document.createElement("tr");
    cell(tr, job.id); cell(tr, names[job.dataset_id] || "(deleted)"); cell(tr, job.state);
    const eps = job.result && job.result.epsilon != null ? job.result.epsilon : job.plan.epsilon;
    cell(tr, eps == null ? "-" : `${eps.toFixed(3)}${job.result ? "" : " planned"}`);
    const actions = document.createElement("span");
    actions.appendChild(button("Show", () => followJob(job.id), `show-${job.id}`));
    if (!TERMINAL.includes(job.state)) actions.appendChild(button("Cancel", () => cancelJob(job.id)));
    cell(tr, actions);
    rows.appendChild(tr);
  }
  $("no-jobs").className = state.jobs.length ? "hidden" : "note";
}

async function cancelJob(jobId) {
  try { await api(`/api/jobs/${jobId}/cancel`, {method: "POST"}); await refreshJobs(); }
  catch (e) { show("job-status", e.message, "error"); }
}

$("train").onclick = async () => {
  const spec = {
    dataset_id: $("dataset").value, base_model: $("base").value, target_epsilon: parseFloat($("target-eps").value),
    epochs: parseFloat($("epochs").value), expected_batch_size: parseFloat($("batch").value),
    lora_rank: parseInt($("lora-rank").value), learning_rate: parseFloat($("lr").value), block_size: parseInt($("block").value),
  };
  if (!spec.dataset_id) { show("job-status", "Upload or choose a dataset first.", "error"); return; }
  const train = $("train");
  train.disabled = true;
  train.textContent = "Planning…";
  show("job-status", "Planning: calibrating the noise to your target and checking your budget (a few seconds).", "busy");
  try {
    const headers = {"Content-Type": "application/json", "Idempotency-Key": newKey()};  // one job per click
    const job = await (await api("/api/jobs", {method: "POST", headers, body: JSON.stringify(spec)})).json();
    show("job-status", `Job ${job.id} queued: planned ε = ${job.plan.epsilon.toFixed(3)} per record (noise multiplier ${job.plan.noise_multiplier.toFixed(3)}, ${job.plan.steps} steps).`, "ok");
    await refreshJobs();
    followJob(job.id);
  } catch (e) { show("job-status", e.message, "error"); }
  finally { train.disabled = false; train.textContent = "Train"; }
};

async function followJob(jobId) {
  state.following = jobId;
  sessionStorage.setItem("jaxdp-job", jobId);
  $("job-detail").className = "";
  $("job-title").textContent = `Job ${jobId}`;
  $("progress").value = 0;
  show("progress-text", "");
  show("result", "");
  $("job-error").className = "hidden";
  $("artifacts").replaceChildren();
  $("download-all").className = "hidden";
  const job = await (await api(`/api/jobs/${jobId}`)).json();
  if (job.progress && job.progress.step) onEvent(jobId, "step", job.progress);
  if (TERMINAL.includes(job.state)) { showResult(jobId); return; }
  show("progress-text", job.state === "queued" ? "Queued: waiting for a worker." : "Running...");
  let lastId = 0;
  for (let attempt = 0; attempt < 20 && state.following === jobId; attempt++) {
    try {  // server-sent events through fetch (it sends the key); resumed with Last-Event-ID
      lastId = await readEvents(jobId, lastId);
      return;
    } catch (e) {
      if (state.following !== jobId) return;
      show("progress-text", "Connection lost; reconnecting...", "busy");
      await new Promise(resolve => setTimeout(resolve, 2000));
    }
  }
}

async function readEvents(jobId, lastId) {
  const headers = lastId ? {"Last-Event-ID": String(lastId)} : {};
  const r = await api(`/api/jobs/${jobId}/events`, {headers});
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    if (state.following !== jobId) { reader.cancel(); return lastId; }
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const fields = {};
      block.split(/\r?\n/).forEach(line => { const i = line.indexOf(":"); if (i > 0) fields[line.slice(0, i)] = line.slice(i + 1).trim(); });
      if (fields.id) lastId = parseInt(fields.id);
      if (fields.event && fields.data) onEvent(jobId, fields.event, JSON.parse(fields.data));
      if (fields.event === "end") return lastId;
    }
  }
  throw new Error("the stream ended early");
}

function onEvent(jobId, kind, data) {
  if (jobId !== state.following) return;
  if (kind === "step") {
    $("progress").max = data.num_steps; $("progress").value = data.step;
    const eps = data.epsilon == null ? "-" : data.epsilon.toFixed(3);
    const loss = data.private && data.private.train_loss != null ? `, train loss ${data.private.train_loss.toFixed(3)} (not noised: yours only)` : "";
    show("progress-text", `step ${data.step} of ${data.num_steps}, ε spent ${eps}${loss}`);
  } else if (kind === "eval") {
    show("progress-text", `${$("progress-text").textContent}, eval loss ${data.eval_loss.toFixed(3)}`);
  } else if (kind === "end") {
    showResult(jobId);
  }
}

async function showResult(jobId) {
  const job = await (await api(`/api/jobs/${jobId}`)).json();
  if (jobId !== state.following) return;
  await refreshJobs();
  show("job-status", `Job ${jobId}: ${job.state}.`, job.state === "succeeded" ? "ok" : "error");
  if (job.state === "failed") {
    const steps = job.progress && job.progress.step ? job.progress.step : 0;
    $("job-error").className = "";
    show("job-error-text", `Training failed on the server. Your privacy budget was charged only for the ${steps} step(s) that ran. Give the administrator the job id ${jobId}.`, "error");
    $("job-error-detail").textContent = job.error || "";
  } else if (job.state === "cancelled") {
    show("result", "Cancelled: the steps that ran were charged to your privacy budget.");
  }
  if (job.result && job.state === "succeeded") {
    const local = job.local_epsilon == null ? "none declared (uploaded unperturbed, as far as the server knows)" : `ε = ${job.local_epsilon} per word, as declared by the uploader (metric DP, in the browser; the server cannot check it)`;
    show("result", `Central guarantee of the model: (ε, δ) = (${job.result.epsilon.toFixed(3)}, ${job.result.delta.toExponential(2)}) per record, DP-SGD. Local guarantee of the uploaded text: ${local}. The two are separate guarantees, not a sum.`);
  }
  const list = $("artifacts");
  list.replaceChildren();
  for (const [name, info] of Object.entries(job.artifacts)) {
    const li = document.createElement("li");
    li.appendChild(button(`Download ${name}`, () => download(jobId, name, info.sha256, li), `download-${name}`));
    li.appendChild(document.createTextNode(` sha256 ${info.sha256.slice(0, 16)}...`));
    list.appendChild(li);
  }
  const all = $("download-all");
  all.className = Object.keys(job.artifacts).length ? "" : "hidden";
  all.onclick = async () => {
    all.disabled = true;
    try {
      for (const [name, info] of Object.entries(job.artifacts)) {
        await download(jobId, name, info.sha256, list.children[Object.keys(job.artifacts).indexOf(name)]);
      }
    } finally { all.disabled = false; }
  };
}

async function download(jobId, name, sha256, li) {
  try {
    const blob = await (await api(`/api/jobs/${jobId}/artifacts/${name}`)).blob();
    const digest = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer())))
      .map(b => b.toString(16).padStart(2, "0")).join("");
    const mark = document.createElement("span");
    mark.className = digest === sha256 ? "ok verified" : "error";
    mark.textContent = digest === sha256 ? " verified" : " the file arrived damaged (checksum mismatch): download it again";
    li.appendChild(mark);
    if (digest !== sha256) return;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name; document.body.appendChild(a); a.click(); a.remove();
  } catch (e) { show("job-status", e.message, "error"); }
}

if (state.key) signIn(true);
