// The JSON API as the page uses it, and the one place that knows where the API key is kept.
//
// The key lives in this tab's sessionStorage only (gone when the tab closes or the user signs
// out) and travels as an Authorization header: never in a URL, a cookie or a log line.

const KEY_ITEM = "ci.apiKey";

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function keepKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** An answer other than 2xx: `status` and the server's one-line `detail`. */
export class ApiError extends Error {
  constructor(status, detail, retryAfterS = null) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfterS = retryAfterS;
  }
}

export function authHeaders(key = storedKey()) {
  return { Authorization: `Bearer ${key}` };
}

/** The ApiError for a failed response (the body is `{"detail": "<one line>"}`). */
export async function errorFrom(response) {
  let detail = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") detail = body.detail;
  } catch {
    // not JSON: keep the status line
  }
  const retry = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  return new ApiError(response.status, detail, Number.isFinite(retry) ? retry : null);
}

async function call(method, path, key) {
  const response = await fetch(path, {
    method,
    headers: { ...authHeaders(key), Accept: "application/json" },
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

export function listJobs({ status = "", limit = 100, key } = {}) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (status) query.set("status", status);
  return call("GET", `/jobs?${query}`, key);
}

export function getJob(jobId) {
  return call("GET", `/jobs/${encodeURIComponent(jobId)}`);
}

export function cancelJob(jobId) {
  return call("POST", `/jobs/${encodeURIComponent(jobId)}/cancel`);
}

export function eventsUrl(jobId) {
  return `/jobs/${encodeURIComponent(jobId)}/events`;
}
