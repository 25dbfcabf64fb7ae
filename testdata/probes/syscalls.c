/* Tries system calls a build step should or should not be able to make and prints one
 * `name=OK` or `name=ERRNO` line each. Built statically by tests/security.rs (cc -static)
 * and run in a RUN step, to check the seccomp profile with real calls. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *name_of(int e) {
	switch (e) {
	case EPERM: return "EPERM";
	case ENOSYS: return "ENOSYS";
	case EINVAL: return "EINVAL";
	case EACCES: return "EACCES";
	case EFAULT: return "EFAULT";
	case ENOENT: return "ENOENT";
	default: return strerror(e);
	}
}

static void report(const char *what, long ret) {
	if (ret < 0)
		printf("%s=%s\n", what, name_of(errno));
	else
		printf("%s=OK\n", what);
}

int main(void) {
	/* keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL): a new session keyring. */
	report("keyctl", syscall(SYS_keyctl, 1, 0));
	/* unshare(CLONE_NEWUSER) in a child, so this process stays where it is. */
	pid_t pid = fork();
	if (pid == 0)
		_exit(unshare(CLONE_NEWUSER) == 0 ? 0 : errno);
	int status = 0;
	waitpid(pid, &status, 0);
	int code = WIFEXITED(status) ? WEXITSTATUS(status) : 255;
	printf("unshare-user=%s\n", code == 0 ? "OK" : name_of(code));
	report("mount", mount("none", "/mnt", "tmpfs", 0, NULL));
	/* clone3 with no arguments: EINVAL where it may run, ENOSYS where the filter stops it. */
	report("clone3", syscall(SYS_clone3, NULL, 0));
	report("personality-query", personality(0xffffffff));
	report("personality-addr-no-randomize", personality(ADDR_NO_RANDOMIZE));
	fflush(stdout);
	return 0;
}
