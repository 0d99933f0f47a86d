"""The numba kernel behind `workbench.models.stream` (a module of its own so that numba is imported, and the
compiled kernel loaded from its on-disk cache, only when a few-row linear first runs)."""

import math

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

CHUNK = 32  # weight rows per parallel work item (a multiple of 4: rows are dotted four at a time)
# an expert of 2 to ACROSS_ROWS input rows holding at most ACROSS_VALUES values (16 KB: they stay in L1) streams
# one weight row at a time past all of them (`across`) instead of four against four inputs (`four`). Measured with
# cold weights on a 2-core AMD EPYC: 1.1-1.8x the read rate for 2-8 rows of 128-1024 inputs; `four` is faster for
# more rows or wider inputs
ACROSS_ROWS, ACROSS_VALUES = 8, 4096
# fp32 weight rows are prefetched this far ahead in the `across` order, and the next four in the `four` order when
# an expert has at least 4 input rows (its dots then run long enough to hide the load). Measured on a 2-core AMD
# EPYC (Zen 5), replaying a forward's kernel calls with cold caches (bench/kernel_replay.py): 1-5% less kernel
# time at 8 and 32 tokens, 3% more at one token (no row is prefetched there); prefetching for experts of 1-3
# rows as well cost about 10%
AHEAD = 4


_PREFETCH = "llvm.prefetch.p0" if binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"  # opaque pointers


