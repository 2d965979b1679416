/* hello: prints "hello from bulwark\n" and exits 0. */
#include <stdio.h>

int main(void) {
    fputs("hello from bulwark\n", stdout);
    return 0;
}
