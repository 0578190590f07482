// The operator page: one card per stream, rendered from /api/streams and kept live by
// server-sent events (/events). Every string from a stream is set with textContent, never
// parsed as HTML. window.codecsight.latencies records, per new answer, how long after the
// watcher received it the page rendered it (ms; same machine clock).
"use strict";

window.codecsight = { latencies: [], updates: 0, cards: {} };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return digits === undefined ? value.toLocaleString("en") : value.toFixed(digits);
}

function pct(share) {
  return share === null || share === undefined ? "–" : (100 * share).toFixed(1) + " %";
}

function row(table, label, value, title) {
  const tr = el("tr");
  const name = el("td", null, label);
  if (title) name.title = title;
  tr.append(name, el("td", "num", value));
  table.append(tr);
}

function clockTime(iso) {
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toISOString().slice(11, 23) + " UTC";
}

function buildCard(id) {
  const card = el("section", "card");
  card.dataset.streamId = id;
  const parts = {
    title: el("h2"), question: el("div", "question"), settings: el("div", "muted"),
    answer: el("div", "answer"), answerTime: el("div", "answer-time"),
    thumb: el("div", "thumb"), overlay: el("img"), thumbStatus: el("span", "muted"),
    placeholder: el("div", "placeholder"),
    timeline: el("div", "timeline"), savings: el("table", "savings"),
    stages: el("table", "stages"), plot: el("div", "plot"), plotImg: el("img"),
    health: el("div", "health"), events: el("ul", "events"),
  };
  parts.overlay.alt = "latest sampled frame with the kept merge groups highlighted";
  parts.overlay.className = "overlay";
  parts.overlay.hidden = true;
  // Until a frame is drawn: a box saying why there is none (never a broken image).
  parts.thumb.append(parts.overlay, parts.placeholder, parts.thumbStatus);
  parts.plotImg.alt = "kept share and latency over the last minutes";
  parts.plotImg.hidden = true;
  parts.plot.append(parts.plotImg);
  card.append(parts.title, parts.question, parts.settings, parts.answer, parts.answerTime,
              parts.thumb, el("div", "muted", "answers (changes marked)"), parts.timeline,
              parts.savings, parts.stages, parts.plot, parts.health, parts.events);
  card.parts = parts;
  return card;
}

