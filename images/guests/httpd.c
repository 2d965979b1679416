/*
 * httpd: a wasi:http/proxy handler (WASI 0.2), written against the canonical ABI of
 * wasi:http@0.2.12 by hand (no bindings generator runs here). Built as a reactor core
 * module; `componentize --http` turns it into a component with the proxy adapter.
 *
 * GET /                 200 "hello from bulwark\n"
 * GET /sleep/MS         sleeps MS milliseconds, then 200 "slept MS ms\n"
 * GET /loop             never returns (burns CPU): fuel or the deadline ends it
 * GET /grow             grows memory until refused, then traps: the memory limit ends it
 * GET /trap             traps (unreachable) before answering
 * GET /partial          sends 200 and "partial\n", then traps: the connection is aborted
 * GET /fetch/IP:PORT/P  GET http://IP:PORT/P; 200 "fetched STATUS\n", or 502 "error CODE\n"
 *                       with CODE the wasi:http error-code case (15: HTTP-request-denied)
 * anything else         404 "not found\n"
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HTTP "wasi:http/types@0.2.12"
#define STREAMS "wasi:io/streams@0.2.12"
#define IMPORT(module, name) __attribute__((import_module(module), import_name(name)))

IMPORT(HTTP, "[method]incoming-request.path-with-query")
void request_path(int32_t request, void *ret);
IMPORT(HTTP, "[constructor]fields") int32_t fields_new(void);
IMPORT(HTTP, "[method]fields.append")
void fields_append(int32_t fields, const char *name, size_t name_len, const char *value,
                   size_t value_len, void *ret);
IMPORT(HTTP, "[constructor]outgoing-response") int32_t response_new(int32_t headers);
IMPORT(HTTP, "[method]outgoing-response.set-status-code")
int32_t response_set_status(int32_t response, int32_t status);
IMPORT(HTTP, "[method]outgoing-response.body") void response_body(int32_t response, void *ret);
IMPORT(HTTP, "[method]outgoing-body.write") void body_write(int32_t body, void *ret);
IMPORT(HTTP, "[static]outgoing-body.finish")
void body_finish(int32_t body, int32_t has_trailers, int32_t trailers, void *ret);
IMPORT(HTTP, "[static]response-outparam.set")
void outparam_set(int32_t outparam, int32_t is_err, int32_t response, int32_t a, int64_t b,
                  int32_t c, int32_t d, int32_t e, int32_t f);
IMPORT(HTTP, "[constructor]outgoing-request") int32_t request_new(int32_t headers);
IMPORT(HTTP, "[method]outgoing-request.set-authority")
int32_t request_set_authority(int32_t request, int32_t some, const char *ptr, size_t len);
IMPORT(HTTP, "[method]outgoing-request.set-path-with-query")
int32_t request_set_path(int32_t request, int32_t some, const char *ptr, size_t len);
IMPORT(HTTP, "[method]outgoing-request.set-scheme")
int32_t request_set_scheme(int32_t request, int32_t some, int32_t scheme, const char *ptr,
                           size_t len);
IMPORT("wasi:http/outgoing-handler@0.2.12", "handle")
void outgoing_handle(int32_t request, int32_t has_options, int32_t options, void *ret);
IMPORT(HTTP, "[method]future-incoming-response.subscribe")
int32_t future_subscribe(int32_t future);
IMPORT(HTTP, "[method]future-incoming-response.get") void future_get(int32_t future, void *ret);
IMPORT(HTTP, "[method]incoming-response.status") int32_t incoming_status(int32_t response);
IMPORT(STREAMS, "[method]output-stream.blocking-write-and-flush")
void stream_write(int32_t stream, const char *ptr, size_t len, void *ret);
IMPORT(STREAMS, "[resource-drop]output-stream") void stream_drop(int32_t stream);
IMPORT("wasi:io/poll@0.2.12", "[method]pollable.block") void pollable_block(int32_t pollable);
IMPORT("wasi:io/poll@0.2.12", "[resource-drop]pollable") void pollable_drop(int32_t pollable);
IMPORT("wasi:clocks/monotonic-clock@0.2.12", "subscribe-duration")
int32_t subscribe_duration(uint64_t nanoseconds);

/* Return areas: the largest result read here is future-incoming-response.get's. */
static _Alignas(8) uint8_t ret[64];

__attribute__((export_name("cabi_realloc")))
void *cabi_realloc(void *ptr, size_t old_size, size_t align, size_t new_size) {
    (void)old_size;
    (void)align; /* malloc aligns to 16 */
    return realloc(ptr, new_size);
}

/* Sends the response head; returns the body's output stream (the body in *body). */
static int32_t respond_head(int32_t outparam, int32_t status, int32_t *body) {
    int32_t headers = fields_new();
    fields_append(headers, "content-type", 12, "text/plain", 10, ret);
    int32_t response = response_new(headers);
    response_set_status(response, status);
    response_body(response, ret);
    *body = *(int32_t *)(ret + 4);
    body_write(*body, ret);
    int32_t stream = *(int32_t *)(ret + 4);
    outparam_set(outparam, 0, response, 0, 0, 0, 0, 0, 0);
    return stream;
}

