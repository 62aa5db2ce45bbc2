/* The native fault path: one thread per VM that serves MISSING faults on evicted pages of a local
 * page store from uffd message to wake without the GIL, and hands everything else to Python.
 *
 * Division of work (docs/architecture.md, "The native fault path"):
 * - Python owns every decision that is not the common case. This thread serves a message only when
 *   it is a plain MISSING fault (no WP/MINOR/RWP flag), no earlier message is still with Python
 *   (kernel order), the page has an entry in the mirror, its payload reads back whole (a pread from
 *   a local segment file, or a GET from Redis: csrc/redis_src.c), decodes to a
 *   page whose keyed MAC (tiermem/store/pagemac.py) is the entry's tag, and UFFDIO_COPY succeeds or
 *   finds the page present.
 *   Anything else (events, tracking faults, zero fills, pages of other stores, a missing or bad
 *   payload, an outage, EAGAIN, a VMM that went away) goes to Python unchanged, in order: the
 *   thread stops reading until Python acknowledged every message it handed over.
 * - The mirror: page -> (generation, codec, checksum, segment file, offset, length), written by
 *   Python's PageIndex after its durable commit (so durable before punch still holds) and read here.
 *   After an install the entry is dropped only if it still holds the generation installed; the
 *   (page, generation) is queued for Python, which drops its own entry with the same check and
 *   queues the durable SQLite removal (removal after install; it may lag).
 * - Never zeros for an evicted page: this thread installs only verified payloads (ZERO-codec
 *   entries are pages that were all zeroes when evicted, as in the Python path).
 */
#define _GNU_SOURCE
#include "native.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lz4.h>
#include <sodium.h>
#include <zstd.h>

#define CODEC_RAW 0
#define CODEC_ZSTD 1
#define CODEC_LZ4 2
#define CODEC_ZERO 3
#define MAX_SEGS 65535
#define MAX_DIRS 16
#define MSG_BATCH 16
#define MAX_KEYS 8
#define KEY_BYTES 32
static const char MAC_DOMAIN[16] = "tiermem-page-v1"; /* 15 characters and the NUL: 16 bytes */

typedef struct {
    uint64_t gen, csum, off;
    uint32_t len;
    uint16_t seg;
    uint8_t codec, valid;
} ent_t;

typedef struct {
    char name[54];
    uint8_t dir;
    int fd; /* used by the fault thread only */
} seg_t;

typedef struct {
    uint64_t page, gen;
    int64_t ns;
    int copied;
} rec_t;

enum { F_NO_ENTRY, F_NOT_MISSING, F_OPEN, F_READ, F_DECODE, F_VERIFY, F_COPY, F_HANDED_ORDER, F_STORE, F_COUNT };
static const char *const fallback_names[F_COUNT] = {
    "no_entry", "not_missing", "open", "read", "decode", "verify", "copy", "order", "store",
};

typedef struct {
    PyObject_HEAD int uffd, stopfd, notifyfd;
    uint64_t base, ps, n;
    ent_t *ents;
    seg_t *segs;
    int nsegs, last_seg;
    char *dirs[MAX_DIRS]; /* a segment directory, or NULL where redis[i] is the source */
    tm_redis *redis[MAX_DIRS];
    int ndirs;
    pthread_mutex_t idx_mu; /* ents, segs (names), rq */
    pthread_mutex_t read_mu; /* uffd reads, serving, hq, handed */
    pthread_cond_t resume;
    uint8_t (*hq)[32];
    size_t hq_len, hq_cap;
    long handed;
    rec_t *rq;
    size_t rq_len, rq_cap;
    pthread_t thr;
    pthread_mutex_t life_mu; /* start/stop/join: stop runs without the GIL, from any number of threads */
    int started, running, stopping, enabled, stopped;
    uint8_t keys[MAX_KEYS][KEY_BYTES]; /* the page MAC keys, current first; set once before start */
    int nkeys;
    uint8_t mac_head[16 + 1 + 255 + 16]; /* domain + u8(len) + space; page and generation appended */
    size_t mac_head_len;
    char *pbuf, *page;
    ZSTD_DCtx *dctx;
    uint64_t served, present, handed_total, fallbacks[F_COUNT];
} FaultPath;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* --- serving (fault thread, read_mu held) ------------------------------------------------------ */

/* The page MAC of tiermem.store.pagemac: BLAKE2b(domain | u8(len) space | u64le page | u64le generation
 * | raw page, key, 16 bytes), first 8 bytes little-endian. */
