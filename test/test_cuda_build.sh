#!/usr/bin/env bash
# CI without a GPU: every CUDA source compiles and links with nvcc for sm_90 (H100), so build
# breaks are caught where the GPU tests cannot run. One line per file: "ok - compiles: FILE" or
# "FAIL - compiles: FILE" with the compiler's first errors. Two files at a time (CI has 2 cores);
# host and device optimization off (-O0, ptxas -O0): this checks the code, it does not make
# binaries to run (make cuda does, with -O3, into other paths).
set -u
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
    echo "FAIL - nvcc: not found (install the CUDA toolkit; CI has it at /usr/local/cuda/bin)"
    exit 1
fi
out=$(mktemp -d /tmp/cuda_build.XXXXXX)
trap 'rm -rf "$out"' EXIT
files="train_gpt2.cu test/test_gpt2_cuda.cu $(ls dev/cuda/*.cu)"
build() {  # one file -> out/NAME.bin, its log in out/NAME.log, status in out/NAME.rc
    local f=$1 name; name=$(echo "$1" | tr / _)
    nvcc -O0 -Xptxas -O0 -arch=sm_90 -std=c++17 -I. -Xcompiler -fopenmp -o "$out/$name.bin" "$f" \
        -lcublasLt -lcublas -lnccl -lcjson -lpcre2-8 -lm > "$out/$name.log" 2>&1
    echo $? > "$out/$name.rc"
}
export -f build; export out
t0=$SECONDS
printf '%s\n' $files | xargs -P 2 -I{} bash -c 'build {}'
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
echo "# nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), $(echo $files | wc -w) files in $((SECONDS - t0)) s"
