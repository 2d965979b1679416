/*
 * membomb: allocates 1 MiB blocks with malloc forever, touching every byte.
 *   stdout: "allocated N MiB\n" every 16 MiB (N = 16, 32, ...), flushed.
 *   stderr: "malloc failed after N MiB\n" once malloc returns NULL, then
 *           abort() (a wasm `unreachable` trap under WASI).
 * Never exits normally.
 *
 * The blocks are chained into a list reachable from a volatile global so the
 * compiler cannot drop the malloc/memset pairs as dead allocations.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK ((size_t)1 << 20)

struct block {
    struct block *next;
};

struct block *volatile head;

int main(void) {
    size_t mib = 0;
    for (;;) {
        struct block *b = malloc(BLOCK);
        if (b == NULL) {
            fflush(stdout);
            fprintf(stderr, "malloc failed after %zu MiB\n", mib);
            abort();
        }
        memset(b, (int)(mib & 0x7f) | 1, BLOCK); /* touch every page */
        b->next = head;
        head = b;
        mib++;
        if (mib % 16 == 0) {
            printf("allocated %zu MiB\n", mib);
            fflush(stdout);
        }
    }
}