static int mac_of(FaultPath *fp, const uint8_t *key, uint64_t page, uint64_t gen, const void *raw, uint64_t *tag)
{
    uint8_t head[sizeof fp->mac_head], out[16];
    size_t n = fp->mac_head_len;
    crypto_generichash_state st;
    memcpy(head, fp->mac_head, n);
    memcpy(head + n, &page, 8); /* x86-64 and aarch64 Linux: little-endian */
    memcpy(head + n + 8, &gen, 8);
    if (crypto_generichash_init(&st, key, KEY_BYTES, sizeof out) != 0 ||
        crypto_generichash_update(&st, head, n + 16) != 0 || crypto_generichash_update(&st, raw, fp->ps) != 0 ||
        crypto_generichash_final(&st, out, sizeof out) != 0)
        return -1;
    memcpy(tag, out, 8);
    return 0;
}

/* Any key of the keyring, current first (as PageKeyring.verify). */
static int mac_ok(FaultPath *fp, uint64_t page, uint64_t gen, const void *raw, uint64_t tag)
{
    for (int k = 0; k < fp->nkeys; k++) {
        uint64_t got;
        if (mac_of(fp, fp->keys[k], page, gen, raw, &got) == 0 && got == tag)
            return 1;
    }
    return 0;
}

static int seg_fd(FaultPath *fp, int seg)
{
    seg_t *s = &fp->segs[seg];
    if (s->fd >= 0) {
        struct stat st;
        /* a deleted (compacted) segment keeps its space while open: drop it, reopen by name */
        if (fstat(s->fd, &st) == 0 && st.st_nlink > 0)
            return s->fd;
        close(s->fd);
        s->fd = -1;
    }
    char path[4096];
    pthread_mutex_lock(&fp->idx_mu);
    int n = fp->dirs[s->dir] ? snprintf(path, sizeof path, "%s/%s", fp->dirs[s->dir], s->name) : -1;
    pthread_mutex_unlock(&fp->idx_mu);
    if (n <= 0 || (size_t)n >= sizeof path)
        return -1;
    s->fd = open(path, O_RDONLY | O_CLOEXEC);
    return s->fd;
}

static void record(FaultPath *fp, uint64_t page, uint64_t gen, int64_t ns, int copied)
{
    if (fp->rq_len == fp->rq_cap) {
        size_t cap = fp->rq_cap ? fp->rq_cap * 2 : 1024;
        rec_t *q = realloc(fp->rq, cap * sizeof *q);
        if (q == NULL)
            return; /* the Python side then keeps a stale entry: harmless (EEXIST on the next install) */
        fp->rq = q;
        fp->rq_cap = cap;
    }
    fp->rq[fp->rq_len++] = (rec_t){page, gen, ns, copied};
}

