// Decoding presets from the classic comparison of generation strategies ("How to generate
// text", Hugging Face blog). Each sets only the strategy: max_new_tokens, seed and stop come
// from the form, so a compare run varies nothing but the strategy.

export const PRESETS = [
  { id: "greedy", label: "Greedy", params: { do_sample: false } },
  {
    id: "beam",
    label: "Beam search",
    params: { num_beams: 5, no_repeat_ngram_size: 2, early_stopping: true },
  },
  { id: "pure", label: "Pure sampling", params: { do_sample: true, top_k: 0 } },
  { id: "temperature", label: "Temperature 0.7", params: { do_sample: true, top_k: 0, temperature: 0.7 } },
  { id: "top-k", label: "Top-k 50", params: { do_sample: true, top_k: 50 } },
  { id: "top-p", label: "Top-p 0.92", params: { do_sample: true, top_p: 0.92, top_k: 0 } },
  { id: "top-k-top-p", label: "Top-k + top-p", params: { do_sample: true, top_k: 50, top_p: 0.95 } },
];

// The options a preset keeps from the form.
export const SHARED_OPTIONS = ["max_new_tokens", "seed", "stop"];

export function presetById(id) {
  return PRESETS.find((preset) => preset.id === id);
}

// The form's shared options plus the preset's strategy.
export function withPreset(formParams, preset) {
  const params = {};
  for (const name of SHARED_OPTIONS) {
    if (formParams[name] !== undefined) params[name] = formParams[name];
  }
  return { ...params, ...preset.params };
}
