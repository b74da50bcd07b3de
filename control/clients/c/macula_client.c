/* macula_client.c - see macula_client.h. MCP/1 is specified in control/SPEC.md. */
#define _POSIX_C_SOURCE 200809L
#include "macula_client.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

enum {
    HELLO = 1, WELCOME = 2, ERROR = 3, PING = 4, PONG = 5, BYE = 6,
    SUBSCRIBE = 10, SUBACK = 11, PUBLISH = 14, PUBACK = 15, EVENT = 16, ACK = 17,
    REGISTER = 20, REGISTERED = 21, CALL = 24, RESULT = 25, INVOKE = 26, YIELD = 27,
    YIELD_ERROR = 28
};

static const char SIGNATURE[4] = {'M', 'C', 'P', 1};

#define MAX_REGS 64
#define MAX_SUBS 256
#define SEEN 1024
#define NOT_WELCOMED 8
#define PEER_GONE 44
#define HEARTBEAT_TIMEOUT 41
#define RECONNECT_MIN_MS 100  /* back-off between attempts: doubling, with jitter ... */
#define RECONNECT_MAX_MS 1000 /* ... up to this */
#define ATTEMPT_MS 3000       /* a HELLO unanswered this long: a fresh connection */

typedef struct {
    uint64_t reg_id;
    mcl_handler_fn fn;
    void *user;
    char *procedure;
} reg_entry;

typedef struct {
    char *filter;
    int qos;
} sub_entry;

struct mcl_client {
    void *ctx;
    void *sock;
    void *mon; /* PAIR socket receiving the DEALER's monitor events (connection closed) */
    unsigned mon_seq;
    char *endpoint, *realm, *name, *secret;
    unsigned want_heartbeat_ms;
    uint64_t next_id;
    uint64_t session_id;
    unsigned heartbeat_ms;
    unsigned liveness;
    int64_t last_send_ms;
    int64_t last_recv_ms;
    int closed;
    int closing;    /* mcl_close said BYE: the node's BYE closes */
    int reconnect;  /* heal after a loss (default) or close */
    int lost;       /* the session is gone; the next poll or request reconnects */
    uint64_t hello_rid;
    int64_t attempt_ms, next_attempt_ms;
    int backoff_ms;
    uint32_t rng; /* jitter of the back-off (per client: not the application's rand()) */
    unsigned reconnects;
    int restore_slot; /* registration being restored (REGISTERED updates it), or -1 */
    mcl_connection_fn on_connection;
    void *connection_user;
    sub_entry subs[MAX_SUBS];
    int nsubs;
    char error[256];
    /* outgoing commands, packed back to back; `count` of them */
    msgpack_sbuffer out;
    msgpack_packer pk;
    unsigned count;
    mcl_event_fn on_event;
    void *event_user;
    reg_entry regs[MAX_REGS];
    int nregs;
    uint64_t seen[SEEN]; /* recent QoS 1 delivery ids (ring) */
    unsigned seen_pos;
    /* the reply a blocking request waits for */
    uint64_t want_id;
    int want_code;
    int got;        /* 1: reply, -code: ERROR */
    uint64_t got_value;
    msgpack_sbuffer *got_result;
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int fail(mcl_client *c, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    return code;
}

const char *mcl_last_error(const mcl_client *c) { return c->error; }
uint64_t mcl_session_id(const mcl_client *c) { return c->session_id; }
int mcl_connected(const mcl_client *c) { return !c->closed && !c->lost; }
unsigned mcl_reconnects(const mcl_client *c) { return c->reconnects; }
void mcl_set_reconnect(mcl_client *c, int on) { c->reconnect = on != 0; }

void mcl_on_connection(mcl_client *c, mcl_connection_fn fn, void *user) {
    c->on_connection = fn;
    c->connection_user = user;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s ? s : "") + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s ? s : "", n);
    return d;
}

/* The session is gone (NOT_WELCOMED, BYE, silence, the connection closed). With reconnect
 * on, what was queued for it is dropped and the next poll or request reconnects; else the
 * client is closed. */
