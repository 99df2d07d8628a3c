// The generate-options form, built from the API's own OpenAPI schema (GenerateParameters),
// so every option the server accepts is here and nothing drifts. Empty field = omitted (the
// checkpoint's generation_config default applies, exactly as in model.generate).

import { getJSON } from "./api.js";

// Shown up front, in this order; every other option is folded under "More options".
export const COMMON_OPTIONS = [
  "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
  "repetition_penalty", "no_repeat_ngram_size", "seed", "stop",
];

// Options the page sets elsewhere, not in the form: the model / adapter picker's adapter_id.
export const PICKED_OPTIONS = ["adapter_id"];

export async function loadSchemas() {
  const spec = await getJSON("/openapi.json");
  return spec.components.schemas;
}

// What kind of input an option gets, from its JSON schema.
export function fieldKind(schema) {
  const alternatives = (schema.anyOf || [schema]).filter((s) => s.type !== "null");
  const isChoice = (s) => s.type === "boolean" || s.const !== undefined || s.enum !== undefined;
  if (alternatives.length && alternatives.every(isChoice)) {
    const values = alternatives.flatMap((s) =>
      s.type === "boolean" ? [true, false] : s.const !== undefined ? [s.const] : s.enum);
    return { kind: "choice", values };
  }
  if (alternatives.length === 1) {
    const [only] = alternatives;
    if (only.type === "integer" || only.type === "number") return { kind: only.type, range: only };
    if (only.type === "string") return { kind: "text" };
  }
  const stringList = alternatives.some((s) => s.type === "array" && s.items?.type === "string");
  const onlyStrings = alternatives.every((s) => s.type === "string" || s.type === "array");
  if (stringList && onlyStrings) return { kind: "lines" };
  return { kind: "json" };
}

// "[0, 1)", "≥ 1", "> 0": the allowed range as the server states it.
export function rangeText(range) {
  const low = range.minimum !== undefined ? ["[", range.minimum]
    : range.exclusiveMinimum !== undefined ? ["(", range.exclusiveMinimum] : null;
  const high = range.maximum !== undefined ? ["]", range.maximum]
    : range.exclusiveMaximum !== undefined ? [")", range.exclusiveMaximum] : null;
  if (low && high) return `${low[0]}${low[1]}, ${high[1]}${high[0]}`;
  if (low) return `${low[0] === "[" ? "≥" : ">"} ${low[1]}`;
  if (high) return `${high[0] === "]" ? "≤" : "<"} ${high[1]}`;
  return "";
}

// Stop strings are typed one per line; \n and \t stand for newline and tab.
export function unescapeLine(line) {
  return line.replace(/\\(n|t|\\)/g, (_, c) => (c === "n" ? "\n" : c === "t" ? "\t" : "\\"));
}

export function escapeLine(text) {
  return text.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\t/g, "\\t");
}

export class FieldError extends Error {
  constructor(name, message) {
    super(`${name}: ${message}`);
    this.field = name;
  }
}

class Field {
  constructor(name, schema) {
    this.name = name;
    this.schema = schema;
    Object.assign(this, fieldKind(schema));
    this.element = document.createElement("label");
    this.element.className = "field";
    this.element.dataset.name = name;
    this.element.title = schema.description || "";
    const title = document.createElement("span");
    title.className = "name";
    title.textContent = name;
    this.input = this.buildInput();
    this.input.name = name;
    this.element.append(title, this.input);
    const hint = this.hintText();
    if (hint) {
      const small = document.createElement("small");
      small.className = "hint";
      small.textContent = hint;
      this.element.append(small);
    }
    if (this.kind === "lines" || this.kind === "json") this.element.classList.add("wide");
  }

  buildInput() {
    if (this.kind === "choice") {
      const select = document.createElement("select");
      const fallback = this.schema.default;
      const label = fallback === undefined || fallback === null ? "default" : `default (${fallback})`;
      select.append(new Option(label, ""));
      for (const value of this.values) select.append(new Option(String(value), JSON.stringify(value)));
      return select;
    }
    if (this.kind === "integer" || this.kind === "number") {
      const input = document.createElement("input");
      input.type = "number";
      input.step = this.kind === "integer" ? "1" : "any";
      if (this.range.minimum !== undefined) input.min = this.range.minimum;
      if (this.range.maximum !== undefined) input.max = this.range.maximum;
      input.placeholder = "default";
      return input;
    }
    if (this.kind === "lines") {
      const area = document.createElement("textarea");
      area.rows = 2;
      area.lang = "ko";
      area.placeholder = "one per line (\\n = newline)";
      return area;
    }
    const input = document.createElement("input");
    input.type = "text";
    input.lang = "ko";
    input.placeholder = this.kind === "json" ? "JSON" : "default";
    return input;
  }

