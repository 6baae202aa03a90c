/* Switch SAE feature browser.  Reads window.SWITCHSAE_DATA (data.js) and renders, by URL hash:
 *   #              overview: experts, summary metrics, map of decoder directions
 *   #E             expert E ("0".."N-1" or "shared"): its features sorted by frequency
 *   #E/I           feature I of expert E: top contexts, histogram, nearest features elsewhere
 *   #search/TEXT   features that fire most on tokens matching TEXT
 * All text from the data is inserted as text nodes (never as HTML). */
"use strict";

const D = window.SWITCHSAE_DATA;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#8cd17d", "#499894", "#d37295", "#86bcb6", "#f1ce63", "#a0cbe8", "#ffbe7d", "#79706e", "#d4a6c8"];
const PAGE = 200;

/* ---------- small helpers ---------- */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const pct = (x) => (x === 0 ? "0%" : x < 0.001 ? (100 * x).toPrecision(2) + "%" : (100 * x).toFixed(x < 0.1 ? 2 : 1) + "%");
const num = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3));
const int = (x) => x.toLocaleString("en-US");
const card = (k, v, title) => el("div", { class: "card", title: title || "" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v));

/* ---------- experts and feature ids ---------- */
const EXPERTS = D.experts;
const KEYS = new Map(EXPERTS.map((e, i) => [e.key, i]));
const colour = (g) => (EXPERTS[g].key === "shared" ? "#475467" : PALETTE[g % PALETTE.length]);
const MAX_LOAD = Math.max(...EXPERTS.filter((e) => e.key !== "shared").map((e) => e.load), 1e-9);
const barWidth = (e) => (e.key === "shared" ? 100 : (100 * e.load) / MAX_LOAD);
const expertName = (g) => (EXPERTS[g].key === "shared" ? "Shared expert" : "Expert " + EXPERTS[g].key);
function groupOf(id) {
  let lo = 0, hi = EXPERTS.length - 1;
  while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (EXPERTS[mid].start <= id) lo = mid; else hi = mid - 1; }
  return lo;
}
const label = (id) => { const g = groupOf(id); return EXPERTS[g].key + "/" + (id - EXPERTS[g].start); };
const featureLink = (id, text) => el("a", { href: "#" + label(id) }, text || label(id));

/* ---------- tokens and contexts ---------- */
const isSpecial = (t) => /^\[[A-Z]+\]$/.test(t) || /^<\/?s>$/.test(t);
const tokenText = (t) => t.replace(/\s+/g, " ");
function topTokens(f, n) {
  const seen = [];
  for (const [start, centre] of f.ctx) {
    const t = D.tokens[start + centre].trim();
    if (t && !seen.includes(t)) seen.push(t);
    if (seen.length >= n) break;
  }
  return seen;
}
function contextLine(f, ctx) {
  const [start, centre, value, permille] = ctx;
  const text = el("span", { class: "text" });
  permille.forEach((p, j) => {
    const t = D.tokens[start + j];
    const a = Math.min(1, p / 1000);
    const span = el("span", {
      class: "tok" + (j === centre ? " centre" : "") + (isSpecial(t) ? " special" : ""),
      title: num((p / 1000) * f.max),
    }, tokenText(t));
    if (p > 0) span.style.background = `rgba(var(--hl), ${0.12 + 0.78 * a})`;
    text.append(span);
  });
  return el("div", { class: "ctx" }, el("span", { class: "val" }, num(value)), text);
}