static void lose(mcl_client *c, const char *why) {
    if (c->closed || c->lost)
        return;
    if (!c->reconnect || c->closing) {
        c->closed = 1;
        fail(c, MCL_ECLOSED, "connection lost: %s", why);
    } else {
        c->lost = 1;
        c->hello_rid = 0;
        c->next_attempt_ms = now_ms();
        c->backoff_ms = RECONNECT_MIN_MS;
        msgpack_sbuffer_clear(&c->out);
        c->count = 0;
        fail(c, MCL_ELOST, "connection lost (%s); reconnecting", why);
    }
    if (c->on_connection)
        c->on_connection(c->connection_user, 0, why);
}

void mcl_on_event(mcl_client *c, mcl_event_fn fn, void *user) {
    c->on_event = fn;
    c->event_user = user;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* -- output ------------------------------------------------------------------------------ */
int mcl_flush(mcl_client *c) {
    if (c->count == 0)
        return 0;
    if (c->closed)
        return fail(c, MCL_ECLOSED, "the session is closed");
    msgpack_sbuffer head;
    msgpack_packer hp;
    msgpack_sbuffer_init(&head);
    msgpack_packer_init(&hp, &head, msgpack_sbuffer_write);
    msgpack_pack_array(&hp, c->count);
    zmq_msg_t body;
    zmq_msg_init_size(&body, head.size + c->out.size);
    memcpy(zmq_msg_data(&body), head.data, head.size);
    memcpy((char *)zmq_msg_data(&body) + head.size, c->out.data, c->out.size);
    msgpack_sbuffer_destroy(&head);
    int rc = zmq_send(c->sock, SIGNATURE, 4, ZMQ_SNDMORE);
    if (rc >= 0)
        rc = zmq_msg_send(&body, c->sock, 0);
    if (rc < 0) {
        zmq_msg_close(&body);
        return fail(c, MCL_EIO, "send failed: %s", zmq_strerror(zmq_errno()));
    }
    msgpack_sbuffer_clear(&c->out);
    c->count = 0;
    c->last_send_ms = now_ms();
    return 0;
}

/* -- input ------------------------------------------------------------------------------- */
static uint64_t u64(const msgpack_object *o) {
    return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
}

static int seen_before(mcl_client *c, uint64_t did) {
    for (unsigned i = 0; i < SEEN; i++)
        if (c->seen[i] == did)
            return 1;
    c->seen[c->seen_pos] = did;
    c->seen_pos = (c->seen_pos + 1) % SEEN;
    return 0;
}

static void on_invoke(mcl_client *c, const msgpack_object *f, uint32_t n) {
    uint64_t inv_id = u64(&f[1]), reg_id = u64(&f[2]);
    msgpack_object nil = {.type = MSGPACK_OBJECT_NIL};
    const msgpack_object *args = n > 4 ? &f[4] : &nil;
    for (int i = 0; i < c->nregs; i++) {
        if (c->regs[i].reg_id != reg_id)
            continue;
        msgpack_sbuffer result;
        msgpack_packer rp;
        msgpack_sbuffer_init(&result);
        msgpack_packer_init(&rp, &result, msgpack_sbuffer_write);
        char err[256] = "";
        int rc = c->regs[i].fn(c->regs[i].user, args, &rp, err, sizeof err);
        if (rc == 0 && result.size > 0) {
            msgpack_pack_array(&c->pk, 3);
            msgpack_pack_uint64(&c->pk, YIELD);
            msgpack_pack_uint64(&c->pk, inv_id);
            msgpack_sbuffer_write(&c->out, result.data, result.size); /* one packed value */
        } else {
            msgpack_pack_array(&c->pk, 3);
            msgpack_pack_uint64(&c->pk, YIELD_ERROR);
            msgpack_pack_uint64(&c->pk, inv_id);
            pack_str(&c->pk, err[0] ? err : "handler failed");
        }
        c->count++;
        msgpack_sbuffer_destroy(&result);
        return;
    }
    msgpack_pack_array(&c->pk, 3);
    msgpack_pack_uint64(&c->pk, YIELD_ERROR);
    msgpack_pack_uint64(&c->pk, inv_id);
    pack_str(&c->pk, "procedure not registered here");
    c->count++;
}

static void dispatch(mcl_client *c, const msgpack_object *cmd) {
    if (cmd->type != MSGPACK_OBJECT_ARRAY || cmd->via.array.size == 0)
        return;
    const msgpack_object *f = cmd->via.array.ptr;
    uint32_t n = cmd->via.array.size;
    uint64_t code = u64(&f[0]);
    switch (code) {
    case EVENT: {
        if (n < 7)
            return;
        mcl_event ev = {.sub_id = u64(&f[1]), .did = u64(&f[2]), .qos = (int)u64(&f[3]),
                        .retain = f[6].type == MSGPACK_OBJECT_BOOLEAN && f[6].via.boolean};
        if (f[4].type == MSGPACK_OBJECT_STR) {
            ev.topic = f[4].via.str.ptr;
            ev.topic_len = f[4].via.str.size;
        }
        if (f[5].type == MSGPACK_OBJECT_BIN) {
            ev.payload = f[5].via.bin.ptr;
            ev.payload_len = f[5].via.bin.size;
        }
        if (ev.qos && ev.did && seen_before(c, ev.did))
            return; /* a duplicate: already delivered and acknowledged */
        if (c->on_event)
            c->on_event(c->event_user, &ev);
        if (ev.qos && ev.did) {
            msgpack_pack_array(&c->pk, 2);
            msgpack_pack_uint64(&c->pk, ACK);
            msgpack_pack_uint64(&c->pk, ev.did);
            c->count++;
        }
        return;
    }
    case INVOKE:
        if (n >= 4)
            on_invoke(c, f, n);
        return;
    case BYE:
        if (c->closing) {
            c->closed = 1;
            fail(c, MCL_ECLOSED, "the node said BYE (code %llu)",
                 n > 1 ? (unsigned long long)u64(&f[1]) : 0ULL);
        } else {
            char why[64];
            snprintf(why, sizeof why, "the node said BYE (code %llu)",
                     n > 1 ? (unsigned long long)u64(&f[1]) : 0ULL);
            lose(c, why);
        }
        return;
    case ERROR:
        if (n >= 3 && u64(&f[2]) == NOT_WELCOMED && !c->lost) {
            lose(c, "the node does not know this session (NOT_WELCOMED): it restarted");
            return;
        }
        if (n >= 4 && c->want_id && u64(&f[1]) == c->want_id) {
            c->got = -(int)u64(&f[2]);
            if (f[3].type == MSGPACK_OBJECT_STR)
                fail(c, c->got, "%.*s", (int)f[3].via.str.size, f[3].via.str.ptr);
        }
        return;
    default:
        break;
    }
    /* replies: WELCOME, SUBACK, REGISTERED, RESULT, PUBACK, PONG carry the id first */
    if ((int)code != c->want_code || n < 2 || u64(&f[1]) != c->want_id)
        return;
    c->got = 1;
    if (code == WELCOME || code == SUBACK || code == REGISTERED || code == PUBACK)
        c->got_value = n > 2 ? u64(&f[2]) : 0;
    if (code == REGISTERED) { /* before any INVOKE that follows in the same body */
        if (c->restore_slot >= 0)
            c->regs[c->restore_slot].reg_id = c->got_value;
        else
            c->regs[c->nregs++].reg_id = c->got_value;
    }
    if (code == WELCOME && n > 3 && f[3].type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < f[3].via.map.size; i++) {
            const msgpack_object_kv *kv = &f[3].via.map.ptr[i];
            if (kv->key.type != MSGPACK_OBJECT_STR)
                continue;
            if (kv->key.via.str.size == 12 &&
                memcmp(kv->key.via.str.ptr, "heartbeat_ms", 12) == 0)
                c->heartbeat_ms = (unsigned)u64(&kv->val);
            if (kv->key.via.str.size == 8 && memcmp(kv->key.via.str.ptr, "liveness", 8) == 0)
                c->liveness = (unsigned)u64(&kv->val);
        }
    }
    if (code == RESULT && c->got_result) {
        msgpack_packer rp;
        msgpack_packer_init(&rp, c->got_result, msgpack_sbuffer_write);
        if (n > 2)
            msgpack_pack_object(&rp, f[2]);
        else
            msgpack_pack_nil(&rp);
    }
}

