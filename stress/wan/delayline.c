/* delayline: a userspace internet path between TUN devices in network namespaces.
 *
 * Every peer has one TUN device in its own network namespace. This process opens them all
 * (entering each namespace just long enough to attach), reads the IPv4 packets its peers
 * send, and writes each into the TUN device of the peer that owns the destination address,
 * after the configured path has had its way with it:
 *
 *   read -> flow queue (optional per-flow token bucket, keyed on the 5-tuple)
 *        -> bottleneck (serializes at the path's rate; a byte-limited tail-drop queue before it)
 *        -> delay line (constant one-way delay: a FIFO per directed path)
 *        -> write into the destination peer's TUN device
 *
 * The scheduler (path_enqueue, path_service, path_next_event) is written against an explicit
 * clock and no I/O, so `delayline --selftest` checks rates, order and delays with a fake
 * clock. With --vnet the devices carry virtio-net headers and accept TSO/checksum offload:
 * the kernel hands over TCP segments of up to 64 KiB, which are forwarded unchanged (header
 * included) and charged as the MTU-sized packets they stand for.
 *
 * Usage: delayline [--vnet] [--watch-stdin] --peer NETNS:IFNAME:A.B.C.D ... --path SRC:DST:DELAY_NS:RATE:QLIMIT:FLOWRATE:FLOWQLIMIT ...
 *   RATE and FLOWRATE in bytes per second (0: unlimited / no per-flow cap), QLIMIT and FLOWQLIMIT in
 *   bytes. Prints "READY" once every device is attached; SIGUSR1 prints a JSON line of counters;
 *   SIGTERM/SIGINT print it and exit 0, as does the end of stdin with --watch-stdin (the harness
 *   holds the pipe's other end: if it dies, even by SIGKILL, the delay line ends too).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAX_PEERS 64
#define BUF_SIZE (65536 + sizeof(struct virtio_net_hdr) + 64)
#define FLOW_BUCKETS 256
#define SPIN_NS 20000  /* an event this close is waited for by spinning, not by sleeping */
#define READ_BATCH 64

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* ---------------------------------------------------------------- the scheduler (no I/O) */

struct pkt {
    struct pkt *next;
    int64_t arr;   /* when it was read */
    int64_t due;   /* when the delay line hands it over */
    uint32_t len;  /* bytes in data (virtio-net header included with --vnet) */
    uint32_t wire; /* bytes it stands for on the wire: IP packets of at most the MTU */
    uint8_t data[];
};

struct fifo {
    struct pkt *head, *tail;
    uint32_t count;
};

static void fifo_push(struct fifo *q, struct pkt *p) {
    p->next = NULL;
    if (q->tail)
        q->tail->next = p;
    else
        q->head = p;
    q->tail = p;
    q->count++;
}

static struct pkt *fifo_pop(struct fifo *q) {
    struct pkt *p = q->head;
    if (p) {
        q->head = p->next;
        if (!q->head) q->tail = NULL;
        q->count--;
    }
    return p;
}

struct flow_key { /* compared with memcmp: no implicit padding */
    uint32_t src, dst;
    uint16_t sport, dport;
    uint8_t proto, pad[3];
};

struct flow {
    struct flow_key key;
    struct flow *hnext;            /* hash chain */
    struct flow *prev, *next;      /* ring of backlogged flows */
    struct fifo q;
    int64_t queued;                /* bytes (wire) waiting here */
    int64_t vt;                    /* the bucket's virtual clock: may send when vt <= now */
    int backlogged;
};

struct path {
    int src, dst, configured;
    int64_t delay;                 /* one-way, ns */
    double ns_per_byte;            /* the bottleneck; 0: unlimited */
    double flow_ns_per_byte;       /* per-flow cap; 0: none (one queue for the whole path) */
    int64_t qlimit, flow_qlimit;   /* bytes */
    int64_t queued;                /* bytes waiting in the flow queues */
    int64_t vt;                    /* the bottleneck's virtual clock */
    struct flow *flows[FLOW_BUCKETS];
    struct flow *ring;             /* a backlogged flow: the round-robin cursor */
    int nflows;
    struct fifo line;              /* sent, in flight for `delay` */
    /* counters */
    uint64_t in_pkts, in_bytes, drop_pkts, drop_bytes, out_pkts, out_bytes, write_errors;
    int64_t max_queued, late_max, late_sum, late_over_100us, late_over_1ms;
};

