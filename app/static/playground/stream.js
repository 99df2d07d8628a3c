// Running one request into an output column: streamed token by token over SSE where the
// server streams (POST /generate_stream, POST /few-shot with stream), or one JSON answer
// where it cannot (beam search: beams change until the end, so the server sends their text
// only when done; several sequences; the exact diagnostic lane). Stats go under the column.

import { isAbort, postJSON, sseEvents } from "./api.js";

// Whether the server streams these options token by token.
export function isStreamable(params) {
  return (params.num_beams ?? 1) <= 1
    && (params.num_return_sequences ?? 1) <= 1
    && (params.best_of ?? 1) <= 1
    && !params.output_attentions
    && !params.output_hidden_states;
}

function streamNote(params) {
  if ((params.num_beams ?? 1) > 1) return "beam search, not streamed";
  if (params.output_attentions || params.output_hidden_states) return "exact lane, not streamed";
  return "several sequences, not streamed";
}

// POST /generate_stream, or POST /generate (with details, for the token count).
export function generateRequest(prompt, params) {
  const stream = isStreamable(params);
  if (stream) {
    return { kind: "tgi", path: "/generate_stream", stream, prompt, body: { inputs: prompt, parameters: params } };
  }
  const parameters = { ...params, details: params.details ?? true };
  return {
    kind: "tgi", path: "/generate", stream, prompt, note: streamNote(params),
    body: { inputs: prompt, parameters },
  };
}

// POST /few-shot, streamed where the options allow.
export function fewShotRequest(body) {
  const stream = isStreamable(body.parameters);
  const request = { kind: "fewshot", path: "/few-shot", stream, prompt: "", body: { ...body, stream } };
  if (!stream) request.note = streamNote(body.parameters);
  return request;
}

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One result: a header (label and whatever the caller adds), the text, the stats.
export class OutputColumn {
  constructor(parent, label = "") {
    this.element = make("div", "column");
    this.element.dataset.state = "idle";
    this.head = make("div", "column-head");
    this.label = make("span", "label", label);
    this.head.append(this.label);
    this.output = make("div", "output");
    this.output.lang = "ko";
    this.promptText = make("span", "prompt-text");
    this.generated = make("span", "generated");
    this.output.append(this.promptText, this.generated);
    this.stats = make("div", "stats");
    this.element.append(this.head, this.output, this.stats);
    parent.append(this.element);
  }

  start(prompt, note) {
    this.element.dataset.state = "running";
    delete this.element.dataset.tokens;
    this.promptText.textContent = prompt;
    this.generated.textContent = "";
    this.stats.textContent = note ? `running… (${note})` : "running…";
  }

  append(text) {
    this.generated.append(text); // a text node per token: the text so far is never re-parsed
  }

  setText(text) {
    this.generated.textContent = text;
  }

  finish(summary) {
    this.element.dataset.state = "done";
    this.element.dataset.tokens = String(summary.tokens);
    this.stats.textContent = summaryText(summary);
  }

  stopped(summary) {
    this.element.dataset.state = "stopped";
    this.stats.textContent = `stopped · ${summaryText(summary)}`;
  }

  fail(message) {
    this.element.dataset.state = "error";
    const error = make("span", "error", message);
    this.stats.replaceChildren(error);
  }

  remove() {
    this.element.remove();
  }
}

export function summaryText({ tokens, seconds, firstToken, finish, note }) {
  const parts = [`${tokens} tokens`];
  if (seconds > 0) parts.push(`${(tokens / seconds).toFixed(1)} tok/s`);
  if (firstToken !== null && firstToken !== undefined) {
    parts.push(`first token ${firstToken.toFixed(2)} s`);
  }
  parts.push(`${seconds.toFixed(2)} s`);
  if (finish) parts.push(finish);
  if (note) parts.push(note);
  return parts.join(" · ");
}

// Run `request` into `column` until done, failed or aborted through `signal`.
export async function runInto(request, column, signal) {
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  let firstToken = null;
  let tokens = 0;
  column.start(request.body.parameters?.return_full_text && !request.stream ? "" : request.prompt,
    request.note);
  try {
    let finish = null;
    if (request.stream) {
      for await (const event of sseEvents(request.path, request.body, signal)) {
        if (firstToken === null) firstToken = elapsed();
        tokens = event.index ?? tokens + 1;
        column.append(event.token.text);
        if (event.details) {
          tokens = event.details.generated_tokens;
          finish = event.details.finish_reason;
          // few-shot: the final event carries the answer as the server strips it
          if (request.kind === "fewshot") column.setText(event.generated_text);
        }
      }
    } else {
      const answer = await postJSON(request.path, request.body, signal);
      if (request.kind === "fewshot") {
        column.setText(answer.answer);
        tokens = answer.generated_tokens;
        finish = answer.finish_reason;
      } else {
        column.setText(answer.generated_text);
        tokens = answer.details?.generated_tokens ?? 0;
        finish = answer.details?.finish_reason ?? null;
      }
    }
    column.finish({ tokens, seconds: elapsed(), firstToken, finish, note: request.note });
  } catch (error) {
    if (isAbort(error)) column.stopped({ tokens, seconds: elapsed(), firstToken });
    else column.fail(error.field ? `${error.message} (field: ${error.field})` : error.message);
  }
}
