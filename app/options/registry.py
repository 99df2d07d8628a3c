"""Every generate option, once: the one registry the rest is generated from (pure data, no torch).

One `Option` per field of transformers' `GenerationConfig` (5.23) plus the API's own options.
From it come the request schema (app/api/options.py, app/api/protocol/tgi.py: each field's
type, bounds, default and description), docs/options.md (app/options/docs.py), the routing of
a request's options (app/options/routing.py: which lane or stage serves each one) and the
resolve step's defaults and range checks (app/options/resolve.py). Each option's numeric
bounds are written here only (`Range`); tests/unit/test_option_registry.py keeps the registry
true to transformers, the schema, the resolve step and the tests that cover each option.

Columns: the contract class (../shared/GENERATE_OPTIONS.md: A..F, or "API" for API-only
fields), the wire type and description, the range (numeric bounds) and `rules` (other
constraints, as text), the default precedence (`checkpoint`: the checkpoint's
generation_config may set it; `default`: HF's global default, else the API's), the status,
the lane that serves a served value, a valid example (served via the engine) and the neutral
values that count as "omitted" for a refused option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.options.ranges import Range
from app.options.wire_types import Grammar, TokenIds

SERVED, IGNORED, REJECTED, NOT_YET = "served", "accepted-ignored", "rejected-422", "not-yet"
STATUSES = (SERVED, IGNORED, REJECTED, NOT_YET)
CLASSES = ("A", "B", "C", "D", "E", "F", "API")
GENERATION_CONFIG_CLASSES = frozenset("ABCDE")  # F and API fields are not GenerationConfig's
# Who serves a served value: the batched engine, the HTTP layer, the exact slow lane, the
# class-B methods. "-" for an option that is not served.
ENGINE, API, EXACT_LANE, CLASS_B, NO_LANE = "engine", "api", "exact-lane", "class-b", "-"
LANES = (ENGINE, API, EXACT_LANE, CLASS_B)
# Which request model declares the field: GenerateOptions (every generate route, the OpenAI
# routes' extra fields), GenerateParameters (TGI's own parameters), GenerateRequest.
OPTIONS_MODEL, TGI_MODEL, REQUEST_MODEL = "options", "tgi", "request"

NOT_APPLICABLE = "not applicable to a decoder-only GPT-2 (it needs an encoder-decoder model)"
NO_DRAFT = "no draft model configured: assisted decoding needs one (start the server with " \
    "--draft-model)"  # fmt: skip
LOSSY = (
    "refused: ensemble verification changes the output, and speculative decoding here is "
    "lossless (identical to plain decoding); without --draft-model: no draft model configured"
)
TOKEN_IDS = "token ids < vocab"
# The range torch.Generator.manual_seed accepts (seed; watermarking_config.hashing_key).
TORCH_SEED = Range(ge=-(2**63), le=2**64 - 1, schema=())
# vLLM's default max_logprobs and OpenAI's chat top_logprobs limit: 20.
TOP_N_TOKENS = Range(ge=0, le=20, schema=("ge",))
TOKEN_ID = Range(ge=0, hint=" (a token id)")  # pad_token_id, and each eos_token_id
ASSISTANT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")
PENALTY = Range(ge=-2, le=2)  # OpenAI's presence / frequency penalty range (vLLM, TGI: same)
PENALTY_NOTE = (
    "vLLM's formula over the generated tokens only (not the prompt), applied right after "
    "repetition_penalty; not with beams, class-B methods or the exact lane (422)"
)


@dataclass(frozen=True)
class Option:
    name: str
    cls: str
    annotation: Any  # the wire type (None is always allowed on top: "omitted")
    description: str  # the request schema's description
    range: Range | None = None
    rules: str = ""  # constraints beyond `range`, as text (cross-field, token ids, ...)
    default: Any = None  # when omitted: HF's global default, else the API's (None: unset / off)
    checkpoint: bool = False  # user > checkpoint's generation_config > default
    default_text: str = ""  # docs: the default in words, when `default` alone does not say it
    status: str = SERVED
    lane: str = ENGINE
    neutral: tuple[Any, ...] = ()  # refused options: values accepted as "omitted"
    note: str = ""
    example: dict[str, Any] | None = None  # served via the engine: options resolve accepts
    model: str = OPTIONS_MODEL  # the request model that declares it
    wire_default: Any = None  # the schema's default (null = omitted)
    finite: bool = False  # the schema rejects inf / nan (allow_inf_nan=False)
    type_text: str = ""  # docs: the type, when the wire annotation is looser

    @property
    def range_text(self) -> str:
        """The allowed values in words: the range, then the other rules."""
        parts = [self.range.doc] if self.range is not None else []
        return "; ".join([*parts, self.rules] if self.rules else parts) or "any"

    @property
    def default_doc(self) -> str:
        text = self.default_text or ("null" if self.default is None else _literal(self.default))
        return ("checkpoint, else " + text) if self.checkpoint else text


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _o(name: str, cls: str, annotation: Any, description: str, **kw: Any) -> Option:
    if kw.get("status", SERVED) != SERVED:
        kw.setdefault("lane", NO_LANE)
    return Option(name, cls, annotation, description, **kw)


def _a(name: str, annotation: Any, description: str, example: Any, **kw: Any) -> Option:
    """A class-A option served by the batched engine; the checkpoint may set it."""
    ex = example if isinstance(example, dict) and name in example else {name: example}
    kw.setdefault("checkpoint", True)
    return _o(name, "A", annotation, description, example=ex, **kw)


def _b(name: str, annotation: Any, description: str, rules: str, what: str, **kw: Any) -> Option:
    """A class-B option: served natively, one request at a time between batch steps."""
    note = what + " (transformers 4.x's algorithm; README: Decoding methods beyond transformers 5)"
    return _o(name, "B", annotation, description, rules=rules, lane=CLASS_B, note=note, **kw)


def _d(name: str, annotation: Any, description: str, flag: str) -> Option:
    """A class-D (engine-owned) setting: accepted, no effect on output."""
    return _o(name, "D", annotation, description, rules="any", default_text="engine-owned",
              status=IGNORED, note=flag)  # fmt: skip


def _e(name: str, annotation: Any, description: str, neutral: tuple[Any, ...], reason: str,
       default: Any = None) -> Option:  # fmt: skip
    """A class-E option that is not applicable: refused unless neutral."""
    return _o(name, "E", annotation, description, rules="neutral only", default=default,
              status=REJECTED, neutral=neutral, note=reason)  # fmt: skip


_ASSISTED = "Assisted decoding (needs --draft-model)."


def _x(name: str, annotation: Any, example: Any, neutral: tuple[Any, ...], note: str,
       **kw: Any) -> Option:  # fmt: skip
    """A class-E assisted-decoding option: served with --draft-model (output identical to
    plain decoding), else refused unless neutral (routing.split_options)."""
    return _o(name, "E", annotation, _ASSISTED, example={name: example}, neutral=neutral,
              note="needs --draft-model, else 422 (no draft model); " + note, **kw)  # fmt: skip


def _outputs(names: tuple[str, ...], description: str) -> list[Option]:
    return [
        _o(name, "A", bool, description, default=False, lane=API,
           note="true = `details: true` on the TGI routes (per-token id, text, logprob, "
           "top_n_tokens alternatives); /v1: use `logprobs`")
        for name in names
    ]  # fmt: skip


def _diagnostics(names: tuple[str, ...]) -> list[Option]:
    return [
        _o(name, "C", bool, f"Return {name[7:].replace('_', ' ')} (exact slow lane, size-capped).",
           rules="size-capped (--exact-lane-max-floats)", default=False, lane=EXACT_LANE,
           note="transformers' own generate for this request alone, run on the engine thread; "
           f"`details.{name[7:]}`; POST /generate, / and non-streaming /v1/completions only")
        for name in names
    ]  # fmt: skip


_ROWS: list[Option] = [
    # -- A: length and stopping ----------------------------------------------------------
    _a("max_new_tokens", int, "New tokens to generate (default: the checkpoint's).", 5,
       range=Range(ge=1), rules="prompt + value <= n_positions", default_text="20"),
    _a("max_length", int, "Prompt + new tokens (max_new_tokens wins).", 12, range=Range(ge=1),
       rules="prompt < value <= n_positions", default=20, default_text="prompt + 20"),
    _a("min_new_tokens", int, "Eos is masked until this many new tokens.", 2, range=Range(ge=0),
       rules="<= max new tokens"),
    _a("min_length", int, "Eos is masked until prompt + output reach this.", 6,
       range=Range(ge=0), rules="<= max length", default=0),
    _a("max_time", float, "Stop after this many seconds.", 30.0,
       range=Range(gt=0, hint=" seconds"), finite=True),
    _a("early_stopping", bool | Literal["never"], "Beam search stopping rule.",
       {"early_stopping": "never", "num_beams": 2}, rules='true, false, "never"', default=False),
    _a("stop_strings", list[str] | str, "Stop when the output contains one of these.", ["다."],
       rules="non-empty strings (alias `stop`)", type_text="str | list[str]"),
    _a("eos_token_id", TokenIds, "Token id(s) that end generation.", [1, 8], rules=TOKEN_IDS,
       default_text="null"),
    _a("pad_token_id", int, "Padding token id.", 0, range=TOKEN_ID,
       rules=TOKEN_IDS, default_text="the first eos id"),
    _o("bos_token_id", "A", int, "Accepted; no effect (generation starts from the prompt).",
       range=Range(ge=0), checkpoint=True, status=IGNORED,
       note="no effect: generation always starts from the given prompt"),
    _o("ignore_eos", "API", bool, "Do not stop at eos (vLLM name; generate(eos_token_id=None)).",
       rules="not with beams", default=False, example={"ignore_eos": True},
       note="generate(eos_token_id=None)"),
    # -- A: strategy ---------------------------------------------------------------------
    _a("do_sample", bool, "Sample instead of greedy / beam search.", True, default=False),
    _a("num_beams", int, "Beams for beam search (1 = no beam search).", 3, range=Range(ge=1),
       default=1),
    _a("num_return_sequences", int, "Sequences returned (<= num_beams in beam search).",
       {"num_return_sequences": 2, "do_sample": True}, range=Range(ge=1),
       rules="<= num_beams with beams; 1 when greedy", default=1),
    _a("length_penalty", float, "Beam score length exponent.", 2.0, rules="finite", default=1.0,
       finite=True),
    _o("use_cache", "A", bool, "Accepted; the server always uses its paged KV cache.",
       default=True, status=IGNORED, note="no effect on output: the paged KV cache is always used"),
    _o("seed", "API", int, "Per-request seed: same tokens as torch.manual_seed(seed); generate().",
       range=TORCH_SEED, default_text="null (the engine's generator)",
       example={"seed": 42, "do_sample": True}),
    # -- A: logits processing ------------------------------------------------------------
    _a("temperature", float, "Softmax temperature (> 0 when sampling).", 0.7, range=Range(ge=0),
       rules="> 0 when sampling", default=1.0),
    _a("top_k", int, "Keep the k most likely tokens (0 disables).", 20,
       range=Range(ge=0, hint=" (0 disables top-k)"), default=50),
    _a("top_p", float, "Nucleus sampling mass, in (0, 1].", 0.9, range=Range(gt=0, le=1),
       default=1.0),
    _a("min_p", float, "Min probability relative to the top token, in [0, 1].", 0.1,
       range=Range(ge=0, le=1), default_text="null (off)"),
    _a("typical_p", float, "Locally typical sampling mass, in (0, 1].", 0.8,
       range=Range(gt=0, le=1), default=1.0, default_text="1.0 (off)"),
    _a("epsilon_cutoff", float, "Epsilon sampling cutoff, in [0, 1).", 0.001,
       range=Range(ge=0, lt=1), default=0.0, default_text="0.0 (off)"),
    _a("eta_cutoff", float, "Eta sampling cutoff, in [0, 1).", 0.001, range=Range(ge=0, lt=1),
       default=0.0, default_text="0.0 (off)"),
    _a("top_h", float, "Top-H (entropy) sampling mass, in (0, 1].", 0.5, range=Range(gt=0, le=1),
       default_text="null (off)"),
    _a("repetition_penalty", float, "Penalty for repeated tokens (1.0 = off).", 1.3,
       range=Range(gt=0, hint=" (1.0 is off)"), default=1.0, default_text="1.0 (off)"),
    _o("frequency_penalty", "API", float,
       "OpenAI / vLLM frequency penalty: each token's logit -= value x its count in the output "
       "so far (0 = off).", range=PENALTY, default=0.0, default_text="0.0 (off)", finite=True,
       example={"frequency_penalty": 0.5}, note=PENALTY_NOTE),
    _o("presence_penalty", "API", float,
       "OpenAI / vLLM presence penalty: each token's logit -= value once it is in the output "
       "(0 = off).", range=PENALTY, default=0.0, default_text="0.0 (off)", finite=True,
       example={"presence_penalty": 0.5}, note=PENALTY_NOTE),
    _a("no_repeat_ngram_size", int, "No n-gram of this size repeats (0 = off).", 3,
       range=Range(ge=0, hint=" (0 is off)"), default=0, default_text="0 (off)"),
    _a("bad_words_ids", list[list[int]], "Token sequences that may not be generated.",
       [[5], [300, 301]], rules="non-empty lists of " + TOKEN_IDS),
    _o("bad_words", "API", list[str], "Words that may not be generated (tokenized server-side).",
       rules="words of >= 1 token", example={"bad_words": ["국민"]},
       note="tokenized into bad_words_ids"),
    _a("sequence_bias", list[list[Any]], "Bias for token sequences: [[[ids...], bias], ...].",
       [[[10], 5.0]], rules="finite biases, " + TOKEN_IDS, type_text="list[[list[int], float]]"),
    _a("suppress_tokens", list[int], "Token ids that are never generated.", [10, 11],
       rules=TOKEN_IDS),
    _a("begin_suppress_tokens", list[int], "Token ids not generated as the first token.", [10],
       rules=TOKEN_IDS),
    _a("forced_bos_token_id", int, "Token id forced as the first generated token.", 7,
       range=Range(ge=0), rules=TOKEN_IDS),
    _a("forced_eos_token_id", TokenIds, "Token id(s) forced when max_length is reached.", 1,
       rules=TOKEN_IDS),
    _a("exponential_decay_length_penalty", list[Any],
       "[start_index, decay_factor]: eos becomes likelier after start_index new tokens.", [5, 1.5],
       rules="start >= 0, factor > 0", type_text="[int, float]"),
    _a("renormalize_logits", bool, "Renormalize after the logits processors.", True,
       default=False),
    _a("remove_invalid_values", bool, "Replace nan / inf logits.", True, default=False),
    _a("guidance_scale", float, "Classifier-free guidance scale (1 = off).", 1.5,
       rules="finite; 1 = off; num_beams 1, one sequence", default_text="null (off)"),
    _o("negative_prompt", "F", str, "Negative prompt text for classifier-free guidance.",
       rules="non-empty; not with negative_prompt_ids", lane=API,
       note="tokenized into negative_prompt_ids"),
    _o("negative_prompt_ids", "F", list[int], "Negative prompt token ids for guidance.",
       rules="non-empty " + TOKEN_IDS + "; needs guidance_scale != 1",
       default_text="null (the prompt's last token)",
       example={"negative_prompt_ids": [5, 6], "guidance_scale": 1.5}),
    _a("watermarking_config", dict[str, Any], "transformers WatermarkingConfig fields.",
       {"bias": 3.0}, rules="WatermarkingConfig fields", default_text="null (off)",
       note="detect with POST /watermark/detect (transformers' WatermarkDetector)"),
    _a("token_healing", bool, "Heal the prompt's last token boundary.", True,
       default_text="false"),
    _o("allowed_token_ids", "F", list[int],
       "Only these token ids may be generated (prefix_allowed_tokens_fn; eos only if listed).",
       rules="non-empty " + TOKEN_IDS + "; num_beams 1", example={"allowed_token_ids": [1, 5, 6]},
       note="prefix_allowed_tokens_fn's HTTP form: only these ids (eos only if listed)"),
    _o("grammar", "F", Grammar,
       "Constrained output: a JSON schema or a regex the output must match (docs/grammar.md).",
       rules="a valid JSON schema or regex; num_beams 1",
       type_text='{"type": "json" | "json_object" | "json_schema" | "regex", "value"}',
       example={"grammar": {"type": "regex", "value": "[0-9]+"}},
       note="grammar-constrained output (llguidance, docs/grammar.md); prefix_allowed_tokens_fn's "
       "place in the processor order; /v1 routes: also `response_format`"),
    # -- A: speculative (same output, only faster) ---------------------------------------
    _a("prompt_lookup_num_tokens", int,
       "Prompt lookup: draft this many tokens from the text's own n-grams and verify them "
       "in one forward (faster on repetitive text; output identical).", 3, range=Range(ge=1),
       default_text="null (off)",
       note="speculative: drafts from the sequence's own n-grams, verified in one forward; "
       "output identical to the request without it (beams, n > 1 and guidance decode plainly)"),
    _a("max_matching_ngram_size", int,
       "Prompt lookup: the longest n-gram matched (default 2; no effect on output).",
       {"max_matching_ngram_size": 3, "prompt_lookup_num_tokens": 3}, range=Range(ge=1),
       default_text="null (2)", note="prompt lookup's longest n-gram; no effect on output"),
    # -- A: outputs (mapped to `details`), C: diagnostic outputs (the exact slow lane) ---
    *_outputs(("output_scores", "output_logits"), "true = `details: true` (per-token logprobs)."),
    *_outputs(("return_dict_in_generate",), "true = `details: true` (the response is a dict)."),
    *_diagnostics(("output_attentions", "output_hidden_states")),
    # -- B: removed from transformers 5 core, served natively (app/engine/lanes/class_b) -
    _b("num_beam_groups", int, "Group (diverse) beam search: groups of beams.",
       "divides num_beams; > 1 needs diversity_penalty > 0 and do_sample false",
       "group (diverse) beam search", range=Range(ge=1), default=1, default_text="1 (off)"),
    _b("diversity_penalty", float, "Group beam search: penalty per earlier group's token.",
       "> 0 with num_beam_groups > 1; 0 = off", "diverse beam search: subtracted per earlier "
       "group's pick of a token", default=0.0, default_text="0.0 (off)"),
    _b("penalty_alpha", float, "Contrastive search degeneration penalty, in [0, 1].",
       "> 0 needs top_k > 1, num_beams 1, do_sample false",
       "contrastive search (with top_k candidates)", range=Range(ge=0, le=1, schema=()),
       default_text="null (off)"),
    _b("dola_layers", str | list[int], 'DoLa layers: "low", "high" or layer indices.',
       '"low", "high" or layers in [0, n_layer); num_beams 1',
       "DoLa decoding (greedy or sampling; repetition_penalty 1.2 recommended)",
       default_text="null (off)"),
    _b("constraints", list[Any],
       'Constrained beam search: {"type": "phrasal", "token_ids": [...]} or '
       '{"type": "disjunctive", "nested_token_ids": [[...], ...]} items.',
       '{"type": "phrasal", "token_ids"} or {"type": "disjunctive", "nested_token_ids"}; '
       "num_beams > 1", "constrained beam search", type_text="list[object]"),
    _b("force_words_ids", list[Any],
       "Constrained beam search: token ids of words that must appear (a list of lists: one of).",
       TOKEN_IDS + "; a list of lists = one of them; num_beams > 1",
       "constrained beam search: every word appears",
       type_text="list[list[int]] | list[list[list[int]]]"),
    _o("force_words", "API", list[str | list[str]],
       "Words that must appear (tokenized server-side; a list of strings: one of them).",
       rules="words of >= 1 token; a list = one of them; num_beams > 1", lane=CLASS_B,
       note="tokenized into force_words_ids (constrained beam search)"),
    # -- D: engine-owned settings (no effect on output) --------------------------------
    _d("cache_implementation", str, "Accepted; the server's paged KV cache is used.",
       "paged KV cache: --block-size, --num-kv-blocks, --kv-cache-memory-gb"),
    _d("cache_config", dict[str, Any], "Accepted; see the server's KV cache flags.",
       "--block-size, --num-kv-blocks, --kv-cache-memory-gb"),
    _d("max_cache_len", int, "Accepted; see the server's KV cache flags.",
       "--max-total-tokens (and the KV pool: --num-kv-blocks)"),
    _d("compile_config", dict[str, Any], "Accepted; the server compiles by its own flags.",
       "none: the paged forward is not compiled"),
    _d("disable_compile", bool, "Accepted; no effect on output.",
       "none: the paged forward is not compiled"),
    _d("prefill_chunk_size", int, "Accepted; see --max-num-batched-tokens.",
       "--max-num-batched-tokens (chunked prefill budget)"),
    _d("continuous_batching_config", dict[str, Any], "Accepted; the server batches.",
       "--max-num-seqs, --max-num-batched-tokens, --max-waiting-requests"),
    _d("low_memory", bool, "Accepted; no effect on output.",
       "--max-num-seqs (beams always run as one batch); HF's beam search raises for "
       "low_memory=true, here it is ignored"),
    # -- E: not applicable / assisted decoding -----------------------------------------
    _e("encoder_repetition_penalty", float, "Encoder-decoder only: rejected for GPT-2.",
       (1.0, 1), NOT_APPLICABLE, default=1.0),
    _e("encoder_no_repeat_ngram_size", int, "Encoder-decoder only: rejected for GPT-2.", (0,),
       NOT_APPLICABLE, default=0),
    _e("decoder_start_token_id", TokenIds, "Encoder-decoder only: rejected for GPT-2.", (),
       NOT_APPLICABLE),
    _e("use_mtp", bool, "Multi-token prediction heads: not in GPT-2.", (False,),
       "GPT-2 has no multi-token prediction heads"),
    _x("num_assistant_tokens", int, 5, (20,), "drafts per step (the heuristic schedules' start "
       "value)", range=Range(ge=1, schema=()), checkpoint=True, default=20),
    _x("num_assistant_tokens_schedule", str, "heuristic", ("constant",), "heuristic: 2 more "
       "drafts after a fully accepted step, else 1 fewer (per request, so heuristic_transient "
       'is the same)', rules=", ".join(f'"{s}"' for s in ASSISTANT_SCHEDULES), checkpoint=True,
       default="constant"),
    _x("assistant_confidence_threshold", float, 0.5, (0.4,), "drafting stops after a draft the "
       "draft model gives less probability (fixed; transformers re-tunes it)",
       range=Range(ge=0, lt=1, schema=()), checkpoint=True, default=0.4),
    _x("assistant_lookbehind", int, 3, (10,), "no effect: the draft shares the model's "
       "tokenizer (nothing to re-align)", range=Range(ge=0, schema=()), default=10),
    _x("target_lookbehind", int, 3, (10,), "no effect: the draft shares the model's tokenizer "
       "(nothing to re-align)", range=Range(ge=0, schema=()), default=10),
    _x("assistant_early_exit", int, 2, (), "no effect: the --draft-model drafts, not the "
       "model's first layers", range=Range(ge=1, schema=())),
    _e("assistant_ensemble_weight", float, _ASSISTED, (), LOSSY),
    _x("is_assistant", bool, True, (False,), "no effect (transformers' internal flag)"),
    _x("speculation_type", str, "dflash", (), "no effect: the --draft-model drafts (ordinary "
       'assisted decoding)', rules='"dflash"'),
    # -- API extras ----------------------------------------------------------------------
    _o("top_n_tokens", "API", int, "Return this many most likely alternatives per token.",
       range=TOP_N_TOKENS, default=0, example={"top_n_tokens": 3}),
    # -- TGI's own parameters (GenerateParameters) -------------------------------------
    _o("stop", "API", list[str], "Stop strings (TGI name).", rules="non-empty strings",
       lane=API, model=TGI_MODEL, note="TGI's name, merged into stop_strings"),
    _o("details", "API", bool, "Return per-token details.", default=False, lane=API,
       model=TGI_MODEL, wire_default=False),
    _o("decoder_input_details", "API", bool,
       "Also return the prompt tokens (logprob null) in details.", default=False, lane=API,
       model=TGI_MODEL, wire_default=False),
    _o("return_full_text", "API", bool | None, "Prepend the prompt to generated_text.",
       default=False, lane=API, model=TGI_MODEL, wire_default=False),
    _o("best_of", "API", int, "Sample this many sequences, return the most likely.",
       range=Range(ge=1), lane=API, model=TGI_MODEL,
       note="num_return_sequences; the most likely is returned"),
    _o("truncate", "API", int, "Keep only the last `truncate` prompt tokens.", range=Range(ge=1),
       lane=API, model=TGI_MODEL),
    _o("watermark", "API", bool, "Watermark (default WatermarkingConfig).", default=False,
       lane=API, model=TGI_MODEL, wire_default=False,
       note="watermarking_config = transformers' default WatermarkingConfig"),
    _o("adapter_id", "API", str, "A loaded LoRA adapter by name (or the model's name).",
       lane=API, model=TGI_MODEL,
       note="selects a LoRA adapter (--lora-modules, /v1/load_lora_adapter); unknown: 404"),
    # -- the prompt as ids (GenerateRequest) -------------------------------------------
    _o("input_ids", "API", list[int], "The prompt as token ids (instead of `inputs`).",
       rules="non-empty " + TOKEN_IDS, default_text="null (use `inputs`)", lane=API,
       model=REQUEST_MODEL, note="the prompt as token ids (TGI routes; /v1: `prompt`)"),
]  # fmt: skip

OPTIONS: dict[str, Option] = {row.name: row for row in _ROWS}
assert len(OPTIONS) == len(_ROWS), "an option is listed twice"


def option_range(name: str) -> Range:
    """The option's bounds (for a check, or a wire field that maps onto the option)."""
    bounds = OPTIONS[name].range
    assert bounds is not None, f"`{name}` has no numeric range"
    return bounds


def names(*, model: str | None = None, lane: str | None = None) -> tuple[str, ...]:
    """Options in registry order, by the request model that declares them and / or lane."""
    return tuple(
        n
        for n, o in OPTIONS.items()
        if (model is None or o.model == model) and (lane is None or o.lane == lane)
    )


# Served only when the server has a draft model (--draft-model); split_options refuses them
# otherwise.
NEEDS_DRAFT_MODEL = frozenset(n for n, o in OPTIONS.items() if o.cls == "E" and o.status == SERVED)
EXACT_LANE_OPTIONS = names(lane=EXACT_LANE)
DETAILS_OPTIONS = ("output_scores", "output_logits", "return_dict_in_generate")
# HF's global defaults and the API's own, for the options the resolve step fills.
DEFAULTS: dict[str, Any] = {n: o.default for n, o in OPTIONS.items() if o.default is not None}
