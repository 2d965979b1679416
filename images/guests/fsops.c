/*
 * fsops: runs a script of (hostile) filesystem operations and reports what
 * happened, one stdout line per operation.  The escape fuzzer on the host
 * generates the scripts; it then checks that nothing outside the preopened
 * directories was read or changed.  The guest itself judges nothing: a
 * failed operation is an answer, not a failure, so the exit code is always 0.
 *
 * Every argv element after argv[0] is one operation, run in order.  An
 * operation is fields separated by single ASCII spaces; each field is
 * percent-encoded (%HH, either case, is that byte; any other byte stands for
 * itself), so fields can carry spaces, newlines and NUL bytes.  Field 0 is
 * the operation:
 *
 *   read P              open(P, O_RDONLY), print up to 4096 bytes
 *   list P              print the entry names of P (without . and ..)
 *   write P DATA        open(P, O_WRONLY|O_CREAT|O_TRUNC, 0644), write DATA
 *   append P DATA       open(P, O_WRONLY|O_CREAT|O_APPEND, 0644), write DATA
 *   mkdir P             mkdir(P, 0755)
 *   rmdir P | unlink P | chdir P
 *   truncate P          truncate(P, 0)
 *   utime P             utimensat(AT_FDCWD, P, NULL, 0)
 *   symlink TARGET P    symlink(TARGET, P)
 *   link A B | rename A B
 *   readlink P          print the link's target
 *   stat P | lstat P    print "SIZE TYPE", TYPE one of file dir symlink other
 *   raw N P OFLAGS MODE the path_open import itself on fd N (see do_raw)
 *
 * Paths go to wasi-libc as C strings, so a decoded NUL ends them; only `raw`
 * hands the host the path's bytes with their length.  DATA is written with
 * its length, NULs included.
 *
 * Output, one line per operation, INDEX counting from 1:
 *
 *   INDEX OP ok
 *   INDEX OP ok DATA          (only when DATA is not empty)
 *   INDEX OP err ERRNO        (decimal; for raw the WASI errno, which
 *                              wasi-libc's errno values equal anyway)
 *   INDEX OP err usage        (unknown OP, wrong field count, bad escape,
 *                              field over 64 KiB, bad number or MODE)
 *
 * OP, file contents, names and link targets are printed with every byte
 * outside 0x21..0x7e, and '%' itself, as %HH (upper-case hex), so a line is
 * always one line and ASCII tokens stay greppable.  `list` separates names
 * with single spaces.  If OP itself cannot be decoded, its raw bytes are
 * printed (escaped the same way).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

/*
 * wasi-libc's __wasi_path_open takes a C string and measures it with strlen,
 * which would hide embedded NULs from the host.  Importing path_open under
 * our own name lets us pass the pointer and the decoded length as they are.
 */
__wasi_errno_t raw_path_open(__wasi_fd_t fd, __wasi_lookupflags_t dirflags,
                             const char *path, size_t path_len,
                             __wasi_oflags_t oflags, __wasi_rights_t rights_base,
                             __wasi_rights_t rights_inheriting,
                             __wasi_fdflags_t fdflags, __wasi_fd_t *opened)
    __attribute__((import_module("wasi_snapshot_preview1"),
                   import_name("path_open")));

#define MAX_FIELDS 5          /* raw N P OFLAGS MODE is the longest operation */
#define FIELD_MAX (64 * 1024) /* longest decoded field; longer is a usage error */
#define READ_MAX 4096         /* bytes shown by read and raw r */
#define USAGE (-1)            /* an operation's "err usage" result */

/* Decoded fields of the current operation, each NUL-terminated so that a
 * path field is also a C string (which stops at the first decoded NUL). */
static char fields[MAX_FIELDS][FIELD_MAX + 1];
static size_t field_len[MAX_FIELDS];
static size_t nfields;

/* Escaped data of the current operation's "ok" line.  Big enough for a
 * readlink of a full FIELD_MAX target (3 bytes out per byte in); only a
 * huge directory listing can fill it, and that is reported as EOVERFLOW. */
