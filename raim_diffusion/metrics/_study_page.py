"""The self-contained HTML page of the blind user study (no network, no external files).

``__DATA__`` is replaced by a JSON object ``{"study_id", "title", "top_k", "samples": [{"id",
"input", "candidates": [{"label", "src"}]}]}`` whose image sources are ``data:`` URIs, written
without a literal ``<``, ``>`` or ``&`` (``study._script_json``) so that no file name can end the
script element. The page never sees method names. Kept as a Python string so it ships inside
the package.
"""

from __future__ import annotations

__all__ = ["PAGE_TEMPLATE"]

PAGE_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data: blob:;
               style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #1e1e1e; color: #eee; }
  header { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; padding: .6em 1em;
           background: #111; position: sticky; top: 0; z-index: 2; }
  header input[type=text] { width: 12em; }
  button { cursor: pointer; }
  #help { font-size: .85em; color: #aaa; }
  main { padding: 1em; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1em; }
  figure { margin: 0; background: #2a2a2a; border: 3px solid transparent; border-radius: 6px;
           padding: .4em; position: relative; }
  figure.cand { cursor: pointer; }
  figure.cand:hover { border-color: #666; }
  figure.picked { border-color: #f5b400; }
  figure img { width: 100%; height: auto; display: block; image-rendering: auto; }
  body.actual .grid { grid-template-columns: 1fr; }
  body.actual figure img { width: auto; max-width: none; }
  body.actual figure { overflow: auto; }
  figcaption { display: flex; justify-content: space-between; padding: .2em .1em; }
  .badge { font-weight: bold; color: #f5b400; }
  #status.incomplete { color: #ff8080; }
  #status.complete { color: #80ff80; }
  textarea { width: 100%; height: 8em; font-family: monospace; background: #111; color: #ddd; }
</style>
</head>
<body>
<header>
  <strong>__TITLE__</strong>
  <label>Judge <input type="text" id="judge" placeholder="your name"></label>
  <button id="prev" title="previous sample (Left arrow)">&larr; Prev</button>
  <span id="position"></span>
  <button id="next" title="next sample (Right arrow / Enter)">Next &rarr;</button>
  <label><input type="checkbox" id="actual"> actual size</label>
  <button id="export">Export picks</button>
  <span id="status"></span>
  <span id="help">Pick your top <span id="topk"></span> in order: click an image or press its
  letter (or number). Again to unpick. Backspace clears this sample.
  Arrows move between samples.</span>
</header>
<main>
  <h3 id="sample-title"></h3>
  <div class="grid" id="grid"></div>
  <h3>Export</h3>
  <textarea id="export-text" readonly
            placeholder="Press 'Export picks': the JSON appears here and is downloaded."></textarea>
</main>
<script type="application/json" id="study-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("study-data").textContent);
const TOPK = DATA.top_k;
const picks = {};  // sample id -> [labels in rank order]
let index = 0;
DATA.samples.forEach(s => { picks[s.id] = []; });
document.getElementById("topk").textContent = TOPK;
const ORD = ["1st", "2nd", "3rd"];
function ordinal(i) { return i < ORD.length ? ORD[i] : (i + 1) + "th"; }

function render() {
  const sample = DATA.samples[index];
  document.getElementById("position").textContent = (index + 1) + " / " + DATA.samples.length;
  document.getElementById("sample-title").textContent = "Sample " + sample.id;
  const grid = document.getElementById("grid");
  grid.textContent = "";
  const inputFig = document.createElement("figure");
  inputFig.className = "input";
  inputFig.innerHTML = "<figcaption><span>Input (low quality)</span></figcaption>";
  const inputImg = document.createElement("img");
  inputImg.src = sample.input;
  inputImg.alt = "input";
  inputFig.appendChild(inputImg);
  grid.appendChild(inputFig);
  const chosen = picks[sample.id];
  sample.candidates.forEach((c, i) => {
    const fig = document.createElement("figure");
    fig.className = "cand" + (chosen.includes(c.label) ? " picked" : "");
    fig.dataset.label = c.label;
    const cap = document.createElement("figcaption");
    const name = document.createElement("span");
    name.textContent = c.label + "  [" + (i + 1) + "]";
    const badge = document.createElement("span");
    badge.className = "badge";
    const r = chosen.indexOf(c.label);
    badge.textContent = r >= 0 ? ordinal(r) : "";
    cap.appendChild(name);
    cap.appendChild(badge);
    const img = document.createElement("img");
    img.src = c.src;
    img.alt = "result " + c.label;
    fig.appendChild(cap);
    fig.appendChild(img);
    fig.addEventListener("click", () => toggle(c.label));
    grid.appendChild(fig);
  });
  updateStatus();
}

function toggle(label) {
  const chosen = picks[DATA.samples[index].id];
  const at = chosen.indexOf(label);
  if (at >= 0) chosen.splice(at, 1);
  else if (chosen.length < TOPK) chosen.push(label);
  render();
}

function incomplete() {
  return DATA.samples.filter(s => picks[s.id].length !== TOPK).map(s => s.id);
}

function updateStatus() {
  const missing = incomplete();
  const el = document.getElementById("status");
  el.className = missing.length ? "incomplete" : "complete";
  el.textContent = missing.length ? (missing.length + " sample(s) incomplete") : "all samples done";
}

function go(delta) {
  index = Math.min(DATA.samples.length - 1, Math.max(0, index + delta));
  render();
  window.scrollTo(0, 0);
}

function exportPicks() {
  const judge = document.getElementById("judge").value.trim();
  const out = {
    format: "raim-study-picks", version: 1, study_id: DATA.study_id, judge: judge,
    top_k: TOPK, complete: incomplete().length === 0, picks: picks,
  };
  const text = JSON.stringify(out, null, 2);
  document.getElementById("export-text").value = text;
  const blob = new Blob([text], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "picks-" + (judge.replace(/[^A-Za-z0-9_.-]+/g, "_") || "judge") + ".json";
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

document.getElementById("prev").addEventListener("click", () => go(-1));
document.getElementById("next").addEventListener("click", () => go(1));
document.getElementById("export").addEventListener("click", exportPicks);
document.getElementById("actual").addEventListener("change",
  e => document.body.classList.toggle("actual", e.target.checked));

document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA") return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const sample = DATA.samples[index];
  if (e.key === "ArrowRight" || e.key === "Enter") { go(1); e.preventDefault(); return; }
  if (e.key === "ArrowLeft") { go(-1); e.preventDefault(); return; }
  if (e.key === "Backspace" || e.key === "Delete") {
    picks[sample.id] = []; render(); e.preventDefault(); return;
  }
  const k = e.key.length === 1 ? e.key.toUpperCase() : "";
  if (/^[1-9]$/.test(k)) {
    const c = sample.candidates[Number(k) - 1];
    if (c) { toggle(c.label); e.preventDefault(); }
    return;
  }
  const c = sample.candidates.find(x => x.label === k);
  if (c) { toggle(c.label); e.preventDefault(); }
});

render();
</script>
</body>
</html>
"""