/* Receive and dispatch one message if one arrives within timeout_ms: 1, 0 (none), <0. */
static int receive_one(mcl_client *c, int timeout_ms) {
    zmq_pollitem_t items[2] = {{.socket = c->sock, .events = ZMQ_POLLIN},
                               {.socket = c->mon, .events = ZMQ_POLLIN}};
    int rc = zmq_poll(items, 2, timeout_ms);
    if (rc < 0)
        return fail(c, MCL_EIO, "poll failed: %s", zmq_strerror(zmq_errno()));
    if (rc == 0)
        return 0;
    if (items[1].revents & ZMQ_POLLIN) { /* two frames: event (u16) + value, endpoint */
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        zmq_msg_init(&addr);
        int got = zmq_msg_recv(&ev, c->mon, 0) >= 0 && zmq_msg_size(&ev) >= 2;
        uint16_t event = 0;
        if (got)
            memcpy(&event, zmq_msg_data(&ev), sizeof event);
        if (zmq_msg_more(&ev))
            zmq_msg_recv(&addr, c->mon, 0);
        zmq_msg_close(&ev);
        zmq_msg_close(&addr);
        if (got && event == ZMQ_EVENT_DISCONNECTED) {
            if (!c->lost)
                lose(c, "the connection to the node closed");
            else if (c->hello_rid) { /* the attempt's connection closed: next one later */
                c->hello_rid = 0;
                c->next_attempt_ms = now_ms() + c->backoff_ms;
            }
            return 1;
        }
        if (!(items[0].revents & ZMQ_POLLIN))
            return 1;
    }
    c->last_recv_ms = now_ms();
    zmq_msg_t sig, body, extra;
    zmq_msg_init(&sig);
    zmq_msg_init(&body);
    if (zmq_msg_recv(&sig, c->sock, 0) < 0)
        return fail(c, MCL_EIO, "receive failed: %s", zmq_strerror(zmq_errno()));
    int frames = 1;
    if (zmq_msg_more(&sig) && zmq_msg_recv(&body, c->sock, 0) >= 0) {
        frames++;
        int more = zmq_msg_more(&body);
        while (more) { /* drain a malformed message */
            zmq_msg_init(&extra);
            zmq_msg_recv(&extra, c->sock, 0);
            more = zmq_msg_more(&extra);
            zmq_msg_close(&extra);
            frames++;
        }
    }
    int ok = frames == 2 && zmq_msg_size(&sig) == 4 &&
             memcmp(zmq_msg_data(&sig), SIGNATURE, 4) == 0;
    int handled = 0;
    if (ok) {
        msgpack_unpacked top;
        msgpack_unpacked_init(&top);
        size_t off = 0;
        if (msgpack_unpack_next(&top, zmq_msg_data(&body), zmq_msg_size(&body), &off) ==
                MSGPACK_UNPACK_SUCCESS &&
            top.data.type == MSGPACK_OBJECT_ARRAY) {
            for (uint32_t i = 0; i < top.data.via.array.size; i++) {
                dispatch(c, &top.data.via.array.ptr[i]);
                handled++;
            }
        }
        msgpack_unpacked_destroy(&top);
    }
    zmq_msg_close(&sig);
    zmq_msg_close(&body);
    return handled > 0 ? handled : 1;
}