function render(data) {
  const id = data.stream_id;
  let card = window.codecsight.cards[id];
  if (!card) {
    card = window.codecsight.cards[id] = buildCard(id);
    document.getElementById("cards").append(card);
    const empty = document.getElementById("empty");
    if (empty) empty.remove();
  }
  if (card.version !== undefined && data.version < card.version) return;  // stale
  card.version = data.version;
  const p = card.parts;
  p.title.textContent = id;
  p.question.textContent = data.question;
  const s = data.settings || {};
  p.settings.textContent = [s.policy && "policy " + s.policy, s.refresh && "refresh " + s.refresh,
    s.analysis_fps && s.analysis_fps + " fps analysed", s.window_seconds && s.window_seconds + " s window"]
    .filter(Boolean).join(" · ");

  const latest = data.latest;
  if (latest) {
    p.answer.textContent = latest.answer === "" ? "(empty answer)" : latest.answer;
    p.answer.classList.toggle("changed", latest.changed);
    p.answerTime.textContent = "answered " + clockTime(latest.answered_at) + " · window "
      + fmt(latest.window_start_s, 1) + "–" + fmt(latest.window_end_s, 1) + " s · "
      + fmt(latest.latency_ms, 0) + " ms after capture · " + data.windows + " windows";
    if (card.answeredAt !== latest.answered_at) {
      card.answeredAt = latest.answered_at;
      window.codecsight.latencies.push({
        stream_id: id, ms: Date.now() - Date.parse(latest.answered_at),
        event_ms: data.sent_at_ms ? Date.now() - data.sent_at_ms : null });
    }
  } else {
    p.answer.textContent = "no answer yet";
  }

  const t = data.thumbnail || {};
  if (t.overlay_url) {
    if (p.overlay.getAttribute("src") !== t.overlay_url) p.overlay.src = t.overlay_url;
    p.overlay.hidden = false;
    p.placeholder.hidden = true;
    p.thumbStatus.hidden = false;
    p.thumbStatus.textContent = "stream time " + fmt(t.time_s, 2) + " s · " + t.kept_groups
      + " of " + t.grid[0] * t.grid[1] + " merge groups seen (" + pct(t.stats_kept_share)
      + ") · " + t.status;
  } else {
    p.overlay.hidden = true;
    p.placeholder.hidden = false;
    p.placeholder.textContent = "No frame yet \u2014 " + t.status;
    p.thumbStatus.hidden = true;
  }

  p.timeline.replaceChildren(...data.timeline.map((w) => {
    const span = el("span", w.changed ? "changed" : null, w.answer || "–");
    span.title = fmt(w.window_start_s, 1) + "–" + fmt(w.window_end_s, 1) + " s, answered "
      + clockTime(w.answered_at) + (w.changed ? " (answer changed)" : "");
    return span;
  }));

  const win = data.savings.window, tot = data.savings.total, derived = data.savings.derived;
  p.savings.replaceChildren();
  row(p.savings, "patches kept (this window)", fmt(win.patches_kept) + " / "
    + fmt(win.patches_total) + " · " + pct(win.patches_kept_share));
  row(p.savings, "patches kept (all windows)", fmt(tot.patches_kept) + " / "
    + fmt(tot.patches_total) + " · " + pct(tot.patches_kept_share));
  row(p.savings, "tokens prefilled vs dense full refresh", fmt(tot.tokens_prefilled) + " / "
    + fmt(tot.tokens_dense) + " · " + pct(tot.tokens_share), derived.tokens_dense);
  row(p.savings, "bytes sent vs raw RGB", fmt(tot.bytes_sent) + " / " + fmt(tot.bytes_raw_rgb)
    + " · " + pct(tot.bytes_share), derived.bytes_raw_rgb);

  const st = data.stages || {};
  p.stages.replaceChildren();
  row(p.stages, "codec_parser", fmt(st.parser_ms, 1) + " ms");
  row(p.stages, "ViT + queueing + transport", fmt(st.rest_ms, 1) + " ms", derived.rest_ms);
  row(p.stages, "LLM prefill", fmt(st.llm_prefill_ms, 1) + " ms");
  row(p.stages, "LLM decode", fmt(st.llm_decode_ms, 1) + " ms");
  row(p.stages, "request (gRPC round trip)", fmt(st.request_ms, 1) + " ms");

  if (data.plot_url && p.plotImg.getAttribute("src") !== data.plot_url) {
    p.plotImg.src = data.plot_url;
    p.plotImg.hidden = false;
  }

  const h = data.health;
  const counts = Object.entries(h.event_counts).map(([k, n]) => k + " " + n).join(", ");
  p.health.textContent = "reconnects " + h.reconnects + " · dropped windows "
    + h.dropped_windows + " (as of the last answer) · errors " + h.errors
    + (counts ? " · events: " + counts : "");
  p.health.classList.toggle("bad", h.reconnects + h.dropped_windows + h.errors
    + (h.event_counts.drop || 0) + (h.event_counts.source_lost || 0) > 0);
  p.events.replaceChildren(...h.events.slice().reverse().map((e) =>
    el("li", null, clockTime(e.at) + " " + e.kind + ": " + e.message)));
  window.codecsight.updates += 1;
}

function connect() {
  const status = document.getElementById("connection");
  const source = new EventSource("/events");
  source.addEventListener("open", () => { status.textContent = "live"; });
  source.addEventListener("error", () => { status.textContent = "reconnecting…"; });
  source.addEventListener("stream", (event) => render(JSON.parse(event.data)));
}

fetch("/api/streams").then((r) => r.json()).then((data) => {
  data.streams.forEach(render);
}).finally(connect);
