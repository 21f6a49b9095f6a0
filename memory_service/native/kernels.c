/* memory_service.native._kernels: the storage floor's per-row loops over whole batches.
 *
 * Each function takes C-contiguous buffers (the Python launcher beside its numpy reference checks
 * dtypes and shapes and passes the sizes), runs its loop with the GIL released and returns None.
 * The float32 arithmetic follows the numpy reference operation by operation: one IEEE operation
 * per numpy ufunc, float32 where numpy computes in float32, double where numpy promotes to
 * float64, and no fused multiply-adds (setup.py builds with -ffp-contract=off), so results are
 * bit-identical to the reference (tests/memory_service/native/ compare them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* --- buffers --- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

/* A writable (or read-only) C-contiguous buffer of at least `min_bytes`. */
static int get_buf(PyObject *obj, Buf *b, int writable, Py_ssize_t min_bytes, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) return -1;
    b->held = 1;
    if (b->view.len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd needed", name, b->view.len, min_bytes);
        return -1;
    }
    return 0;
}

/* row + alpha * value with one rounding of the sum, as optimizer.py's _fused_add (torch's
 * add_(alpha=), an FMA): the float32 product is exact in float64. */
static inline float fused_add(float row, float alpha, float value) {
    double exact = (double)value * (double)alpha;
    exact += (double)row;
    return (float)exact;
}

static void release(Buf *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].held) PyBuffer_Release(&bufs[i].view);
}

/* --- SlotIndex: linear probing over keys (buckets,) int64, EMPTY -1, TOMBSTONE -2 --- */

#define FIBONACCI 0x9E3779B97F4A7C15ULL

/* index_lookup(keys, slots, ids, out, n, bits, want_slots): out[i] = the slot (want_slots) or
 * bucket of ids[i], -1 where absent. Tombstones (-2) are probed past, as in SlotIndex._find. */
static PyObject *index_lookup(PyObject *self, PyObject *args) {
    PyObject *ok, *os, *oi, *oo;
    Py_ssize_t n;
    int bits, want_slots;
    if (!PyArg_ParseTuple(args, "OOOOnii", &ok, &os, &oi, &oo, &n, &bits, &want_slots)) return NULL;
    if (bits < 1 || bits > 62) return PyErr_Format(PyExc_ValueError, "bits %d out of [1, 62]", bits);
    Py_ssize_t buckets = (Py_ssize_t)1 << bits;
    Buf b[4];
    memset(b, 0, sizeof b);
    if (get_buf(ok, &b[0], 0, 8 * buckets, "keys") || get_buf(os, &b[1], 0, 8 * buckets, "slots")
        || get_buf(oi, &b[2], 0, 8 * n, "ids") || get_buf(oo, &b[3], 1, 8 * n, "out")) {
        release(b, 4);
        return NULL;
    }
    const int64_t *keys = b[0].view.buf, *slots = b[1].view.buf, *ids = b[2].view.buf;
    int64_t *out = b[3].view.buf;
    uint64_t mask = (uint64_t)buckets - 1;
    int shift = 64 - bits;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t id = ids[i], found = -1;
        uint64_t at = ((uint64_t)id * FIBONACCI) >> shift;
        for (;;) {
            int64_t key = keys[at];
            if (key == id) { found = want_slots ? slots[at] : (int64_t)at; break; }
            if (key == -1) break;
            at = (at + 1) & mask;
        }
        out[i] = found;
    }
    Py_END_ALLOW_THREADS
    release(b, 4);
    Py_RETURN_NONE;
}

/* Rows `at` (n,) of arenas of `count` rows, or rows 0..n-1 where at is None: a borrowed view
 * of at's buffer in b (IndexError, -1, unless every index is in [0, count)). */
static int get_at(PyObject *oat, Buf *b, Py_ssize_t n, Py_ssize_t count, const int64_t **at) {
    *at = NULL;
    if (oat == Py_None) {
        if (n > count) {
            PyErr_Format(PyExc_IndexError, "%zd rows of arenas of %zd", n, count);
            return -1;
        }
        return 0;
    }
    if (get_buf(oat, b, 0, 8 * n, "at")) return -1;
    *at = b->view.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if ((*at)[i] < 0 || (*at)[i] >= count) {
            PyErr_Format(PyExc_IndexError, "row %lld out of [0, %zd)", (long long)(*at)[i], count);
            return -1;
        }
    return 0;
}