static void write_text(int32_t stream, const char *text) {
    stream_write(stream, text, strlen(text), ret);
}

static void respond(int32_t outparam, int32_t status, const char *text) {
    int32_t body;
    int32_t stream = respond_head(outparam, status, &body);
    write_text(stream, text);
    stream_drop(stream);
    body_finish(body, 0, 0, ret);
}

static void block_for(uint64_t nanoseconds) {
    int32_t pollable = subscribe_duration(nanoseconds);
    pollable_block(pollable);
    pollable_drop(pollable);
}

static int starts_with(const char *text, size_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return len >= n && memcmp(text, prefix, n) == 0;
}

/* GET http://AUTHORITY/PATH (rest = "AUTHORITY/PATH"); the status, or -1 - error code. */
static int fetch(const char *rest, size_t len) {
    const char *slash = memchr(rest, '/', len);
    size_t authority_len = slash ? (size_t)(slash - rest) : len;
    const char *path = slash ? slash : "/";
    size_t path_len = slash ? len - authority_len : 1;
    int32_t request = request_new(fields_new());
    request_set_scheme(request, 1, 0, 0, 0);
    request_set_authority(request, 1, rest, authority_len);
    request_set_path(request, 1, path, path_len);
    outgoing_handle(request, 0, 0, ret);
    if (ret[0] != 0) return -1 - ret[8];
    int32_t future = *(int32_t *)(ret + 8);
    int32_t pollable = future_subscribe(future);
    pollable_block(pollable);
    pollable_drop(pollable);
    future_get(future, ret);
    /* option<result<result<incoming-response, error-code>, ()>>: tags at 0, 8, 16. */
    if (ret[0] != 1 || ret[8] != 0) return -1000;
    if (ret[16] != 0) return -1 - ret[24];
    return incoming_status(*(int32_t *)(ret + 24));
}

static void append_number(char *text, unsigned number) {
    char digits[12];
    int n = 0;
    do {
        digits[n++] = (char)('0' + number % 10);
        number /= 10;
    } while (number);
    text += strlen(text);
    while (n) *text++ = digits[--n];
    *text = '\0';
}

static volatile uint64_t spins;

__attribute__((export_name("wasi:http/incoming-handler@0.2.12#handle")))
void handle(int32_t request, int32_t outparam) {
    request_path(request, ret);
    const char *path = ret[0] ? *(const char **)(ret + 4) : "/";
    size_t len = ret[0] ? *(size_t *)(ret + 8) : 1;
    char text[64];
    if (len == 1 && path[0] == '/') {
        respond(outparam, 200, "hello from bulwark\n");
    } else if (starts_with(path, len, "/sleep/")) {
        char digits[24] = {0};
        memcpy(digits, path + 7, len - 7 < sizeof digits - 1 ? len - 7 : sizeof digits - 1);
        unsigned long ms = strtoul(digits, NULL, 10);
        block_for((uint64_t)ms * 1000000);
        strcpy(text, "slept ");
        strcat(text, digits);
        strcat(text, " ms\n");
        respond(outparam, 200, text);
    } else if (starts_with(path, len, "/loop")) {
        for (;;) spins++;
    } else if (starts_with(path, len, "/grow")) {
        while (__builtin_wasm_memory_grow(0, 16) != (size_t)-1) {
        }
        __builtin_trap();
    } else if (starts_with(path, len, "/trap")) {
        __builtin_trap();
    } else if (starts_with(path, len, "/partial")) {
        int32_t body;
        int32_t stream = respond_head(outparam, 200, &body);
        write_text(stream, "partial\n");
        __builtin_trap();
    } else if (starts_with(path, len, "/big/")) {
        /* KiB of body, in the 4 KiB writes blocking-write-and-flush takes: a client that
         * does not read leaves this handler blocked in the host. */
        static char chunk[4096];
        memset(chunk, 'x', sizeof chunk);
        char digits[24] = {0};
        memcpy(digits, path + 5, len - 5 < sizeof digits - 1 ? len - 5 : sizeof digits - 1);
        unsigned long kib = strtoul(digits, NULL, 10);
        int32_t body;
        int32_t stream = respond_head(outparam, 200, &body);
        for (unsigned long i = 0; i < kib / 4; i++) stream_write(stream, chunk, sizeof chunk, ret);
        stream_drop(stream);
        body_finish(body, 0, 0, ret);
    } else if (starts_with(path, len, "/fetch/")) {
        int status = fetch(path + 7, len - 7);
        if (status >= 0) {
            strcpy(text, "fetched ");
            append_number(text, (unsigned)status);
            strcat(text, "\n");
            respond(outparam, 200, text);
        } else {
            strcpy(text, "error ");
            append_number(text, (unsigned)(-1 - status));
            strcat(text, "\n");
            respond(outparam, 502, text);
        }
    } else {
        respond(outparam, 404, "not found\n");
    }
}
