// The admin API client. The admin key lives in this tab's sessionStorage
// (gone when the tab closes) and is sent as Authorization: Bearer; nothing
// else is stored.

const KEY = 'levee.adminKey';

export const session = {
  get key() { return sessionStorage.getItem(KEY) || ''; },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

// ApiError carries the OpenAI error envelope's fields.
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `The gateway answered ${status}.`);
    this.status = status;
    this.code = e.code || '';
    this.param = e.param || '';
  }
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

// api calls /admin/v1 + path. It returns the parsed JSON, or with
// as: 'blob' the body as a Blob (and the response's headers).
export async function api(path, { method = 'GET', params, body, accept = 'application/json', as = 'json', signal } = {}) {
  const headers = { Authorization: `Bearer ${session.key}`, Accept: accept };
  const init = { method, headers, signal, credentials: 'omit', cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(`/admin/v1${path}${query(params)}`, init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { error: { message: 'The gateway could not be reached; check that it is running.' } });
  }
  if (!resp.ok) {
    let b = null;
    try { b = await resp.json(); } catch { /* not JSON: the status says enough */ }
    const err = new ApiError(resp.status, b);
    if (resp.status === 401 && err.code === 'invalid_admin_key') onUnauthorized(err);
    throw err;
  }
  if (as === 'blob') return { blob: await resp.blob(), headers: resp.headers };
  return resp.json();
}

// download saves a blob under a file name.
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
