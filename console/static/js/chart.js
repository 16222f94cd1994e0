// Hand-drawn SVG charts. Each has role="img" and a label; the page beside
// it gives the same numbers as text.
import { s, fmtInt } from './dom.js';

const W = 600;
const H = 220;
const PAD = { l: 56, r: 10, t: 10, b: 26 };

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (m * p >= v) return m * p;
  }
  return 10 * p;
}

function short(n) {
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
  return String(Math.round(n));
}

// capacityChart draws tokens per minute over the window ending at now
// (windowMs, at most 15 minutes):
// sync and background stacked, the limit, the ceiling background work
// may reach (limit less the sync reserve) and the sliding minute's use.
// points: [{t, sync, background, used, limit, reserve}], t in ms.
export function capacityChart(points, { now, windowMs, label }) {
  const iw = W - PAD.l - PAD.r;
  const ih = H - PAD.t - PAD.b;
  let top = 0;
  for (const p of points) top = Math.max(top, p.limit, p.sync + p.background, p.used);
  top = niceMax(top * 1.05);
  const x = (t) => PAD.l + ((t - (now - windowMs)) / windowMs) * iw;
  const y = (v) => PAD.t + ih - (Math.max(0, v) / top) * ih;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label, preserveAspectRatio: 'xMidYMid meet' });
  for (const f of [0, 0.5, 1]) {
    const v = top * f;
    svg.append(s('line', { class: 'grid', x1: PAD.l, x2: W - PAD.r, y1: y(v), y2: y(v) }),
      s('text', { x: PAD.l - 6, y: y(v) + 4, 'text-anchor': 'end' }, short(v)));
  }
  const mins = windowMs / 60_000;
  const step = mins > 6 ? 5 : 1;
  for (let min = 0; min <= mins + 1e-9; min += step) {
    const t = now - min * 60_000;
    const anchor = min === 0 ? 'end' : min + step > mins ? 'start' : 'middle';
    svg.append(s('text', { x: x(t), y: H - 8, 'text-anchor': anchor }, min === 0 ? 'now' : `−${min} min`));
  }
  const vis = points.filter((p) => p.t >= now - windowMs);
  if (vis.length >= 2) {
    const area = (lo, hi, cls) => {
      let d = `M${x(vis[0].t)},${y(hi(vis[0]))}`;
      for (const p of vis.slice(1)) d += ` L${x(p.t)},${y(hi(p))}`;
      for (const p of [...vis].reverse()) d += ` L${x(p.t)},${y(lo(p))}`;
      return s('path', { class: cls, d: `${d} Z`, 'data-series': cls });
    };
    const line = (get, cls) => {
      let d = '';
      vis.forEach((p, i) => { d += `${i ? ' L' : 'M'}${x(p.t)},${y(get(p))}`; });
      return s('path', { class: cls, d, 'data-series': cls });
    };
    svg.append(
      area(() => 0, (p) => p.sync, 'sync'),
      area((p) => p.sync, (p) => p.sync + p.background, 'background'),
      line((p) => p.limit, 'limit'),
      line((p) => p.limit * (1 - p.reserve), 'reserve'),
      line((p) => p.used, 'used'));
  }
  return svg;
}

// stackedBars draws one bar per x value, stacked by series.
// data: {xs: [..], series: [{name, color, values: [..]}]}.
export function stackedBars(data, { label, unit }) {
  const iw = W - PAD.l - PAD.r;
  const ih = H - PAD.t - PAD.b;
  const totals = data.xs.map((_, i) => data.series.reduce((a, ser) => a + (ser.values[i] || 0), 0));
  const top = niceMax(Math.max(0, ...totals) * 1.05);
  const y = (v) => PAD.t + ih - (v / top) * ih;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label, preserveAspectRatio: 'xMidYMid meet' });
  for (const f of [0, 0.5, 1]) {
    svg.append(s('line', { class: 'grid', x1: PAD.l, x2: W - PAD.r, y1: y(top * f), y2: y(top * f) }),
      s('text', { x: PAD.l - 6, y: y(top * f) + 4, 'text-anchor': 'end' }, short(top * f)));
  }
  const n = Math.max(1, data.xs.length);
  const bw = iw / n;
  const every = Math.ceil(n / 8);
  data.xs.forEach((xv, i) => {
    let acc = 0;
    const x0 = PAD.l + i * bw + bw * 0.1;
    for (const ser of data.series) {
      const v = ser.values[i] || 0;
      if (v <= 0) continue;
      const rect = s('rect', { class: 'bar', x: x0, width: Math.max(1, bw * 0.8), y: y(acc + v), height: y(acc) - y(acc + v), fill: ser.color });
      rect.append(s('title', {}, `${xv} · ${ser.name}: ${fmtInt(v)} ${unit}`));
      svg.append(rect);
      acc += v;
    }
    if (i % every === 0) {
      svg.append(s('text', { x: x0 + bw * 0.4, y: H - 8, 'text-anchor': 'middle' }, String(xv).slice(5)));
    }
  });
  return svg;
}

// palette: distinguishable colours, dark enough for white edges.
export const palette = ['#1f5fbf', '#b85600', '#0f766e', '#6b21a8', '#a4161a', '#4d7c0f', '#9d174d', '#334155', '#0369a1', '#854d0e'];
