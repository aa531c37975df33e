// The run's log: RUN/log.jsonl, one JSON object per line (step records, val records, expert load).
// Each line is flushed as written so a crash loses at most the line being written, and a resumed run
// appends to the same file.
#ifndef LLMC_LOGGER_H
#define LLMC_LOGGER_H

#include <errno.h>
#include <stdio.h>
#include <string.h>

typedef struct { FILE *f; } Logger;

// append=1 (resume): keep the records so far; append=0: start the file afresh. The run directory
// must exist (the trainer makes it when it writes config.json).
static int logger_open(Logger *lg, const char *run_dir, int append, char *err, size_t errlen) {
    char path[2048];
    snprintf(path, sizeof path, "%s/log.jsonl", run_dir);
    lg->f = fopen(path, append ? "a+" : "w");
    if (!lg->f) {
        snprintf(err, errlen, "%s/log.jsonl: cannot open for writing: %s", run_dir, strerror(errno));
        return -1;
    }
    // A run killed mid-write leaves a partial last line; end it so the next record starts its own line.
    if (append && fseek(lg->f, -1, SEEK_END) == 0 && fgetc(lg->f) != '\n') {
        fputc('\n', lg->f);
        fflush(lg->f);
    }
    return 0;
}

// json_line: one JSON object without the newline. A logger that was never opened (a non-zero rank)
// writes nothing.
static void logger_write(Logger *lg, const char *json_line) {
    if (!lg->f) return;
    fputs(json_line, lg->f);
    fputc('\n', lg->f);
    fflush(lg->f);
}

static void logger_close(Logger *lg) {
    if (lg->f) fclose(lg->f);
    lg->f = NULL;
}

#endif
