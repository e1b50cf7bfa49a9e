/* pccl_py.kernels._native.Seal: the Python face of one direction's frame seal (seal.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "seal_type.h"

#define GIL_THRESHOLD 65536

typedef struct {
    PyObject_HEAD
    pccl_seal *seal;
    int sending;
} SealObject;

static PyTypeObject SealType;

static int seal_init(SealObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"key", "sending", "encrypting", NULL};
    Py_buffer key;
    int sending, encrypting = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*p|p:Seal", kwlist, &key, &sending, &encrypting)) return -1;
    int ok = key.len == PCCL_SEAL_KEY;
    if (ok && self->seal == NULL) {
        self->seal = pccl_seal_new((const unsigned char *)key.buf, sending, encrypting);
        self->sending = sending;
    }
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "Seal: the key must be %d bytes", PCCL_SEAL_KEY);
        return -1;
    }
    if (self->seal == NULL) {
        const char *why = pccl_seal_error();
        PyErr_Format(PyExc_RuntimeError, "Seal: %s", why ? why : "libcrypto refused the key");
        return -1;
    }
    return 0;
}

static void seal_dealloc(SealObject *self) {
    pccl_seal_free(self->seal);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *fail(const char *what) {
    PyErr_Format(PyExc_RuntimeError, "Seal.%s: out of order or libcrypto failed", what);
    return NULL;
}

static PyObject *seal_begin(SealObject *self, PyObject *arg) {
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned char iv[PCCL_SEAL_IV] = {0};
    for (int i = 0; i < 8; i++) iv[i] = (unsigned char)(seq >> (8 * i));
    if (pccl_seal_begin(self->seal, iv) < 0) return fail("begin");
    Py_RETURN_NONE;
}

static PyObject *seal_absorb(SealObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    int rc;
    if (b.len >= GIL_THRESHOLD) {
        Py_BEGIN_ALLOW_THREADS
        rc = pccl_seal_absorb(self->seal, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else {
        rc = pccl_seal_absorb(self->seal, b.buf, (size_t)b.len);
    }
    PyBuffer_Release(&b);
    if (rc < 0) return fail("absorb");
    Py_RETURN_NONE;
}

/* crypt(data, out=None): payload bytes encrypted (sending) or decrypted; into `out` (as
 * long as data; may be data itself), else returned as new bytes */
static PyObject *seal_crypt(SealObject *self, PyObject *args) {
    PyObject *data_obj, *out_obj = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:crypt", &data_obj, &out_obj)) return NULL;
    Py_buffer in, out = {0};
    if (PyObject_GetBuffer(data_obj, &in, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *res = NULL;
    unsigned char *dst;
    if (out_obj == Py_None) {
        res = PyBytes_FromStringAndSize(NULL, in.len);
        if (res == NULL) goto done;
        dst = (unsigned char *)PyBytes_AS_STRING(res);
    } else {
        if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE) < 0) goto done;
        if (out.len != in.len) {
            PyErr_SetString(PyExc_ValueError, "Seal.crypt: out must be as long as data");
            goto done;
        }
        dst = out.buf;
        res = Py_NewRef(Py_None);
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pccl_seal_crypt(self->seal, in.buf, dst, (size_t)in.len);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(res);
        fail("crypt");
    }
done:
    PyBuffer_Release(&in);
    if (out.obj) PyBuffer_Release(&out);
    return res;
}

static PyObject *seal_encrypting(SealObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(pccl_seal_encrypting(self->seal));
}

static PyGetSetDef seal_getset[] = {
    {"encrypting", (getter)seal_encrypting, NULL, "whether payload bytes go through crypt()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *seal_tag(SealObject *self, PyObject *unused) {
    (void)unused;
    unsigned char tag[PCCL_SEAL_TAG];
    if (pccl_seal_tag(self->seal, tag) < 0) return fail("tag");
    return PyBytes_FromStringAndSize((const char *)tag, PCCL_SEAL_TAG);
}

static PyObject *seal_check(SealObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    int rc = -2;
    if (b.len == PCCL_SEAL_TAG) rc = pccl_seal_check(self->seal, (const unsigned char *)b.buf);
    PyBuffer_Release(&b);
    if (rc == -2) {
        PyErr_Format(PyExc_ValueError, "Seal.check: a tag is %d bytes", PCCL_SEAL_TAG);
        return NULL;
    }
    if (rc < 0) return fail("check");
    return PyBool_FromLong(rc);
}

static PyMethodDef seal_methods[] = {
    {"begin", (PyCFunction)seal_begin, METH_O, "begin(seq) -> None: a new frame, IV = seq (8 bytes LE) + 4 zero bytes."},
    {"absorb", (PyCFunction)seal_absorb, METH_O, "absorb(buffer) -> None: the frame's next bytes."},
    {"crypt", (PyCFunction)seal_crypt, METH_VARARGS,
     "crypt(data, out=None) -> bytes | None: payload bytes encrypted or decrypted (an encrypting seal)."},
    {"tag", (PyCFunction)seal_tag, METH_NOARGS, "tag() -> bytes: the frame's 16-byte tag (sending side)."},
    {"check", (PyCFunction)seal_check, METH_O, "check(tag) -> bool: the tag matches (receiving side)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SealType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pccl_py.kernels._native.Seal",
    .tp_basicsize = sizeof(SealObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Seal(key, sending, encrypting=False): AES-256-GCM tags (a GMAC over header and payload, or "
              "with encrypting the payload encrypted) of one direction of one connection, from the "
              "system's libcrypto.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)seal_init,
    .tp_dealloc = (destructor)seal_dealloc,
    .tp_methods = seal_methods,
    .tp_getset = seal_getset,
};

int pccl_add_seal_type(PyObject *m) {
    if (PyType_Ready(&SealType) < 0) return -1;
    Py_INCREF(&SealType);
    if (PyModule_AddObject(m, "Seal", (PyObject *)&SealType) < 0) {
        Py_DECREF(&SealType);
        return -1;
    }
    const char *why = pccl_seal_error();
    PyObject *v = why ? PyUnicode_FromString(why) : Py_NewRef(Py_None);
    if (v == NULL || PyModule_AddObject(m, "SEAL_UNAVAILABLE", v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    return 0;
}

int pccl_seal_arg(PyObject *obj, pccl_seal **out) {
    if (obj == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyObject_TypeCheck(obj, &SealType) || ((SealObject *)obj)->seal == NULL) {
        PyErr_SetString(PyExc_TypeError, "seal must be a Seal or None");
        return -1;
    }
    *out = ((SealObject *)obj)->seal;
    return 0;
}
