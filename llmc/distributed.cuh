// Data parallelism with NCCL, without linking MPI: each process finds its rank, the world size and
// its rank on the node from the environment its launcher sets, and the processes exchange NCCL's
// unique id through a file in a shared directory.
//
//   launcher               rank / world / local rank
//   mpirun (Open MPI)      OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_LOCAL_RANK
//   mpirun (MPICH, Intel)  PMI_RANK / PMI_SIZE / MPI_LOCALRANKID (or PMI_LOCAL_RANK)
//   srun (Slurm)           SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
//   anything else          LLMC_RANK / LLMC_WORLD_SIZE / LLMC_LOCAL_RANK, set by hand or by a script
// LLMC_* take precedence when set. Without a local rank the GPU is rank % (GPUs on the node).
// None of them set: one process, world size 1, which runs the same code (NCCL with one rank).
//
// Rendezvous: rank 0 creates the id and writes it to DIR/nccl_id.TAG (to a temporary name, then
// rename, so a reader never sees half a file); the others poll for it (up to 10 minutes), then all
// call ncclCommInitRank, which returns only when every rank has joined, after which rank 0 deletes
// the file. DIR is $LLMC_RENDEZVOUS, else the run directory (it must be on a filesystem every node
// sees). TAG names the job: $LLMC_RUN_ID, else SLURM_JOB_ID.SLURM_STEP_ID, else Open MPI's or
// PMIx's job id, else "default"; a file older than this process by more than 2 minutes is a left-over
// of a crashed job and is not read.
#ifndef LLMC_DISTRIBUTED_CUH
#define LLMC_DISTRIBUTED_CUH
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <nccl.h>
#include "llmc/cuda_common.cuh"

static void nccl_check(ncclResult_t r, const char *file, int line) {
    if (r != ncclSuccess) {
        fprintf(stderr, "error: NCCL at %s:%d: %s\n", file, line, ncclGetErrorString(r));
        exit(1);
    }
}
#define ncclCheck(x) nccl_check((x), __FILE__, __LINE__)

typedef struct {
    int rank, world, local_rank;
    const char *launcher;     // which environment gave the ranks
    ncclComm_t comm;
    void *scratch;            // 8 bytes of device memory for the scalar collectives below
} Dist;

static int dist_env(const char *name, int *out) {
    const char *s = getenv(name);
    if (!s || !*s) return 0;
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v < 0 || v > 1000000) { fprintf(stderr, "error: %s=%s is not a rank or size\n", name, s); exit(1); }
    *out = (int)v;
    return 1;
}