/* Send the queued commands, then dispatch messages until the reply to `id` (of `code`). */
static int wait_reply(mcl_client *c, uint64_t id, int code, int timeout_ms) {
    c->want_id = id;
    c->want_code = code;
    c->got = 0;
    int rc = mcl_flush(c);
    int64_t deadline = now_ms() + timeout_ms;
    while (rc == 0 && c->got == 0 && !c->closed && (!c->lost || (id && id == c->hello_rid))) {
        int64_t left = deadline - now_ms();
        rc = receive_one(c, left > 0 ? (int)left : 0); /* at least one look, even at 0 ms */
        if (rc > 0)
            rc = mcl_flush(c); /* ACKs and YIELDs produced while waiting */
        if (rc == 0 && c->got == 0 && left <= 0) { /* lost or closed meanwhile: said below */
            if (!c->closed && (!c->lost || id == c->hello_rid))
                rc = fail(c, MCL_ETIMEOUT, "no reply within %d ms", timeout_ms);
            break;
        }
    }
    c->want_id = 0;
    c->want_code = 0;
    if (rc < 0)
        return rc;
    if (c->got == 0)
        return c->closed ? MCL_ECLOSED : MCL_ELOST;
    return c->got < 0 ? c->got : 0;
}

/* A new DEALER (a new connection: a new session) with its monitor. */
static int open_socket(mcl_client *c) {
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    int linger = 0, hwm = 100000, ivl = RECONNECT_MIN_MS, ivl_max = RECONNECT_MAX_MS;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl);
    zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof ivl_max);
    char addr[64];
    snprintf(addr, sizeof addr, "inproc://mcl-monitor-%p-%u", (void *)c, ++c->mon_seq);
    zmq_socket_monitor(c->sock, addr, ZMQ_EVENT_DISCONNECTED);
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    zmq_setsockopt(c->mon, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(c->mon, addr);
    if (zmq_connect(c->sock, c->endpoint) != 0)
        return fail(c, MCL_EIO, "cannot connect to %s: %s", c->endpoint,
                    zmq_strerror(zmq_errno()));
    return 0;
}

