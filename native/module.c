/* pccl_py.kernels._native: the Python boundary of the C kernels.
 *
 * Every argument is checked here (buffer protocol, C-contiguity, writability, lengths,
 * dtype and op names, overlap); the kernels themselves trust their inputs. Errors are
 * TypeError (wrong kind of object) or ValueError (right kind, wrong value). The GIL is
 * released around every loop over more than GIL_THRESHOLD bytes (for small buffers the
 * release/re-acquire costs more than the loop, and re-acquiring can wait a whole switch
 * interval behind another thread).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* mremap */
#include <Python.h>
#include <sys/mman.h>

#include "dispatch.h"
#include "io.h"
#include "kernels.h"
#include "seal_type.h"

#define GIL_THRESHOLD 65536

static const char *const DTYPE_NAMES[PCCL_NDTYPES] = {
    [PCCL_F32] = "float32", [PCCL_F64] = "float64", [PCCL_F16] = "float16",
    [PCCL_BF16] = "bfloat16", [PCCL_I8] = "int8", [PCCL_I16] = "int16",
    [PCCL_I32] = "int32", [PCCL_I64] = "int64", [PCCL_U8] = "uint8",
};
static const char *const OP_NAMES[PCCL_NOPS] = {"sum", "prod", "min", "max"};

static int parse_dtype(const char *s, pccl_dtype *out) {
    for (int i = 0; i < PCCL_NDTYPES; i++) {
        if (strcmp(s, DTYPE_NAMES[i]) == 0) { *out = (pccl_dtype)i; return 0; }
    }
    PyErr_Format(PyExc_ValueError,
                 "unknown dtype '%s'; expected one of float32, float64, float16, bfloat16, "
                 "int8, int16, int32, int64, uint8", s);
    return -1;
}

static int parse_op(const char *s, pccl_op *out) {
    for (int i = 0; i < PCCL_NOPS; i++) {
        if (strcmp(s, OP_NAMES[i]) == 0) { *out = (pccl_op)i; return 0; }
    }
    PyErr_Format(PyExc_ValueError, "unknown op '%s'; expected one of sum, prod, min, max "
                 "(avg is sum followed by finish_avg)", s);
    return -1;
}

