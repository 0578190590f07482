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

/* codec._median of n int32 values, the k-th at base + k * stride bytes (a plain array, or a
 * field of the records): the median of at most MEDIAN_SAMPLES evenly spaced values (every
 * (n // MEDIAN_SAMPLES)-th where n is larger), as float64. scratch holds at least n values
 * (min(n, 2 * MEDIAN_SAMPLES) are used). 0 when n == 0 (the caller's default). */
static double median(const char *base, Py_ssize_t stride, Py_ssize_t n, int32_t *scratch)
{
    if (n == 0) return 0.0;
    Py_ssize_t step = n > MEDIAN_SAMPLES ? n / MEDIAN_SAMPLES : 1;
    Py_ssize_t m = 0, negative = 0, zero = 0;
    for (Py_ssize_t i = 0; i < n; i += step) {
        int32_t v = read_i32(base + i * stride);
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

/* per-call buffers of the largest frame's record count each */
typedef struct {
    int32_t *past_x, *past_y, *future_x, *future_y, *scratch;
} Scratch;

/* One frame's n records -> its flags (cells of mb_h * mb_w bytes), global motion and counts.
 * Everything read in the loops is first copied to locals: a store through a char pointer may
 * alias anything, so fields read through pointers would be reloaded after every flag store. */
static void frame_signals(const char *records, Py_ssize_t n, int bidirectional,
                          const Layout *L, int mb_h, int mb_w, float threshold_px,
                          const Scratch *s, unsigned char *restrict moving,
                          unsigned char *restrict intra, float *global_motion, int64_t *counts)
{
    const Py_ssize_t size = L->itemsize, at_source = L->source, at_x = L->motion_x,
                     at_y = L->motion_y, at_dst_x = L->dst_x, at_dst_y = L->dst_y;
    int32_t *restrict past_x = s->past_x, *restrict past_y = s->past_y;
    int32_t *restrict future_x = s->future_x, *restrict future_y = s->future_y;
    Py_ssize_t ahead = 0, past = 0, zero_x = 0, zero_y = 0;
    float scale = (float)read_u16(records + L->motion_scale);
    if (bidirectional) {
        /* the vectors of each reference direction, for a median each */
        for (Py_ssize_t i = 0; i < n; i++) {
            const char *r = records + i * size;
            int32_t x = read_i32(r + at_x), y = read_i32(r + at_y);
            if (read_i32(r + at_source) > 0) {
                future_x[ahead] = x; future_y[ahead] = y; ahead++;
            } else {
                past_x[past] = x; past_y[past] = y; past++;
            }
        }
        zero_x = zero_y = n;   /* unused where a frame has future references */
        if (ahead == 0)
            for (Py_ssize_t i = 0; i < n; i++) {
                zero_x -= past_x[i] != 0;
                zero_y -= past_y[i] != 0;
            }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            const char *r = records + i * size;
            zero_x += read_i32(r + at_x) == 0;
            zero_y += read_i32(r + at_y) == 0;
        }
    }
    float median_x = 0.0f, median_y = 0.0f;
    double rest_x = 0.0, rest_y = 0.0;   /* future median - past median (float64) */
    int only_future = 0;
    if (ahead > 0) {
        /* a median per reference direction: they point opposite ways */
        median_x = (float)median((const char *)past_x, 4, past, s->scratch);
        median_y = (float)median((const char *)past_y, 4, past, s->scratch);
        rest_x = median((const char *)future_x, 4, ahead, s->scratch) - (double)median_x;
        rest_y = median((const char *)future_y, 4, ahead, s->scratch) - (double)median_y;
        /* (a zero rest changes nothing but the sign of a zero: numpy skips it too) */
        only_future = ahead == n && median_x == 0.0f && median_y == 0.0f
                      && (rest_x != 0.0 || rest_y != 0.0);
    } else {
        /* more than half the vectors 0 on an axis: that median is 0 (codec.py's shortcut) */
        if (zero_x * 2 <= n) median_x = (float)median(records + at_x, size, n, s->scratch);
        if (zero_y * 2 <= n) median_y = (float)median(records + at_y, size, n, s->scratch);
    }
    float limit_root = (float)threshold_px * scale;
    const double limit = (double)(limit_root * limit_root);
    const double offset_x = (double)median_x, offset_y = (double)median_y;
    const int last_row = mb_h - 1, last_col = mb_w - 1, width = mb_w;
    int64_t cleared = 0, moved = 0;
    const int split = ahead > 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *r = records + i * size;
        double x = (double)read_i32(r + at_x) - offset_x;
        double y = (double)read_i32(r + at_y) - offset_y;
        if (split && read_i32(r + at_source) > 0) { x -= rest_x; y -= rest_y; }
        int row = read_i16(r + at_dst_y) >> MACROBLOCK_SHIFT;
        int col = read_i16(r + at_dst_x) >> MACROBLOCK_SHIFT;
        row = row < 0 ? 0 : (row > last_row ? last_row : row);
        col = col < 0 ? 0 : (col > last_col ? last_col : col);
        Py_ssize_t cell = (Py_ssize_t)row * width + col;
        cleared += intra[cell];   /* each macroblock counted once: as it changes */
        intra[cell] = 0;
        unsigned char fast = x * x + y * y >= limit;   /* branch-free: noisy vectors */
        moved += fast & !moving[cell];
        moving[cell] |= fast;
    }
    counts[0] -= cleared;
    counts[1] += moved;
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
    Py_ssize_t stride = largest ? largest : 1;
    int32_t *block = PyMem_Malloc((size_t)stride * 5 * sizeof(int32_t));
    if (!block) { PyErr_NoMemory(); goto release_views; }
    s.past_x = block; s.past_y = block + stride; s.future_x = block + 2 * stride;
    s.future_y = block + 3 * stride; s.scratch = block + 4 * stride;

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

/* policy.dynamic_macroblocks: for F frames of mb_h x mb_w bool flags, a moving macroblock
 * counts if its 3x3 neighbourhood (itself included, clipped at the frame's edges) holds at
 * least motion_support macroblocks that are moving or intra; an intra one at least
 * intra_support. */
static PyObject *dynamic_macroblocks(PyObject *self, PyObject *args)
{
    PyObject *moving_obj, *intra_obj, *out_obj;
    Py_ssize_t count;
    int mb_h, mb_w, motion_support, intra_support;
    if (!PyArg_ParseTuple(args, "OOniiiiO", &moving_obj, &intra_obj, &count, &mb_h, &mb_w,
                          &motion_support, &intra_support, &out_obj))
        return NULL;
    if (count < 0 || mb_h <= 0 || mb_w <= 0) {
        PyErr_SetString(PyExc_ValueError, "frames must be >= 0, mb_h and mb_w positive");
        return NULL;
    }
    Py_ssize_t cells = (Py_ssize_t)mb_h * mb_w, bytes = count * cells;
    Py_buffer moving, intra, out;
    if (PyObject_GetBuffer(moving_obj, &moving, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(intra_obj, &intra, PyBUF_C_CONTIGUOUS) < 0) goto release_moving;
    if (moving.len != bytes || intra.len != bytes) {
        PyErr_Format(PyExc_ValueError, "moving / intra hold %zd / %zd bytes, expected %zd",
                     moving.len, intra.len, bytes);
        goto release_intra;
    }
    if (writable(out_obj, &out, bytes, "out") < 0) goto release_intra;
    /* flagged (moving or intra) with a zero border, and its sums over three columns */
    Py_ssize_t wide = mb_w + 2;
    uint8_t *flagged = PyMem_Calloc((size_t)(mb_h + 2) * wide, 1);
    uint8_t *columns = PyMem_Malloc((size_t)(mb_h + 2) * mb_w);
    if (!flagged || !columns) {
        PyMem_Free(flagged); PyMem_Free(columns);
        PyErr_NoMemory();
        PyBuffer_Release(&out);
        goto release_intra;
    }
    Py_BEGIN_ALLOW_THREADS
    /* locals, not the address-taken arguments: byte stores could alias those */
    const int height = mb_h, width = mb_w;
    const uint8_t *m = moving.buf, *i = intra.buf;
    uint8_t *o = out.buf;
    uint8_t ms = (uint8_t)(motion_support < 0 ? 0 : motion_support > 10 ? 10 : motion_support);
    uint8_t is = (uint8_t)(intra_support < 0 ? 0 : intra_support > 10 ? 10 : intra_support);
    for (Py_ssize_t f = 0; f < count; f++, m += cells, i += cells, o += cells) {
        /* branch-free loops over bytes, which the compiler vectorises */
        for (int r = 0; r < height; r++) {
            uint8_t *dst = flagged + (r + 1) * wide + 1;
            const uint8_t *mr = m + (Py_ssize_t)r * width, *ir = i + (Py_ssize_t)r * width;
            for (int c = 0; c < width; c++) dst[c] = (uint8_t)((mr[c] | ir[c]) != 0);
        }
        for (int r = 0; r < height + 2; r++) {
            const uint8_t *src = flagged + r * wide;
            uint8_t *dst = columns + (Py_ssize_t)r * width;
            for (int c = 0; c < width; c++) dst[c] = (uint8_t)(src[c] + src[c + 1] + src[c + 2]);
        }
        for (int r = 0; r < height; r++) {
            const uint8_t *up = columns + (Py_ssize_t)r * width, *mid = up + width,
                          *down = mid + width;
            const uint8_t *mr = m + (Py_ssize_t)r * width, *ir = i + (Py_ssize_t)r * width;
            uint8_t *dst = o + (Py_ssize_t)r * width;
            for (int c = 0; c < width; c++) {
                uint8_t support = (uint8_t)(up[c] + mid[c] + down[c]);
                dst[c] = (uint8_t)(((mr[c] != 0) & (support >= ms)) |
                                   ((ir[c] != 0) & (support >= is)));
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(flagged);
    PyMem_Free(columns);
    PyBuffer_Release(&out);
    PyBuffer_Release(&intra);
    PyBuffer_Release(&moving);
    Py_RETURN_NONE;
release_intra:
    PyBuffer_Release(&intra);
release_moving:
    PyBuffer_Release(&moving);
    return NULL;
}

/* codec.changed_macroblocks on two 8-bit luma planes: per 16x16 macroblock, the sum of |dY|
 * over every step-th pixel of every step-th row inside the width x height frame, against
 * threshold * (that macroblock's sample count), the product in float32 as numpy forms it. */
static PyObject *changed_macroblocks(PyObject *self, PyObject *args)
{
    PyObject *a_obj, *b_obj, *out_obj;
    Py_ssize_t line_a, line_b;
    int width, height, step;
    float threshold;
    if (!PyArg_ParseTuple(args, "OnOniiifO", &a_obj, &line_a, &b_obj, &line_b, &width,
                          &height, &step, &threshold, &out_obj))
        return NULL;
    if (width <= 0 || height <= 0 || step <= 0 || 16 % step || line_a < width
        || line_b < width) {
        PyErr_SetString(PyExc_ValueError, "need width, height > 0, a step dividing 16 and "
                        "line sizes of at least the width");
        return NULL;
    }
    int mb_h = (height + 15) / 16, mb_w = (width + 15) / 16;
    Py_buffer a, b, out;
    if (PyObject_GetBuffer(a_obj, &a, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(b_obj, &b, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&a); return NULL; }
    Py_ssize_t need_a = (Py_ssize_t)(height - 1) * line_a + width;
    Py_ssize_t need_b = (Py_ssize_t)(height - 1) * line_b + width;
    if (a.len < need_a || b.len < need_b) {
        PyErr_Format(PyExc_ValueError, "luma planes hold %zd / %zd bytes, need %zd / %zd",
                     a.len, b.len, need_a, need_b);
        goto fail;
    }
    if (writable(out_obj, &out, (Py_ssize_t)mb_h * mb_w, "out") < 0) goto fail;
    /* sums of |dY| per macroblock; sampled rows per macroblock row, columns per column */
    int32_t *sums = PyMem_Calloc((size_t)mb_h * mb_w + mb_h + mb_w, sizeof(int32_t));
    if (!sums) {
        PyErr_NoMemory();
        PyBuffer_Release(&out);
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    /* locals, not the address-taken arguments: stores could alias those */
    const int w = width, h = height, by = step, columns = mb_w;
    const Py_ssize_t stride_a = line_a, stride_b = line_b;
    const unsigned char *pa = a.buf, *pb = b.buf;
    int32_t *rows_in = sums + (Py_ssize_t)mb_h * columns, *columns_in = rows_in + mb_h;
    for (int x = 0; x < w; x += by) columns_in[x >> 4]++;
    for (int y = 0; y < h; y += by) {
        const unsigned char *ra = pa + (Py_ssize_t)y * stride_a;
        const unsigned char *rb = pb + (Py_ssize_t)y * stride_b;
        int32_t *row_sums = sums + (Py_ssize_t)(y >> 4) * columns;
        rows_in[y >> 4]++;
        for (int x = 0; x < w; x += by) {
            int d = (int)ra[x] - (int)rb[x];
            row_sums[x >> 4] += d < 0 ? -d : d;
        }
    }
    /* samples in a macroblock = its sampled rows x its sampled columns (>= 1 each) */
    unsigned char *o = out.buf;
    for (int r = 0; r < mb_h; r++)
        for (int c = 0; c < columns; c++) {
            float limit = threshold * (float)(rows_in[r] * columns_in[c]);
            o[(Py_ssize_t)r * columns + c] = (double)sums[(Py_ssize_t)r * columns + c]
                                             > (double)limit;
        }
    Py_END_ALLOW_THREADS
    PyMem_Free(sums);
    PyBuffer_Release(&out);
    PyBuffer_Release(&b);
    PyBuffer_Release(&a);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&b);
    PyBuffer_Release(&a);
    return NULL;
}

static PyMethodDef methods[] = {
    {"macroblock_signals", macroblock_signals, METH_VARARGS,
     "Moving / intra flags per macroblock and global motion per frame from AVMotionVector "
     "records; see codec.macroblock_signals."},
    {"dynamic_macroblocks", dynamic_macroblocks, METH_VARARGS,
     "Moving / intra macroblocks with enough flagged neighbours; see "
     "policy.dynamic_macroblocks."},
    {"changed_macroblocks", changed_macroblocks, METH_VARARGS,
     "Macroblocks whose sampled mean |dY| exceeds a threshold; see "
     "codec.changed_macroblocks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_codec_kernels",
    "Compiled kernels of codecsight.codec (see _codec_kernels.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__codec_kernels(void) { return PyModule_Create(&module); }
