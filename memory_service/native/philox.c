/* memory_service.native._philox: Philox4x64-10 (Salmon et al., 2011) over a batch of counters,
 * bit for bit the numpy vectorisation in memory_service/rows.py (its reference, which the tests
 * compare with, and numpy.random.Philox's). numpy spends a small request's time in its per-call
 * overhead (~40 array operations per pass whatever the length): a fetch of a few never-written rows
 * paid ~0.2 ms for them. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static const uint64_t M0 = 0xD2E7470EE14C6C93ULL, M1 = 0xCA5A826395121157ULL;
static const uint64_t W0 = 0x9E3779B97F4A7C15ULL, W1 = 0xBB67AE8584CAA73BULL;

static inline void block(uint64_t c[4], uint64_t k0, uint64_t k1) {
    for (int r = 0; r < 10; r++) {
        if (r) { k0 += W0; k1 += W1; }
        __uint128_t p0 = (__uint128_t)M0 * c[0], p1 = (__uint128_t)M1 * c[2];
        uint64_t hi0 = (uint64_t)(p0 >> 64), lo0 = (uint64_t)p0, hi1 = (uint64_t)(p1 >> 64), lo1 = (uint64_t)p1;
        uint64_t x1 = c[1], x3 = c[3];
        c[0] = hi1 ^ x1 ^ k0; c[1] = lo1; c[2] = hi0 ^ x3 ^ k1; c[3] = lo0;
    }
}

/* philox(counter, key0, key1, out): counter and out (n, 4) uint64 (C order), key0 and key1 (n,)
 * or (1,) uint64 (one key for every counter). */
static PyObject *philox(PyObject *self, PyObject *args) {
    PyObject *o[4];
    if (!PyArg_ParseTuple(args, "OOOO", &o[0], &o[1], &o[2], &o[3])) return NULL;
    Py_buffer b[4];
    int flags[4] = {PyBUF_C_CONTIGUOUS, PyBUF_C_CONTIGUOUS, PyBUF_C_CONTIGUOUS, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE};
    int k = 0;
    for (; k < 4; k++) if (PyObject_GetBuffer(o[k], &b[k], flags[k]) < 0) break;
    if (k < 4) { while (k--) PyBuffer_Release(&b[k]); return NULL; }
    Py_ssize_t n = b[0].len / 32, nk0 = b[1].len / 8, nk1 = b[2].len / 8;
    int ok = b[3].len == b[0].len && b[0].len % 32 == 0 && (nk0 == n || nk0 == 1) && nk1 == nk0;
    if (ok) {
        const uint64_t *in = b[0].buf, *key0 = b[1].buf, *key1 = b[2].buf;
        uint64_t *out = b[3].buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t c[4] = {in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]};
            block(c, key0[nk0 == 1 ? 0 : i], key1[nk0 == 1 ? 0 : i]);
            out[4 * i] = c[0]; out[4 * i + 1] = c[1]; out[4 * i + 2] = c[2]; out[4 * i + 3] = c[3];
        }
        Py_END_ALLOW_THREADS
    }
    for (k = 0; k < 4; k++) PyBuffer_Release(&b[k]);
    if (!ok) { PyErr_SetString(PyExc_ValueError, "philox: counter/out (n, 4) and keys (n,) or (1,) uint64"); return NULL; }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"philox", philox, METH_VARARGS, "philox(counter, key0, key1, out): Philox4x64-10 of each counter"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", NULL, -1, methods};
PyMODINIT_FUNC PyInit__philox(void) { return PyModule_Create(&module); }