static char out[3 * FIELD_MAX + 1024];
static size_t out_len;
static int out_full;

static void out_reset(void) {
    out_len = 0;
    out_full = 0;
}

/* Appends text verbatim (separators and numbers that need no escaping). */
static void out_text(const char *s) {
    size_t n = strlen(s);
    if (n > sizeof out - out_len) {
        out_full = 1;
        return;
    }
    memcpy(out + out_len, s, n);
    out_len += n;
}

static int printable(unsigned char c) {
    return c >= 0x21 && c <= 0x7e && c != '%';
}

/* Appends bytes escaped; all-or-nothing, so a name is never cut in half. */
static void out_bytes(const char *p, size_t n) {
    static const char hex[] = "0123456789ABCDEF";
    size_t need = 0;
    for (size_t i = 0; i < n; i++)
        need += printable((unsigned char)p[i]) ? 1 : 3;
    if (need > sizeof out - out_len) {
        out_full = 1;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (printable(c)) {
            out[out_len++] = (char)c;
        } else {
            out[out_len++] = '%';
            out[out_len++] = hex[c >> 4];
            out[out_len++] = hex[c & 15];
        }
    }
}

/* Writes bytes to stdout escaped the same way (the OP column). */
static void print_escaped(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (printable(c))
            putchar(c);
        else
            printf("%%%02X", c);
    }
}

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes src[0..n) into field slot i.  Returns 0, or -1 on a bad escape
 * or a decoded length over FIELD_MAX. */
