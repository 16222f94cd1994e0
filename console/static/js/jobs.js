// Jobs across tenants: find one by id or filter, see its call, attempts,
// deployment, usage and result; cancel it.
import { h, append, clear, route, withQuery, fmtInt, fmtTime, sleep } from './dom.js';
import { api } from './api.js';
import { errorBox, field, input, select, table, facts, heading, busy, badge, announce, confirmDialog, follow } from './ui.js';

const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];

function pretty(raw) {
  return typeof raw === 'string' ? raw : JSON.stringify(raw, null, 2);
}

function metadataTable(meta, caption) {
  const rows = Object.entries(meta || {});
  return table(caption, [
    { label: 'Key', get: (r) => r[0], rowHeader: true },
    { label: 'Value', get: (r) => r[1] },
  ], rows, 'No metadata.');
}

export async function list(main, { query, settings, signal }) {
  const slot = h('div');
  const find = input({ name: 'id', placeholder: 'job_…', autocomplete: 'off', spellcheck: 'false' });
  const findForm = h('form', { class: 'grid', 'aria-label': 'Find a job by id' },
    field('Job id', find), h('div', {}, h('button', { type: 'submit' }, 'Find job')));
  findForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const id = find.value.trim();
    if (id) location.hash = route('jobs', id);
  });
  const tenant = input({ name: 'tenant', value: query.get('tenant') || '', autocomplete: 'off' });
  const status = select([['', 'any'], ...STATUSES], query.get('status') || '', { name: 'status' });
  const prio = select([['', 'any'], ...settings.job_priorities], query.get('priority') || '', { name: 'priority' });
  const model = select([['', 'any'], ...settings.models], query.get('model') || '', { name: 'model' });
  const filter = h('form', { class: 'grid', 'aria-label': 'Filter jobs' },
    field('Tenant', tenant, 'A name or id; empty: every tenant.'), field('Status', status), field('Priority', prio), field('Model', model),
    h('div', {}, h('button', { type: 'submit' }, 'Filter')), h('div', { class: 'wide' }, slot));
  filter.addEventListener('submit', (ev) => {
    ev.preventDefault();
    location.hash = withQuery(route('jobs'), { tenant: tenant.value.trim(), status: status.value, priority: prio.value, model: model.value,
      batch: query.get('batch') });
  });
  const listing = h('div');
  const more = h('div', { class: 'actions' });
  const batch = query.get('batch');
  main.append(heading(batch ? `Lines of ${batch}` : 'Jobs'),
    h('p', { class: 'lede' }, batch ? 'The jobs this batch\'s lines became, newest first.'
      : 'Jobs of every tenant, newest first (a batch\'s lines are listed from the batch).'),
    findForm, filter, listing, more);
  const rows = [];
  const load = async (after) => {
    const page = await busy(filter, slot, () => api('/jobs', { signal, params: { limit: 50, after, tenant: query.get('tenant'), status: query.get('status'),
      priority: query.get('priority'), model: query.get('model'), batch } }));
    if (!page) return;
    rows.push(...page.data);
    listing.replaceChildren(table('Jobs, newest first', [
      { label: 'Job', get: (j) => h('a', { href: route('jobs', j.id), class: 'mono' }, j.id), rowHeader: true },
      { label: 'Tenant', get: (j) => j.tenant },
      { label: 'Status', get: (j) => badge(j.status) },
      { label: 'Priority', get: (j) => j.priority },
      { label: 'Model', get: (j) => j.model },
      { label: 'Attempts', num: true, get: (j) => fmtInt(j.attempts) },
      { label: 'Deployment', get: (j) => j.deployment || '—' },
      { label: 'Created', get: (j) => fmtTime(j.created_at) },
      { label: 'Tokens', num: true, get: (j) => (j.usage ? fmtInt(j.usage.total_tokens) : '—') },
    ], rows, 'No jobs match.'));
    more.replaceChildren();
    if (page.has_more) more.append(h('button', { type: 'button', class: 'secondary', onclick: () => load(page.last_id) }, 'More jobs'));
  };
  await load('');
}

const OPEN = new Set(['queued', 'running']);

export async function detail(main, { params, signal }) {
  const [id] = params;
  const slot = h('div');
  const view = h('div');
  main.append(heading(`Job ${id}`), h('p', {}, h('a', { href: route('jobs') }, '← All jobs')), slot, view);
  // Open jobs are read again every two seconds until they end.
  await follow(`/jobs/${encodeURIComponent(id)}`, { slot, signal, isOpen: (x) => OPEN.has(x.status), draw: (x) => draw(view, x, slot) });
}

function draw(view, j, slot) {
  const cancel = OPEN.has(j.status) ? h('button', { type: 'button', class: 'danger', id: 'cancel-job', onclick: async () => {
    if (!(await confirmDialog('Cancel this job?', `Job ${j.id} of ${j.tenant} will not be sent (or its call is stopped if running).`, 'Cancel job'))) return;
    try {
      const after = await api(`/jobs/${encodeURIComponent(j.id)}/cancel`, { method: 'POST' });
      announce(`Job ${after.status}.`);
      draw(view, after, slot);
    } catch (err) { slot.replaceChildren(errorBox(err)); }
  } }, 'Cancel job') : null;
  const usage = j.usage ? `${fmtInt(j.usage.prompt_tokens)} prompt + ${fmtInt(j.usage.completion_tokens)} completion = ` +
    `${fmtInt(j.usage.total_tokens)} tokens, cost ${j.usage.cost}` : '—';
  // append skips what is absent (a null would otherwise show as text).
  append(clear(view), [
    h('div', { class: 'actions' }, badge(j.status), cancel),
    facts([
      ['Tenant', h('a', { href: route('tenants', j.tenant || j.tenant_id) }, j.tenant || j.tenant_id)],
      ['Key', j.key_id ? h('span', { class: 'mono' }, j.key_id) : null],
      ['Status', j.status],
      ['Priority', j.priority],
      ['Endpoint', j.endpoint],
      ['Model', j.model],
      ['Attempts', fmtInt(j.attempts)],
      ['Deployment', j.deployment],
      ['Created', fmtTime(j.created_at)],
      ['Started', fmtTime(j.started_at)],
      ['Ended', fmtTime(j.completed_at)],
      ['Lease until', j.lease_until ? fmtTime(j.lease_until) : null],
      ['Usage', usage],
      ['Batch', j.batch_id ? h('a', { href: route('batches', j.batch_id) }, j.batch_id) : null],
      ['Webhook', j.webhook ? j.webhook.url : null],
    ]),
    metadataTable(j.metadata, 'Metadata'),
    h('h2', {}, 'Request body'), h('pre', { id: 'job-body' }, pretty(j.body)),
    j.result ? [h('h2', {}, `Result: ${j.result.status_code}`), h('pre', { id: 'job-result' }, pretty(j.result.body))] : null,
    j.error ? [h('h2', {}, 'Error'), facts([['Code', j.error.code], ['Message', j.error.message]])] : null]);
}

export { metadataTable };