/* Get a C-contiguous byte view of obj; writable if asked. Returns 0 or -1 with an error. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES | (writable ? PyBUF_WRITABLE : 0)) == 0) {
        if (!PyBuffer_IsContiguous(view, 'C')) {
            PyBuffer_Release(view);
            PyErr_Format(PyExc_ValueError,
                         "%s must be C-contiguous (use a contiguous array or a copy)", name);
            return -1;
        }
        return 0;
    }
    PyErr_Clear();
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES) == 0) {
        PyBuffer_Release(view);
        if (writable) {
            PyErr_Format(PyExc_ValueError, "%s is read-only; it must be a writable buffer", name);
        } else {
            PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
        }
        return -1;
    }
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError,
                 "%s must support the buffer protocol (numpy array, memoryview, bytearray), "
                 "not %.200s", name, Py_TYPE(obj)->tp_name);
    return -1;
}

static int overlaps(const Py_buffer *a, const Py_buffer *b) {
    const char *pa = (const char *)a->buf, *pb = (const char *)b->buf;
    if (a->len == 0 || b->len == 0) return 0;
    return pa < pb + b->len && pb < pa + a->len;
}

static int check_multiple(const Py_buffer *v, size_t itemsize, const char *name, const char *dtype) {
    if ((size_t)v->len % itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, not a multiple of the %s itemsize %zu",
                     name, v->len, dtype, itemsize);
        return -1;
    }
    return 0;
}

static PyObject *py_reduce(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"dst", "src", "op", "dtype", NULL};
    PyObject *dst_obj, *src_obj;
    const char *op_s, *dtype_s;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOss:reduce", kwlist, &dst_obj, &src_obj,
                                     &op_s, &dtype_s))
        return NULL;
    pccl_op op;
    pccl_dtype dt;
    if (parse_op(op_s, &op) < 0 || parse_dtype(dtype_s, &dt) < 0) return NULL;
    Py_buffer d, s;
    if (get_buffer(dst_obj, &d, 1, "dst") < 0) return NULL;
    if (get_buffer(src_obj, &s, 0, "src") < 0) { PyBuffer_Release(&d); return NULL; }
    size_t isz = pccl_itemsize(dt);
    if (d.len != s.len) {
        PyErr_Format(PyExc_ValueError, "dst and src differ in length (%zd vs %zd bytes)", d.len, s.len);
        goto fail;
    }
    if (check_multiple(&d, isz, "dst", dtype_s) < 0) goto fail;
    if (overlaps(&d, &s) && d.buf != s.buf) {
        PyErr_SetString(PyExc_ValueError, "dst and src overlap partially; pass disjoint buffers");
        goto fail;
    }
    size_t n = (size_t)d.len / isz;
    if (d.len >= GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        pccl_reduce(d.buf, s.buf, n, op, dt);
        Py_END_ALLOW_THREADS
    } else {
        pccl_reduce(d.buf, s.buf, n, op, dt);
    }
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    return NULL;
}

static PyObject *py_finish_avg(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"dst", "n", "dtype", NULL};
    PyObject *dst_obj, *n_obj;
    const char *dtype_s;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOs:finish_avg", kwlist, &dst_obj, &n_obj, &dtype_s))
        return NULL;
    if (!PyIndex_Check(n_obj) || PyBool_Check(n_obj)) { /* int, numpy integer; not bool/float */
        PyErr_Format(PyExc_TypeError, "n must be an int, not %.200s", Py_TYPE(n_obj)->tp_name);
        return NULL;
    }
    PyObject *n_int = PyNumber_Index(n_obj);
    if (n_int == NULL) return NULL;
    int overflow = 0;
    long long k = PyLong_AsLongLongAndOverflow(n_int, &overflow);
    Py_DECREF(n_int);
    if (k == -1 && PyErr_Occurred()) return NULL;
    if (overflow || k < 1 || k > 2147483647LL) {
        PyErr_SetString(PyExc_ValueError, "n must be in 1 .. 2**31-1 (the number of contributions)");
        return NULL;
    }
    pccl_dtype dt;
    if (parse_dtype(dtype_s, &dt) < 0) return NULL;
    Py_buffer d;
    if (get_buffer(dst_obj, &d, 1, "dst") < 0) return NULL;
    size_t isz = pccl_itemsize(dt);
    if (check_multiple(&d, isz, "dst", dtype_s) < 0) { PyBuffer_Release(&d); return NULL; }
    size_t n = (size_t)d.len / isz;
    if (d.len >= GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        pccl_finish_avg(d.buf, n, (int64_t)k, dt);
        Py_END_ALLOW_THREADS
    } else {
        pccl_finish_avg(d.buf, n, (int64_t)k, dt);
    }
    PyBuffer_Release(&d);
    Py_RETURN_NONE;
}

typedef void (*quant_fn)(const void *, size_t, uint8_t *, float *, float *);

static PyObject *do_quantize(PyObject *args, PyObject *kwargs, int bits, const char *fname) {
    static char *kwlist[] = {"src", "codes", NULL};
    PyObject *src_obj, *codes_obj;
    char fmt[64];
    snprintf(fmt, sizeof fmt, "OO:%s", fname);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, &src_obj, &codes_obj)) return NULL;
    Py_buffer s, c;
    if (get_buffer(src_obj, &s, 0, "src") < 0) return NULL;
    if (get_buffer(codes_obj, &c, 1, "codes") < 0) { PyBuffer_Release(&s); return NULL; }
    float lo = 0.0f, scale = 0.0f;
    if (check_multiple(&s, 4, "src", "float32") < 0) goto fail;
    size_t n = (size_t)s.len / 4;
    size_t need = bits == 8 ? n : (n + 1) / 2;
    if ((size_t)c.len != need) {
        PyErr_Format(PyExc_ValueError, "codes has %zd bytes; %s of %zu float32 values needs %zu",
                     c.len, fname, n, need);
        goto fail;
    }
    if (overlaps(&s, &c)) {
        PyErr_SetString(PyExc_ValueError, "src and codes overlap; pass disjoint buffers");
        goto fail;
    }
    quant_fn fn = bits == 8 ? pccl_quantize_u8 : pccl_quantize_u4;
    if (s.len >= GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        fn(s.buf, n, (uint8_t *)c.buf, &lo, &scale);
        Py_END_ALLOW_THREADS
    } else {
        fn(s.buf, n, (uint8_t *)c.buf, &lo, &scale);
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&c);
    return Py_BuildValue("(dd)", (double)lo, (double)scale);
