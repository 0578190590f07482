/* Compiled kernel of codec.macroblock_signals: FFmpeg's exported motion vectors -> moving and
 * intra flags per 16x16 macroblock and the global motion of each frame.
 *
 * It computes exactly what codec._macroblock_signals_numpy computes (tests/test_codec_kernels.py
 * compares the two bit for bit), one frame at a time in one pass over its records. The numpy
 * version is already batched across frames, but its ~60 array operations per batch cost more
 * than the work itself at a few hundred vectors a frame (issue 17: codec metadata at a few
 * percent of decoding). Arithmetic follows numpy's types: medians in float64 stored as
 * float32, vector minus median in float64, the threshold squared in float32; built with
 * -ffp-contract=off so that no multiply-add is fused.
 *
 * Python API (one function, called by codec.macroblock_signals):
 *
 *   macroblock_signals(frames, bidirectional, layout, mb_h, mb_w, threshold_px,
 *                      moving, intra, global_motion, counts) -> None
 *
 *   frames: list of F objects, each None or a C-contiguous buffer of AVMotionVector records
 *   bidirectional: None, or a bytes-like of F bytes (nonzero: the frame may reference the
 *     future, so records with source > 0 are future references)
 *   layout: (itemsize, source, dst_x, dst_y, motion_x, motion_y, motion_scale), the record's
 *     size and field offsets in bytes, read from the numpy dtype PyAV gives the records
 *   moving, intra: writable buffers of F * mb_h * mb_w bytes (numpy bool), filled with 0/1
 *   global_motion: writable buffer of F * 2 float32, filled with (dx, dy) in pixels
 *   counts: writable buffer of F * 2 int64, filled with each frame's number of intra and of
 *     moving macroblocks (what numpy's count_nonzero would give, at no extra pass)
 *
 * Raises TypeError / ValueError for arguments of the wrong kind or size; it never reads
 * past a buffer (a record count is the buffer's size // itemsize).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MEDIAN_SAMPLES 256  /* codec._MEDIAN_SAMPLES */
#define MACROBLOCK_SHIFT 4  /* 16-pixel macroblocks */

typedef struct {
    Py_ssize_t itemsize, source, dst_x, dst_y, motion_x, motion_y, motion_scale;
} Layout;

