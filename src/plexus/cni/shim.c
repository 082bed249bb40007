/*
 * plexus's compiled CNI shim: the fast path of src/plexus/cni/shim.py.
 *
 * A runtime executes the plugin for every verb, and a Python interpreter alone takes ~7 ms to
 * start, half of an ADD. This program starts in ~1 ms and only copies bytes: it sends the CNI_*
 * environment and the raw stdin to the agent (POST /v1/cni, the endpoint the Python shim uses
 * too), where plexus.cni.validate runs, and writes the agent's answer to stdout with the exit
 * code the agent chose.
 * It answers two things itself, because the agent cannot: VERSION, and "the agent is not
 * reachable" (code 11, or 50 for STATUS). Wherever it is unsure, it errs on the side of the
 * protocol: every failure is a CNI error JSON on stdout and a non-zero exit.
 *
 * The socket path comes from the config's "socket" (the "ipam" block's for plexus-ipam), then
 * $PLEXUS_SOCKET, then /run/plexus/plexus.sock, as in the Python shim.
 *
 * The spec's versions are not written here: plexus.cni.install compiles this file with
 * -DPLEXUS_CNI_VERSIONS='"0.3.0", ...' and -DPLEXUS_CNI_SOCKET from plexus/cni/spec.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#if !defined(PLEXUS_CNI_VERSIONS) || !defined(PLEXUS_CNI_SOCKET)
#error "build with python -m plexus.cni.install (it defines the spec's versions)"
#endif
#define DEFAULT_SOCKET PLEXUS_CNI_SOCKET
static const char *known[] = {PLEXUS_CNI_VERSIONS};
#define NKNOWN (sizeof known / sizeof *known)

extern char **environ;

struct buf { char *data; size_t len, cap; };

static void put(struct buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->data = realloc(b->data, b->cap);
        if (!b->data) { perror("plexus"); exit(1); }
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* A JSON string literal of s (RFC 8259 escapes for ", \ and control characters). */
static void put_json_string(struct buf *b, const char *s, size_t n) {
    char esc[8];
    put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; put(b, esc, 2); }
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); put(b, esc, 6); }
        else put(b, (const char *)&s[i], 1);
    }
    put(b, "\"", 1);
}

static int read_all(int fd, struct buf *b) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0) return 0;
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        put(b, chunk, (size_t)n);
    }
}

/* The string value of key at the given object depth of a JSON document (depth 1: top level;
 * depth 2: inside the top-level object named `parent`). Copies at most cap-1 bytes, without
 * unescaping (socket paths and versions have no escapes). Returns 1 if found. */
static int json_lookup(const char *s, const char *parent, const char *key, char *out, size_t cap) {
    int depth = 0;
    char lastkey[64] = "", top[64] = "";
    for (const char *p = s; *p; p++) {
        if (*p == '{' || *p == '[') { if (*p == '{' && depth == 1) strcpy(top, lastkey); depth++; }
        else if (*p == '}' || *p == ']') depth--;
        else if (*p == '"') {
            const char *start = ++p;
            while (*p && *p != '"') { if (*p == '\\' && p[1]) p++; p++; }
            if (!*p) return 0;
            size_t n = (size_t)(p - start);
            const char *q = p + 1;
            while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r') q++;
            if (*q == ':') {  /* a key */
                size_t k = n < sizeof lastkey - 1 ? n : sizeof lastkey - 1;
                memcpy(lastkey, start, k); lastkey[k] = 0;
                continue;
            }
            /* a value: is it the one we want? */
            int want_depth = parent ? 2 : 1;
            if (depth == want_depth && strcmp(lastkey, key) == 0
                && (!parent || strcmp(top, parent) == 0)) {
                size_t k = n < cap - 1 ? n : cap - 1;
                memcpy(out, start, k); out[k] = 0;
                return 1;
            }
        }
    }
    return 0;
}

/* Structurally a JSON object: one {...} with balanced brackets and closed strings. The agent
 * parses it for real; this only lets the shim answer code 6 for garbage by itself, since it
 * cannot find the agent's socket in a config it cannot read. */
static int looks_like_object(const char *s, size_t n) {
    while (n && (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')) { s++; n--; }
    while (n && (s[n-1] == ' ' || s[n-1] == '\t' || s[n-1] == '\n' || s[n-1] == '\r')) n--;
    if (n < 2 || s[0] != '{' || s[n-1] != '}') return 0;
    int depth = 0, in_string = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') in_string = 0;
        } else if (c == '"') in_string = 1;
        else if (c == '{' || c == '[') depth++;
        else if (c == '}' || c == ']') { if (--depth < 0) return 0; if (depth == 0 && i != n-1) return 0; }
    }
    return depth == 0 && !in_string;
}

static void fail(const char *version, int code, const char *msg, const char *details) {
    struct buf b = {0};
    puts_(&b, "{\"cniVersion\": ");
    put_json_string(&b, version, strlen(version));
    char num[32];
    snprintf(num, sizeof num, ", \"code\": %d, \"msg\": ", code);
    puts_(&b, num);
    put_json_string(&b, msg, strlen(msg));
    if (details && *details) { puts_(&b, ", \"details\": "); put_json_string(&b, details, strlen(details)); }
    puts_(&b, "}");
    fwrite(b.data, 1, b.len, stdout);
    fflush(stdout);
    fprintf(stderr, "plexus: %s%s%s%s\n", msg, details && *details ? " (" : "",
            details ? details : "", details && *details ? ")" : "");
    _exit(1);
}

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) { close(fd); errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno; close(fd); errno = e; return -1;
    }
    struct timeval tv = {.tv_sec = 120};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