static void close_socket(mcl_client *c) {
    if (c->sock) {
        zmq_socket_monitor(c->sock, NULL, 0);
        zmq_close(c->sock);
    }
    if (c->mon)
        zmq_close(c->mon);
    c->sock = c->mon = NULL;
}

static void pack_hello(mcl_client *c, uint64_t rid) {
    msgpack_pack_array(&c->pk, 6);
    msgpack_pack_uint64(&c->pk, HELLO);
    msgpack_pack_uint64(&c->pk, rid);
    pack_str(&c->pk, c->realm);
    pack_str(&c->pk, c->name);
    pack_str(&c->pk, c->secret);
    msgpack_pack_uint64(&c->pk, c->want_heartbeat_ms);
    c->count++;
}

static void welcomed(mcl_client *c) {
    c->session_id = c->got_value;
    c->last_recv_ms = c->last_send_ms = now_ms();
    memset(c->seen, 0, sizeof c->seen); /* delivery ids are per session */
}

static int64_t subscribe_once(mcl_client *c, const char *filter, int qos, int timeout_ms);
static int64_t register_once(mcl_client *c, int slot, int timeout_ms);

/* Reconnect if the session was lost, waiting at most until `deadline` (ms): 0 once a new
 * session has its subscriptions and registrations again, MCL_ELOST while still trying. */
