/*
 * sleep MS: sleeps MS milliseconds (nanosleep -> WASI poll_oneoff), then
 * prints "slept MS ms\n" (MS as parsed, in decimal) and exits 0.
 * Missing or non-numeric MS: usage on stderr, exit 2.
 * nanosleep failure: "sleep: STRERROR\n" on stderr, exit 1.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
    char *end = NULL;
    if (argc < 2 || argv[1][0] < '0' || argv[1][0] > '9') {
        fputs("usage: sleep MS\n", stderr);
        return 2;
    }
    errno = 0;
    unsigned long long ms = strtoull(argv[1], &end, 10);
    if (errno != 0 || *end != '\0') {
        fputs("usage: sleep MS\n", stderr);
        return 2;
    }
    struct timespec req = {
        .tv_sec = (time_t)(ms / 1000),
        .tv_nsec = (long)(ms % 1000) * 1000000L,
    };
    struct timespec rem;
    while (nanosleep(&req, &rem) != 0) {
        if (errno != EINTR) {
            fprintf(stderr, "sleep: %s\n", strerror(errno));
            return 1;
        }
        req = rem;
    }
    printf("slept %llu ms\n", ms);
    return 0;
}
