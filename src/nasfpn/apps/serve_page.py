"""The server's web page (``GET /``): pick an image, send it to ``/predict``, see the boxes.

One self-contained HTML document (inline CSS and JavaScript, no external asset, so it works
offline and under the page's ``Content-Security-Policy``). ``/?demo=1`` sends the server's
built-in test picture (``/demo.png``) as soon as the page loads, so that a headless browser
exercises the whole path: upload, detection, drawing. When the work is done the page sets
``data-state`` on ``<body>`` to ``done`` (or ``error``) and lists the detections in
``#detections`` (one ``tr.det`` per box, with ``data-name`` and ``data-score``).
"""

from __future__ import annotations

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Only the inline code and the server itself: a stray external reference fails loudly in the console."""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nasfpn detector</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1b1b1b; background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  #model { color: #555; margin-bottom: 1rem; }
  form { display: flex; flex-wrap: wrap; gap: .8rem; align-items: center; margin-bottom: 1rem; }
  label { display: flex; gap: .4rem; align-items: center; }
  input[type=number] { width: 5rem; }
  #status { margin: .5rem 0; min-height: 1.4em; }
  body[data-state=error] #status { color: #b00020; }
  canvas { max-width: 100%; background: #e8e8e8; border: 1px solid #ccc; display: block; }
  table { border-collapse: collapse; margin-top: 1rem; }
  th, td { padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: left; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em; vertical-align: middle; }
</style>
</head>
<body data-state="idle">
<h1>nasfpn detector</h1>
<div id="model">model: ...</div>
<form id="form" onsubmit="return false">
  <label>image <input id="file" type="file" accept="image/*"></label>
  <label>score threshold <input id="thr" type="number" min="0" max="1" step="0.05" placeholder="default"></label>
  <label>API key <input id="key" type="password" autocomplete="off" placeholder="if the server needs one"></label>
  <button id="demo" type="button">try the test picture</button>
</form>
<div id="status">Pick an image.</div>
<canvas id="canvas" width="640" height="360"></canvas>
<div id="summary"></div>
<table id="detections"><thead><tr><th>#</th><th>class</th><th>score</th><th>box (x1, y1, x2, y2)</th></tr></thead>
<tbody></tbody></table>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const MAX_WIDTH = 960;

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

function colour(label) {
  return "hsl(" + ((label * 137.508) % 360).toFixed(1) + ", 85%, 42%)";
}

function draw(bitmap, body) {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const w = body.image.width, h = body.image.height;
  const scale = Math.min(MAX_WIDTH / w, Math.max(1, 640 / w));  // small pictures drawn larger
  canvas.width = Math.max(1, Math.round(w * scale));
  canvas.height = Math.max(1, Math.round(h * scale));
  if (bitmap) ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  else { ctx.fillStyle = "#e8e8e8"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
  ctx.lineWidth = 2;
  ctx.font = "13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  // Lowest score first so the best boxes end up on top.
  for (const d of [...body.detections].reverse()) {
    const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
    ctx.strokeStyle = ctx.fillStyle = colour(d.label);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = d.name + " " + d.score.toFixed(2);
    const tw = ctx.measureText(text).width + 6;
    const ty = y1 >= 17 ? y1 - 17 : y1;
    ctx.fillRect(x1, ty, tw, 17);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + 3, ty + 2);
  }
}

function list(body) {
  const tbody = $("detections").tBodies[0];
  tbody.replaceChildren();
  body.detections.forEach((d, i) => {
    const tr = document.createElement("tr");
    tr.className = "det";
    tr.dataset.name = d.name;
    tr.dataset.score = String(d.score);
    tr.dataset.label = String(d.label);
    const cells = [String(i + 1), d.name, d.score.toFixed(3), d.box.map((v) => v.toFixed(1)).join(", ")];
    cells.forEach((text, j) => {
      const td = document.createElement("td");
      if (j === 1) {
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.background = colour(d.label);
        td.appendChild(sw);
      }
      td.appendChild(document.createTextNode(text));
      if (j !== 1 && j !== 3) td.className = "num";
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  });
  $("summary").textContent = body.detections.length + " detections at score > " + body.score_thr +
    " (" + body.image.width + "x" + body.image.height + ", " + body.timing.total_ms + " ms)";
  $("summary").dataset.count = String(body.detections.length);
}

async function send(blob, name) {
  setState("working", "Detecting objects in " + name + " ...");
  const form = new FormData();
  form.append("file", blob, name);
  const thr = $("thr").value.trim();
  const url = "predict" + (thr ? "?score_thr=" + encodeURIComponent(thr) : "");
  const key = $("key").value.trim();
  sessionStorage.setItem("nasfpn-api-key", key);
  const headers = key ? { "Authorization": "Bearer " + key } : {};
  let response, body;
  try {
    response = await fetch(url, { method: "POST", body: form, headers });
    body = await response.json();
  } catch (err) {
    setState("error", "Request failed: " + err);
    return;
  }
  if (!response.ok) {
    setState("error", "Error " + response.status + " (" + (body.error || "error") + "): " + (body.detail || ""));
    return;
  }
  let bitmap = null;
  try { bitmap = await createImageBitmap(blob); } catch (err) { bitmap = null; }
  draw(bitmap, body);
  list(body);
  setState("done", name + ": " + body.detections.length + " detections (" + body.model + ").");
}

async function demo() {
  try {
    const r = await fetch("demo.png");
    if (!r.ok) throw new Error("HTTP " + r.status);
    await send(await r.blob(), "demo.png");
  } catch (err) {
    setState("error", "Cannot load the test picture: " + err);
  }
}

$("key").value = sessionStorage.getItem("nasfpn-api-key") || "";
$("file").addEventListener("change", () => { const f = $("file").files[0]; if (f) send(f, f.name); });
$("demo").addEventListener("click", demo);
fetch("health").then((r) => r.json()).then((h) => {
  $("model").textContent = "model: " + h.model + " (" + h.backend + ", " + h.classes + " classes)" +
    (h.auth ? ", API key required" : "");
}).catch(() => {});
if (new URLSearchParams(location.search).has("demo")) demo();
</script>
</body>
</html>
"""
