#!/usr/bin/env bash
# The CUDA trainer as a user runs it (needs a GPU; run by dev/cuda/run_tests, not by test/run):
# bit-exact resume (20 steps straight = 10, resume, 10), SIGINT writes a checkpoint and the resumed
# run ends bit-identical, checkpoints shared with the CPU trainer both ways, a structured model
# (train, resume, cross-trainer eval), refusals, --help.
# Cross-trainer evaluations agree within 2e-2 relative: the same fp32 weights, evaluated in bf16 on
# the GPU (the logits tolerance of test_gpt2_cuda.cu) and in fp32 on the CPU.
set -u
cd "$(dirname "$0")/.."
. test/train_lib.sh
for b in ./train_gpt2cu ./train_gpt2; do [ -x $b ] || { fail "$b built" "missing (make cuda all)"; exit 1; }; done
VAL=data/tinyshakespeare/tiny_shakespeare_val.bin
[ -f "$VAL" ] || { fail "data" "run make data first"; exit 1; }

W=build/test/cuda_train; rm -rf "$W"; mkdir -p "$W"
CFG=$W/tiny.json RUN=$W/run
tiny_config "$CFG" "$RUN"
# 1-2. 20 straight steps; stop after 10, --resume, 10 more: bit-identical
check_straight_and_resume ./train_gpt2cu "$CFG" "$RUN" "$W"
# 3. SIGINT writes a checkpoint; the resumed run ends bit-identical. A GPU step of this model takes
# milliseconds, so this run also evaluates and samples 64 tokens at every step (neither touches the
# model, the optimizer or the train loader) to leave time to interrupt it.
check_sigint ./train_gpt2cu "$CFG" "$RUN" "$W" --set eval.every=1 --set sample.every=1 --set sample.tokens=64

# 4. checkpoints shared with the CPU trainer
g=$(./train_gpt2cu --resume "$W/straight" --eval "$VAL" 2>&1 | evalloss)
c=$(./train_gpt2 --resume "$W/straight" --eval "$VAL" 2>&1 | evalloss)
[ -n "$g" ] && [ -n "$c" ] && awk -v g="$g" -v c="$c" 'BEGIN { d = g - c; if (d < 0) d = -d; exit !(d < 2e-2 * c) }'
expect $? "GPU checkpoint: CPU and GPU --eval agree (gpu $g, cpu $c)" "differ"
cp -r "$W/straight" "$W/cpu_resumes_gpu"; rm -rf "$W/cpu_resumes_gpu/ckpt_00000020"
./train_gpt2 --resume "$W/cpu_resumes_gpu" > "$W/cpu_resume.out" 2>&1 && [ -d "$W/cpu_resumes_gpu/ckpt_00000020" ]
expect $? "the CPU trainer resumes a GPU run" "$(tail -3 "$W/cpu_resume.out")"
./train_gpt2 "$CFG" --set run.dir="$W/cpu" --set train.max_steps=10 > "$W/cpu.out" 2>&1
./train_gpt2cu --resume "$W/cpu" --set train.max_steps=20 > "$W/gpu_resume.out" 2>&1 && [ -d "$W/cpu/ckpt_00000020" ]
expect $? "the GPU trainer resumes a CPU run" "$(tail -3 "$W/gpu_resume.out")"
./train_gpt2cu --init-from "$W/cpu/ckpt_00000010" --eval "$VAL" --set run.dir="$W/x" "$CFG" > "$W/init.out" 2>&1
grep -Eq "eval .*: loss [0-9.]+ over [0-9]+ tokens" "$W/init.out"
expect $? "--init-from a CPU checkpoint, --eval" "$(tail -3 "$W/init.out")"

# 5. a structured model end to end (monarch attention, btt MLP under mup with rms_cap): trains, resumes
# bit-identically, and the CPU trainer evaluates its checkpoint as the GPU does
S=$W/structured; SCFG="--set model.parametrization=mup --set model.linear.attn_qkv.type=monarch \
 --set model.linear.attn_proj.type=monarch --set model.linear.mlp_fc.type=btt --set model.linear.mlp_proj.type=btt"
./train_gpt2cu "$CFG" $SCFG --set run.dir="$S/straight" --set sample.every=0 > "$W/structured.out" 2>&1
expect $? "a structured model (monarch, btt, mup, rms_cap) trains" "$(tail -3 "$W/structured.out")"
first=$(losses "$S/straight" | head -1 | cut -d' ' -f2); last=$(losses "$S/straight" | tail -1 | cut -d' ' -f2)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.1) }'
expect $? "the structured model's loss falls over 20 steps ($first -> $last)" "it does not"
./train_gpt2cu "$CFG" $SCFG --set run.dir="$S/resumed" --set sample.every=0 > /dev/null 2>&1
rm -rf "$S/resumed/ckpt_00000020"
./train_gpt2cu --resume "$S/resumed" > "$W/structured_resume.out" 2>&1
same_ckpt "$S/straight/ckpt_00000020" "$S/resumed/ckpt_00000020"
expect $? "structured: 10 + resume + 10 steps bit-identical to 20 straight" "files differ"
g=$(./train_gpt2cu --resume "$S/straight" --eval "$VAL" 2>&1 | evalloss)
c=$(./train_gpt2 --resume "$S/straight" --eval "$VAL" 2>&1 | evalloss)
[ -n "$g" ] && [ -n "$c" ] && awk -v g="$g" -v c="$c" 'BEGIN { d = g - c; if (d < 0) d = -d; exit !(d < 2e-2 * c) }'
expect $? "structured GPU checkpoint: CPU and GPU --eval agree (gpu $g, cpu $c)" "differ"

# 6. refusals and help
out=$(./train_gpt2cu "$CFG" --set model.linear.mlp_fc.type=monarch --set model.linear.mlp_fc.blocks=5 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q 'blocks'
expect $? "a structure that does not tile is refused naming the key" "rc $rc: $out"
out=$(./train_gpt2cu "$CFG" 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "already holds checkpoints"
expect $? "a new run into a run dir with checkpoints is refused" "rc $rc: $out"
./train_gpt2cu --help > "$W/help.out" 2>&1; rc=$?
for flag in --set --resume --init-from --eval --help mpirun srun LLMC_RANK; do grep -q -- "$flag" "$W/help.out" || rc=1; done
expect $rc "--help lists every flag and the multi-GPU launchers" "$(cat "$W/help.out")"