static int heal(mcl_client *c, int64_t deadline) {
    while (c->lost && !c->closed) {
        int64_t now = now_ms();
        if (!c->hello_rid) {
            if (now < c->next_attempt_ms) {
                int64_t until = c->next_attempt_ms < deadline ? c->next_attempt_ms : deadline;
                if (until <= now)
                    return fail(c, MCL_ELOST, "connection lost; reconnecting");
                zmq_poll(NULL, 0, (long)(until - now));
                continue;
            }
            close_socket(c);
            msgpack_sbuffer_clear(&c->out);
            c->count = 0;
            if (open_socket(c) != 0)
                return MCL_EIO;
            c->hello_rid = ++c->next_id;
            c->attempt_ms = now;
            pack_hello(c, c->hello_rid);
        }
        if (now - c->attempt_ms >= ATTEMPT_MS) { /* unanswered: a fresh connection now */
            c->hello_rid = 0;
            continue;
        }
        int64_t until = c->attempt_ms + ATTEMPT_MS < deadline ? c->attempt_ms + ATTEMPT_MS
                                                              : deadline;
        int rc = wait_reply(c, c->hello_rid, WELCOME, until > now ? (int)(until - now) : 0);
        if (rc == 0) {
            c->lost = 0;
            c->hello_rid = 0;
            welcomed(c);
            for (int i = 0; i < c->nsubs && !c->lost; i++)
                if (subscribe_once(c, c->subs[i].filter, c->subs[i].qos, 5000) < 0 && !c->lost)
                    fprintf(stderr, "macula client: subscribing %s again failed: %s\n",
                            c->subs[i].filter, c->error);
            for (int i = 0; i < c->nregs && !c->lost; i++)
                if (register_once(c, i, 5000) < 0 && !c->lost)
                    fprintf(stderr, "macula client: registering %s again failed: %s\n",
                            c->regs[i].procedure, c->error);
            if (c->lost)
                continue;
            c->reconnects++;
            c->backoff_ms = RECONNECT_MIN_MS;
            if (c->on_connection)
                c->on_connection(c->connection_user, 1, "reconnected");
            return 0;
        }
        if (rc == MCL_ETIMEOUT || (rc == MCL_ELOST && c->hello_rid)) {
            if (now_ms() >= deadline) /* the HELLO stays pending for the next call */
                return fail(c, MCL_ELOST, "connection lost; reconnecting");
            continue;
        }
        /* refused (an ERROR to HELLO) or the attempt's connection closed: back off */
        c->hello_rid = 0;
        c->rng ^= c->rng << 13, c->rng ^= c->rng >> 17, c->rng ^= c->rng << 5; /* xorshift32 */
        c->next_attempt_ms = now_ms() + c->backoff_ms / 2 + c->rng % (unsigned)(c->backoff_ms + 1);
        c->backoff_ms = c->backoff_ms * 2 < RECONNECT_MAX_MS ? c->backoff_ms * 2
                                                              : RECONNECT_MAX_MS;
    }
    return c->closed ? MCL_ECLOSED : 0;
}

static int64_t left_ms(int64_t deadline) {
    int64_t left = deadline - now_ms();
    return left > 0 ? left : 0;
}

/* -- API --------------------------------------------------------------------------------- */
mcl_client *mcl_connect(const char *endpoint, const char *realm, const char *name,
                        const char *secret, unsigned heartbeat_ms, int timeout_ms,
                        char *error, size_t error_size) {
    mcl_client *c = calloc(1, sizeof *c);
    if (!c) {
        if (error)
            snprintf(error, error_size, "out of memory");
        return NULL;
    }
    c->ctx = zmq_ctx_new();
    msgpack_sbuffer_init(&c->out);
    msgpack_packer_init(&c->pk, &c->out, msgpack_sbuffer_write);
    c->heartbeat_ms = 5000;
    c->liveness = 3;
    c->reconnect = 1;
    c->restore_slot = -1;
    c->rng = (uint32_t)now_ms() ^ (uint32_t)(uintptr_t)c ^ 0x9e3779b9u;
    if (!c->rng)
        c->rng = 1;
    c->endpoint = dup_str(endpoint);
    c->realm = dup_str(realm);
    c->name = dup_str(name);
    c->secret = dup_str(secret);
    c->want_heartbeat_ms = heartbeat_ms;
    int rc = open_socket(c);
    if (rc == 0) {
        uint64_t rid = ++c->next_id;
        pack_hello(c, rid);
        rc = wait_reply(c, rid, WELCOME, timeout_ms);
        if (rc == 0) {
            welcomed(c);
            return c;
        }
    }
    if (error)
        snprintf(error, error_size, "%s", c->error);
    c->closed = 1;
    mcl_close(c);
    return NULL;
}

void mcl_close(mcl_client *c) {
    if (!c)
        return;
    if (!c->closed && !c->lost) {
        c->closing = 1;
        msgpack_pack_array(&c->pk, 3);
        msgpack_pack_uint64(&c->pk, BYE);
        msgpack_pack_uint64(&c->pk, 40);
        pack_str(&c->pk, "bye");
        c->count++;
        if (mcl_flush(c) == 0) {
            int64_t deadline = now_ms() + 1000; /* the node answers BYE */
            while (!c->closed && now_ms() < deadline && receive_one(c, 100) >= 0) {
            }
        }
    }
    close_socket(c);
    zmq_ctx_term(c->ctx);
    msgpack_sbuffer_destroy(&c->out);
    for (int i = 0; i < c->nsubs; i++)
        free(c->subs[i].filter);
    for (int i = 0; i < c->nregs; i++)
        free(c->regs[i].procedure);
    free(c->endpoint);
    free(c->realm);
    free(c->name);
    free(c->secret);
    free(c);
}