int main(int argc, char **argv) {
    (void)argc;
    const char *command = getenv("CNI_COMMAND");
    struct buf in = {0};
    char version[32];
    snprintf(version, sizeof version, "%s", known[NKNOWN - 1]);
    if (!command || !*command) {
        fprintf(stderr, "plexus CNI plugin, CNI spec versions");
        for (size_t i = 0; i < NKNOWN; i++) fprintf(stderr, "%s %s", i ? "," : "", known[i]);
        fprintf(stderr, "\n");
        return 0;
    }
    if (read_all(0, &in) < 0) fail(version, 5, "cannot read stdin", strerror(errno));
    if (!in.data) put(&in, "", 0);
    json_lookup(in.data, NULL, "cniVersion", version, sizeof version);
    if (strcmp(command, "VERSION") == 0) {
        const char *answer = known[NKNOWN - 1];
        for (size_t i = 0; i < NKNOWN; i++)
            if (strcmp(version, known[i]) == 0) answer = known[i];
        printf("{\"cniVersion\": \"%s\", \"supportedVersions\": [", answer);
        for (size_t i = 0; i < NKNOWN; i++) printf("%s\"%s\"", i ? ", " : "", known[i]);
        printf("]}");
        return 0;
    }

    if (!looks_like_object(in.data, in.len))
        fail(version, 6, "failed to decode network configuration: not a JSON object", NULL);

    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    size_t blen = strlen(base);
    int ipam_mode = blen >= 5 && strcmp(base + blen - 5, "-ipam") == 0;
    char path[108] = "";
    if (!json_lookup(in.data, ipam_mode ? "ipam" : NULL, "socket", path, sizeof path)) {
        const char *env = getenv("PLEXUS_SOCKET");
        snprintf(path, sizeof path, "%s", env && *env ? env : DEFAULT_SOCKET);
    }

    struct buf body = {0};
    puts_(&body, "{\"argv0\": ");
    put_json_string(&body, argv[0], strlen(argv[0]));
    puts_(&body, ", \"env\": {");
    int first = 1;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "CNI_", 4) != 0 && strncmp(*e, "PLEXUS_SOCKET=", 14) != 0) continue;
        const char *eq = strchr(*e, '=');
        if (!eq) continue;
        if (!first) puts_(&body, ", ");
        first = 0;
        put_json_string(&body, *e, (size_t)(eq - *e));
        puts_(&body, ": ");
        put_json_string(&body, eq + 1, strlen(eq + 1));
    }
    puts_(&body, "}, \"stdin\": ");
    put_json_string(&body, in.data, in.len);
    puts_(&body, "}");

    int fd = connect_unix(path);
    if (fd < 0) {
        char msg[256], details[256];
        snprintf(msg, sizeof msg, "the plexus agent is not reachable at %s", path);
        snprintf(details, sizeof details, "%s; is `plexus agent` running?", strerror(errno));
        fail(version, strcmp(command, "STATUS") == 0 ? 50 : 11, msg, details);
    }
    struct buf req = {0};
    char head[256];
    snprintf(head, sizeof head, "POST /v1/cni HTTP/1.0\r\nHost: plexus\r\n"
             "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n", body.len);
    puts_(&req, head);
    put(&req, body.data, body.len);
    for (size_t off = 0; off < req.len;) {
        ssize_t n = write(fd, req.data + off, req.len - off);
        if (n < 0) { if (errno == EINTR) continue; fail(version, 999, "writing to the agent failed", strerror(errno)); }
        off += (size_t)n;
    }
    struct buf resp = {0};
    if (read_all(fd, &resp) < 0 || !resp.data)
        fail(version, 999, "reading the agent's answer failed", strerror(errno));
    close(fd);

    char *end = strstr(resp.data, "\r\n\r\n");
    if (!end) fail(version, 999, "the agent's answer is not HTTP", NULL);
    *end = 0;
    char *payload = end + 4;
    size_t plen = resp.len - (size_t)(payload - resp.data);
    int status = 0;
    sscanf(resp.data, "HTTP/%*s %d", &status);
    char *exit_hdr = strcasestr(resp.data, "\r\nX-CNI-Exit:");
    if (status != 200 || !exit_hdr) {
        char details[64];
        snprintf(details, sizeof details, "HTTP status %d", status);
        fail(version, status == 503 ? 11 : 999, "the plexus agent refused the request", details);
    }
    int code = atoi(exit_hdr + 13);
    char *log = strcasestr(resp.data, "\r\nX-CNI-Log:");
    fwrite(payload, 1, plen, stdout);
    fflush(stdout);
    if (log) {
        log += 12;
        while (*log == ' ') log++;
        char *eol = strstr(log, "\r\n");
        fprintf(stderr, "plexus: %.*s\n", eol ? (int)(eol - log) : (int)strlen(log), log);
    }
    _exit(code);
}
