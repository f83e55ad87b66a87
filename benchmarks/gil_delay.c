/* Timing hook for benchmarks/stress_shutdown.py --timing-hook (an LD_PRELOAD library).
 *
 * Once armed (gil_delay_arm(), called from Python through ctypes), gloo's
 * worker threads (named "pt_gloo_runloop") are slowed down:
 *   - each mutex lock by GIL_DELAY_LOCK_MS, so that a worker retires a
 *     collective after its caller has already moved on;
 *   - each GIL acquisition by GIL_DELAY_MS, so that the interpreter can start
 *     finalizing before the worker gets the GIL.
 * A busy machine does the same by descheduling the thread at the wrong moment;
 * this makes it happen every time.  Build: cc -O2 -shared -fPIC -o gil_delay.so gil_delay.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile int armed = 0;

void gil_delay_arm(void) { armed = 1; }

static int in_gloo_worker(void) {
  char name[16] = {0};
  pthread_getname_np(pthread_self(), name, sizeof name);
  return strncmp(name, "pt_gloo", 7) == 0;
}

static void delay(const char *setting, int announce) {
  const char *ms = getenv(setting);
  if (!armed || !ms || !in_gloo_worker()) return;
  if (announce) fprintf(stderr, "[gil_delay] pid %d: a gloo worker waits %s ms before taking the GIL\n", getpid(), ms);
  usleep(atoi(ms) * 1000);
}

void PyEval_AcquireThread(void *tstate) {
  static void (*real)(void *);
  if (!real) real = (void (*)(void *))dlsym(RTLD_NEXT, "PyEval_AcquireThread");
  delay("GIL_DELAY_MS", 1);
  real(tstate);
}

int PyGILState_Ensure(void) {
  static int (*real)(void);
  if (!real) real = (int (*)(void))dlsym(RTLD_NEXT, "PyGILState_Ensure");
  delay("GIL_DELAY_MS", 1);
  return real();
}

int pthread_mutex_lock(pthread_mutex_t *mutex) {
  static int (*real)(pthread_mutex_t *);
  if (!real) real = (int (*)(pthread_mutex_t *))dlsym(RTLD_NEXT, "pthread_mutex_lock");
  delay("GIL_DELAY_LOCK_MS", 0);
  return real(mutex);
}
