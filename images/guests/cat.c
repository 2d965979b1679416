/*
 * cat: copies stdin to stdout until EOF, exit 0.
 * On a read/write error: "cat: read: STRERROR\n" / "cat: write: STRERROR\n"
 * on stderr, exit 1.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    static char buf[16384];
    for (;;) {
        ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "cat: read: %s\n", strerror(errno));
            return 1;
        }
        char *p = buf;
        while (n > 0) {
            ssize_t w = write(STDOUT_FILENO, p, (size_t)n);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                fprintf(stderr, "cat: write: %s\n", strerror(errno));
                return 1;
            }
            p += w;
            n -= w;
        }
    }
}