/* 1: served (installed or already present, woken); 0: hand to Python. */
static int try_serve(FaultPath *fp, const struct uffd_msg *m)
{
    int64_t t0 = now_ns();
    if (m->event != UFFD_EVENT_PAGEFAULT || (m->arg.pagefault.flags & ~(uint64_t)UFFD_PAGEFAULT_FLAG_WRITE)) {
        fp->fallbacks[F_NOT_MISSING]++;
        return 0;
    }
    uint64_t addr = m->arg.pagefault.address & ~(fp->ps - 1);
    if (addr < fp->base || (addr - fp->base) / fp->ps >= fp->n) {
        fp->fallbacks[F_NOT_MISSING]++;
        return 0;
    }
    uint64_t page = (addr - fp->base) / fp->ps;
    pthread_mutex_lock(&fp->idx_mu);
    ent_t e = fp->ents[page];
    tm_redis *rs = e.valid && e.codec != CODEC_ZERO ? fp->redis[fp->segs[e.seg].dir] : NULL;
    pthread_mutex_unlock(&fp->idx_mu);
    if (!e.valid) {
        fp->fallbacks[F_NO_ENTRY]++;
        return 0;
    }
    const char *src = fp->page;
    if (e.codec == CODEC_ZERO) {
        if (e.len) {
            fp->fallbacks[F_DECODE]++;
            return 0;
        }
        memset(fp->page, 0, fp->ps);
        /* zero pages carry a tag too: verified below like any page */
    } else {
        if (rs != NULL) {
            /* an outage, a missing key or a payload of another length: Python retries and reports */
            if (e.len == 0 || tm_redis_get(rs, page, e.gen, fp->pbuf, fp->ps) != (long)e.len) {
                fp->fallbacks[F_STORE]++;
                return 0;
            }
        } else {
            int fd = seg_fd(fp, e.seg);
            if (fd < 0) {
                fp->fallbacks[F_OPEN]++;
                return 0;
            }
            if (e.len == 0 || e.len > fp->ps || pread(fd, fp->pbuf, e.len, (off_t)e.off) != (ssize_t)e.len) {
                fp->fallbacks[F_READ]++;
                return 0;
            }
        }
        size_t got;
        if (e.codec == CODEC_RAW) {
            got = e.len;
            src = fp->pbuf;
        } else if (e.codec == CODEC_ZSTD) {
            got = ZSTD_decompressDCtx(fp->dctx, fp->page, fp->ps, fp->pbuf, e.len);
            if (ZSTD_isError(got))
                got = 0;
        } else if (e.codec == CODEC_LZ4) {
            int r = LZ4_decompress_safe(fp->pbuf, fp->page, (int)e.len, (int)fp->ps);
            got = r < 0 ? 0 : (size_t)r;
        } else
            got = 0;
        if (got != fp->ps) {
            fp->fallbacks[F_DECODE]++;
            return 0;
        }
    }
    /* verify before install: a bad or forged payload goes to Python, which reports it and never
     * installs it */
    if (!mac_ok(fp, page, e.gen, src, e.csum)) {
        fp->fallbacks[F_VERIFY]++;
        return 0;
    }
    struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)src, .len = fp->ps,
                            .mode = UFFDIO_COPY_MODE_DONTWAKE};
    int copied = 1;
    if (ioctl(fp->uffd, UFFDIO_COPY, &c) < 0) {
        if (errno != EEXIST) { /* EAGAIN (an unread event), ENOENT/ESRCH (VMM gone): Python decides */
            fp->fallbacks[F_COPY]++;
            return 0;
        }
        copied = 0; /* present already: a racing install, or a page being evicted right now */
    }
    pthread_mutex_lock(&fp->idx_mu);
    if (copied && fp->ents[page].valid && fp->ents[page].gen == e.gen)
        fp->ents[page].valid = 0; /* only the generation installed */
    record(fp, page, e.gen, now_ns() - t0, copied);
    pthread_mutex_unlock(&fp->idx_mu);
    /* wake last: the guest never runs on the page while the mirror still lists it as evicted */
    struct uffdio_range w = {.start = addr, .len = fp->ps};
    ioctl(fp->uffd, UFFDIO_WAKE, &w);
    if (copied)
        fp->served++;
    else
        fp->present++;
    return 1;
}

static int hand(FaultPath *fp, const void *msg)
{
    if (fp->hq_len == fp->hq_cap) {
        size_t cap = fp->hq_cap ? fp->hq_cap * 2 : 64;
        void *q = realloc(fp->hq, cap * 32);
        if (q == NULL)
            return -1;
        fp->hq = q;
        fp->hq_cap = cap;
    }
    memcpy(fp->hq[fp->hq_len++], msg, 32);
    fp->handed++;
    fp->handed_total++;
    return 0;
}

static void notify(FaultPath *fp)
{
    uint64_t one = 1;
    if (write(fp->notifyfd, &one, sizeof one) < 0) {
        /* the counter saturates only after 2^64-2 writes nobody read: nothing to do */
    }
}

static void *fault_thread(void *arg)
{
    FaultPath *fp = arg;
    struct uffd_msg msgs[MSG_BATCH];
    pthread_mutex_lock(&fp->read_mu);
    while (!fp->stopping) {
        while (fp->handed > 0 && !fp->stopping)
            pthread_cond_wait(&fp->resume, &fp->read_mu);
        if (fp->stopping)
            break;
        pthread_mutex_unlock(&fp->read_mu);
        struct pollfd p[2] = {{.fd = fp->uffd, .events = POLLIN}, {.fd = fp->stopfd, .events = POLLIN}};
        int pr = poll(p, 2, -1);
        pthread_mutex_lock(&fp->read_mu);
        if (fp->stopping)
            break;
        if (pr < 0 && errno != EINTR)
            break;
        if (fp->handed > 0)
            continue; /* Python read messages meanwhile: they go first */
        ssize_t got = read(fp->uffd, msgs, sizeof msgs);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            break; /* the uffd is unusable: Python takes over reading and sees why */
        }
        if (got == 0)
            break;
        int handed = 0;
        for (ssize_t i = 0; i < got / (ssize_t)sizeof msgs[0]; i++) {
            if (!fp->handed && fp->enabled && try_serve(fp, &msgs[i]))
                continue;
            if (fp->handed)
                fp->fallbacks[F_HANDED_ORDER]++;
            if (hand(fp, &msgs[i]) < 0)
                break;
            handed = 1;
        }
        if (handed)
            notify(fp);
    }
    fp->running = 0;
    pthread_mutex_unlock(&fp->read_mu);
    notify(fp);
    return NULL;
}

