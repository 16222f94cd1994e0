// Tenants and keys: list and create tenants; a tenant's default priority,
// limits and budget (with this period's spend); its keys: create (the
// secret shown once), scope, limits and budget, rotate, revoke.
import { h, clear, route, fmtInt, fmtTime, fmtDuration, fmtNum } from './dom.js';
import { api } from './api.js';
import { errorBox, field, input, select, checks, checked, table, facts, heading, busy, badge, announce,
  confirmDialog, secretDialog } from './ui.js';

function limitsText(ls) {
  if (!ls || ls.length === 0) return 'none';
  return ls.map((l) => {
    const parts = [];
    if (l.tpm) parts.push(`${fmtInt(l.tpm)} TPM`);
    if (l.rpm) parts.push(`${fmtInt(l.rpm)} RPM`);
    if (l.concurrency) parts.push(`${fmtInt(l.concurrency)} in flight`);
    return `${l.model || 'every model'}: ${parts.join(', ')}`;
  }).join('; ');
}

function budgetText(b) {
  if (!b) return 'none';
  const parts = [];
  if (b.amount) parts.push(`${b.amount} ${b.currency}`);
  if (b.tokens) parts.push(`${fmtInt(b.tokens)} tokens`);
  return `${parts.join(' and ')} per ${b.period}`;
}

export async function list(main, { signal, settings }) {
  const slot = h('div');
  const name = input({ name: 'name', required: true, maxlength: 64, autocomplete: 'off' });
  const prio = select(settings.priorities, 'high', { name: 'default_priority' });
  const form = h('form', { class: 'grid', 'aria-labelledby': 'new-tenant' },
    h('h2', { id: 'new-tenant', class: 'wide' }, 'New tenant'),
    field('Name', name, 'Letters, digits, ".", "_" or "-"; 1 to 64.'),
    field('Default priority', prio),
    h('div', {}, h('button', { type: 'submit' }, 'Create tenant')),
    h('div', { class: 'wide' }, slot));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = await busy(form, slot, () => api('/tenants', { method: 'POST', body: { name: name.value, default_priority: prio.value } }));
    if (t) {
      announce(`Tenant ${t.name} created.`);
      location.hash = route('tenants', t.name);
    }
  });
  const listing = h('div');
  const more = h('div', { class: 'actions' });
  main.append(heading('Tenants and keys'), form, h('h2', {}, 'Tenants'), listing, more);
  const rows = [];
  const load = async (after) => {
    const page = await api('/tenants', { params: { limit: 50, after }, signal });
    rows.push(...page.data);
    listing.replaceChildren(table('Tenants, by name', [
      { label: 'Name', get: (t) => h('a', { href: route('tenants', t.name) }, t.name), rowHeader: true },
      { label: 'Default priority', get: (t) => t.default_priority },
      { label: 'Limits', get: (t) => limitsText(t.limits) },
      { label: 'Budget', get: (t) => budgetText(t.budget) },
      { label: 'Created', get: (t) => fmtTime(t.created_at) },
    ], rows, 'No tenants yet.'));
    more.replaceChildren();
    if (page.has_more) {
      more.append(h('button', { type: 'button', class: 'secondary', onclick: () => load(page.last_id).catch((e) => more.append(errorBox(e))) }, 'More tenants'));
    }
  };
  await load('');
}

// limitsEditor edits a scope's limits: one row per model (or every model);
// a row removed is sent as zeros, which removes it.
function limitsEditor(settings, current, save) {
  const slot = h('div');
  const body = h('tbody');
  const models = [['', 'every model'], ...settings.models.map((m) => [m, m])];
  const addRow = (l) => {
    const tr = h('tr', {},
      h('td', {}, select(models, l.model || '', { 'aria-label': 'Model', name: 'model' })),
      h('td', {}, input({ type: 'number', min: 0, step: 1, value: l.tpm || '', 'aria-label': 'Tokens per minute', name: 'tpm', inputmode: 'numeric' })),
      h('td', {}, input({ type: 'number', min: 0, step: 1, value: l.rpm || '', 'aria-label': 'Requests per minute', name: 'rpm', inputmode: 'numeric' })),
      h('td', {}, input({ type: 'number', min: 0, step: 1, value: l.concurrency || '', 'aria-label': 'Calls in flight', name: 'concurrency', inputmode: 'numeric' })),
      h('td', {}, h('button', { type: 'button', class: 'link', onclick: () => tr.remove() }, 'Remove')));
    body.append(tr);
  };
  (current || []).forEach(addRow);
  const form = h('form', {},
    h('div', { class: 'scroll', role: 'region', 'aria-label': 'Limits', tabindex: 0 },
      h('table', {}, h('caption', {}, 'Limits (empty or 0: no limit)'),
        h('thead', {}, h('tr', {}, ['Model', 'Tokens/min', 'Requests/min', 'In flight', ''].map((l) => h('th', { scope: 'col' }, l)))),
        body)),
    h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'secondary', onclick: () => addRow({}) }, 'Add a limit'),
      h('button', { type: 'submit' }, 'Save limits')),
    slot);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const rows = [...body.querySelectorAll('tr')].map((tr) => ({
      model: tr.querySelector('[name=model]').value,
      tpm: Number(tr.querySelector('[name=tpm]').value || 0),
      rpm: Number(tr.querySelector('[name=rpm]').value || 0),
      concurrency: Number(tr.querySelector('[name=concurrency]').value || 0),
    }));
    const seen = new Set(rows.map((r) => r.model));
    for (const l of current || []) {
      if (!seen.has(l.model || '')) rows.push({ model: l.model || '', tpm: 0, rpm: 0, concurrency: 0 });
    }
    if (await busy(form, slot, () => save({ limits: rows }))) announce('Limits saved.');
  });
  return form;
}

