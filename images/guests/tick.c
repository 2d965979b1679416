/*
 * tick COUNT MS: prints "tick I\n" for I = 1..COUNT, one line every MS milliseconds (the
 * first after MS), each written at once; exits 0. A failed write: "tick: write: STRERROR\n"
 * on stderr, exit 1. Missing or non-numeric arguments: usage on stderr, exit 2.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int number(const char *text, unsigned long *out) {
    char *end = NULL;
    if (text[0] < '0' || text[0] > '9') return -1;
    errno = 0;
    *out = strtoul(text, &end, 10);
    return (errno != 0 || *end != '\0') ? -1 : 0;
}

int main(int argc, char **argv) {
    unsigned long count, ms;
    if (argc < 3 || number(argv[1], &count) != 0 || number(argv[2], &ms) != 0) {
        fputs("usage: tick COUNT MS\n", stderr);
        return 2;
    }
    for (unsigned long i = 1; i <= count; i++) {
        struct timespec req = {
            .tv_sec = (time_t)(ms / 1000),
            .tv_nsec = (long)(ms % 1000) * 1000000L,
        };
        while (nanosleep(&req, &req) != 0 && errno == EINTR) {
        }
        char line[32];
        int len = snprintf(line, sizeof line, "tick %lu\n", i);
        if (write(1, line, (size_t)len) != len) {
            fprintf(stderr, "tick: write: %s\n", strerror(errno));
            return 1;
        }
    }
    return 0;
}