@intrinsic
def prefetch(typingctx, array, index):
    """A hint that array[index] (a 1-D contiguous array) will be read soon: LLVM's prefetch, for reading, into every
    cache level. It never faults and changes no value."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        signature_ir = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, signature_ir, _PREFETCH)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


WIDE = '"prefer-vector-width"="512"'  # an LLVM function attribute (as clang's -mprefer-vector-width=512 sets)


@intrinsic
def wide_vectors(typingctx):
    """Marks the function being compiled (a parallel loop's body, where called inside one) to vectorise with the
    widest registers the CPU has. LLVM's tuning for several Intel cores with AVX-512 (this project's 2-core Xeon
    reads as `rocketlake`) prefers 256-bit vectors, which halves the dots' FMA and load width; on it 512-bit ones
    took 4-6% off the kernel's time at 32 tokens (bench/small_batch.py, old and new code in alternation). No
    effect where the CPU has no AVX-512, nor where its tuning already uses them (AMD's Zen 4 and 5)."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, WIDE)  # a string attribute, which llvmlite's known-names check refuses
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(inline="always")
def fetch_rows(w, e, first, stop):  # pragma: no cover - compiled
    """`prefetch` every cache line of weight rows first..stop of expert e (those that exist)."""
    for r in range(first, min(stop, w.shape[1])):
        row = w[e, r]
        for c in range(0, row.shape[0], 16):  # 16 floats: a 64-byte line
            prefetch(row, c)


@numba.njit(nogil=True)  # not cached: numba cannot cache a function that reads its threading layer
def threads():  # pragma: no cover - compiled
    """numba's thread count for parallel kernels started from this thread."""
    return numba.get_num_threads()


@numba.njit(inline="always", cache=True)
def across_order(rows, inputs):  # pragma: no cover - compiled
    """Whether an expert of `rows` input rows of `inputs` values each takes the `across` loop order."""
    return 2 <= rows <= ACROSS_ROWS and rows * inputs <= ACROSS_VALUES


@numba.njit(inline="always", fastmath=True)
def dot(a, b):  # pragma: no cover - compiled
    """sum a[c] * b[c] in fp32, vectorised in the one order LLVM gives this loop."""
    s = np.float32(0.0)
    for c in range(a.shape[0]):
        s += a[c] * b[c]
    return s


@numba.njit(inline="always", fastmath=True)
def dot4(a0, a1, a2, a3, b):  # pragma: no cover - compiled
    """`dot` of four rows with b, each value of b loaded once for the four."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for c in range(b.shape[0]):
        s0 += a0[c] * b[c]
        s1 += a1[c] * b[c]
        s2 += a2[c] * b[c]
        s3 += a3[c] * b[c]
    return s0, s1, s2, s3


@numba.njit(inline="always", fastmath=True)
def dot44(a0, a1, a2, a3, b0, b1, b2, b3):  # pragma: no cover - compiled
    """The 16 `dot`s of four weight rows with four input rows, s[4q + j] = a_j . b_q: each loaded value serves
    four products, so a few-row matmul runs at the FMA units' rate rather than the loads'."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for c in range(b0.shape[0]):
        w0, w1, w2, w3 = a0[c], a1[c], a2[c], a3[c]
        x0, x1, x2, x3 = b0[c], b1[c], b2[c], b3[c]
        s00 += w0 * x0
        s01 += w1 * x0
        s02 += w2 * x0
        s03 += w3 * x0
        s10 += w0 * x1
        s11 += w1 * x1
        s12 += w2 * x1
        s13 += w3 * x1
        s20 += w0 * x2
        s21 += w1 * x2
        s22 += w2 * x2
        s23 += w3 * x2
        s30 += w0 * x3
        s31 += w1 * x3
        s32 += w2 * x3
        s33 += w3 * x3
    return s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33


@numba.njit(inline="always")
def decode(fmt, wq, sf, sq, bo, bi, fp8, fp4, e8m0, e, i, row):  # pragma: no cover - compiled
    """Weight row i of expert e decoded from its codes into `row` as fp32: FP8 (fmt 1) or FP4 (fmt 2)."""
    if fmt == 1:  # FP8 codes, one fp32 scale per block of bi inputs (a division per value ran 4x slower)
        s, codes = sf[e, i // bo], wq[e, i]
        for start in range(0, row.shape[0], bi):
            m = s[start // bi]
            for c in range(start, min(start + bi, row.shape[0])):
                row[c] = np.float32(fp8[codes[c]] * m)
    else:  # FP4 codes two per byte, low nibble first, one e8m0 exponent per 32 values
        s, codes = sq[e, i], wq[e, i]
        for c in range(row.shape[0] // 2):
            m = e8m0[s[c // 16]]
            row[2 * c] = np.float32(fp4[codes[c] & 15] * m)
            row[2 * c + 1] = np.float32(fp4[codes[c] >> 4] * m)


@numba.njit(inline="always", fastmath=True)
def four(out, x, rows, first, last, i, w0, w1, w2, w3):  # pragma: no cover - compiled
    """out[p, i:i+4] for pairs p in first..last: weight rows i..i+3 (fp32) against input row x[rows[p]], four
    pairs at a time, then one at a time."""
    p = first
    while p + 4 <= last:
        s = dot44(w0, w1, w2, w3, x[rows[p]], x[rows[p + 1]], x[rows[p + 2]], x[rows[p + 3]])
        for q in range(4):
            for j in range(4):
                out[p + q, i + j] = s[4 * q + j]
        p += 4
    for p in range(p, last):
        out[p, i], out[p, i + 1], out[p, i + 2], out[p, i + 3] = dot4(w0, w1, w2, w3, x[rows[p]])


@numba.njit(inline="always", fastmath=True)
def across(out, x, rows, first, last, i, w):  # pragma: no cover - compiled
    """out[p, i] for pairs p in first..last: weight row i (fp32) against four input rows at a time (each weight
    value loaded once for four), then one at a time."""
    p = first
    while p + 4 <= last:
        out[p, i], out[p + 1, i], out[p + 2, i], out[p + 3, i] = dot4(
            x[rows[p]], x[rows[p + 1]], x[rows[p + 2]], x[rows[p + 3]], w)
        p += 4
    for p in range(p, last):
        out[p, i] = dot(w, x[rows[p]])


@numba.njit(inline="always", fastmath=True)
def one(out, x, rows, first, last, i, w):  # pragma: no cover - compiled
    """out[p, i] for pairs p in first..last: weight row i (fp32) against input row x[rows[p]]."""
    for p in range(first, last):
        out[p, i] = dot(w, x[rows[p]])


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False, fastmath=True)
def kernel(x, rows, experts, begin, end, fmt, wf, wq, sf, sq, bo, bi, fp8, fp4, e8m0, outs):  # pragma: no cover
    """outs[proj][p] = W_proj[experts[j]] @ x[rows[p]] for p in begin[j]..end[j] (`stream.grouped_linear`); work items
    are (projection, expert, CHUNK weight rows), spread over the threads (projections may differ in width: dense
    ones, `stream.linears`). fp32 weights (fmt 0) are dotted where they lie (the coming rows prefetched, `AHEAD`),
    codes decoded into a scratch row first; both go through the same `across`, or `four` and `one`: which of the
    two, the expert's row count and the input width alone decide."""
    n_in, widest = x.shape[1], 0
    for proj in range(len(outs)):
        widest = max(widest, wf[proj].shape[1] if fmt == 0 else wq[proj].shape[1])
    chunks = (widest + CHUNK - 1) // CHUNK
    per_proj = len(experts) * chunks
    for item in numba.prange(len(outs) * per_proj):
        wide_vectors()
        proj, j, chunk = item // per_proj, item % per_proj // chunks, item % chunks
        n_out = wf[proj].shape[1] if fmt == 0 else wq[proj].shape[1]  # its outs may be wider (`stream.linears`)
        if chunk * CHUNK >= n_out:  # a narrower projection's items past its rows
            continue
        e, first, last, out = experts[j], begin[j], end[j], outs[proj]
        w, codes, scales, exponents = wf[proj], wq[proj], sf[proj], sq[proj]
        scratch = np.empty((4, n_in), np.float32)
        i, stop = chunk * CHUNK, min((chunk + 1) * CHUNK, n_out)
        if across_order(last - first, n_in):  # its inputs stay in L1
            for r in range(i, stop):
                if fmt == 0:
                    fetch_rows(w, e, r + AHEAD, r + AHEAD + 1)
                    across(out, x, rows, first, last, r, w[e, r])
                else:
                    decode(fmt, codes, scales, exponents, bo, bi, fp8, fp4, e8m0, e, r, scratch[0])
                    across(out, x, rows, first, last, r, scratch[0])
            continue
        if fmt == 0 and last - first >= 4:  # long dots: the next four rows prefetched while these are dotted
            while i + 4 <= stop:
                fetch_rows(w, e, i + 4, i + 8)
                four(out, x, rows, first, last, i, w[e, i], w[e, i + 1], w[e, i + 2], w[e, i + 3])
                i += 4
        while i + 4 <= stop:  # four weight rows against each input row: each input value loaded once for four
            if fmt == 0:
                four(out, x, rows, first, last, i, w[e, i], w[e, i + 1], w[e, i + 2], w[e, i + 3])
            else:
                for r in range(4):
                    decode(fmt, codes, scales, exponents, bo, bi, fp8, fp4, e8m0, e, i + r, scratch[r])
                four(out, x, rows, first, last, i, scratch[0], scratch[1], scratch[2], scratch[3])
            i += 4
        for r in range(i, stop):  # the last rows of a weight whose row count is not a multiple of 4
            if fmt == 0:
                one(out, x, rows, first, last, r, w[e, r])
            else:
                decode(fmt, codes, scales, exponents, bo, bi, fp8, fp4, e8m0, e, r, scratch[0])
                one(out, x, rows, first, last, r, scratch[0])


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def glu(gate, up, act, limit, alpha, out):  # pragma: no cover - compiled
    """out = act(gate) * up row by row (act 0: SiLU, 1: GELU), or GPT-OSS's (up + 1) * gate * sigmoid(alpha * gate)
    where alpha > 0; gate clamped above and up both sides at `limit` where limit > 0. Each row runs the same
    scalar code, so a value's result does not depend on where in the buffer its row lies."""
    for p in numba.prange(gate.shape[0]):
        for c in range(gate.shape[1]):
            g, u = gate[p, c], up[p, c]
            if limit > 0:
                g = limit if g > limit else g
                u = limit if u > limit else (-limit if u < -limit else u)
            if alpha > 0:
                out[p, c] = (u + np.float32(1)) * g / (np.float32(1) + np.exp(-g * alpha))
            elif act == 0:
                out[p, c] = g / (np.float32(1) + np.exp(-g)) * u
            else:
                out[p, c] = np.float32(0.5) * g * (np.float32(1) + math.erf(g * np.float32(0.7071067811865476))) * u


@numba.njit(cache=True, nogil=True, boundscheck=False)
def rope(x, cos, sin, dim, interleaved, out):  # pragma: no cover - compiled
    """out = x [N, T, D] with its first `dim` channels rotated by cos, sin [T, dim/2] (`stream.rope`), on one thread;
    each value the product, difference and sum torch's ops give (no fastmath: nothing fused or reordered)."""
    half = dim // 2
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            row, dst = x[n, t], out[n, t]
            for i in range(half):
                j, k = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
                c, s = cos[t, i], sin[t, i]
                dst[j] = row[j] * c - row[k] * s
                dst[k] = row[k] * c + row[j] * s
            for d in range(dim, row.shape[0]):
                dst[d] = row[d]


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def moe_sum(outs, where, weights, y):  # pragma: no cover - compiled
    """y[n] = sum_j outs[where[n * k + j]] * weights[n, j], slot by slot from zero: each product and each sum rounded to
    fp32 as torch's separate multiply and add round them (no fastmath here: no fused multiply-adds, no reordering)."""
    k = weights.shape[1]
    for n in numba.prange(y.shape[0]):
        for h in range(y.shape[1]):
            y[n, h] = np.float32(0.0)
        for j in range(k):
            w, row = weights[n, j], outs[where[n * k + j]]
            for h in range(y.shape[1]):
                y[n, h] += row[h] * w


@numba.njit(cache=True, nogil=True, boundscheck=False)
def plan(ids, n_experts, limit, order, where, rows, experts, few, begin, end, counts):  # pragma: no cover
    """`stream.plan` of ids [N, k] by a counting sort (stable: pairs keep their order within an expert): fills the
    per-pair arrays, counts, and the experts of 1 to `limit` pairs with their ranges; returns how many such
    experts and how many of more pairs, or (-1, -1) where an id is outside [0, n_experts)."""
    n, k = ids.shape
    counts[:] = 0
    for t in range(n):
        for j in range(k):
            e = ids[t, j]
            if e < 0 or e >= n_experts:
                return -1, -1
            counts[e] += 1
    n_few = n_big = start = 0
    for e in range(n_experts):
        c = counts[e]
        if 0 < c <= limit:
            few[n_few], begin[n_few], end[n_few] = e, start, start + c
            n_few += 1
        if c > limit:
            n_big += 1
        counts[e] = start  # from here: the next free place of expert e
        start += c
    for t in range(n):
        for j in range(k):
            e = ids[t, j]
            p = counts[e]
            counts[e] = p + 1
            order[p], where[t * k + j], rows[p], experts[p] = t * k + j, p, t, e
    for e in range(n_experts - 1, 0, -1):  # back to counts: each next free place is now the expert's end
        counts[e] -= counts[e - 1]
    return n_few, n_big


@numba.njit(cache=True, nogil=True, boundscheck=False)
def select(scores, bias, biased, groups, topk_groups, top2, ids):  # pragma: no cover - compiled
    """`routing.select_experts` of fp32 scores [N, E] into ids [N, k] (`stream.select`): scores plus the bias where
    `biased`; where `topk_groups` < `groups`, the groups ranked by their top-2 sum (`top2`) or max, the best kept
    and the others' experts at -inf; then the k best experts in one pass, a later expert passing an earlier one
    only when larger (a stable sort's order). Returns False, ids unfinished, where a value is NaN (whose place in
    torch's sort this does not copy)."""
    n, n_experts = scores.shape
    k, per = ids.shape[1], n_experts // groups
    sel = np.empty(n_experts, np.float32)
    rank = np.empty(groups, np.float32)
    kept = np.empty(groups, np.bool_)
    top = np.empty(k, np.float32)
    low = np.float32(-np.inf)  # every comparison and the top-2 sum in fp32, as torch's
    for t in range(n):
        for e in range(n_experts):
            sel[e] = scores[t, e] + bias[e] if biased else scores[t, e]
            if np.isnan(sel[e]):
                return False
        if topk_groups < groups:
            for g in range(groups):
                a = b = low  # the group's two largest values
                for e in range(g * per, (g + 1) * per):
                    if sel[e] > a:
                        a, b = sel[e], a
                    elif sel[e] > b:
                        b = sel[e]
                rank[g] = a + b if top2 else a
                if np.isnan(rank[g]):
                    return False
                kept[g] = False
            for _ in range(topk_groups):
                best = -1
                for g in range(groups):
                    if not kept[g] and (best < 0 or rank[g] > rank[best]):
                        best = g
                kept[best] = True
            for g in range(groups):
                if not kept[g]:
                    sel[g * per:(g + 1) * per] = low
        m = 0  # the best m experts so far, in order, in top[:m] and ids[t, :m]
        for e in range(n_experts):
            v = sel[e]
            if m == k and not v > top[k - 1]:
                continue
            p = m if m < k else k - 1
            while p > 0 and top[p - 1] < v:
                top[p], ids[t, p] = top[p - 1], ids[t, p - 1]
                p -= 1
            top[p], ids[t, p] = v, e
            m = min(m + 1, k)
    return True