fail:
    PyBuffer_Release(&s);
    PyBuffer_Release(&c);
    return NULL;
}

static PyObject *py_quantize_u8(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return do_quantize(args, kwargs, 8, "quantize_u8");
}

static PyObject *py_quantize_u4(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return do_quantize(args, kwargs, 4, "quantize_u4");
}

typedef void (*dequant_fn)(const uint8_t *, float, float, void *, size_t);

static PyObject *do_dequant(PyObject *args, PyObject *kwargs, int bits, dequant_fn fn, const char *fname) {
    static char *kwlist[] = {"codes", "lo", "scale", "dst", NULL};
    PyObject *codes_obj, *dst_obj;
    double lo, scale;
    char fmt[64];
    snprintf(fmt, sizeof fmt, "OddO:%s", fname);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, &codes_obj, &lo, &scale, &dst_obj))
        return NULL;
    Py_buffer c, d;
    if (get_buffer(codes_obj, &c, 0, "codes") < 0) return NULL;
    if (get_buffer(dst_obj, &d, 1, "dst") < 0) { PyBuffer_Release(&c); return NULL; }
    if (check_multiple(&d, 4, "dst", "float32") < 0) goto fail;
    size_t n = (size_t)d.len / 4;
    size_t need = bits == 8 ? n : (n + 1) / 2;
    if ((size_t)c.len != need) {
        PyErr_Format(PyExc_ValueError, "codes has %zd bytes; %s into %zu float32 values needs %zu",
                     c.len, fname, n, need);
        goto fail;
    }
    if (overlaps(&c, &d)) {
        PyErr_SetString(PyExc_ValueError, "codes and dst overlap; pass disjoint buffers");
        goto fail;
    }
    /* lo and scale are float32 values (as quantize returned them); doubles are rounded. */
    float lo_f = (float)lo, scale_f = (float)scale;
    if (d.len >= GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        fn((const uint8_t *)c.buf, lo_f, scale_f, d.buf, n);
        Py_END_ALLOW_THREADS
    } else {
        fn((const uint8_t *)c.buf, lo_f, scale_f, d.buf, n);
    }
    PyBuffer_Release(&c);
    PyBuffer_Release(&d);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&c);
    PyBuffer_Release(&d);
    return NULL;
}

static PyObject *py_dequantize_u8(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return do_dequant(args, kwargs, 8, pccl_dequantize_u8, "dequantize_u8");
}
static PyObject *py_dequantize_u4(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return do_dequant(args, kwargs, 4, pccl_dequantize_u4, "dequantize_u4");
}
static PyObject *py_dequant_add_u8(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return do_dequant(args, kwargs, 8, pccl_dequant_add_u8, "dequant_add_u8");
}
static PyObject *py_dequant_add_u4(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    return do_dequant(args, kwargs, 4, pccl_dequant_add_u4, "dequant_add_u4");
}

static const char *const ISA_NAMES[] = {"generic", "sse2", "avx2"};

static PyObject *py_isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return Py_BuildValue("(ss)", ISA_NAMES[pccl_isa], ISA_NAMES[pccl_isa_max()]);
}

