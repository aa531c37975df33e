#!/usr/bin/env bash
# CI without a GPU:
#   1. every CUDA source compiles and links with nvcc for sm_90 (H100), so build breaks are caught where
#      the GPU tests cannot run. One line per file: "ok - compiles: FILE" or "FAIL - compiles: FILE" with
#      the compiler's first errors. Two files at a time (CI has 2 cores); host and device optimization
#      off (-O0, ptxas -O0): this checks the code, it does not make binaries to run (make cuda does,
#      with -O3, into other paths). The kernel programs of dev/cuda link the CPU references (cpu_ref.c).
#   2. the structured-layer kernels (llmc/blockdiag.cuh, llmc/moe.cuh) run on the CPU emulation of
#      dev/cuda/emu.h against llmc/blockdiag.h and llmc/moe.h, and the attention kernels
#      (llmc/attention.cuh) against causal attention in double precision (dev/cuda/emu_check.cpp, g++):
#      their index math, tiling, permutations, gathers, masks and determinism, checked without a GPU.
#      Its ok/FAIL lines are passed through.
set -u
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
    echo "FAIL - nvcc: not found (install the CUDA toolkit; CI has it at /usr/local/cuda/bin)"
    exit 1
fi
out=$(mktemp -d /tmp/cuda_build.XXXXXX)
trap 'rm -rf "$out"' EXIT
# nvcc's own include directory, as nvcc reports it (nvcc may be a wrapper script elsewhere on PATH)
cuda_inc=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
[ -f "$cuda_inc/cuda_runtime.h" ] || echo "FAIL - cuda include directory: no cuda_runtime.h in '$cuda_inc' (from nvcc --dryrun)"
if ! gcc -O1 -march=native -std=gnu11 -fopenmp -I. -c -o "$out/cpu_ref.o" dev/cuda/cpu_ref.c > "$out/cpu_ref.log" 2>&1; then
    echo "FAIL - compiles: dev/cuda/cpu_ref.c"
    grep -E "error" "$out/cpu_ref.log" | head -8 | sed 's/^/    /'
fi
files="train_gpt2.cu test/test_gpt2_cuda.cu $(ls dev/cuda/*.cu)"
build() {  # one file -> out/NAME.bin, its log in out/NAME.log, status in out/NAME.rc
    local f=$1 name extra=""; name=$(echo "$1" | tr / _)
    case "$f" in dev/cuda/*) extra="$out/cpu_ref.o -lopenblas" ;; esac
    nvcc -O0 -Xptxas -O0 -arch=sm_90 -std=c++17 -I. -Xcompiler -fopenmp -o "$out/$name.bin" "$f" $extra \
        -lcublasLt -lcublas -lnccl -lcjson -lpcre2-8 -lm > "$out/$name.log" 2>&1
    echo $? > "$out/$name.rc"
}
emu() {    # the emulation check, built and run
    g++ -std=c++20 -O1 -I. -I"$cuda_inc" -fopenmp -Wno-unknown-pragmas -o "$out/emu_check" dev/cuda/emu_check.cpp \
        "$out/cpu_ref.o" -lopenblas -lcjson -lpcre2-8 -lm -lpthread > "$out/emu_build.log" 2>&1 &&
        OMP_NUM_THREADS=1 "$out/emu_check" > "$out/emu_run.log" 2>&1
    echo $? > "$out/emu.rc"
}
export -f build emu; export out cuda_inc
t0=$SECONDS
{ printf '%s\n' $files; echo EMU; } | xargs -P 2 -I{} bash -c 'if [ {} = EMU ]; then emu; else build {}; fi'
for f in $files; do
    name=$(echo "$f" | tr / _)
    if [ "$(cat "$out/$name.rc" 2>/dev/null)" = 0 ]; then
        echo "ok - compiles: $f"
        grep -q "warning" "$out/$name.log" && grep "warning" "$out/$name.log" | head -3 | sed 's/^/#   /'
    else
        echo "FAIL - compiles: $f"
        grep -E "error|undefined" "$out/$name.log" | head -8 | sed 's/^/    /'
    fi
done
if [ -s "$out/emu_run.log" ]; then
    grep -E '^(ok|FAIL) - ' "$out/emu_run.log" | sed 's/^\(ok\|FAIL\) - /\1 - emulated kernels: /'
fi
if [ "$(cat "$out/emu.rc" 2>/dev/null)" != 0 ] && ! grep -q '^FAIL - ' "$out/emu_run.log" 2>/dev/null; then
    rc=$(cat "$out/emu.rc" 2>/dev/null)
    if [ -x "$out/emu_check" ]; then
        why="exited with status $rc"; [ "${rc:-0}" -gt 128 ] && why="killed by signal $((rc - 128))"
    else
        why="did not build"
    fi
    echo "FAIL - emulated kernels: dev/cuda/emu_check $why"
    cat "$out/emu_build.log" "$out/emu_run.log" 2>/dev/null | grep -v '^ok - ' | tail -8 | sed 's/^/    /'
fi
echo "# nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), $(echo $files | wc -w) files and the emulation in $((SECONDS - t0)) s"