static uint32_t flow_hash(const struct flow_key *k) {
    uint32_t h = k->src * 2654435761u;
    h ^= k->dst + 0x9e3779b9u + (h << 6) + (h >> 2);
    h ^= ((uint32_t)k->sport << 16 | k->dport) + 0x9e3779b9u + (h << 6) + (h >> 2);
    h ^= k->proto;
    return h % FLOW_BUCKETS;
}

static struct flow *flow_get(struct path *p, const struct flow_key *k) {
    uint32_t h = flow_hash(k);
    for (struct flow *f = p->flows[h]; f; f = f->hnext)
        if (!memcmp(&f->key, k, sizeof *k)) return f;
    struct flow *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->key = *k;
    f->vt = INT64_MIN / 2;
    f->hnext = p->flows[h];
    p->flows[h] = f;
    p->nflows++;
    return f;
}

static void ring_add(struct path *p, struct flow *f) {
    f->backlogged = 1;
    if (!p->ring) {
        f->prev = f->next = f;
        p->ring = f;
    } else { /* just before the cursor: last in this round */
        f->next = p->ring;
        f->prev = p->ring->prev;
        f->prev->next = f;
        p->ring->prev = f;
    }
}

static void ring_del(struct path *p, struct flow *f) {
    f->backlogged = 0;
    if (f->next == f) {
        p->ring = NULL;
    } else {
        f->prev->next = f->next;
        f->next->prev = f->prev;
        if (p->ring == f) p->ring = f->next;
    }
    f->prev = f->next = NULL;
}

static int64_t flow_lag(const struct path *p);

/* Frees idle flows whose bucket is full again (they would start afresh anyway). */
static void path_gc(struct path *p, int64_t now) {
    for (int h = 0; h < FLOW_BUCKETS; h++) {
        struct flow **pp = &p->flows[h];
        while (*pp) {
            struct flow *f = *pp;
            if (!f->backlogged && f->vt + flow_lag(p) < now) {
                *pp = f->hnext;
                free(f);
                p->nflows--;
            } else {
                pp = &f->hnext;
            }
        }
    }
}

/* Takes ownership of pk (frees it when dropped). Returns 1 if queued, 0 if dropped. */
static int path_enqueue(struct path *p, struct pkt *pk, const struct flow_key *key) {
    static const struct flow_key whole = {0};
    p->in_pkts++;
    p->in_bytes += pk->wire;
    struct flow *f = flow_get(p, p->flow_ns_per_byte > 0 ? key : &whole);
    int64_t flimit = p->flow_ns_per_byte > 0 ? p->flow_qlimit : p->qlimit;
    /* tail drop; an empty queue takes any one packet so that a segment larger than the limit still passes */
    if (!f || (p->queued > 0 && p->queued + pk->wire > p->qlimit) || (f->queued > 0 && f->queued + pk->wire > flimit)) {
        p->drop_pkts++;
        p->drop_bytes += pk->wire;
        free(pk);
        return 0;
    }
    fifo_push(&f->q, pk);
    f->queued += pk->wire;
    p->queued += pk->wire;
    if (p->queued > p->max_queued) p->max_queued = p->queued;
    if (!f->backlogged) ring_add(p, f);
    return 1;
}

/* How much credit a flow's bucket may hold: 5 ms at its rate, or one 64 KiB segment if more.
 * Waiting for the bottleneck behind other flows, or for a late wake-up, costs a flow nothing
 * up to that much; an idle flow starts with at most that burst. */
static int64_t flow_lag(const struct path *p) {
    int64_t seg = (int64_t)(65536 * p->flow_ns_per_byte);
    return seg > 5000000 ? seg : 5000000;
}

/* When flow f's head packet may leave its bucket: not before it arrived, not before the bucket
 * has the tokens. */
static int64_t flow_eligible(const struct path *p, const struct flow *f, int64_t now) {
    int64_t e = f->q.head->arr;
    if (p->flow_ns_per_byte > 0) e = max64(e, max64(f->vt, now - flow_lag(p)));
    return e;
}

/* Moves every packet the buckets allow by `now` from the flow queues into the delay line. The
 * bottleneck is a serializer on exact times: a packet starts when it is eligible and the one
 * before it has left, so a late wake-up delays the write, never the rate. */