/* ---------- plots ---------- */
function histogram(f) {
  const W = 420, H = 150, L = 40, B = 24, T = 8, R = 8;
  const bins = f.hist, top = Math.max(1, ...bins), bw = (W - L - R) / bins.length;
  const g = svg("svg", { class: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  bins.forEach((c, i) => {
    const h = ((H - B - T) * c) / top;
    g.append(svg("rect", { x: L + i * bw + 1, y: H - B - h, width: Math.max(1, bw - 2), height: h, fill: "rgb(255,138,0)" },
      svg("title", {}, `${num((i / bins.length) * f.max)}–${num(((i + 1) / bins.length) * f.max)}: ${int(c)} tokens`)));
  });
  g.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#98a2b3" }));
  g.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#98a2b3" }));
  const text = (x, y, s, anchor) => svg("text", { x, y, "font-size": 11, fill: "#667085", "text-anchor": anchor }, s);
  g.append(text(L, H - 8, "0", "middle"), text(W - R, H - 8, num(f.max), "end"),
    text((L + W) / 2, H - 8, "activation", "middle"), text(L - 5, T + 9, int(top), "end"), text(L - 5, H - B, "0", "end"));
  return g;
}

function drawMap(highlightGroup, highlightId, width, height) {
  const canvas = el("canvas", { class: "plot" });
  const dpr = window.devicePixelRatio || 1;
  canvas.width = width * dpr; canvas.height = height * dpr;
  canvas.style.width = width + "px"; canvas.style.height = height + "px";
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const xs = D.map.x, ys = D.map.y, pad = 14;
  const range = (a) => a.reduce(([lo, hi], v) => [Math.min(lo, v), Math.max(hi, v)], [Infinity, -Infinity]);
  const [x0, x1] = range(xs), [y0, y1] = range(ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const sy = (y) => height - pad - ((y - y0) / (y1 - y0 || 1)) * (height - 2 * pad);
  ctx.fillStyle = "#fbfcfd"; ctx.fillRect(0, 0, width, height);
  const dot = (i, r, fill, alpha) => {
    ctx.globalAlpha = alpha; ctx.fillStyle = fill; ctx.beginPath();
    ctx.arc(sx(xs[i]), sy(ys[i]), r, 0, 2 * Math.PI); ctx.fill();
  };
  const order = xs.map((_, i) => i);
  for (const i of order) {
    const g = groupOf(i);
    if (highlightGroup === null) dot(i, 2.2, colour(g), 0.6);
    else if (g !== highlightGroup) dot(i, 1.8, "#c5cad3", 0.5);
  }
  if (highlightGroup !== null) {
    for (const i of order) if (groupOf(i) === highlightGroup) dot(i, 2.6, colour(highlightGroup), 0.85);
  }
  if (highlightId !== null) {
    ctx.globalAlpha = 1; ctx.strokeStyle = "#101828"; ctx.lineWidth = 2; ctx.beginPath();
    ctx.arc(sx(xs[highlightId]), sy(ys[highlightId]), 7, 0, 2 * Math.PI); ctx.stroke();
    for (const [j] of D.features[highlightId].nn) {
      ctx.lineWidth = 1.2; ctx.beginPath(); ctx.arc(sx(xs[j]), sy(ys[j]), 5, 0, 2 * Math.PI); ctx.stroke();
    }
  }
  ctx.globalAlpha = 1; ctx.fillStyle = "#667085"; ctx.font = "11px system-ui, sans-serif";
  const axis = D.meta.map_method === "umap" ? ["UMAP 1", "UMAP 2"] : ["PC 1", "PC 2"];
  ctx.fillText(axis[0] + " →", width - 60, height - 3);
  ctx.save(); ctx.translate(10, 56); ctx.rotate(-Math.PI / 2); ctx.fillText(axis[1] + " →", 0, 0); ctx.restore();
  const nearest = (ev) => {
    const r = canvas.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
    let best = -1, bd = 49;
    for (const i of order) { const d = (sx(xs[i]) - mx) ** 2 + (sy(ys[i]) - my) ** 2; if (d < bd) { bd = d; best = i; } }
    return best;
  };
  const tip = document.getElementById("maptip") || document.body.appendChild(el("div", { id: "maptip" }));
  canvas.addEventListener("mousemove", (ev) => {
    const i = nearest(ev);
    canvas.style.cursor = i < 0 ? "default" : "pointer";
    if (i < 0) { tip.style.display = "none"; return; }
    tip.textContent = `feature ${label(i)}  ${topTokens(D.features[i], 3).join(" · ")}`;
    Object.assign(tip.style, { display: "block", left: ev.clientX + 12 + "px", top: ev.clientY + 12 + "px" });
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  canvas.addEventListener("click", (ev) => { const i = nearest(ev); if (i >= 0) location.hash = label(i); });
  return canvas;
}

function mapPanel(highlightGroup, highlightId) {
  const legend = el("div", { class: "legend" }, EXPERTS.map((e, g) =>
    el("a", { href: "#" + e.key }, el("span", { class: "swatch", style: `background:${colour(g)}` }), expertName(g))));
  const method = D.meta.map_method === "umap" ? "UMAP (cosine)" : "PCA";
  return el("div", { class: "panel mappanel" },
    el("h2", {}, `Decoder directions, ${method}, coloured by expert`),
    drawMap(highlightGroup, highlightId, 480, 380), legend);
}

/* ---------- views ---------- */
function sidebar(activeGroup) {
  const nav = document.getElementById("sidebar");
  nav.replaceChildren(
    el("a", { class: "item" + (activeGroup === null ? " active" : ""), href: "#" }, "Overview"),
    el("div", { class: "section" }, "Experts · load"),
    ...EXPERTS.map((e, g) => el("a", { class: "item" + (activeGroup === g ? " active" : ""), href: "#" + e.key },
      el("span", { class: "swatch", style: `background:${colour(g)}` }),
      el("span", { class: "name" }, e.key === "shared" ? "shared" : "Expert " + e.key),
      el("span", { class: "bar", title: "load relative to the busiest expert" }, el("span", { style: `width:${barWidth(e)}%;background:${colour(g)}` })),
      el("span", { class: "pct" }, e.key === "shared" ? "all" : pct(e.load)))));
}

function overview() {
  const S = D.summary, c = D.meta.config, routed = EXPERTS.filter((e) => e.key !== "shared").length;
  const rows = EXPERTS.map((e, g) => el("tr", {},
    el("td", { class: "nowrap" }, el("span", { class: "swatch", style: `background:${colour(g)};margin-right:6px` }), el("a", { href: "#" + e.key }, expertName(g))),
    el("td", { class: "nowrap" }, el("span", { class: "loadbar" }, el("span", { style: `width:${barWidth(e)}%;background:${colour(g)}` })), e.key === "shared" ? "always on" : pct(e.load)),
    el("td", { class: "num" }, int(e.dead)), el("td", { class: "num" }, int(e.dense)),
    el("td", {}, topFeatures(e, 5))));
  return [
    el("h1", {}, "Overview"),
    el("div", { class: "sub" }, `${int(D.meta.n_tokens)} tokens from ${int(D.meta.n_docs)} texts` + (D.meta.source ? ` · ${D.meta.source}` : "")),
    el("div", { class: "cards" },
      card("features", int(D.meta.total_latents), `${routed} experts × ${c.n_latents / routed} latents`),
      card("FVU", num(S.fvu), "fraction of variance unexplained"),
      card("L0", num(S.l0)), card("load entropy", `${num(S.load_entropy)} / ${num(Math.log(routed))}`, "nats; log N when balanced"),
      card("dead", `${int(S.dead)} (${pct(S.dead_fraction)})`, "never fired on these tokens"),
      card("dense", `${int(S.dense)} (${pct(S.dense_fraction)})`, `fire on more than ${pct(D.meta.dense_threshold)} of tokens`),
      card("duplicated", pct(S.duplication_fraction), `features with a decoder cosine > ${D.meta.duplication_threshold} to a feature of another expert`)),
    el("div", { class: "row" },
      el("div", { class: "panel" }, el("h2", {}, "Experts"), el("table", {},
        el("thead", {}, el("tr", {}, el("th", {}, "expert"), el("th", {}, "load"), el("th", { class: "num" }, "dead"),
          el("th", { class: "num" }, "dense"), el("th", {}, "top tokens of its most frequent features"))),
        el("tbody", {}, rows))),
      mapPanel(null, null)),
  ];
}

function byFrequency(e) {
  const ids = Array.from({ length: e.width }, (_, i) => e.start + i);
  return ids.sort((a, b) => D.features[b].f - D.features[a].f || a - b);
}
/* Chips for the expert's most frequent features, one per distinct top token. */
function topFeatures(e, n) {
  const seen = new Set(), chips = [];
  for (const id of byFrequency(e)) {
    const t = topTokens(D.features[id], 1)[0];
    if (chips.length >= n || D.features[id].n === 0) break;
    if (t === undefined || seen.has(t)) continue;
    seen.add(t);
    chips.push(el("a", { href: "#" + label(id), class: "chip", title: "feature " + label(id) }, t));
  }
  return chips;
}

function featureRow(id, rank) {
  const f = D.features[id];
  const tags = [f.n === 0 && el("span", { class: "tag dead" }, "dead"), f.f > D.meta.dense_threshold && el("span", { class: "tag dense" }, "dense")];
  return el("tr", { class: f.n === 0 ? "dead" : "" },
    el("td", { class: "num muted" }, rank + 1), el("td", {}, featureLink(id), tags),
    el("td", { class: "num" }, pct(f.f)), el("td", { class: "num" }, f.n ? num(f.max) : "–"),
    el("td", {}, topTokens(f, 5).map((t) => el("span", { class: "chip" }, t))));
}

function expertView(g) {
  const e = EXPERTS[g], ids = byFrequency(e);
  const tbody = el("tbody", {}, ids.slice(0, PAGE).map((id, r) => featureRow(id, r)));
  const more = ids.length > PAGE && el("button", { class: "more", onclick: (ev) => {
    tbody.append(...ids.slice(PAGE).map((id, r) => featureRow(id, r + PAGE))); ev.target.remove();
  } }, `show all ${int(ids.length)} features`);
  return [
    el("div", { class: "crumbs" }, el("a", { href: "#" }, "Overview"), " › ", expertName(g)),
    el("h1", {}, expertName(g)),
    el("div", { class: "cards" },
      card("load", e.key === "shared" ? "always on" : pct(e.load), "fraction of tokens routed here"),
      card("features", int(e.width)), card("alive", int(e.width - e.dead)), card("dead", int(e.dead)), card("dense", int(e.dense))),
    el("div", { class: "row" },
      el("div", { class: "panel", style: "flex: 2 1 520px" }, el("h2", {}, "Features by frequency"),
        el("table", {}, el("thead", {}, el("tr", {}, el("th", { class: "num" }, "#"), el("th", {}, "feature"),
          el("th", { class: "num" }, "frequency"), el("th", { class: "num" }, "max act"), el("th", {}, "top tokens"))), tbody), more),
      mapPanel(g, null)),
  ];
}

function featureView(g, i) {
  const e = EXPERTS[g], id = e.start + i, f = D.features[id];
  const ids = byFrequency(e), rank = ids.indexOf(id);
  const nav = el("span", { class: "navlinks" },
    rank > 0 && el("a", { href: "#" + label(ids[rank - 1]) }, "← more frequent"),
    rank < ids.length - 1 && el("a", { href: "#" + label(ids[rank + 1]) }, "less frequent →"));
  const share = e.key === "shared" || e.load === 0 ? null : f.f / e.load;
  const contexts = f.ctx.length ? f.ctx.map((c) => contextLine(f, c)) : el("div", { class: "muted" }, "This feature never fired on these tokens.");
  const nn = f.nn.length ? el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "feature"), el("th", {}, "expert"), el("th", { class: "num" }, "cosine"), el("th", {}, "top tokens"))),
    el("tbody", {}, f.nn.map(([j, cos]) => el("tr", {}, el("td", {}, featureLink(j)),
      el("td", {}, el("span", { class: "swatch", style: `background:${colour(groupOf(j))};margin-right:6px` }), expertName(groupOf(j))),
      el("td", { class: "num" }, cos.toFixed(3)), el("td", {}, topTokens(D.features[j], 3).map((t) => el("span", { class: "chip" }, t)))))))
    : el("div", { class: "muted" }, "There are no other experts.");
  return [
    el("div", { class: "crumbs" }, nav, el("a", { href: "#" }, "Overview"), " › ", el("a", { href: "#" + e.key }, expertName(g)), " › ", "feature " + label(id)),
    el("h1", {}, "Feature " + label(id), f.n === 0 && el("span", { class: "tag dead" }, "dead"), f.f > D.meta.dense_threshold && el("span", { class: "tag dense" }, "dense")),
    el("div", { class: "sub" }, `latent #${id} · ${expertName(g)} · rank ${rank + 1} of ${e.width} by frequency`),
    el("div", { class: "cards" },
      card("frequency", pct(f.f), "fraction of all tokens it fires on"), card("fires on", int(f.n) + " tokens"),
      share !== null && card("of its expert's tokens", pct(share)),
      card("max activation", num(f.max)), card("mean activation", num(f.mean), "when firing"),
      f.nn.length > 0 && card("closest elsewhere", f.nn[0][1].toFixed(3), "decoder cosine to the nearest feature of another expert")),
    el("div", { class: "panel" }, el("h2", {}, `Top activations (${f.ctx.length})`), contexts),
    el("div", { class: "row" },
      el("div", { class: "panel" }, el("h2", {}, "Activation histogram"), f.n ? histogram(f) : el("div", { class: "muted" }, "no activations")),
      el("div", { class: "panel" }, el("h2", {}, "Nearest features in other experts"), nn)),
    mapPanel(g, id),
  ];
}

function searchView(query) {
  const q = query.trim().toLowerCase(), S = D.search;
  const hits = [];
  S.tok.forEach((t, j) => {
    const score = t === q ? 0 : t.startsWith(q) ? 1 : t.includes(q) ? 2 : -1;
    if (q && score >= 0) hits.push([score, -S.n[j], j]);
  });
  hits.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const rows = hits.slice(0, 50).map(([, , j]) => el("tr", {},
    el("td", {}, el("span", { class: "chip" }, S.tok[j])), el("td", { class: "num" }, int(S.n[j])),
    el("td", {}, S.top[j].length ? S.top[j].map(([id, m]) => el("span", { style: "margin-right:14px;white-space:nowrap" },
      featureLink(id), " ", el("span", { class: "muted" }, num(m)))) : el("span", { class: "muted" }, "no feature fires"))));
  return [
    el("div", { class: "crumbs" }, el("a", { href: "#" }, "Overview"), " › search"),
    el("h1", {}, `Tokens matching “${query}”`),
    el("div", { class: "sub" }, `${int(hits.length)} token texts; for each, the features with the highest mean activation on it`),
    el("div", { class: "panel" }, rows.length ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "token"), el("th", { class: "num" }, "occurrences"), el("th", {}, "top features (mean activation)"))),
      el("tbody", {}, rows)) : el("div", { class: "muted" }, "No token matches.")),
  ];
}

