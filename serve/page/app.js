// The browse page: dialogues of a split on the left, the chosen dialogue in the middle (gold labels,
// behaviour descriptions, every run's prediction), nearest neighbours of a clicked utterance on the right.
// Plain DOM code, no framework; every text goes in through textContent, never as HTML.
"use strict";

const state = { split: null, dialogues: [], current: null, selected: null, modalities: [], groups: new Map(), grouped: new Set() };
const $ = (id) => document.getElementById(id);

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : `${url}: HTTP ${response.status}`);
  return body;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  setTimeout(() => { box.hidden = true; }, 6000);
}

function labelChip(label) {
  return el("span", `chip emo-${(label || "none").toLowerCase()}`, label || "—");
}

// --- splits and dialogue list ---------------------------------------------------------------------

async function init() {
  const info = await getJSON("/info");
  await loadGroups();
  $("store").textContent = info.store;
  state.modalities = info.modalities;
  const select = $("modality");
  for (const m of info.modalities) select.append(new Option(m, m, false, m === "text"));
  select.disabled = info.modalities.length === 0;
  select.addEventListener("change", () => state.selected && loadSimilar(state.selected));
  $("filter").addEventListener("input", renderDialogueList);
  const splits = $("splits");
  for (const split of info.splits) {
    const tab = el("button", "split", split);
    tab.type = "button";
    tab.setAttribute("role", "tab");
    tab.addEventListener("click", () => chooseSplit(split));
    splits.append(tab);
  }
  const fromHash = parseHash();
  const split = fromHash.split && info.splits.includes(fromHash.split) ? fromHash.split : info.splits.includes("dev") ? "dev" : info.splits[0];
  if (split) await chooseSplit(split, fromHash.dialogue);
}

// Seed groups (`--seeds`): a group is one run (its predictions are the seeds' mean probabilities); its
// member runs are not shown on their own.
async function loadGroups() {
  const runs = await getJSON("/runs").catch(() => []);
  for (const r of runs) if (r.group) state.groups.set(r.run_id, r);
  for (const r of runs) if (r.group_id && state.groups.has(r.group_id)) state.grouped.add(r.run_id);
}

function runKind(runId, kind) {
  const g = state.groups.get(runId);
  return g ? `${g.group.member_kind} ×${Object.keys(g.group.members).length} seeds` : kind;
}

function groupTitle(runId) {
  const g = state.groups.get(runId);
  if (!g) return runId;
  const dev = g.metrics.dev;
  const failed = Object.keys(g.group.failed);
  return `${runId}\nthe seeds' mean probabilities` +
    (dev && dev.std ? `\ndev weighted F1 ${dev.weighted_f1.toFixed(4)} ± ${dev.std.weighted_f1.toFixed(4)} over ${dev.seeds} seeds` : "") +
    (failed.length ? `\nfailed seeds: ${failed.join(", ")}` : "");
}

// A deep link is `#SPLIT/DIALOGUE`, each part percent-encoded on its own (hashFor), so a dialogue id may
// hold `/` or `%`. The split ends at the first `/`; everything after it is the dialogue id. A part that
// is not valid percent-encoding (a link typed by hand, `#dev/50%off`) is taken as it is.
function hashFor(split, dialogueId) {
  return `#${encodeURIComponent(split)}/${encodeURIComponent(dialogueId)}`;
}

