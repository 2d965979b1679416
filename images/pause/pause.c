/*
 * pause: the process that holds a pod sandbox's namespaces, as Kubernetes' own pause image.
 *
 * It sleeps until a signal arrives, reaps any child that was reparented to it (it may be a
 * PID namespace's init), and exits 0 on SIGINT or SIGTERM. Built statically so that the image
 * needs nothing but this one file:
 *
 *     gcc -static -O2 -o pause pause.c
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig)
{
	(void)sig;
	_exit(0);
}

static void on_child(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0) {
	}
}

static int install(int sig, void (*handler)(int))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sa.sa_flags = SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "-v") == 0) {
		printf("pause (bulwark)\n");
		return 0;
	}
	if (getpid() != 1)
		fprintf(stderr, "pause: warning: not running as PID 1\n");
	if (install(SIGINT, on_stop) < 0 || install(SIGTERM, on_stop) < 0 ||
	    install(SIGCHLD, on_child) < 0) {
		perror("pause: sigaction");
		return 1;
	}
	for (;;)
		pause();
	/* not reached */
	return 42;
}
