//! A thin, single-threaded wrapper over the `gemm` crate. Parallelism comes from the callers
//! (one image or one group of images per rayon task), so every product is computed by one thread
//! in an order fixed by its shape: results do not depend on the thread count.

/// A matrix view: pointer, row stride and column stride, in elements.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &[f32], cols: usize) -> Mat {
        Mat {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &[f32], cols: usize) -> Mat {
        Mat {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst[m×n] (row-major) = (accumulate ? dst : 0) + a[m×k] · b[k×n]`.
///
/// # Safety-relevant contract
/// `a` and `b` must address at least `m×k` and `k×n` valid elements through their strides; the
/// sizes are checked against `dst` only.
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    matmul_strided(m, n, k, dst, (1, n as isize), accumulate, a, b)
}

/// Like [`matmul`], with `dst` stored column-major (`dst[j·m + i]`).
pub(crate) fn matmul_col_major(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    matmul_strided(m, n, k, dst, (m as isize, 1), accumulate, a, b)
}

/// The product into `dst` addressed by (column stride, row stride), shared by the layouts above.
#[allow(clippy::too_many_arguments)]
fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_cs, dst_rs): (isize, isize),
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: dst holds m×n elements in the layout the strides describe (size checked above); the
    // callers construct `a` and `b` from slices of at least the stated sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