/* --- the Python type ------------------------------------------------------------------------------ */

static int fp_init(FaultPath *fp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd", "base", "page_size", "n_pages", NULL};
    int uffd;
    unsigned long long base, ps, n;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKKK", kwlist, &uffd, &base, &ps, &n))
        return -1;
    if (fp->ents != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FaultPath is already initialised");
        return -1;
    }
    if (ps < 4096 || (ps & (ps - 1)) || n == 0) {
        PyErr_SetString(PyExc_ValueError, "FaultPath: page_size must be a power of two >= 4096, n_pages > 0");
        return -1;
    }
    fp->uffd = uffd;
    fp->base = base;
    fp->ps = ps;
    fp->n = n;
    fp->stopfd = fp->notifyfd = -1;
    fp->enabled = 1;
    fp->last_seg = -1;
    /* calloc: untouched parts of the mirror cost no memory (pages never evicted) */
    fp->ents = calloc(n, sizeof *fp->ents);
    fp->segs = calloc(MAX_SEGS, sizeof *fp->segs);
    fp->pbuf = aligned_alloc(4096, ps);
    fp->page = aligned_alloc(4096, ps);
    fp->dctx = ZSTD_createDCtx();
    fp->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fp->notifyfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!fp->ents || !fp->segs || !fp->pbuf || !fp->page || !fp->dctx || fp->stopfd < 0 || fp->notifyfd < 0) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&fp->idx_mu, NULL);
    pthread_mutex_init(&fp->read_mu, NULL);
    pthread_cond_init(&fp->resume, NULL);
    return 0;
}

/* Idempotent and safe from any number of threads at once (the backend's close and the session's
 * stop race when a VMM goes away during a detach): exactly one caller joins, the others wait for it
 * (joining a thread twice is undefined: it crashed the agent). Stopped is final: the uffd number may
 * be closed and reused right after, so the thread never reads it again. */
static void stop_thread(FaultPath *fp)
{
    pthread_mutex_lock(&fp->life_mu);
    fp->stopped = 1;
    if (fp->started) {
        pthread_mutex_lock(&fp->read_mu);
        fp->stopping = 1;
        pthread_cond_broadcast(&fp->resume);
        pthread_mutex_unlock(&fp->read_mu);
        uint64_t one = 1;
        if (write(fp->stopfd, &one, sizeof one) < 0) {
            /* cannot fail short of a saturated counter */
        }
        pthread_join(fp->thr, NULL);
        fp->started = 0;
    }
    pthread_mutex_unlock(&fp->life_mu);
}

/* tp_new: the fds closed by dealloc are -1 and life_mu usable even when __init__ never ran or failed */
static PyObject *fp_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    FaultPath *fp = (FaultPath *)PyType_GenericNew(type, args, kw);
    if (fp == NULL)
        return NULL;
    fp->uffd = fp->stopfd = fp->notifyfd = -1;
    pthread_mutex_init(&fp->life_mu, NULL);
    return (PyObject *)fp;
}

static void fp_dealloc(FaultPath *fp)
{
    Py_BEGIN_ALLOW_THREADS
    stop_thread(fp);
    Py_END_ALLOW_THREADS
    if (fp->segs)
        for (int i = 0; i < fp->nsegs; i++)
            if (fp->segs[i].fd >= 0)
                close(fp->segs[i].fd);
    for (int i = 0; i < fp->ndirs; i++) {
        free(fp->dirs[i]);
        tm_redis_free(fp->redis[i]);
    }
    free(fp->ents);
    free(fp->segs);
    free(fp->pbuf);
    free(fp->page);
    free(fp->hq);
    free(fp->rq);
    if (fp->dctx)
        ZSTD_freeDCtx(fp->dctx);
    if (fp->stopfd >= 0)
        close(fp->stopfd);
    if (fp->notifyfd >= 0)
        close(fp->notifyfd);
    pthread_mutex_destroy(&fp->life_mu);
    Py_TYPE(fp)->tp_free((PyObject *)fp);
}

