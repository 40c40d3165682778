//! The element-wise work of the passes: a vectorisable `exp` and `ln` for `f32`, and the row
//! kernels each pass applies to one chunk of rows.
//!
//! Every kernel is written with explicit lanes (fixed-size arrays, no fused multiply-add), so the
//! compiler vectorises it without changing the order of any operation: results are bit-identical
//! whichever instruction set runs them. [`multiversion!`] compiles each chunk kernel three
//! times, generic, with AVX2 and with AVX-512, and picks one at run time.

/// Lanes of the f32 accumulators (two AVX2 registers).
pub(crate) const LANES: usize = 16;
/// Columns summed in f32 lanes before the partial sum is added in f64.
const COL_BLOCK: usize = 256;
/// Rows whose column contributions are summed in f32 before being added to the f64 partials.
pub(crate) const SUB_ROWS: usize = 32;

/// Entries more than e^DROP below their row's largest entry are stored as their (negative)
/// logarithm instead of their value; stored values are positive, so the sign tells the two apart.
pub(crate) const DROP: f32 = 64.0;

/// How far ahead (in f32 values, 8 KiB) a streaming loop asks the cache for data. The hardware
/// prefetchers stop at 4 KiB page boundaries; asking explicitly doubles the read bandwidth on
/// the machines this was measured on.
pub(crate) const AHEAD: usize = 2048;

/// Hints the cache to fetch the line holding `w[i]`, if there is one.
#[inline(always)]
pub(crate) fn prefetch(w: &[f32], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if i < w.len() {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: `i` is in bounds, so the pointer is valid; a prefetch only hints the cache
        // and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(i).cast::<i8>()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, i);
}

/// Compiles `fn $name(args) -> ret` as a dispatcher over a generic, an AVX2 and an AVX-512
/// build of `$imp`, and picks the widest the CPU runs.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:path) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked on the line above), the only
                    // requirement of calling a function compiled for it.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked on the line above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

/// e^x in f32 for x ≤ 88: Cody–Waite reduction to r ∈ [−ln2/2, ln2/2] and a degree-7 Taylor
/// polynomial (truncation error below 6e-9, about 2 ulp overall). Results below e^−87 are 0,
/// never subnormal.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2^15.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let ni = t.to_bits().wrapping_sub(SHIFTER.to_bits()) as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// ln x in f32 for positive normal x: x = m·2^e with m ∈ [√½, √2), then
/// ln m = 2·atanh(s), s = (m−1)/(m+1), by its series to s^11 (|s| < 0.172).
#[inline(always)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let bits = x.to_bits();
    let e = ((bits >> 23) as i32) - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = (e + big as i32) as f32;
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let series = 2.0
        * s
        * (1.0
            + z * (1.0 / 3.0
                + z * (1.0 / 5.0 + z * (1.0 / 7.0 + z * (1.0 / 9.0 + z * (1.0 / 11.0))))));
    e * LN2_HI + (series + e * LN2_LO)
}

/// Stores a log-relative value `r ≤ 0`: e^r when it is at least e^−DROP, else r itself.
#[inline(always)]
pub(crate) fn encode(r: f32) -> f32 {
    let e = exp_f32(r);
    if r >= -DROP {
        e
    } else {
        r
    }
}

/// The log-relative value of a stored entry (inverse of [`encode`]).
#[inline(always)]
pub(crate) fn decode(w: f32) -> f32 {
    let l = ln_f32(if w > 0.0 { w } else { 1.0 });
    if w > 0.0 {
        l
    } else {
        w
    }
}

/// Half the lanes: accumulators are kept as two arrays of 8, which vectorises more reliably
/// than one of 16. Lane l < 8 lives in the first, lane l ≥ 8 in the second.
const HALF: usize = LANES / 2;