static void path_service(struct path *p, int64_t now) {
    while (p->ring && p->vt <= now) {
        struct flow *f = p->ring, *start = p->ring;
        int64_t e;
        while ((e = flow_eligible(p, f, now)) > now) { /* round robin over the flows allowed to send */
            f = f->next;
            if (f == start) return;
        }
        int64_t s = max64(p->vt, e);
        struct pkt *pk = fifo_pop(&f->q);
        f->queued -= pk->wire;
        p->queued -= pk->wire;
        if (p->flow_ns_per_byte > 0) f->vt = e + (int64_t)(pk->wire * p->flow_ns_per_byte);
        p->vt = s + (int64_t)(pk->wire * p->ns_per_byte); /* its last bit has left (monotonic) */
        pk->due = p->vt + p->delay;                         /* so the delay line stays in order */
        fifo_push(&p->line, pk);
        p->ring = f->next; /* round robin: the next flow goes first next time */
        if (!f->q.head) ring_del(p, f);
    }
}

/* The earliest time at which path_service or the delay line has something to do (INT64_MAX: nothing). */
static int64_t path_next_event(const struct path *p, int64_t now) {
    int64_t t = p->line.head ? p->line.head->due : INT64_MAX;
    if (p->ring) {
        int64_t s = INT64_MAX;
        const struct flow *f = p->ring;
        do {
            int64_t e = flow_eligible(p, f, now);
            if (e < s) s = e;
            f = f->next;
        } while (f != p->ring);
        s = max64(s, p->vt);
        if (s < t) t = s;
    }
    return t;
}

static void path_note_late(struct path *p, int64_t late) {
    if (late < 0) late = 0;
    p->late_sum += late;
    if (late > p->late_max) p->late_max = late;
    if (late > 100000) p->late_over_100us++;
    if (late > 1000000) p->late_over_1ms++;
}

/* ---------------------------------------------------------------- packets */

static int use_vnet, watch_stdin;

/* Fills key and returns the bytes the packet stands for on the wire; -1 if it is not IPv4. */
static int64_t classify(const uint8_t *buf, size_t len, uint32_t *dst, struct flow_key *key) {
    const struct virtio_net_hdr *vh = (const void *)buf;
    size_t off = use_vnet ? sizeof *vh : 0;
    if (len < off + 20) return -1;
    const uint8_t *ip = buf + off;
    size_t iplen = len - off;
    if ((ip[0] >> 4) != 4) return -1;
    size_t ihl = (size_t)(ip[0] & 15) * 4;
    if (ihl < 20 || iplen < ihl) return -1;
    memset(key, 0, sizeof *key);
    memcpy(&key->src, ip + 12, 4);
    memcpy(&key->dst, ip + 16, 4);
    *dst = key->dst;
    key->proto = ip[9];
    size_t hlen = ihl;
    int first_fragment = (be16(ip + 6) & 0x1fff) == 0;
    if ((key->proto == 6 || key->proto == 17) && first_fragment && iplen >= ihl + 4) {
        key->sport = be16(ip + ihl);
        key->dport = be16(ip + ihl + 2);
        if (key->proto == 6 && iplen >= ihl + 20) hlen += (size_t)(ip[ihl + 12] >> 4) * 4;
        else if (key->proto == 17) hlen += 8;
    }
    int64_t wire = (int64_t)iplen; /* (the virtio-net header is in host order: TUNSETVNETLE/BE not used) */
    if (use_vnet && vh->gso_type != VIRTIO_NET_HDR_GSO_NONE && vh->gso_size > 0 && iplen > hlen) {
        int64_t segs = ((int64_t)(iplen - hlen) + vh->gso_size - 1) / vh->gso_size;
        wire += (segs - 1) * (int64_t)hlen; /* every segment carries its own headers */
    }
    return wire;
}

/* ---------------------------------------------------------------- the process */

static struct {
    char netns[256], ifname[IFNAMSIZ];
    uint32_t addr;
    int fd;
} peers[MAX_PEERS];
static int npeers;
static struct path paths[MAX_PEERS][MAX_PEERS];
static volatile sig_atomic_t want_stats, want_exit;

static void on_signal(int sig) {
    if (sig == SIGUSR1) want_stats = 1;
    else want_exit = 1;
}

