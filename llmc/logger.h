// The run's log: RUN/log.jsonl, one JSON object per line (step records, val records, expert load).
// Each line is flushed as written so a crash loses at most the line being written, and a resumed run
// appends to the same file.
#ifndef LLMC_LOGGER_H
#define LLMC_LOGGER_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

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

// On --resume from a checkpoint at `step`: drop the records a run wrote after that checkpoint (it
// went on, then died), so the resumed run's records follow without duplicates. Kept: records of
// earlier steps, and the train record of `step` itself (a val or sample record at `step` is written
// again by the resumed run). Rewritten through a tmp file and rename; a missing log is fine.
static int logger_truncate_after(const char *run_dir, int step, char *err, size_t errlen) {
    char path[2048], tmp[2100], line[65536];
    snprintf(path, sizeof path, "%s/log.jsonl", run_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *in = fopen(path, "r");
    if (!in) return 0;
    FILE *out = fopen(tmp, "w");
    if (!out) {
        fclose(in);
        snprintf(err, errlen, "%s: cannot write: %s", tmp, strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof line, in)) {
        cJSON *rec = cJSON_Parse(line);   // a partial last line (killed mid-write) does not parse: dropped
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(rec, "step");
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(rec, "type");
        int keep = cJSON_IsNumber(s) && (s->valueint < step ||
                   (s->valueint == step && cJSON_IsString(t) && !strcmp(t->valuestring, "train")));
        if (keep) fputs(line, out);
        cJSON_Delete(rec);
    }
    fclose(in);
    if (fclose(out) != 0 || rename(tmp, path) != 0) {
        snprintf(err, errlen, "%s: cannot rewrite: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static void logger_close(Logger *lg) {
    if (lg->f) fclose(lg->f);
    lg->f = NULL;
}

#endif
