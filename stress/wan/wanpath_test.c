/* wanpath_test: the path scheduler (wanpath.h) on a fake clock: rates, drops, the per-flow
 * cap, fairness, per-flow order and the delay, served on time and 3 ms late. Exit 0 if all
 * hold; prints the measured shares. */
#include <stdio.h>

#include "wanpath.h"

static int failures;
#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (!(cond)) {                                       \
            failures++;                                      \
            fprintf(stderr, "wanpath_test FAILED %s: ", #cond);  \
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

static int run_all(void) {
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
    if (!failures) printf("wanpath_test ok\n");
    return failures ? 1 : 0;
}

int main(void) { return run_all(); }