static int ready(FaultPath *fp)
{
    if (fp->ents == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FaultPath is not initialised");
        return 0;
    }
    return 1;
}

static PyObject *fp_start(FaultPath *fp, PyObject *noargs)
{
    if (!ready(fp))
        return NULL;
    pthread_mutex_lock(&fp->life_mu); /* with the GIL: fine, stop holds it without and never waits for it */
    const char *bad = fp->started ? "FaultPath: already started" : fp->stopped ? "FaultPath: stopped for good" : NULL;
    int rc = 0;
    if (bad == NULL) {
        fp->running = 1;
        fp->stopping = 0;
        rc = pthread_create(&fp->thr, NULL, fault_thread, fp);
        if (rc)
            fp->running = 0;
        else
            fp->started = 1;
    }
    pthread_mutex_unlock(&fp->life_mu);
    if (bad != NULL) {
        PyErr_SetString(PyExc_RuntimeError, bad);
        return NULL;
    }
    if (rc) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *fp_stop(FaultPath *fp, PyObject *noargs)
{
    if (!ready(fp))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    stop_thread(fp);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *fp_add_dir(FaultPath *fp, PyObject *args)
{
    const char *path;
    if (!ready(fp) || !PyArg_ParseTuple(args, "s", &path))
        return NULL;
    for (int i = 0; i < fp->ndirs; i++)
        if (fp->dirs[i] != NULL && !strcmp(fp->dirs[i], path))
            return PyLong_FromLong(i);
    if (fp->ndirs == MAX_DIRS) {
        PyErr_SetString(PyExc_ValueError, "FaultPath: too many segment directories");
        return NULL;
    }
    char *copy = strdup(path);
    if (copy == NULL)
        return PyErr_NoMemory();
    pthread_mutex_lock(&fp->idx_mu);
    fp->dirs[fp->ndirs] = copy;
    int id = fp->ndirs++;
    pthread_mutex_unlock(&fp->idx_mu);
    return PyLong_FromLong(id);
}

/* add_redis(prefix, host, port, unix_path, user, password, db, timeout_ms, connect_timeout_ms) -> id of a
 * Redis source: a page's payload is GET <prefix><page>:<generation> (connected on first use) */
static PyObject *fp_add_redis(FaultPath *fp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"prefix", "host", "port", "unix_path", "user", "password", "db", "timeout_ms",
                             "connect_timeout_ms", NULL};
    const char *prefix, *host, *unix_path, *user, *pass;
    int port, db, timeout_ms, connect_ms;
    if (!ready(fp) || !PyArg_ParseTupleAndKeywords(args, kw, "szizzziii", kwlist, &prefix, &host, &port,
                                                   &unix_path, &user, &pass, &db, &timeout_ms, &connect_ms))
        return NULL;
    if (!tm_redis_available()) {
        PyErr_SetString(PyExc_RuntimeError, "add_redis: built without hiredis");
        return NULL;
    }
    if (fp->ndirs == MAX_DIRS || timeout_ms < 1 || connect_ms < 1 || db < 0 || (!host && !unix_path)) {
        PyErr_SetString(PyExc_ValueError, "add_redis: too many sources, or a bad endpoint or timeout");
        return NULL;
    }
    tm_redis *r = tm_redis_new(host, port, unix_path, user, pass, db, prefix, timeout_ms, connect_ms);
    if (r == NULL)
        return PyErr_NoMemory();
    pthread_mutex_lock(&fp->idx_mu);
    fp->dirs[fp->ndirs] = NULL;
    fp->redis[fp->ndirs] = r;
    int id = fp->ndirs++;
    pthread_mutex_unlock(&fp->idx_mu);
    return PyLong_FromLong(id);
}

/* set_mac(space, [keys]): the VM's store namespace and the page MAC keys (current first) */
static PyObject *fp_set_mac(FaultPath *fp, PyObject *args)
{
    const char *space;
    Py_ssize_t slen;
    PyObject *keys;
    if (!ready(fp) || !PyArg_ParseTuple(args, "s#O", &space, &slen, &keys))
        return NULL;
    if (fp->started) {
        PyErr_SetString(PyExc_RuntimeError, "set_mac: the fault thread is running");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(keys, "set_mac: keys must be a sequence of bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nk = PySequence_Fast_GET_SIZE(seq);
    if (slen > 255 || nk < 1 || nk > MAX_KEYS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "set_mac: a space of at most 255 bytes and 1 to 8 keys");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(k) || PyBytes_GET_SIZE(k) != KEY_BYTES) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "set_mac: every key is 32 bytes");
            return NULL;
        }
        memcpy(fp->keys[i], PyBytes_AS_STRING(k), KEY_BYTES);
    }
    Py_DECREF(seq);
    fp->nkeys = (int)nk;
    memcpy(fp->mac_head, MAC_DOMAIN, 16);
    fp->mac_head[16] = (uint8_t)slen;
    memcpy(fp->mac_head + 17, space, (size_t)slen);
    fp->mac_head_len = 17 + (size_t)slen;
    Py_RETURN_NONE;
}

