/* tiermem._native: the GIL-free parts of tiermem (see docs/architecture.md, "The native fault path"). */
#ifndef TIERMEM_NATIVE_H
#define TIERMEM_NATIVE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

Py_ssize_t tm_count_edges(const uint8_t *s, Py_ssize_t n, uint8_t mask, int val);
Py_ssize_t tm_match_regions(const uint8_t *s, Py_ssize_t n, uint8_t mask, int val, int match, uint64_t key,
                            uint64_t base, int shift, uint64_t *o, Py_ssize_t cap);
Py_ssize_t tm_edges(const uint8_t *s, Py_ssize_t n, uint8_t mask, int val, int64_t *out);

/* Redis as a source of the fault thread (csrc/redis_src.c); a stub without hiredis. */
typedef struct tm_redis tm_redis;
tm_redis *tm_redis_new(const char *host, int port, const char *unix_path, const char *user, const char *pass,
                       int db, const char *prefix, int timeout_ms, int connect_timeout_ms);
long tm_redis_get(tm_redis *r, uint64_t page, uint64_t gen, char *buf, size_t cap);
void tm_redis_free(tm_redis *r);
void tm_redis_counts(tm_redis *r, uint64_t *connects, uint64_t *errors);
int tm_redis_available(void);

extern PyTypeObject TmFaultPathType;
int tm_faults_init(PyObject *module);

#endif
