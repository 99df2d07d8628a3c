// The models and LoRA adapters the server serves (GET /v1/models) and the pickers that choose
// one for a run. Cards without a parent are models (the first is the server's default);
// cards with one are adapters, listed under it. Choosing the default sends nothing extra;
// any other choice is sent as `parameters.adapter_id`, which the TGI routes and /few-shot
// read for a model and an adapter alike.

import { getJSON } from "./api.js";

// [{id, selectable, adapters: [id]}] in the server's order: each model with its adapters; an
// adapter whose parent is not listed gets a group of its own (the parent not selectable).
export function modelGroups(cards) {
  const groups = new Map();
  for (const card of cards) {
    if (!card.parent && !groups.has(card.id)) {
      groups.set(card.id, { id: card.id, selectable: true, adapters: [] });
    }
  }
  for (const card of cards) {
    if (!card.parent) continue;
    if (!groups.has(card.parent)) {
      groups.set(card.parent, { id: card.parent, selectable: false, adapters: [] });
    }
    groups.get(card.parent).adapters.push(card.id);
  }
  return [...groups.values()];
}

export class ModelCatalog {
  constructor() {
    this.cards = [];
    this.signature = "[]";
    this.listeners = [];
    this.loads = 0;
  }

  // Ask the server again (adapters come and go with /v1/load_lora_adapter); pickers are
  // rebuilt only when the list changed. Unreadable (no key yet): no choices, the default.
  async load() {
    const load = ++this.loads;
    let cards = [];
    try {
      cards = (await getJSON("/v1/models")).data ?? [];
    } catch {
      // the page shows why (the key status); requests then go to the default model
    }
    if (load === this.loads) this.set(cards); // an older answer never replaces a newer one
  }

  set(cards) {
    const signature = JSON.stringify(cards.map(({ id, parent }) => [id, parent ?? null]));
    if (signature === this.signature) return;
    this.cards = cards;
    this.signature = signature;
    for (const listener of this.listeners) listener();
  }

  get defaultModel() {
    return this.cards.find((card) => !card.parent)?.id ?? "";
  }

  get groups() {
    return modelGroups(this.cards);
  }

  onChange(listener) {
    this.listeners.push(listener);
  }
}

function choice(value, text, parent) {
  const option = new Option(text, value);
  option.dataset.parent = parent;
  option.title = parent ? `LoRA adapter of ${parent}` : "model";
  return option;
}

// A <select> of the catalog's models and adapters; `element` (the select, or a wrapper given
// as `frame`) is hidden while there is nothing to choose.
export class ModelPicker {
  constructor(catalog, { className = "model-picker", frame = null } = {}) {
    this.catalog = catalog;
    this.select = document.createElement("select");
    this.select.className = className;
    this.element = frame ?? this.select;
    this.wanted = ""; // the user's choice, kept while the server still serves it
    this.listeners = [];
    this.select.addEventListener("change", () => {
      this.wanted = this.select.value;
      for (const listener of this.listeners) listener();
    });
    catalog.onChange(() => this.render());
    this.render();
  }

  render() {
    const fallback = this.catalog.defaultModel;
    const groups = this.catalog.groups;
    this.select.replaceChildren();
    for (const group of groups) {
      const optgroup = document.createElement("optgroup");
      optgroup.label = group.id;
      if (group.selectable) {
        const text = group.id === fallback ? `${group.id} (default)` : group.id;
        optgroup.append(choice(group.id, text, ""));
      }
      for (const adapter of group.adapters) {
        optgroup.append(choice(adapter, `${adapter} · LoRA`, group.id));
      }
      this.select.append(optgroup);
    }
    const values = [...this.select.options].map((option) => option.value);
    this.select.value = values.includes(this.wanted) ? this.wanted : fallback;
    this.element.hidden = values.length <= 1;
  }

  // The chosen model or adapter to send: "" for the default model.
  get choice() {
    const value = this.select.value;
    return value && value !== this.catalog.defaultModel ? value : "";
  }

  // `params` with the choice as adapter_id (the default model: `params` as they are, so an
  // adapter_id typed into a column's JSON still goes).
  withModel(params) {
    const chosen = this.choice;
    return chosen ? { ...params, adapter_id: chosen } : params;
  }

  onChange(listener) {
    this.listeners.push(listener);
  }
}
