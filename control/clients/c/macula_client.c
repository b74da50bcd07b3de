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
#define SEEN 1024

typedef struct {
    uint64_t reg_id;
    mcl_handler_fn fn;
    void *user;
} reg_entry;

struct mcl_client {
    void *ctx;
    void *sock;
    uint64_t next_id;
    uint64_t session_id;
    unsigned heartbeat_ms;
    int64_t last_send_ms;
    int closed;
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
        c->closed = 1;
        fail(c, MCL_ECLOSED, "the node said BYE (code %llu)",
             n > 1 ? (unsigned long long)u64(&f[1]) : 0ULL);
        return;
    case ERROR:
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
    if (code == REGISTERED) /* before any INVOKE that follows in the same body */
        c->regs[c->nregs++].reg_id = c->got_value;
    if (code == WELCOME && n > 3 && f[3].type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < f[3].via.map.size; i++) {
            const msgpack_object_kv *kv = &f[3].via.map.ptr[i];
            if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == 12 &&
                memcmp(kv->key.via.str.ptr, "heartbeat_ms", 12) == 0)
                c->heartbeat_ms = (unsigned)u64(&kv->val);
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
    zmq_pollitem_t item = {.socket = c->sock, .events = ZMQ_POLLIN};
    int rc = zmq_poll(&item, 1, timeout_ms);
    if (rc < 0)
        return fail(c, MCL_EIO, "poll failed: %s", zmq_strerror(zmq_errno()));
    if (rc == 0)
        return 0;
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
    while (rc == 0 && c->got == 0 && !c->closed) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            rc = fail(c, MCL_ETIMEOUT, "no reply within %d ms", timeout_ms);
            break;
        }
        rc = receive_one(c, (int)left);
        if (rc > 0)
            rc = mcl_flush(c); /* ACKs and YIELDs produced while waiting */
    }
    c->want_id = 0;
    c->want_code = 0;
    if (rc < 0)
        return rc;
    if (c->got == 0)
        return MCL_ECLOSED;
    return c->got < 0 ? c->got : 0;
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
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    int linger = 0, hwm = 100000;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    msgpack_sbuffer_init(&c->out);
    msgpack_packer_init(&c->pk, &c->out, msgpack_sbuffer_write);
    c->heartbeat_ms = 5000;
    int rc = zmq_connect(c->sock, endpoint);
    if (rc != 0) {
        fail(c, MCL_EIO, "cannot connect to %s: %s", endpoint, zmq_strerror(zmq_errno()));
    } else {
        uint64_t rid = ++c->next_id;
        msgpack_pack_array(&c->pk, 6);
        msgpack_pack_uint64(&c->pk, HELLO);
        msgpack_pack_uint64(&c->pk, rid);
        pack_str(&c->pk, realm);
        pack_str(&c->pk, name ? name : "");
        pack_str(&c->pk, secret ? secret : "");
        msgpack_pack_uint64(&c->pk, heartbeat_ms);
        c->count++;
        rc = wait_reply(c, rid, WELCOME, timeout_ms);
        if (rc == 0) {
            c->session_id = c->got_value;
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
    if (!c->closed) {
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
    zmq_close(c->sock);
    zmq_ctx_term(c->ctx);
    msgpack_sbuffer_destroy(&c->out);
    free(c);
}

int64_t mcl_subscribe(mcl_client *c, const char *filter, int qos, int timeout_ms) {
    if (qos != 0 && qos != 1)
        return fail(c, MCL_EARG, "qos must be 0 or 1");
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

int mcl_publish(mcl_client *c, const char *topic, const void *payload, size_t len, int qos,
                int retain, int timeout_ms) {
    if (qos != 0 && qos != 1)
        return fail(c, MCL_EARG, "qos must be 0 or 1");
    if (c->closed)
        return fail(c, MCL_ECLOSED, "the session is closed");
    uint64_t mid = qos ? ++c->next_id : 0;
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
    int rc = wait_reply(c, mid, PUBACK, timeout_ms);
    return rc < 0 ? rc : (int)c->got_value;
}

int mcl_call(mcl_client *c, const char *procedure, const char *args_msgpack, size_t args_len,
             msgpack_sbuffer *result, int timeout_ms) {
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
    int wait = (timeout_ms > 0 ? timeout_ms : 300000) + 5000;
    int rc = wait_reply(c, rid, RESULT, wait);
    c->got_result = NULL;
    return rc;
}

int64_t mcl_register(mcl_client *c, const char *procedure, mcl_handler_fn fn, void *user,
                     int timeout_ms) {
    if (c->nregs >= MAX_REGS)
        return fail(c, MCL_EARG, "at most %d registrations", MAX_REGS);
    if (!fn)
        return fail(c, MCL_EARG, "a handler is required");
    uint64_t rid = ++c->next_id;
    msgpack_pack_array(&c->pk, 4);
    msgpack_pack_uint64(&c->pk, REGISTER);
    msgpack_pack_uint64(&c->pk, rid);
    pack_str(&c->pk, procedure);
    pack_str(&c->pk, "round_robin");
    c->count++;
    /* the handler is staged in the next slot; REGISTERED's dispatch commits it */
    reg_entry *r = &c->regs[c->nregs];
    r->reg_id = 0;
    r->fn = fn;
    r->user = user;
    int rc = wait_reply(c, rid, REGISTERED, timeout_ms);
    return rc < 0 ? rc : (int64_t)c->got_value;
}

int mcl_poll(mcl_client *c, int timeout_ms) {
    if (c->closed)
        return fail(c, MCL_ECLOSED, "the session is closed");
    if (now_ms() - c->last_send_ms >= (int64_t)c->heartbeat_ms / 2) {
        msgpack_pack_array(&c->pk, 2);
        msgpack_pack_uint64(&c->pk, PING);
        msgpack_pack_uint64(&c->pk, 0);
        c->count++;
    }
    int rc = mcl_flush(c);
    if (rc < 0)
        return rc;
    rc = receive_one(c, timeout_ms);
    if (rc > 0) {
        int f = mcl_flush(c);
        if (f < 0)
            return f;
    }
    if (c->closed)
        return MCL_ECLOSED;
    return rc;
}