function toLocalInput(unix) {
  if (!unix) return '';
  const d = new Date(unix * 1000);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function fromLocalInput(v) {
  return v ? Math.floor(new Date(v).getTime() / 1000) : null;
}

// budgetEditor edits a scope's budget, or removes it.
function budgetEditor(settings, b, save) {
  const slot = h('div');
  const amount = input({ name: 'amount', inputmode: 'decimal', value: b?.amount || '', autocomplete: 'off' });
  const tokens = input({ type: 'number', min: 0, step: 1, name: 'tokens', value: b?.tokens || '', inputmode: 'numeric' });
  const period = select(['day', 'month', 'fixed'], b?.period || 'month', { name: 'period' });
  const resetAt = input({ type: 'datetime-local', name: 'reset_at', value: toLocalInput(b?.reset_at) });
  const soft = input({ type: 'number', min: 0.01, max: 1, step: 0.01, name: 'soft', value: b?.soft || 0.8 });
  const onEx = select([['wait', 'queued work waits'], ['fail', 'queued work fails']], b?.on_exhausted || 'wait', { name: 'on_exhausted' });
  const form = h('form', { class: 'grid' },
    field(`Amount (${settings.currency})`, amount, 'Empty: no money budget.'),
    field('Tokens', tokens, 'Empty: no token budget.'),
    field('Period', period),
    field('Fixed period ends', resetAt, 'For a fixed period only (your local time).'),
    field('Soft threshold', soft, 'Share at which budget.threshold_reached is sent.'),
    field('When spent', onEx),
    h('div', { class: 'actions wide' },
      h('button', { type: 'submit' }, 'Save budget'),
      h('button', { type: 'button', class: 'secondary', onclick: async () => {
        if (await busy(form, slot, () => save({ budget: null }))) announce('Budget removed.');
      } }, 'Remove budget')),
    h('div', { class: 'wide' }, slot));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = { period: period.value, soft: Number(soft.value || 0.8), on_exhausted: onEx.value };
    if (amount.value.trim()) {
      body.amount = amount.value.trim(); // a decimal string, kept exact
      body.currency = settings.currency;
    }
    if (tokens.value) body.tokens = Number(tokens.value);
    if (period.value === 'fixed') body.reset_at = fromLocalInput(resetAt.value);
    if (await busy(form, slot, () => save({ budget: body }))) announce('Budget saved.');
  });
  return form;
}

function spendView(sp, now) {
  const b = sp.budget;
  const parts = [];
  if (b.amount) parts.push(`${sp.spent} of ${b.amount} ${b.currency}`);
  if (b.tokens) parts.push(`${fmtInt(sp.spent_tokens)} of ${fmtInt(b.tokens)} tokens`);
  const pct = Math.min(100, sp.used_ratio * 100);
  return h('div', { class: 'progress' },
    h('progress', { max: 100, value: pct.toFixed(1), 'aria-label': `${sp.scope === 'key' ? `Key ${sp.key_name}` : 'Tenant'} budget spent` }),
    h('span', {}, `${parts.join('; ')} spent (${fmtNum(pct, 1)} %) · period ${fmtTime(sp.period_start)} – ${fmtTime(sp.period_end)}, ` +
      `${fmtDuration(sp.period_end - now)} left`));
}

function scopesText(sc) {
  const parts = [];
  if (sc.models) parts.push(`models: ${sc.models.join(', ') || 'none'}`);
  if (sc.endpoints) parts.push(`endpoints: ${sc.endpoints.join(', ') || 'none'}`);
  if (sc.max_priority) parts.push(`up to ${sc.max_priority}`);
  if (sc.cidrs) parts.push(`from ${sc.cidrs.join(', ') || 'nowhere'}`);
  return parts.length ? parts.join('; ') : 'unscoped';
}