static int isa_from_name(const char *s) {
    for (int i = 0; i < 3; i++) {
        if (strcmp(s, ISA_NAMES[i]) == 0) return i;
    }
    PyErr_Format(PyExc_ValueError, "unknown ISA level '%s'; expected generic, sse2 or avx2", s);
    return -1;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *s;
    if (!PyArg_ParseTuple(args, "s:_set_isa", &s)) return NULL;
    int level = isa_from_name(s);
    if (level < 0) return NULL;
    int prev = pccl_isa;
    pccl_isa_set(level);
    return PyUnicode_FromString(ISA_NAMES[prev]);
}

#define KW (PyCFunction)(void (*)(void))

/* The buffers of copy(dst, src) and copy_stream(dst, src): equal sizes, and apart (or,
 * with ``same_ok``, the very same range). 0, or -1 with an error and nothing held. */
static int copy_buffers(PyObject *args, const char *fmt, Py_buffer *d, Py_buffer *s, int same_ok) {
    PyObject *dst_obj, *src_obj;
    if (!PyArg_ParseTuple(args, fmt, &dst_obj, &src_obj)) return -1;
    if (get_buffer(dst_obj, d, 1, "dst") < 0) return -1;
    if (get_buffer(src_obj, s, 0, "src") < 0) { PyBuffer_Release(d); return -1; }
    if (d->len != s->len) {
        PyErr_Format(PyExc_ValueError, "dst has %zd bytes but src has %zd", d->len, s->len);
    } else if (overlaps(d, s) && !(same_ok && d->buf == s->buf)) {
        PyErr_SetString(PyExc_ValueError, "dst and src overlap");
    } else {
        return 0;
    }
    PyBuffer_Release(d);
    PyBuffer_Release(s);
    return -1;
}

/* copy(dst, src): memcpy with the GIL released for large buffers (numpy's copy may hold it). */
static PyObject *py_copy(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer d, s;
    if (copy_buffers(args, "OO:copy", &d, &s, 1) < 0) return NULL;
    if (d.buf != s.buf) {
        if (d.len >= GIL_THRESHOLD) {
            Py_BEGIN_ALLOW_THREADS
            memcpy(d.buf, s.buf, (size_t)d.len);
            Py_END_ALLOW_THREADS
        } else {
            memcpy(d.buf, s.buf, (size_t)d.len);
        }
    }
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    Py_RETURN_NONE;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
/* memcpy whose stores bypass the cache (SSE2 streaming stores, baseline on x86-64): the
   destination's lines are not read first and do not evict what the cache holds. */
static void stream_copy(char *d, const char *s, size_t n) {
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head; s += head; n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + i, s + i, n - i);
    _mm_sfence();  /* streaming stores are weakly ordered: visible before we return */
}
#else
static void stream_copy(char *d, const char *s, size_t n) { memcpy(d, s, n); }
#endif

/* copy_stream(dst, src): copy() with stores that bypass the cache, for a large result the
   caller's cache would not hold anyway (the trainer's array after an all-reduce). */