static int64_t subscribe_once(mcl_client *c, const char *filter, int qos, int timeout_ms) {
    uint64_t rid = ++c->next_id;
    msgpack_pack_array(&c->pk, 4);
    msgpack_pack_uint64(&c->pk, SUBSCRIBE);
    msgpack_pack_uint64(&c->pk, rid);
    pack_str(&c->pk, filter);
    msgpack_pack_uint64(&c->pk, (uint64_t)qos);
    c->count++;
    int rc = wait_reply(c, rid, SUBACK, timeout_ms);
    return rc < 0 ? rc : (int64_t)c->got_value;
}

int64_t mcl_subscribe(mcl_client *c, const char *filter, int qos, int timeout_ms) {
    if (qos != 0 && qos != 1)
        return fail(c, MCL_EARG, "qos must be 0 or 1");
    int slot = 0;
    while (slot < c->nsubs && strcmp(c->subs[slot].filter, filter) != 0)
        slot++;
    if (slot == MAX_SUBS)
        return fail(c, MCL_EARG, "at most %d subscriptions", MAX_SUBS);
    int64_t deadline = now_ms() + timeout_ms, rc;
    do { /* SUBSCRIBE is safe to repeat: again after a reconnection within the timeout */
        rc = heal(c, deadline);
        if (rc == 0)
            rc = subscribe_once(c, filter, qos, (int)left_ms(deadline));
    } while (rc == MCL_ELOST && left_ms(deadline) > 0);
    if (rc >= 0) { /* remembered, to subscribe again after a reconnection */
        if (slot == c->nsubs) {
            c->subs[slot].filter = dup_str(filter);
            c->nsubs++;
        }
        c->subs[slot].qos = qos;
    }
    return rc;
}

int mcl_publish(mcl_client *c, const char *topic, const void *payload, size_t len, int qos,
                int retain, int timeout_ms) {
    if (qos != 0 && qos != 1)
        return fail(c, MCL_EARG, "qos must be 0 or 1");
    if (c->closed)
        return fail(c, MCL_ECLOSED, "the session is closed");
    if (qos == 0 && c->lost) /* not held: at most once */
        return fail(c, MCL_ELOST, "connection lost; reconnecting (QoS 0 message dropped)");
    int64_t deadline = now_ms() + timeout_ms;
    uint64_t mid = qos ? ++c->next_id : 0;
    int rc;
again:
    if (qos && (rc = heal(c, deadline)) != 0)
        return rc;
    msgpack_pack_array(&c->pk, 6);
    msgpack_pack_uint64(&c->pk, PUBLISH);
    pack_str(&c->pk, topic);
    msgpack_pack_bin(&c->pk, len);
    msgpack_pack_bin_body(&c->pk, payload, len);
    msgpack_pack_uint64(&c->pk, (uint64_t)qos);
    msgpack_pack_uint64(&c->pk, mid);
    if (retain)
        msgpack_pack_true(&c->pk);
    else
        msgpack_pack_false(&c->pk);
    c->count++;
    if (qos == 0)
        return c->count >= MCL_MAX_BATCH ? mcl_flush(c) : 0;
    rc = wait_reply(c, mid, PUBACK, (int)left_ms(deadline));
    if (rc == MCL_ELOST && left_ms(deadline) > 0)
        goto again; /* no PUBACK from the lost session: the same mid to the new one */
    return rc < 0 ? rc : (int)c->got_value;
}

