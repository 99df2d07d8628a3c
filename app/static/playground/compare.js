// Compare: 2-4 configurations on the same prompt at once, streamed side by side. Each column
// has a model or LoRA adapter and a preset (its strategy plus the form's max_new_tokens, seed
// and stop) whose options are shown as editable JSON; editing the JSON makes the column
// "custom". Same preset, another model: a fine-tune against its base, same options and seed.

import { ModelPicker } from "./models.js";
import { FieldError } from "./schema_form.js";
import { PRESETS, presetById, withPreset } from "./presets.js";
import { OutputColumn, generateRequest } from "./stream.js";

export const DEFAULT_COLUMNS = ["greedy", "beam", "top-p"];
export const MIN_COLUMNS = 2;
export const MAX_COLUMNS = 4;
const CUSTOM = "custom";

class CompareColumn {
  constructor(parent, presetId, formParams, catalog) {
    this.column = new OutputColumn(parent);
    this.model = new ModelPicker(catalog, { className: "column-model" });
    this.select = document.createElement("select");
    this.select.className = "column-preset";
    for (const preset of PRESETS) this.select.append(new Option(preset.label, preset.id));
    this.select.append(new Option("Custom (edited JSON)", CUSTOM));
    this.select.value = presetId;
    this.params = document.createElement("textarea");
    this.params.className = "column-params";
    this.params.rows = 4;
    this.params.spellcheck = false;
    this.column.head.append(this.select, this.model.element); // the model: a row of its own
    this.column.element.insertBefore(this.params, this.column.output);
    this.select.addEventListener("change", () => this.refresh(formParams()));
    this.params.addEventListener("input", () => {
      this.select.value = CUSTOM;
      this.params.classList.remove("invalid");
    });
    this.refresh(formParams());
  }

  setIndex(index) {
    this.index = index;
    this.column.label.textContent = `#${index + 1}`;
    this.column.element.dataset.column = String(index);
  }

  get title() {
    const preset = this.select.selectedOptions[0]?.textContent ?? "";
    return this.model.choice ? `${preset} · ${this.model.choice}` : preset;
  }

  // Regenerate the JSON from the preset and the form (custom columns keep theirs).
  refresh(formParams) {
    const preset = presetById(this.select.value);
    if (!preset) return;
    this.params.value = JSON.stringify(withPreset(formParams, preset), null, 1);
    this.params.rows = Math.min(10, this.params.value.split("\n").length);
    this.params.classList.remove("invalid");
  }

  // The column's options with its model or adapter (adapter_id unless the default).
  parameters() {
    try {
      const value = JSON.parse(this.params.value || "{}");
      if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw new Error("not an object");
      }
      return this.model.withModel(value);
    } catch {
      this.params.classList.add("invalid");
      throw new FieldError(`column #${this.index + 1}`, "the options must be a JSON object");
    }
  }

  remove() {
    this.column.remove();
  }
}

export class Compare {
  // `formParams()` returns the form's current options (it throws on an invalid field);
  // `catalog` the models and adapters each column's picker offers.
  constructor(container, formParams, catalog) {
    this.container = container;
    this.catalog = catalog;
    this.formParams = () => {
      try {
        return formParams();
      } catch {
        return {}; // an invalid form field: the preset alone
      }
    };
    this.rawFormParams = formParams;
    this.columns = [];
    for (const id of DEFAULT_COLUMNS) this.add(id);
  }

  add(presetId) {
    if (this.columns.length >= MAX_COLUMNS) return;
    const used = new Set(this.columns.map((c) => c.select.value));
    const id = presetId ?? PRESETS.find((p) => !used.has(p.id))?.id ?? PRESETS[0].id;
    const column = new CompareColumn(this.container, id, this.formParams, this.catalog);
    this.columns.push(column);
    this.renumber();
  }

  removeLast() {
    if (this.columns.length <= MIN_COLUMNS) return;
    this.columns.pop().remove();
    this.renumber();
  }

  renumber() {
    this.columns.forEach((column, index) => column.setIndex(index));
    this.container.dataset.count = String(this.columns.length);
  }

  // The form changed: columns that follow a preset follow the form too.
  refresh() {
    let params;
    try {
      params = this.rawFormParams();
    } catch {
      return; // mid-edit (e.g. half-typed JSON): keep the columns as they are
    }
    for (const column of this.columns) column.refresh(params);
  }

  // One request per column (throws, naming the column, when a column's JSON is bad).
  requests(prompt) {
    return this.columns.map((column) => ({
      title: `#${column.index + 1} ${column.title}`,
      request: generateRequest(prompt, column.parameters()),
      column,
    }));
  }
}
