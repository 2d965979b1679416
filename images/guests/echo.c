/*
 * echo: prints every argument and every environment variable.
 *
 *   arg[0]=PROGRAM
 *   arg[1]=...
 *   env:NAME=VALUE      (one line per environ entry, in environ order)
 *
 * Exit 0.
 */
#include <stdio.h>

extern char **environ;

int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        printf("arg[%d]=%s\n", i, argv[i]);
    if (environ != NULL)
        for (char **e = environ; *e != NULL; e++)
            printf("env:%s\n", *e);
    return 0;
}
