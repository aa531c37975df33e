// Helpers shared by the dev/cuda kernel programs: random bf16 inputs (the CPU reference gets the
// same, already rounded, values in fp32), device <-> host copies, the error measure of the tests
// (max |gpu - ref| / max |ref|), ok/FAIL lines, and CUDA-event timing.
#ifndef DEV_CUDA_COMMON_H
#define DEV_CUDA_COMMON_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "llmc/cuda_common.cuh"
#include "dev/cuda/cpu_ref.h"   // ref_rel_err

static int dev_failures = 0;

static float dev_uniform(uint64_t *s) {   // splitmix64 -> [-1, 1)
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) / 8388608.0f - 1.0f;
}

// n random values in [-scale, scale) rounded to bf16: *host (malloc'd, fp32) and a device copy
static bf16 *dev_random_bf16(size_t n, float scale, uint64_t seed, float **host) {
    float *h = (float *)malloc(n * sizeof(float));
    bf16 *hb = (bf16 *)malloc(n * sizeof(bf16)), *d;
    for (size_t i = 0; i < n; i++) {
        hb[i] = __float2bfloat16(dev_uniform(&seed) * scale);
        h[i] = bf16_to_float_host(hb[i]);
    }
    cudaCheck(cudaMalloc(&d, n * sizeof(bf16)));
    cudaCheck(cudaMemcpy(d, hb, n * sizeof(bf16), cudaMemcpyHostToDevice));
    free(hb);
    *host = h;
    return d;
}
static float *dev_random_f32(size_t n, float scale, uint64_t seed, float **host) {
    float *h = (float *)malloc(n * sizeof(float)), *d;
    for (size_t i = 0; i < n; i++) h[i] = dev_uniform(&seed) * scale;
    cudaCheck(cudaMalloc(&d, n * sizeof(float)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice));
    *host = h;
    return d;
}
static float *dev_to_host_bf16(const bf16 *d, size_t n) {
    bf16 *hb = (bf16 *)malloc(n * sizeof(bf16));
    float *h = (float *)malloc(n * sizeof(float));
    cudaCheck(cudaMemcpy(hb, d, n * sizeof(bf16), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) h[i] = bf16_to_float_host(hb[i]);
    free(hb);
    return h;
}
static float *dev_to_host_f32(const float *d, size_t n) {
    float *h = (float *)malloc(n * sizeof(float));
    cudaCheck(cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

static void dev_check(const char *what, double err, double tol) {
    if (err < tol) printf("ok - %s (rel err %.2e < %.0e)\n", what, err, tol);
    else { printf("FAIL - %s: rel err %.3e >= %.0e\n", what, err, tol); dev_failures++; }
}

// milliseconds per call of `call` (a lambda), after warmup, timed with CUDA events on main_stream
template <typename F> static float dev_time_ms(F call, int reps) {
    for (int i = 0; i < 3; i++) call();
    cudaEvent_t a, b;
    cudaCheck(cudaEventCreate(&a));
    cudaCheck(cudaEventCreate(&b));
    cudaCheck(cudaEventRecord(a, main_stream));
    for (int i = 0; i < reps; i++) call();
    cudaCheck(cudaEventRecord(b, main_stream));
    cudaCheck(cudaEventSynchronize(b));
    float ms;
    cudaCheck(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms / reps;
}

#endif
