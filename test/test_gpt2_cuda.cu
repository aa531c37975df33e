// The CUDA trainer against the CPU trainer (needs a GPU; run by `make test-cuda` once per model
// fixture: dense, blockdiag, lowrank, monarch, btt, mixed_mup (monarch/btt/lowrank/blockdiag with mup,
// rms_cap, qk_norm, attn_scale mup), btt_moe). The CPU side is the file written by test/gpt2_cuda_ref.c
// from the fixture: the same config, starting weights and batch. Checked: logits, loss, every gradient,
// gradient accumulation over two micro-batches, 10 AdamW steps (losses and parameters), determinism and
// a bit-exact resume from a checkpoint, and the checkpoint's format; for btt_moe also the routing.
// Usage: test_gpt2_cuda [REF [TAG]] (TAG labels the checks, e.g. the structure).
//
// Tolerances. Errors are max|gpu - cpu| / max|cpu| over a tensor (relative to its scale). bf16 keeps
// 8 significant bits: each rounding of a parameter, an activation or a gradient is off by at most
// u = 2^-9 ~ 2e-3 of its value. The fixture's model (2 layers) rounds each value along a path about
// 20 times in forward (weights, LayerNorm, qkv, attention probabilities (scores stay fp32; the flash
// kernels round P to bf16 only as the operand of P v) and output, projections, residuals, GELU, logits),
// and the errors add up like a random walk: ~sqrt(20) u ~ 1e-2.
//   logits 2e-2: that estimate with a factor 2 of margin.
//   loss 5e-3 relative: the mean over 128 tokens of log-sum-exp errors, which average out.
//   gradients 5e-2: backward repeats the chain in reverse on bf16 gradients (twice the roundings,
//     through the softmax, whose gradient dS = P (dP - D) is a difference of nearly equal numbers,
//     rounded to bf16 before the dq and dk products, D computed from the bf16 output) and the LM head
//     and encoder sum over all tokens; 2.5x the logits' bound.
//   10-step losses 2e-2 relative: Adam moves every parameter by about lr per step whatever the
//     size of its gradient, so entries whose gradient is within bf16 noise of zero (the key slice
//     of attn_qkv.b has a true gradient of exactly 0) may move differently; the loss is an average
//     over many parameters and stays within the logits' bound.
//   final parameters: per tensor the MEAN |gpu - cpu| must be below 0.1 * (sum of the 10 lrs), i.e.
//     on average the updates agree to 10% of the distance Adam can move a parameter; an error in the
//     schedule, the bias correction, weight decay or clipping moves every entry and fails it. (A max
//     bound would be 2 * sum(lr) for the noise-dominated entries, which no bug could exceed.)
// Structured layers add a bf16 rounding of their intermediate z' per two-stage layer (4 more roundings
// on a path of ~20: the same bounds hold). btt_moe is different: its routers' top-k is a discontinuous
// function of bf16 activations, so a token whose k-th and (k+1)-th logits are closer than the bf16
// noise (~1e-2 of a logit; the fixture's routers are random, logits spread ~5) picks another expert on
// the GPU than on the CPU, and that token's output changes by a gate times the difference of two
// experts: not a small error. So for btt_moe the routing is compared directly (at least 90% of the
// (token, layer) expert sets must agree; about 1% of decisions are expected to be that close), and
// logits and gradients by MEAN relative error (mean |gpu - cpu| / mean |cpu|, in which a few flipped
// tokens of 128 weigh little) with the same tolerances; loss 1e-2, 10-step losses 5e-2.
// Tensors whose true gradient is exactly 0 (the reference's "zero_true_grad": qk_norm's k bias, as
// softmax ignores a shift of all of a query's scores) have gradients of rounding noise on both sides,
// ~1e-9 on the CPU and ~1e-2 of the summed terms on the GPU, and Adam turns that noise into full-size
// steps in unrelated directions. They are checked as the fixture's notes say: the GPU gradient below
// 5e-2 of the largest gradient of their q twin (qk_norm.q.b, a true gradient of the same size and sum),
// and after 10 steps within the summed lr of the start (Adam's normalized steps stay within lr).
// Resume and determinism are exact: 10 steps straight and 5 + checkpoint + resume + 5 must give
// identical bits in master weights and AdamW moments, and identical losses.
#define TESTING
#include "train_gpt2.cu"
#include "test/test.h"

static const char *REF = "build/test/gpt2_cuda_ref.safetensors";
static char TAG[64] = "dense";
static int MOE = 0;   // the model has btt_moe layers: mean relative errors (see the top)
static const char *ZERO_GRAD = "[]";   // the reference's zero_true_grad list (JSON)

