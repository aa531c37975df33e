// dev/cuda/cpu_ref.h: the CPU references, compiled as C (see there).
#include "llmc/blockdiag.h"
#include "llmc/moe.h"
#include "dev/cuda/cpu_ref.h"

void ref_blockdiag_forward(float *y, int ldy, const float *x, int ldx, const float *W, int N, int nb, int p, int q, float beta) {
    blockdiag_forward(y, ldy, x, ldx, W, N, nb, p, q, beta);
}
void ref_blockdiag_backward_input(float *dx, int ldx, const float *dy, int ldy, const float *W, int N, int nb, int p, int q, float beta) {
    blockdiag_backward_input(dx, ldx, dy, ldy, W, N, nb, p, q, beta);
}
void ref_blockdiag_backward_weight(float *dW, const float *dy, int ldy, const float *x, int ldx, int N, int nb, int p, int q) {
    blockdiag_backward_weight(dW, dy, ldy, x, ldx, N, nb, p, q);
}
void ref_token_transpose(float *out, const float *in, int N, int a, int b, int r) { token_transpose(out, in, N, a, b, r); }
size_t ref_structured_saved_floats(const Structure *s, int N) { return structured_saved_floats(s, N); }
size_t ref_structured_scratch_floats(const Structure *s, int N) { return structured_scratch_floats(s, N); }
void ref_structured_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1, float *saved,
                            float *scratch, int N) {
    structured_forward(s, y, x, W0, W1, saved, scratch, N);
}
void ref_structured_backward(const Structure *s, float *dx, float *dW0, float *dW1, const float *dy, const float *x,
                             const float *W0, const float *W1, const float *saved, float *scratch, int N) {
    structured_backward(s, dx, dW0, dW1, dy, x, W0, W1, saved, scratch, N);
}
size_t ref_moe_saved_floats(const Structure *s, int N) { return moe_saved_floats(s, N); }
size_t ref_moe_scratch_floats(const Structure *s, int N) { return moe_scratch_floats(s, N); }
float ref_moe_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1, const float *G,
                      float z_weight, float *saved, float *scratch, int N, float *load) {
    return moe_forward(s, y, x, W0, W1, G, z_weight, saved, scratch, N, load);
}
void ref_moe_backward(const Structure *s, float *dx, float *dW0, float *dW1, float *dG, const float *dy, float daux,
                      float z_weight, const float *x, const float *W0, const float *W1, const float *G,
                      const float *saved, float *scratch, int N) {
    moe_backward(s, dx, dW0, dW1, dG, dy, daux, z_weight, x, W0, W1, G, saved, scratch, N);
}
size_t ref_moe_dense_masked_saved_floats(const Structure *s, int N) { return moe_dense_masked_saved_floats(s, N); }
size_t ref_moe_dense_masked_scratch_floats(const Structure *s, int N) { return moe_dense_masked_scratch_floats(s, N); }
float ref_moe_dense_masked_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1,
                                   const float *G, float z_weight, float *saved, float *scratch, int N, float *load) {
    return moe_dense_masked_forward(s, y, x, W0, W1, G, z_weight, saved, scratch, N, load);
}
