// Dense matmuls through cuBLASLt, bf16 in and out, fp32 accumulation, with the bias and GELU
// epilogues fused; and the bias gradient (deterministic column sums).
//
// Layout: every linear layer stores W as (OC, IC) row-major (llm.c's, the checkpoints'), and
// computes out (N, OC) = inp (N, IC) W^T + b. cuBLASLt is column-major: a row-major (R, C) matrix is
// a column-major (C, R) one with leading dimension C, so each row-major product below is written
// as the column-major product of the transposes.
//
// GELU: cuBLASLt's GELU epilogues, which implement the tanh approximation of the CPU trainer
// (dev/cuda/matmul.cu checks them against its formula).
#ifndef LLMC_MATMUL_CUH
#define LLMC_MATMUL_CUH
#include "llmc/cuda_common.cuh"

enum { EPI_NONE, EPI_BIAS, EPI_GELU_AUX, EPI_DGELU };

// Column-major D (m, n) = op(A) (m, k) op(B) (k, n) + beta D, bf16 A, B, D; fp32 compute.
// EPI_BIAS adds bias (m); EPI_GELU_AUX (bias optional) writes gelu(result) to D and the
// pre-activation to aux (m, n); EPI_DGELU multiplies the result by gelu'(aux (m, n)).
static void matmul_lt(bf16 *d, const bf16 *a, const bf16 *b, const bf16 *bias, bf16 *aux,
                      int m, int n, int k, int transa, int transb, float beta, int epi, cudaStream_t stream) {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opa = transa ? CUBLAS_OP_T : CUBLAS_OP_N, opb = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    cublasCheck(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, transa ? k : m, transa ? m : k, transa ? k : m));
    cublasCheck(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, transb ? n : k, transb ? k : n, transb ? n : k));
    cublasCheck(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, m, n, m));
    cublasLtEpilogue_t e = CUBLASLT_EPILOGUE_DEFAULT;
    if (epi == EPI_BIAS) e = CUBLASLT_EPILOGUE_BIAS;
    if (epi == EPI_GELU_AUX) e = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    if (epi == EPI_DGELU) e = CUBLASLT_EPILOGUE_DGELU;
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e));
    if (bias && (epi == EPI_BIAS || epi == EPI_GELU_AUX)) {
        cudaDataType_t bt = CUDA_R_16BF;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    if (epi == EPI_GELU_AUX || epi == EPI_DGELU) {
        int64_t ld = m;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof ld));
    }
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                     &cublaslt_workspace_size, sizeof cublaslt_workspace_size));
    // The heuristic's first choice is a function of the problem and the GPU only, so the same shapes
    // always run the same algorithm: repeated runs are bit-identical.
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(cublaslt_handle, desc, la, lb, lc, lc, pref, 1, &heur, &found));
    if (found == 0) {
        fprintf(stderr, "error: cuBLASLt has no algorithm for m=%d n=%d k=%d transa=%d transb=%d epilogue=%d\n",
                m, n, k, transa, transb, epi);
        exit(1);
    }
    const float alpha = 1.0f;
    cublasCheck(cublasLtMatmul(cublaslt_handle, desc, &alpha, a, la, b, lb, &beta, d, lc, d, lc, &heur.algo,
                               cublaslt_workspace, cublaslt_workspace_size, stream));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    cublasCheck(cublasLtMatrixLayoutDestroy(la));
    cublasCheck(cublasLtMatrixLayoutDestroy(lb));
    cublasCheck(cublasLtMatrixLayoutDestroy(lc));
    cublasCheck(cublasLtMatmulDescDestroy(desc));
}

// out (N, OC) = inp (N, IC) W^T + bias (bias may be NULL). With pre_gelu: out = gelu(that) and
// pre_gelu (N, OC) keeps the pre-activation for backward.
// Column-major: out^T (OC, N) = W' (IC, OC)^T inp' (IC, N), W' and inp' the stored matrices.
static void matmul_forward(bf16 *out, const bf16 *inp, const bf16 *W, const bf16 *bias, bf16 *pre_gelu,
                           int N, int IC, int OC, cudaStream_t stream) {
    int epi = pre_gelu ? EPI_GELU_AUX : (bias ? EPI_BIAS : EPI_NONE);
    matmul_lt(out, W, inp, bias, pre_gelu, OC, N, IC, 1, 0, 0.0f, epi, stream);
}

// Deterministic bias gradient: partial (S, OC) with S = colsum_chunks(N); thread (x, y) of a
// (32, 8) block sums column c over rows y, y+8, ... of its chunk, then the 8 are added in order.
__global__ void bias_backward_partial_kernel(float *partial, const bf16 *dout, int N, int OC) {
    __shared__ float acc[8][33];
    int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    int r0 = chunk * COLSUM_CHUNK, r1 = min(r0 + COLSUM_CHUNK, N);
    float s = 0.0f;
    if (c < OC)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) s += __bfloat162float(dout[(size_t)r * OC + c]);
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < OC) {
        float t = 0.0f;
        for (int y = 0; y < 8; y++) t += acc[y][threadIdx.x];
        partial[(size_t)chunk * OC + c] = t;
    }
}

// dbias (OC) += column sums of dout (N, OC). scratch: colsum_chunks(N) * OC floats.
static void bias_backward(bf16 *dbias, const bf16 *dout, float *scratch, int N, int OC, cudaStream_t stream) {
    int S = colsum_chunks(N);
    bias_backward_partial_kernel<<<dim3(ceil_div(OC, 32), S), dim3(32, 8), 0, stream>>>(scratch, dout, N, OC);
    cudaCheck(cudaGetLastError());
    colsum_finalize(dbias, scratch, S, OC, OC, stream);
}

// Backward of matmul_forward.
//   dinp (N, IC) = dout (N, OC) W (OC, IC), overwritten; with pre_gelu (N, IC) (the pre-activation of
//     the layer that produced inp) it is multiplied by gelu'(pre_gelu): the GELU backward is fused.
//   dW (OC, IC) += dout^T inp;  dbias (OC) += column sums of dout (dbias may be NULL).
static void matmul_backward(bf16 *dinp, bf16 *dW, bf16 *dbias, const bf16 *dout, const bf16 *inp,
                            const bf16 *W, const bf16 *pre_gelu, float *scratch, int N, int IC, int OC,
                            cudaStream_t stream) {
    // dinp^T (IC, N) = W' (IC, OC) dout' (OC, N)
    matmul_lt(dinp, W, dout, NULL, (bf16 *)pre_gelu, IC, N, OC, 0, 0, 0.0f, pre_gelu ? EPI_DGELU : EPI_NONE, stream);
    // dW^T (IC, OC) += inp' (IC, N) dout'^T (N, OC)
    matmul_lt(dW, inp, dout, NULL, NULL, IC, OC, N, 0, 1, 1.0f, EPI_NONE, stream);
    if (dbias) bias_backward(dbias, dout, scratch, N, OC, stream);
}

#endif
