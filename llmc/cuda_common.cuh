// Shared by every CUDA file: error checks, bf16, warp/block reductions, the one stream and the
// library handles. Kernels live in one header per family (matmul, layernorm, attention, ...).
//
// Determinism: every reduction in this project is done in a fixed order (butterfly warp reductions,
// fixed-shape block trees, partial sums written to scratch and summed by one thread block). There
// are no atomics anywhere, so a run repeated on the same GPU with the same shapes gives identical
// bits, which --resume relies on.
#ifndef LLMC_CUDA_COMMON_CUH
#define LLMC_CUDA_COMMON_CUH
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cublasLt.h>

typedef __nv_bfloat16 bf16;

static void cuda_check(cudaError_t e, const char *file, int line) {
    if (e != cudaSuccess) {
        fprintf(stderr, "error: CUDA at %s:%d: %s\n", file, line, cudaGetErrorString(e));
        exit(1);
    }
}
#define cudaCheck(x) cuda_check((x), __FILE__, __LINE__)

static void cublas_check(cublasStatus_t s, const char *file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "error: cuBLAS at %s:%d: status %d (%s)\n", file, line, (int)s, cublasGetStatusString(s));
        exit(1);
    }
}
#define cublasCheck(x) cublas_check((x), __FILE__, __LINE__)

static inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// The stream every kernel and library call of a trainer runs on, and the library handles
// (created by cuda_setup; the dev/cuda programs call it too).
static cudaStream_t main_stream;
static cublasHandle_t cublas_handle;
static cublasLtHandle_t cublaslt_handle;
static void *cublaslt_workspace;
static const size_t cublaslt_workspace_size = (size_t)32 << 20;
static cudaDeviceProp device_prop;

static void cuda_setup(int device) {
    cudaCheck(cudaSetDevice(device));
    cudaCheck(cudaGetDeviceProperties(&device_prop, device));
    cudaCheck(cudaStreamCreate(&main_stream));
    cublasCheck(cublasCreate(&cublas_handle));
    cublasCheck(cublasSetStream(cublas_handle, main_stream));
    // cuBLAS may use atomics only where a routine documents it; forbid them outright.
    cublasCheck(cublasSetAtomicsMode(cublas_handle, CUBLAS_ATOMICS_NOT_ALLOWED));
    cublasCheck(cublasLtCreate(&cublaslt_handle));
    cudaCheck(cudaMalloc(&cublaslt_workspace, cublaslt_workspace_size));
}

static void *cuda_malloc_or_die(size_t bytes, const char *what) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free_b, &total_b);
        fprintf(stderr, "error: out of GPU memory allocating %.1f MiB for %s (%.1f of %.1f MiB free): "
                "lower train.micro_batch\n", bytes / 1048576.0, what, free_b / 1048576.0, total_b / 1048576.0);
        exit(1);
    }
    return p;
}

// ----------------------------------------------------------------------------------------------
// Reductions. __shfl_xor_sync butterflies leave the same sum in every lane, in a fixed order.

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// shared: 32 floats. Safe to call repeatedly (the leading sync protects the previous use).
__device__ __forceinline__ float block_sum(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// Deterministic column sums of a row-major (N, ncols) matrix, in two kernels: each of S row chunks
// of COLSUM_CHUNK rows writes its partial sums to fp32 scratch (S, stride), then colsum_finalize
// adds the S partials of each column, in chunk order, into a bf16 output (+=). Used for bias and
// LayerNorm parameter gradients instead of atomics.
#define COLSUM_CHUNK 256
static inline int colsum_chunks(int N) { return ceil_div(N, COLSUM_CHUNK); }

__global__ void colsum_finalize_kernel(bf16 *out, const float *partial, int S, int ncols, int stride) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= ncols) return;
    float s = 0.0f;
    for (int k = 0; k < S; k++) s += partial[(size_t)k * stride + c];
    out[c] = __float2bfloat16(__bfloat162float(out[c]) + s);
}
static void colsum_finalize(bf16 *out, const float *partial, int S, int ncols, int stride, cudaStream_t stream) {
    colsum_finalize_kernel<<<ceil_div(ncols, 256), 256, 0, stream>>>(out, partial, S, ncols, stride);
    cudaCheck(cudaGetLastError());
}

// bf16 <-> float on the host (round to nearest even, as __float2bfloat16 does on the device)
static inline float bf16_to_float_host(bf16 x) {
    unsigned short bits;
    memcpy(&bits, &x, 2);
    unsigned int u = (unsigned int)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
