/*
 * escape DIR: tries to read things outside the preopened directory DIR and
 * reports every attempt on stdout, in a fixed order (see README.md):
 *
 *   contained: LABEL: STRERROR     the attempt failed (good)
 *   ESCAPED: LABEL                 the attempt succeeded (sandbox breach)
 *
 * LABEL is the path for open() attempts and "opendir PATH" for opendir()
 * attempts.  Paths under DIR are spelled DIR + "/" + suffix.  Progress notes
 * about the symlinks this program creates itself go to stderr only, so stdout
 * holds nothing but contained/ESCAPED lines.
 *
 * Exit 0 if everything was contained, 1 if anything escaped, 2 on bad usage.
 *
 * DIR must be the guest-visible name of the preopen (e.g. "/sandbox"); it must
 * not be "/" itself, otherwise "/" and "opendir /" legitimately succeed.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int escaped;
static const char *dir;

static void contained(const char *label, int err) {
    printf("contained: %s: %s\n", label, strerror(err));
}

static void breached(const char *label) {
    printf("ESCAPED: %s\n", label);
    escaped = 1;
}

/* Builds DIR + "/" + suffix into a static buffer (one at a time). */
static const char *under(const char *suffix) {
    static char buf[4096];
    size_t n = strlen(dir);
    const char *sep = (n > 0 && dir[n - 1] == '/') ? "" : "/";
    snprintf(buf, sizeof buf, "%s%s%s", dir, sep, suffix);
    return buf;
}

static void try_open(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        contained(path, errno);
        return;
    }
    breached(path);
    char buf[64];
    (void)read(fd, buf, sizeof buf); /* read and discard; result irrelevant */
    close(fd);
}

static void try_opendir(const char *path) {
    char label[4200];
    snprintf(label, sizeof label, "opendir %s", path);
    DIR *d = opendir(path);
    if (d == NULL) {
        contained(label, errno);
        return;
    }
    breached(label);
    (void)readdir(d);
    closedir(d);
}

/* Plants LINK -> TARGET inside DIR, then tries to read through it. */
static void try_planted_link(const char *target, const char *name) {
    char link[4096];
    snprintf(link, sizeof link, "%s", under(name));
    unlink(link); /* leftover from an earlier run; errors ignored */
    if (symlink(target, link) == 0)
        fprintf(stderr, "note: symlink %s -> %s: created\n", link, target);
    else
        fprintf(stderr, "note: symlink %s -> %s: %s\n", link, target, strerror(errno));
    try_open(link);
    unlink(link);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs("usage: escape DIR\n", stderr);
        return 2;
    }
    dir = argv[1];

    /* Absolute paths outside any preopen. */
    try_open("/etc/passwd");
    try_open("/etc/hostname");
    try_open("/proc/self/environ");
    try_open("/proc/self/mem");
    try_open("/");
    try_opendir("/");

    /* Relative escapes from the preopen. */
    try_open(under("../../../../etc/passwd"));
    try_open(under("../"));
    try_opendir(under("../"));

    /* Symlinks the host test may have planted (ENOENT if absent). */
    try_open(under("link-to-etc/passwd"));   /* link-to-etc -> /etc */
    try_opendir(under("link-to-etc"));
    try_open(under("link-to-passwd"));       /* link-to-passwd -> /etc/passwd */
    try_open(under("link-up/etc/passwd"));   /* link-up -> ../../../../../../.. */
    try_opendir(under("link-up"));

    /* Symlinks the guest plants itself, then reads through. */
    try_planted_link("/etc/passwd", "bulwark-escape-abs");
    try_planted_link("../../../../../../../../etc/passwd", "bulwark-escape-rel");

    fflush(stdout);
    return escaped ? 1 : 0;
}
