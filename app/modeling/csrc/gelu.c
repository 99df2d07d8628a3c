/* GPT-2's gelu_new in place, one pass (float32, CPU): x * sigmoid(2u) with
 * u = sqrt(2/pi) (x + 0.044715 x^3), the same function as 0.5 x (1 + tanh(u)).
 *
 * torch runs it as five elementwise passes over the MLP's [rows, 4 * n_embd] activations
 * (app/modeling/gpt2.py gelu_new); this is one pass with the vectorizable exp of
 * fast_exp.h. Differs from transformers' gelu_new by float32 rounding.
 */
#include <stdint.h>

#include <omp.h>

#include "fast_exp.h"

static inline float gelu_new_one(float x) {
    const float c2 = 1.5957691216057308f; /* 2 sqrt(2/pi) */
    const float z = c2 * (x + 0.044715f * x * x * x);
    /* sigmoid(z) from exp(-|z|) only, so the exp never overflows and tiny results keep
     * their precision: s = 1 / (1 + t); sigmoid = s for z >= 0, t * s below. */
    const float t = exp_nonpositive(-fabsf(z));
    const float s = 1.0f / (1.0f + t);
    return x * (z >= 0.0f ? s : t * s);
}

void kogpt_gelu_new_f32(float *x, int64_t n, int32_t n_threads) {
#pragma omp parallel for simd schedule(static) num_threads(n_threads) if (n >= 65536)
    for (int64_t i = 0; i < n; i++) x[i] = gelu_new_one(x[i]);
}