static void die(const char *what) {
    fprintf(stderr, "delayline: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_ns(const char *name) {
    char path[512];
    snprintf(path, sizeof path, strchr(name, '/') ? "%s" : "/run/netns/%s", name);
    return open(path, O_RDONLY | O_CLOEXEC);
}

/* Creates (or attaches to) the TUN device IFNAME inside network namespace NETNS. */
static int attach_tun(const char *netns, const char *ifname) {
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC), there = open_ns(netns);
    if (home < 0 || there < 0) die(netns);
    if (setns(there, CLONE_NEWNET) < 0) die("setns");
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | (use_vnet ? IFF_VNET_HDR : 0);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    if (use_vnet) {
        int sz = sizeof(struct virtio_net_hdr);
        if (ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0) die("TUNSETVNETHDRSZ");
        if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) < 0) die("TUNSETOFFLOAD");
    }
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0) die("O_NONBLOCK");
    if (setns(home, CLONE_NEWNET) < 0) die("setns back");
    close(home);
    close(there);
    return fd;
}

static void print_stats(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    printf("{\"cpu_s\": %.3f, \"paths\": [", cpu);
    int first = 1;
    for (int i = 0; i < npeers; i++)
        for (int j = 0; j < npeers; j++) {
            struct path *p = &paths[i][j];
            if (!p->configured) continue;
            printf("%s{\"src\": %d, \"dst\": %d, \"in_pkts\": %llu, \"in_bytes\": %llu, \"drop_pkts\": %llu, "
                   "\"drop_bytes\": %llu, \"out_pkts\": %llu, \"out_bytes\": %llu, \"write_errors\": %llu, "
                   "\"max_queued\": %lld, \"late_max_ns\": %lld, \"late_mean_ns\": %lld, \"late_sum_ns\": %lld, "
                   "\"late_over_100us\": %lld, \"late_over_1ms\": %lld, \"flows\": %d}",
                   first ? "" : ", ", i, j, (unsigned long long)p->in_pkts, (unsigned long long)p->in_bytes,
                   (unsigned long long)p->drop_pkts, (unsigned long long)p->drop_bytes,
                   (unsigned long long)p->out_pkts, (unsigned long long)p->out_bytes,
                   (unsigned long long)p->write_errors, (long long)p->max_queued, (long long)p->late_max,
                   (long long)(p->out_pkts ? p->late_sum / (int64_t)p->out_pkts : 0),
                   (long long)p->late_sum,
                   (long long)p->late_over_100us, (long long)p->late_over_1ms, p->nflows);
            first = 0;
        }
    printf("]}\n");
    fflush(stdout);
}

static struct pkt *read_packet(int fd, uint8_t *buf, int *again) {
    ssize_t n = read(fd, buf, BUF_SIZE);
    if (n <= 0) {
        *again = 0;
        if (n < 0 && errno != EAGAIN && errno != EINTR) die("read");
        return NULL;
    }
    struct pkt *pk = malloc(sizeof *pk + (size_t)n);
    if (!pk) die("malloc");
    pk->len = (uint32_t)n;
    pk->arr = now_ns();
    memcpy(pk->data, buf, (size_t)n);
    return pk;
}

static int peer_of(uint32_t addr) {
    for (int i = 0; i < npeers; i++)
        if (peers[i].addr == addr) return i;
    return -1;
}