static int decode_field(size_t i, const char *src, size_t n) {
    char *dst = fields[i];
    size_t len = 0;
    for (size_t k = 0; k < n; k++) {
        if (len == FIELD_MAX)
            return -1;
        char c = src[k];
        if (c == '%') {
            if (k + 2 >= n)
                return -1; /* "%" or "%H" at the end of the field */
            int hi = hexval(src[k + 1]), lo = hexval(src[k + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            c = (char)(hi << 4 | lo);
            k += 2;
        }
        dst[len++] = c;
    }
    dst[len] = '\0';
    field_len[i] = len;
    return 0;
}

/* Splits one argv element into fields.  Returns 0, or -1 if there are more
 * than MAX_FIELDS fields or a field does not decode.  Field 0 is decoded
 * first so that the report can name the operation whenever possible. */
static int split(const char *arg) {
    nfields = 0;
    const char *p = arg;
    for (;;) {
        const char *end = strchr(p, ' ');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (nfields == MAX_FIELDS || decode_field(nfields, p, n) < 0)
            return -1;
        nfields++;
        if (end == NULL)
            return 0;
        p = end + 1;
    }
}

/* libc calls report failure through errno; never turn a failure into "ok". */
static int fail(void) {
    return errno > 0 ? errno : EIO;
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

/* Each operation returns 0 (ok, data in `out`), an errno, or USAGE. */

static int do_read(void) {
    int fd = open(fields[1], O_RDONLY);
    if (fd < 0)
        return fail();
    char buf[READ_MAX];
    size_t got = 0;
    while (got < sizeof buf) {
        ssize_t n = read(fd, buf + got, sizeof buf - got);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int err = fail();
            close(fd);
            return err;
        }
        got += (size_t)n;
    }
    close(fd);
    out_bytes(buf, got);
    return 0;
}

static int do_list(void) {
    DIR *d = opendir(fields[1]);
    if (d == NULL)
        return fail();
    struct dirent *ent;
    errno = 0;
    while ((ent = readdir(d)) != NULL) {
        /* Every directory has these; leaving them out makes the list
         * comparable with the host's own listing. */
        if (strcmp(ent->d_name, ".") != 0 && strcmp(ent->d_name, "..") != 0) {
            if (out_len > 0)
                out_text(" ");
            out_bytes(ent->d_name, strlen(ent->d_name));
            if (out_full) {
                closedir(d);
                return EOVERFLOW;
            }
        }
        errno = 0;
    }
    int err = errno;
    closedir(d);
    return err;
}

static int do_write(int extra_flags) {
    int fd = open(fields[1], O_WRONLY | O_CREAT | extra_flags, 0644);
    if (fd < 0)
        return fail();
    if (write_all(fd, fields[2], field_len[2]) < 0) {
        int err = fail();
        close(fd);
        return err;
    }
    /* close can be where a host reports a deferred write error. */
    return close(fd) == 0 ? 0 : fail();
}

static int do_readlink(void) {
    static char buf[FIELD_MAX];
    ssize_t n = readlink(fields[1], buf, sizeof buf);
    if (n < 0)
        return fail();
    out_bytes(buf, (size_t)n);
    return 0;
}

static int do_stat(int follow) {
    struct stat st;
    if ((follow ? stat(fields[1], &st) : lstat(fields[1], &st)) != 0)
        return fail();
    const char *type = S_ISREG(st.st_mode)   ? "file"
                       : S_ISDIR(st.st_mode) ? "dir"
                       : S_ISLNK(st.st_mode) ? "symlink"
                                             : "other";
    char line[64];
    snprintf(line, sizeof line, "%lld %s", (long long)st.st_size, type);
    out_text(line);
    return 0;
}

/* Parses a field of decimal digits only (no sign, no blanks) up to max. */
static int parse_decimal(size_t i, uint32_t max, uint32_t *value) {
    if (field_len[i] == 0)
        return -1;
    uint32_t v = 0;
    for (size_t k = 0; k < field_len[i]; k++) {
        char c = fields[i][k];
        if (c < '0' || c > '9')
            return -1;
        if (v > (max - (uint32_t)(c - '0')) / 10)
            return -1;
        v = v * 10 + (uint32_t)(c - '0');
    }
    *value = v;
    return 0;
}

/* raw r: a directory shows as "dir", anything else as up to READ_MAX bytes. */
static __wasi_errno_t raw_read(__wasi_fd_t fd) {
    __wasi_filestat_t st;
    __wasi_errno_t err = __wasi_fd_filestat_get(fd, &st);
    if (err != 0)
        return err;
    if (st.filetype == __WASI_FILETYPE_DIRECTORY) {
        out_text("dir");
        return 0;
    }
    char buf[READ_MAX];
    size_t got = 0;
    while (got < sizeof buf) {
        __wasi_iovec_t iov = {(uint8_t *)buf + got, sizeof buf - got};
        __wasi_size_t n;
        err = __wasi_fd_read(fd, &iov, 1, &n);
        if (err == __WASI_ERRNO_INTR)
            continue;
        if (err != 0)
            return err;
        if (n == 0)
            break;
        got += n;
    }
    out_bytes(buf, got);
    return 0;
}

/* raw w: the 3 bytes "raw", so the host can tell what this guest wrote. */
static __wasi_errno_t raw_write(__wasi_fd_t fd) {
    static const char data[] = "raw";
    size_t done = 0;
    while (done < sizeof data - 1) {
        __wasi_ciovec_t iov = {(const uint8_t *)data + done, sizeof data - 1 - done};
        __wasi_size_t n;
        __wasi_errno_t err = __wasi_fd_write(fd, &iov, 1, &n);
        if (err == __WASI_ERRNO_INTR)
            continue;
        if (err != 0)
            return err;
        if (n == 0)
            return __WASI_ERRNO_IO; /* no progress; do not spin */
        done += n;
    }
    return 0;
}

/*
 * raw N P OFLAGS MODE: path_open on fd N with SYMLINK_FOLLOW, bypassing
 * wasi-libc's preopen lookup, so absolute paths, "..", and NULs reach the
 * host's path resolution unchanged.  OFLAGS is passed through as given
 * (0..65535, unknown bits included): the host must reject what it does
 * not know.
 */
static int do_raw(void) {
    uint32_t dirfd, oflags;
    if (parse_decimal(1, INT32_MAX, &dirfd) < 0 || parse_decimal(3, UINT16_MAX, &oflags) < 0)
        return USAGE;
    int writing;
    if (strcmp(fields[4], "r") == 0 && field_len[4] == 1)
        writing = 0;
    else if (strcmp(fields[4], "w") == 0 && field_len[4] == 1)
        writing = 1;
    else
        return USAGE;

    __wasi_rights_t rights =
        writing ? __WASI_RIGHTS_FD_WRITE | __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_FILESTAT_GET
                : __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_READDIR |
                      __WASI_RIGHTS_FD_FILESTAT_GET | __WASI_RIGHTS_PATH_OPEN;
    __wasi_fd_t fd;
    __wasi_errno_t err = raw_path_open((__wasi_fd_t)dirfd, __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW,
                                       fields[2], field_len[2], (__wasi_oflags_t)oflags,
                                       rights, 0, 0, &fd);
    if (err != 0)
        return err;
    err = writing ? raw_write(fd) : raw_read(fd);
    __wasi_errno_t close_err = __wasi_fd_close(fd);
    /* As with write, a failing close after writing is the write failing. */
    if (err == 0 && writing)
        err = close_err;
    return err;
}

static int run_op(void) {
    const char *op = fields[0];
    const char *a = fields[1], *b = fields[2];
    if (field_len[0] != strlen(op))
        return USAGE; /* "read%00x" is not "read" */

    if (nfields == 2) {
        if (strcmp(op, "read") == 0)
            return do_read();
        if (strcmp(op, "list") == 0)
            return do_list();
        if (strcmp(op, "mkdir") == 0)
            return mkdir(a, 0755) == 0 ? 0 : fail();
        if (strcmp(op, "rmdir") == 0)
            return rmdir(a) == 0 ? 0 : fail();
        if (strcmp(op, "unlink") == 0)
            return unlink(a) == 0 ? 0 : fail();
        if (strcmp(op, "truncate") == 0)
            return truncate(a, 0) == 0 ? 0 : fail();
        if (strcmp(op, "utime") == 0)
            return utimensat(AT_FDCWD, a, NULL, 0) == 0 ? 0 : fail();
        if (strcmp(op, "chdir") == 0)
            return chdir(a) == 0 ? 0 : fail();
        if (strcmp(op, "readlink") == 0)
            return do_readlink();
        if (strcmp(op, "stat") == 0)
            return do_stat(1);
        if (strcmp(op, "lstat") == 0)
            return do_stat(0);
    } else if (nfields == 3) {
        if (strcmp(op, "write") == 0)
            return do_write(O_TRUNC);
        if (strcmp(op, "append") == 0)
            return do_write(O_APPEND);
        if (strcmp(op, "symlink") == 0)
            return symlink(a, b) == 0 ? 0 : fail();
        if (strcmp(op, "link") == 0)
            return link(a, b) == 0 ? 0 : fail();
        if (strcmp(op, "rename") == 0)
            return rename(a, b) == 0 ? 0 : fail();
    } else if (nfields == 5) {
        if (strcmp(op, "raw") == 0)
            return do_raw();
    }
    return USAGE;
}

/* Runs argv element `arg` as operation number `index` and prints its line. */
static void run_one(int index, const char *arg) {
    out_reset();
    int split_ok = split(arg) == 0;
    printf("%d ", index);
    if (nfields > 0) {
        print_escaped(fields[0], field_len[0]);
    } else {
        /* Field 0 itself did not decode: show it as given. */
        const char *end = strchr(arg, ' ');
        print_escaped(arg, end ? (size_t)(end - arg) : strlen(arg));
    }

    int result = split_ok ? run_op() : USAGE;
    if (result == USAGE)
        fputs(" err usage\n", stdout);
    else if (result != 0)
        printf(" err %d\n", result);
    else if (out_len == 0)
        fputs(" ok\n", stdout);
    else
        printf(" ok %.*s\n", (int)out_len, out);
    /* A line at a time, so a host that kills us still sees what ran. */
    fflush(stdout);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        run_one(i, argv[i]);
    fflush(stdout);
    return 0;
}
