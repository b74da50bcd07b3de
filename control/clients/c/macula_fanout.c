/* macula_fanout.c - fan-out receiver for tools/bench_node.py: COUNT subscriber sessions,
 * each on its own DEALER socket, in one process.
 *
 *   macula_fanout ENDPOINT COUNT ROUNDS TOPIC
 *
 * Opens COUNT sessions (HELLO + SUBSCRIBE TOPIC in one message each), prints READY once
 * every SUBACK arrived, then for each of ROUNDS rounds waits until every socket received
 * one EVENT and prints "ROUND <received> <CLOCK_MONOTONIC seconds of the last arrival>".
 * It speaks raw MCP/1 with msgpack-c (macula_client.c is one session per client).
 */
#define _POSIX_C_SOURCE 200809L
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

static const char SIG[4] = {'M', 'C', 'P', 1};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* the command codes in one received body (first 8), their count */
static int codes(void *sock, int *out) {
    zmq_msg_t sig, body;
    zmq_msg_init(&sig);
    zmq_msg_init(&body);
    zmq_msg_recv(&sig, sock, 0);
    zmq_msg_recv(&body, sock, 0);
    int n = 0;
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    if (msgpack_unpack_next(&up, zmq_msg_data(&body), zmq_msg_size(&body), NULL) ==
            MSGPACK_UNPACK_SUCCESS && up.data.type == MSGPACK_OBJECT_ARRAY) {
        for (uint32_t i = 0; i < up.data.via.array.size && n < 8; i++) {
            msgpack_object *c = &up.data.via.array.ptr[i];
            if (c->type == MSGPACK_OBJECT_ARRAY && c->via.array.size > 0)
                out[n++] = (int)c->via.array.ptr[0].via.u64;
        }
    }
    msgpack_unpacked_destroy(&up);
    zmq_msg_close(&sig);
    zmq_msg_close(&body);
    return n;
}

/* one body from each socket the last zmq_poll found readable: its commands of this code */
static int count_ready(zmq_pollitem_t *items, int count, int code) {
    int got = 0;
    for (int i = 0; i < count; i++) {
        if (!(items[i].revents & ZMQ_POLLIN))
            continue;
        int c[8], n = codes(items[i].socket, c);
        for (int k = 0; k < n; k++)
            got += c[k] == code;
    }
    return got;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: macula_fanout ENDPOINT COUNT ROUNDS TOPIC\n");
        return 2;
    }
    int count = atoi(argv[2]), rounds = atoi(argv[3]);
    void *ctx = zmq_ctx_new();
    zmq_ctx_set(ctx, ZMQ_MAX_SOCKETS, count + 64);
    void **socks = calloc((size_t)count, sizeof *socks);
    zmq_pollitem_t *items = calloc((size_t)count, sizeof *items);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    for (int i = 0; i < count; i++) {
        socks[i] = zmq_socket(ctx, ZMQ_DEALER);
        if (!socks[i]) {
            fprintf(stderr, "socket %d: %s\n", i, zmq_strerror(zmq_errno()));
            return 1;
        }
        int linger = 0;
        zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof linger);
        zmq_connect(socks[i], argv[1]);
        msgpack_sbuffer_clear(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        char name[32];
        int nl = snprintf(name, sizeof name, "cfan%d", i);
        size_t tl = strlen(argv[4]);
        msgpack_pack_array(&pk, 2);
        msgpack_pack_array(&pk, 6);
        msgpack_pack_uint64(&pk, 1);
        msgpack_pack_uint64(&pk, 1);
        msgpack_pack_str(&pk, 5);
        msgpack_pack_str_body(&pk, "bench", 5);
        msgpack_pack_str(&pk, (size_t)nl);
        msgpack_pack_str_body(&pk, name, (size_t)nl);
        msgpack_pack_str(&pk, 0);
        msgpack_pack_uint64(&pk, 600000);
        msgpack_pack_array(&pk, 4);
        msgpack_pack_uint64(&pk, 10);
        msgpack_pack_uint64(&pk, 2);
        msgpack_pack_str(&pk, tl);
        msgpack_pack_str_body(&pk, argv[4], tl);
        msgpack_pack_uint64(&pk, 0);
        zmq_send(socks[i], SIG, 4, ZMQ_SNDMORE);
        zmq_send(socks[i], sb.data, sb.size, 0);
        items[i].socket = socks[i];
        items[i].events = ZMQ_POLLIN;
    }
    int acked = 0;
    while (acked < count) {
        if (zmq_poll(items, count, 10000) <= 0) {
            fprintf(stderr, "only %d of %d SUBACKs\n", acked, count);
            return 1;
        }
        acked += count_ready(items, count, 11);
    }
    printf("READY\n");
    fflush(stdout);
    for (int r = 0; r < rounds; r++) {
        int got = 0;
        double last = 0;
        while (got < count) {
            if (zmq_poll(items, count, 5000) <= 0)
                break;
            got += count_ready(items, count, 16);
            last = now_s();
        }
        printf("ROUND %d %.9f\n", got, last);
        fflush(stdout);
    }
    for (int i = 0; i < count; i++)
        zmq_close(socks[i]);
    zmq_ctx_term(ctx);
    free(socks);
    free(items);
    msgpack_sbuffer_destroy(&sb);
    return 0;
}