static void run(void) {
    static uint8_t buf[BUF_SIZE];
    struct pollfd pfd[MAX_PEERS + 1];
    sigset_t blocked, during_poll;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGUSR1);
    sigprocmask(SIG_BLOCK, &blocked, &during_poll); /* signals arrive only inside ppoll: no lost wake-up */
    sigdelset(&during_poll, SIGTERM);
    sigdelset(&during_poll, SIGINT);
    sigdelset(&during_poll, SIGUSR1);
    for (int i = 0; i < npeers; i++) pfd[i] = (struct pollfd){.fd = peers[i].fd, .events = POLLIN};
    pfd[npeers] = (struct pollfd){.fd = watch_stdin ? 0 : -1, .events = POLLIN};
    int64_t next_gc = now_ns() + 1000000000;
    while (!want_exit) {
        int64_t now = now_ns();
        /* hand over what is due, then let the buckets move what they allow */
        for (int i = 0; i < npeers; i++)
            for (int j = 0; j < npeers; j++) {
                struct path *p = &paths[i][j];
                if (!p->configured) continue;
                path_service(p, now);
                while (p->line.head && p->line.head->due <= now) {
                    struct pkt *pk = fifo_pop(&p->line);
                    if (write(peers[j].fd, pk->data, pk->len) != (ssize_t)pk->len) p->write_errors++;
                    path_note_late(p, now_ns() - pk->due);
                    p->out_pkts++;
                    p->out_bytes += pk->wire;
                    free(pk);
                }
            }
        if (now >= next_gc) {
            for (int i = 0; i < npeers; i++)
                for (int j = 0; j < npeers; j++)
                    if (paths[i][j].configured) path_gc(&paths[i][j], now);
            next_gc = now + 1000000000;
        }
        if (want_stats) {
            want_stats = 0;
            print_stats();
        }
        int64_t next = next_gc;
        for (int i = 0; i < npeers; i++)
            for (int j = 0; j < npeers; j++)
                if (paths[i][j].configured) {
                    int64_t t = path_next_event(&paths[i][j], now);
                    if (t < next) next = t;
                }
        int64_t wait = next - now_ns();
        if (wait < SPIN_NS) wait = 0;
        struct timespec ts = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
        int r = ppoll(pfd, (nfds_t)npeers + 1, &ts, &during_poll);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("ppoll");
        }
        if (r == 0) continue;
        if (pfd[npeers].revents) { /* whoever started us is gone (or closed our stdin): so are we */
            char c;
            if (read(0, &c, 1) <= 0) want_exit = 1;
        }
        for (int i = 0; i < npeers; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            int again = 1;
            for (int k = 0; k < READ_BATCH && again; k++) {
                struct pkt *pk = read_packet(peers[i].fd, buf, &again);
                if (!pk) break;
                uint32_t dst;
                struct flow_key key;
                int64_t wire = classify(pk->data, pk->len, &dst, &key);
                int j = wire < 0 ? -1 : peer_of(dst);
                if (j < 0 || !paths[i][j].configured) {
                    free(pk); /* not IPv4, or no path to that address: the link has no such host */
                    continue;
                }
                pk->wire = (uint32_t)wire;
                path_enqueue(&paths[i][j], pk, &key);
            }
        }
    }
}

/* ---------------------------------------------------------------- self test (fake clock) */

static int failures;
#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (!(cond)) {                                       \
            failures++;                                      \
            fprintf(stderr, "selftest FAILED %s: ", #cond);  \
            fprintf(stderr, __VA_ARGS__);                    \
            fputc('\n', stderr);                             \
        }                                                    \
    } while (0)

static struct pkt *fake_pkt(uint32_t wire, uint32_t tag, int64_t now) {
    struct pkt *pk = calloc(1, sizeof *pk + 4);
    pk->len = 4;
    pk->wire = wire;
    pk->arr = now;
    memcpy(pk->data, &tag, 4);
    return pk;
}

/* Offers `rate_in` bytes/s per flow in packets of `size` bytes for `dur` ns, serving the path
 * every `every` ns (a late wake-up each time); fills the bytes each flow got by `dur`. */
static void simulate(struct path *p, int nf, double rate_in, uint32_t size, int64_t dur, int64_t every,
                     uint64_t *got) {
    int64_t step = 10000, gap = (int64_t)(size * 1e9 / rate_in), next_arrival[16] = {0}, last_due = INT64_MIN;
    uint32_t seq[16] = {0}, last_seen[16] = {0};
    for (int f = 0; f < nf; f++) got[f] = 0;
    for (int64_t t = 0; t < dur + p->delay + 100000000; t += step) {
        for (int f = 0; f < nf; f++)
            while (t < dur && next_arrival[f] <= t) {
                struct flow_key k = {.src = 1, .dst = 2, .proto = 6, .sport = (uint16_t)(1000 + f), .dport = 80};
                path_enqueue(p, fake_pkt(size, (uint32_t)f << 24 | ++seq[f], t), &k);
                next_arrival[f] += gap;
            }
        if (t % every) continue;
        path_service(p, t);
        while (p->line.head && p->line.head->due <= t) {
            struct pkt *pk = fifo_pop(&p->line);
            uint32_t tag;
            memcpy(&tag, pk->data, 4);
            int f = (int)(tag >> 24);
            CHECK((tag & 0xffffff) > last_seen[f], "flow %d reordered", f);
            last_seen[f] = tag & 0xffffff;
            CHECK(pk->due >= last_due, "the delay line went back in time");
            CHECK(pk->due >= pk->arr + p->delay, "a packet left before its delay was over");
            last_due = pk->due;
            if (pk->due <= dur) got[f] += pk->wire;
            free(pk);
        }
        if (t % 1000000000 == 0) path_gc(p, t);
    }
}

