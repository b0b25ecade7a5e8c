// The review page: keyboard first, one item at a time, every decision saved before it shows.
// Plain DOM (no build step); text goes in with textContent, never as HTML.
"use strict";

const state = {
  meta: null,        // /api/meta: run, classes, groups, reasons
  items: [],         // the loaded part of the filtered queue
  total: 0,          // the filtered queue's length
  acceptable: 0,     // undecided filtered items with a suggestion (what bulk accept decides)
  cursor: 0,
  history: [],       // decisions this page made, newest last: {ids, products, cursor}
  busy: false,       // a decision in flight: keys wait for its answer
  search: {open: false, matches: [], cursor: 0},
};
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, {credentials: "same-origin", ...options});
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function status(text, kind = "") {
  const node = $("status");
  node.textContent = text;
  node.className = kind;
}

function filters() {
  return {reason: $("f-reason").value, category: $("f-category").value, group: $("f-group").value,
          pending: $("f-pending").checked ? "1" : ""};
}

// A category with its coarse group, unless the group is the category itself ("Ginger").
function named(category, group) { return group && group !== category ? `${category} (${group})` : category; }

function thumbUrl(id) { return "/api/thumb?id=" + encodeURIComponent(id); }
function iconicUrl(category) { return "/api/iconic?category=" + encodeURIComponent(category); }

function image(src, alt, cls) {
  const img = el("img", {src, alt, class: cls || ""});
  // 403 (outside the URI policy) or 404 (unreadable): say so instead of a broken icon.
  img.addEventListener("error", () => img.replaceWith(el("div", {class: "missing", text: "no image"})));
  return img;
}

async function loadMore(reset) {
  const f = filters();
  const offset = reset ? 0 : state.items.length;
  const query = new URLSearchParams({...f, offset, limit: state.meta.page_size});
  const page = await api("/api/queue?" + query);
  if (reset) { state.items = []; state.cursor = 0; }
  state.items.push(...page.items);
  state.total = page.total;
  state.acceptable = page.acceptable;
}

function current() { return state.items[state.cursor]; }

function renderQueue() {
  const list = $("queue");
  list.replaceChildren(...state.items.map((item, i) => {
    const li = el("li", {"data-id": item.id, class: i === state.cursor ? "current" : "",
                         "data-decided": item.decided ? item.decided.category : null},
      image(thumbUrl(item.id), "", ""),
      el("div", {class: "meta"}, el("div", {text: item.current || "(no category)"}),
         el("div", {class: "muted", text: item.reason})));
    li.addEventListener("click", () => { state.cursor = i; render(); });
    return li;
  }));
  const chosen = list.querySelector("li.current");
  if (chosen) chosen.scrollIntoView({block: "nearest"});
}

function suggestion(item, entry, n) {
  const bar = el("div", {class: "bar"});
  bar.style.width = Math.round(entry.score * 100) + "%";
  const li = el("li", {"data-category": entry.category,
                       class: item.decided && item.decided.category === entry.category ? "chosen" : ""},
    el("kbd", {text: String(n)}),
    entry.iconic ? image(iconicUrl(entry.category), "iconic " + entry.category, "iconic")
                 : el("div", {class: "noiconic", title: "no iconic image"}),
    el("div", {}, el("div", {text: named(entry.category, entry.group)}), bar),
    el("div", {text: (entry.score * 100).toFixed(1) + "%"}));
  li.addEventListener("click", () => decide(entry.category));
  return li;
}