  hintText() {
    const parts = [];
    if (this.range) parts.push(rangeText(this.range));
    if (this.kind === "json") parts.push(this.schema.description || "");
    return parts.filter(Boolean).join(" · ");
  }

  // The value to send, or undefined when the field is empty (omitted).
  read() {
    const raw = this.input.value;
    if (raw.trim() === "") return undefined;
    switch (this.kind) {
      case "choice":
        return JSON.parse(raw);
      case "integer": {
        const value = Number(raw);
        if (!Number.isInteger(value)) throw new FieldError(this.name, "must be an integer");
        return value;
      }
      case "number": {
        const value = Number(raw);
        if (!Number.isFinite(value)) throw new FieldError(this.name, "must be a number");
        return value;
      }
      case "lines":
        return raw.split("\n").filter((line) => line !== "").map(unescapeLine);
      case "json":
        try {
          return JSON.parse(raw);
        } catch {
          throw new FieldError(this.name, "is not valid JSON");
        }
      default:
        return raw;
    }
  }

  write(value) {
    if (value === undefined || value === null) this.input.value = "";
    else if (this.kind === "choice") this.input.value = JSON.stringify(value);
    else if (this.kind === "lines") {
      const list = Array.isArray(value) ? value : [value];
      this.input.value = list.map(escapeLine).join("\n");
    } else if (this.kind === "json") this.input.value = JSON.stringify(value);
    else this.input.value = String(value);
    this.mark();
  }

  mark() {
    this.element.classList.toggle("set", this.input.value.trim() !== "");
  }
}

// All options of one schema: the common ones in a grid, the rest folded.
export class OptionsForm {
  constructor(container, schema, common = COMMON_OPTIONS, picked = PICKED_OPTIONS) {
    this.fields = new Map();
    this.listeners = [];
    const properties = schema.properties;
    const names = Object.keys(properties).filter((name) => !picked.includes(name));
    const upFront = common.filter((name) => names.includes(name));
    const folded = names.filter((name) => !upFront.includes(name)).sort();
    const grid = document.createElement("div");
    grid.className = "fields";
    for (const name of upFront) grid.append(this.add(name, properties[name]));
    this.more = document.createElement("details");
    this.more.className = "more";
    this.summary = document.createElement("summary");
    const moreGrid = document.createElement("div");
    moreGrid.className = "fields";
    for (const name of folded) moreGrid.append(this.add(name, properties[name]));
    this.more.append(this.summary, moreGrid);
    this.folded = folded;
    container.replaceChildren(grid, this.more);
    container.addEventListener("input", (event) => this.changed(event));
    container.addEventListener("change", (event) => this.changed(event));
    this.updateSummary();
  }

  add(name, schema) {
    const field = new Field(name, schema);
    this.fields.set(name, field);
    return field.element;
  }

  changed(event) {
    const field = this.fields.get(event.target.name);
    if (field) {
      field.mark();
      field.element.classList.remove("invalid");
    }
    this.updateSummary();
    for (const listener of this.listeners) listener();
  }

  onChange(listener) {
    this.listeners.push(listener);
  }

  updateSummary() {
    const set = this.folded.filter((name) => this.fields.get(name).input.value.trim() !== "");
    const count = set.length ? ` (${set.length} set: ${set.join(", ")})` : "";
    this.summary.textContent = `More options: ${this.folded.length}${count}`;
  }

  // The options that are set, as the API's `parameters` object; a bad field throws.
  values() {
    const params = {};
    for (const [name, field] of this.fields) {
      field.element.classList.remove("invalid");
      try {
        const value = field.read();
        if (value !== undefined) params[name] = value;
      } catch (error) {
        field.element.classList.add("invalid");
        throw error;
      }
    }
    return params;
  }

  // Replace every field's value (names the schema does not have are ignored).
  setValues(params) {
    for (const [name, field] of this.fields) field.write(params[name]);
    this.updateSummary();
    for (const listener of this.listeners) listener();
  }
}