static PyObject *py_copy_stream(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer d, s;
    if (copy_buffers(args, "OO:copy_stream", &d, &s, 0) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    stream_copy((char *)d.buf, (const char *)s.buf, (size_t)d.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    Py_RETURN_NONE;
}

/* The 8-byte slot at ``off`` of obj's buffer: 0, or -1 with an error (the view released). */
static int get_slot(PyObject *obj, Py_ssize_t off, Py_buffer *b, int writable) {
    if (get_buffer(obj, b, writable, "buf") < 0) return -1;
    if (off < 0 || off % 8 != 0 || off + 8 > b->len) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not an aligned 8-byte slot of a %zd-byte buffer", off, b->len);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* arrive(buf, offset, ident, rank): set bit ``rank`` of the arrival word at ``offset``,
 * which holds ident (32 bits) << 32 | a 32-bit mask of the ranks that arrived. Atomic across
 * processes that map buf; a full fence first, so everything this thread wrote before is
 * visible to whoever sees the bit. Returns the mask after this arrival, or -1 (nothing
 * written) when the word no longer holds ``ident``: its owner ended that call and may have
 * given the slot to another. Arriving twice is harmless (the mask is returned unchanged). */
static PyObject *py_arrive(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    Py_ssize_t off;
    unsigned long long ident;
    int rank;
    if (!PyArg_ParseTuple(args, "OnKi:arrive", &obj, &off, &ident, &rank)) return NULL;
    if (ident >> 32) {
        PyErr_SetString(PyExc_ValueError, "ident must fit in 32 bits");
        return NULL;
    }
    if (rank < 0 || rank >= 32) {
        PyErr_Format(PyExc_ValueError, "rank %d is outside 0..31", rank);
        return NULL;
    }
    Py_buffer b;
    if (get_slot(obj, off, &b, 1) < 0) return NULL;
    uint64_t *w = (uint64_t *)((char *)b.buf + off);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t v = __atomic_load_n(w, __ATOMIC_ACQUIRE);
    long long result;
    for (;;) {
        if ((v >> 32) != ident) { result = -1; break; }
        uint64_t nv = v | ((uint64_t)1 << rank);
        if (nv == v || __atomic_compare_exchange_n(w, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            result = (long long)(nv & 0xFFFFFFFFu);
            break;
        }  /* v now holds the current word: check it again */
    }
    PyBuffer_Release(&b);
    return PyLong_FromLongLong(result);
}

/* load_u64(buf, offset): an 8-byte little-endian load ordered after every earlier load and
 * store of this thread (a full fence first). Used to check, after reading another process's
 * shared memory, that its owner still guaranteed that memory while we read it. */
static PyObject *py_load_u64(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "On:load_u64", &obj, &off)) return NULL;
    Py_buffer b;
    if (get_slot(obj, off, &b, 0) < 0) return NULL;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t v = __atomic_load_n((const uint64_t *)((const char *)b.buf + off), __ATOMIC_ACQUIRE);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong((unsigned long long)v);
}

/* store_u64(buf, offset, value): an 8-byte store ordered after every earlier load and store. */
static PyObject *py_store_u64(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    Py_ssize_t off;
    unsigned long long v;
    if (!PyArg_ParseTuple(args, "OnK:store_u64", &obj, &off, &v)) return NULL;
    Py_buffer b;
    if (get_slot(obj, off, &b, 1) < 0) return NULL;
    __atomic_store_n((uint64_t *)((char *)b.buf + off), (uint64_t)v, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* Raise for an I/O loop's code: -1 OSError from errno, -2 ConnectionResetError. */
static PyObject *io_error(int rc) {
    if (rc == -2) {
        PyErr_SetString(PyExc_ConnectionResetError, "the peer closed the connection in the middle of a frame");
    } else if (rc == -3) {
        PyErr_SetString(PyExc_RuntimeError, "the frame's seal failed in libcrypto");
    } else {
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return NULL;
}

/* The stop byte of an I/O loop: a writable buffer of at least one byte, or None. */
static int get_stop(PyObject *obj, Py_buffer *v) {
    if (obj == Py_None) return 0;
    if (get_buffer(obj, v, 1, "stop") < 0) return -1;
    if (v->len < 1) {
        PyBuffer_Release(v);
        v->obj = NULL;
        PyErr_SetString(PyExc_ValueError, "stop must be at least one byte");
        return -1;
    }
    return 0;
}

/* recv_fill(fd, buf, pos, timeout_ms, acc=None, other=None, op="sum", dtype="uint8", done=0,
 * stop=None, seal=None) -> (pos, done). With acc and other (each as long as buf): acc (op)=
 * other as bytes arrive. With a seal, each byte is absorbed into the frame's tag first. A
 * nonzero stop[0] makes the loop return before its next system call. */
static PyObject *py_recv_fill(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"fd", "buf", "pos", "timeout_ms", "acc", "other", "op", "dtype", "done", "stop",
                             "seal", NULL};
    int fd, timeout_ms;
    PyObject *buf_obj, *acc_obj = Py_None, *other_obj = Py_None, *stop_obj = Py_None, *seal_obj = Py_None;
    Py_ssize_t pos, done = 0;
    const char *op_s = "sum", *dtype_s = "uint8";
    pccl_seal *seal;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOni|OOssnOO:recv_fill", kwlist, &fd, &buf_obj, &pos,
                                     &timeout_ms, &acc_obj, &other_obj, &op_s, &dtype_s, &done, &stop_obj,
                                     &seal_obj))
        return NULL;
    if (pccl_seal_arg(seal_obj, &seal) < 0) return NULL;
    Py_buffer b, a = {0}, o = {0}, st = {0};
    if (get_buffer(buf_obj, &b, 1, "buf") < 0) return NULL;
    if (get_stop(stop_obj, &st) < 0) { PyBuffer_Release(&b); return NULL; }
    int reducing = acc_obj != Py_None;
    pccl_reduce_job red = {0};
    PyObject *res = NULL;
    if (pos < 0 || pos > b.len || done < 0 || done > pos) {
        PyErr_SetString(PyExc_ValueError, "recv_fill: need 0 <= done <= pos <= len(buf)");
        goto out;
    }
    if (reducing) {
        pccl_op op;
        pccl_dtype dt;
        if (parse_op(op_s, &op) < 0 || parse_dtype(dtype_s, &dt) < 0) goto out;
        if (get_buffer(acc_obj, &a, 1, "acc") < 0) goto out;
        if (get_buffer(other_obj, &o, 0, "other") < 0) goto out;
        size_t isz = pccl_itemsize(dt);
        if (a.len != b.len || o.len != b.len || b.len % (Py_ssize_t)isz || done % (Py_ssize_t)isz) {
            PyErr_SetString(PyExc_ValueError, "recv_fill: acc and other must be as long as buf, whole elements");
            goto out;
        }
        if (overlaps(&a, &o)) {
            PyErr_SetString(PyExc_ValueError, "recv_fill: acc and other overlap");
            goto out;
        }
        red = (pccl_reduce_job){(char *)a.buf, (const char *)o.buf, isz, op, dt, (size_t)done};
    }
    size_t p = (size_t)pos;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pccl_recv_fill(fd, (char *)b.buf, (size_t)b.len, &p, timeout_ms, reducing ? &red : NULL, seal,
                        st.obj ? (const unsigned char *)st.buf : NULL);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        io_error(rc);
        goto out;
    }
    res = Py_BuildValue("nn", (Py_ssize_t)p, reducing ? (Py_ssize_t)red.done : (Py_ssize_t)p);
out:
    PyBuffer_Release(&b);
    if (a.obj) PyBuffer_Release(&a);
    if (o.obj) PyBuffer_Release(&o);
    if (st.obj) PyBuffer_Release(&st);
    return res;
}

/* send_all(fd, header, payload, sent, timeout_ms, stop=None, seal=None) -> sent (bytes of
 * header + payload written, and with a seal the frame's tag after them) */
static PyObject *py_send_all(PyObject *self, PyObject *args) {
    (void)self;
    int fd, timeout_ms;
    PyObject *h_obj, *p_obj, *stop_obj = Py_None, *seal_obj = Py_None;
    Py_ssize_t sent;
    pccl_seal *seal;
    if (!PyArg_ParseTuple(args, "iOOni|OO:send_all", &fd, &h_obj, &p_obj, &sent, &timeout_ms, &stop_obj, &seal_obj))
        return NULL;
    if (pccl_seal_arg(seal_obj, &seal) < 0) return NULL;
    Py_buffer h, p, st = {0};
    if (get_buffer(h_obj, &h, 0, "header") < 0) return NULL;
    if (get_buffer(p_obj, &p, 0, "payload") < 0) { PyBuffer_Release(&h); return NULL; }
    if (get_stop(stop_obj, &st) < 0) { PyBuffer_Release(&h); PyBuffer_Release(&p); return NULL; }
    PyObject *res = NULL;
    if (sent < 0 || sent > h.len + p.len + (seal ? PCCL_SEAL_TAG : 0)) {
        PyErr_SetString(PyExc_ValueError, "send_all: sent out of range");
    } else {
        size_t s = (size_t)sent;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pccl_send_all(fd, (const char *)h.buf, (size_t)h.len, (const char *)p.buf, (size_t)p.len, &s,
                           timeout_ms, seal, st.obj ? (const unsigned char *)st.buf : NULL);
        Py_END_ALLOW_THREADS
        res = rc < 0 ? io_error(rc) : PyLong_FromSsize_t((Py_ssize_t)s);
    }
    PyBuffer_Release(&h);
    PyBuffer_Release(&p);
    if (st.obj) PyBuffer_Release(&st);
    return res;
}

/* remap(src, dst, size): move the pages mapped at address src to address dst (both
 * page-aligned mappings of `size` bytes made by this process); what was mapped at dst is
 * replaced in one step, and src is left unmapped. The client's double buffer (client.py). */
static PyObject *py_remap(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long src, dst;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "KKn:remap", &src, &dst, &size)) return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (size <= 0 || src % (unsigned long long)page || dst % (unsigned long long)page) {
        PyErr_SetString(PyExc_ValueError, "remap: page-aligned addresses and a positive size");
        return NULL;
    }
    void *r = mremap((void *)(uintptr_t)src, (size_t)size, (size_t)size, MREMAP_MAYMOVE | MREMAP_FIXED,
                     (void *)(uintptr_t)dst);
    if (r == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* map_at(addr, size, fd): map `size` bytes of the file fd, shared and writable, at addr
 * (page-aligned), replacing whatever this process had mapped there. */
static PyObject *py_map_at(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long addr;
    Py_ssize_t size;
    int fd;
    if (!PyArg_ParseTuple(args, "Kni:map_at", &addr, &size, &fd)) return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (size <= 0 || addr % (unsigned long long)page) {
        PyErr_SetString(PyExc_ValueError, "map_at: a page-aligned address and a positive size");
        return NULL;
    }
    void *r = mmap((void *)(uintptr_t)addr, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    if (r == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"remap", py_remap, METH_VARARGS,
     "remap(src, dst, size) -> None\n\nMove the pages mapped at src to dst (mremap, fixed); src is left "
     "unmapped."},
    {"map_at", py_map_at, METH_VARARGS,
     "map_at(addr, size, fd) -> None\n\nMap size bytes of file fd (shared, writable) at addr, replacing "
     "what was there."},
    {"recv_fill", KW py_recv_fill, METH_VARARGS | METH_KEYWORDS,
     "recv_fill(fd, buf, pos, timeout_ms, acc=None, other=None, op='sum', dtype='uint8', done=0, stop=None, "
     "seal=None) "
     "-> (pos, done)"
     "\n\nFill buf[pos:] from a non-blocking socket with the GIL released, waiting at most timeout_ms per "
     "poll; with acc/other, acc (op)= other over the bytes received. Returns early on a poll timeout."},
    {"send_all", py_send_all, METH_VARARGS,
     "send_all(fd, header, payload, sent, timeout_ms, stop=None, seal=None) -> sent\n\nWrite header then payload "
     "(then, with a seal, the frame's tag) from byte `sent` on, GIL released; returns early on a poll timeout."},
    {"reduce", KW py_reduce, METH_VARARGS | METH_KEYWORDS,
     "reduce(dst, src, op, dtype) -> None\n\ndst = dst (op) src elementwise; op in sum|prod|min|max."},
    {"finish_avg", KW py_finish_avg, METH_VARARGS | METH_KEYWORDS,
     "finish_avg(dst, n, dtype) -> None\n\ndst = dst / n (integers truncate toward zero)."},
    {"quantize_u8", KW py_quantize_u8, METH_VARARGS | METH_KEYWORDS,
     "quantize_u8(src_f32, codes_u8) -> (lo, scale)\n\nMin-max affine quantization, one code per byte."},
    {"quantize_u4", KW py_quantize_u4, METH_VARARGS | METH_KEYWORDS,
     "quantize_u4(src_f32, codes_u8) -> (lo, scale)\n\nTwo 4-bit codes per byte, low nibble first."},
    {"dequantize_u8", KW py_dequantize_u8, METH_VARARGS | METH_KEYWORDS,
     "dequantize_u8(codes, lo, scale, dst_f32) -> None\n\ndst = codes * scale + lo."},
    {"dequantize_u4", KW py_dequantize_u4, METH_VARARGS | METH_KEYWORDS,
     "dequantize_u4(codes, lo, scale, dst_f32) -> None\n\ndst = codes * scale + lo."},
    {"dequant_add_u8", KW py_dequant_add_u8, METH_VARARGS | METH_KEYWORDS,
     "dequant_add_u8(codes, lo, scale, dst_f32) -> None\n\ndst += codes * scale + lo (fused)."},
    {"dequant_add_u4", KW py_dequant_add_u4, METH_VARARGS | METH_KEYWORDS,
     "dequant_add_u4(codes, lo, scale, dst_f32) -> None\n\ndst += codes * scale + lo (fused)."},
    {"copy", py_copy, METH_VARARGS,
     "copy(dst, src) -> None\n\nmemcpy of equal-sized buffers, GIL released for large ones."},
    {"copy_stream", py_copy_stream, METH_VARARGS,
     "copy_stream(dst, src) -> None\n\nCopy of equal-sized, disjoint buffers whose stores bypass the cache "
     "(x86-64; memcpy elsewhere), GIL released."},
    {"arrive", py_arrive, METH_VARARGS,
     "arrive(buf, offset, ident, rank) -> int\n\nAtomically set bit rank of the word ident << 32 | mask; "
     "the new mask, or -1 when the word holds another ident."},
    {"load_u64", py_load_u64, METH_VARARGS,
     "load_u64(buf, offset) -> int\n\nFenced 8-byte load (ordered after all earlier memory accesses)."},
    {"store_u64", py_store_u64, METH_VARARGS,
     "store_u64(buf, offset, value) -> None\n\nFenced 8-byte store (ordered after all earlier accesses)."},
    {"_isa", py_isa, METH_NOARGS,
     "_isa() -> (in_use, best): instruction-set level of the kernels (same bits at every level)."},
    {"_set_isa", py_set_isa, METH_VARARGS,
     "_set_isa(level) -> previous: 'generic', 'sse2' or 'avx2' (clamped to what the CPU has). "
     "For tests and benchmarks; not thread-safe against running kernels."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "pccl_py.kernels._native",
    "C kernels of pccl_py: reductions, avg finish, min-max quantization (GIL released).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    /* PCCL_NATIVE_ISA=generic|sse2|avx2 caps the level (debugging); default: the best. */
    const char *env = getenv("PCCL_NATIVE_ISA");
    int level = PCCL_ISA_AVX2;
    if (env != NULL && *env != '\0') {
        level = isa_from_name(env);
        if (level < 0) { Py_DECREF(m); return NULL; }
    }
    pccl_isa_set(level);
    if (pccl_add_seal_type(m) < 0) { Py_DECREF(m); return NULL; }
    PyObject *names = PyTuple_New(PCCL_NDTYPES);
    if (names == NULL) { Py_DECREF(m); return NULL; }
    for (int i = 0; i < PCCL_NDTYPES; i++) {
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(DTYPE_NAMES[i]));
    }
    if (PyModule_AddObject(m, "DTYPES", names) < 0) { Py_DECREF(names); Py_DECREF(m); return NULL; }
    PyObject *ops = Py_BuildValue("(ssss)", "sum", "prod", "min", "max");
    if (ops == NULL || PyModule_AddObject(m, "OPS", ops) < 0) { Py_XDECREF(ops); Py_DECREF(m); return NULL; }
    return m;
}