/* mac(page, gen, raw) -> the tag this thread computes (a test hook: it must equal pagemac.page_mac) */
static PyObject *fp_mac(FaultPath *fp, PyObject *args)
{
    unsigned long long page, gen;
    Py_buffer raw;
    if (!ready(fp) || !PyArg_ParseTuple(args, "KKy*", &page, &gen, &raw))
        return NULL;
    if ((uint64_t)raw.len != fp->ps || fp->nkeys == 0) {
        PyBuffer_Release(&raw);
        PyErr_SetString(PyExc_ValueError, "mac: one page of data, after set_mac");
        return NULL;
    }
    uint64_t tag = 0;
    int rc = mac_of(fp, fp->keys[0], page, gen, raw.buf, &tag);
    PyBuffer_Release(&raw);
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "mac: libsodium failed");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(tag);
}

/* idx_mu held */
static int seg_id(FaultPath *fp, int dir, const char *name)
{
    if (fp->last_seg >= 0 && fp->segs[fp->last_seg].dir == dir && !strcmp(fp->segs[fp->last_seg].name, name))
        return fp->last_seg;
    for (int i = fp->nsegs - 1; i >= 0; i--)
        if (fp->segs[i].dir == dir && !strcmp(fp->segs[i].name, name))
            return fp->last_seg = i;
    if (fp->nsegs == MAX_SEGS || strlen(name) >= sizeof fp->segs[0].name)
        return -1;
    seg_t *s = &fp->segs[fp->nsegs];
    strcpy(s->name, name);
    s->dir = (uint8_t)dir;
    s->fd = -1;
    return fp->last_seg = fp->nsegs++;
}

/* put_many([(page, gen, codec, checksum, dir, segment, offset, length), ...]) -> entries mirrored */
static PyObject *fp_put_many(FaultPath *fp, PyObject *arg)
{
    if (!ready(fp))
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "put_many takes a sequence of tuples");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), done = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long page, gen, csum, off;
        unsigned int codec, len;
        int dir;
        const char *seg;
        if (!PyArg_ParseTuple(items[i], "KKIKisKI", &page, &gen, &codec, &csum, &dir, &seg, &off, &len))
            goto fail;
        if (page >= fp->n || codec > CODEC_ZERO || dir >= fp->ndirs || len > fp->ps) {
            PyErr_Format(PyExc_ValueError, "put_many: bad entry for page %llu", page);
            goto fail;
        }
        pthread_mutex_lock(&fp->idx_mu);
        /* dir < 0: the page now lives where this thread cannot serve it: forget any older entry */
        int sid = dir < 0 ? -1 : codec == CODEC_ZERO ? 0 : seg_id(fp, dir, seg);
        if (sid >= 0) {
            fp->ents[page] = (ent_t){gen, csum, off, len, (uint16_t)sid, (uint8_t)codec, 1};
            done++;
        } else
            fp->ents[page].valid = 0; /* cannot mirror it: Python serves this page */
        pthread_mutex_unlock(&fp->idx_mu);
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(done);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* remove(page, gen) -> True if the mirror held that generation and dropped it */
static PyObject *fp_remove(FaultPath *fp, PyObject *args)
{
    unsigned long long page, gen;
    if (!ready(fp) || !PyArg_ParseTuple(args, "KK", &page, &gen))
        return NULL;
    int hit = 0;
    if (page < fp->n) {
        pthread_mutex_lock(&fp->idx_mu);
        if (fp->ents[page].valid && fp->ents[page].gen == gen) {
            fp->ents[page].valid = 0;
            hit = 1;
        }
        pthread_mutex_unlock(&fp->idx_mu);
    }
    return PyBool_FromLong(hit);
}

