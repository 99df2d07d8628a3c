// The playground page: wires the options form, presets, the model / adapter picker, the three
// tabs (generate, compare, few-shot), the run / stop buttons, copy-as and the API key.

import { getJSON, getKey, setKey } from "./api.js";
import { Compare } from "./compare.js";
import { copyText, curlCommands, pythonScript } from "./copy_as.js";
import { FewShotBuilder } from "./fewshot.js";
import { ModelCatalog, ModelPicker } from "./models.js";
import { PRESETS, withPreset } from "./presets.js";
import { OptionsForm, loadSchemas } from "./schema_form.js";
import { OutputColumn, generateRequest, runInto } from "./stream.js";

const $ = (id) => document.getElementById(id);
const STARTING_OPTIONS = { max_new_tokens: 40 };

const page = { tab: "generate", abort: null };
// GET /v1/models needs the key where the server has one: read again once it is given.
const catalog = new ModelCatalog();

function status(text) {
  $("status").textContent = text;
}

async function showModel() {
  try {
    const info = await getJSON("/info");
    $("model-info").textContent = `${info.model_id} · ${info.device} · ${info.dtype}`;
    $("key-status").textContent = getKey() ? "key accepted" : "";
    await catalog.load();
  } catch (error) {
    $("model-info").textContent = "";
    $("key-status").textContent = error.status === 401 ? "the server needs an API key" : error.message;
  }
}

function setupKey() {
  $("api-key").value = getKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("api-key").value.trim());
    showModel();
  });
}

function setupTabs() {
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => selectTab(button.dataset.tab));
  }
}

function selectTab(tab) {
  page.tab = tab;
  document.body.dataset.tab = tab;
  for (const button of document.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
  }
  for (const panel of document.querySelectorAll(".tab-panel")) {
    panel.hidden = panel.dataset.panel !== tab;
  }
  $("prompt-box").hidden = tab === "fewshot";
  $("copy-out").hidden = true;
  catalog.load(); // adapters may have been loaded or unloaded since
}

function setupPresets(form) {
  const container = $("presets");
  for (const preset of PRESETS) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = preset.label;
    button.dataset.preset = preset.id;
    button.title = JSON.stringify(preset.params);
    button.addEventListener("click", () => {
      let current = {};
      try {
        current = form.values();
      } catch {
        // an invalid field is replaced by the preset anyway
      }
      form.setValues(withPreset(current, preset));
      for (const other of container.children) other.classList.toggle("active", other === button);
    });
    container.append(button);
  }
  form.onChange(() => {
    // the highlight only means "the form is exactly this preset" until something is edited
    if (document.activeElement?.closest?.("#options-form")) {
      for (const button of container.children) button.classList.remove("active");
    }
  });
}

// The requests the active tab would send now (each with a title for copy-as). Generate and
// few-shot run on the toolbar's model or adapter (compare columns each have their own).
function currentRequests(form, compare, fewShot, picker) {
  const prompt = $("prompt").value;
  if (page.tab === "compare") return compare.requests(prompt);
  const title = picker.choice ? `model: ${picker.choice}` : "";
  if (page.tab === "fewshot") return [{ title, request: fewShot.request() }];
  return [{ title, request: generateRequest(prompt, picker.withModel(form.values())) }];
}

function setRunning(abort) {
  page.abort = abort;
  $("run").disabled = Boolean(abort);
  $("stop").disabled = !abort;
  document.body.dataset.running = String(Boolean(abort));
}

async function run(form, compare, fewShot, picker, outputs) {
  let jobs;
  try {
    jobs = currentRequests(form, compare, fewShot, picker);
  } catch (error) {
    status(error.message);
    return;
  }
  const abort = new AbortController();
  setRunning(abort);
  status("");
  try {
    if (page.tab === "compare") {
      await Promise.all(jobs.map(({ request, column }) => runInto(request, column.column, abort.signal)));
    } else {
      const output = page.tab === "fewshot" ? outputs.fewShot : outputs.generate;
      await runInto(jobs[0].request, output, abort.signal);
    }
  } finally {
    setRunning(null);
  }
}

async function copyAs(kind, form, compare, fewShot, picker) {
  let jobs;
  try {
    jobs = currentRequests(form, compare, fewShot, picker);
  } catch (error) {
    status(error.message);
    return;
  }
  const origin = window.location.origin;
  const withKey = Boolean(getKey());
  const text = kind === "curl" ? curlCommands(origin, jobs, withKey)
    : pythonScript(origin, jobs, withKey);
  const out = $("copy-out");
  out.textContent = text;
  out.dataset.kind = kind;
  out.hidden = false;
  const copied = await copyText(text);
  status(copied ? `copied as ${kind === "curl" ? "curl" : "Python"}` : "shown below: copy it by hand");
}

async function main() {
  setupKey();
  setupTabs();
  showModel();
  let schemas;
  try {
    schemas = await loadSchemas();
  } catch (error) {
    $("options-form").textContent = `Could not load /openapi.json: ${error.message}`;
    return;
  }
  const form = new OptionsForm($("options-form"), schemas.GenerateParameters);
  form.setValues(STARTING_OPTIONS);
  setupPresets(form);
  const picker = new ModelPicker(catalog, { frame: $("model-choice") });
  picker.select.id = "model-picker";
  $("model-choice").append(picker.select);
  const compare = new Compare($("compare-columns"), () => form.values(), catalog);
  const fewShot = new FewShotBuilder(
    {
      root: $("tab-fewshot"),
      task: $("fs-task"),
      query: $("fs-query"),
      examples: $("fs-examples"),
      addExample: $("fs-add-example"),
      templateFields: $("fs-template-fields"),
      prompt: $("fs-prompt"),
      promptInfo: $("fs-prompt-info"),
    },
    schemas,
    () => picker.withModel(form.values()),
  );
  const outputs = {
    generate: new OutputColumn($("generate-output"), "Output"),
    fewShot: new OutputColumn($("fewshot-output"), "Answer"),
  };
  form.onChange(() => {
    compare.refresh();
    fewShot.schedulePreview();
  });
  $("key-form").addEventListener("submit", () => fewShot.schedulePreview());
  picker.onChange(() => fewShot.schedulePreview());
  $("add-column").addEventListener("click", () => compare.add());
  $("remove-column").addEventListener("click", () => compare.removeLast());
  $("run").addEventListener("click", () => run(form, compare, fewShot, picker, outputs));
  $("stop").addEventListener("click", () => page.abort?.abort());
  for (const kind of ["curl", "python"]) {
    $(`copy-${kind}`).addEventListener("click", () => copyAs(kind, form, compare, fewShot, picker));
  }
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("run").click();
  });
  fewShot.preview();
  selectTab("generate");
  document.body.dataset.ready = "true";
}

main();