function decodePart(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

function parseHash() {
  const hash = location.hash.slice(1);
  const cut = hash.indexOf("/");
  const [split, dialogue] = cut < 0 ? [hash, ""] : [hash.slice(0, cut), hash.slice(cut + 1)];
  return { split: decodePart(split) || null, dialogue: decodePart(dialogue) || null };
}

async function chooseSplit(split, dialogueId) {
  state.split = split;
  for (const tab of $("splits").children) tab.setAttribute("aria-selected", String(tab.textContent === split));
  state.dialogues = await getJSON(`/dialogues?split=${encodeURIComponent(split)}`);
  renderDialogueList();
  const first = dialogueId && state.dialogues.some((d) => d.dialogue_id === dialogueId) ? dialogueId : state.dialogues[0]?.dialogue_id;
  if (first !== undefined) await openDialogue(split, first);
}

function renderDialogueList() {
  const query = $("filter").value.trim().toLowerCase();
  const list = $("dialogues");
  list.replaceChildren();
  for (const d of state.dialogues) {
    const haystack = `${d.dialogue_id} ${d.first || ""} ${(d.speakers || []).join(" ")}`.toLowerCase();
    if (query && !haystack.includes(query)) continue;
    const item = el("li", "dialogue-item");
    item.dataset.id = d.dialogue_id;
    if (state.current && state.current.dialogue_id === d.dialogue_id) item.classList.add("active");
    const head = el("div", "dialogue-item-head");
    head.append(el("span", "dialogue-id", `#${d.dialogue_id}`), el("span", "count", `${d.utterances} turns`));
    item.append(head, el("div", "dialogue-first", d.first || ""));
    item.addEventListener("click", () => openDialogue(state.split, d.dialogue_id));
    list.append(item);
  }
}

// --- one dialogue ---------------------------------------------------------------------------------

async function openDialogue(split, dialogueId, highlightUid) {
  const dataset = state.dialogues.find((d) => d.split === split && d.dialogue_id === dialogueId)?.dataset;
  const query = dataset ? `?dataset=${encodeURIComponent(dataset)}` : "";
  const data = await getJSON(`/dialogues/${encodeURIComponent(split)}/${encodeURIComponent(dialogueId)}${query}`);
  state.current = data;
  history.replaceState(null, "", hashFor(split, dialogueId));
  for (const item of $("dialogues").children) item.classList.toggle("active", item.dataset.id === dialogueId);
  $("dialogue-title").textContent = `Dialogue ${dialogueId} · ${split}`;
  $("empty").hidden = true;
  renderRuns(data.utterances);
  const list = $("utterances");
  list.replaceChildren(...data.utterances.map(renderUtterance));
  const target = highlightUid || data.utterances[0]?.uid;
  if (target) selectUtterance(target, Boolean(highlightUid));
}

function runsOf(utterances) {
  const runs = new Map();
  for (const u of utterances) for (const p of u.predictions || []) if (!state.grouped.has(p.run_id)) runs.set(p.run_id, p.kind);
  return runs;
}

function renderRuns(utterances) {
  const box = $("runs");
  box.replaceChildren();
  const runs = runsOf(utterances);
  if (runs.size === 0) {
    box.append(el("span", "hint", "No trained run predicts this dialogue yet."));
    return;
  }
  for (const [runId, kind] of runs) {
    const predicted = utterances.map((u) => (u.predictions || []).find((p) => p.run_id === runId)).filter(Boolean);
    const right = predicted.filter((p) => p.correct).length;
    const tag = el("span", "run-tag", `${runKind(runId, kind)}: ${right}/${predicted.length} correct`);
    tag.title = groupTitle(runId);
    box.append(tag);
  }
}

function renderUtterance(u) {
  const item = el("li", "utterance");
  item.dataset.uid = u.uid;
  item.tabIndex = 0;
  const head = el("div", "utterance-head");
  const gold = el("span", "gold");
  gold.append(el("span", "caption", "gold"), labelChip(u.label));
  head.append(el("span", "speaker", u.speaker || "?"), el("span", "turn", `turn ${u.turn}`), gold);
  item.append(head, el("p", "text", u.text || u.transcript || ""));
  if (u.transcript && u.transcript !== u.text) item.append(el("p", "transcript", `heard: “${u.transcript}”`));
  if (u.description) {
    const behaviour = el("p", "behaviour");
    behaviour.append(el("span", "caption", "behaviour"), el("span", "", u.description));
    item.append(behaviour);
  }
  if ((u.predictions || []).length) {
    const preds = el("div", "predictions");
    for (const p of u.predictions.filter((p) => !state.grouped.has(p.run_id))) {
      const verdict = p.correct === true ? "right" : p.correct === false ? "wrong" : "";
      const pred = el("span", `prediction ${verdict}`);
      const top = p.probabilities[p.label];
      pred.append(el("span", "run-kind", runKind(p.run_id, p.kind)), labelChip(p.label), el("span", "prob", top !== undefined ? `${Math.round(top * 100)}%` : ""));
      if (verdict) pred.append(el("span", "mark", verdict === "right" ? "✓" : "✗"));
      pred.title = `${groupTitle(p.run_id)}\n` + Object.entries(p.probabilities).map(([c, v]) => `${c}: ${(v * 100).toFixed(1)}%`).join("\n");
      preds.append(pred);
    }
    item.append(preds);
  }
  item.addEventListener("click", () => selectUtterance(u.uid));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") selectUtterance(u.uid); });
  return item;
}

function selectUtterance(uid, scroll) {
  state.selected = uid;
  for (const item of $("utterances").children) {
    const on = item.dataset.uid === uid;
    item.classList.toggle("selected", on);
    if (on && scroll) item.scrollIntoView({ block: "center" });
  }
  loadSimilar(uid);
}

// --- neighbours -----------------------------------------------------------------------------------

async function loadSimilar(uid) {
  const list = $("similar");
  const modality = $("modality").value;
  if (!modality) {
    $("query").textContent = "No features in the store yet: run `bemerc extract`.";
    list.replaceChildren();
    return;
  }
  $("query").textContent = `Closest to ${uid} by ${modality}:`;
  let hits;
  try {
    hits = await getJSON(`/similar?uid=${encodeURIComponent(uid)}&modality=${encodeURIComponent(modality)}&k=8`);
  } catch (err) {
    list.replaceChildren();
    $("query").textContent = err.message;
    return;
  }
  if (state.selected !== uid) return; // a newer click won
  list.replaceChildren(...hits.map((h) => {
    const item = el("li", "neighbour");
    const head = el("div", "neighbour-head");
    head.append(el("span", "speaker", h.speaker || "?"), labelChip(h.label), el("span", "distance", `d=${h.distance.toFixed(3)}`));
    item.append(head, el("p", "text", h.text || ""), el("span", "uid", h.uid));
    item.title = "Open this dialogue";
    item.addEventListener("click", () => openNeighbour(h.uid, h.split));
    return item;
  }));
}

async function openNeighbour(uid, split) {
  const detail = await getJSON(`/utterances/${uid.split("/").map(encodeURIComponent).join("/")}`);
  const dialogueId = detail.utterance.dialogue_id;
  if (split !== state.split) {
    state.split = split;
    for (const tab of $("splits").children) tab.setAttribute("aria-selected", String(tab.textContent === split));
    state.dialogues = await getJSON(`/dialogues?split=${encodeURIComponent(split)}`);
    renderDialogueList();
  }
  await openDialogue(split, dialogueId, uid);
}

window.addEventListener("unhandledrejection", (e) => showError(e.reason?.message || String(e.reason)));
init().catch((err) => showError(err.message));
