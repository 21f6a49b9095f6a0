/* memory_service.native._arena: a same-host reader's gather from a shard's shared-memory arena,
 * and the writer's side of the version counter that makes the gather safe.
 *
 * The shard bumps one 64-bit counter (`seq`) when it takes its request lock and again when it
 * lets go (odd: a change may be under way). A reader notes an even counter, gathers, and keeps the
 * result only if the counter has not moved: then no lock section ran meanwhile, so it read one
 * state between two requests, never part of a step (a seqlock). The layout of the files is
 * memory_service/storage/tiers/shared_arena.py's; header fields are int64 at the indices below.
 * Everything read may be torn while the shard writes, so every slot and probe is bounds-checked
 * before use and a torn read ends in RETRY, never in a wild access.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* header fields (shared_arena.py HEADER) */
enum { H_MAGIC, H_INDEX_GEN, H_INDEX_BITS, H_ROWS_GEN, H_CAPACITY, H_WIDTH, H_COMMITTED, H_OPEN_STEP,
       H_FLAGS, H_DROPPED, H_HOMES_GEN, H_HOMES_LEN, H_FIELDS };
#define FLAG_CATCHES_UP 1
#define FLAG_HAS_DISK 2
#define FLAG_HOT 4
#define MAGIC 0x31414e4552474e45LL /* "ENGRANA1" little-endian */
enum { OK = 0, RETRY = 1, REMAP = 2, NOT_YET = 3, FALLBACK = 4 };
#define EMPTY (-1)
static const uint64_t FIBONACCI = 0x9E3779B97F4A7C15ULL;

static inline int64_t load(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* bump(seq buffer): the writer's counter step (a full fence on each side, so the arena's stores
 * are ordered against it on any CPU, not only x86's). */
static PyObject *bump(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE) < 0) return NULL;
    if (b.len < 8) { PyBuffer_Release(&b); PyErr_SetString(PyExc_ValueError, "seq buffer < 8 bytes"); return NULL; }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t v = __atomic_add_fetch((int64_t *)b.buf, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    PyBuffer_Release(&b);
    return PyLong_FromLongLong(v);
}

typedef struct {
    Py_buffer hdr, index, rows, homes, ids, out, missing;
    int64_t index_gen, rows_gen, homes_gen;
} Entry;

/* whether sorted `set` (n,) holds `id` */
static int holds(const int64_t *set, int64_t n, int64_t id) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (set[mid] < id) lo = mid + 1; else hi = mid;
    }
    return lo < n && set[lo] == id;
}

/* one table's gather; returns a status. */
static int gather_table(const Entry *e, int64_t min_step) {
    const int64_t *h = (const int64_t *)e->hdr.buf;
    if (e->hdr.len < H_FIELDS * 8 || load(&h[H_MAGIC]) != MAGIC || load(&h[H_DROPPED])) return REMAP;
    if (load(&h[H_INDEX_GEN]) != e->index_gen || load(&h[H_ROWS_GEN]) != e->rows_gen ||
        load(&h[H_HOMES_GEN]) != e->homes_gen) return REMAP;
    int64_t bits = load(&h[H_INDEX_BITS]), cap = load(&h[H_CAPACITY]), width = load(&h[H_WIDTH]);
    int64_t committed = load(&h[H_COMMITTED]), flags = load(&h[H_FLAGS]);
    if (committed < min_step) return NOT_YET;
    if (load(&h[H_OPEN_STEP])) return FALLBACK; /* a step partly written: only a Fetch waits it out */
    if (bits < 1 || bits > 62) return RETRY;
    int64_t buckets = (int64_t)1 << bits;
    if ((int64_t)e->index.len < 16 * buckets) return REMAP;
    if (cap < 0 || width < 1 || (int64_t)e->rows.len < cap * (width * 4 + 8)) return REMAP;
    int64_t homes_len = load(&h[H_HOMES_LEN]);
    if (homes_len < 0 || (int64_t)e->homes.len < homes_len * 8) return REMAP;
    Py_ssize_t n = e->ids.len / 8;
    if (e->out.len != n * width * 4 || e->missing.len < (n + 1) * 8) return FALLBACK; /* the caller's view is old */
    const int64_t *homes = (const int64_t *)e->homes.buf;
    int64_t *missing = (int64_t *)e->missing.buf, num_missing = 0;
    const int64_t *keys = (const int64_t *)e->index.buf, *slots = keys + buckets;
    const int64_t *ids = (const int64_t *)e->ids.buf;
    const float *rows = (const float *)e->rows.buf;
    const int64_t *last = (const int64_t *)((const char *)e->rows.buf + cap * width * 4);
    float *out = (float *)e->out.buf;
    uint64_t mask = (uint64_t)buckets - 1;
    int shift = 64 - (int)bits;
    /* Two passes, each prefetching AHEAD ids on: the probes (the index's buckets, random), then
     * the rows (random in the arena). One pass chained bucket -> slot -> row per id, one cache
     * miss after the other: 16k ids took ~1.7 ms a shard of ~0.3 that np.take needs. The slots
     * of the first pass go in missing[1..n] (overwritten by the missing positions after). */
    enum { AHEAD = 16 };
    int64_t *found = missing + 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + AHEAD < n) {
            uint64_t ahead = ((uint64_t)ids[i + AHEAD] * FIBONACCI) >> shift;
            __builtin_prefetch(&keys[ahead]);
            __builtin_prefetch(&slots[ahead]);
        }
        int64_t id = ids[i], slot = -1;
        uint64_t b = ((uint64_t)id * FIBONACCI) >> shift;
        for (int64_t probes = 0; probes < buckets; probes++, b = (b + 1) & mask) {
            int64_t key = keys[b];
            if (key == id) { slot = slots[b]; break; }
            if (key == EMPTY) break;
        }
        if (slot >= cap) return RETRY; /* torn: index and rows of different moments */
        found[i] = slot;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + AHEAD < n && found[i + AHEAD] >= 0) {
            const char *row = (const char *)(rows + found[i + AHEAD] * width);
            for (int64_t line = 0; line < width * 4; line += 64) __builtin_prefetch(row + line);
        }
        int64_t slot = found[i];
        if (slot < 0) { /* never written (its row is computed from the seed), or elsewhere */
            int64_t id = ids[i];
            if (flags & FLAG_HAS_DISK) return FALLBACK; /* may be on disk */
            /* a cold shard's homes are the rows that moved away, a hot shard's those it serves */
            if (holds(homes, homes_len, id) != ((flags & FLAG_HOT) != 0)) return FALLBACK;
            found[num_missing++] = i; /* behind i: its slot was read already */
            continue;
        }
        if ((flags & FLAG_CATCHES_UP) && last[slot] != committed) return FALLBACK; /* needs catching up */
        memcpy(out + i * width, rows + slot * width, (size_t)width * 4);
    }
    missing[0] = num_missing;
    return OK;
}