function notFound(what) {
  return [el("h1", {}, "Not found"), el("p", {}, what, " ", el("a", { href: "#" }, "Back to the overview."))];
}

/* ---------- routing ---------- */
function route() {
  const raw = location.hash.replace(/^#/, "");
  let hash;
  try { hash = decodeURIComponent(raw); } catch (e) { hash = raw; }  // a malformed %-escape: take it as typed
  const main = document.getElementById("main");
  let view, active = null;
  if (hash.startsWith("search/")) {
    const q = hash.slice(7);
    document.getElementById("search").value = q;
    view = searchView(q);
  } else if (hash === "") {
    view = overview();
  } else {
    const [key, idx, extra] = hash.split("/");
    const g = KEYS.get(key);
    const i = idx === undefined ? null : Number(idx);
    if (g === undefined || extra !== undefined) view = notFound(`There is no page “${hash}”.`);
    else if (i === null) { view = expertView(g); active = g; }
    else if (!Number.isInteger(i) || i < 0 || i >= EXPERTS[g].width || idx === "") view = notFound(`${expertName(g)} has no feature ${idx}.`);
    else { view = featureView(g, i); active = g; }
  }
  sidebar(active);
  main.replaceChildren(...view);
  document.title = (hash ? hash + " · " : "") + "Switch SAE feature browser";
  window.scrollTo(0, 0);
}

function start() {
  if (!D) {
    document.getElementById("main").textContent = "data.js is missing or invalid: rebuild the site with `switchsae inspect`.";
    return;
  }
  const c = D.meta.config;
  document.getElementById("subtitle").textContent =
    `M = ${int(c.n_latents)} latents · ${c.n_experts} experts × ${int(c.n_latents / c.n_experts)} · k = ${c.k} · d = ${c.d_in}`;
  document.getElementById("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = document.getElementById("search").value.trim();
    if (q) location.hash = "search/" + encodeURIComponent(q);
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
