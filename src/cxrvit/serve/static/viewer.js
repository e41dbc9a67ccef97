// cxrvit reading room: one upload -> POST /api/predict -> findings, overlays, report, header.
// Plain browser JavaScript, no build step. Every value shown comes from the JSON answer.
"use strict";

const $ = (id) => document.getElementById(id);
let result = null;     // the last JSON answer (what "download JSON" saves)
let maxUpload = 64 * 2 ** 20;

const HEADER_FIELDS = [
  ["patient_name", "Patient name"], ["patient_id", "Patient ID"], ["age", "Age"], ["sex", "Sex"],
  ["modality", "Modality"], ["body_part", "Body part"], ["view_position", "View position"],
  ["size", "Image size"], ["bits", "Bits (stored/allocated)"], ["photometric", "Photometric"],
  ["spacing", "Pixel spacing (mm)"], ["transfer_syntax", "Transfer syntax"], ["sop_class", "SOP class"],
];

function text(el, value) { el.textContent = value; return el; }
function cell(row, value, cls) { const td = row.insertCell(); text(td, value); if (cls) td.className = cls; return td; }

async function loadModel() {
  try {
    const [m, s] = await Promise.all([fetch("/api/model").then((r) => r.json()),
                                      fetch("/api/settings").then((r) => r.json())]);
    maxUpload = s.max_upload_bytes;
    const src = m.threshold_source || {};
    text($("model-info"), `model ${m.bundle} · ${m.arch} · ${m.labels.length} labels · ` +
      `${m.preprocessing.size}px · thresholds tuned on ${src.split || "?"}` +
      (src.images ? ` (${src.images} images)` : ""));
  } catch (e) { text($("model-info"), "model info unavailable"); }
}

function showError(message) {
  const box = $("error");
  text(box, message);
  box.hidden = false;
}

async function upload(file) {
  $("error").hidden = true;
  if (file.size > maxUpload) {  // the server refuses it too; this saves sending it
    showError(`Refused: ${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${(maxUpload / 2 ** 20)} MB.`);
    return;
  }
  text($("status"), `scoring ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  let answer, body;
  try {
    answer = await fetch("/api/predict", { method: "POST", body: form });
    body = await answer.json().catch(() => ({ error: `HTTP ${answer.status}` }));
  } catch (e) {
    text($("status"), "");
    showError(`Upload failed: ${e}`);
    return;
  }
  if (!answer.ok) {
    text($("status"), "");
    showError(`Refused (HTTP ${answer.status}): ${body.error || body.detail || "unknown reason"}`);
    return;
  }
  result = body;
  result.input.name = file.name;
  text($("status"), `${file.name}: ${body.input.format.toUpperCase()}, scored in ${(body.timing_ms.total / 1000).toFixed(1)} s`);
  render();
}

function render() {
  const r = result;
  // QC first: it says whether the rest can be read at all.
  const qc = $("qc");
  qc.replaceChildren();
  qc.hidden = r.qc.warnings.length === 0;
  qc.className = r.qc.severe ? "qc severe" : "qc";
  if (r.qc.warnings.length) {
    qc.append(r.qc.severe ? "QC: this input is probably not a frontal chest radiograph. Do not rely on the findings."
                          : "QC warnings:");
    const ul = document.createElement("ul");
    for (const w of r.qc.warnings) ul.append(text(document.createElement("li"), w));
    qc.append(ul);
  }
  $("xray").src = r.image;
  $("viewer").hidden = false;
  $("right").hidden = false;

  const tbody = $("findings").tBodies[0];
  tbody.replaceChildren();
  for (const f of r.findings) {  // already sorted by probability
    const row = tbody.insertRow();
    row.className = f.call ? "above" : (f.near ? "near" : "below");
    row.dataset.label = f.label;
    cell(row, f.label.replace("_", " "));
    cell(row, f.probability.toFixed(3));
    cell(row, f.threshold.toFixed(3));
    cell(row, (f.call ? "▲ above" : "▽ below") + (f.near ? " (borderline)" : ""), "call");
    cell(row, f.band);
    cell(row, f.peak ? `${f.peak.zone} zone, ${f.peak.side}` : "–");
    row.addEventListener("click", () => { if (r.overlays.gradcam && r.overlays.gradcam[f.label]) {
      $("method").value = "gradcam"; $("target").value = f.label; updateOverlay(); } });
  }

  const target = $("target");
  target.replaceChildren();
  for (const label of Object.keys((r.overlays && r.overlays.gradcam) || {})) {
    const opt = document.createElement("option");
    opt.value = label;
    text(opt, label.replace("_", " "));
    target.append(opt);
  }
  updateOverlay();
  renderReport();

  const dicom = $("dicom").tBodies[0];
  dicom.replaceChildren();
  if (!r.dicom) {
    const row = dicom.insertRow();
    cell(row, "not a DICOM file");
    cell(row, r.input.format.toUpperCase());
  } else {
    for (const [key, name] of HEADER_FIELDS) {
      const row = dicom.insertRow();
      cell(row, name);
      cell(row, r.dicom[key] == null || r.dicom[key] === "" ? "–" : String(r.dicom[key]));
    }
  }
}

function currentOverlay() {
  const o = result && result.overlays;
  if (!o || !o.attention) return null;
  const method = $("method").value;
  if (method === "gradcam") return o.gradcam[$("target").value] || null;
  return o[method];
}

function updateOverlay() {
  const src = currentOverlay();
  const img = $("overlay");
  $("target").disabled = $("method").value !== "gradcam";
  img.hidden = !src || !$("show-overlay").checked;
  if (src) img.src = src;
  img.dataset.method = $("method").value;
  img.dataset.target = $("target").value;
  img.style.opacity = $("opacity").value / 100;
  for (const row of $("findings").tBodies[0].rows)
    row.classList.toggle("selected", $("method").value === "gradcam" && row.dataset.label === $("target").value);
}

function renderReport() {
  const form = document.querySelector('input[name="form"]:checked').value;
  text($("report"), result.report[form]);
}

function save(name, href) {
  const a = document.createElement("a");
  a.href = href;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
}

function stem() { return (result.input.name || "image").replace(/\.[^.]*$/, ""); }

$("dl-json").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(result, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  save(`${stem()}-cxrvit.json`, url);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
});

$("dl-png").addEventListener("click", () => {
  // What is on screen: the picture, then the overlay at the chosen opacity.
  const base = $("xray"), over = $("overlay");
  const canvas = document.createElement("canvas");
  canvas.width = base.naturalWidth;
  canvas.height = base.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(base, 0, 0);
  if (!over.hidden && currentOverlay()) {
    ctx.globalAlpha = $("opacity").value / 100;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(over, 0, 0, canvas.width, canvas.height);
  }
  const what = $("method").value === "gradcam" ? `gradcam-${$("target").value}` : $("method").value;
  save(`${stem()}-${what.replace(/[^A-Za-z0-9_-]/g, "_")}.png`, canvas.toDataURL("image/png"));
});

for (const id of ["method", "target", "opacity", "show-overlay"])
  for (const kind of ["input", "change"]) $(id).addEventListener(kind, updateOverlay);
for (const radio of document.querySelectorAll('input[name="form"]')) radio.addEventListener("change", renderReport);

$("file").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
});

loadModel();
