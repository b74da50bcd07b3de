/* macula_test.c - the C client against a real node, driven by tests/test_c_client.py.
 *
 *   macula_test ENDPOINT REALM
 *
 * Steps (each prints one line on stdout; the Python side acts on READY and SERVING):
 *   1. connect; subscribe "c/in" (QoS 1); register "c.mul"; print READY
 *   2. receive the two messages a Python client publishes to "c/in", print RECEIVED ...;
 *      publish "echo:<payload>" to "c/out" for each (QoS 0, batched, then one at QoS 1)
 *   3. call "py.add" with [2, 3] (registered by a Python client), print CALL py.add 5;
 *      call "nobody" and check the node answers NO_PROVIDER (30)
 *   4. print SERVING and serve "c.mul" until one call arrives (Python calls it), print
 *      SERVED; close. Exit 0 only if every step succeeded.
 *
 *   macula_test ENDPOINT REALM reconnect
 *
 * Subscribes "c/r" (QoS 1), registers "c.one", prints READY, then polls for up to 60 s:
 * prints LOST <reason> and BACK session=<id> as the connection callback reports them and
 * RECEIVED <payload> per message. After LOST it publishes to "c/held" at QoS 1 at once
 * (the call waits for the new session, then sends) and prints HELD_PUBACK <reason> (16,
 * NO_SUBSCRIBERS: nobody subscribes to it). Exits 0 after the message "last".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macula_client.h"

#define CHECK(cond, ...)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            fprintf(stderr, "macula_test: " __VA_ARGS__);     \
            fprintf(stderr, " (%s)\n", mcl_last_error(c));    \
            return 1;                                         \
        }                                                     \
    } while (0)

typedef struct {
    int received;
    char payload[2][128];
} inbox;

static void on_event(void *user, const mcl_event *ev) {
    inbox *box = user;
    if (box->received < 2) {
        snprintf(box->payload[box->received], sizeof box->payload[0], "%.*s",
                 (int)ev->payload_len, ev->payload);
        printf("RECEIVED %.*s %s qos=%d\n", (int)ev->topic_len, ev->topic,
               box->payload[box->received], ev->qos);
        fflush(stdout);
    }
    box->received++;
}

static int served;

/* c.mul: [a, b] -> a * b */
static int mul(void *user, const msgpack_object *args, msgpack_packer *result, char *error,
               size_t error_size) {
    (void)user;
    if (args->type != MSGPACK_OBJECT_ARRAY || args->via.array.size != 2 ||
        args->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
        args->via.array.ptr[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        snprintf(error, error_size, "c.mul takes two non-negative integers");
        return 1;
    }
    msgpack_pack_uint64(result, args->via.array.ptr[0].via.u64 * args->via.array.ptr[1].via.u64);
    served++;
    return 0;
}

static int done;

static void on_reconnect_event(void *user, const mcl_event *ev) {
    (void)user;
    printf("RECEIVED %.*s\n", (int)ev->payload_len, ev->payload);
    fflush(stdout);
    done = ev->payload_len == 4 && memcmp(ev->payload, "last", 4) == 0;
}

static int lost;

static void on_connection(void *user, int connected, const char *reason) {
    mcl_client *c = user;
    if (connected) {
        printf("BACK session=%llu\n", (unsigned long long)mcl_session_id(c));
    } else {
        lost++;
        printf("LOST %s\n", reason);
    }
    fflush(stdout);
}

static int one(void *user, const msgpack_object *args, msgpack_packer *result, char *error,
               size_t error_size) {
    (void)user, (void)args, (void)error, (void)error_size;
    msgpack_pack_uint64(result, 1);
    return 0;
}

static int reconnect_mode(const char *endpoint, const char *realm) {
    char err[256];
    mcl_client *c = mcl_connect(endpoint, realm, "c-reconnect", NULL, 2000, 5000, err,
                                sizeof err);
    if (!c) {
        fprintf(stderr, "macula_test: connect failed: %s\n", err);
        return 1;
    }
    mcl_on_event(c, on_reconnect_event, NULL);
    mcl_on_connection(c, on_connection, c);
    CHECK(mcl_subscribe(c, "c/r", 1, 5000) > 0, "subscribe failed");
    CHECK(mcl_register(c, "c.one", one, NULL, 5000) > 0, "register failed");
    printf("READY session=%llu\n", (unsigned long long)mcl_session_id(c));
    fflush(stdout);
    int handled = 0;
    for (int i = 0; i < 1200 && !done; i++) {
        CHECK(mcl_poll(c, 50) >= 0, "poll failed");
        if (lost > handled) {
            handled = lost;
            int rc = mcl_publish(c, "c/held", "held", 4, 1, 0, 30000);
            CHECK(rc >= 0, "QoS 1 publish across the reconnection failed: %d", rc);
            printf("HELD_PUBACK %d\n", rc);
            fflush(stdout);
        }
    }
    CHECK(done, "no message \"last\" within 60 s");
    printf("DONE reconnects=%u\n", mcl_reconnects(c));
    fflush(stdout);
    mcl_close(c);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[3], "reconnect") == 0)
        return reconnect_mode(argv[1], argv[2]);
    if (argc != 3) {
        fprintf(stderr, "usage: macula_test ENDPOINT REALM [reconnect]\n");
        return 2;
    }
    char err[256];
    mcl_client *c = mcl_connect(argv[1], argv[2], "c-test", NULL, 0, 5000, err, sizeof err);
    if (!c) {
        fprintf(stderr, "macula_test: connect failed: %s\n", err);
        return 1;
    }
    inbox box = {0};
    mcl_on_event(c, on_event, &box);
    CHECK(mcl_subscribe(c, "c/in", 1, 5000) > 0, "subscribe failed");
    CHECK(mcl_register(c, "c.mul", mul, NULL, 5000) > 0, "register failed");
    printf("READY session=%llu\n", (unsigned long long)mcl_session_id(c));
    fflush(stdout);

    for (int i = 0; i < 200 && box.received < 2; i++)
        CHECK(mcl_poll(c, 50) >= 0, "poll failed");
    CHECK(box.received == 2, "expected 2 messages on c/in, got %d", box.received);
    for (int i = 0; i < 2; i++) {
        char out[160];
        int n = snprintf(out, sizeof out, "echo:%s", box.payload[i]);
        CHECK(mcl_publish(c, "c/out", out, (size_t)n, 0, 0, 0) == 0, "publish failed");
    }
    CHECK(mcl_flush(c) == 0, "flush failed");
    CHECK(mcl_publish(c, "c/out", "echo:qos1", 9, 1, 0, 5000) == 0, "QoS 1 publish not OK");

    msgpack_sbuffer args, result;
    msgpack_sbuffer_init(&args);
    msgpack_sbuffer_init(&result);
    msgpack_packer ap;
    msgpack_packer_init(&ap, &args, msgpack_sbuffer_write);
    msgpack_pack_array(&ap, 2);
    msgpack_pack_int(&ap, 2);
    msgpack_pack_int(&ap, 3);
    CHECK(mcl_call(c, "py.add", args.data, args.size, &result, 5000) == 0, "call failed");
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    CHECK(msgpack_unpack_next(&up, result.data, result.size, NULL) == MSGPACK_UNPACK_SUCCESS &&
              up.data.type == MSGPACK_OBJECT_POSITIVE_INTEGER,
          "py.add returned no integer");
    printf("CALL py.add %llu\n", (unsigned long long)up.data.via.u64);
    msgpack_unpacked_destroy(&up);
    int rc = mcl_call(c, "nobody", NULL, 0, &result, 5000);
    CHECK(rc == -30, "calling an unregistered procedure gave %d, not -30 NO_PROVIDER", rc);
    printf("NO_PROVIDER %s\n", mcl_last_error(c));
    msgpack_sbuffer_destroy(&args);
    msgpack_sbuffer_destroy(&result);

    printf("SERVING\n");
    fflush(stdout);
    for (int i = 0; i < 200 && served < 1; i++)
        CHECK(mcl_poll(c, 50) >= 0, "poll failed");
    CHECK(served == 1, "c.mul was not called");
    printf("SERVED\n");
    fflush(stdout);
    mcl_close(c);
    return 0;
}
