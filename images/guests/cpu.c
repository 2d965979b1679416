/*
 * cpu [N]: deterministic CPU-bound benchmark kernel.  Runs N rounds
 * (default 10), then prints "checksum: <16 hex digits>\n" and exits 0.
 * Bad N (not a positive decimal integer): usage on stderr, exit 2.
 *
 * Each round mixes three kernels, each seeded from the running checksum so
 * nothing can be hoisted out of the round loop or precomputed:
 *   1. integer hashing: xorshift64 stream folded through FNV-1a 64
 *   2. matrix multiply: MAT_N x MAT_N uint32 matrices, wrapping arithmetic
 *   3. sieve of Eratosthenes up to ~SIEVE_N, counting and summing primes
 * Every result feeds the checksum.  No I/O happens until the final printf.
 *
 * Only fixed-width unsigned arithmetic is used (no UB, no floating point), so
 * the native build and the wasm32-wasi build print the same checksum.
 *
 * CPU_WORK scales the work done per round (hash length and the number of
 * matrix / sieve repetitions); override with -DCPU_WORK=n.  The default
 * (10) takes roughly 70 ms per round natively at -O2 on a modern x86-64 core
 * (each kernel about a third).  Changing CPU_WORK changes the checksum.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef CPU_WORK
#define CPU_WORK 10
#endif

#define HASH_ITERS (CPU_WORK * (UINT32_C(1) << 20))
#define MAT_N 64
#define MAT_REPS (CPU_WORK * 24)
#define SIEVE_N (UINT32_C(1) << 18)
#define SIEVE_REPS (CPU_WORK * 4)

#define FNV_OFFSET UINT64_C(0xcbf29ce484222325)
#define FNV_PRIME UINT64_C(0x00000100000001b3)

static uint32_t mat_a[MAT_N][MAT_N];
static uint32_t mat_b[MAT_N][MAT_N];
static uint32_t mat_c[MAT_N][MAT_N];
static uint8_t composite[SIEVE_N];

static uint64_t xorshift64(uint64_t *state) {
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

static uint64_t mix64(uint64_t h, uint64_t v) {
    h ^= v + UINT64_C(0x9e3779b97f4a7c15) + (h << 6) + (h >> 2);
    return h;
}

static uint64_t kernel_hash(uint64_t seed) {
    uint64_t x = seed | 1; /* xorshift state must be non-zero */
    uint64_t h = FNV_OFFSET;
    for (uint32_t i = 0; i < HASH_ITERS; i++) {
        uint64_t r = xorshift64(&x);
        h = (h ^ (r & 0xff)) * FNV_PRIME;
        h = (h ^ ((r >> 32) & 0xff)) * FNV_PRIME;
    }
    return h;
}

static uint64_t kernel_matmul(uint64_t seed) {
    uint64_t x = seed | 1;
    for (uint32_t i = 0; i < MAT_N; i++)
        for (uint32_t j = 0; j < MAT_N; j++) {
            uint64_t r = xorshift64(&x);
            mat_a[i][j] = (uint32_t)r;
            mat_b[i][j] = (uint32_t)(r >> 32);
        }
    uint64_t h = 0;
    for (uint32_t rep = 0; rep < MAT_REPS; rep++) {
        for (uint32_t i = 0; i < MAT_N; i++) {
            for (uint32_t j = 0; j < MAT_N; j++)
                mat_c[i][j] = 0;
            for (uint32_t k = 0; k < MAT_N; k++) {
                uint32_t a = mat_a[i][k];
                for (uint32_t j = 0; j < MAT_N; j++)
                    mat_c[i][j] += a * mat_b[k][j];
            }
        }
        /* Fold C into the hash and feed it back into A so repetitions chain. */
        for (uint32_t i = 0; i < MAT_N; i++)
            for (uint32_t j = 0; j < MAT_N; j++) {
                h = mix64(h, mat_c[i][j]);
                mat_a[i][j] ^= mat_c[j][i] >> 3;
            }
    }
    return h;
}

static uint64_t kernel_sieve(uint64_t seed) {
    uint64_t h = 0;
    for (uint32_t rep = 0; rep < SIEVE_REPS; rep++) {
        /* limit in [SIEVE_N - 4096, SIEVE_N), chosen by the seed */
        uint32_t limit = SIEVE_N - 1 - (uint32_t)((seed >> (rep % 32)) & 4095);
        memset(composite, 0, limit + 1);
        uint32_t count = 0;
        uint64_t sum = 0;
        for (uint32_t p = 2; p <= limit; p++) {
            if (composite[p])
                continue;
            count++;
            sum += p;
            if ((uint64_t)p * p <= limit)
                for (uint32_t m = p * p; m <= limit; m += p)
                    composite[m] = 1;
        }
        h = mix64(h, ((uint64_t)count << 32) ^ sum ^ limit);
    }
    return h;
}

int main(int argc, char **argv) {
    unsigned long rounds = 10;
    if (argc > 1) {
        char *end = NULL;
        rounds = strtoul(argv[1], &end, 10);
        if (argv[1][0] < '0' || argv[1][0] > '9' || *end != '\0' || rounds == 0) {
            fputs("usage: cpu [N]   (N >= 1 rounds, default 10)\n", stderr);
            return 2;
        }
    }
    uint64_t sum = UINT64_C(0x243f6a8885a308d3);
    for (unsigned long round = 0; round < rounds; round++) {
        sum = mix64(sum, round);
        sum = mix64(sum, kernel_hash(sum));
        sum = mix64(sum, kernel_matmul(sum));
        sum = mix64(sum, kernel_sieve(sum));
    }
    printf("checksum: %016" PRIx64 "\n", sum);
    return 0;
}