/* --- gather / scatter of fixed-size records --- */

/* gather(src, count, row_bytes, at, n, out, out_count, out_at): out[out_at[i]] = src[at[i]]
 * (out[i] where out_at is None), records of row_bytes bytes; IndexError unless every at[i] is in
 * [0, count) and every out_at[i] in [0, out_count). */
static PyObject *gather(PyObject *self, PyObject *args) {
    PyObject *osrc, *oat, *oout, *oout_at;
    Py_ssize_t count, row_bytes, n, out_count;
    if (!PyArg_ParseTuple(args, "OnnOnOnO", &osrc, &count, &row_bytes, &oat, &n, &oout, &out_count, &oout_at))
        return NULL;
    Buf b[4];
    const int64_t *out_at;
    memset(b, 0, sizeof b);
    if (get_buf(osrc, &b[0], 0, count * row_bytes, "src") || get_buf(oat, &b[1], 0, 8 * n, "at")
        || get_buf(oout, &b[2], 1, out_count * row_bytes, "out") || get_at(oout_at, &b[3], n, out_count, &out_at)) {
        release(b, 4);
        return NULL;
    }
    const char *src = b[0].view.buf;
    const int64_t *at = b[1].view.buf;
    char *out = b[2].view.buf;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = at[i];
        if (s < 0 || s >= count) { bad = i; break; }
        memcpy(out + (out_at ? out_at[i] : i) * row_bytes, src + s * row_bytes, (size_t)row_bytes);
    }
    Py_END_ALLOW_THREADS
    release(b, 4);
    if (bad >= 0) return PyErr_Format(PyExc_IndexError, "slot out of [0, %zd)", count), NULL;
    Py_RETURN_NONE;
}

/* scatter(dst, count, row_bytes, at, n, src, src_count, src_at): dst[at[i]] = src[src_at[i]]
 * (src[i] where src_at is None); IndexError as gather (checked before anything is written). */
static PyObject *scatter(PyObject *self, PyObject *args) {
    PyObject *odst, *oat, *osrc, *osrc_at;
    Py_ssize_t count, row_bytes, n, src_count;
    if (!PyArg_ParseTuple(args, "OnnOnOnO", &odst, &count, &row_bytes, &oat, &n, &osrc, &src_count, &osrc_at))
        return NULL;
    Buf b[4];
    const int64_t *src_at;
    memset(b, 0, sizeof b);
    if (get_buf(odst, &b[0], 1, count * row_bytes, "dst") || get_buf(oat, &b[1], 0, 8 * n, "at")
        || get_buf(osrc, &b[2], 0, src_count * row_bytes, "src") || get_at(osrc_at, &b[3], n, src_count, &src_at)) {
        release(b, 4);
        return NULL;
    }
    char *dst = b[0].view.buf;
    const int64_t *at = b[1].view.buf;
    const char *src = b[2].view.buf;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (at[i] < 0 || at[i] >= count) { bad = i; break; }
    if (bad < 0)
        for (Py_ssize_t i = 0; i < n; i++)
            memcpy(dst + at[i] * row_bytes, src + (src_at ? src_at[i] : i) * row_bytes, (size_t)row_bytes);
    Py_END_ALLOW_THREADS
    release(b, 4);
    if (bad >= 0) return PyErr_Format(PyExc_IndexError, "slot out of [0, %zd)", count), NULL;
    Py_RETURN_NONE;
}

/* --- duplicate-id gradient sum --- */

/* numpy's pairwise float32 sum (loops_utils.h: <8 in order from -0.0, <=128 in 8 accumulators,
 * else halves at a multiple of 8), applied to n rows of w values at once: res (w,) = the sum of
 * rows a[0..n). scratch: 8 w floats per recursion level (a (w,) temporary and the accumulators). */