static PyObject *fp_contains(FaultPath *fp, PyObject *args)
{
    unsigned long long page;
    if (!ready(fp) || !PyArg_ParseTuple(args, "K", &page))
        return NULL;
    if (page >= fp->n)
        Py_RETURN_NONE;
    pthread_mutex_lock(&fp->idx_mu);
    ent_t e = fp->ents[page];
    pthread_mutex_unlock(&fp->idx_mu);
    if (!e.valid)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(e.gen);
}

static PyObject *fp_clear(FaultPath *fp, PyObject *noargs)
{
    if (!ready(fp))
        return NULL;
    pthread_mutex_lock(&fp->idx_mu);
    memset(fp->ents, 0, fp->n * sizeof *fp->ents);
    pthread_mutex_unlock(&fp->idx_mu);
    Py_RETURN_NONE;
}

/* take(read_kernel=False) -> [32-byte messages]: what the thread handed over, then (read_kernel) what
 * is queued in the kernel, in order. Every message returned must be acknowledged with ack(). */
static PyObject *fp_take(FaultPath *fp, PyObject *args)
{
    int read_kernel = 0;
    if (!ready(fp) || !PyArg_ParseTuple(args, "|p", &read_kernel))
        return NULL;
    uint8_t (*q)[32] = NULL;
    size_t len = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&fp->read_mu);
    if (read_kernel || !fp->running) {
        struct uffd_msg msgs[MSG_BATCH];
        for (;;) {
            ssize_t got = read(fp->uffd, msgs, sizeof msgs);
            if (got <= 0) {
                if (got < 0 && errno != EAGAIN)
                    err = errno;
                break;
            }
            for (ssize_t i = 0; i < got / (ssize_t)sizeof msgs[0]; i++)
                if (hand(fp, &msgs[i]) < 0)
                    break;
        }
    }
    q = fp->hq;
    len = fp->hq_len;
    fp->hq = NULL;
    fp->hq_len = fp->hq_cap = 0;
    pthread_mutex_unlock(&fp->read_mu);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New((Py_ssize_t)len);
    for (size_t i = 0; out && i < len; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)q[i], 32);
        if (b == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, b);
    }
    free(q);
    if (out && err && len == 0) {
        Py_DECREF(out);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return out;
}

