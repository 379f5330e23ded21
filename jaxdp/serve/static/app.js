// The service's page: key, perturbation in the browser, upload, job, progress, download.
"use strict";

const $ = id => document.getElementById(id);
const state = {key: sessionStorage.getItem("jaxdp-key") || "", records: [], perturbed: [], datasetId: null};

function api(path, options = {}) {
  const headers = {...(options.headers || {}), Authorization: `Bearer ${state.key}`};
  return fetch(path, {...options, headers}).then(async r => {
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(`${r.status}: ${body.detail ? JSON.stringify(body.detail) : r.statusText}`);
    }
    return r;
  });
}

function show(id, text, kind = "note") { $(id).textContent = text; $(id).className = kind; }

$("key").value = state.key;
$("use-key").onclick = async () => {
  state.key = $("key").value.trim();
  try {
    const me = await (await api("/api/me")).json();
    sessionStorage.setItem("jaxdp-key", state.key);
    show("who", `tenant ${me.tenant}, epsilon cap ${me.epsilon_cap} at delta ${me.delta}`, "ok");
    const models = await (await api("/api/models")).json();  // the admin's registered models
    $("base").replaceChildren(...models.map(name => new Option(name, name)));
  } catch (e) { show("who", e.message, "error"); }
};

function parseRecords(text, format) {  // as the server does: non-blank lines, or JSONL "text"
  const lines = text.split(/\r?\n/).filter(l => l.trim());
  if (format === "text") return lines;
  return lines.map((l, n) => {
    const r = JSON.parse(l);
    if (typeof r.text !== "string" || !r.text.trim()) throw new Error(`line ${n + 1} has no "text"`);
    return r.text;
  });
}

let embeddings = null;
for (const button of document.querySelectorAll("[data-eps]")) {  // presets
  button.onclick = () => { $("eps-word").value = button.dataset.eps; $("perturb").click(); };
}

$("perturb").onclick = async () => {
  const file = $("file").files[0];
  if (!file) { show("perturb-status", "Choose a file first.", "error"); return; }
  try {
    show("perturb-status", "Loading embeddings...");
    embeddings = embeddings || await JaxdpPerturb.loadEmbeddings();
    const epsilon = parseFloat($("eps-word").value);
    // A text repeated in the file is one record: dropped here, BEFORE perturbing (perturbed
    // apart, its copies would arrive as different records, each trained on and charged).
    const all = parseRecords(await file.text(), $("format").value);
    state.records = [...new Set(all)];
    state.repeats = all.length - state.records.length;
    let words = 0;
    state.perturbed = state.records.map(r => { const p = JaxdpPerturb.perturbText(r, epsilon, embeddings); words = Math.max(words, p.words); return p.text; });
    state.localEpsilon = epsilon;
    const rows = $("preview-rows");
    rows.innerHTML = "";
    state.records.slice(0, 20).forEach((r, i) => {
      const tr = document.createElement("tr");
      for (const text of [r, state.perturbed[i]]) { const td = document.createElement("td"); td.textContent = text; tr.appendChild(td); }
      rows.appendChild(tr);
    });
    const fraction = JaxdpPerturb.changedFraction(state.records, state.perturbed);
    show("plain", `At this setting ${Math.round(100 * fraction)}% of the words in your file were replaced by other words before anything leaves this computer; the rest were kept. Words that are not in the public vocabulary (most names, rare words, words in other scripts) are always replaced. Whoever reads the uploaded text cannot tell for sure which words you wrote; the lower the ε, the more words change and the stronger that doubt. The punctuation, the spacing and how many words each line has are kept as they are.`, "ok");
    show("changed", `${(100 * fraction).toFixed(1)}% of words changed`);
    show("guarantee", `${state.records.length} records perturbed${state.repeats ? ` (${state.repeats} repeated lines dropped: a text is one record)` : ""}. Formal local guarantee: ${JaxdpPerturb.guarantee(epsilon, words)} (longest record: ${words} words).`);
    $("preview").className = "";
    show("perturb-status", "Done: compare, then upload.", "ok");
  } catch (e) { show("perturb-status", e.message, "error"); }
};