// Fills rank, world, local_rank (-1: unknown) and launcher from the environment.
static void dist_detect(Dist *d) {
    static const struct { const char *rank, *size, *local, *name; } sources[] = {
        {"LLMC_RANK", "LLMC_WORLD_SIZE", "LLMC_LOCAL_RANK", "LLMC_* variables"},
        {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"},
        {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI (MPICH)"},
        {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "Slurm"},
    };
    memset(d, 0, sizeof *d);
    d->world = 1;
    d->local_rank = -1;
    d->launcher = "single process";
    for (size_t i = 0; i < sizeof sources / sizeof sources[0]; i++) {
        int r, w;
        if (dist_env(sources[i].rank, &r) && dist_env(sources[i].size, &w)) {
            if (w < 1 || r >= w) { fprintf(stderr, "error: %s=%d with %s=%d\n", sources[i].rank, r, sources[i].size, w); exit(1); }
            d->rank = r;
            d->world = w;
            d->launcher = sources[i].name;
            if (!dist_env(sources[i].local, &d->local_rank) && i == 2) dist_env("PMI_LOCAL_RANK", &d->local_rank);
            break;
        }
    }
    dist_env("LLMC_LOCAL_RANK", &d->local_rank);
}

static void dist_job_tag(char *tag, size_t n) {
    const char *slurm = getenv("SLURM_JOB_ID"), *step = getenv("SLURM_STEP_ID");
    const char *names[] = {"LLMC_RUN_ID", "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMI_ID_PREFIX"};
    snprintf(tag, n, "default");
    if (slurm && *slurm) snprintf(tag, n, "%s.%s", slurm, step && *step ? step : "0");
    for (int i = 3; i >= 0; i--) {   // the first name wins: LLMC_RUN_ID over everything
        const char *v = getenv(names[i]);
        if (v && *v && (i == 0 || !(slurm && *slurm))) snprintf(tag, n, "%s", v);
    }
    for (char *p = tag; *p; p++) if (*p == '/' || *p == ' ') *p = '_';
}

// Picks the GPU, sets up the stream and libraries (cuda_setup), and joins the NCCL communicator.
// default_dir: the rendezvous directory when $LLMC_RENDEZVOUS is unset (the run directory).
static void dist_init(Dist *d, const char *default_dir) {
    dist_detect(d);
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        fprintf(stderr, "error: no usable CUDA GPU (%s); the CPU trainer is train_gpt2\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        exit(1);
    }
    int dev = d->local_rank >= 0 ? d->local_rank : d->rank % ndev;
    if (dev >= ndev) {
        fprintf(stderr, "error: rank %d wants GPU %d (local rank) but this node has %d\n", d->rank, dev, ndev);
        exit(1);
    }
    cuda_setup(dev);
    ncclUniqueId id;
    char path[2048] = "", tmp[2100];
    if (d->world == 1) {
        ncclCheck(ncclGetUniqueId(&id));
    } else {
        const char *dir = getenv("LLMC_RENDEZVOUS");
        if (!dir || !*dir) dir = default_dir;
        char tag[256];
        dist_job_tag(tag, sizeof tag);
        snprintf(path, sizeof path, "%s/nccl_id.%s", dir, tag);
        if (d->rank == 0) {
            ncclCheck(ncclGetUniqueId(&id));
            snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
            FILE *f = fopen(tmp, "wb");
            if (!f || fwrite(&id, sizeof id, 1, f) != 1 || fclose(f) != 0 || rename(tmp, path) != 0) {
                fprintf(stderr, "error: rank 0 cannot write the NCCL id to %s: %s (set LLMC_RENDEZVOUS to a "
                        "shared writable directory)\n", path, strerror(errno));
                exit(1);
            }
        } else {
            time_t start = time(NULL);
            for (;;) {
                struct stat sb;
                FILE *f;
                if (stat(path, &sb) == 0 && sb.st_size == (off_t)sizeof id && sb.st_mtime >= start - 120 &&
                    (f = fopen(path, "rb")) != NULL) {
                    size_t got = fread(&id, sizeof id, 1, f);
                    fclose(f);
                    if (got == 1) break;
                }
                if (time(NULL) - start > 600) {
                    fprintf(stderr, "error: rank %d: no NCCL id from rank 0 in %s after 10 minutes (is the "
                            "directory shared by every node? set LLMC_RENDEZVOUS)\n", d->rank, path);
                    exit(1);
                }
                usleep(100000);
            }
        }
    }
    ncclCheck(ncclCommInitRank(&d->comm, d->world, id, d->rank));
    if (d->world > 1 && d->rank == 0) unlink(path);
    cudaCheck(cudaMalloc(&d->scratch, 8));
}

// Sum of a double over the ranks (evaluation losses).
static double dist_sum_double(Dist *d, double x) {
    if (d->world == 1) return x;
    cudaCheck(cudaMemcpyAsync(d->scratch, &x, sizeof x, cudaMemcpyHostToDevice, main_stream));
    ncclCheck(ncclAllReduce(d->scratch, d->scratch, 1, ncclFloat64, ncclSum, d->comm, main_stream));
    cudaCheck(cudaMemcpyAsync(&x, d->scratch, sizeof x, cudaMemcpyDeviceToHost, main_stream));
    cudaCheck(cudaStreamSynchronize(main_stream));
    return x;
}
// 1 if any rank passes non-zero (a stop signal seen by one rank stops all at the same step).
static int dist_any(Dist *d, int flag) {
    int x = flag != 0;
    if (d->world == 1) return x;
    cudaCheck(cudaMemcpyAsync(d->scratch, &x, sizeof x, cudaMemcpyHostToDevice, main_stream));
    ncclCheck(ncclAllReduce(d->scratch, d->scratch, 1, ncclInt32, ncclMax, d->comm, main_stream));
    cudaCheck(cudaMemcpyAsync(&x, d->scratch, sizeof x, cudaMemcpyDeviceToHost, main_stream));
    cudaCheck(cudaStreamSynchronize(main_stream));
    return x;
}

static void dist_free(Dist *d) {
    if (d->comm) ncclCommDestroy(d->comm);
    cudaFree(d->scratch);
    d->comm = NULL;
}

#endif