#[inline(always)]
fn pos(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Adds the 16 lanes in f64, in lane order.
#[inline(always)]
fn fold_lanes(a0: &[f32; HALF], a1: &[f32; HALF]) -> f64 {
    let mut t = [0f64; HALF];
    for l in 0..HALF {
        t[l] = a0[l] as f64 + a1[l] as f64;
    }
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// Adds remainder element `l` (< LANES) into its lane.
#[inline(always)]
fn add_lane(a0: &mut [f32; HALF], a1: &mut [f32; HALF], l: usize, x: f32) {
    if l < HALF {
        a0[l] += x;
    } else {
        a1[l - HALF] += x;
    }
}

/// Σ_j max(w_j, 0)·v_j: f32 lanes over blocks of [`COL_BLOCK`] columns, the blocks added in f64.
#[inline(always)]
pub(crate) fn dot_pos(w: &[f32], v: &[f32]) -> f64 {
    dot_pos_ahead(w, v, &[])
}

/// [`dot_pos`], prefetching `ahead[j]` as it reads `w[j]` (`ahead` starts [`AHEAD`] values
/// after `w`, or is empty).
#[inline(always)]
fn dot_pos_ahead(w: &[f32], v: &[f32], ahead: &[f32]) -> f64 {
    let mut total = 0f64;
    for (b, (wb, vb)) in w.chunks(COL_BLOCK).zip(v.chunks(COL_BLOCK)).enumerate() {
        let (mut a0, mut a1) = ([0f32; HALF], [0f32; HALF]);
        let wc = wb.chunks_exact(LANES);
        let vc = vb.chunks_exact(LANES);
        let (wr, vr) = (wc.remainder(), vc.remainder());
        for (c, (a, b2)) in wc.zip(vc).enumerate() {
            prefetch(ahead, b * COL_BLOCK + c * LANES);
            for l in 0..HALF {
                a0[l] += pos(a[l]) * b2[l];
                a1[l] += pos(a[l + HALF]) * b2[l + HALF];
            }
        }
        for (l, (&a, &b2)) in wr.iter().zip(vr).enumerate() {
            add_lane(&mut a0, &mut a1, l, pos(a) * b2);
        }
        total += fold_lanes(&a0, &a1);
    }
    total
}

/// acc_j += u·max(w_j, 0).
#[inline(always)]
pub(crate) fn axpy_pos(acc: &mut [f32], u: f32, w: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(w) {
        *a += u * pos(x);
    }
}

/// [`axpy_pos`]`(acc, u, cur)` and [`dot_pos`]`(next, v)` in one loop, so the next row streams
/// in from memory while the current one (already in cache) is accumulated; `ahead` as in
/// [`dot_pos_ahead`] for `next`. Same operations in the same order as the two separately.
#[inline(always)]
fn axpy_then_dot(
    acc: &mut [f32],
    u: f32,
    cur: &[f32],
    next: &[f32],
    v: &[f32],
    ahead: &[f32],
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked on the line above).
        return unsafe { axpy_then_dot_avx2(acc, u, cur, next, v, ahead) };
    }
    axpy_then_dot_generic(acc, u, cur, next, v, ahead)
}

/// The portable body of [`axpy_then_dot`].
#[inline(always)]
fn axpy_then_dot_generic(
    acc: &mut [f32],
    u: f32,
    cur: &[f32],
    next: &[f32],
    v: &[f32],
    ahead: &[f32],
) -> f64 {
    let mut total = 0f64;
    let blocks = acc
        .chunks_mut(COL_BLOCK)
        .zip(cur.chunks(COL_BLOCK))
        .zip(next.chunks(COL_BLOCK))
        .zip(v.chunks(COL_BLOCK));
    for (bi, (((ab, cb), nb), vb)) in blocks.enumerate() {
        let (mut a0, mut a1) = ([0f32; HALF], [0f32; HALF]);
        let mut ac = ab.chunks_exact_mut(LANES);
        let cc = cb.chunks_exact(LANES);
        let nc = nb.chunks_exact(LANES);
        let vc = vb.chunks_exact(LANES);
        let (cr, nr, vr) = (cc.remainder(), nc.remainder(), vc.remainder());
        for (ci, (((a, c), n), b)) in (&mut ac).zip(cc).zip(nc).zip(vc).enumerate() {
            prefetch(ahead, bi * COL_BLOCK + ci * LANES);
            for l in 0..LANES {
                a[l] += u * pos(c[l]);
            }
            for l in 0..HALF {
                a0[l] += pos(n[l]) * b[l];
                a1[l] += pos(n[l + HALF]) * b[l + HALF];
            }
        }
        for (x, &c) in ac.into_remainder().iter_mut().zip(cr) {
            *x += u * pos(c);
        }
        for (l, (&a, &b)) in nr.iter().zip(vr).enumerate() {
            add_lane(&mut a0, &mut a1, l, pos(a) * b);
        }
        total += fold_lanes(&a0, &a1);
    }
    total
}