static void release(Entry *e, int n) {
    for (int i = 0; i < n; i++) {
        PyBuffer_Release(&e[i].hdr); PyBuffer_Release(&e[i].index); PyBuffer_Release(&e[i].rows);
        PyBuffer_Release(&e[i].homes); PyBuffer_Release(&e[i].ids); PyBuffer_Release(&e[i].out);
        PyBuffer_Release(&e[i].missing);
    }
}

/* gather(seq, entries, min_step) -> status. entries: a list of tuples (hdr, index, index_gen,
 * rows, rows_gen, homes, homes_gen, ids, out, missing): buffers of the table's header, index,
 * rows and homes files, the ids (n,) int64, the output (n, width) float32 and missing (n + 1,)
 * int64 (both writable): missing[0] = m, missing[1..m] the positions of never-written rows, which
 * the caller computes from the table's seed. OK only if every table was read whole within one
 * unchanged, even counter. */
static PyObject *gather(PyObject *self, PyObject *args) {
    PyObject *seq_obj, *list; long long min_step;
    if (!PyArg_ParseTuple(args, "OO!L", &seq_obj, &PyList_Type, &list, &min_step)) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(list);
    if (count > 4096) { PyErr_SetString(PyExc_ValueError, "too many tables"); return NULL; }
    Entry *entries = PyMem_Calloc(count ? count : 1, sizeof(Entry));
    if (!entries) return PyErr_NoMemory();
    Py_buffer seq;
    if (PyObject_GetBuffer(seq_obj, &seq, PyBUF_SIMPLE) < 0) { PyMem_Free(entries); return NULL; }
    int got = 0, status = OK;
    for (; got < count; got++) {
        Entry *e = &entries[got];
        PyObject *t = PyList_GET_ITEM(list, got), *o[7];
        long long index_gen, rows_gen, homes_gen;
        if (!PyArg_ParseTuple(t, "OOLOLOLOOO", &o[0], &o[1], &index_gen, &o[2], &rows_gen, &o[3], &homes_gen,
                              &o[4], &o[5], &o[6])) break;
        e->index_gen = index_gen; e->rows_gen = rows_gen; e->homes_gen = homes_gen;
        Py_buffer *b[7] = {&e->hdr, &e->index, &e->rows, &e->homes, &e->ids, &e->out, &e->missing};
        int flags[7] = {PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_C_CONTIGUOUS,
                        PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE};
        int k = 0;
        for (; k < 7; k++) if (PyObject_GetBuffer(o[k], b[k], flags[k]) < 0) break;
        if (k < 7) { while (k--) PyBuffer_Release(b[k]); break; }
    }
    if (got < count || seq.len < 8) {
        release(entries, got); PyBuffer_Release(&seq); PyMem_Free(entries);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "seq buffer < 8 bytes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    const int64_t *counter = (const int64_t *)seq.buf;
    int64_t before = load(counter);
    if (before & 1) status = RETRY;
    for (Py_ssize_t i = 0; i < count && status == OK; i++) status = gather_table(&entries[i], min_step);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (status == OK && load(counter) != before) status = RETRY;
    Py_END_ALLOW_THREADS
    release(entries, got); PyBuffer_Release(&seq); PyMem_Free(entries);
    return PyLong_FromLong(status);
}

static PyMethodDef methods[] = {
    {"bump", bump, METH_O, "bump(seq) -> the counter's new value (the writer's side)"},
    {"gather", gather, METH_VARARGS, "gather(seq, entries, min_step) -> status (see arena.c)"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_arena", NULL, -1, methods};
PyMODINIT_FUNC PyInit__arena(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "OK", OK); PyModule_AddIntConstant(m, "RETRY", RETRY);
    PyModule_AddIntConstant(m, "REMAP", REMAP); PyModule_AddIntConstant(m, "NOT_YET", NOT_YET);
    PyModule_AddIntConstant(m, "FALLBACK", FALLBACK);
    return m;
}
