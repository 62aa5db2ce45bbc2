/* Redis as a source of the native fault thread: one blocking hiredis connection per Redis store and
 * VM, used by that VM's fault thread only (hiredis contexts are not thread-safe; no lock needed).
 *
 * The contract with faults.c is the fallback rule: any failure (no connection, AUTH refused, a
 * timeout, an error reply, a missing key, a payload of the wrong size) returns -1 and the fault goes
 * to Python, which retries with backoff and never installs zeros. After a connection failure the
 * source stays down for RETRY_NS, so an outage costs each fault one check, not one connect timeout.
 * Plain TCP or a unix socket, with AUTH [user] password and SELECT; TLS (rediss://) stays on the
 * Python path. The password lives in this struct only: it is never logged or returned.
 */
#define _GNU_SOURCE
#include "native.h"

#ifdef TM_HAVE_HIREDIS
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RETRY_NS 500000000LL

struct tm_redis {
    char *host, *unix_path, *user, *pass, *prefix;
    int port, db;
    struct timeval timeout, connect_timeout;
    redisContext *c;
    int64_t down_until;
    uint64_t connects, errors;
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static char *dup_or_null(const char *s) { return s && *s ? strdup(s) : NULL; }

static struct timeval tv_of_ms(int ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    return tv;
}

tm_redis *tm_redis_new(const char *host, int port, const char *unix_path, const char *user, const char *pass,
                       int db, const char *prefix, int timeout_ms, int connect_timeout_ms)
{
    tm_redis *r = calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->host = dup_or_null(host);
    r->unix_path = dup_or_null(unix_path);
    r->user = dup_or_null(user);
    r->pass = pass ? strdup(pass) : NULL; /* an empty password is still a password */
    r->prefix = strdup(prefix);
    r->port = port;
    r->db = db;
    r->timeout = tv_of_ms(timeout_ms);
    r->connect_timeout = tv_of_ms(connect_timeout_ms);
    if (r->prefix == NULL || (r->host == NULL && r->unix_path == NULL)) {
        tm_redis_free(r);
        return NULL;
    }
    return r;
}

static void drop(tm_redis *r)
{
    if (r->c != NULL)
        redisFree(r->c);
    r->c = NULL;
    r->errors++;
    r->down_until = mono_ns() + RETRY_NS;
}

/* 1 if the reply is the status "OK"; frees it */
static int ok_reply(redisReply *rep)
{
    int ok = rep != NULL && rep->type == REDIS_REPLY_STATUS && rep->len == 2 && !memcmp(rep->str, "OK", 2);
    if (rep != NULL)
        freeReplyObject(rep);
    return ok;
}

static int connect_once(tm_redis *r)
{
    if (mono_ns() < r->down_until)
        return -1;
    r->c = r->unix_path ? redisConnectUnixWithTimeout(r->unix_path, r->connect_timeout)
                        : redisConnectWithTimeout(r->host, r->port, r->connect_timeout);
    if (r->c == NULL || r->c->err || redisSetTimeout(r->c, r->timeout) != REDIS_OK) {
        drop(r);
        return -1;
    }
    if (!r->unix_path)
        redisEnableKeepAlive(r->c); /* hiredis sets TCP_NODELAY itself */
    r->connects++;
    if (r->pass != NULL) {
        redisReply *rep = r->user ? redisCommand(r->c, "AUTH %s %s", r->user, r->pass)
                                  : redisCommand(r->c, "AUTH %s", r->pass);
        if (!ok_reply(rep)) {
            drop(r);
            return -1;
        }
    }
    if (r->db != 0 && !ok_reply(redisCommand(r->c, "SELECT %d", r->db))) {
        drop(r);
        return -1;
    }
    return 0;
}

long tm_redis_get(tm_redis *r, uint64_t page, uint64_t gen, char *buf, size_t cap)
{
    if (r->c == NULL && connect_once(r) < 0)
        return -1;
    char key[1024];
    int n = snprintf(key, sizeof key, "%s%llu:%llu", r->prefix, (unsigned long long)page,
                     (unsigned long long)gen);
    if (n <= 0 || (size_t)n >= sizeof key)
        return -1;
    redisReply *rep = redisCommand(r->c, "GET %b", key, (size_t)n);
    if (rep == NULL) { /* I/O error or timeout: the context is unusable */
        drop(r);
        return -1;
    }
    long got = -1;
    if (rep->type == REDIS_REPLY_STRING && rep->len > 0 && (size_t)rep->len <= cap) {
        memcpy(buf, rep->str, (size_t)rep->len);
        got = (long)rep->len;
    } else if (rep->type == REDIS_REPLY_ERROR)
        r->errors++; /* e.g. NOPERM, LOADING: the connection is still usable, Python reports why */
    freeReplyObject(rep);
    return got;
}

void tm_redis_free(tm_redis *r)
{
    if (r == NULL)
        return;
    if (r->c != NULL)
        redisFree(r->c);
    if (r->pass != NULL)
        memset(r->pass, 0, strlen(r->pass));
    free(r->host);
    free(r->unix_path);
    free(r->user);
    free(r->pass);
    free(r->prefix);
    free(r);
}

void tm_redis_counts(tm_redis *r, uint64_t *connects, uint64_t *errors)
{
    *connects = r->connects;
    *errors = r->errors;
}

#else /* built without hiredis: no Redis source, every Redis fault stays with Python */

tm_redis *tm_redis_new(const char *host, int port, const char *unix_path, const char *user, const char *pass,
                       int db, const char *prefix, int timeout_ms, int connect_timeout_ms)
{
    return NULL;
}
long tm_redis_get(tm_redis *r, uint64_t page, uint64_t gen, char *buf, size_t cap) { return -1; }
void tm_redis_free(tm_redis *r) {}
void tm_redis_counts(tm_redis *r, uint64_t *connects, uint64_t *errors) { *connects = *errors = 0; }

#endif

int tm_redis_available(void)
{
#ifdef TM_HAVE_HIREDIS
    return 1;
#else
    return 0;
#endif
}