$("upload").onclick = async () => {
  const body = state.perturbed.map(t => JSON.stringify({text: t})).join("\n") + "\n";
  const form = new FormData();
  form.append("file", new Blob([body], {type: "application/jsonl"}), "perturbed.jsonl");
  form.append("format", "jsonl");
  form.append("local_epsilon", String(state.localEpsilon));
  try {
    const d = await (await api("/api/datasets", {method: "POST", body: form})).json();
    state.datasetId = d.id;
    show("upload-status", `Uploaded: dataset ${d.id}, ${d.records} records.`, "ok");
    $("train").disabled = false;
  } catch (e) { show("upload-status", e.message, "error"); }
};

async function followEvents(jobId) {  // server-sent events through fetch (it sends the key)
  const r = await api(`/api/jobs/${jobId}/events`);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const fields = {};
      block.split(/\r?\n/).forEach(line => { const i = line.indexOf(":"); if (i > 0) fields[line.slice(0, i)] = line.slice(i + 1).trim(); });
      if (fields.event && fields.data) onEvent(jobId, fields.event, JSON.parse(fields.data));
    }
  }
}

function onEvent(jobId, kind, data) {
  if (kind === "step") {
    $("progress").max = data.num_steps; $("progress").value = data.step;
    const eps = data.epsilon == null ? "-" : data.epsilon.toFixed(3);
    show("progress-text", `step ${data.step} of ${data.num_steps}, ε spent ${eps}, train loss ${data.private.train_loss.toFixed(3)} (not noised: yours only)`);
  } else if (kind === "eval") {
    show("progress-text", `${$("progress-text").textContent}, eval loss ${data.eval_loss.toFixed(3)}`);
  } else if (kind === "end") {
    showResult(jobId);
  }
}

async function showResult(jobId) {
  const job = await (await api(`/api/jobs/${jobId}`)).json();
  show("job-status", `Job ${jobId}: ${job.state}${job.error ? " (" + job.error + ")" : ""}`, job.state === "succeeded" ? "ok" : "error");
  if (job.result) {
    const local = job.local_epsilon == null ? "none declared (uploaded unperturbed, as far as the server knows)" : `ε = ${job.local_epsilon} per word, as declared by the uploader (metric DP, in the browser; the server cannot check it)`;
    show("result", `Central guarantee of the model: (ε, δ) = (${job.result.epsilon.toFixed(3)}, ${job.result.delta.toExponential(2)}) per record, DP-SGD. Local guarantee of the uploaded text: ${local}. The two are separate guarantees, not a sum.`);
  }
  const list = $("artifacts");
  list.innerHTML = "";
  for (const [name, info] of Object.entries(job.artifacts)) {
    const li = document.createElement("li"), button = document.createElement("button");
    button.textContent = `Download ${name}`; button.id = `download-${name}`;
    button.onclick = () => download(jobId, name, info.sha256, li);
    li.appendChild(button); li.appendChild(document.createTextNode(` sha256 ${info.sha256.slice(0, 16)}...`));
    list.appendChild(li);
  }
}

async function download(jobId, name, sha256, li) {
  const blob = await (await api(`/api/jobs/${jobId}/artifacts/${name}`)).blob();
  const digest = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer())))
    .map(b => b.toString(16).padStart(2, "0")).join("");
  const mark = document.createElement("span");
  mark.className = digest === sha256 ? "ok verified" : "error";
  mark.textContent = digest === sha256 ? " verified" : " CHECKSUM MISMATCH";
  li.appendChild(mark);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name; document.body.appendChild(a); a.click(); a.remove();
}

$("train").onclick = async () => {
  const spec = {
    dataset_id: state.datasetId, base_model: $("base").value, target_epsilon: parseFloat($("target-eps").value),
    epochs: parseFloat($("epochs").value), expected_batch_size: parseFloat($("batch").value),
    lora_rank: parseInt($("lora-rank").value), learning_rate: parseFloat($("lr").value), block_size: parseInt($("block").value),
  };
  try {
    const job = await (await api("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(spec)})).json();
    show("job-status", `Job ${job.id} queued: planned ε = ${job.plan.epsilon.toFixed(3)} per record (noise multiplier ${job.plan.noise_multiplier.toFixed(3)}, ${job.plan.steps} steps).`, "ok");
    followEvents(job.id).catch(e => show("job-status", e.message, "error"));
  } catch (e) { show("job-status", e.message, "error"); }
};