static struct path *fresh_path(int64_t delay, double rate, int64_t qlimit, double flow_rate, int64_t flow_qlimit) {
    static struct path p;
    memset(&p, 0, sizeof p);
    p.configured = 1;
    p.delay = delay;
    p.ns_per_byte = rate > 0 ? 1e9 / rate : 0;
    p.flow_ns_per_byte = flow_rate > 0 ? 1e9 / flow_rate : 0;
    p.qlimit = qlimit;
    p.flow_qlimit = flow_qlimit;
    p.vt = INT64_MIN / 2;
    return &p;
}

static double total(const uint64_t *got, int nf, double secs, double *lo, double *hi) {
    double sum = 0;
    *lo = 1e18;
    *hi = 0;
    for (int f = 0; f < nf; f++) {
        double r = got[f] / secs;
        sum += r;
        if (r < *lo) *lo = r;
        if (r > *hi) *hi = r;
    }
    return sum;
}

static int selftest(void) {
    uint64_t got[16];
    int64_t sec = 1000000000, us10 = 10000;
    double lo, hi, r;
    /* unlimited: every packet after exactly the delay */
    struct path *p = fresh_path(10000000, 0, 1 << 20, 0, 0);
    struct flow_key k = {0};
    path_enqueue(p, fake_pkt(1500, 1, 3), &k);
    path_service(p, 5);
    CHECK(p->line.head && p->line.head->due == 10000003, "due %lld", (long long)(p->line.head ? p->line.head->due : -1));
    CHECK(path_next_event(p, 5) == 10000003, "next event");
    free(fifo_pop(&p->line));
    for (int late = 0; late < 2; late++) {
        int64_t every = late ? 3000000 : us10; /* served every 10 us, or only every 3 ms */
        /* 100 Mbit/s bottleneck offered 200 Mbit/s: delivers 12.5 MB/s and drops the rest at the queue */
        p = fresh_path(20000000, 12.5e6, 100000, 0, 0);
        simulate(p, 1, 25e6, 1500, 2 * sec, every, got);
        r = got[0] / 2.0;
        printf("served every %lld us: bottleneck %.4f of rate, drops %llu\n", (long long)every / 1000, r / 12.5e6,
               (unsigned long long)p->drop_pkts);
        CHECK(r > 12.5e6 * 0.98 && r < 12.5e6 * 1.005, "bottleneck rate %.0f B/s", r);
        CHECK(p->drop_pkts > 0 && p->max_queued <= 100000, "drops %llu max_queued %lld",
              (unsigned long long)p->drop_pkts, (long long)p->max_queued);
        /* offered below the rate: nothing dropped, delivered as offered */
        p = fresh_path(20000000, 12.5e6, 100000, 0, 0);
        simulate(p, 1, 6e6, 1500, 2 * sec, every, got);
        CHECK(p->drop_pkts == 0 && got[0] / 2.0 > 6e6 * 0.98, "under the rate: drops %llu got %.0f",
              (unsigned long long)p->drop_pkts, got[0] / 2.0);
        /* per-flow cap at 1/8: one flow gets 1/8 of the link, eight get all of it, fairly, also
         * with segments of 16 KiB (eight flows wait 5 ms for a turn at the bottleneck) */
        double link = 25e6;
        p = fresh_path(10000000, link, 400000, link / 8, 50000);
        simulate(p, 1, link, 1500, 2 * sec, every, got);
        r = got[0] / 2.0;
        printf("served every %lld us: one capped flow %.4f of link/8\n", (long long)every / 1000, r / (link / 8));
        CHECK(r > link / 8 * 0.97 && r < link / 8 * 1.01, "one capped flow %.0f B/s", r);
        for (uint32_t size = 1500; size <= 16384; size += 16384 - 1500) {
            p = fresh_path(10000000, link, 400000, link / 8, 50000);
            simulate(p, 8, link / 4, size, 2 * sec, every, got);
            double sum = total(got, 8, 2.0, &lo, &hi);
            printf("served every %lld us, %u-byte packets: eight capped flows %.4f of link (%.0f..%.0f)\n",
                   (long long)every / 1000, size, sum / link, lo, hi);
            CHECK(sum > link * 0.97 && sum < link * 1.005, "eight capped flows %.0f B/s", sum);
            CHECK(lo > hi * 0.95, "eight capped flows unfair: %.0f..%.0f", lo, hi);
            CHECK(p->nflows <= 8, "flows %d", p->nflows);
        }
        /* 16 flows offered under the cap each: the link is shared fairly and stays full */
        p = fresh_path(10000000, link, 800000, link / 8, 50000);
        simulate(p, 16, link / 10, 1500, 2 * sec, every, got);
        CHECK(total(got, 16, 2.0, &lo, &hi) > link * 0.97, "sixteen flows");
        CHECK(lo > hi * 0.95, "sixteen flows unfair: %.0f..%.0f", lo, hi);
        path_gc(p, 100 * sec);
        CHECK(p->nflows == 0, "idle flows not collected: %d", p->nflows);
    }
    if (!failures) printf("selftest ok\n");
    return failures ? 1 : 0;
}

