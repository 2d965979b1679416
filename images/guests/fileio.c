/*
 * fileio: a tiny file tool for exercising the WASI filesystem surface.
 *
 *   fileio read PATH            print the file content to stdout
 *   fileio write PATH TEXT      create/truncate PATH, write TEXT; prints "wrote N bytes\n"
 *   fileio append PATH TEXT     create if missing, append TEXT; prints "appended N bytes\n"
 *   fileio mkdir PATH           mkdir(PATH, 0755)
 *   fileio rm PATH              unlink(PATH)
 *   fileio rmdir PATH           rmdir(PATH)
 *   fileio rename FROM TO       rename(FROM, TO)
 *   fileio truncate PATH        truncate(PATH, 0)
 *   fileio ls DIR               entry names sorted by strcmp, one per line, no . / ..
 *   fileio symlink TARGET LINK  symlink(TARGET, LINK)
 *   fileio fill PATH MIB        create/truncate PATH, write MIB mebibytes of zeros
 *
 * Success: exit 0 (mkdir/rm/rmdir/rename/truncate/symlink print nothing).
 * Failure: "fileio: OP PATH: STRERROR\n" on stderr, exit 1, where PATH is the
 *          first path operand (FROM for rename) except for symlink, where it
 *          is LINK (the path being created).
 * Bad usage / unknown OP: usage text on stderr, exit 2.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *op_name;
static const char *op_path;

static int fail(void) {
    fprintf(stderr, "fileio: %s %s: %s\n", op_name, op_path, strerror(errno));
    return 1;
}

static int usage(void) {
    fputs("usage: fileio read PATH | write PATH TEXT | append PATH TEXT | mkdir PATH |\n"
          "              rm PATH | rmdir PATH | rename FROM TO | truncate PATH | fill PATH MIB |\n"
          "              ls DIR | symlink TARGET LINKPATH\n",
          stderr);
    return 2;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int do_read(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return fail();
    char buf[4096];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int saved = errno;
            close(fd);
            errno = saved;
            return fail();
        }
        if (write_all(STDOUT_FILENO, buf, (size_t)n) < 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            return fail();
        }
    }
    close(fd);
    return 0;
}

static int do_fill(const char *path, const char *mib) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fail();
    static char zeros[1 << 16];
    long chunks = atol(mib) * 16;
    for (long i = 0; i < chunks; i++) {
        if (write_all(fd, zeros, sizeof zeros) < 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            return fail();
        }
    }
    return close(fd) == 0 ? 0 : fail();
}

static int do_write(const char *path, const char *text, int append) {
    int flags = O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC);
    int fd = open(path, flags, 0644);
    if (fd < 0)
        return fail();
    size_t len = strlen(text);
    if (write_all(fd, text, len) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return fail();
    }
    if (close(fd) < 0)
        return fail();
    printf("%s %zu bytes\n", append ? "appended" : "wrote", len);
    return 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int do_ls(const char *path) {
    DIR *d = opendir(path);
    if (d == NULL)
        return fail();
    char **names = NULL;
    size_t count = 0, cap = 0;
    struct dirent *ent;
    errno = 0;
    while ((ent = readdir(d)) != NULL) {
        if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0)
            continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 16;
            char **grown = realloc(names, cap * sizeof *names);
            if (grown == NULL)
                return fail();
            names = grown;
        }
        names[count] = strdup(ent->d_name);
        if (names[count] == NULL)
            return fail();
        count++;
        errno = 0;
    }
    if (errno != 0) {
        int saved = errno;
        closedir(d);
        errno = saved;
        return fail();
    }
    closedir(d);
    qsort(names, count, sizeof *names, cmp_names);
    for (size_t i = 0; i < count; i++) {
        printf("%s\n", names[i]);
        free(names[i]);
    }
    free(names);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return usage();
    const char *op = argv[1];
    const char *a = argv[2];
    const char *b = argc > 3 ? argv[3] : NULL;
    int nargs = argc - 2;
    op_name = op;
    op_path = a;

    if (strcmp(op, "read") == 0 && nargs == 1)
        return do_read(a);
    if (strcmp(op, "write") == 0 && nargs == 2)
        return do_write(a, b, 0);
    if (strcmp(op, "append") == 0 && nargs == 2)
        return do_write(a, b, 1);
    if (strcmp(op, "mkdir") == 0 && nargs == 1)
        return mkdir(a, 0755) == 0 ? 0 : fail();
    if (strcmp(op, "rm") == 0 && nargs == 1)
        return unlink(a) == 0 ? 0 : fail();
    if (strcmp(op, "rmdir") == 0 && nargs == 1)
        return rmdir(a) == 0 ? 0 : fail();
    if (strcmp(op, "rename") == 0 && nargs == 2)
        return rename(a, b) == 0 ? 0 : fail();
    if (strcmp(op, "truncate") == 0 && nargs == 1)
        return truncate(a, 0) == 0 ? 0 : fail();
    if (strcmp(op, "fill") == 0 && nargs == 2)
        return do_fill(a, b);
    if (strcmp(op, "ls") == 0 && nargs == 1)
        return do_ls(a);
    if (strcmp(op, "symlink") == 0 && nargs == 2) {
        op_path = b;
        return symlink(a, b) == 0 ? 0 : fail();
    }
    return usage();
}
