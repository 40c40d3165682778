//! Single-threaded f32 matrix products over row-major slices, through `gemm`.
//!
//! Callers parallelise over fixed-size blocks themselves, so every product has a shape that does
//! not depend on the number of threads and results are reproducible bit for bit.

use gemm::{gemm, Parallelism};

/// `out (m×n) = a (m×k) · bᵀ`, where `b` is n×k; all row-major.
pub fn matmul_abt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    assert_eq!(a.len(), m * k, "a is not {m}×{k}");
    assert_eq!(b.len(), n * k, "b is not {n}×{k}");
    assert_eq!(out.len(), m * n, "out is not {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the assertions above bound every index the strides address: dst (i, j) at
    // i·n + j < m·n; lhs (i, p) at i·k + p < m·k; rhs (p, j) = b[j·k + p] < n·k.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `out (m×n) = a (m×k) · b (k×n)`; all row-major.
pub fn matmul_ab(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    assert_eq!(a.len(), m * k, "a is not {m}×{k}");
    assert_eq!(b.len(), k * n, "b is not {k}×{n}");
    assert_eq!(out.len(), m * n, "out is not {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: dst (i, j) at i·n + j < m·n; lhs (i, p) at i·k + p < m·k; rhs (p, j) at
    // p·n + j < k·n.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `out (m×n) = aᵀ · b`, where `a` is k×m and `b` is k×n; all row-major.
pub fn matmul_atb(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    assert_eq!(a.len(), k * m, "a is not {k}×{m}");
    assert_eq!(b.len(), k * n, "b is not {k}×{n}");
    assert_eq!(out.len(), m * n, "out is not {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: dst (i, j) at i·n + j < m·n; lhs (i, p) = a[p·m + i] < k·m; rhs (p, j) at
    // p·n + j < k·n.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            m as isize,
            1,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = x[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn products_match_naive_loops() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 3 % 13) as f32) * 0.5).collect();
        let want = naive(&a, &b, m, n, k);

        let mut out = vec![f32::NAN; m * n];
        matmul_ab(&a, &b, m, n, k, &mut out);
        assert_eq!(out, want);

        let mut out = vec![f32::NAN; m * n];
        matmul_abt(&a, &transpose(&b, k, n), m, n, k, &mut out);
        assert_eq!(out, want);

        let mut out = vec![f32::NAN; m * n];
        matmul_atb(&transpose(&a, m, k), &b, m, n, k, &mut out);
        assert_eq!(out, want);
    }
}
