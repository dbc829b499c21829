// The upload page: sends each picked image to POST /predict, shows its top classes as bars, and on
// request the class activation map overlay from the explain verb. Plain browser JavaScript, no
// dependencies, no build step; served by service/protocols/ui.py under a Content-Security-Policy
// that forbids inline scripts, so everything the page does is in this file.
"use strict";

(function () {
  const root = document.body.dataset.root || "";
  const $ = (id) => document.getElementById(id);
  const controls = {
    model: $("model"),
    version: $("version"),
    topK: $("top-k"),
    token: $("token"),
    overlay: $("overlay"),
    files: $("files"),
    drop: $("drop"),
    status: $("status"),
    results: $("results"),
    template: $("result-template"),
  };
  // Versions each model serves, as /readyz lists them; replaced by the V2 metadata when it answers.
  let served = {};
  // Every shown result, so the overlay toggle and a model change can reach them.
  const items = [];
  // Counts the model-details requests: only the newest may change the page.
  let versionsAsked = 0;
  const NOT_READY_RETRY_MS = 2000;

  // The token lives in the input alone: never written to storage, gone when the tab closes.
  function authHeaders() {
    const token = controls.token.value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function say(text, isError) {
    controls.status.textContent = text;
    controls.status.classList.toggle("is-error", Boolean(isError));
  }

  // The service answers every 4xx and 5xx as {"error": "..."}; say that message, not a generic one.
  async function errorText(response) {
    let message = "";
    try {
      const body = await response.json();
      message = typeof body.error === "string" ? body.error : JSON.stringify(body);
    } catch (_) {
      message = response.statusText;
    }
    if (response.status === 401) {
      message += " (paste the inference token above)";
    } else if (response.status === 404 && message === "Not Found") {
      message += " (this server has no such route: an older release?)";
    }
    return "HTTP " + response.status + ": " + message;
  }

  function setOptions(select, values, labelOf) {
    const previous = select.value;
    select.replaceChildren(
      ...values.map((value) => {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = labelOf(value);
        return option;
      })
    );
    if (values.includes(previous)) {
      select.value = previous;
    }
    select.disabled = values.length === 0;
  }

  async function loadModels() {
    let response;
    try {
      response = await fetch(root + "/readyz", { cache: "no-store" });
    } catch (error) {
      say("The server cannot be reached: " + error.message, true);
      return;
    }
    if (!response.ok) {
      say("Not ready yet, " + (await errorText(response)) + "; trying again.", true);
      setTimeout(loadModels, NOT_READY_RETRY_MS);
      return;
    }
    const body = await response.json();
    served = {};
    // Under a memory budget some versions load on the first request: they can be chosen too.
    for (const group of [body.models, body.loadable, body.evicted]) {
      for (const [name, versions] of Object.entries(group || {})) {
        served[name] = [...new Set([...(served[name] || []), ...versions])].sort((a, b) => a - b);
      }
    }
    const names = Object.keys(served).sort();
    setOptions(controls.model, names, (name) => name);
    if (names.length === 0) {
      say("The server serves no model.", true);
      return;
    }
    say("Ready: " + names.length + " model" + (names.length === 1 ? "" : "s") + " served.");
    await loadVersions();
  }

  // The versions of the chosen model from its V2 metadata (an inference route: it needs the token
  // when one is configured), else the ones /readyz listed.
  async function loadVersions() {
    const asked = ++versionsAsked;
    const name = controls.model.value;
    let versions = (served[name] || []).map(String);
    if (name) {
      let response;
      try {
        response = await fetch(root + "/v2/models/" + encodeURIComponent(name), {
          headers: authHeaders(),
          cache: "no-store",
        });
      } catch (error) {
        say("The server cannot be reached: " + error.message, true);
        return;
      }
      if (asked !== versionsAsked) {
        return; // the model or the token changed meanwhile: a newer answer is coming
      }
      if (response.ok) {
        const metadata = await response.json();
        if (Array.isArray(metadata.versions) && metadata.versions.length > 0) {
          versions = metadata.versions.map(String);
        }
        limitTopK(metadata.outputs);
        say("Ready: " + name + " serves version" + (versions.length === 1 ? " " : "s ") + versions.join(", ") + ".");
      } else {
        say("Model details unavailable, " + (await errorText(response)), true);
      }
    }
    const newest = "";
    setOptions(controls.version, [newest, ...versions.slice().reverse()], (v) =>
      v === newest ? "newest" : "version " + v
    );
  }

  // /predict refuses a top_k above the class count: offer no more than the model's scores output has.
  function limitTopK(outputs) {
    const scores = (outputs || []).find((output) => Array.isArray(output.shape) && output.shape.length === 2);
    const classes = scores ? Number(scores.shape[1]) : NaN;
    if (classes > 0) {
      controls.topK.max = String(Math.min(20, classes));
      if (Number(controls.topK.value) > classes) controls.topK.value = String(classes);
    }
  }

  // The chosen version (and model, unless the path names it) as query parameters, besides `extra`.
  function query(extra, modelInPath) {
    const params = new URLSearchParams(extra);
    if (controls.model.value && !modelInPath) params.set("model", controls.model.value);
    if (controls.version.value) params.set("version", controls.version.value);
    return params.toString();
  }

  function upload(file) {
    const form = new FormData();
    form.append("image", file, file.name);
    return form;
  }

  // "load;dur=12.5" from the Server-Timing header: time the request waited for its model to load.
  function loadWait(response) {
    const header = response.headers.get("server-timing") || "";
    const match = /(?:^|,)\s*load\s*;[^,]*\bdur=([0-9.]+)/.exec(header);
    return match ? Number(match[1]) : null;
  }

  function showError(item, element, text) {
    element.textContent = text;
    element.hidden = false;
    item.node.classList.add("has-error");
  }

  async function predict(item) {
    const topK = Math.max(1, Math.min(Number(controls.topK.max) || 20, Number(controls.topK.value) || 5));
    const started = performance.now();
    let response;
    try {
      response = await fetch(root + "/predict?" + query({ top_k: String(topK) }), {
        method: "POST",
        headers: authHeaders(),
        body: upload(item.file),
      });
    } catch (error) {
      showError(item, item.error, "The request failed: " + error.message);
      return;
    }
    if (!response.ok) {
      showError(item, item.error, await errorText(response));
      return;
    }
    const body = await response.json();
    const elapsed = performance.now() - started;
    const wait = loadWait(response);
    item.latency.textContent =
      Math.round(elapsed) +
      " ms round trip, " +
      body.model.name +
      " version " +
      body.model.version +
      (wait === null ? "" : ", of which " + Math.round(wait) + " ms waiting for the model to load");
    const predictions = body.predictions[0] || [];
    item.classes.replaceChildren(...predictions.map(classRow));
  }

  function classRow(prediction) {
    const row = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = prediction.label;
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = prediction.score;
    meter.setAttribute("aria-label", prediction.label);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = (prediction.score * 100).toFixed(1) + " %";
    row.append(label, meter, score);
    return row;
  }

  // The explain verb's PNG (heat map over the photo), fetched once per image and model choice.
  async function fetchOverlay(item) {
    const model = controls.model.value;
    if (!model) {
      throw new Error("no model is served");
    }
    const url =
      root + "/v1/models/" + encodeURIComponent(model) + ":explain?" + query({ format: "png" }, true);
    const response = await fetch(url, { method: "POST", headers: authHeaders(), body: upload(item.file) });
    if (!response.ok) {
      throw new Error(await errorText(response));
    }
    const blob = await response.blob();
    return URL.createObjectURL(blob);
  }

  async function showOverlay(item) {
    if (!controls.overlay.checked) {
      item.overlay.hidden = true;
      item.overlayError.hidden = true;
      item.photo.hidden = false;
      return;
    }
    if (!item.overlayUrl) {
      item.overlayUrl = fetchOverlay(item);
    }
    let url;
    try {
      url = await item.overlayUrl;
    } catch (error) {
      item.overlayUrl = null; // a later toggle asks again: the cause may be fixed (a token pasted)
      showError(item, item.overlayError, "No activation map: " + error.message);
      return;
    }
    item.overlayError.hidden = true;
    if (controls.overlay.checked) {
      item.overlay.src = url;
      item.overlay.hidden = false;
      item.photo.hidden = true;
    }
  }

  function forgetOverlays() {
    for (const item of items) {
      Promise.resolve(item.overlayUrl)
        .then((url) => url && URL.revokeObjectURL(url))
        .catch(() => {});
      item.overlayUrl = null;
    }
  }

  function addFiles(fileList) {
    const files = Array.from(fileList).filter((file) => file.type === "" || file.type.startsWith("image/"));
    if (files.length === 0) {
      say("Nothing to send: choose image files.", true);
      return;
    }
    for (const file of files) {
      const node = controls.template.content.firstElementChild.cloneNode(true);
      const item = {
        file,
        node,
        photo: node.querySelector(".photo"),
        overlay: node.querySelector(".overlay"),
        latency: node.querySelector(".latency"),
        classes: node.querySelector(".classes"),
        error: node.querySelector(".error"),
        overlayError: node.querySelector(".overlay-error"),
        overlayUrl: null,
      };
      item.photo.src = URL.createObjectURL(file);
      item.photo.alt = file.name;
      item.overlay.alt = "Class activation map of " + file.name;
      node.querySelector(".name").textContent = file.name;
      controls.results.prepend(node);
      items.push(item);
      predict(item);
      showOverlay(item);
    }
  }

  controls.files.addEventListener("change", () => {
    addFiles(controls.files.files);
    controls.files.value = ""; // the same file picked again is a new request
  });
  controls.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    controls.drop.classList.add("is-over");
  });
  controls.drop.addEventListener("dragleave", () => controls.drop.classList.remove("is-over"));
  controls.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    controls.drop.classList.remove("is-over");
    addFiles(event.dataTransfer.files);
  });
  controls.overlay.addEventListener("change", () => items.forEach(showOverlay));
  controls.model.addEventListener("change", () => {
    forgetOverlays();
    loadVersions();
  });
  controls.version.addEventListener("change", forgetOverlays);
  controls.token.addEventListener("change", () => {
    forgetOverlays();
    loadVersions();
  });
  document.getElementById("controls").addEventListener("submit", (event) => event.preventDefault());

  loadModels();
})();
