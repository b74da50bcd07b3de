/* macula_client.h - a small C client of a macula node (MCP/1, control/SPEC.md).
 *
 * One DEALER socket (libzmq), bodies in MessagePack (msgpack-c). Single-threaded: nothing
 * happens behind your back; incoming EVENTs and INVOKEs are dispatched to your callbacks
 * from inside mcl_poll() and while a blocking request (subscribe, call, ...) waits for its
 * reply. QoS 1 EVENTs are acknowledged after the event callback returns; repeated
 * delivery ids are dropped.
 *
 * QoS 0 publishes are batched: mcl_publish() appends to an outgoing body that leaves on
 * mcl_flush(), on the next request or poll, or when it holds MCL_MAX_BATCH commands.
 *
 * Return values: 0 (or a non-negative result) on success; a negative value on failure:
 * -(MCP error code) when the node answered ERROR (e.g. -30 NO_PROVIDER), MCL_ETIMEOUT,
 * MCL_EIO (socket), MCL_ECLOSED (the client is closed), MCL_ELOST (the node was lost; the
 * client is reconnecting). mcl_last_error() describes the last failure.
 *
 * Reconnection (on unless mcl_set_reconnect(c, 0)): the client notices a lost node (the
 * connection closing, BYE, ERROR NOT_WELCOMED from a restarted node, or nothing received
 * for liveness x heartbeat / 2) and reconnects inside mcl_poll() and the blocking requests:
 * a new connection, HELLO, SUBSCRIBE and REGISTER again (same callbacks), with back-off
 * 0.1 s doubling to 1 s. mcl_poll() returns 0 while reconnecting. A request waits for the
 * new session within its timeout: SUBSCRIBE, REGISTER and a QoS 1 PUBLISH (same mid) are
 * sent again if the loss cut them off; a CALL already sent returns MCL_ELOST (it may have
 * run); a QoS 0 PUBLISH while reconnecting is dropped (MCL_ELOST). Without reconnection
 * the first loss closes the client (MCL_ECLOSED).
 */
#ifndef MACULA_CLIENT_H
#define MACULA_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <msgpack.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MCL_ETIMEOUT (-1000)
#define MCL_EIO (-1001)
#define MCL_ECLOSED (-1002)
#define MCL_EARG (-1003)
#define MCL_ELOST (-1004)
#define MCL_MAX_BATCH 1000

typedef struct mcl_client mcl_client;

typedef struct {
    uint64_t sub_id;
    uint64_t did;
    int qos;
    int retain;
    const char *topic; /* not NUL-terminated; valid during the callback only */
    size_t topic_len;
    const char *payload;
    size_t payload_len;
} mcl_event;

/* Called when the session is lost (connected 0, with the reason) and when a new one has
 * its subscriptions and registrations again (connected 1). */
typedef void (*mcl_connection_fn)(void *user, int connected, const char *reason);

/* Called for each EVENT. */
typedef void (*mcl_event_fn)(void *user, const mcl_event *ev);

/* Called for each INVOKE of a procedure registered with this handler. `args` is the
 * MessagePack object the caller sent. Pack exactly one object into `result` and return 0,
 * or write a message into `error` (size `error_size`) and return non-zero (the caller gets
 * APPLICATION_ERROR with that message). */
typedef int (*mcl_handler_fn)(void *user, const msgpack_object *args, msgpack_packer *result,
                              char *error, size_t error_size);

/* Connect and open a session (HELLO -> WELCOME). NULL on failure; the reason is written to
 * `error` (size `error_size`) when given. heartbeat_ms 0: the node's default (5000 ms; a
 * silent node is then noticed after 7.5 s; 2000 makes it 3 s). */
mcl_client *mcl_connect(const char *endpoint, const char *realm, const char *name,
                        const char *secret, unsigned heartbeat_ms, int timeout_ms,
                        char *error, size_t error_size);

/* Say BYE, close the socket, free the client. */
void mcl_close(mcl_client *c);

const char *mcl_last_error(const mcl_client *c);
uint64_t mcl_session_id(const mcl_client *c);

void mcl_on_event(mcl_client *c, mcl_event_fn fn, void *user);
void mcl_on_connection(mcl_client *c, mcl_connection_fn fn, void *user);

/* Reconnect after a loss (1, the default) or close (0). */
void mcl_set_reconnect(mcl_client *c, int on);

/* 1 while a session is open; 0 while reconnecting or once closed. */
int mcl_connected(const mcl_client *c);

/* Sessions opened again after a loss. */
unsigned mcl_reconnects(const mcl_client *c);

/* SUBSCRIBE; the sub_id on success. */
int64_t mcl_subscribe(mcl_client *c, const char *filter, int qos, int timeout_ms);

/* PUBLISH. qos 0: queued (see above), returns 0. qos 1: waits for PUBACK, returns its
 * reason (0 OK, 16 no subscribers, 151 quota exceeded). */
int mcl_publish(mcl_client *c, const char *topic, const void *payload, size_t len, int qos,
                int retain, int timeout_ms);

/* Send the queued commands now. */
int mcl_flush(mcl_client *c);

/* CALL `procedure` with `args_msgpack` (one packed MessagePack value, NULL/0 for nil). On
 * success the result (one MessagePack value) is appended to `result`. timeout_ms 0: the
 * node's call_timeout. */
int mcl_call(mcl_client *c, const char *procedure, const char *args_msgpack, size_t args_len,
             msgpack_sbuffer *result, int timeout_ms);

/* REGISTER `procedure`; the reg_id on success. */
int64_t mcl_register(mcl_client *c, const char *procedure, mcl_handler_fn fn, void *user,
                     int timeout_ms);

/* Wait up to timeout_ms for messages and dispatch them (EVENT, INVOKE, BYE); sends PING
 * when due; reconnects when the node was lost. Returns the number of commands handled (0
 * while reconnecting), or a negative error (MCL_ECLOSED once closed). */
int mcl_poll(mcl_client *c, int timeout_ms);

#ifdef __cplusplus
}
#endif
#endif