static PyObject *fp_ack(FaultPath *fp, PyObject *args)
{
    long n = 1;
    if (!ready(fp) || !PyArg_ParseTuple(args, "|l", &n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&fp->read_mu);
    fp->handed -= n;
    if (fp->handed <= 0) {
        fp->handed = 0;
        pthread_cond_signal(&fp->resume);
    }
    pthread_mutex_unlock(&fp->read_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* drain() -> [(page, generation, service ns, copied)] served since the last drain */
static PyObject *fp_drain(FaultPath *fp, PyObject *noargs)
{
    if (!ready(fp))
        return NULL;
    pthread_mutex_lock(&fp->idx_mu);
    rec_t *q = fp->rq;
    size_t len = fp->rq_len;
    fp->rq = NULL;
    fp->rq_len = fp->rq_cap = 0;
    pthread_mutex_unlock(&fp->idx_mu);
    PyObject *out = PyList_New((Py_ssize_t)len);
    for (size_t i = 0; out && i < len; i++) {
        PyObject *t = Py_BuildValue("(KKLO)", (unsigned long long)q[i].page, (unsigned long long)q[i].gen,
                                    (long long)q[i].ns, q[i].copied ? Py_True : Py_False);
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    free(q);
    return out;
}

static PyObject *fp_stats(FaultPath *fp, PyObject *noargs)
{
    if (!ready(fp))
        return NULL;
    PyObject *fb = PyDict_New();
    for (int i = 0; fb && i < F_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(fp->fallbacks[i]);
        if (v == NULL || PyDict_SetItemString(fb, fallback_names[i], v) < 0)
            Py_CLEAR(fb);
        Py_XDECREF(v);
    }
    if (fb == NULL)
        return NULL;
    return Py_BuildValue("{sKsKsKsNsisi}", "served", (unsigned long long)fp->served, "present",
                         (unsigned long long)fp->present, "handed", (unsigned long long)fp->handed_total,
                         "fallbacks", fb, "running", fp->running, "segments", fp->nsegs);
}

static PyObject *fp_get_notify_fd(FaultPath *fp, void *closure) { return PyLong_FromLong(fp->notifyfd); }
static PyObject *fp_get_running(FaultPath *fp, void *closure) { return PyBool_FromLong(fp->running); }
static PyObject *fp_get_enabled(FaultPath *fp, void *closure) { return PyBool_FromLong(fp->enabled); }
static int fp_set_enabled(FaultPath *fp, PyObject *v, void *closure)
{
    int on = v ? PyObject_IsTrue(v) : 0;
    if (on < 0)
        return -1;
    fp->enabled = on; /* read by the fault thread per message: a stale read only delays the switch */
    return 0;
}

static PyMethodDef fp_methods[] = {
    {"start", (PyCFunction)fp_start, METH_NOARGS, "Start the fault thread."},
    {"stop", (PyCFunction)fp_stop, METH_NOARGS, "Stop and join the fault thread (before the uffd is closed)."},
    {"add_dir", (PyCFunction)fp_add_dir, METH_VARARGS, "add_dir(path) -> id of a segment directory."},
    {"add_redis", (PyCFunction)(void (*)(void))fp_add_redis, METH_VARARGS | METH_KEYWORDS,
     "add_redis(prefix, host, port, unix_path, user, password, db, timeout_ms, connect_timeout_ms) -> id of a "
     "Redis source (plain TCP or unix socket; the payload of (page, gen) is GET <prefix><page>:<gen>)."},
    {"set_mac", (PyCFunction)fp_set_mac, METH_VARARGS,
     "set_mac(space, keys): the VM's store namespace and the page MAC keys (32 bytes each, current first); "
     "before start. Without it no page verifies: every fault goes to Python."},
    {"mac", (PyCFunction)fp_mac, METH_VARARGS, "mac(page, generation, raw) -> the tag under the current key."},
    {"put_many", (PyCFunction)fp_put_many, METH_O,
     "put_many([(page, gen, codec, checksum, dir, segment, offset, length)]) -> entries mirrored; dir -1 "
     "drops the page's entry (evicted where the native path does not serve)."},
    {"remove", (PyCFunction)fp_remove, METH_VARARGS, "remove(page, gen) -> True if that generation was dropped."},
    {"generation", (PyCFunction)fp_contains, METH_VARARGS, "generation(page) -> mirrored generation or None."},
    {"clear", (PyCFunction)fp_clear, METH_NOARGS, "Drop every mirrored entry."},
    {"take", (PyCFunction)fp_take, METH_VARARGS,
     "take(read_kernel=False) -> messages handed to Python (32-byte uffd_msg each), in kernel order."},
    {"ack", (PyCFunction)fp_ack, METH_VARARGS, "ack(n=1): Python finished n handed messages."},
    {"drain", (PyCFunction)fp_drain, METH_NOARGS,
     "drain() -> [(page, generation, service ns, copied)] served natively since the last drain."},
    {"stats", (PyCFunction)fp_stats, METH_NOARGS, "Counters of the fault thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef fp_getset[] = {
    {"notify_fd", (getter)fp_get_notify_fd, NULL, "eventfd readable when messages wait for Python", NULL},
    {"running", (getter)fp_get_running, NULL, "the fault thread is reading the uffd", NULL},
    {"enabled", (getter)fp_get_enabled, (setter)fp_set_enabled, "serve natively (else hand everything)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject TmFaultPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tiermem._native.FaultPath",
    .tp_basicsize = sizeof(FaultPath),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FaultPath(uffd, base, page_size, n_pages): the native fault thread of one VM.",
    .tp_new = fp_new,
    .tp_init = (initproc)fp_init,
    .tp_dealloc = (destructor)fp_dealloc,
    .tp_methods = fp_methods,
    .tp_getset = fp_getset,
};

int tm_faults_init(PyObject *module)
{
    if (sodium_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "libsodium failed to initialise");
        return -1;
    }
    if (PyType_Ready(&TmFaultPathType) < 0)
        return -1;
    Py_INCREF(&TmFaultPathType);
    if (PyModule_AddObject(module, "FaultPath", (PyObject *)&TmFaultPathType) < 0) {
        Py_DECREF(&TmFaultPathType);
        return -1;
    }
    return 0;
}