function renderItem() {
  const box = $("item");
  const item = current();
  if (!item) {
    box.replaceChildren(el("p", {class: "muted",
      text: state.total ? "End of the loaded queue." : "Nothing to review for this filter."}));
    box.removeAttribute("data-id");
    return;
  }
  box.setAttribute("data-id", item.id);
  const facts = el("dl", {class: "facts"},
    el("dt", {text: "Product"}), el("dd", {text: item.id}),
    el("dt", {text: "Current"}), el("dd", {text: item.current ? named(item.current, item.current_group)
                                                           : "(none)"}),
    el("dt", {text: "Reason"}), el("dd", {}, el("span", {class: "reason" + (item.audit ? " audit" : ""),
                                                    text: item.reason + (item.error ? `: ${item.error}` : "")})),
    el("dt", {text: "Confidence"}), el("dd", {text: item.confidence === null ? "–"
                                                  : (item.confidence * 100).toFixed(1) + "%"}),
    el("dt", {text: "Decided"}), el("dd", {class: "decided", id: "decided",
                                          text: item.decided ? `${item.decided.category} (saved)` : "–"}));
  const list = el("ol", {class: "suggestions"},
    ...item.top_k.slice(0, 5).map((entry, i) => suggestion(item, entry, i + 1)));
  const keep = el("button", {type: "button", text: "k  keep current", disabled: item.current ? null : "disabled"});
  keep.addEventListener("click", () => keepCurrent());
  const find = el("button", {type: "button", text: "/  other category"});
  find.addEventListener("click", () => openSearch());
  box.replaceChildren(
    el("div", {class: "photo"}, image(thumbUrl(item.id), "product " + item.id, "")),
    el("div", {}, facts, el("h3", {text: "Suggestions"}), list, el("div", {class: "actions"}, keep, find)));
}

function renderCounts() {
  const m = state.meta;
  $("run").textContent = `run ${m.run_id} · model ${m.model_version} · ${m.reviewer}`;
  const decided = state.items.filter((i) => i.decided).length;
  $("progress").textContent = `${state.cursor + 1 > state.items.length ? state.items.length : state.cursor + 1}` +
    ` / ${state.total} in this view · ${decided} decided here`;
  $("bulk-count").textContent = String(state.acceptable);
}

function render() { renderQueue(); renderItem(); renderCounts(); }

async function move(step) {
  const next = state.cursor + step;
  if (next < 0) return;
  if (next >= state.items.length - 5 && state.items.length < state.total) await loadMore(false);
  state.cursor = Math.min(next, state.items.length);
  render();
}

async function record(request, products, undoCursor) {
  if (state.busy) return null;
  state.busy = true;
  status("saving…");
  try {
    const answer = await request();
    status("saved", "saved");
    state.history.push({ids: answer.decision_ids, products, cursor: undoCursor});
    return answer;
  } catch (error) {
    status("not saved: " + error.message, "error");
    return null;
  } finally {
    state.busy = false;
  }
}

async function decide(category) {
  const item = current();
  if (!item || !category) return;
  const at = state.cursor;
  const answer = await record(() => api("/api/decisions", {product_id: item.id, category}), [item.id], at);
  if (!answer) return;
  item.decided = {decision_id: answer.decision_ids[0], category};
  // On to the next undecided item (the saved one stays in the list, so undo finds it).
  let next = at + 1;
  while (next < state.items.length && state.items[next].decided) next += 1;
  state.cursor = at;
  await move(next - at);
}

function keepCurrent() {
  const item = current();
  if (item && item.current) decide(item.current);
}

async function undo() {
  const last = state.history[state.history.length - 1];
  if (!last || state.busy) return;
  state.busy = true;
  status("undoing…");
  try {
    await api("/api/undo", {decision_ids: last.ids});
    state.history.pop();
    for (const item of state.items) if (last.products.includes(item.id)) item.decided = null;
    state.cursor = Math.min(last.cursor, Math.max(state.items.length - 1, 0));
    status("undone (saved)", "saved");
  } catch (error) {
    status("undo failed: " + error.message, "error");
  } finally {
    state.busy = false;
  }
  render();
}

async function bulkAccept() {
  const f = filters();
  const n = state.acceptable;
  if (!n || !window.confirm(`Accept the model's top suggestion for ${n} undecided items of this filter?`)) return;
  const answer = await record(() => api("/api/bulk", {reason: f.reason, category: f.category,
                                                      group: f.group, expect: n}), [], state.cursor);
  if (!answer) return;
  state.history[state.history.length - 1].products = answer.product_ids;
  const chosen = new Set(answer.product_ids);
  for (const item of state.items) {
    if (chosen.has(item.id)) item.decided = {category: item.predicted};
  }
  status(`saved ${answer.decision_ids.length} decisions`, "saved");
  await reload(true);
}

