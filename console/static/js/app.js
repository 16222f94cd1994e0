// The console's shell: sign-in, navigation and the hash router. Pages are
// modules whose render(main, ctx) draws into <main>; ctx.signal aborts when
// the operator leaves the page, which ends its polling.
import { h, clear } from './dom.js';
import { api, session, setUnauthorizedHandler } from './api.js';
import { errorBox, field, busy, heading } from './ui.js';
import * as capacity from './capacity.js';
import * as tenants from './tenants.js';
import * as usage from './usage.js';
import * as jobs from './jobs.js';
import * as batches from './batches.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const signout = document.getElementById('signout');

const routes = [
  [/^capacity$/, 'capacity', capacity.render],
  [/^tenants$/, 'tenants', tenants.list],
  [/^tenants\/([^/]+)$/, 'tenants', tenants.detail],
  [/^usage$/, 'usage', usage.render],
  [/^jobs$/, 'jobs', jobs.list],
  [/^jobs\/([^/]+)$/, 'jobs', jobs.detail],
  [/^batches$/, 'batches', batches.list],
  [/^batches\/([^/]+)$/, 'batches', batches.detail],
];

let current = null; // the page's AbortController
let settings = null;

function signIn(err) {
  current?.abort();
  current = null;
  session.clear();
  nav.hidden = true;
  signout.hidden = true;
  clear(main);
  const key = h('input', { type: 'password', autocomplete: 'off', spellcheck: 'false', required: true, name: 'key' });
  const slot = h('div');
  const form = h('form', {},
    field('Admin key', key, 'An lva-… key (levee admin-key create, or the one levee dev prints).'),
    h('button', { type: 'submit' }, 'Sign in'), slot);
  if (err) slot.append(errorBox(err));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    session.set(key.value.trim());
    const ok = await busy(form, slot, async () => { settings = await api('/settings'); return true; });
    if (!ok) {
      session.clear();
      key.focus();
      return;
    }
    start();
  });
  main.append(h('section', { class: 'signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to the Levee console'),
    h('p', { class: 'lede' }, 'The console does everything through the admin API (/admin/v1). Your key is kept in this tab\'s ' +
      'session storage only — closing the tab forgets it — and sent as Authorization: Bearer with each call.'),
    form));
  key.focus();
}

async function start() {
  if (!settings) {
    try {
      settings = await api('/settings');
    } catch (err) {
      if (err.status !== 401) { clear(main).append(errorBox(err)); }
      return;
    }
  }
  nav.hidden = false;
  signout.hidden = false;
  if (!location.hash.startsWith('#/')) {
    history.replaceState(null, '', '#/capacity');
  }
  show();
}

function parseHash() {
  const raw = location.hash.slice(2); // after "#/"
  const [path, qs] = raw.split('?', 2);
  return { path, query: new URLSearchParams(qs || '') };
}

async function show() {
  if (!session.key) { signIn(); return; }
  if (!location.hash.startsWith('#/')) return; // e.g. the skip link
  const { path, query } = parseHash();
  current?.abort();
  current = new AbortController();
  const ctx = { signal: current.signal, query, settings, params: [] };
  let page = null;
  let section = '';
  for (const [re, sec, render] of routes) {
    const m = path.match(re);
    if (m) {
      page = render;
      section = sec;
      try {
        ctx.params = m.slice(1).map(decodeURIComponent);
      } catch {
        page = null;
      }
      break;
    }
  }
  for (const a of nav.querySelectorAll('a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  clear(main);
  if (!page) {
    main.append(heading('Not found'), h('p', {}, 'There is no such page in the console.'));
    main.querySelector('h1').focus();
    return;
  }
  try {
    await page(main, ctx);
  } catch (err) {
    if (err.name !== 'AbortError' && !ctx.signal.aborted) main.append(errorBox(err));
  }
}

let focusNext = false;
window.addEventListener('hashchange', () => { focusNext = true; show(); });
// Pages focus their h1 once drawn after a navigation, so a screen reader
// starts there (not on the first load: the browser's own focus stays).
new MutationObserver(() => {
  if (!focusNext) return;
  const h1 = main.querySelector('h1');
  if (h1) { focusNext = false; h1.focus(); }
}).observe(main, { childList: true });

document.getElementById('skip').addEventListener('click', (ev) => {
  ev.preventDefault();
  (main.querySelector('h1') || main).focus();
});
signout.addEventListener('click', () => { settings = null; signIn(); });
setUnauthorizedHandler((err) => { settings = null; signIn(err); });

if (session.key) start(); else signIn();