static void pairwise_rows(const float *a, Py_ssize_t n, Py_ssize_t w, float *res, float *scratch) {
    if (n < 8) {
        for (Py_ssize_t j = 0; j < w; j++) res[j] = -0.0f;
        for (Py_ssize_t i = 0; i < n; i++)
            for (Py_ssize_t j = 0; j < w; j++) res[j] += a[i * w + j];
    } else if (n <= 128) {
        float *r = scratch;  /* (8, w) */
        memcpy(r, a, 8 * w * sizeof(float));
        Py_ssize_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++)
                for (Py_ssize_t j = 0; j < w; j++) r[k * w + j] += a[(i + k) * w + j];
        for (Py_ssize_t j = 0; j < w; j++)
            res[j] = ((r[j] + r[w + j]) + (r[2 * w + j] + r[3 * w + j]))
                     + ((r[4 * w + j] + r[5 * w + j]) + (r[6 * w + j] + r[7 * w + j]));
        for (; i < n; i++)
            for (Py_ssize_t j = 0; j < w; j++) res[j] += a[i * w + j];
    } else {
        Py_ssize_t n2 = n / 2;
        n2 -= n2 % 8;
        float *tmp = scratch + 8 * w;  /* the next level's scratch starts past it */
        pairwise_rows(a, n2, w, res, tmp + w);
        pairwise_rows(a + n2 * w, n - n2, w, tmp, tmp + w);
        for (Py_ssize_t j = 0; j < w; j++) res[j] += tmp[j];
    }
}

/* sum_runs(grads, n, w, starts, m, out): out[r] = np.add.reduceat(grads, starts, axis=0)[r]:
 * numpy reduces each column of a run as grads[s] + pairwise(grads[s + 1 .. e)), in float32. */
