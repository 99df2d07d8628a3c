/* Decode attention that reads the paged KV cache in place (float32, CPU).
 *
 * Built and loaded by app/modeling/native.py (plain C, no torch headers: the
 * compiler takes about a second). The torch path gathers every sequence's K/V blocks into
 * a contiguous buffer per layer and then runs SDPA over it, so each cached value crosses
 * memory three times; here it is read once, where it lies.
 *
 * Layouts (docs/ARCHITECTURE.md, KV cache contract):
 *   q:       row r, head h at q + r * q_stride + h * head_dim
 *   k/v:     slot s, head h at cache + (s * n_head + h) * head_dim
 *   tables:  sequence i's block ids at tables + i * table_stride
 *   out:     row r, head h at out + r * out_stride + h * head_dim
 * Sequence i has one query (row rows[i]) that attends to its ctx[i] first positions;
 * position p lives in slot tables[i][p / block_size] * block_size + p % block_size.
 *
 * The softmax is exact (max, exp, sum over the whole context, then one weighted sum of V),
 * with the vectorizable exp of fast_exp.h. Results differ from SDPA by float32 rounding only.
 *
 * Batch invariance (app/modeling/batch_invariant.py): a row's result depends only on its
 * query, its context length and the K/V of that context, never on the other rows, their
 * number or how work is split between threads (per sequence or per (sequence, head): each
 * head's sums run the same code either way). Batch-invariant mode attends every token,
 * prefill or decode, through this kernel; keep any change to it row-local.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>

#include "fast_exp.h"

static void attend_one(const float *qi, const float *k_cache, const float *v_cache,
                       const int32_t *table, int32_t ctx, int32_t n_head, int32_t h0,
                       int32_t h1, int32_t head_dim, int32_t block_size, float scale,
                       float *scores, float *oi) {
    const int64_t token_stride = (int64_t)n_head * head_dim;
    const int32_t nh = h1 - h0;
    /* Pass 1: scores[h][t] = scale * q_h . k_{t,h}, token-major so each token's keys of
     * these heads are one contiguous read; four tokens at a time, four independent sums
     * (one sum's chain of dependent FMAs would leave the FMA units idle). */
    for (int32_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, b++) {
        const int32_t n_tok = ctx - t0 < block_size ? ctx - t0 : block_size;
        const float *kb = k_cache + (int64_t)table[b] * block_size * token_stride;
        int32_t j = 0;
        for (; j + 4 <= n_tok; j += 4) {
            const float *kt = kb + j * token_stride;
            for (int32_t h = h0; h < h1; h++) {
                const float *qh = qi + (int64_t)h * head_dim;
                const float *k0 = kt + (int64_t)h * head_dim;
                const float *k1 = k0 + token_stride, *k2 = k1 + token_stride;
                const float *k3 = k2 + token_stride;
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int32_t d = 0; d < head_dim; d++) {
                    s0 += qh[d] * k0[d];
                    s1 += qh[d] * k1[d];
                    s2 += qh[d] * k2[d];
                    s3 += qh[d] * k3[d];
                }
                float *sh = scores + (int64_t)(h - h0) * ctx + t0 + j;
                sh[0] = s0 * scale;
                sh[1] = s1 * scale;
                sh[2] = s2 * scale;
                sh[3] = s3 * scale;
            }
        }
        for (; j < n_tok; j++) {
            const float *kt = kb + j * token_stride;
            for (int32_t h = h0; h < h1; h++) {
                const float *qh = qi + (int64_t)h * head_dim;
                const float *kh = kt + (int64_t)h * head_dim;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int32_t d = 0; d < head_dim; d++) s += qh[d] * kh[d];
                scores[(int64_t)(h - h0) * ctx + t0 + j] = s * scale;
            }
        }
    }
    /* Softmax per head, normalized at the end (one division per output value). */
    float inv_sum[nh];
    for (int32_t h = 0; h < nh; h++) {
        float *sh = scores + (int64_t)h * ctx;
        float m = -INFINITY;
        for (int32_t t = 0; t < ctx; t++) m = sh[t] > m ? sh[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int32_t t = 0; t < ctx; t++) {
            const float e = exp_nonpositive(sh[t] - m);
            sh[t] = e;
            sum += e;
        }
        inv_sum[h] = 1.0f / sum;
    }
    /* Pass 2: out_h = sum_t p[h][t] v_{t,h}, accumulated in the output row itself. */
    for (int32_t h = h0; h < h1; h++) {
        float *oh = oi + (int64_t)h * head_dim;
        for (int32_t d = 0; d < head_dim; d++) oh[d] = 0.0f;
    }
    for (int32_t t0 = 0, b = 0; t0 < ctx; t0 += block_size, b++) {
        const int32_t n_tok = ctx - t0 < block_size ? ctx - t0 : block_size;
        const float *vb = v_cache + (int64_t)table[b] * block_size * token_stride;
        int32_t j = 0;
        for (; j + 4 <= n_tok; j += 4) { /* four tokens per load/store of the output */
            const float *vt = vb + j * token_stride;
            for (int32_t h = h0; h < h1; h++) {
                const float *ph = scores + (int64_t)(h - h0) * ctx + t0 + j;
                const float p0 = ph[0], p1 = ph[1], p2 = ph[2], p3 = ph[3];
                const float *v0 = vt + (int64_t)h * head_dim;
                const float *v1 = v0 + token_stride, *v2 = v1 + token_stride;
                const float *v3 = v2 + token_stride;
                float *oh = oi + (int64_t)h * head_dim;
#pragma omp simd
                for (int32_t d = 0; d < head_dim; d++)
                    oh[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
            }
        }
        for (; j < n_tok; j++) {
            const float *vt = vb + j * token_stride;
            for (int32_t h = h0; h < h1; h++) {
                const float p = scores[(int64_t)(h - h0) * ctx + t0 + j];
                const float *vh = vt + (int64_t)h * head_dim;
                float *oh = oi + (int64_t)h * head_dim;
#pragma omp simd
                for (int32_t d = 0; d < head_dim; d++) oh[d] += p * vh[d];
            }
        }
    }
    for (int32_t h = h0; h < h1; h++) {
        float *oh = oi + (int64_t)h * head_dim;
        const float inv = inv_sum[h - h0];
#pragma omp simd
        for (int32_t d = 0; d < head_dim; d++) oh[d] *= inv;
    }
}

