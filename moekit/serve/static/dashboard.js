// moekit serve dashboard: polls /v1/stats and draws expert utilisation per layer and the request rate.
// No dependencies; after each draw the utilisation canvas carries data-drawn="true" and
// data-bars=<number of non-zero bars> (the headless-browser test reads them).
"use strict";

const POLL_MS = 1000;
const rates = [];
let previous = null;

function heatColor(share, fair) {
  // Darker blue the further above the fair share (1 / experts) an expert sits.
  const t = Math.max(0, Math.min(1, share / (2 * fair)));
  const light = 80 - Math.round(45 * t);
  return `hsl(215, 65%, ${light}%)`;
}

function drawUtilization(canvas, layers) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px sans-serif";
  let bars = 0;
  if (!layers.length) {
    ctx.fillStyle = "#666";
    ctx.fillText("this model has no MoE layers", 10, 20);
  }
  const rowH = Math.max(24, Math.floor((H - 10) / Math.max(layers.length, 1)));
  if (canvas.height < rowH * layers.length + 10) {
    canvas.height = rowH * layers.length + 10;
    return drawUtilization(canvas, layers);
  }
  const left = 110, width = W - left - 10;
  layers.forEach((layer, i) => {
    const y0 = 5 + i * rowH, h = rowH - 8;
    ctx.fillStyle = "#222";
    ctx.fillText(layer.name, 4, y0 + h / 2 + 4);
    const E = layer.num_experts, bw = width / E;
    const peak = Math.max(...layer.utilization, 1e-9);
    const masked = new Set(layer.masked), quarantined = new Set(layer.quarantined);
    for (let e = 0; e < E; e++) {
      const share = layer.utilization[e];
      const x = left + e * bw;
      let color = heatColor(share, 1 / E);
      if (masked.has(e)) color = "#bbb";
      if (quarantined.has(e)) color = "#d33";
      const bh = masked.has(e) ? h : Math.round(h * share / peak);
      ctx.fillStyle = color;
      ctx.fillRect(x + 1, y0 + h - bh, Math.max(bw - 2, 1), bh);
      if (bw > 40) {
        ctx.fillStyle = "#222";
        ctx.fillText(`e${e} ${(100 * share).toFixed(1)}%`, x + 4, y0 + 12);
      }
      if (share > 0) bars += 1;
    }
  });
  canvas.dataset.bars = String(bars);
  canvas.dataset.drawn = bars > 0 ? "true" : "false";
}

function drawRate(canvas) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  const peak = Math.max(...rates, 1e-9);
  ctx.strokeStyle = "#3b7dd8";
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach((r, i) => {
    const x = 5 + i * (W - 10) / 59, y = H - 5 - (H - 10) * r / peak;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#222";
  ctx.fillText(`peak ${peak.toFixed(2)} req/s`, 8, 14);
}

async function poll() {
  try {
    const response = await fetch("/v1/stats", { cache: "no-store" });
    const s = await response.json();
    const now = performance.now() / 1000;
    const done = s.requests_total + s.errors_total;
    if (previous) {
      const dt = Math.max(now - previous.t, 1e-3);
      rates.push((done - previous.done) / dt);
      if (rates.length > 60) rates.shift();
      document.getElementById("tokrate").textContent = ((s.tokens_generated_total - previous.tokens) / dt).toFixed(1);
      document.getElementById("rate").textContent = rates[rates.length - 1].toFixed(2);
    }
    previous = { t: now, done: done, tokens: s.tokens_generated_total };
    document.getElementById("model").textContent = s.model;
    document.getElementById("active").textContent = s.active;
    document.getElementById("queue").textContent = s.queue_depth;
    document.getElementById("requests").textContent = s.requests_total;
    document.getElementById("quarantine").textContent = s.quarantine_events_total;
    drawUtilization(document.getElementById("utilization"), s.layers);
    drawRate(document.getElementById("rate-chart"));
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = `cannot reach the server: ${err}`;
  }
  setTimeout(poll, POLL_MS);
}

poll();
