/*
 * exit CODE: exits with atoi(CODE) and prints nothing.
 * Without an argument: usage on stderr, exit 2.
 *
 * Note: WASI proc_exit only carries codes 0..125 cleanly; wasmtime rejects
 * larger values (and negative ones) with an error instead of an exit code.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs("usage: exit CODE\n", stderr);
        return 2;
    }
    exit(atoi(argv[1]));
}
