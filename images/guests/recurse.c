/*
 * recurse: unbounded, non-tail recursion; never returns normally.  Expected
 * to end in a wasm stack-overflow trap.  Prints nothing.
 *
 * The frame lives entirely in wasm locals (no address-taken or volatile
 * locals), so the recursion exhausts the engine's native wasm stack rather
 * than wasi-libc's small shadow stack in linear memory (which would end in an
 * out-of-bounds trap or silent data corruption instead of a stack overflow).
 * The volatile global load/store around the call stops the compiler from
 * eliminating the recursion or turning it into a loop.
 */
volatile unsigned recurse_sink;
volatile unsigned recurse_stop; /* stays 0: the base case is never taken */

__attribute__((noinline)) static unsigned recurse(unsigned n) {
    if (recurse_stop != 0 && n >= recurse_stop)
        return n;
    unsigned r = recurse(n + 1);
    recurse_sink = r;
    return r ^ (n * 2654435761u);
}

int main(void) {
    recurse_sink = recurse(0);
    return 0;
}
