// The page of `dalle serve`: a form that posts to the OpenAI Images API, live progress while a request is in
// flight, and a gallery of recent images whose settings can be put back into the form.
// Data from the server reaches the page only through textContent, form values and attributes, never innerHTML:
// prompts are user data.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "dalle.apiKey";
const GALLERY_SIZE = 24;
const POLL_MS = 300;
// Shown instead of the server's 401 while no key has been typed: nothing was refused yet, the server asks for one.
const KEY_PROMPT = "This server asks for an API key: enter it above.";

// What a card shows of an image's settings, in this order (size is built from width and height).
const SHOWN = [
  ["prompt", "Prompt"], ["negative_prompt", "Negative"], ["seed", "Seed"], ["steps", "Steps"],
  ["guidance_scale", "Guidance"], ["size", "Size"], ["model", "Model"], ["scheduler", "Scheduler"],
];

// Every call to the server goes through here: it adds the bearer key and turns an error response into an
// Error carrying the server's own message (OpenAI shape: {"error": {"message": ...}}) and the HTTP status.
async function api(url, options = {}) {
  const headers = { ...options.headers };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(url, { ...options, headers });
  } catch (e) {
    throw new Error(`cannot reach the server (${e.message})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw Object.assign(new Error(message), { status: response.status });
  }
  return response;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").classList.remove("notice");
}

// A failed call: the server's message, except a 401 while the key field is empty, which asks for the key
// (neutrally: no key was refused yet). Once a typed key is refused, the server's message says so.
function showFailure(error) {
  if (error.status === 401 && !$("api-key").value.trim()) {
    $("error").textContent = KEY_PROMPT;
    $("error").classList.add("notice");
  } else {
    showError(error.message);
  }
}

// ---- models --------------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  const chosen = select.value;
  try {
    const { data } = await (await api("/v1/models")).json();
    select.replaceChildren(new Option("server default", ""));
    for (const model of data) select.add(new Option(model.id, model.id));
    chooseModel(chosen);
  } catch (e) {
    showFailure(e);
  }
}

// Selects a model by name, adding it when /v1/models does not list it (an image made before a restart),
// so that "use these settings again" sends the model the image was made with.
function chooseModel(name) {
  const select = $("model");
  if (name && ![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
  select.value = name || "";
}

// ---- generating ----------------------------------------------------------------------------------------

// The request body from the form. Empty fields are left out so the server applies the model's defaults;
// a missing width or height copies the other (a square), since the API takes one "WxH" size.
function readForm() {
  const number = (id) => {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  };
  const body = { prompt: $("prompt").value, n: number("n") ?? 1, response_format: "url" };
  const width = number("width");
  const height = number("height");
  if (width !== undefined || height !== undefined) body.size = `${width ?? height}x${height ?? width}`;
  const optional = {
    model: $("model").value || undefined,
    negative_prompt: $("negative-prompt").value.trim() || undefined,
    seed: number("seed"),
    steps: number("steps"),
    guidance_scale: number("guidance"),
  };
  for (const [name, value] of Object.entries(optional)) if (value !== undefined) body[name] = value;
  return body;
}

function describeProgress(p) {
  // The server says `loading` while the pass's model loads (seconds, on its first request); busy at step 0
  // otherwise is the prompt encoding and the init image, milliseconds. A server too old to send the flag is
  // read the old way: busy at step 0 meant loading.
  let text;
  if (!p.busy) text = "waiting for the server…";
  else if (p.loading ?? !p.step) text = p.model ? `loading model ${p.model}…` : "loading model…";
  else if (!p.step) text = `starting (${p.steps} steps)…`;
  else text = `step ${p.step} of ${p.steps}`;
  if (p.queued) text += ` (${p.queued} queued)`;
  return text;
}

function showProgress(p) {
  const bar = $("progress-bar");
  bar.hidden = !p;
  $("progress").textContent = p ? describeProgress(p) : "";
  if (p && p.busy && p.step && p.steps) {
    bar.max = p.steps;
    bar.value = p.step;
  } else {
    bar.removeAttribute("value"); // an indeterminate bar
  }
}

// Polls /dalle/v1/progress until the returned function is called. Each poll waits for the previous one,
// so a slow server never gets a pile of overlapping requests.
function watchProgress() {
  let stopped = false;
  let timer;
  async function poll() {
    try {
      const p = await (await api("/dalle/v1/progress")).json();
      if (!stopped) showProgress(p);
    } catch (_) { /* progress is a nicety: a failed poll must not hide the request's own result */ }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  }
  showProgress({ busy: false, queued: 0 });
  timer = setTimeout(poll, 0);
  return () => {
    stopped = true;
    clearTimeout(timer);
    showProgress(null);
  };
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  if (button.disabled) return; // Ctrl+Enter while a request is in flight
  showError("");
  button.disabled = true;
  // "fresh" marks the images of the last request only.
  for (const card of document.querySelectorAll("#gallery .fresh")) card.classList.remove("fresh");
  const stop = watchProgress();
  try {
    const response = await api("/v1/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(readForm()),
    });
    const { data } = await response.json();
    await loadGallery(data.map((image) => new URL(image.url, location.href).pathname));
  } catch (e) {
    showFailure(e);
  } finally {
    stop();
    button.disabled = false;
  }
}

// ---- gallery -------------------------------------------------------------------------------------------

// freshPaths: the /files/... paths just generated, marked in the gallery.
async function loadGallery(freshPaths = []) {
  try {
    const { images } = await (await api(`/dalle/v1/images?limit=${GALLERY_SIZE}`)).json();
    const cards = images.map((image) => card(image, freshPaths.includes(new URL(image.url, location.href).pathname)));
    $("gallery").replaceChildren(...cards);
    $("gallery-empty").hidden = images.length > 0;
  } catch (e) {
    showFailure(e);
  }
}

function settingValue(settings, name) {
  if (name === "size") return settings.width && settings.height ? `${settings.width}×${settings.height}` : null;
  return settings[name];
}

function card(image, fresh) {
  const settings = image.settings || {};
  const item = document.createElement("li");
  item.className = fresh ? "card fresh" : "card";

  const img = document.createElement("img");
  img.alt = settings.prompt || image.name;
  // Hovering shows the parameters in one line; clicking opens the full list below the image.
  img.title = SHOWN.filter(([name]) => settingValue(settings, name) != null)
    .map(([name, label]) => `${label}: ${settingValue(settings, name)}`)
    .join("\n");
  showImage(img, image.url);

  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = settings.prompt || image.name;
  const list = document.createElement("dl");
  for (const [name, label] of SHOWN.slice(1)) { // the prompt is the summary line
    const value = settingValue(settings, name);
    if (value == null || value === "") continue;
    const term = document.createElement("dt");
    term.textContent = label;
    const definition = document.createElement("dd");
    definition.textContent = String(value);
    list.append(term, definition);
  }
  const link = document.createElement("a");
  link.href = image.url;
  link.target = "_blank";
  link.rel = "noopener";
  link.textContent = image.name || "open image";
  details.append(summary, list, link);
  img.addEventListener("click", () => { details.open = !details.open; });

  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "Use these settings again";
  reuse.addEventListener("click", () => useSettings(settings));

  item.append(img, details, reuse);
  return item;
}

function showImage(img, url) {
  // Small images (the embedded model's 64×64) are drawn with sharp pixels instead of a blur.
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 128));
  // With an API key the server signs each /files URL it hands out, since an <img> cannot send a header.
  img.src = url;
}

function useSettings(settings) {
  $("prompt").value = settings.prompt ?? "";
  $("negative-prompt").value = settings.negative_prompt ?? "";
  chooseModel(settings.model);
  $("width").value = settings.width ?? "";
  $("height").value = settings.height ?? "";
  $("steps").value = settings.steps ?? "";
  $("guidance").value = settings.guidance_scale ?? "";
  $("seed").value = settings.seed ?? "";
  $("prompt").focus();
  $("generate-form").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---- start ---------------------------------------------------------------------------------------------

// localStorage can be unavailable (privacy settings); the key then lasts as long as the page.
function storedKey(value) {
  try {
    if (value === undefined) return localStorage.getItem(KEY_STORE) || "";
    if (value) localStorage.setItem(KEY_STORE, value);
    else localStorage.removeItem(KEY_STORE);
  } catch (_) { /* keep going without storage */ }
  return value;
}

function start() {
  $("api-key").value = storedKey();
  $("api-key").addEventListener("change", () => {
    storedKey($("api-key").value.trim());
    showError("");
    loadModels();
    loadGallery();
  });
  $("random-seed").addEventListener("click", () => { $("seed").value = ""; });
  $("generate-form").addEventListener("submit", generate);
  // Ctrl+Enter (Cmd+Enter on a Mac) generates from anywhere on the page, the prompt box included.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit();
    }
  });
  loadModels();
  loadGallery();
}

start();