static int zero_true_grad(const char *name) {
    char q[96];
    snprintf(q, sizeof q, "\"%s\"", name);
    return strstr(ZERO_GRAD, q) != NULL;
}
#define RUN_DIR "build/test/gpt2_cuda"

// The error of a tensor against its reference: max|a - ref| / max|ref|, or for MoE models
// mean|a - ref| / mean|ref|; a reference of all zeros: the largest |a|.
static double tensor_err(const float *a, const float *ref, size_t n) {
    double scale = max_abs(ref, n);
    if (scale == 0.0) return max_abs(a, n);
    if (!MOE) return max_rel_err(a, ref, n, scale);
    double d = 0.0, r = 0.0;
    for (size_t i = 0; i < n; i++) { d += fabs((double)a[i] - ref[i]); r += fabs((double)ref[i]); }
    return d / r;
}

static const float *ref_f32(const SafeTensors *st, const char *name, size_t want) {
    const char *dtype;
    int ndim;
    long long shape[4];
    const float *p = (const float *)safetensors_find(st, name, &dtype, &ndim, shape);
    size_t n = 1;
    for (int d = 0; p && d < ndim; d++) n *= (size_t)shape[d];
    if (!p || strcmp(dtype, "F32") || (want && n != want)) {
        printf("FAIL - reference %s: tensor %s missing or of the wrong size (run build/test/gpt2_cuda_ref)\n", REF, name);
        exit(1);
    }
    return p;
}
static const int *ref_i32(const SafeTensors *st, const char *name) {
    const char *dtype;
    const int *p = (const int *)safetensors_find(st, name, &dtype, NULL, NULL);
    if (!p || strcmp(dtype, "I32")) { printf("FAIL - reference: %s missing\n", name); exit(1); }
    return p;
}

