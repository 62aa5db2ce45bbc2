/* The tiermem._native module: scan run detection and the native fault path (faults.c). */
#include "native.h"
#include <string.h>

static PyObject *py_edges(PyObject *self, PyObject *args)
{
    Py_buffer src, out;
    unsigned char mask = 0xff;
    int val = -1;
    if (!PyArg_ParseTuple(args, "y*w*|bi", &src, &out, &mask, &val))
        return NULL;
    Py_ssize_t k = -1;
    if ((size_t)out.len < (size_t)(src.len + 64) * sizeof(int64_t))
        PyErr_SetString(PyExc_ValueError, "edges: the output buffer needs len(src) + 64 int64 slots");
    else {
        Py_BEGIN_ALLOW_THREADS
        k = tm_edges((const uint8_t *)src.buf, src.len, mask, val, (int64_t *)out.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return k < 0 ? NULL : PyLong_FromSsize_t(k);
}


static int get_i64(PyObject *obj, Py_buffer *v, const char *what)
{
    if (PyObject_GetBuffer(obj, v, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return -1;
    if (v->ndim != 1 || v->itemsize != 8 || v->format == NULL || (strcmp(v->format, "l") && strcmp(v->format, "q"))) {
        PyErr_Format(PyExc_ValueError, "regions: %s must be a 1-d int64 array", what);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}


static PyObject *py_regions(PyObject *self, PyObject *args)
{
    PyObject *so, *eo, *ko;
    unsigned long long base, ps;
    Py_buffer st, en, ky, out;
    if (!PyArg_ParseTuple(args, "OOOKKw*", &so, &eo, &ko, &base, &ps, &out))
        return NULL;
    PyObject *ret = NULL;
    if (get_i64(so, &st, "starts") < 0)
        goto o;
    if (get_i64(eo, &en, "ends") < 0)
        goto s;
    if (get_i64(ko, &ky, "keys") < 0)
        goto e;
    Py_ssize_t n = st.shape[0];
    if (en.shape[0] != n || ky.shape[0] != n || (size_t)out.len < (size_t)n * 24) {
        PyErr_SetString(PyExc_ValueError, "regions: arrays of different lengths or a short output buffer");
        goto k;
    }
    uint64_t *o = (uint64_t *)out.buf;
    const char *sp = st.buf, *ep = en.buf, *kp = ky.buf;
    Py_ssize_t ss = st.strides[0], es = en.strides[0], ks = ky.strides[0];
    int shift = __builtin_ctzll(ps);
    Py_BEGIN_ALLOW_THREADS
    if (ps && !(ps & (ps - 1))) { /* a page size is a power of two: shift, no multiply */
        for (Py_ssize_t i = 0; i < n; i++, sp += ss, ep += es, kp += ks, o += 3) {
            o[0] = ((uint64_t)*(const int64_t *)sp << shift) + base;
            o[1] = ((uint64_t)*(const int64_t *)ep << shift) + base;
            o[2] = (uint64_t)*(const int64_t *)kp;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++, sp += ss, ep += es, kp += ks, o += 3) {
            o[0] = (uint64_t)*(const int64_t *)sp * ps + base;
            o[1] = (uint64_t)*(const int64_t *)ep * ps + base;
            o[2] = (uint64_t)*(const int64_t *)kp;
        }
    }
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
k:
    PyBuffer_Release(&ky);
e:
    PyBuffer_Release(&en);
s:
    PyBuffer_Release(&st);
o:
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_count_edges(PyObject *self, PyObject *args)
{
    Py_buffer src;
    unsigned char mask = 0xff;
    int val = -1;
    if (!PyArg_ParseTuple(args, "y*|bi", &src, &mask, &val))
        return NULL;
    Py_ssize_t k;
    Py_BEGIN_ALLOW_THREADS
    k = tm_count_edges((const uint8_t *)src.buf, src.len, mask, val);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    return PyLong_FromSsize_t(k);
}

static PyObject *py_match_regions(PyObject *self, PyObject *args)
{
    Py_buffer src, out;
    unsigned char mask;
    int val, match;
    unsigned long long key, base, ps;
    if (!PyArg_ParseTuple(args, "y*biiKKKw*", &src, &mask, &val, &match, &key, &base, &ps, &out))
        return NULL;
    Py_ssize_t r = -1;
    if (!ps || (ps & (ps - 1)))
        PyErr_SetString(PyExc_ValueError, "match_regions: the page size must be a power of two");
    else {
        Py_BEGIN_ALLOW_THREADS
        r = tm_match_regions((const uint8_t *)src.buf, src.len, mask, val, match, key, base, __builtin_ctzll(ps),
                             (uint64_t *)out.buf, out.len / 24);
        Py_END_ALLOW_THREADS
        if (r < 0)
            PyErr_SetString(PyExc_ValueError, "match_regions: the output buffer is too small");
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return r < 0 ? NULL : PyLong_FromSsize_t(r);
}

static PyMethodDef methods[] = {
    {"edges", py_edges, METH_VARARGS,
     "edges(src: uint8 buffer, out: writable int64 buffer of len(src)+64, mask=0xff, val=-1) -> count: "
     "indices i >= 1 where the class of src[i] differs from src[i-1]'s, ascending, in out[:count]; the "
     "class is src & mask, or (src & mask) == val when val >= 0."},
    {"regions", py_regions, METH_VARARGS,
     "regions(starts, ends, keys: int64 arrays, base, page_size, out: writable buffer of 24*n bytes): "
     "page runs as PAGE_REGION triples (start*page_size+base, end*page_size+base, key)."},
    {"count_edges", py_count_edges, METH_VARARGS,
     "count_edges(src: uint8 buffer, mask=0xff, val=-1) -> how many edges edges() would write."},
    {"match_regions", py_match_regions, METH_VARARGS,
     "match_regions(src, mask, val, match, key, base, page_size, out) -> regions: the runs of class match "
     "as (start*page_size+base, end*page_size+base, key) u64 triples in out, which needs room for "
     "count_edges(src, mask, val) // 2 + 1 regions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "tiermem._native", "GIL-free parts of tiermem: scan run detection, the fault path.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    if (tm_faults_init(m) < 0 || PyModule_AddIntConstant(m, "HAVE_REDIS", tm_redis_available()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
