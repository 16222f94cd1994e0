// Usage and cost across tenants, from GET /admin/v1/usage (the daily
// rollup): a chart by day, a table, and the same rows as CSV.
import { h, fmtInt, withQuery, route } from './dom.js';
import { api, download } from './api.js';
import { field, input, checks, checked, table, heading, busy, select } from './ui.js';
import { stackedBars, palette } from './chart.js';

const GROUPS = ['day', 'tenant', 'key', 'model', 'deployment'];

// dim is a row's value of a group (a key by its name, else its prefix).
function dim(r, g) {
  if (g === 'key') return r.key_name || r.key_prefix || r.key_id || '(no key)';
  return r[g] || '—';
}

function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

export async function render(main, { query, settings }) {
  const today = new Date();
  const monthAgo = new Date(today.getTime() - 30 * 86400_000);
  const q = {
    start: query.get('start_date') || isoDay(monthAgo),
    end: query.get('end_date') || isoDay(today),
    groups: (query.get('group_by') || 'day,tenant,model').split(',').filter((g) => GROUPS.includes(g)),
    tenant: query.get('tenant') || '',
    split: query.get('split') || 'tenant',
    metric: query.get('metric') || 'tokens',
  };
  const start = input({ type: 'date', name: 'start_date', value: q.start, required: true });
  const end = input({ type: 'date', name: 'end_date', value: q.end, required: true });
  const tenant = input({ name: 'tenant', value: q.tenant, autocomplete: 'off' });
  const split = select([['tenant', 'tenant'], ['model', 'model'], ['deployment', 'deployment'], ['key', 'key']], q.split, { name: 'split' });
  const metric = select([['tokens', 'tokens'], ['cost', `cost (${settings.currency})`], ['requests', 'requests']], q.metric, { name: 'metric' });
  const slot = h('div');
  const form = h('form', { class: 'grid', 'aria-label': 'Usage filters' },
    field('From', start), field('To', end), field('Tenant', tenant, 'A name or id; empty: every tenant.'),
    h('div', { class: 'wide' }, checks('Group by', 'group_by', GROUPS, q.groups)),
    field('Bars split by', split), field('Chart', metric),
    h('div', { class: 'actions wide' }, h('button', { type: 'submit' }, 'Show'),
      h('button', { type: 'button', class: 'secondary', id: 'usage-csv', onclick: () => csv() }, 'Download CSV')),
    h('div', { class: 'wide' }, slot));
  const params = () => ({ start_date: start.value, end_date: end.value, group_by: checked(form, 'group_by').join(','), tenant: tenant.value.trim() });
  const csv = () => busy(form, slot, async () => {
    const p = params();
    const { blob } = await api('/usage', { params: p, accept: 'text/csv', as: 'blob' });
    download(blob, `levee-usage-${p.start_date}-${p.end_date}.csv`);
  });
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const p = params();
    location.hash = withQuery(route('usage'), { ...p, split: split.value, metric: metric.value });
  });
  const out = h('div');
  main.append(heading('Usage and cost'),
    h('p', { class: 'lede' }, 'Requests, tokens and cost by the groups chosen, from the daily rollup; days are UTC.'), form, out);

  const res = await busy(form, slot, () => api('/usage', { params: { start_date: q.start, end_date: q.end, group_by: q.groups.join(','), tenant: q.tenant } }));
  if (!res) return;
  const rows = res.data;
  const value = (r) => (q.metric === 'cost' ? Number(r.cost) : q.metric === 'requests' ? r.requests : r.total_tokens);
  const unit = q.metric === 'cost' ? settings.currency : q.metric;
  if (q.groups.includes('day')) {
    // Every day of the window, so a quiet day shows as one and a single
    // day is one narrow bar, not the whole width.
    const xs = [];
    for (let d = new Date(`${res.start_date}T00:00:00Z`); isoDay(d) <= res.end_date && xs.length < 400; d = new Date(d.getTime() + 86400_000)) {
      xs.push(isoDay(d));
    }
    for (const r of rows) if (!xs.includes(r.day)) xs.push(r.day);
    xs.sort();
    const names = [...new Set(rows.map((r) => (q.groups.includes(q.split) ? dim(r, q.split) : 'all')))].sort();
    const series = names.map((n, i) => ({ name: n, color: palette[i % palette.length], values: xs.map(() => 0) }));
    for (const r of rows) {
      const ser = series[names.indexOf(q.groups.includes(q.split) ? dim(r, q.split) : 'all')];
      ser.values[xs.indexOf(r.day)] += value(r);
    }
    out.append(h('figure', { class: 'card', id: 'usage-chart' },
      h('figcaption', {}, `${unit} by day, split by ${q.groups.includes(q.split) ? q.split : 'nothing (group by it to split)'}`),
      stackedBars({ xs, series }, { label: `Usage chart: ${unit} per day`, unit }),
      h('ul', { class: 'legend' }, series.map((ser) => h('li', {}, h('span', { class: 'swatch', dataset: { color: ser.color } }), ser.name)))));
    // Legend swatches take their colour through the CSSOM: the policy
    // forbids inline style attributes, not styles set by script.
    out.querySelectorAll('.swatch[data-color]').forEach((el) => { el.style.background = el.dataset.color; });
  } else {
    out.append(h('p', { class: 'notice' }, 'Group by day to see the chart.'));
  }
  const cols = q.groups.map((g) => ({ label: g, get: (r) => dim(r, g) }));
  let total = { requests: 0, errors: 0, tokens: 0, cost: 0 };
  for (const r of rows) {
    total = { requests: total.requests + r.requests, errors: total.errors + r.errors, tokens: total.tokens + r.total_tokens, cost: total.cost + Number(r.cost) };
  }
  out.append(h('p', {}, `${fmtInt(total.requests)} requests, ${fmtInt(total.errors)} errors, ${fmtInt(total.tokens)} tokens, ` +
    `${total.cost.toFixed(6)} ${res.currency} from ${res.start_date} to ${res.end_date}.`),
  table('Usage', [...cols,
    { label: 'Requests', num: true, get: (r) => fmtInt(r.requests) },
    { label: 'Errors', num: true, get: (r) => fmtInt(r.errors) },
    { label: 'Prompt tokens', num: true, get: (r) => fmtInt(r.prompt_tokens) },
    { label: 'Completion tokens', num: true, get: (r) => fmtInt(r.completion_tokens) },
    { label: 'Total tokens', num: true, get: (r) => fmtInt(r.total_tokens) },
    { label: `Cost (${res.currency})`, num: true, get: (r) => String(r.cost) },
  ], rows, 'No usage in this window.'));
}