/// [`axpy_then_dot`] written with AVX2 intrinsics: the compiler's own vectorisation of that
/// loop spills and shuffles. The same operations on the same lanes in the same order, so the
/// same bits: `max(x, 0)` returns its second operand for NaN and ±0, as [`pos`] does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_then_dot_avx2(
    acc: &mut [f32],
    u: f32,
    cur: &[f32],
    next: &[f32],
    v: &[f32],
    ahead: &[f32],
) -> f64 {
    use std::arch::x86_64::*;
    let k = cur.len();
    assert!(acc.len() == k && next.len() == k && v.len() == k);
    let zero = _mm256_setzero_ps();
    let uu = _mm256_set1_ps(u);
    let (pa, pc, pn, pv) = (acc.as_mut_ptr(), cur.as_ptr(), next.as_ptr(), v.as_ptr());
    let mut total = 0f64;
    let mut start = 0;
    while start < k {
        let end = (start + COL_BLOCK).min(k);
        let (mut d0, mut d1) = (zero, zero);
        let mut j = start;
        while j + LANES <= end {
            prefetch(ahead, j);
            // SAFETY (all loads and stores): j + LANES ≤ k and every slice has length k.
            let c0 = _mm256_loadu_ps(pc.add(j));
            let c1 = _mm256_loadu_ps(pc.add(j + HALF));
            let s0 = _mm256_loadu_ps(pa.add(j));
            let s1 = _mm256_loadu_ps(pa.add(j + HALF));
            let t0 = _mm256_mul_ps(uu, _mm256_max_ps(c0, zero));
            let t1 = _mm256_mul_ps(uu, _mm256_max_ps(c1, zero));
            _mm256_storeu_ps(pa.add(j), _mm256_add_ps(s0, t0));
            _mm256_storeu_ps(pa.add(j + HALF), _mm256_add_ps(s1, t1));
            let n0 = _mm256_max_ps(_mm256_loadu_ps(pn.add(j)), zero);
            let n1 = _mm256_max_ps(_mm256_loadu_ps(pn.add(j + HALF)), zero);
            d0 = _mm256_add_ps(d0, _mm256_mul_ps(n0, _mm256_loadu_ps(pv.add(j))));
            d1 = _mm256_add_ps(d1, _mm256_mul_ps(n1, _mm256_loadu_ps(pv.add(j + HALF))));
            j += LANES;
        }
        let (mut a0, mut a1) = ([0f32; HALF], [0f32; HALF]);
        _mm256_storeu_ps(a0.as_mut_ptr(), d0);
        _mm256_storeu_ps(a1.as_mut_ptr(), d1);
        for (l, jj) in (j..end).enumerate() {
            acc[jj] += u * pos(cur[jj]);
            add_lane(&mut a0, &mut a1, l, pos(next[jj]) * v[jj]);
        }
        total += fold_lanes(&a0, &a1);
        start = end;
    }
    total
}

/// The values [`AHEAD`] after position `at` of `w` (empty past the end).
#[inline(always)]
fn ahead_of(w: &[f32], at: usize) -> &[f32] {
    w.get(at + AHEAD..).unwrap_or(&[])
}

/// One Sinkhorn sweep over a chunk of rows: for each row, its normaliser d = Σ_j w_ij·v_j, then
/// the row's contribution w_ij/d to every column sum, summed in f32 over [`SUB_ROWS`] rows and
/// then in f64. `out` receives the chunk's column sums; `acc` is scratch of length K.
///
/// Short rows (K ≤ [`COL_BLOCK`]) take a block's normalisers first (independent dot products)
/// and then its contributions; long rows overlap each row's contributions with the next row's
/// normaliser. Both do the same operations in the same order.
#[inline(always)]
pub(crate) fn sweep_rows_impl(w: &[f32], k: usize, v: &[f32], acc: &mut [f32], out: &mut [f64]) {
    out.fill(0.0);
    acc.fill(0.0);
    let flush = |out: &mut [f64], acc: &mut [f32]| {
        for (o, a) in out.iter_mut().zip(acc.iter_mut()) {
            *o += *a as f64;
            *a = 0.0;
        }
    };
    if k <= COL_BLOCK {
        let mut u = [0f32; SUB_ROWS];
        for (b, block) in w.chunks(SUB_ROWS * k).enumerate() {
            for (r, (ui, row)) in u.iter_mut().zip(block.chunks_exact(k)).enumerate() {
                let ahead = ahead_of(w, (b * SUB_ROWS + r) * k);
                *ui = (1.0 / dot_pos_ahead(row, v, ahead)) as f32;
            }
            for (&ui, row) in u.iter().zip(block.chunks_exact(k)) {
                axpy_pos(acc, ui, row);
            }
            flush(out, acc);
        }
        return;
    }
    let rows = w.len() / k;
    if rows == 0 {
        return;
    }
    let mut d = dot_pos(&w[..k], v);
    for i in 0..rows {
        let u = (1.0 / d) as f32;
        let cur = &w[i * k..(i + 1) * k];
        if i + 1 < rows {
            let next = &w[(i + 1) * k..(i + 2) * k];
            d = axpy_then_dot(acc, u, cur, next, v, ahead_of(w, (i + 1) * k));
        } else {
            axpy_pos(acc, u, cur);
        }
        if (i + 1) % SUB_ROWS == 0 || i + 1 == rows {
            flush(out, acc);
        }
    }
}

