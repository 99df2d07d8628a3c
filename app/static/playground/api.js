// Calls to the kogpt-serve API from the page: the API key (kept in this tab only), JSON
// requests, server-sent event streams, and the server's error shape.

const KEY_STORAGE = "kogpt-playground-api-key";

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

export class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

// The error shapes: {"error", "error_type", "field"} (TGI and the other routes) and
// {"error": {"message", "param"}} (OpenAI routes).
export function errorMessage(body) {
  const error = body && body.error;
  if (typeof error === "string") return { message: error, field: body.field || null };
  if (error && typeof error === "object") return { message: error.message, field: error.param };
  return { message: JSON.stringify(body), field: null };
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    return new ApiError(response.status, `HTTP ${response.status} ${response.statusText}`);
  }
  const { message, field } = errorMessage(body);
  return new ApiError(response.status, message, field);
}

async function call(method, path, body, signal) {
  const init = { method, headers: requestHeaders(), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, signal) {
  return (await call("GET", path, undefined, signal)).json();
}

export async function postJSON(path, body, signal) {
  return (await call("POST", path, body, signal)).json();
}

// The `data:` payloads of an SSE response as parsed JSON, as they arrive. Bytes are decoded
// as a UTF-8 stream, so a Hangul syllable split across network chunks is never broken.
// An error event (sent when generation fails after the stream started) is thrown.
export async function* sseEvents(path, body, signal) {
  const response = await call("POST", path, body, signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    buffer = buffer.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data || data === "[DONE]") continue; // comments (": ping") carry no data
      const event = JSON.parse(data);
      if (event.error !== undefined && event.token === undefined) {
        const { message, field } = errorMessage(event);
        throw new ApiError(200, message, field);
      }
      yield event;
    }
    if (done) return;
  }
}

export function isAbort(error) {
  return error && error.name === "AbortError";
}
