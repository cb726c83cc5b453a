// longcat serve: the page polls the JSON API (no build step, no framework).
"use strict";

const $ = (id) => document.getElementById(id);
let defaults = null;
let runLoras = [];
const shownJobs = new Map(); // id -> element
const pairs = new Map(); // job id -> pair element holding it

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function fileUrl(relative, download = false) {
  return "/files/" + relative.split("/").map(encodeURIComponent).join("/") + (download ? "?download=1" : "");
}

function fillLoras(select, keep) {
  const current = keep ? select.value : "";
  select.replaceChildren(new Option("none", ""), ...runLoras.map((l) => new Option(l.label, l.path)));
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

function applyDefaults(d) {
  $("prompt").value = d.prompt;
  $("resolution").value = d.resolution;
  $("frames").value = d.frames;
  $("steps").value = d.steps;
  $("guidance").value = d.guidance;
  $("seed").value = d.seed;
}

function describe(request) {
  const lora = request.lora ? `${request.lora} × ${request.lora_strength}` : "no LoRA";
  const mode = request.image ? "i2v" : "t2v";
  return `${mode} · ${request.resolution} · ${request.frames} frames · ${request.steps} steps · ` +
    `guidance ${request.guidance} · seed ${request.seed}${request.distilled ? " · distilled" : ""} · ${lora}`;
}

function renderJob(job) {
  let card = shownJobs.get(job.id);
  if (!card) {
    card = document.createElement("div");
    card.className = "job";
    card.dataset.id = job.id;
    card.innerHTML = '<div class="title"></div><div class="what"></div><progress max="1" value="0"></progress>' +
      '<div class="state"></div><div class="result"></div>';
    card.querySelector(".title").textContent = `#${job.id}: ${job.request.prompt}`;
    card.querySelector(".what").textContent = describe(job.request);
    shownJobs.set(job.id, card);
    $("jobs").prepend(card);
  }
  // a status poll can show a compared job before its pair exists (between the two requests): move it in
  const pair = pairs.get(job.id);
  if (pair && card.parentElement !== pair) pair.append(card);
  card.dataset.state = job.state;
  const progress = card.querySelector("progress");
  progress.max = job.steps || 1;
  progress.value = job.state === "done" ? progress.max : job.step;
  let text = job.state;
  if (job.state === "running") {
    text = `${job.phase}: step ${job.step}/${job.steps}` + (job.eta_s != null ? `, ETA ${job.eta_s.toFixed(1)} s` : "");
  } else if (job.state === "done") {
    text = `done in ${(job.finished - job.started).toFixed(1)} s` +
      (job.first_frame_psnr != null ? ` · first-frame PSNR ${job.first_frame_psnr.toFixed(2)} dB` : "");
  } else if (job.state === "failed") {
    text = `failed: ${job.error}`;
  }
  card.querySelector(".state").textContent = text;
  const result = card.querySelector(".result");
  if (job.state === "done" && !result.firstChild) {
    const video = document.createElement("video");
    video.src = fileUrl(job.video);
    video.controls = video.loop = video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    const link = document.createElement("a");
    link.href = fileUrl(job.video, true);
    link.textContent = "download mp4";
    link.className = "download";
    result.append(video, link);
  }
}

async function pollStatus() {
  try {
    const status = await api("/api/status");
    $("device").textContent = `${status.device} · model ${status.model_loaded ? "loaded" : "not loaded"}`;
    $("run-dir").textContent = status.output_dir;
    if (!defaults) {
      defaults = status.defaults;
      applyDefaults(defaults);
    }
    status.jobs.forEach(renderJob);
  } catch (error) {
    $("device").textContent = `server: ${error.message}`;
  }
}

async function pollRun() {
  try {
    const run = await api("/api/run");
    runLoras = run.loras;
    fillLoras($("lora"), true);
    fillLoras($("lora-b"), true);
    const last = run.last_step;
    $("last-step").textContent = last ? `step ${last.step}: loss ${last.loss?.toFixed(4)}, EMA ${last.loss_ema?.toFixed(4)}` : "no training steps logged yet";
    if (run.loss_png) {
      $("loss").src = fileUrl(run.loss_png) + "?v=" + run.loss_png_mtime;
      $("loss").hidden = false;
    }
    const holder = $("validation");
    const known = holder.dataset.steps || "";
    const steps = run.validation.map((v) => v.step + ":" + v.videos.length).join(",");
    if (steps !== known) {
      holder.dataset.steps = steps;
      holder.replaceChildren(...run.validation.slice().reverse().map((entry) => {
        const block = document.createElement("div");
        block.className = "step-renders";
        block.innerHTML = `<h4>step ${entry.step}</h4>`;
        entry.videos.forEach((path) => {
          const video = document.createElement("video");
          video.src = fileUrl(path);
          video.controls = video.loop = video.muted = true;
          video.title = path;
          block.append(video);
        });
        return block;
      }));
    }
  } catch (error) {
    $("last-step").textContent = `cannot read the run: ${error.message}`;
  }
}

async function upload(path, file) {
  return (await api(path, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } })).path;
}