static PyObject *sum_runs(PyObject *self, PyObject *args) {
    PyObject *og, *os, *oo;
    Py_ssize_t n, w, m;
    if (!PyArg_ParseTuple(args, "OnnOnO", &og, &n, &w, &os, &m, &oo)) return NULL;
    Buf b[3];
    memset(b, 0, sizeof b);
    if (get_buf(og, &b[0], 0, 4 * n * w, "grads") || get_buf(os, &b[1], 0, 8 * m, "starts")
        || get_buf(oo, &b[2], 1, 4 * m * w, "out")) {
        release(b, 3);
        return NULL;
    }
    const float *g = b[0].view.buf;
    const int64_t *starts = b[1].view.buf;
    float *out = b[2].view.buf;
    /* levels of halving (each takes 9 w floats, plus w for the sum): a half is at most n / 2 + 8
     * values, so 2 + log2(n) levels cover any run */
    Py_ssize_t levels = 2;
    for (Py_ssize_t k = n; k > 1; k /= 2) levels++;
    float *scratch = PyMem_RawMalloc(sizeof(float) * (size_t)(w * (9 * levels + 1) + 1));
    if (!scratch) {
        release(b, 3);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    float *sum = scratch;
    for (Py_ssize_t r = 0; r < m; r++) {
        Py_ssize_t lo = starts[r], hi = r + 1 < m ? starts[r + 1] : n;
        float *o = out + r * w;
        memcpy(o, g + lo * w, 4 * (size_t)w);
        if (hi - lo == 2) {
            for (Py_ssize_t j = 0; j < w; j++) o[j] += -0.0f + g[(lo + 1) * w + j];
        } else if (hi - lo > 2) {
            pairwise_rows(g + (lo + 1) * w, hi - lo - 1, w, sum, scratch + w);
            for (Py_ssize_t j = 0; j < w; j++) o[j] += sum[j];
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
    release(b, 3);
    Py_RETURN_NONE;
}

/* --- optimizer steps, fused per row: rows (n, w), state (n, sw), grads (n, w) float32 --- */

#define OPT_BUFS(nstate)                                                                          \
    Buf b[3];                                                                                     \
    memset(b, 0, sizeof b);                                                                       \
    if (get_buf(orows, &b[0], 1, 4 * n * w, "rows") || get_buf(ostate, &b[1], 1, 4 * n * (nstate), "state") \
        || get_buf(ograds, &b[2], 0, 4 * n * w, "grads")) {                                       \
        release(b, 3);                                                                            \
        return NULL;                                                                              \
    }                                                                                             \
    float *rows = b[0].view.buf, *state = b[1].view.buf;                                          \
    const float *grads = b[2].view.buf;

/* sgd(rows, state, grads, n, w, alpha): rows += float32(alpha) * grads with one rounding of the
 * sum in float64 then float32, as optimizer._fused_add. */
static PyObject *sgd(PyObject *self, PyObject *args) {
    PyObject *orows, *ostate, *ograds;
    Py_ssize_t n, w;
    float alpha;
    if (!PyArg_ParseTuple(args, "OOOnnf", &orows, &ostate, &ograds, &n, &w, &alpha)) return NULL;
    OPT_BUFS(0)
    (void)state;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n * w; k++) {
        rows[k] = fused_add(rows[k], alpha, grads[k]);
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* adagrad(rows, state, grads, n, w, alpha, eps): state += g*g; rows += alpha * g / (sqrt(state)
 * + eps) (the add fused, as _fused_add). alpha = float32(-lr), eps = float32(eps). */
static PyObject *adagrad(PyObject *self, PyObject *args) {
    PyObject *orows, *ostate, *ograds;
    Py_ssize_t n, w;
    float alpha, eps;
    if (!PyArg_ParseTuple(args, "OOOnnff", &orows, &ostate, &ograds, &n, &w, &alpha, &eps)) return NULL;
    OPT_BUFS(w)
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n * w; k++) {
        float g = grads[k];
        float s = state[k] + g * g;
        state[k] = s;
        float q = g / (sqrtf(s) + eps);
        rows[k] = fused_add(rows[k], alpha, q);
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* sparse_adam(rows, state, grads, n, w, c1, c2, eps, neg_step): torch.optim.SparseAdam's update
 * (optimizer.SparseAdam.apply): c1 = float32(1 - beta1), c2 = float32(1 - beta2),
 * neg_step = float32(-step_size). State row: [exp_avg (w), exp_avg_sq (w)]. */
static PyObject *sparse_adam(PyObject *self, PyObject *args) {
    PyObject *orows, *ostate, *ograds;
    Py_ssize_t n, w;
    float c1, c2, eps, neg_step;
    if (!PyArg_ParseTuple(args, "OOOnnffff", &orows, &ostate, &ograds, &n, &w, &c1, &c2, &eps, &neg_step))
        return NULL;
    OPT_BUFS(2 * w)
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        float *r = rows + i * w, *m = state + 2 * i * w, *v = m + w;
        const float *g = grads + i * w;
        for (Py_ssize_t j = 0; j < w; j++) {
            float au = (g[j] - m[j]) * c1;
            float su = (g[j] * g[j] - v[j]) * c2;
            float mm = m[j] + au, vv = v[j] + su;
            m[j] = mm;
            v[j] = vv;
            float ratio = mm / (sqrtf(vv) + eps);
            r[j] += ratio * neg_step;
        }
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* adam(rows, state, grads, n, w, weight, rest, lerp_low, b2, c2, bsq, eps, neg_step): torch.optim.Adam's
 * step (optimizer.Adam.apply). weight = float32(1 - beta1) and rest = float32(1 - weight), as
 * doubles; lerp_low: weight < 0.5;
 * b2 = float32(beta2), c2 = float32(1 - beta2), bsq = float32(sqrt(1 - beta2^t)),
 * neg_step = float32(-lr / (1 - beta1^t)). */
static PyObject *adam(PyObject *self, PyObject *args) {
    PyObject *orows, *ostate, *ograds;
    Py_ssize_t n, w;
    double weight, rest;
    int lerp_low;
    float b2, c2, bsq, eps, neg_step;
    if (!PyArg_ParseTuple(args, "OOOnnddpfffff", &orows, &ostate, &ograds, &n, &w, &weight, &rest, &lerp_low,
                          &b2, &c2, &bsq, &eps, &neg_step))
        return NULL;
    OPT_BUFS(2 * w)
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        float *r = rows + i * w, *m = state + 2 * i * w, *v = m + w;
        const float *g = grads + i * w;
        for (Py_ssize_t j = 0; j < w; j++) {
            float d = g[j] - m[j];
            float mm = lerp_low ? (float)((double)m[j] + weight * (double)d)
                                : (float)((double)g[j] - rest * (double)d);
            float vv = v[j] * b2;
            vv += (c2 * g[j]) * g[j];
            m[j] = mm;
            v[j] = vv;
            float denom = sqrtf(vv) / bsq;
            denom += eps;
            r[j] += (neg_step * mm) / denom;
        }
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* --- dense Adam's catch-up (catch_up.py) --- */

/* adam_row_stats(rows, state, count, w, at, n, theta_absmax, inv_max, m_any): per row at[i] of
 * arenas rows (count, w), state (count, 2w) (row i where at is None): max |theta| (float32),
 * max of 1 / sqrt(v) in float64 (= 1 / sqrt(min v): both functions are monotone and correctly
 * rounded, so the max of the images is the image of the min) and whether any m is nonzero. */
static PyObject *adam_row_stats(PyObject *self, PyObject *args) {
    PyObject *orows, *ostate, *oat, *oabs, *oinv, *oany;
    Py_ssize_t count, w, n;
    if (!PyArg_ParseTuple(args, "OOnnOnOOO", &orows, &ostate, &count, &w, &oat, &n, &oabs, &oinv, &oany))
        return NULL;
    Buf b[6];
    const int64_t *at;
    memset(b, 0, sizeof b);
    if (get_buf(orows, &b[0], 0, 4 * count * w, "rows") || get_buf(ostate, &b[1], 0, 8 * count * w, "state")
        || get_buf(oabs, &b[2], 1, 4 * n, "theta_absmax") || get_buf(oinv, &b[3], 1, 8 * n, "inv_max")
        || get_buf(oany, &b[4], 1, n, "m_any") || get_at(oat, &b[5], n, count, &at)) {
        release(b, 6);
        return NULL;
    }
    const float *rows = b[0].view.buf, *state = b[1].view.buf;
    float *absmax = b[2].view.buf;
    double *inv_max = b[3].view.buf;
    char *m_any = b[4].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t k = at ? at[i] : i;
        const float *r = rows + k * w, *m = state + 2 * k * w, *v = m + w;
        float a = 0.0f, vmin = INFINITY;
        char any = 0;
        for (Py_ssize_t j = 0; j < w; j++) {
            float x = fabsf(r[j]);
            if (x > a) a = x;  /* rows are finite (non-finite updates are refused) */
            if (v[j] < vmin) vmin = v[j];
            any |= m[j] != 0.0f;
        }
        absmax[i] = a;
        inv_max[i] = 1.0 / sqrt((double)vmin);
        m_any[i] = any;
    }
    Py_END_ALLOW_THREADS
    release(b, 6);
    Py_RETURN_NONE;
}

/* adam_catch_up_series(rows, state, count, w, at, n, coef, p, mfac, vfac): on rows at[i] of
 * arenas rows (count, w), state (count, 2w) (row i where at is None), per element, with inv = 1 / sqrt(v)
 * in float64, the movement -m (c_0 + inv (c_1 + inv (...))) inv by Horner over the row's p
 * coefficients coef (n, p) float64 (catch_up._series: acc = inv c_{p-1}; acc += c_k, acc *= inv
 * down to k = 0; acc *= m), added to the row in float64 and rounded once; then m and v decay by
 * the row's factors mfac, vfac (n,) float64 (one rounding each). */
static PyObject *adam_catch_up_series(PyObject *self, PyObject *args) {
    PyObject *orows, *ostate, *oat, *ocoef, *omf, *ovf;
    Py_ssize_t count, w, n, p;
    if (!PyArg_ParseTuple(args, "OOnnOnOnOO", &orows, &ostate, &count, &w, &oat, &n, &ocoef, &p, &omf, &ovf))
        return NULL;
    if (p < 1) return PyErr_Format(PyExc_ValueError, "%zd series terms, at least 1 needed", p);
    Buf b[6];
    const int64_t *at;
    memset(b, 0, sizeof b);
    if (get_buf(orows, &b[0], 1, 4 * count * w, "rows") || get_buf(ostate, &b[1], 1, 8 * count * w, "state")
        || get_buf(ocoef, &b[2], 0, 8 * n * p, "coef") || get_buf(omf, &b[3], 0, 8 * n, "mfac")
        || get_buf(ovf, &b[4], 0, 8 * n, "vfac") || get_at(oat, &b[5], n, count, &at)) {
        release(b, 6);
        return NULL;
    }
    float *rows = b[0].view.buf, *state = b[1].view.buf;
    const double *coef = b[2].view.buf, *mfac = b[3].view.buf, *vfac = b[4].view.buf;
    double *inv = PyMem_RawMalloc(2 * sizeof(double) * (size_t)(w > 0 ? w : 1));
    if (!inv) {
        release(b, 6);
        return PyErr_NoMemory();
    }
    double *acc = inv + w;
    Py_BEGIN_ALLOW_THREADS
    /* Each step below is one pass over the row's w elements (the same operations per element as
     * one element at a time, so the same bits), which the compiler turns into vector loops. */
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t row = at ? at[i] : i;
        float *r = rows + row * w, *m = state + 2 * row * w, *v = m + w;
        const double *c = coef + i * p;
        double mf = mfac[i], vf = vfac[i], top = c[p - 1];
        for (Py_ssize_t j = 0; j < w; j++) inv[j] = 1.0 / sqrt((double)v[j]);
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = inv[j] * top;
        for (Py_ssize_t k = p - 2; k >= 0; k--) {
            double ck = c[k];
            for (Py_ssize_t j = 0; j < w; j++) acc[j] = (acc[j] + ck) * inv[j];
        }
        for (Py_ssize_t j = 0; j < w; j++) {
            double d = acc[j] * (double)m[j];
            r[j] = (float)(d + (double)r[j]);
            m[j] = (float)((double)m[j] * mf);
            v[j] = (float)((double)v[j] * vf);
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(inv);
    release(b, 6);
    Py_RETURN_NONE;
}

/* --- checks --- */

/* all_finite(values, n): whether none of n float32 values is inf or nan (one pass, no mask). */
static PyObject *all_finite(PyObject *self, PyObject *args) {
    PyObject *ov;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "On", &ov, &n)) return NULL;
    Buf b[1];
    memset(b, 0, sizeof b);
    if (get_buf(ov, &b[0], 0, 4 * n, "values")) {
        release(b, 1);
        return NULL;
    }
    const uint32_t *bits = b[0].view.buf;
    uint32_t bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)  /* exponent all ones: inf or nan; no branch, vectorises */
        bad |= (uint32_t)((bits[i] & 0x7f800000u) == 0x7f800000u);
    Py_END_ALLOW_THREADS
    release(b, 1);
    return PyBool_FromLong(!bad);
}

static PyMethodDef methods[] = {
    {"all_finite", all_finite, METH_VARARGS, "Whether no float32 value is inf or nan."},
    {"index_lookup", index_lookup, METH_VARARGS, "SlotIndex probe: slots or buckets of ids, -1 where absent."},
    {"gather", gather, METH_VARARGS, "out[i] = src[at[i]] for fixed-size records."},
    {"scatter", scatter, METH_VARARGS, "dst[at[i]] = src[i] for fixed-size records."},
    {"sum_runs", sum_runs, METH_VARARGS, "np.add.reduceat(grads, starts, axis=0), float32, in order."},
    {"sgd", sgd, METH_VARARGS, "SGD step (optimizer.SGD.apply)."},
    {"adagrad", adagrad, METH_VARARGS, "Adagrad step (optimizer.Adagrad.apply)."},
    {"sparse_adam", sparse_adam, METH_VARARGS, "SparseAdam step (optimizer.SparseAdam.apply)."},
    {"adam", adam, METH_VARARGS, "Adam step (optimizer.Adam.apply)."},
    {"adam_row_stats", adam_row_stats, METH_VARARGS, "Per-row max |theta|, max 1/sqrt(v), any m != 0."},
    {"adam_catch_up_series", adam_catch_up_series, METH_VARARGS, "Dense Adam catch-up by the series."},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