static inline int32_t read_i32(const char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline int16_t read_i16(const char *p) { int16_t v; memcpy(&v, p, 2); return v; }
static inline uint16_t read_u16(const char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* The k-th smallest of a[0..n) (0-based); reorders a so that a[k] holds it, smaller values
 * before it and larger after (Hoare's selection). */
static int32_t select_kth(int32_t *a, Py_ssize_t n, Py_ssize_t k)
{
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int32_t pivot = a[lo + (hi - lo) / 2];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                int32_t t = a[i]; a[i] = a[j]; a[j] = t;
                i++; j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else break;
    }
    return a[k];
}

/* codec._median of values[0..n) taken every `stride`-th element: the median of at most
 * MEDIAN_SAMPLES evenly spaced values (every (n // MEDIAN_SAMPLES)-th where n is larger),
 * as float64. scratch holds at least n values. 0 when n == 0 (the caller's default). */
static double median(const int32_t *values, Py_ssize_t n, int32_t *scratch)
{
    if (n == 0) return 0.0;
    Py_ssize_t step = n > MEDIAN_SAMPLES ? n / MEDIAN_SAMPLES : 1;
    Py_ssize_t m = 0, negative = 0, zero = 0;
    for (Py_ssize_t i = 0; i < n; i += step) {
        int32_t v = values[i];
        scratch[m++] = v;
        negative += v < 0;
        zero += v == 0;
    }
    Py_ssize_t half = m / 2, low = m % 2 ? half : half - 1;
    /* both middle order statistics are 0: no sorting (a still camera, nearly always) */
    if (negative <= low && negative + zero > half) return 0.0;
    if (m % 2) return (double)select_kth(scratch, m, half);
    int32_t below = select_kth(scratch, m, low);
    int32_t above = scratch[half];
    for (Py_ssize_t i = half + 1; i < m; i++)
        if (scratch[i] < above) above = scratch[i];
    return 0.5 * (double)((int64_t)below + (int64_t)above);
}

typedef struct {
    int32_t *dx, *dy, *past_x, *past_y, *future_x, *future_y, *scratch;
    unsigned char *future;
} Scratch;

/* One frame's n records -> its flags (cells of mb_h * mb_w bytes) and global motion. */
static void frame_signals(const char *records, Py_ssize_t n, int bidirectional,
                          const Layout *L, int mb_h, int mb_w, float threshold_px,
                          Scratch *s, unsigned char *moving, unsigned char *intra,
                          float *global_motion, int64_t *counts)
{
    Py_ssize_t ahead = 0, past = 0, zero_x = 0, zero_y = 0;
    float scale = (float)read_u16(records + L->motion_scale);
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *r = records + i * L->itemsize;
        int32_t x = read_i32(r + L->motion_x), y = read_i32(r + L->motion_y);
        unsigned char f = bidirectional && read_i32(r + L->source) > 0;
        s->dx[i] = x; s->dy[i] = y; s->future[i] = f;
        zero_x += x == 0; zero_y += y == 0;
        if (f) { s->future_x[ahead] = x; s->future_y[ahead] = y; ahead++; }
        else { s->past_x[past] = x; s->past_y[past] = y; past++; }
    }
    float median_x = 0.0f, median_y = 0.0f;
    double rest_x = 0.0, rest_y = 0.0;   /* future median - past median (float64) */
    int only_future = 0;
    if (ahead > 0) {
        /* a median per reference direction: they point opposite ways */
        median_x = (float)median(s->past_x, past, s->scratch);
        median_y = (float)median(s->past_y, past, s->scratch);
        rest_x = median(s->future_x, ahead, s->scratch) - (double)median_x;
        rest_y = median(s->future_y, ahead, s->scratch) - (double)median_y;
        /* (a zero rest changes nothing but the sign of a zero: numpy skips it too) */
        only_future = ahead == n && median_x == 0.0f && median_y == 0.0f
                      && (rest_x != 0.0 || rest_y != 0.0);
    } else {
        /* more than half the vectors 0 on an axis: that median is 0 (codec.py's shortcut) */
        if (zero_x * 2 <= n) median_x = (float)median(s->dx, n, s->scratch);
        if (zero_y * 2 <= n) median_y = (float)median(s->dy, n, s->scratch);
    }
    float limit_root = (float)threshold_px * scale;
    double limit = (double)(limit_root * limit_root);
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *r = records + i * L->itemsize;
        double x = (double)s->dx[i] - (double)median_x;
        double y = (double)s->dy[i] - (double)median_y;
        if (s->future[i]) { x -= rest_x; y -= rest_y; }
        int row = read_i16(r + L->dst_y) >> MACROBLOCK_SHIFT;
        int col = read_i16(r + L->dst_x) >> MACROBLOCK_SHIFT;
        row = row < 0 ? 0 : (row >= mb_h ? mb_h - 1 : row);
        col = col < 0 ? 0 : (col >= mb_w ? mb_w - 1 : col);
        Py_ssize_t cell = (Py_ssize_t)row * mb_w + col;
        counts[0] -= intra[cell];   /* each macroblock counted once: as it changes */
        intra[cell] = 0;
        if (x * x + y * y >= limit) {
            counts[1] += !moving[cell];
            moving[cell] = 1;
        }
    }
    if (only_future) {   /* only future references: the scene moved +v towards them */
        median_x = (float)(-rest_x);
        median_y = (float)(-rest_y);
    }
    /* vectors point from the block to its source in the past: the scene moved -v */
    global_motion[0] = -median_x / scale;
    global_motion[1] = -median_y / scale;
}