/* ---------------------------------------------------------------- main */

static int parse_addr(const char *s, uint32_t *out) {
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1) return -1;
    *out = a.s_addr;
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--selftest")) return selftest();
        if (!strcmp(argv[i], "--vnet")) {
            use_vnet = 1;
        } else if (!strcmp(argv[i], "--watch-stdin")) {
            watch_stdin = 1;
        } else if (!strcmp(argv[i], "--peer") && i + 1 < argc) {
            char ns[256], ifn[IFNAMSIZ], addr[64];
            if (npeers >= MAX_PEERS || sscanf(argv[++i], "%255[^:]:%15[^:]:%63s", ns, ifn, addr) != 3 ||
                parse_addr(addr, &peers[npeers].addr) < 0) {
                fprintf(stderr, "delayline: bad --peer %s (NETNS:IFNAME:A.B.C.D, at most %d)\n", argv[i], MAX_PEERS);
                return 2;
            }
            snprintf(peers[npeers].netns, sizeof peers[npeers].netns, "%s", ns);
            snprintf(peers[npeers].ifname, sizeof peers[npeers].ifname, "%s", ifn);
            npeers++;
        } else if (!strcmp(argv[i], "--path") && i + 1 < argc) {
            int s, d;
            long long delay, rate, ql, frate, fql;
            if (sscanf(argv[++i], "%d:%d:%lld:%lld:%lld:%lld:%lld", &s, &d, &delay, &rate, &ql, &frate, &fql) != 7 ||
                s < 0 || d < 0 || s >= MAX_PEERS || d >= MAX_PEERS || s == d || delay < 0 || rate < 0 || ql <= 0 ||
                frate < 0 || fql <= 0) {
                fprintf(stderr, "delayline: bad --path %s (SRC:DST:DELAY_NS:RATE:QLIMIT:FLOWRATE:FLOWQLIMIT)\n", argv[i]);
                return 2;
            }
            struct path *p = &paths[s][d];
            p->configured = 1;
            p->src = s;
            p->dst = d;
            p->delay = delay;
            p->ns_per_byte = rate ? 1e9 / (double)rate : 0;
            p->flow_ns_per_byte = frate ? 1e9 / (double)frate : 0;
            p->qlimit = ql;
            p->flow_qlimit = fql;
            p->vt = INT64_MIN / 2;
        } else {
            fprintf(stderr, "delayline: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    for (int i = 0; i < MAX_PEERS; i++)
        for (int j = 0; j < MAX_PEERS; j++)
            if (paths[i][j].configured && (i >= npeers || j >= npeers)) {
                fprintf(stderr, "delayline: --path %d:%d names a peer not given with --peer\n", i, j);
                return 2;
            }
    if (npeers < 2) {
        fprintf(stderr, "delayline: needs at least two --peer\n");
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake-ups on time, not up to 50 us late */
    for (int i = 0; i < npeers; i++) peers[i].fd = attach_tun(peers[i].netns, peers[i].ifname);
    printf("READY\n");
    run();
    print_stats();
    return 0;
}
