// Copy as curl / Python (httpx): the exact requests the page would send now. The API key is
// never copied: the snippets read it from $KOGPT_API_KEY when the page uses one.

const KEY_ENV = "KOGPT_API_KEY";

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

export function curlCommand(origin, request, withKey) {
  const lines = [`curl -s${request.stream ? "N" : ""} ${shellQuote(origin + request.path)}`];
  lines.push(`-H 'Content-Type: application/json'`);
  if (withKey) lines.push(`-H "Authorization: Bearer $${KEY_ENV}"`);
  lines.push(`-d ${shellQuote(JSON.stringify(request.body))}`);
  return lines.join(" \\\n  ");
}

// A JSON value as a Python literal (JSON strings are valid Python string literals).
export function pythonLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    if (value.every((v) => v === null || typeof v !== "object")) {
      return `[${value.map((v) => pythonLiteral(v)).join(", ")}]`;
    }
    return `[\n${value.map((v) => inner + pythonLiteral(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  const items = entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(v, inner)}`);
  return `{\n${items.join(",\n")},\n${indent}}`;
}

function pythonRequest(request, title) {
  const lines = [];
  if (title) lines.push(`# ${title}`);
  lines.push(`body = ${pythonLiteral(request.body)}`);
  const url = `f"{BASE_URL}${request.path}"`;
  if (request.stream) {
    lines.push(
      `with httpx.stream("POST", ${url}, json=body, headers=HEADERS, timeout=None) as r:`,
      "    r.raise_for_status()",
      "    for line in r.iter_lines():",
      '        if not line.startswith("data:"):',
      "            continue",
      '        event = json.loads(line[len("data:"):])',
      '        if "error" in event:',
      '            raise RuntimeError(event["error"])',
      '        print(event["token"]["text"], end="", flush=True)',
      "print()",
    );
  } else {
    const field = request.kind === "fewshot" ? "answer" : "generated_text";
    lines.push(
      `r = httpx.post(${url}, json=body, headers=HEADERS, timeout=None)`,
      "r.raise_for_status()",
      `print(r.json()[${JSON.stringify(field)}])`,
    );
  }
  return lines.join("\n");
}

// `requests`: [{request, title}] (several for a compare: one block each).
export function pythonScript(origin, requests, withKey) {
  const head = [];
  if (requests.some(({ request }) => request.stream)) head.push("import json");
  if (withKey) head.push("import os");
  if (head.length) head.push("");
  head.push("import httpx", "", `BASE_URL = ${JSON.stringify(origin)}`);
  head.push(withKey ? `HEADERS = {"Authorization": f"Bearer {os.environ['${KEY_ENV}']}"}`
    : "HEADERS = {}");
  const blocks = requests.map(({ request, title }) => pythonRequest(request, title));
  return `${head.join("\n")}\n\n${blocks.join("\n\n")}\n`;
}

export function curlCommands(origin, requests, withKey) {
  return requests
    .map(({ request, title }) => (title ? `# ${title}\n` : "") + curlCommand(origin, request, withKey))
    .join("\n\n");
}

// Put `text` on the clipboard; the snippet is also shown on the page, so it can be copied by
// hand where the clipboard is not available (a plain-http origin other than localhost).
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}