static int writable(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len != bytes) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, view->len,
                     bytes);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *macroblock_signals(PyObject *self, PyObject *args)
{
    PyObject *frames, *bidirectional_obj, *moving_obj, *intra_obj, *motion_obj, *counts_obj;
    Layout L;
    int mb_h, mb_w;
    float threshold_px;
    if (!PyArg_ParseTuple(args, "O!O(nnnnnnn)iifOOOO", &PyList_Type, &frames,
                          &bidirectional_obj, &L.itemsize, &L.source, &L.dst_x, &L.dst_y,
                          &L.motion_x, &L.motion_y, &L.motion_scale, &mb_h, &mb_w,
                          &threshold_px, &moving_obj, &intra_obj, &motion_obj, &counts_obj))
        return NULL;
    if (mb_h <= 0 || mb_w <= 0 || L.itemsize <= 0) {
        PyErr_SetString(PyExc_ValueError, "mb_h, mb_w and the record size must be positive");
        return NULL;
    }
    Py_ssize_t offsets[6] = {L.source, L.dst_x, L.dst_y, L.motion_x, L.motion_y,
                             L.motion_scale};
    Py_ssize_t widths[6] = {4, 2, 2, 4, 4, 2};
    for (int k = 0; k < 6; k++)
        if (offsets[k] < 0 || offsets[k] + widths[k] > L.itemsize) {
            PyErr_SetString(PyExc_ValueError, "a field offset lies outside the record");
            return NULL;
        }
    Py_ssize_t count = PyList_GET_SIZE(frames), cells = (Py_ssize_t)mb_h * mb_w;
    Py_buffer moving, intra, motion, counts, bidirectional = {0};
    int have_bidirectional = bidirectional_obj != Py_None;
    if (writable(moving_obj, &moving, count * cells, "moving") < 0) return NULL;
    if (writable(intra_obj, &intra, count * cells, "intra") < 0) goto release_moving;
    if (writable(motion_obj, &motion, count * 2 * (Py_ssize_t)sizeof(float),
                 "global_motion") < 0) goto release_intra;
    if (writable(counts_obj, &counts, count * 2 * (Py_ssize_t)sizeof(int64_t), "counts") < 0)
        goto release_motion;
    if (have_bidirectional) {
        if (PyObject_GetBuffer(bidirectional_obj, &bidirectional, PyBUF_C_CONTIGUOUS) < 0)
            goto release_counts;
        if (bidirectional.len != count) {
            PyErr_Format(PyExc_ValueError, "bidirectional holds %zd flags for %zd frames",
                         bidirectional.len, count);
            goto release_bidirectional;
        }
    }
    Py_buffer *views = PyMem_Calloc(count ? count : 1, sizeof(Py_buffer));
    if (!views) { PyErr_NoMemory(); goto release_bidirectional; }
    Py_ssize_t held = 0, largest = 0;
    for (; held < count; held++) {
        PyObject *item = PyList_GET_ITEM(frames, held);
        if (item == Py_None) continue;
        if (PyObject_GetBuffer(item, &views[held], PyBUF_C_CONTIGUOUS) < 0) goto release_views;
        Py_ssize_t n = views[held].len / L.itemsize;
        if (n > largest) largest = n;
    }
    Scratch s = {0};
    int32_t *block = PyMem_Malloc((size_t)(largest ? largest : 1) * (7 * sizeof(int32_t) + 1));
    if (!block) { PyErr_NoMemory(); goto release_views; }
    Py_ssize_t stride = largest ? largest : 1;
    s.dx = block; s.dy = block + stride; s.past_x = block + 2 * stride;
    s.past_y = block + 3 * stride; s.future_x = block + 4 * stride;
    s.future_y = block + 5 * stride; s.scratch = block + 6 * stride;
    s.future = (unsigned char *)(block + 7 * stride);

    Py_BEGIN_ALLOW_THREADS
    unsigned char *moving_out = moving.buf, *intra_out = intra.buf;
    float *motion_out = motion.buf;
    int64_t *counts_out = counts.buf;
    memset(moving_out, 0, (size_t)(count * cells));
    memset(intra_out, 1, (size_t)(count * cells));
    for (Py_ssize_t f = 0; f < count; f++) {
        Py_ssize_t n = views[f].buf ? views[f].len / L.itemsize : 0;
        motion_out[2 * f] = motion_out[2 * f + 1] = 0.0f;
        counts_out[2 * f] = cells;   /* intra macroblocks, then moving ones */
        counts_out[2 * f + 1] = 0;
        if (n == 0) continue;   /* no vectors: every macroblock intra, no motion */
        int bidir = have_bidirectional ? ((const char *)bidirectional.buf)[f] != 0 : 1;
        frame_signals(views[f].buf, n, bidir, &L, mb_h, mb_w, threshold_px, &s,
                      moving_out + f * cells, intra_out + f * cells, motion_out + 2 * f,
                      counts_out + 2 * f);
    }
    Py_END_ALLOW_THREADS

    PyMem_Free(block);
    for (Py_ssize_t f = 0; f < count; f++)
        if (views[f].obj) PyBuffer_Release(&views[f]);
    PyMem_Free(views);
    if (have_bidirectional) PyBuffer_Release(&bidirectional);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&motion);
    PyBuffer_Release(&intra);
    PyBuffer_Release(&moving);
    Py_RETURN_NONE;

release_views:
    for (Py_ssize_t f = 0; f < held; f++)
        if (views[f].obj) PyBuffer_Release(&views[f]);
    PyMem_Free(views);
release_bidirectional:
    if (have_bidirectional && bidirectional.obj) PyBuffer_Release(&bidirectional);
release_counts:
    PyBuffer_Release(&counts);
release_motion:
    PyBuffer_Release(&motion);
release_intra:
    PyBuffer_Release(&intra);
release_moving:
    PyBuffer_Release(&moving);
    return NULL;
}

static PyMethodDef methods[] = {
    {"macroblock_signals", macroblock_signals, METH_VARARGS,
     "Moving / intra flags per macroblock and global motion per frame from AVMotionVector "
     "records; see codec.macroblock_signals."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_codec_kernels",
    "Compiled kernels of codecsight.codec (see _codec_kernels.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__codec_kernels(void) { return PyModule_Create(&module); }
