# Structured GPT-2: CPU trainer, tools, tests and benchmarks.
#   make            build the CPU trainer and the tokenize tool
#   make data       tokenize the shipped tinyshakespeare into data/tinyshakespeare/ (the default data)
#   make test       install missing Debian packages, build, and run every CPU test (test/run)
#   make bench      CPU benchmarks: tokenizer vs npm tiktoken, trainer and matmul vs PyTorch/OpenBLAS,
#                   structured layers vs dense and PyTorch, BTT-MoE routing vs masking
#   make cuda       build the CUDA trainer (train_gpt2cu) and GPU tests (needs nvcc, not a GPU)
#   make test-cuda, bench-cuda, check-gpu   GPU tests, benchmarks, and the full GPU report (need a GPU)
#   make clean      remove build outputs (keeps data/ shards)
CC      ?= gcc
CFLAGS  ?= -O3 -march=native
CFLAGS  += -std=gnu11 -fopenmp -Wall -Wextra -Wno-unused-function -Wno-unused-parameter -Wno-format-truncation -I.
LDLIBS  += -lcjson -lpcre2-8 -lopenblas -lm
HEADERS := $(wildcard llmc/*.h)

TS_DIR  := data/tinyshakespeare
TS_BINS := $(TS_DIR)/tiny_shakespeare_train.bin $(TS_DIR)/tiny_shakespeare_val.bin

.PHONY: all data test deps bench bench-tokenizer bench-cpu bench-structures bench-moe clean
all: tokenize $(if $(wildcard train_gpt2.c),train_gpt2)

train_gpt2: train_gpt2.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

tokenize: dev/data/tokenize.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

build/prepare_tinyshakespeare: dev/data/prepare_tinyshakespeare.c $(HEADERS)
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

data: $(TS_BINS)
$(TS_BINS) &: build/prepare_tinyshakespeare data/tinyshakespeare.txt data/gpt2.tiktoken
	build/prepare_tinyshakespeare data/tinyshakespeare.txt $(TS_DIR)

# Tests: every test/test_*.c is one program; test_gpt2*.c include train_gpt2.c under TESTING.
build/test/%: test/%.c test/test.h $(HEADERS) $(wildcard train_gpt2.c)
	@mkdir -p build/test
	$(CC) $(CFLAGS) -DTESTING -o $@ $< $(LDLIBS)

deps:
	@dev/install_deps.sh

test: deps
	$(MAKE) all data
	test/run

bench: bench-tokenizer bench-cpu bench-structures bench-moe

bench-tokenizer: deps all
	dev/data/bench_tokenizer

clean:
	rm -rf build train_gpt2 tokenize train_gpt2cu

bench-cpu: deps all data
	dev/bench/bench_cpu

bench-structures: deps all
	dev/bench/bench_structures

bench-moe: deps all
	dev/bench/bench_moe

# ---- CUDA (begin) ----
# The CUDA trainer (train_gpt2cu), its GPU test and the kernel programs of dev/cuda (build/cuda/).
# Building needs nvcc and the CUDA libraries only; test-cuda, bench-cuda and check-gpu need a GPU.
# No --use_fast_math: the GPU must follow the CPU trainer's expf/tanhf/sqrtf to stay within the
# parity tolerances of test/test_gpt2_cuda.cu.
# The kernel programs link the CPU references (llmc/blockdiag.h, llmc/moe.h are C: build/cuda/cpu_ref.o).
# build/cuda/emu_check runs the structured-layer kernels on a CPU emulation (g++, no GPU; test/test_cuda_build.sh).
NVCC        ?= nvcc
NVCC_FLAGS  ?= -O3
NVCC_FLAGS  += -arch=sm_90 -std=c++17 -I. -Xcompiler -fopenmp
NVCC_LDLIBS := -lcublasLt -lcublas -lnccl -lcjson -lpcre2-8 -lm
CUDA_DEPS   := $(wildcard llmc/*.cuh) $(HEADERS)
CUDA_DEV    := $(patsubst dev/cuda/%.cu,build/cuda/%,$(wildcard dev/cuda/*.cu))
# nvcc's include directory as nvcc reports it (on some machines nvcc is a wrapper script in /usr/local/bin);
# evaluated only where used (=, not :=), so that other targets do not run nvcc
CUDA_INC     = $(shell $(NVCC) --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^\#\$$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)

.PHONY: cuda test-cuda bench-cuda check-gpu
cuda: train_gpt2cu build/cuda/test_gpt2_cuda $(CUDA_DEV)

train_gpt2cu: train_gpt2.cu $(CUDA_DEPS)
	$(NVCC) $(NVCC_FLAGS) -o $@ $< $(NVCC_LDLIBS)

build/cuda/test_gpt2_cuda: test/test_gpt2_cuda.cu train_gpt2.cu test/test.h $(CUDA_DEPS)
	@mkdir -p build/cuda
	$(NVCC) $(NVCC_FLAGS) -o $@ $< $(NVCC_LDLIBS)

build/cuda/cpu_ref.o: dev/cuda/cpu_ref.c dev/cuda/cpu_ref.h $(HEADERS)
	@mkdir -p build/cuda
	$(CC) $(CFLAGS) -c -o $@ $<

build/cuda/%: dev/cuda/%.cu dev/cuda/common.h dev/cuda/cpu_ref.h build/cuda/cpu_ref.o $(CUDA_DEPS)
	@mkdir -p build/cuda
	$(NVCC) $(NVCC_FLAGS) -o $@ $< build/cuda/cpu_ref.o $(NVCC_LDLIBS) -lopenblas

build/cuda/emu_check: dev/cuda/emu_check.cpp dev/cuda/emu.h dev/cuda/cpu_ref.h build/cuda/cpu_ref.o $(CUDA_DEPS)
	@mkdir -p build/cuda
	$(CXX) -std=c++20 -O1 -I. -I$(CUDA_INC) -fopenmp -Wno-unknown-pragmas -o $@ $< build/cuda/cpu_ref.o \
		-lopenblas -lcjson -lpcre2-8 -lm -lpthread

# GPU parity with the CPU trainer for every structure, resume, checkpoints across trainers (ok/FAIL lines)
test-cuda: cuda all data build/test/gpt2_cuda_ref
	dev/cuda/run_tests

# GPT-2 124M tokens/s and MFU per structure next to our dense model and PyTorch on the same GPU
bench-cuda: cuda all data
	dev/cuda/bench_gpt2

# everything GPU-side, one report in $(OUT) (when set) or ./gpu-report
check-gpu:
	dev/cuda/check_gpu "$(if $(OUT),$(OUT),gpu-report)"
# ---- CUDA (end) ----
