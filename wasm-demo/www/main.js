// The page: reads the controls, ticks the Rust demo once per animation frame (the demo reads
// performance.now() itself), and draws what the two lanes report.
import init, { WebDemo } from "./pkg/wasm_demo.js";

const LANES = [
  { index: 0, key: "fabric", color: "#38d3b4" },
  { index: 1, key: "baseline", color: "#f5a14a" },
];
const LINK_COLOR = "#7d8ea3";

const $ = (id) => document.getElementById(id);
const controls = {
  loss: { el: $("loss"), show: (v) => `${v} %` },
  delay: { el: $("delay"), show: (v) => `${v} ms (RTT ${2 * v} ms)` },
  jitter: { el: $("jitter"), show: (v) => `${v} ms` },
  bandwidth: { el: $("bandwidth"), show: (v) => `${v} Mbit/s` },
  streams: { el: $("streams"), show: (v) => `${v}` },
  speed: { el: $("speed"), show: (v) => `${v}×` },
};
const startButton = $("start");

// Presets from the address, e.g. index.html?loss=10&streams=4&size=256&start
const query = new URLSearchParams(location.search);
for (const name of [...Object.keys(controls), "size", "seed"]) {
  if (query.has(name)) $(name).value = query.get(name);
}

function settings() {
  return {
    loss: Number($("loss").value),
    delay: Number($("delay").value),
    jitter: Number($("jitter").value),
    bandwidth: Number($("bandwidth").value),
    streams: Number($("streams").value),
    size: Number($("size").value),
    seed: Number($("seed").value) >>> 0,
    speed: Number($("speed").value),
  };
}

function showControls() {
  for (const { el, show } of Object.values(controls)) {
    $(`${el.id}-out`).textContent = show(el.value);
  }
}

const fmt = {
  bytes(n) {
    if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(n >= 10 << 20 ? 0 : 1)} MiB`;
    if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(0)} KiB`;
    return `${n} B`;
  },
  secs: (s) => `${s.toFixed(s < 10 ? 2 : 1)} s`,
  mbit: (m) => `${m.toFixed(m < 10 ? 2 : 1)} Mbit/s`,
};

// ---- charts ---------------------------------------------------------------------------

/** A line chart on a canvas, redrawn from scratch each frame (a few hundred points). */
class Chart {
  constructor(canvas, { unit, floor = 1 }) {
    this.canvas = canvas;
    this.unit = unit;
    this.floor = floor;
  }

  draw(series, horizon, extra = []) {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (c.width !== Math.round(w * ratio) || c.height !== Math.round(h * ratio)) {
      c.width = Math.round(w * ratio);
      c.height = Math.round(h * ratio);
    }
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const pad = { l: 44, r: 10, t: 10, b: 22 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    let top = this.floor;
    for (const s of series) for (const [, y] of s.points) top = Math.max(top, y);
    for (const e of extra) top = Math.max(top, e.value);
    top = niceCeil(top * 1.08);
    const x = (t) => pad.l + (t / horizon) * pw;
    const y = (v) => pad.t + ph - (v / top) * ph;

    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#8796a8";
    g.strokeStyle = "#263140";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const v = (top / 4) * i;
      const yy = Math.round(y(v)) + 0.5;
      g.beginPath();
      g.moveTo(pad.l, yy);
      g.lineTo(w - pad.r, yy);
      g.stroke();
      g.textAlign = "right";
      g.fillText(short(v), pad.l - 6, yy + 4);
    }
    const step = niceCeil(horizon / 6);
    g.textAlign = "center";
    for (let t = 0; t <= horizon + 1e-9; t += step) {
      g.fillText(`${short(t)}s`, x(t), h - 6);
    }
    for (const e of extra) {
      g.strokeStyle = LINK_COLOR;
      g.setLineDash([5, 4]);
      g.beginPath();
      g.moveTo(pad.l, y(e.value));
      g.lineTo(w - pad.r, y(e.value));
      g.stroke();
      g.setLineDash([]);
    }
    g.lineWidth = 2;
    g.lineJoin = "round";
    for (const s of series) {
      if (s.points.length === 0) continue;
      g.strokeStyle = s.color;
      g.beginPath();
      s.points.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
      g.stroke();
    }
  }
}

