// Live capacity: polls GET /admin/v1/capacity once a second and keeps the
// last 15 minutes of samples here, in the page (not on the server): a chart
// starts when the page is opened and is kept while the tab lives.
import { h, clear, fmtInt, fmtNum, fmtDuration, sleep } from './dom.js';
import { api } from './api.js';
import { errorBox, table, heading, badge } from './ui.js';
import { capacityChart } from './chart.js';

const WINDOW = 15 * 60_000;
const POLL = 1000;
// Rates are taken over the trailing minute, as the deployments count.
const RATE_SPAN = 60_000;

const samples = new Map(); // deployment → [{t, chargedSync, chargedBackground, used, limit, reserve}]
const modelSamples = new Map(); // model → [{t, open, background}]

function keep(map, name, sample, counters) {
  let list = map.get(name) || [];
  const last = list[list.length - 1];
  // Counters that went back are another process's (a restart, or a load
  // balancer's other gateway): start again rather than draw nonsense.
  if (last && counters.some((c) => sample[c] < last[c])) list = [];
  list.push(sample);
  while (list.length && list[0].t < sample.t - WINDOW - RATE_SPAN) list.shift();
  map.set(name, list);
  return list;
}

// rate is what counter grew by per minute over the span before list[i].
function rate(list, i, counter) {
  const p = list[i];
  let j = i;
  while (j > 0 && list[j - 1].t >= p.t - RATE_SPAN) j -= 1;
  if (j === i) return 0;
  const dt = p.t - list[j].t;
  return dt > 0 ? ((p[counter] - list[j][counter]) / dt) * 60_000 : 0;
}

function points(list) {
  return list.map((p, i) => ({ t: p.t, sync: rate(list, i, 'chargedSync'), background: rate(list, i, 'chargedBackground'),
    used: p.used, limit: p.limit, reserve: p.reserve }));
}

function stat(label, value) {
  return h('div', {}, h('dt', {}, label), h('dd', {}, value));
}

// span is the chart's window: from two minutes, growing with the history
// kept, up to fifteen, so a page opened a moment ago shows its samples.
function span(list, now) {
  const first = list.length ? list[0].t : now;
  return Math.min(WINDOW, Math.max(2 * 60_000, now - first));
}

function deploymentCard(d, list, now) {
  const pts = points(list);
  const last = pts[pts.length - 1] || { sync: 0, background: 0 };
  const peakBackground = pts.reduce((m, p) => Math.max(m, p.background), 0);
  const windowMs = span(list, now);
  const label = `${d.name}: tokens per minute over the last ${Math.round(windowMs / 60_000)} minutes. Now ${fmtInt(last.sync)} sync and ` +
    `${fmtInt(last.background)} background; limit ${fmtInt(d.tpm_limit)}; ${fmtInt(d.used_tokens)} used in the sliding minute.`;
  const reserveTokens = Math.round(d.tpm_limit * d.sync_reserve);
  return h('figure', { class: 'card', dataset: { deployment: d.name, samples: String(list.length),
    syncRate: String(Math.round(last.sync)), backgroundRate: String(Math.round(last.background)),
    backgroundPeak: String(Math.round(peakBackground)), circuit: d.circuit_open ? 'open' : 'closed' } },
  h('figcaption', {}, d.name, h('span', { class: 'muted' }, `${d.kind} · ${d.model}`),
    badge(d.circuit_open ? 'open' : 'closed'), h('span', { class: 'sr-only' }, 'circuit')),
  capacityChart(pts, { now, windowMs, label }),
  h('ul', { class: 'legend', 'aria-hidden': 'true' },
    h('li', {}, h('span', { class: 'swatch sync' }), 'sync'),
    h('li', {}, h('span', { class: 'swatch background' }), 'background'),
    h('li', {}, h('span', { class: 'swatch limit' }), 'limit'),
    h('li', {}, h('span', { class: 'swatch reserve' }), 'background ceiling (limit − reserve)'),
    h('li', {}, h('span', { class: 'swatch used' }), 'sliding minute')),
  h('dl', { class: 'stats' },
    stat('Limit (TPM)', fmtInt(d.tpm_limit)),
    stat('Used, sliding minute', fmtInt(d.used_tokens)),
    stat('Headroom now', `${fmtInt(d.headroom_tokens)} tokens`),
    stat('Sync reserve', `${fmtNum(d.sync_reserve * 100, 0)} % (${fmtInt(reserveTokens)})`),
    stat('Sync, tokens/min', fmtInt(last.sync)),
    stat('Background, tokens/min', fmtInt(last.background)),
    stat('Charged since start', `${fmtInt(d.charged_sync_tokens)} sync, ${fmtInt(d.charged_background_tokens)} bg`),
    stat('Upstream 429s', fmtInt(d.upstream_429s)),
    stat('Circuit', d.circuit_open ? 'open: calls held off' : 'closed')));
}

