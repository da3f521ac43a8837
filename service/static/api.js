// Talking to the service. Every call resolves to the parsed JSON body or throws an ApiError whose
// `message` is the API's own `detail` sentence.

// The service's root: this module lives at <root>/static/api.js, so this works behind a path prefix
// and whatever URL the page itself was opened at.
const API_ROOT = new URL("../", import.meta.url);

const STATUS_TEXT = {
  400: "Could not read the file",
  401: "API key needed",
  413: "Too large",
  415: "Unsupported file type",
  422: "Invalid input",
  429: "The server is busy",
  499: "Request cancelled",
  500: "Server error",
  503: "The model is not ready",
};

export class ApiError extends Error {
  constructor(status, code, detail, retryAfter = null) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  /** A sentence for people: a short title, then the API's detail. */
  get sentence() {
    const title = STATUS_TEXT[this.status];
    let text = title ? `${title}: ${this.message}` : this.message;
    if (this.status === 429 && this.retryAfter) text += ` Retry in ${this.retryAfter} s.`;
    return text;
  }
}

/** The sentence to show for a failed call: an ApiError's own sentence, else the error's message. */
export function describe(error) {
  return error instanceof ApiError ? error.sentence : error.message;
}

// A key this tab was given (FER_API_KEY on the server): kept for the tab only, sent with every call.
const KEY = "fer-api-key";

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

function withKey(headers = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...headers, "X-API-Key": key } : headers;
}

function url(path) {
  return new URL(path, API_ROOT);
}

async function parse(response) {
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      body = await response.json();
    } catch {
      body = null;
    }
  }
  if (response.ok) return body;
  const detail =
    (body && typeof body.detail === "string" && body.detail) ||
    `the server answered ${response.status} ${response.statusText}`.trim();
  throw new ApiError(response.status, body && body.error, detail, response.headers.get("retry-after"));
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(url(path), { ...init, headers: withKey(init.headers) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", "the service could not be reached; is it running?");
  }
  return parse(response);
}

export function getJSON(path, { signal } = {}) {
  return send(path, { headers: { Accept: "application/json" }, cache: "no-store", signal });
}

/** Readiness: {ready: bool, ...body}; a 503 is an answer here, not an error. */
export async function readiness() {
  let response;
  try {
    response = await fetch(url("readyz"), { cache: "no-store", headers: withKey() });
  } catch {
    return { ready: false, status: "unreachable", detail: "the service could not be reached" };
  }
  if (response.status === 401) return { ready: false, status: "locked", detail: "this service needs an API key" };
  let body = {};
  try {
    body = await response.json();
  } catch {
    /* keep {} */
  }
  return { ...body, ready: response.ok && body.status === "ready" };
}

/** POSTs multipart form fields; File/Blob values keep their name (blobs are named `upload`). */
export function postForm(path, fields, { signal } = {}) {
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined || value === null) continue;
    if (value instanceof Blob) form.append(key, value, value.name || "upload");
    else form.append(key, String(value));
  }
  return send(path, { method: "POST", body: form, headers: { Accept: "application/json" }, signal });
}
