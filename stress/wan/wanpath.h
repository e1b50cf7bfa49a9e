/* wanpath.h: one directed path of the delay line, as a scheduler with no I/O.
 *
 * Packets enter a path with path_enqueue (a flow queue; tail drop past the limits), leave
 * the flow queues and the bottleneck with path_service(now) into a FIFO of packets in
 * flight, each with the time it is due at the far end; path_next_event(now) says when
 * anything next happens. Every function takes the clock as an argument, so wanpath_test.c
 * drives it with a fake one. Times in nanoseconds, sizes in bytes.
 */
#ifndef WANPATH_H
#define WANPATH_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FLOW_BUCKETS 256

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

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

#endif