// keyForm holds a key's name, default priority, scopes and expiry.
function keyForm(settings, k, submitLabel, onSubmit) {
  const slot = h('div');
  const sc = k?.scopes || {};
  const name = input({ name: 'name', maxlength: 128, value: k?.name || '', autocomplete: 'off' });
  const prio = select([['', 'the tenant\'s'], ...settings.priorities], k?.default_priority || '', { name: 'default_priority' });
  const maxPrio = select([['', 'any'], ...settings.priorities], sc.max_priority || '', { name: 'max_priority' });
  const cidrs = h('textarea', { name: 'cidrs', rows: 2, spellcheck: 'false' }, (sc.cidrs || []).join('\n'));
  const expires = input({ type: 'datetime-local', name: 'expires', value: toLocalInput(k?.expires_at) });
  const form = h('form', { class: 'grid' },
    field('Key name', name),
    field('Default priority', prio),
    h('div', { class: 'wide' }, checks('Models', 'models', settings.models, sc.models, 'None ticked: every model.')),
    h('div', { class: 'wide' }, checks('Endpoints', 'endpoints', settings.endpoint_groups, sc.endpoints, 'None ticked: every endpoint.')),
    field('Highest priority', maxPrio),
    field('Client addresses (CIDRs)', cidrs, 'One per line, e.g. 10.0.0.0/8. Empty: any address.'),
    field('Expires', expires, 'Empty: never (your local time).'),
    h('div', {}, h('button', { type: 'submit' }, submitLabel)),
    h('div', { class: 'wide' }, slot));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const scopes = {
      models: checked(form, 'models'),
      endpoints: checked(form, 'endpoints'),
      max_priority: maxPrio.value || null,
      cidrs: cidrs.value.split(/[\s,]+/).filter(Boolean),
    };
    if (scopes.models.length === 0) scopes.models = null;
    if (scopes.endpoints.length === 0) scopes.endpoints = null;
    if (scopes.cidrs.length === 0) scopes.cidrs = null;
    const body = { name: name.value, default_priority: prio.value, scopes, expires_at: fromLocalInput(expires.value) };
    await busy(form, slot, () => onSubmit(body));
  });
  return form;
}

