/*
 * memlock_shim: an LD_PRELOAD shim for this sandbox only (made by `fleetdns lab up`, never by the product).
 *
 * Purpose: stap's bpf runtime raises RLIMIT_MEMLOCK before loading its programs and gives up when that fails;
 *          this sandbox refuses the raise, although the kernel (6.x, memcg-accounted BPF memory) does not need it.
 * Hooks:   setrlimit / setrlimit64 — a failed raise of RLIMIT_MEMLOCK reports success; everything else passes
 *          through unchanged.
 * Caveats: only for the lab's hosts; real RHEL/Arch/Debian hosts never get it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const struct rlimit *);

static int call(const char *symbol, __rlimit_resource_t resource, const struct rlimit *rlim)
{
    setrlimit_fn real = (setrlimit_fn)dlsym(RTLD_NEXT, symbol);
    int rc = real ? real(resource, rlim) : -1;
    if (rc != 0 && resource == RLIMIT_MEMLOCK)
        return 0;
    return rc;
}

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    return call("setrlimit", resource, rlim);
}

int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *rlim)
{
    return call("setrlimit64", resource, (const struct rlimit *)rlim);
}
