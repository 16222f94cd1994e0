// Batches across tenants, with live progress, their output and error
// files to download, and cancel.
import { h, append, clear, route, withQuery, fmtInt, fmtTime, sleep } from './dom.js';
import { api, download } from './api.js';
import { errorBox, field, input, select, table, facts, heading, busy, badge, announce, confirmDialog, follow } from './ui.js';
import { metadataTable } from './jobs.js';

const STATUSES = ['validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', 'cancelling', 'cancelled'];
const OPEN = new Set(['validating', 'in_progress', 'finalizing', 'cancelling']);

function progress(b) {
  const c = b.request_counts;
  const done = c.completed + c.failed;
  return h('div', { class: 'progress' },
    h('progress', { max: Math.max(c.total, 1), value: done, 'aria-label': `Progress of ${b.id}` }),
    h('span', { class: 'hint' }, `${fmtInt(c.completed)} completed, ${fmtInt(c.failed)} failed of ${fmtInt(c.total)}`));
}

export async function list(main, { query, signal }) {
  const slot = h('div');
  const tenant = input({ name: 'tenant', value: query.get('tenant') || '', autocomplete: 'off' });
  const status = select([['', 'any'], ...STATUSES], query.get('status') || '', { name: 'status' });
  const filter = h('form', { class: 'grid', 'aria-label': 'Filter batches' },
    field('Tenant', tenant, 'A name or id; empty: every tenant.'), field('Status', status),
    h('div', {}, h('button', { type: 'submit' }, 'Filter')), h('div', { class: 'wide' }, slot));
  filter.addEventListener('submit', (ev) => {
    ev.preventDefault();
    location.hash = withQuery(route('batches'), { tenant: tenant.value.trim(), status: status.value });
  });
  const listing = h('div');
  main.append(heading('Batches'), h('p', { class: 'lede' }, 'Batches of every tenant, newest first; open ones update every two seconds.'),
    filter, listing);
  // The first page, read again while any batch on it is open.
  for (;;) {
    const page = await busy(filter, slot, () => api('/batches', { signal, params: { limit: 50, tenant: query.get('tenant'), status: query.get('status') } }));
    if (!page) return;
    listing.replaceChildren(table('Batches, newest first', [
      { label: 'Batch', get: (b) => h('a', { href: route('batches', b.id), class: 'mono' }, b.id), rowHeader: true },
      { label: 'Tenant', get: (b) => b.tenant },
      { label: 'Status', get: (b) => badge(b.status) },
      { label: 'Progress', get: progress },
      { label: 'Endpoint', get: (b) => b.endpoint },
      { label: 'Created', get: (b) => fmtTime(b.created_at) },
    ], page.data, 'No batches match.'));
    if (!page.data.some((b) => OPEN.has(b.status))) return;
    await sleep(2000, signal);
    if (signal.aborted) return;
  }
}

async function fetchFile(fileID, slot) {
  try {
    const meta = await api(`/files/${encodeURIComponent(fileID)}`);
    const { blob } = await api(`/files/${encodeURIComponent(fileID)}/content`, { as: 'blob', accept: 'application/jsonl' });
    download(blob, meta.filename);
    announce(`Downloaded ${meta.filename}.`);
  } catch (err) {
    slot.replaceChildren(errorBox(err));
  }
}

export async function detail(main, { params, signal }) {
  const [id] = params;
  const slot = h('div');
  const view = h('div');
  main.append(heading(`Batch ${id}`), h('p', {}, h('a', { href: route('batches') }, '← All batches')), slot, view);
  await follow(`/batches/${encodeURIComponent(id)}`, { slot, signal, isOpen: (x) => OPEN.has(x.status), draw: (x) => draw(view, x, slot) });
}

function draw(view, b, slot) {
  const cancel = b.status === 'validating' || b.status === 'in_progress' ? h('button', { type: 'button', class: 'danger', id: 'cancel-batch', onclick: async () => {
    if (!(await confirmDialog('Cancel this batch?', `Unstarted lines of ${b.id} are cancelled at once; running ones finish.`, 'Cancel batch'))) return;
    try {
      draw(view, await api(`/batches/${encodeURIComponent(b.id)}/cancel`, { method: 'POST' }), slot);
      announce('Batch cancelling.');
    } catch (err) { slot.replaceChildren(errorBox(err)); }
  } }, 'Cancel batch') : null;
  const files = h('div', { class: 'actions' },
    b.output_file_id ? h('button', { type: 'button', class: 'secondary', id: 'download-output', onclick: () => fetchFile(b.output_file_id, slot) }, 'Download output') : null,
    b.error_file_id ? h('button', { type: 'button', class: 'secondary', id: 'download-errors', onclick: () => fetchFile(b.error_file_id, slot) }, 'Download errors') : null,
    h('button', { type: 'button', class: 'secondary', onclick: () => fetchFile(b.input_file_id, slot) }, 'Download input'));
  const errs = (b.errors && b.errors.data) || [];
  // append skips what is absent (a null would otherwise show as text).
  append(clear(view), [
    h('div', { class: 'actions' }, badge(b.status), cancel),
    progress(b),
    facts([
      ['Tenant', h('a', { href: route('tenants', b.tenant || b.tenant_id) }, b.tenant || b.tenant_id)],
      ['Endpoint', b.endpoint],
      ['Created', fmtTime(b.created_at)],
      ['In progress', fmtTime(b.in_progress_at)],
      ['Finalizing', fmtTime(b.finalizing_at)],
      ['Completed', fmtTime(b.completed_at)],
      ['Expires', fmtTime(b.expires_at)],
      ['Usage', b.usage ? `${fmtInt(b.usage.total_tokens)} tokens, cost ${b.usage.cost}` : null],
      ['Lines', h('a', { href: withQuery(route('jobs'), { batch: b.id }) }, 'The jobs its lines became')],
    ]),
    files,
    metadataTable(b.metadata, 'Metadata'),
    errs.length ? table('Validation errors', [
      { label: 'Line', num: true, get: (e) => (e.line == null ? '—' : fmtInt(e.line)) },
      { label: 'Code', get: (e) => e.code },
      { label: 'Message', get: (e) => e.message },
    ], errs) : null]);
}