// device bf16 (num_params) -> host fp32
static void bf16_to_host(GPT2 *m, const bf16 *dev, float *host) {
    bf16 *tmp = (bf16 *)xmalloc(m->num_params * sizeof(bf16));
    cudaCheck(cudaMemcpy(tmp, dev, m->num_params * sizeof(bf16), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < m->num_params; i++) host[i] = bf16_to_float_host(tmp[i]);
    free(tmp);
}

// every tensor of host (padded layout) against the reference tensors prefix+name
static void check_grads(GPT2 *m, const SafeTensors *ref, const float *host, const char *prefix, const char *what, double tol) {
    double worst = 0.0;
    char worst_name[80] = "";
    for (int i = 0; i < m->pt.n; i++) {
        ParamTensor *t = &m->pt.t[i];
        char name[96];
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        const float *r = ref_f32(ref, name, t->size);
        char label[240];
        if (zero_true_grad(t->name)) {   // rounding noise on both sides: bounded by the q twin's gradient
            char twin[96];
            snprintf(twin, sizeof twin, "%s%s", prefix, t->name);
            char *k = strstr(twin, ".k.");
            if (k) k[1] = 'q';
            double g = max_abs(host + t->offset, t->size), tw = max_abs(ref_f32(ref, twin, t->size), t->size);
            snprintf(label, sizeof label, "[%s] %s %s: true gradient 0, |gpu| max %.2e < 5e-2 x %s max %.2e", TAG, what,
                     t->name, g, twin, tw);
            check(g < 5e-2 * tw, label, "too large");
            continue;
        }
        double e = tensor_err(host + t->offset, r, t->size);
        if (!(e <= worst)) { worst = e; snprintf(worst_name, sizeof worst_name, "%s", t->name); }
        snprintf(label, sizeof label, "[%s] %s %s vs CPU (%s rel err %.2e, tol %.0e)", TAG, what, t->name,
                 MOE ? "mean" : "max", e, tol);
        check(e < tol, label, "rel err %.3g >= %.3g", e, tol);
    }
    printf("# [%s] %s: worst %s rel err %.3e\n", TAG, what, worst_name, worst);
}

static void load_ref_params(GPT2 *m, const SafeTensors *ref) {
    char err[ERRLEN];
    float *host = (float *)xcalloc(m->num_params * sizeof(float));
    if (param_load(&m->pt, ref, REF, "", host, err, ERRLEN)) { printf("FAIL - load reference weights: %s\n", err); exit(1); }
    gpt2_upload_params(m, host);
    free(host);
}

// n optimizer steps from step `first` on the reference batch; losses[i] of each step's forward
static void train_steps(GPT2 *m, const int *in, const int *tg, int first, int n, float *losses, double *lr_sum) {
    for (int s = first; s < first + n; s++) {
        gpt2_zero_grad(m);
        gpt2_forward(m, in, tg, m->Bmax, m->Tmax);
        losses[s] = m->mean_loss;
        gpt2_backward(m, 1.0f);
        float lr;
        gpt2_optimizer_step(m, s, &lr);
        if (lr_sum) *lr_sum += lr;
    }
}

// The btt_moe layers' expert sets of the last forward against the CPU's (moe.sel.<layer> in the
// reference): the fraction of (token, layer) sets that agree.
static double routing_agreement(GPT2 *m, const SafeTensors *ref, int N) {
    long agree = 0, total = 0;
    for (int l = 0; l < m->L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) {
            const Linear *lin = &m->layers[l].lin[k];
            if (lin->G < 0) continue;
            char name[96];
            snprintf(name, sizeof name, "moe.sel.h.%d.%s", l, linear_names[k]);
            const int *cpu = ref_i32(ref, name);
            int K = lin->s.top_k;
            int *gpu = (int *)xmalloc((size_t)N * K * sizeof(int));
            MoeGpuSaved sv = moe_gpu_saved_view(&lin->s, m->acts.lin_saved + lin->saved, N, NULL);
            cudaCheck(cudaMemcpy(gpu, sv.sel, (size_t)N * K * sizeof(int), cudaMemcpyDeviceToHost));
            for (int n = 0; n < N; n++) {
                int same = 1;
                for (int a = 0; a < K; a++) {
                    int found = 0;
                    for (int b = 0; b < K; b++) found |= gpu[(size_t)n * K + a] == cpu[(size_t)n * K + b];
                    same &= found;
                }
                agree += same;
                total++;
            }
            free(gpu);
        }
    return total ? (double)agree / total : 1.0;
}

int main(int argc, char **argv) {
    if (argc > 1) REF = argv[1];
    if (argc > 2) snprintf(TAG, sizeof TAG, "%s", argv[2]);
    char err[ERRLEN];
    SafeTensors ref;
    if (safetensors_read(&ref, REF, err, sizeof err)) {
        printf("FAIL - reference: %s (make build/test/gpt2_cuda_ref && build/test/gpt2_cuda_ref)\n", err);
        return 1;
    }
    Config cfg;
    if (config_from_json_string(&cfg, safetensors_meta(&ref, "config"), REF, NULL, 0, err, sizeof err) ||
        gpt2_check_supported(&cfg, 1, err)) {
        printf("FAIL - reference config: %s\n", err);
        return 1;
    }
    Dist dist;
    dist_init(&dist, "build/test");
    int B = cfg.train.micro_batch, T = cfg.train.seq_len, N = B * T;
    const int *inputs = ref_i32(&ref, "inputs"), *targets = ref_i32(&ref, "targets");
    GPT2 *m = (GPT2 *)xcalloc(sizeof(GPT2));
    gpt2_build(m, &cfg, &dist, B, T);
    load_ref_params(m, &ref);
    MOE = m->n_moe > 0;
    if (safetensors_meta(&ref, "zero_true_grad")) ZERO_GRAD = safetensors_meta(&ref, "zero_true_grad");
    double loss_tol = MOE ? 1e-2 : 5e-3, steps_tol = MOE ? 5e-2 : 2e-2;
    printf("# [%s] GPU %s, model %d layers C=%d V=%d, batch %d x %d\n", TAG, device_prop.name, m->L, m->C, m->V, B, T);
    for (int k = 0; k < NUM_LINEAR; k++) {
        char desc[256];
        printf("#   %s: %s\n", linear_names[k], structure_describe(&m->layers[0].lin[k].s, desc, sizeof desc));
    }

    // forward: logits and loss
    gpt2_forward(m, inputs, NULL, B, T);
    bf16 *lg = (bf16 *)xmalloc((size_t)N * m->Vp * sizeof(bf16));
    cudaCheck(cudaMemcpy(lg, m->acts.logits, (size_t)N * m->Vp * sizeof(bf16), cudaMemcpyDeviceToHost));
    float *logits = (float *)xmalloc((size_t)N * m->V * sizeof(float));
    for (int n = 0; n < N; n++)
        for (int v = 0; v < m->V; v++) logits[(size_t)n * m->V + v] = bf16_to_float_host(lg[(size_t)n * m->Vp + v]);
    const float *ref_logits = ref_f32(&ref, "logits", (size_t)N * m->V);
    double e = tensor_err(logits, ref_logits, (size_t)N * m->V);
    char label[240];
    snprintf(label, sizeof label, "[%s] forward logits vs CPU (%s rel err %.2e, tol 2e-2)", TAG, MOE ? "mean" : "max", e);
    check(e < 2e-2, label, "rel err %.3g", e);
    gpt2_forward(m, inputs, targets, B, T);
    float loss1 = m->mean_loss, ref_loss = ref_f32(&ref, "loss", 1)[0];
    e = fabs(loss1 - ref_loss) / fabs(ref_loss);
    snprintf(label, sizeof label, "[%s] loss vs CPU (gpu %.6f cpu %.6f, rel err %.2e, tol %.0e)", TAG, loss1, ref_loss, e,
             loss_tol);
    check(e < loss_tol, label, "differs");
    if (MOE) {
        double agree = routing_agreement(m, &ref, N);
        snprintf(label, sizeof label, "[%s] btt_moe routing: %.1f%% of the (token, layer) expert sets as the CPU's (>= 90%%)",
                 TAG, 100.0 * agree);
        check(agree >= 0.9, label, "too few");
    }

    // backward: every gradient, once and accumulated over two micro-batches
    float *host = (float *)xmalloc(m->num_params * sizeof(float));
    gpt2_zero_grad(m);
    gpt2_backward(m, 1.0f);
    bf16_to_host(m, m->grads, host);
    check_grads(m, &ref, host, "grad.", "gradient", 5e-2);
    int *in2 = (int *)xmalloc((size_t)N * sizeof(int)), *tg2 = (int *)xmalloc((size_t)N * sizeof(int));
    for (int b = 0; b < B; b++) {
        memcpy(in2 + (size_t)b * T, inputs + (size_t)((b + 1) % B) * T, T * sizeof(int));
        memcpy(tg2 + (size_t)b * T, targets + (size_t)((b + 1) % B) * T, T * sizeof(int));
    }
    gpt2_zero_grad(m);
    gpt2_forward(m, inputs, targets, B, T);
    snprintf(label, sizeof label, "[%s] forward is deterministic (same loss bits twice)", TAG);
    check(m->mean_loss == loss1, label, "%.9g vs %.9g", m->mean_loss, loss1);
    gpt2_backward(m, 0.5f);
    gpt2_forward(m, in2, tg2, B, T);
    gpt2_backward(m, 0.5f);
    bf16_to_host(m, m->grads, host);
    check_grads(m, &ref, host, "accum.grad.", "accumulated gradient", 5e-2);

    // 10 AdamW steps on the batch: losses and final master weights
    float losses[10], losses2[10];
    double lr_sum = 0.0;
    load_ref_params(m, &ref);
    train_steps(m, inputs, targets, 0, 10, losses, &lr_sum);
    const float *ref_losses = ref_f32(&ref, "steps.loss", 10);
    e = max_rel_err(losses, ref_losses, 10, 0.0);
    snprintf(label, sizeof label, "[%s] 10-step losses vs CPU (rel err %.2e, tol %.0e; gpu %.4f -> %.4f, cpu %.4f -> %.4f)",
             TAG, e, steps_tol, losses[0], losses[9], ref_losses[0], ref_losses[9]);
    check(e < steps_tol, label, "differ");
    snprintf(label, sizeof label, "[%s] 10 steps reduce the loss", TAG);
    check(losses[9] < losses[0] - 0.1, label, "%.4f -> %.4f", losses[0], losses[9]);
    float *master10 = (float *)xmalloc(m->num_params * sizeof(float) * 3);
    float *m10 = master10 + m->num_params, *v10 = m10 + m->num_params;
    gpt2_gather_shards(m, m->master, master10);
    gpt2_gather_shards(m, m->m, m10);
    gpt2_gather_shards(m, m->v, v10);
    int bad = 0;
    char worst[200] = "";
    for (int i = 0; i < m->pt.n; i++) {
        ParamTensor *t = &m->pt.t[i];
        char name[96];
        snprintf(name, sizeof name, "final.%s", t->name);
        const float *r = ref_f32(&ref, name, t->size);
        if (zero_true_grad(t->name)) {   // driven by noise: stays within the summed lr of its start
            const float *r0 = ref_f32(&ref, t->name, t->size);
            double moved = 0.0;
            for (size_t j = 0; j < t->size; j++) moved = fmax(moved, fabs((double)master10[t->offset + j] - r0[j]));
            snprintf(label, sizeof label, "[%s] %s after 10 steps (true gradient 0): moved %.2e <= 1.05 x sum(lr) = %.2e", TAG,
                     t->name, moved, 1.05 * lr_sum);
            check(moved <= 1.05 * lr_sum, label, "moved too far");
            continue;
        }
        double mean = 0.0;
        for (size_t j = 0; j < t->size; j++) mean += fabs((double)master10[t->offset + j] - r[j]);
        mean /= t->size;
        if (mean >= 0.1 * lr_sum) { bad++; snprintf(worst, sizeof worst, "%s: mean |diff| %.3g", t->name, mean); }
    }
    snprintf(label, sizeof label, "[%s] parameters after 10 steps vs CPU (mean |diff| per tensor < 0.1 * sum(lr) = %.2e)",
             TAG, 0.1 * lr_sum);
    check(bad == 0, label, "%d tensors off; last %s", bad, worst);

    // bit-exact resume: 5 steps, checkpoint, a fresh model resumed from it, 5 more steps
    load_ref_params(m, &ref);
    cudaCheck(cudaMemset(m->m, 0, m->shard_size * sizeof(float)));
    cudaCheck(cudaMemset(m->v, 0, m->shard_size * sizeof(float)));
    train_steps(m, inputs, targets, 0, 5, losses2, NULL);
    TrainState st;
    memset(&st, 0, sizeof st);
    st.step = 5;
    st.tokens = 5LL * N;
    snprintf(st.dataloader, sizeof st.dataloader, "{}");
    ckpt_rmtree(RUN_DIR);
    int rc = gpt2_save_checkpoint(m, RUN_DIR, &st, err);
    snprintf(label, sizeof label, "[%s] GPU checkpoint written", TAG);
    check(rc == 0, label, "%s", err);
    gpt2_free(m);
    CliArgs args;
    memset(&args, 0, sizeof args);
    args.resume_dir = RUN_DIR;
    Config cfg2;
    TrainState st2;
    memset(&st2, 0, sizeof st2);
    rc = gpt2_resume(m, &cfg2, &dist, &args, &st2, err);
    snprintf(label, sizeof label, "[%s] GPU checkpoint resumes", TAG);
    check(rc == 0 && st2.step == 5, label, "%s", rc ? err : "wrong step");
    if (rc == 0) {
        train_steps(m, inputs, targets, 5, 5, losses2, NULL);
        snprintf(label, sizeof label, "[%s] 5 + resume + 5 steps: losses bit-identical to 10 straight", TAG);
        check(memcmp(losses, losses2, sizeof losses) == 0, label, "step 10: %.9g vs %.9g", losses2[9], losses[9]);
        float *h = (float *)xmalloc(m->num_params * sizeof(float));
        int same = 1;
        gpt2_gather_shards(m, m->master, h);
        same &= memcmp(h, master10, m->num_params * sizeof(float)) == 0;
        gpt2_gather_shards(m, m->m, h);
        same &= memcmp(h, m10, m->num_params * sizeof(float)) == 0;
        gpt2_gather_shards(m, m->v, h);
        same &= memcmp(h, v10, m->num_params * sizeof(float)) == 0;
        snprintf(label, sizeof label, "[%s] 5 + resume + 5 steps: master weights and AdamW moments bit-identical", TAG);
        check(same, label, "differ");
        free(h);
    }

    // the checkpoint is in the CPU trainer's format: every tensor by name, fp32, our metadata
    SafeTensors ck;
    rc = safetensors_read(&ck, RUN_DIR "/ckpt_00000005/model.safetensors", err, sizeof err);
    if (rc == 0) {
        const char *fmt = safetensors_meta(&ck, "format");
        int ok = fmt && !strcmp(fmt, "structured-gpt2/1") && safetensors_count(&ck) == m->pt.n;
        float *tmp = (float *)xcalloc(m->num_params * sizeof(float));
        ok = ok && param_load(&m->pt, &ck, "checkpoint", "", tmp, err, ERRLEN) == 0;
        snprintf(label, sizeof label, "[%s] GPU checkpoint: format, tensor names, F32 shapes as the CPU trainer's", TAG);
        check(ok, label, "%s", err);
        free(tmp);
        safetensors_free(&ck);
    } else {
        snprintf(label, sizeof label, "[%s] GPU checkpoint readable by checkpoint.h (CRCs)", TAG);
        check(0, label, "%s", err);
    }

    free(lg); free(logits); free(host); free(in2); free(tg2); free(master10);
    gpt2_free(m);
    free(m);
    dist_free(&dist);
    safetensors_free(&ref);
    return test_exit();
}