function niceCeil(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function short(v) {
  if (v >= 1000) return `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k`;
  return Number.isInteger(v) ? `${v}` : v.toFixed(v < 1 ? 2 : 1);
}

const charts = {
  goodput: new Chart($("chart-goodput"), { unit: "Mbit/s" }),
  rtt: new Chart($("chart-rtt"), { unit: "ms", floor: 10 }),
  retx: new Chart($("chart-retx"), { unit: "/s" }),
};

// ---- lanes ----------------------------------------------------------------------------

let demo;
let fields;
/** Per lane: samples received so far ([t, delivered, goodput, rtt, retx, retx/s]). */
let history = [[], []];
let digestsShown = [false, false];
let linkRate = 0;
let lastLag = -Infinity;

function laneEl(lane) {
  return $(`lane-${lane.key}`);
}

function role(root, name) {
  return root.querySelector(`[data-role="${name}"]`);
}

function resetLanes(streams) {
  history = [[], []];
  digestsShown = [false, false];
  for (const lane of LANES) {
    const root = laneEl(lane);
    const box = role(root, "streams");
    box.replaceChildren();
    for (let i = 0; i < streams; i++) {
      const row = document.createElement("div");
      row.className = "stream";
      row.innerHTML = `<span>${i + 1}</span><div class="bar"><i></i></div>`;
      box.append(row);
    }
    const verdict = role(root, "verdict");
    verdict.dataset.verdict = "pending";
    verdict.textContent = "";
    $(`digests-${lane.key}`).tBodies[0].replaceChildren();
  }
}

function updateLane(lane) {
  const root = laneEl(lane);
  const view = demo.lane(lane.index);
  if (!view) return;
  const text = demo.status_text(lane.index);
  const status = view.failed ? "failed" : view.complete ? (view.verified ? "complete" : "mismatch") : "running";
  root.dataset.status = status;
  role(root, "status").textContent = text;

  const samples = demo.samples(lane.index, history[lane.index].length);
  for (let i = 0; i < samples.length; i += fields) {
    history[lane.index].push(Array.from(samples.subarray(i, i + fields)));
  }
  const last = history[lane.index].at(-1);
  const pct = view.total ? (100 * view.delivered) / view.total : 0;
  role(root, "done").textContent = `${pct.toFixed(pct < 100 ? 1 : 0)} %`;
  role(root, "elapsed").textContent = fmt.secs(view.elapsed_s);
  role(root, "goodput").textContent = view.complete
    ? `${fmt.mbit((view.total * 8) / 1e6 / Math.max(view.elapsed_s, 1e-3))} avg`
    : last ? fmt.mbit(last[2]) : "–";
  role(root, "rtt").textContent = view.rtt_ms ? `${view.rtt_ms.toFixed(0)} ms` : "–";
  role(root, "retx").textContent = `${view.retransmits}`;
  role(root, "lost").textContent = `${view.link_lost} / ${view.link_sent}`;

  const bars = role(root, "streams").children;
  demo.progress(lane.index).forEach((p, i) => {
    if (!bars[i]) return;
    bars[i].querySelector("i").style.width = `${(100 * p).toFixed(1)}%`;
    bars[i].classList.toggle("done", p >= 1);
  });

  if (view.complete && !digestsShown[lane.index]) {
    digestsShown[lane.index] = true;
    showDigests(lane, view);
  } else if (view.failed) {
    const verdict = role(root, "verdict");
    verdict.dataset.verdict = "mismatch";
    verdict.textContent = text;
  }
}

function showDigests(lane, view) {
  const digests = JSON.parse(demo.digests(lane.index));
  const body = $(`digests-${lane.key}`).tBodies[0];
  let matching = 0;
  body.replaceChildren(
    ...digests.map((d, i) => {
      const ok = d.received === d.sent;
      matching += ok;
      const tr = document.createElement("tr");
      tr.innerHTML =
        `<td>${i + 1}</td><td><code data-role="sent">${d.sent.slice(0, 16)}…</code></td>` +
        `<td><code data-role="received">${(d.received || "–").slice(0, 16)}…</code></td>` +
        `<td class="${ok ? "ok" : "bad"}">${ok ? "✓" : "✗"}</td>`;
      tr.dataset.sent = d.sent;
      tr.dataset.received = d.received;
      return tr;
    }),
  );
  const verdict = role(laneEl(lane), "verdict");
  const all = matching === digests.length && view.verified;
  verdict.dataset.verdict = all ? "match" : "mismatch";
  verdict.textContent = all
    ? `✓ ${fmt.bytes(view.total)} in ${fmt.secs(view.elapsed_s)}: all ${digests.length} SHA-256 checksums match`
    : `✗ ${digests.length - matching} of ${digests.length} checksums differ`;
}

function showSummary() {
  const [f, b] = LANES.map((lane) => demo.lane(lane.index));
  const el = $("summary");
  if (!f.complete) {
    el.textContent = "";
  } else if (!b.complete) {
    const pct = (100 * b.delivered) / b.total;
    el.innerHTML = `The fabric moved ${fmt.bytes(f.total)} in <b>${fmt.secs(f.elapsed_s)}</b>; ` +
      `the TCP-like baseline has ${pct.toFixed(0)} % after ${fmt.secs(b.elapsed_s)}.`;
  } else {
    const ratio = b.elapsed_s / Math.max(f.elapsed_s, 1e-3);
    el.innerHTML = `The fabric moved ${fmt.bytes(f.total)} in <b>${fmt.secs(f.elapsed_s)}</b>, ` +
      `the TCP-like baseline in ${fmt.secs(b.elapsed_s)}: ` +
      (ratio >= 1 ? `<b>${ratio.toFixed(1)}× faster</b>.` : `${(1 / ratio).toFixed(1)}× slower.`);
  }
}

function drawCharts() {
  const tMax = Math.max(5, ...history.map((h) => h.at(-1)?.[0] ?? 0));
  const horizon = Math.ceil(tMax / 5) * 5;
  const series = (col) =>
    LANES.map((lane) => ({ color: lane.color, points: history[lane.index].map((s) => [s[0], s[col]]) }));
  charts.goodput.draw(series(2), horizon, [{ value: linkRate }]);
  charts.rtt.draw(
    LANES.map((lane) => ({
      color: lane.color,
      points: history[lane.index].filter((s) => s[3] > 0).map((s) => [s[0], s[3]]),
    })),
    horizon,
  );
  charts.retx.draw(series(5), horizon);
}

// ---- wiring ---------------------------------------------------------------------------

function configure() {
  const s = settings();
  demo.configure(s.loss, s.delay, s.jitter, s.bandwidth, s.streams, s.size, s.seed, s.speed);
  linkRate = s.bandwidth;
}

function start() {
  configure();
  resetLanes(settings().streams);
  demo.start();
  startButton.textContent = "Restart";
  document.body.dataset.started = "true";
}

function frame() {
  demo.tick();
  const clock = $("clock");
  if (demo.lane(0)) {
    for (const lane of LANES) updateLane(lane);
    showSummary();
    drawCharts();
    // Held for a second: a lane that lags every few frames should not make the notice blink.
    if (demo.lagging()) lastLag = performance.now();
    const lagging = demo.running() && performance.now() - lastLag < 1000;
    clock.textContent = demo.running()
      ? lagging ? "this machine cannot keep up: the simulation runs slower than the clock" : ""
      : "both lanes finished";
    clock.classList.toggle("lagging", lagging);
  }
  requestAnimationFrame(frame);
}

async function main() {
  showControls();
  await init();
  demo = new WebDemo();
  fields = WebDemo.sample_fields();
  for (const { el } of Object.values(controls)) {
    el.addEventListener("input", () => {
      showControls();
      configure();
    });
  }
  startButton.addEventListener("click", start);
  startButton.disabled = false;
  startButton.textContent = "Start transfer";
  document.body.dataset.ready = "true";
  drawCharts();
  if (query.has("start")) start();
  requestAnimationFrame(frame);
}

main().catch((e) => {
  document.body.dataset.error = String(e);
  startButton.textContent = "Failed to load";
  console.error(e);
});