/* Returns 0, or -1 when a thread could not get its score buffer (nothing is written then
 * for that thread's sequences: the caller treats it as a failed step). */
int kogpt_paged_decode_f32(const float *q, int64_t q_stride, const float *k_cache,
                           const float *v_cache, const int32_t *tables, int64_t table_stride,
                           const int32_t *ctx, const int64_t *rows, float *out,
                           int64_t out_stride, int32_t n_seqs, int32_t n_head,
                           int32_t head_dim, int32_t block_size, float scale,
                           int32_t max_ctx, int32_t n_threads) {
    /* Few sequences: one work item per (sequence, head) so every thread has work; many:
     * one per sequence, so each token's keys of all heads are one contiguous read. */
    const int32_t per_seq = n_seqs >= 4 * n_threads ? 1 : n_head;
    const int32_t heads_per_item = n_head / per_seq;
    const int64_t n_items = (int64_t)n_seqs * per_seq;
    int failed = 0;
#pragma omp parallel num_threads(n_threads) if (n_items > 1 && n_threads > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)heads_per_item * (size_t)max_ctx);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < n_items; item++) {
            if (scores == NULL) continue;
            const int64_t i = item / per_seq;
            const int32_t h0 = (int32_t)(item % per_seq) * heads_per_item;
            attend_one(q + rows[i] * q_stride, k_cache, v_cache, tables + i * table_stride,
                       ctx[i], n_head, h0, h0 + heads_per_item, head_dim, block_size, scale,
                       scores, out + rows[i] * out_stride);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
