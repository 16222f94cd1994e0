// Shared widgets: fields, tables, dialogs, messages. All text goes in as
// text (see dom.js).
import { h, uid, clear, sleep } from './dom.js';
import { api } from './api.js';

export function announce(message) {
  const el = document.getElementById('status');
  el.textContent = '';
  // A change the screen reader hears even when the text repeats.
  setTimeout(() => { el.textContent = message; }, 50);
}

export function errorBox(err) {
  return h('div', { class: 'error', role: 'alert' }, err && err.message ? err.message : String(err));
}

// field wraps a control with its label (and a hint, tied by
// aria-describedby).
export function field(label, control, hint) {
  control.id = control.id || uid('f');
  const parts = [h('label', { for: control.id }, label), control];
  if (hint) {
    const hid = uid('hint');
    control.setAttribute('aria-describedby', hid);
    parts.push(h('span', { class: 'hint', id: hid }, hint));
  }
  return h('div', { class: 'field' }, parts);
}

export function input(attrs) {
  return h('input', { type: 'text', ...attrs });
}

// select makes a <select>; options are [value, label] pairs or values.
export function select(options, value, attrs) {
  const el = h('select', attrs);
  for (const o of options) {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    const opt = h('option', { value: v }, label);
    if (String(v) === String(value ?? '')) opt.selected = true;
    el.append(opt);
  }
  return el;
}

// checks is a group of checkboxes in a fieldset with a legend.
export function checks(legend, name, values, checked, hint) {
  const fs = h('fieldset', {}, h('legend', {}, legend));
  const box = h('div', { class: 'checks' });
  for (const v of values) {
    box.append(h('label', {}, h('input', { type: 'checkbox', name, value: v, checked: (checked || []).includes(v) }), v));
  }
  fs.append(box);
  if (hint) fs.append(h('span', { class: 'hint' }, hint));
  return fs;
}

export function checked(form, name) {
  return [...form.querySelectorAll(`input[name="${name}"]:checked`)].map((el) => el.value);
}

// table renders rows under a caption; a column is {label, get(row), num}
// where get returns text or a node. Wide tables scroll inside a region
// that the keyboard can reach.
export function table(caption, columns, rows, empty = 'Nothing to show.') {
  const t = h('table', {},
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))));
  const body = h('tbody');
  if (rows.length === 0) {
    body.append(h('tr', {}, h('td', { colspan: columns.length, class: 'muted' }, empty)));
  }
  for (const r of rows) {
    body.append(h('tr', {}, columns.map((c, i) => {
      const v = c.get(r);
      const cls = [c.num ? 'num' : '', c.break ? 'break' : ''].join(' ').trim() || null;
      return i === 0 && c.rowHeader ? h('th', { scope: 'row', class: cls }, v) : h('td', { class: cls }, v);
    })));
  }
  t.append(body);
  return h('div', { class: 'scroll', role: 'region', 'aria-label': caption, tabindex: 0 }, t);
}

export function facts(pairs) {
  const dl = h('dl', { class: 'facts' });
  for (const [k, v] of pairs) {
    if (v === undefined) continue;
    dl.append(h('dt', {}, k), h('dd', {}, v === null || v === '' ? '—' : v));
  }
  return dl;
}

const tones = {
  succeeded: 'ok', completed: 'ok', active: 'ok', closed: 'ok',
  failed: 'bad', cancelled: 'bad', expired: 'bad', revoked: 'bad', open: 'bad',
  queued: 'info', running: 'info', in_progress: 'info', validating: 'info', finalizing: 'info', cancelling: 'warn',
};
export function badge(text) {
  return h('span', { class: `badge ${tones[text] || 'info'}` }, text);
}

// dialog opens a modal <dialog> (focus stays inside it; Escape closes it)
// and resolves with the value of the button that closed it.
export function dialog(title, body, buttons) {
  return new Promise((resolve) => {
    const titleID = uid('dlg');
    const d = h('dialog', { 'aria-labelledby': titleID }, h('h2', { id: titleID }, title), body);
    const row = h('div', { class: 'actions' });
    for (const b of buttons) {
      row.append(h('button', { type: 'button', class: b.class || null, onclick: () => { d.close(b.value); } }, b.label));
    }
    d.append(row);
    d.addEventListener('close', () => { d.remove(); resolve(d.returnValue || ''); });
    document.body.append(d);
    d.showModal();
  });
}

export async function confirmDialog(title, message, okLabel, danger = true) {
  const v = await dialog(title, h('p', {}, message), [
    { label: 'Cancel', value: 'no', class: 'secondary' },
    { label: okLabel, value: 'yes', class: danger ? 'danger' : null },
  ]);
  return v === 'yes';
}

async function copy(text, inputEl) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Without the async clipboard (a page not served over HTTPS or
    // loopback), copy what is selected.
    inputEl.select();
    return document.execCommand && document.execCommand('copy');
  }
}

// secretDialog shows a key's secret, once, with a copy button.
export function secretDialog(title, secret, what) {
  const field = h('input', { type: 'text', readonly: true, value: secret, 'aria-label': 'Secret', class: 'mono', 'data-secret': '' });
  const said = h('span', { role: 'status', class: 'hint' });
  const body = h('div', {},
    h('p', {}, `This is the only time the ${what} is shown: copy it now. Levee keeps only its hash.`),
    h('div', { class: 'secret' }, field,
      h('button', { type: 'button', class: 'secondary', onclick: async () => {
        said.textContent = (await copy(secret, field)) ? 'Copied.' : 'Copy failed: select the text and copy it.';
      } }, 'Copy')),
    said);
  return dialog(title, body, [{ label: 'Done', value: 'done' }]);
}

// busy runs fn while the form's submit button is disabled, and shows its
// error (if any) in slot.
export async function busy(form, slot, fn) {
  const btns = form.querySelectorAll('button');
  btns.forEach((b) => { b.disabled = true; });
  clear(slot);
  try {
    return await fn();
  } catch (err) {
    if (err.name !== 'AbortError') slot.append(errorBox(err));
    return undefined;
  } finally {
    btns.forEach((b) => { b.disabled = false; });
  }
}

// heading makes the page's h1, which takes the focus when the page changes.
export function heading(text) {
  return h('h1', { tabindex: -1 }, text);
}

// follow reads path every two seconds and draws what it reads, until
// isOpen says it has ended, it is not found, or the page is left (signal).
export async function follow(path, { slot, signal, isOpen, draw }) {
  for (;;) {
    let v;
    try {
      v = await api(path, { signal });
    } catch (err) {
      if (signal.aborted) return;
      slot.replaceChildren(errorBox(err));
      if (err.status === 404) return;
      await sleep(2000, signal);
      continue;
    }
    slot.replaceChildren();
    draw(v);
    if (!isOpen(v)) return;
    await sleep(2000, signal);
    if (signal.aborted) return;
  }
}
