# What the trainer-as-a-user tests of the CPU trainer (test/test_train.sh) and of the CUDA trainer
# (test/cuda_train.sh) share: the check helpers, the tiny config, and the scenarios of a straight
# run, a stop and resume, and a SIGINT, each run on the trainer binary it is given. Sourced, not run.
# Bit-identical means: the same bytes in model.safetensors and state.safetensors, and the same losses.
ok() { echo "ok - $1"; }
fail() { echo "FAIL - $1: $2"; }
expect() { if [ "$1" -eq 0 ]; then ok "$2"; else fail "$2" "$3"; fi; }
losses() { grep '"type": "train"' "$1/log.jsonl" | sed 's/.*"step": \([0-9]*\), "loss": \([-0-9.e]*\),.*/\1 \2/' | sort -n -u; }
same_ckpt() { cmp -s "$1/model.safetensors" "$2/model.safetensors" && cmp -s "$1/state.safetensors" "$2/state.safetensors"; }
evalloss() { sed -n 's/^eval .*: loss \([0-9.]*\) over.*/\1/p'; }

# tiny_config FILE RUNDIR: 2 layers of 32 channels, 20 steps of 2 accumulated micro-batches (4 x 32
# tokens), validation, samples and checkpoints every 10 steps.
tiny_config() {
    cat > "$1" <<JSON
{"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
 "schedule": {"type": "cosine", "warmup_steps": 3},
 "train": {"micro_batch": 4, "seq_len": 32, "batch_tokens": 256, "max_steps": 20, "seed": 7},
 "eval": {"every": 10, "batches": 2}, "sample": {"every": 10, "tokens": 8},
 "checkpoint": {"every": 10, "keep": 3}, "run": {"dir": "$2"}}
JSON
}

# check_straight_and_resume TRAINER CFG RUN W: 20 straight steps (kept as W/straight), then a run
# stopped after step 10 (its ckpt_20 removed) that --resume carries through steps 11..20.
check_straight_and_resume() {
    local bin=$1 cfg=$2 run=$3 w=$4
    "$bin" "$cfg" > "$w/straight.out" 2>&1
    expect $? "20 straight steps run" "exit non-zero: $(tail -3 "$w/straight.out")"
    [ -d "$run/ckpt_00000010" ] && [ -d "$run/ckpt_00000020" ]
    expect $? "checkpoints at steps 10 and 20" "$(ls "$run")"
    grep -q "val loss" "$w/straight.out" && grep -q -- "--- sample at step 10" "$w/straight.out"
    expect $? "validation loss and samples printed" "missing in output"
    local first last
    first=$(losses "$run" | head -1 | cut -d' ' -f2); last=$(losses "$run" | tail -1 | cut -d' ' -f2)
    awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.1) }'
    expect $? "the loss falls over 20 steps ($first -> $last)" "it does not"
    grep -q '"mfu": ' "$run/log.jsonl"
    expect $? "log records carry mfu" "missing"
    mv "$run" "$w/straight"

    "$bin" "$cfg" > /dev/null 2>&1
    rm -rf "$run/ckpt_00000020"
    "$bin" --resume "$run" > "$w/resume.out" 2>&1
    expect $? "resume runs" "$(tail -3 "$w/resume.out")"
    grep -q "resuming from $run/ckpt_00000010 (step 10" "$w/resume.out"
    expect $? "resume starts from the newest checkpoint" "$(head -3 "$w/resume.out")"
    same_ckpt "$w/straight/ckpt_00000020" "$run/ckpt_00000020"
    expect $? "10 + resume + 10 steps: parameters and AdamW state bit-identical to 20 straight" "files differ"
    diff <(losses "$w/straight") <(losses "$run") > "$w/loss.diff"
    expect $? "10 + resume + 10 steps: losses identical to 20 straight" "$(head -4 "$w/loss.diff")"
    local n u
    n=$(grep -c '"type": "train"' "$run/log.jsonl"); u=$(losses "$run" | wc -l)
    [ "$n" -eq 20 ] && [ "$u" -eq 20 ]
    expect $? "the resumed log holds each of the 20 steps once (records after the checkpoint dropped)" "$n records, $u steps"
    rm -rf "$run"
}

# check_sigint TRAINER CFG RUN W [ARGS...]: SIGINT once 3 steps are logged writes a checkpoint and
# exits 0; the resumed run ends bit-identical to W/straight. ARGS go to the interrupted run.
check_sigint() {
    local bin=$1 cfg=$2 run=$3 w=$4; shift 4
    "$bin" "$cfg" "$@" > "$w/sigint.out" 2>&1 &
    local pid=$! n rc stopped
    for _ in $(seq 600); do
        n=$(grep -c '"type": "train"' "$run/log.jsonl" 2>/dev/null || true)
        [ "${n:-0}" -ge 3 ] && break
        sleep 0.05
    done
    kill -INT $pid; wait $pid; rc=$?
    expect $rc "SIGINT exits cleanly" "exit $rc"
    stopped=$(sed -n 's/.*stopped by signal 2 after step \([0-9]*\).*/\1/p' "$w/sigint.out")
    if [ -n "$stopped" ] && [ -d "$run/ckpt_$(printf %08d "$stopped")" ]; then
        ok "SIGINT wrote a checkpoint at step $stopped"
    else
        fail "SIGINT wrote a checkpoint" "$(tail -3 "$w/sigint.out"; ls "$run")"
    fi
    "$bin" --resume "$run" > "$w/sigint_resume.out" 2>&1
    same_ckpt "$w/straight/ckpt_00000020" "$run/ckpt_00000020"
    expect $? "after SIGINT at step $stopped and resume: bit-identical to 20 straight" "files differ"
}