// -- the category search ----------------------------------------------------------------------

function openSearch() {
  if (!current()) return;
  state.search.open = true;
  $("search").hidden = false;
  $("search-input").value = "";
  searchMatches();
  $("search-input").focus();
}

function closeSearch() {
  state.search.open = false;
  $("search").hidden = true;
  $("search-input").blur();
}

function searchMatches() {
  const text = $("search-input").value.trim().toLowerCase();
  const classes = state.meta.classes.filter((c) => !text || c.name.toLowerCase().includes(text) ||
                                                   (c.group || "").toLowerCase().includes(text));
  // Names that start with the text first: "ap" finds Apple before Papaya.
  classes.sort((a, b) => (b.name.toLowerCase().startsWith(text)) - (a.name.toLowerCase().startsWith(text)));
  state.search.matches = classes;
  state.search.cursor = 0;
  renderSearch();
}

function renderSearch() {
  $("search-results").replaceChildren(...state.search.matches.map((c, i) => {
    const li = el("li", {"data-category": c.name, class: i === state.search.cursor ? "current" : "",
                         text: named(c.name, c.group)});
    li.addEventListener("click", () => { closeSearch(); decide(c.name); });
    return li;
  }));
}

function searchKey(event) {
  if (event.key === "Escape") { closeSearch(); event.preventDefault(); return; }
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    const n = state.search.matches.length;
    if (n) state.search.cursor = (state.search.cursor + (event.key === "ArrowDown" ? 1 : n - 1)) % n;
    renderSearch();
    event.preventDefault();
    return;
  }
  if (event.key === "Enter") {
    const chosen = state.search.matches[state.search.cursor];
    closeSearch();
    if (chosen) decide(chosen.name);
    event.preventDefault();
  }
}

// -- keys -------------------------------------------------------------------------------------

function onKey(event) {
  if (state.search.open) { searchKey(event); return; }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target && (target.tagName === "SELECT" || target.tagName === "INPUT")) return;
  const help = $("help");
  if (!help.hidden && (event.key === "Escape" || event.key === "?")) {
    help.hidden = true;
    event.preventDefault();
    return;
  }
  const item = current();
  if (/^[1-5]$/.test(event.key)) {
    const entry = item && item.top_k[Number(event.key) - 1];
    if (entry) decide(entry.category);
  } else if (event.key === "k") {
    keepCurrent();
  } else if (event.key === "/") {
    openSearch();
  } else if (event.key === "u" || event.key === "Backspace") {
    undo();
  } else if (event.key === "j" || event.key === "ArrowDown") {
    move(1);
  } else if (event.key === "ArrowUp") {
    move(-1);
  } else if (event.key === "?") {
    help.hidden = false;
  } else {
    return;
  }
  event.preventDefault();
}

async function reload(keepStatus) {
  await loadMore(true);
  render();
  if (!keepStatus) status("");
}

function fillSelect(select, values) {
  for (const [value, label] of values) select.append(el("option", {value, text: label}));
}

async function start() {
  state.meta = await api("/api/meta");
  fillSelect($("f-reason"), Object.entries(state.meta.reasons).map(([r, n]) => [r, `${r} (${n})`]));
  fillSelect($("f-category"), state.meta.classes.map((c) => [c.name, c.name]));
  fillSelect($("f-group"), state.meta.groups.map((g) => [g, g]));
  for (const id of ["f-reason", "f-category", "f-group", "f-pending"]) {
    $(id).addEventListener("change", () => { reload(false); $(id).blur(); });
  }
  $("bulk").addEventListener("click", bulkAccept);
  $("help-button").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
  $("search-input").addEventListener("input", searchMatches);
  document.addEventListener("keydown", onKey);
  await reload(false);
  document.body.setAttribute("data-ready", "1");
}

start().catch((error) => status("could not load the queue: " + error.message, "error"));