// drain is how fast a model's open jobs (queued + running) fell over the
// last minute, net of new arrivals, in jobs per minute.
function drain(list) {
  if (list.length < 2) return null;
  const i = list.length - 1;
  let j = i;
  while (j > 0 && list[j - 1].t >= list[i].t - RATE_SPAN) j -= 1;
  const dt = list[i].t - list[j].t;
  return dt > 0 ? ((list[j].open - list[i].open) / dt) * 60_000 : null;
}

function openCell(q) {
  if (!q || (q.queued === 0 && q.running === 0)) return '—';
  return `${fmtInt(q.queued)} queued · ${fmtInt(q.running)} running`;
}

function drainText(net) {
  if (net == null) return '—';
  if (net < 0) return `growing (+${fmtNum(-net, 1)})`;
  return fmtNum(net, 1);
}

function queues(cap) {
  const prios = cap.models[0] ? cap.models[0].queues.map((q) => q.priority) : [];
  return table('Open jobs by model and priority', [
    { label: 'Model', get: (m) => m.name, rowHeader: true },
    ...prios.map((p) => ({ label: p, get: (m) => openCell(m.queues.find((q) => q.priority === p)) })),
    { label: 'Oldest queued', num: true, get: (m) => {
      const ages = m.queues.map((q) => q.oldest_age_seconds).filter((a) => a != null);
      return ages.length ? fmtDuration(Math.max(...ages)) : '—';
    } },
    { label: 'Net drain, jobs/min', num: true, get: (m) => drainText(drain(modelSamples.get(m.name) || [])) },
    { label: 'Background tokens/min', num: true, get: (m) => {
      const list = modelSamples.get(m.name) || [];
      return fmtInt(list.length > 1 ? rate(list, list.length - 1, 'background') : 0);
    } },
    { label: 'Time to empty', num: true, get: (m) => {
      const open = m.queued + m.running;
      if (open === 0) return 'empty';
      const net = drain(modelSamples.get(m.name) || []);
      return net > 0 ? fmtDuration((open / net) * 60) : '—';
    } },
  ], cap.models);
}

export async function render(main, { signal }) {
  const status = h('div');
  const cards = h('div', { class: 'cards', id: 'deployments' });
  const queue = h('div', { id: 'queues' });
  const tenants = h('div', { id: 'queue-tenants' });
  main.append(heading('Live capacity'),
    h('p', { class: 'lede' }, 'Each deployment\'s tokens per minute, sync and background, against its limit and the share kept ' +
      'for synchronous calls; polled each second, charted over the last 15 minutes from when this page was opened. ' +
      'Tokens by class are this gateway\'s own; the sliding minute is the view it shares with the fleet.'),
    status,
    h('section', { 'aria-labelledby': 'dep-title' }, h('h2', { id: 'dep-title' }, 'Deployments'), cards),
    h('section', { 'aria-labelledby': 'q-title' }, h('h2', { id: 'q-title' }, 'Queues'),
      h('p', { class: 'hint' }, 'Net drain: how fast a model\'s open jobs fell over the last minute, after new arrivals.'), queue),
    h('section', { 'aria-labelledby': 't-title' }, h('h2', { id: 't-title' }, 'Tenants with the most open work'), tenants));
  while (!signal.aborted) {
    const began = performance.now();
    try {
      const cap = await api('/capacity', { signal });
      clear(status);
      const now = cap.at;
      for (const d of cap.deployments) {
        keep(samples, d.name, { t: now, chargedSync: d.charged_sync_tokens, chargedBackground: d.charged_background_tokens,
          used: d.used_tokens, limit: d.tpm_limit, reserve: d.sync_reserve }, ['chargedSync', 'chargedBackground']);
      }
      for (const m of cap.models) {
        keep(modelSamples, m.name, { t: now, open: m.queued + m.running, background: m.charged_background_tokens }, ['background']);
      }
      cards.replaceChildren(...cap.deployments.map((d) => deploymentCard(d, samples.get(d.name), now)));
      queue.replaceChildren(queues(cap));
      tenants.replaceChildren(table('Open jobs by tenant', [
        { label: 'Tenant', get: (t) => t.tenant, rowHeader: true },
        { label: 'Queued', num: true, get: (t) => fmtInt(t.queued) },
        { label: 'Running', num: true, get: (t) => fmtInt(t.running) },
      ], cap.tenants, 'No tenant has open jobs.'));
    } catch (err) {
      if (signal.aborted || err.name === 'AbortError') break;
      status.replaceChildren(errorBox(err));
    }
    await sleep(Math.max(0, POLL - (performance.now() - began)), signal);
  }
}
