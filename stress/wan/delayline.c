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
 * The scheduler of a path (wanpath.h) has no I/O in it; wanpath_test.c checks it on a fake
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

#include "wanpath.h"

#define MAX_PEERS 64
#define BUF_SIZE (65536 + sizeof(struct virtio_net_hdr) + 64)
#define SPIN_NS 20000  /* an event this close is waited for by spinning, not by sleeping */
#define READ_BATCH 64

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* How late packets leave the delay line (its timing accuracy). */
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
