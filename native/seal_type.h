/* The Seal type of pccl_py.kernels._native (seal_type.c). */
#ifndef PCCL_SEAL_TYPE_H
#define PCCL_SEAL_TYPE_H

#include <Python.h>

#include "seal.h"

/* adds Seal and SEAL_UNAVAILABLE (None, or why libcrypto could not be loaded) to m */
int pccl_add_seal_type(PyObject *m);
/* None -> NULL; a Seal -> its pccl_seal; else TypeError and -1 */
int pccl_seal_arg(PyObject *obj, pccl_seal **out);

#endif