function requestFromForm(imagePath) {
  return {
    prompt: $("prompt").value,
    image: imagePath,
    lora: $("lora").value || null,
    lora_strength: Number($("lora-strength").value),
    resolution: $("resolution").value,
    frames: Number($("frames").value),
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    seed: Number($("seed").value),
    distilled: $("distilled").checked,
  };
}

async function submit(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  $("render").disabled = true;
  try {
    const i2v = document.querySelector("input[name=mode]:checked").value === "i2v";
    const file = $("image").files[0];
    if (i2v && !file) throw new Error("image-to-video needs a start frame: choose an image, or pick text-to-video");
    const imagePath = i2v ? await upload("/api/uploads/image", file) : null;
    const first = requestFromForm(imagePath);
    const requests = [first];
    if ($("compare").checked) {
      requests.push({ ...first, lora: $("lora-b").value || null, lora_strength: Number($("lora-b-strength").value),
                      steps: $("steps-b").value ? Number($("steps-b").value) : first.steps });
    }
    const jobs = [];
    for (const request of requests) {
      jobs.push(await api("/api/renders", { method: "POST", body: JSON.stringify(request),
                                             headers: { "Content-Type": "application/json" } }));
    }
    if (jobs.length === 2) {
      const pair = document.createElement("div");
      pair.className = "pair";
      $("jobs").prepend(pair);
      jobs.forEach((job) => pairs.set(job.id, pair));
    }
    jobs.forEach(renderJob);
  } catch (error) {
    $("form-error").textContent = error.message;
  } finally {
    $("render").disabled = false;
  }
}

$("render-form").addEventListener("submit", submit);
document.querySelectorAll("input[name=mode]").forEach((radio) => radio.addEventListener("change", () => {
  $("image-row").hidden = radio.value === "t2v" && radio.checked;
}));
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  $("image-preview").hidden = !file;
  if (file) $("image-preview").src = URL.createObjectURL(file);
});
$("distilled").addEventListener("change", () => {
  const d = defaults || {};
  $("steps").value = $("distilled").checked ? d.distilled_steps : d.steps;
  $("guidance").value = $("distilled").checked ? d.distilled_guidance : d.guidance;
});
$("lora-file").addEventListener("change", async () => {
  const file = $("lora-file").files[0];
  if (!file) return;
  $("form-error").textContent = "";
  try {
    const path = await upload("/api/uploads/lora", file);
    await pollRun();
    $("lora").value = path;
  } catch (error) {
    $("form-error").textContent = error.message;
  }
});
$("free").addEventListener("click", async () => {
  $("free").disabled = true;
  try { await api("/api/free", { method: "POST" }); } catch (error) { $("form-error").textContent = error.message; }
  $("free").disabled = false;
  pollStatus();
});

pollStatus();
pollRun();
setInterval(pollStatus, 700);
setInterval(pollRun, 5000);
