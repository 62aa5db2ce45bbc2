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

extern PyTypeObject TmFaultPathType;
int tm_faults_init(PyObject *module);

#endif
