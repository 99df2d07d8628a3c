/* A vectorizable exp for the kernels (Cephes' expf: range reduction and a degree-5
 * polynomial, within 2 ulp of libm), branch-free so that loops over it vectorize. */
#ifndef KOGPT_FAST_EXP_H
#define KOGPT_FAST_EXP_H

#include <math.h>
#include <stdint.h>

/* exp(x) for x <= 0 (scores minus their max): Cephes expf, branch-free so loops vectorize. */
static inline float exp_nonpositive(float x) {
    const float lo = -87.3f; /* below: exp underflows to (almost) 0 */
    x = x < lo ? lo : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f; /* Cody-Waite: ln 2 in two parts */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23; /* 2^n; n >= -126 given the clamp */
    return p * scale.f;
}

#endif
