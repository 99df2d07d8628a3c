// Few-shot builder: task, example rows and query. The prompt shown is the one the server
// builds (POST /few-shot/render with the same body as POST /few-shot), never a copy of its
// template logic. The template fields and the starting example come from the API schema.

import { isAbort, postJSON } from "./api.js";
import { escapeLine, unescapeLine } from "./schema_form.js";
import { fewShotRequest } from "./stream.js";

const PREVIEW_DELAY_MS = 250;

function textInput(className, value, placeholder) {
  const input = document.createElement("input");
  input.type = "text";
  input.lang = "ko";
  input.className = className;
  input.value = value ?? "";
  input.placeholder = placeholder;
  return input;
}

// The template's fields, from the FewShotTemplate schema (strings with \n escapes, flags).
class TemplateFields {
  constructor(container, schema) {
    this.inputs = new Map();
    this.defaults = {};
    for (const [name, property] of Object.entries(schema.properties)) {
      this.defaults[name] = property.default;
      const label = document.createElement("label");
      label.className = "field";
      label.title = property.description || "";
      const title = document.createElement("span");
      title.className = "name";
      title.textContent = name;
      let input;
      if (property.type === "boolean") {
        input = document.createElement("input");
        input.type = "checkbox";
        input.checked = Boolean(property.default);
      } else {
        input = textInput("", escapeLine(property.default ?? ""), "");
      }
      input.name = name;
      label.append(title, input);
      container.append(label);
      this.inputs.set(name, input);
    }
  }

  // Only what differs from the server's defaults, so the request stays short.
  values() {
    const template = {};
    for (const [name, input] of this.inputs) {
      const value = input.type === "checkbox" ? input.checked : unescapeLine(input.value);
      if (value !== this.defaults[name]) template[name] = value;
    }
    return template;
  }
}

export class FewShotBuilder {
  // `formParams()` returns the generate options of the form (throws on an invalid field).
  constructor(elements, schemas, formParams) {
    this.el = elements;
    this.formParams = formParams;
    this.template = new TemplateFields(elements.templateFields, schemas.FewShotTemplate);
    const example = (schemas.FewShotRequest.examples || [])[0] || {};
    elements.task.value = example.task ?? "";
    elements.query.value = example.query ?? "";
    for (const row of example.examples ?? [{}]) this.addExample(row);
    elements.addExample.addEventListener("click", () => {
      this.addExample({});
      this.schedulePreview();
    });
    elements.root.addEventListener("input", () => this.schedulePreview());
    elements.root.addEventListener("change", () => this.schedulePreview());
    this.previewTimer = null;
    this.previewAbort = null;
  }

  addExample({ input, output }) {
    const row = document.createElement("div");
    row.className = "fs-example";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove this example";
    remove.addEventListener("click", () => {
      row.remove();
      this.schedulePreview();
    });
    row.append(textInput("fs-input", input, "input"), textInput("fs-output", output, "output"),
      remove);
    this.el.examples.append(row);
  }

  examples() {
    return [...this.el.examples.querySelectorAll(".fs-example")]
      .map((row) => ({
        input: row.querySelector(".fs-input").value,
        output: row.querySelector(".fs-output").value,
      }))
      .filter((example) => example.input !== "" || example.output !== "");
  }

  // The body of POST /few-shot (without `stream`, which the request sets).
  body() {
    const body = { task: this.el.task.value, examples: this.examples(), query: this.el.query.value };
    const template = this.template.values();
    if (Object.keys(template).length) body.template = template;
    body.parameters = this.formParams();
    return body;
  }

  request() {
    return fewShotRequest(this.body());
  }

  schedulePreview() {
    clearTimeout(this.previewTimer);
    this.previewTimer = setTimeout(() => this.preview(), PREVIEW_DELAY_MS);
  }

  // Ask the server to render the prompt; an older preview still in flight is cancelled.
  async preview() {
    this.previewAbort?.abort();
    const abort = new AbortController();
    this.previewAbort = abort;
    const info = this.el.promptInfo;
    let body;
    try {
      body = this.body();
    } catch (error) {
      info.textContent = error.message;
      return;
    }
    if (!body.query) {
      info.textContent = "type a query to see the prompt";
      return;
    }
    try {
      const rendered = await postJSON("/few-shot/render", body, abort.signal);
      this.el.prompt.textContent = rendered.prompt;
      const stops = rendered.stop_strings.map((s) => JSON.stringify(s)).join(", ");
      info.textContent = `${rendered.prompt_tokens} tokens · stops at ${stops || "nothing"}`;
      this.el.root.dataset.rendered = "true";
    } catch (error) {
      if (!isAbort(error)) info.textContent = error.message;
    }
  }
}