export async function detail(main, { params, settings, signal }) {
  const [ref] = params;
  const t = await api(`/tenants/${encodeURIComponent(ref)}`, { signal });
  const path = `/tenants/${encodeURIComponent(t.id)}`;
  const redraw = () => { clear(main); return detail(main, { params, settings, signal }); };
  const save = async (body) => { await api(path, { method: 'POST', body }); redraw(); return true; };
  const spend = await api(`${path}/spend`, { signal });
  const now = Date.now() / 1000;
  const tenantSpend = spend.data.find((sp) => sp.scope === 'tenant');

  const prio = select(settings.priorities, t.default_priority, { name: 'default_priority' });
  const prioSlot = h('div');
  const prioForm = h('form', { class: 'grid' }, field('Default priority', prio),
    h('div', {}, h('button', { type: 'submit' }, 'Save')), h('div', { class: 'wide' }, prioSlot));
  prioForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (await busy(prioForm, prioSlot, () => save({ default_priority: prio.value }))) announce('Default priority saved.');
  });

  main.append(heading(`Tenant ${t.name}`),
    h('p', {}, h('a', { href: route('tenants') }, '← All tenants'), ' · ',
      h('a', { href: `${route('jobs')}?tenant=${encodeURIComponent(t.name)}` }, 'Its jobs'), ' · ',
      h('a', { href: `${route('batches')}?tenant=${encodeURIComponent(t.name)}` }, 'Its batches'), ' · ',
      h('a', { href: `${route('usage')}?tenant=${encodeURIComponent(t.name)}` }, 'Its usage')),
    facts([['Id', h('span', { class: 'mono' }, t.id)], ['Created', fmtTime(t.created_at)], ['Limits', limitsText(t.limits)], ['Budget', budgetText(t.budget)]]),
    h('h2', {}, 'Default priority'), prioForm,
    h('h2', {}, 'Limits'), limitsEditor(settings, t.limits, save),
    h('h2', {}, 'Budget'),
    tenantSpend ? spendView(tenantSpend, now) : h('p', { class: 'muted' }, 'No budget: spending is not capped.'),
    budgetEditor(settings, t.budget, save));

  // Keys.
  const keysSlot = h('div');
  const created = h('div');
  const newKey = keyForm(settings, null, 'Create key', async (body) => {
    if (!body.expires_at) delete body.expires_at;
    const k = await api(`${path}/keys`, { method: 'POST', body });
    newKey.reset();
    await secretDialog(`Key ${k.name || k.prefix} created`, k.secret, 'secret');
    announce('Key created.');
    await drawKeys();
    return true;
  });
  const keyPanel = h('div', { id: 'key-panel' });
  main.append(h('h2', {}, 'Keys'), keysSlot, created,
    h('details', {}, h('summary', {}, 'New key'), newKey), keyPanel);

  const keyBudgets = new Map(spend.data.filter((sp) => sp.scope === 'key').map((sp) => [sp.key_id, sp]));
  const drawKeys = async () => {
    const page = await api(`${path}/keys`, { params: { limit: 100 } });
    keysSlot.replaceChildren(table(`Keys of ${t.name}`, [
      { label: 'Name', get: (k) => k.name || '(unnamed)', rowHeader: true },
      { label: 'Prefix', get: (k) => h('span', { class: 'mono' }, k.prefix) },
      { label: 'State', get: (k) => badge(k.revoked_at ? 'revoked' : 'active') },
      { label: 'Scopes', get: (k) => scopesText(k.scopes) },
      { label: 'Default priority', get: (k) => k.default_priority || 'the tenant\'s' },
      { label: 'Created', get: (k) => fmtTime(k.created_at) },
      { label: 'Last used', get: (k) => fmtTime(k.last_used_at) },
      { label: 'Expires', get: (k) => fmtTime(k.expires_at) },
      { label: 'Actions', get: (k) => (k.revoked_at ? '—' : h('button', { type: 'button', class: 'link', 'aria-label': `Manage key ${k.name || k.prefix}`,
        onclick: () => manage(k) }, 'Manage')) },
    ], page.data, 'No keys yet.'));
  };

  const manage = (k) => {
    const slot = h('div');
    const keyPath = `/keys/${encodeURIComponent(k.id)}`;
    const saveKey = async (body) => { await api(keyPath, { method: 'POST', body }); announce('Key saved.'); await drawKeys(); return true; };
    const grace = input({ type: 'number', min: 0, max: settings.max_grace_seconds, step: 1, value: 3600, name: 'grace' });
    const rotate = h('form', { class: 'grid' },
      field('Old secret keeps working for (seconds)', grace, '0 ends it at once; at most 30 days.'),
      h('div', {}, h('button', { type: 'submit', class: 'secondary' }, 'Rotate secret')));
    rotate.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const r = await busy(rotate, slot, () => api(`${keyPath}/rotate`, { method: 'POST', body: { grace_seconds: Number(grace.value || 0) } }));
      if (r) await secretDialog(`New secret for ${k.name || k.prefix}`, r.secret, 'new secret');
    });
    const revoke = h('button', { type: 'button', class: 'danger', onclick: async () => {
      if (!(await confirmDialog('Revoke this key?', `Key ${k.name || k.prefix} stops working on every gateway within seconds. This cannot be undone.`, 'Revoke key'))) return;
      try {
        await api(`${keyPath}/revoke`, { method: 'POST' });
        announce('Key revoked.');
        keyPanel.replaceChildren();
        await drawKeys();
      } catch (err) { slot.append(errorBox(err)); }
    } }, 'Revoke key');
    const sp = keyBudgets.get(k.id);
    keyPanel.replaceChildren(h('section', { 'aria-labelledby': 'manage-title' },
      h('h2', { id: 'manage-title', tabindex: -1 }, `Key ${k.name || k.prefix}`),
      h('h3', {}, 'Name, scopes and expiry'),
      keyForm(settings, k, 'Save key', saveKey),
      h('h3', {}, 'Limits'), limitsEditor(settings, k.limits, saveKey),
      h('h3', {}, 'Budget'), sp ? spendView(sp, Date.now() / 1000) : h('p', { class: 'muted' }, 'No budget of its own.'),
      budgetEditor(settings, k.budget, saveKey),
      h('h3', {}, 'Rotate or revoke'), rotate, h('div', { class: 'actions' }, revoke), slot));
    keyPanel.querySelector('h2').focus();
  };
  await drawKeys();

  const force = h('input', { type: 'checkbox', name: 'force' });
  const delSlot = h('div');
  main.append(h('h2', {}, 'Delete the tenant'),
    h('p', {}, 'Its keys stop working everywhere within seconds; its usage, jobs and audit entries stay.'),
    h('div', { class: 'actions' }, h('label', {}, force, ' Also cancel its queued and running work'),
      h('button', { type: 'button', class: 'danger', onclick: async () => {
        if (!(await confirmDialog(`Delete tenant ${t.name}?`, 'This cannot be undone.', 'Delete tenant'))) return;
        try {
          await api(path, { method: 'DELETE', params: { force: force.checked ? 'true' : '' } });
          announce(`Tenant ${t.name} deleted.`);
          location.hash = route('tenants');
        } catch (err) { delSlot.replaceChildren(errorBox(err)); }
      } }, 'Delete tenant')), delSlot);
}