multiversion! {
    pub(crate) fn sweep_rows(w: &[f32], k: usize, v: &[f32], acc: &mut [f32], out: &mut [f64])
        => sweep_rows_impl
}

/// A plain read of a chunk: the sum of its values (the bandwidth floor the benchmark compares
/// a sweep against).
#[inline(always)]
pub(crate) fn stream_sum_impl(w: &[f32]) -> f64 {
    let mut total = 0f64;
    for (bi, block) in w.chunks(COL_BLOCK).enumerate() {
        let (mut a0, mut a1) = ([0f32; HALF], [0f32; HALF]);
        let c = block.chunks_exact(LANES);
        let rest = c.remainder();
        for (ci, a) in c.enumerate() {
            prefetch(w, bi * COL_BLOCK + ci * LANES + AHEAD);
            for l in 0..HALF {
                a0[l] += a[l];
                a1[l] += a[l + HALF];
            }
        }
        for (l, &a) in rest.iter().enumerate() {
            add_lane(&mut a0, &mut a1, l, a);
        }
        total += fold_lanes(&a0, &a1);
    }
    total
}

multiversion! {
    pub(crate) fn stream_sum(w: &[f32]) -> f64 => stream_sum_impl
}

/// The largest value of a row, in lanes.
#[inline(always)]
fn max_f32(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = row.chunks_exact(LANES);
    let rest = c.remainder();
    for a in c {
        let a: &[f32; LANES] = a.try_into().expect("lane chunk");
        for l in 0..LANES {
            acc[l] = if a[l] > acc[l] { a[l] } else { acc[l] };
        }
    }
    for (l, &a) in rest.iter().enumerate() {
        acc[l] = if a > acc[l] { a } else { acc[l] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// The largest value of a row of f64, in lanes.
#[inline(always)]
fn max_f64(row: &[f64]) -> f64 {
    let mut acc = [f64::NEG_INFINITY; 8];
    let c = row.chunks_exact(8);
    let rest = c.remainder();
    for a in c {
        let a: &[f64; 8] = a.try_into().expect("lane chunk");
        for l in 0..8 {
            acc[l] = if a[l] > acc[l] { a[l] } else { acc[l] };
        }
    }
    for (l, &a) in rest.iter().enumerate() {
        acc[l] = if a > acc[l] { a } else { acc[l] };
    }
    acc.iter()
        .fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Σ_j e^(x_j − m): the exponentials into `tmp` (a plain map, which vectorises), then summed in
/// f32 lanes and f64.
#[inline(always)]
fn sum_exp(row: &[f32], m: f32, tmp: &mut [f32]) -> f64 {
    for (t, &x) in tmp.iter_mut().zip(row) {
        *t = exp_f32(x - m);
    }
    stream_sum_impl(tmp)
}

/// Stores the log-relative values `rel − mx` into `row`, [`encode`]d, and raises `colmax` to
/// them. Two single-width loops, so both vectorise.
#[inline(always)]
fn store_encoded(row: &mut [f32], rel: &[f64], mx: f64, colmax: &mut [f32]) {
    for (x, &r) in row.iter_mut().zip(rel) {
        *x = (r - mx) as f32;
    }
    for (x, cm) in row.iter_mut().zip(colmax.iter_mut()) {
        let r = *x;
        *cm = if r > *cm { r } else { *cm };
        *x = encode(r);
    }
}

/// The first index of `x` in `row` (0 if absent), by lanes that each keep the lowest index
/// where they saw it, so it vectorises.
#[inline(always)]
fn first_index_of(row: &[f32], x: f32) -> u32 {
    let mut first = [u32::MAX; LANES];
    let c = row.chunks_exact(LANES);
    let rest = c.remainder();
    for (ci, a) in c.enumerate() {
        let base = (ci * LANES) as u32;
        for l in 0..LANES {
            let at = if a[l] == x { base + l as u32 } else { u32::MAX };
            first[l] = first[l].min(at);
        }
    }
    match first.iter().fold(u32::MAX, |m, &i| m.min(i)) {
        u32::MAX => rest
            .iter()
            .position(|&a| a == x)
            .map_or(0, |p| (row.len() - rest.len() + p) as u32),
        best => best,
    }
}

/// Per-row bookkeeping the kernel keeps besides the matrix.
pub(crate) struct RowInit<'a> {
    /// Per row: log P_ij = (rel_ij − g_j)/λ + row_log_p_i.
    pub row_log_p: &'a mut [f64],
    /// Per column: the largest log-relative value over the chunk's rows.
    pub colmax: &'a mut [f32],
    /// Scratch of length K.
    pub rel: &'a mut [f64],
    /// Scratch of length K.
    pub tmp: &'a mut [f32],
}

/// Whether every value of `row` is finite (no early exit, so it vectorises).
#[inline(always)]
fn all_finite(row: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let mut bad = 0u32;
    for x in row {
        bad |= ((x.to_bits() & EXPONENT) == EXPONENT) as u32;
    }
    bad == 0
}

/// Turns a chunk of logit rows into stored kernel rows: rel_ij = λ(z_ij − max_j z_ij) + g_j,
/// shifted so each row's largest is 0, then [`encode`]d. Also records log-softmax offsets.
/// Stops at the first row holding a NaN or infinite logit, leaves it as it is and returns its
/// index in the chunk and the column of its first such value.
#[inline(always)]
pub(crate) fn build_rows_impl(
    w: &mut [f32],
    k: usize,
    lambda: f64,
    g: &[f64],
    out: RowInit<'_>,
) -> Option<(usize, usize)> {
    let RowInit {
        row_log_p,
        colmax,
        rel,
        tmp,
    } = out;
    colmax.fill(f32::NEG_INFINITY);
    for (i, (row, lp)) in w.chunks_exact_mut(k).zip(row_log_p.iter_mut()).enumerate() {
        if !all_finite(row) {
            let col = row.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Some((i, col));
        }
        let m = max_f32(row);
        let lse = m as f64 + sum_exp(row, m, tmp).ln();
        let mf = m as f64;
        for ((r, &z), &gj) in rel.iter_mut().zip(row.iter()).zip(g) {
            *r = lambda * (z as f64 - mf) + gj;
        }
        let mx = max_f64(rel);
        store_encoded(row, rel, mx, colmax);
        *lp = mf + mx / lambda - lse;
    }
    None
}

multiversion! {
    pub(crate) fn build_rows(
        w: &mut [f32],
        k: usize,
        lambda: f64,
        g: &[f64],
        out: RowInit<'_>,
    ) -> Option<(usize, usize)> => build_rows_impl
}

/// Absorbs a column log-scaling into a chunk of stored rows: rel_ij += shift_j, each row
/// re-shifted so its largest is 0, then re-[`encode`]d.
#[inline(always)]
pub(crate) fn absorb_rows_impl(
    w: &mut [f32],
    k: usize,
    lambda: f64,
    shift: &[f64],
    out: RowInit<'_>,
) {
    let RowInit {
        row_log_p,
        colmax,
        rel,
        ..
    } = out;
    colmax.fill(f32::NEG_INFINITY);
    for (row, lp) in w.chunks_exact_mut(k).zip(row_log_p.iter_mut()) {
        for x in row.iter_mut() {
            *x = decode(*x);
        }
        for ((r, &x), &s) in rel.iter_mut().zip(row.iter()).zip(shift) {
            *r = x as f64 + s;
        }
        let mx = max_f64(rel);
        store_encoded(row, rel, mx, colmax);
        *lp += mx / lambda;
    }
}

multiversion! {
    pub(crate) fn absorb_rows(w: &mut [f32], k: usize, lambda: f64, shift: &[f64], out: RowInit<'_>)
        => absorb_rows_impl
}

/// What the final pass needs besides the matrix.
pub(crate) struct AssignCtx<'a> {
    pub k: usize,
    /// The column scaling of the plan.
    pub v: &'a [f32],
    /// ln v_j.
    pub ln_v: &'a [f32],
    /// g_j/λ, the absorbed column log-scaling over λ.
    pub g_over_lambda: &'a [f32],
    /// 1/λ.
    pub inv_lambda: f32,
}

/// Sums the final pass accumulates over a chunk.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AssignTotals {
    pub entropy: f64,
    pub objective: f64,
    pub row_error: f64,
}

/// The final pass over a chunk: per row the normalised plan q_ij = w_ij·v_j / d_i, its argmax
/// (lowest index on ties) and largest value, entropy and Σ_j q_ij·log P_ij; per column Σ_i q_ij.
/// `q` and `lnw` are scratch of length K.
#[inline(always)]
pub(crate) fn assign_rows_impl(
    w: &[f32],
    ctx: &AssignCtx<'_>,
    row_log_p: &[f64],
    labels: &mut [u32],
    confidence: &mut [f32],
    colq: &mut [f64],
    scratch: (&mut [f32], &mut [f32]),
) -> AssignTotals {
    let (q, lnw) = scratch;
    let k = ctx.k;
    colq.fill(0.0);
    let mut acc = vec![0f32; k];
    let mut totals = AssignTotals::default();
    let mut rows = row_log_p
        .iter()
        .zip(labels.iter_mut().zip(confidence.iter_mut()));
    for (b, block) in w.chunks(SUB_ROWS * k).enumerate() {
        let rows_here = block.chunks_exact(k).zip(&mut rows).enumerate();
        for (r, (row, (&lp, (label, conf)))) in rows_here {
            let d = dot_pos_ahead(row, ctx.v, ahead_of(w, (b * SUB_ROWS + r) * k));
            let u = (1.0 / d) as f32;
            for ((qj, &x), &vj) in q.iter_mut().zip(row).zip(ctx.v) {
                *qj = pos(x) * vj * u;
            }
            for (l, &x) in lnw.iter_mut().zip(row) {
                *l = ln_f32(if x > 0.0 { x } else { 1.0 });
            }
            let best_q = max_f32(q);
            *label = first_index_of(q, best_q);
            *conf = best_q;
            let (mut sq0, mut sq1) = ([0f32; HALF], [0f32; HALF]);
            let (mut se0, mut se1) = ([0f32; HALF], [0f32; HALF]);
            let (mut so0, mut so1) = ([0f32; HALF], [0f32; HALF]);
            let qc = q.chunks_exact(LANES);
            let wc = lnw.chunks_exact(LANES);
            let lc = ctx.ln_v.chunks_exact(LANES);
            let gc = ctx.g_over_lambda.chunks_exact(LANES);
            let rest = (
                qc.remainder(),
                wc.remainder(),
                lc.remainder(),
                gc.remainder(),
            );
            let inv = ctx.inv_lambda;
            for (((qa, wa), la), ga) in qc.zip(wc).zip(lc).zip(gc) {
                for l in 0..HALF {
                    let h = l + HALF;
                    sq0[l] += qa[l];
                    sq1[l] += qa[h];
                    se0[l] += qa[l] * (wa[l] + la[l]);
                    se1[l] += qa[h] * (wa[h] + la[h]);
                    so0[l] += qa[l] * (wa[l] * inv - ga[l]);
                    so1[l] += qa[h] * (wa[h] * inv - ga[h]);
                }
            }
            let (qr, wr, lr, gr) = rest;
            for (l, (((&qa, &wa), &la), &ga)) in qr.iter().zip(wr).zip(lr).zip(gr).enumerate() {
                add_lane(&mut sq0, &mut sq1, l, qa);
                add_lane(&mut se0, &mut se1, l, qa * (wa + la));
                add_lane(&mut so0, &mut so1, l, qa * (wa * inv - ga));
            }
            for (a, &x) in acc.iter_mut().zip(q.iter()) {
                *a += x;
            }
            let qsum = fold_lanes(&sq0, &sq1);
            let qlnq = fold_lanes(&se0, &se1);
            let obj = fold_lanes(&so0, &so1);
            totals.entropy += qsum * d.ln() - qlnq;
            totals.objective += obj + qsum * lp;
            totals.row_error = totals.row_error.max((qsum - 1.0).abs());
        }
        for (o, a) in colq.iter_mut().zip(acc.iter_mut()) {
            *o += *a as f64;
            *a = 0.0;
        }
    }
    totals
}

multiversion! {
    pub(crate) fn assign_rows(
        w: &[f32],
        ctx: &AssignCtx<'_>,
        row_log_p: &[f64],
        labels: &mut [u32],
        confidence: &mut [f32],
        colq: &mut [f64],
        scratch: (&mut [f32], &mut [f32]),
    ) -> AssignTotals => assign_rows_impl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_never_subnormal() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-87.01), 0.0);
        assert_eq!(exp_f32(-1e4), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(-87.0) >= f32::MIN_POSITIVE);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn ln_is_accurate() {
        let mut worst = 0f64;
        let mut x = f32::MIN_POSITIVE;
        while x < 1e30 {
            let got = ln_f32(x) as f64;
            let want = (x as f64).ln();
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
            x *= 1.000_7;
        }
        assert!(worst < 3e-7, "worst error {worst}");
        assert_eq!(ln_f32(1.0), 0.0);
    }

    #[test]
    fn encode_round_trips() {
        for &r in &[
            0.0f32, -1e-3, -1.0, -20.0, -63.9, -64.0, -64.1, -200.0, -5000.0,
        ] {
            let e = encode(r);
            if r >= -DROP {
                assert!(e > 0.0, "{r} -> {e}");
            } else {
                assert_eq!(e, r);
            }
            assert!(
                (decode(e) - r).abs() <= 1e-5 * r.abs().max(1.0),
                "{r} -> {e} -> {}",
                decode(e)
            );
        }
    }

    #[test]
    fn both_sweep_orders_give_the_same_bits() {
        // K = 300 takes the overlapped path; the same rows cut to 256 columns the blocked one.
        // Each is checked against the plain per-row definition, which both must reproduce.
        for k in [300usize, 256, 100, 17] {
            let n = 70;
            let w: Vec<f32> = (0..n * k)
                .map(|i| {
                    if i % 7 == 0 {
                        -80.0
                    } else {
                        ((i * 37) % 101) as f32 / 101.0
                    }
                })
                .collect();
            let v: Vec<f32> = (0..k).map(|j| 1.0 - (j % 13) as f32 * 0.05).collect();
            let mut acc = vec![0f32; k];
            let mut out = vec![0f64; k];
            sweep_rows_impl(&w, k, &v, &mut acc, &mut out);
            let mut want = vec![0f64; k];
            let mut part = vec![0f32; k];
            for (r, row) in w.chunks_exact(k).enumerate() {
                axpy_pos(&mut part, (1.0 / dot_pos(row, &v)) as f32, row);
                if (r + 1) % SUB_ROWS == 0 || r + 1 == n {
                    for (o, p) in want.iter_mut().zip(part.iter_mut()) {
                        *o += *p as f64;
                        *p = 0.0;
                    }
                }
            }
            assert_eq!(out, want, "K = {k}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_fused_loops_agree_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        for k in [1usize, 15, 16, 17, 255, 256, 257, 1000] {
            let cur: Vec<f32> = (0..k)
                .map(|j| {
                    if j % 5 == 0 {
                        -70.0
                    } else {
                        (j % 11) as f32 * 0.1
                    }
                })
                .collect();
            let next: Vec<f32> = (0..k)
                .map(|j| {
                    if j % 3 == 0 {
                        -0.0
                    } else {
                        (j % 7) as f32 * 0.3
                    }
                })
                .collect();
            let v: Vec<f32> = (0..k).map(|j| 1.0 - (j % 13) as f32 * 0.05).collect();
            let start: Vec<f32> = (0..k).map(|j| j as f32 * 1e-3).collect();
            let (mut a, mut b) = (start.clone(), start);
            let x = axpy_then_dot_generic(&mut a, 0.37, &cur, &next, &v, &[]);
            // SAFETY: AVX2 is present (checked above).
            let y = unsafe { axpy_then_dot_avx2(&mut b, 0.37, &cur, &next, &v, &[]) };
            assert_eq!(x.to_bits(), y.to_bits(), "K = {k}");
            assert_eq!(a, b, "K = {k}");
        }
    }

    /// Rows of logits with ties, peaks and entries far below their row's largest.
    fn test_logits(n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| match i % 11 {
                0 => 3.0,
                1 => -9.0,
                _ => ((i * 37) % 101) as f32 / 29.0,
            })
            .collect()
    }

    /// One chunk's buffers of a build or absorb pass.
    struct Pass {
        lp: Vec<f64>,
        cm: Vec<f32>,
        rel: Vec<f64>,
        tmp: Vec<f32>,
    }

    impl Pass {
        fn new(lp: Vec<f64>, k: usize) -> Self {
            Pass {
                lp,
                cm: vec![0.0; k],
                rel: vec![0.0; k],
                tmp: vec![0.0; k],
            }
        }

        fn init(&mut self) -> RowInit<'_> {
            RowInit {
                row_log_p: &mut self.lp,
                colmax: &mut self.cm,
                rel: &mut self.rel,
                tmp: &mut self.tmp,
            }
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Every pass through its dispatcher (the widest instruction set this CPU has) gives the
    /// same bits as the portable build of the same kernel.
    #[test]
    fn dispatched_kernels_match_the_portable_ones_bit_for_bit() {
        let lambda = 25.0;
        for (n, k) in [
            (45usize, 1usize),
            (45, 10),
            (70, 17),
            (33, 50),
            (45, 256),
            (40, 300),
            (45, 1000),
        ] {
            let g: Vec<f64> = (0..k).map(|j| -((j % 7) as f64) * 0.9).collect();
            let run_build = |dispatch: bool| {
                let mut w = test_logits(n, k);
                let mut pass = Pass::new(vec![0.0; n], k);
                let bad = if dispatch {
                    build_rows(&mut w, k, lambda, &g, pass.init())
                } else {
                    build_rows_impl(&mut w, k, lambda, &g, pass.init())
                };
                assert_eq!(bad, None);
                (w, pass)
            };
            let (w, built) = run_build(true);
            let (w0, built0) = run_build(false);
            assert_eq!(bits(&w), bits(&w0), "build, K = {k}");
            assert_eq!(built.lp, built0.lp, "build offsets, K = {k}");
            assert_eq!(bits(&built.cm), bits(&built0.cm), "build maxima, K = {k}");

            let shift: Vec<f64> = (0..k).map(|j| -((j % 5) as f64) * 4.5).collect();
            let run_absorb = |dispatch: bool| {
                let mut w = w.clone();
                let mut pass = Pass::new(built.lp.clone(), k);
                if dispatch {
                    absorb_rows(&mut w, k, lambda, &shift, pass.init());
                } else {
                    absorb_rows_impl(&mut w, k, lambda, &shift, pass.init());
                }
                (w, pass)
            };
            let (aw, absorbed) = run_absorb(true);
            let (aw0, absorbed0) = run_absorb(false);
            assert_eq!(bits(&aw), bits(&aw0), "absorb, K = {k}");
            assert_eq!(absorbed.lp, absorbed0.lp, "absorb offsets, K = {k}");
            assert_eq!(
                bits(&absorbed.cm),
                bits(&absorbed0.cm),
                "absorb maxima, K = {k}"
            );

            let v: Vec<f32> = (0..k).map(|j| 1.0 - (j % 13) as f32 * 0.05).collect();
            let (mut acc, mut out, mut out0) = (vec![0f32; k], vec![0f64; k], vec![0f64; k]);
            sweep_rows(&aw, k, &v, &mut acc, &mut out);
            acc.fill(0.0);
            sweep_rows_impl(&aw, k, &v, &mut acc, &mut out0);
            assert_eq!(out, out0, "sweep, K = {k}");
            assert_eq!(stream_sum(&aw), stream_sum_impl(&aw), "read, K = {k}");

            let ln_v: Vec<f32> = v.iter().map(|&x| x.ln()).collect();
            let gl: Vec<f32> = g.iter().map(|&x| (x / lambda) as f32).collect();
            let ctx = AssignCtx {
                k,
                v: &v,
                ln_v: &ln_v,
                g_over_lambda: &gl,
                inv_lambda: (1.0 / lambda) as f32,
            };
            let alp = &absorbed.lp;
            let run_assign = |dispatch: bool| {
                let (mut lab, mut conf, mut colq) = (vec![0u32; n], vec![0f32; n], vec![0f64; k]);
                let (mut q, mut lnw) = (vec![0f32; k], vec![0f32; k]);
                let scratch = (&mut q[..], &mut lnw[..]);
                let t = if dispatch {
                    assign_rows(&aw, &ctx, alp, &mut lab, &mut conf, &mut colq, scratch)
                } else {
                    assign_rows_impl(&aw, &ctx, alp, &mut lab, &mut conf, &mut colq, scratch)
                };
                (
                    lab,
                    bits(&conf),
                    colq,
                    [t.entropy, t.objective, t.row_error],
                )
            };
            assert_eq!(run_assign(true), run_assign(false), "assign, K = {k}");
        }
    }

    #[test]
    fn the_build_stops_at_the_first_non_finite_row_and_leaves_it_alone() {
        let (n, k) = (9, 12);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = test_logits(n, k);
            w[5 * k + 7] = bad;
            w[5 * k + 9] = f32::NAN;
            w[7 * k + 2] = f32::NAN;
            let before = w.clone();
            let mut pass = Pass::new(vec![0.0; n], k);
            let found = build_rows(&mut w, k, 25.0, &vec![0.0; k], pass.init());
            assert_eq!(found, Some((5, 7)));
            assert_eq!(bits(&w[5 * k..]), bits(&before[5 * k..]), "{bad}");
            assert_ne!(w[..k], before[..k], "rows before it are built");
        }
    }

    #[test]
    fn first_index_finds_the_lowest_position() {
        for k in [1usize, 15, 16, 17, 40, 1000] {
            for at in [0, k / 3, k - 1] {
                let mut row: Vec<f32> = (0..k).map(|j| (j % 7) as f32 * 0.1).collect();
                row[at] = 9.0;
                if at + 1 < k {
                    row[k - 1] = 9.0;
                }
                assert_eq!(first_index_of(&row, 9.0), at as u32, "K = {k}, at {at}");
            }
            assert_eq!(first_index_of(&vec![0.5; k], 2.0), 0, "absent, K = {k}");
        }
    }

    #[test]
    fn dot_clamps_negative_entries_and_handles_tails() {
        for k in [1usize, 15, 16, 17, 255, 256, 257, 600] {
            let w: Vec<f32> = (0..k)
                .map(|j| {
                    if j % 3 == 0 {
                        -70.0
                    } else {
                        0.5 + j as f32 * 1e-3
                    }
                })
                .collect();
            let v: Vec<f32> = (0..k).map(|j| 1.0 - j as f32 * 1e-4).collect();
            let want: f64 = w
                .iter()
                .zip(&v)
                .map(|(&a, &b)| if a > 0.0 { a as f64 * b as f64 } else { 0.0 })
                .sum();
            let got = dot_pos(&w, &v);
            assert!(
                (got - want).abs() < 1e-6 * want.max(1.0),
                "k={k}: {got} vs {want}"
            );
        }
    }
}