int mcl_call(mcl_client *c, const char *procedure, const char *args_msgpack, size_t args_len,
             msgpack_sbuffer *result, int timeout_ms) {
    int wait = (timeout_ms > 0 ? timeout_ms : 300000) + 5000;
    int rc = heal(c, now_ms() + wait); /* not sent yet: safe to wait for a new session */
    if (rc != 0)
        return rc;
    uint64_t rid = ++c->next_id;
    msgpack_pack_array(&c->pk, 5);
    msgpack_pack_uint64(&c->pk, CALL);
    msgpack_pack_uint64(&c->pk, rid);
    pack_str(&c->pk, procedure);
    if (args_msgpack && args_len)
        msgpack_sbuffer_write(&c->out, args_msgpack, args_len);
    else
        msgpack_pack_nil(&c->pk);
    msgpack_pack_uint64(&c->pk, timeout_ms > 0 ? (uint64_t)timeout_ms : 0);
    c->count++;
    c->got_result = result;
    rc = wait_reply(c, rid, RESULT, wait); /* MCL_ELOST: it may have run; not repeated */
    c->got_result = NULL;
    return rc;
}

static int64_t register_once(mcl_client *c, int slot, int timeout_ms) {
    uint64_t rid = ++c->next_id;
    msgpack_pack_array(&c->pk, 4);
    msgpack_pack_uint64(&c->pk, REGISTER);
    msgpack_pack_uint64(&c->pk, rid);
    pack_str(&c->pk, c->regs[slot].procedure);
    pack_str(&c->pk, "round_robin");
    c->count++;
    c->restore_slot = slot < c->nregs ? slot : -1; /* else REGISTERED commits a new slot */
    int rc = wait_reply(c, rid, REGISTERED, timeout_ms);
    c->restore_slot = -1;
    return rc < 0 ? rc : (int64_t)c->got_value;
}

int64_t mcl_register(mcl_client *c, const char *procedure, mcl_handler_fn fn, void *user,
                     int timeout_ms) {
    if (c->nregs >= MAX_REGS)
        return fail(c, MCL_EARG, "at most %d registrations", MAX_REGS);
    if (!fn)
        return fail(c, MCL_EARG, "a handler is required");
    /* the handler is staged in the next slot; REGISTERED's dispatch commits it */
    reg_entry *r = &c->regs[c->nregs];
    r->reg_id = 0;
    r->fn = fn;
    r->user = user;
    r->procedure = dup_str(procedure);
    int64_t deadline = now_ms() + timeout_ms, rc;
    do { /* REGISTER is safe to repeat (the same session answers with its reg_id) */
        rc = heal(c, deadline);
        if (rc == 0)
            rc = register_once(c, c->nregs, (int)left_ms(deadline));
    } while (rc == MCL_ELOST && left_ms(deadline) > 0);
    if (rc < 0) {
        free(r->procedure);
        r->procedure = NULL;
    }
    return rc;
}

int mcl_poll(mcl_client *c, int timeout_ms) {
    if (c->closed)
        return fail(c, MCL_ECLOSED, "the session is closed");
    int64_t now = now_ms();
    if (c->lost) { /* reconnecting: nothing to dispatch until the new session is ready */
        int rc = heal(c, now + timeout_ms);
        return rc == MCL_ELOST ? 0 : rc;
    }
    int64_t silent = now - c->last_recv_ms;
    if (silent > (int64_t)c->liveness * c->heartbeat_ms / 2) {
        char why[64];
        snprintf(why, sizeof why, "nothing received for %lld ms", (long long)silent);
        lose(c, why);
        return c->closed ? MCL_ECLOSED : 0;
    }
    if (now - c->last_send_ms >= (int64_t)c->heartbeat_ms / 2 ||
        silent >= (int64_t)c->heartbeat_ms / 2) {
        msgpack_pack_array(&c->pk, 2);
        msgpack_pack_uint64(&c->pk, PING);
        msgpack_pack_uint64(&c->pk, 0);
        c->count++;
    }
    int rc = mcl_flush(c);
    if (rc < 0)
        return rc;
    rc = receive_one(c, timeout_ms);
    if (rc > 0 && !c->lost) {
        int f = mcl_flush(c);
        if (f < 0)
            return f;
    }
    if (c->closed)
        return MCL_ECLOSED;
    return c->lost ? 0 : rc;
}
