/*
 * passwd: tries to print /etc/passwd.
 * Success: the file content on stdout, exit 0.
 * Failure: "passwd: /etc/passwd: STRERROR\n" on stderr, exit 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define PATH "/etc/passwd"

static int fail(void) {
    fprintf(stderr, "passwd: " PATH ": %s\n", strerror(errno));
    return 1;
}

int main(void) {
    int fd = open(PATH, O_RDONLY);
    if (fd < 0)
        return fail();
    char buf[4096];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0)
            return fail();
        if (fwrite(buf, 1, (size_t)n, stdout) != (size_t)n)
            return fail();
    }
    close(fd);
    return fflush(stdout) == 0 ? 0 : 1;
}
