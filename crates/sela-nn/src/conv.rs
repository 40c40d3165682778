//! 2-D convolution as matrix multiplies, for NCHW activations and OIHW weights.
//!
//! Per image, the input is unfolded (im2col) into a `K × P` column matrix, K = Cin·kh·kw rows of
//! P = Ho·Wo output positions, so that
//!
//! - forward: `Y[Cout×P] = W[Cout×K] · col`;
//! - weight gradient: `dW += dY · colᵀ`;
//! - input gradient: for stride-1 "same" convolutions, the convolution of `dY` with the flipped,
//!   channel-swapped kernel (another product of the same form); otherwise `dcol = Wᵀ · dY`, folded
//!   back (col2im) onto the input.
//!
//! The column matrix of one image lives in a per-thread scratch buffer that is reused across
//! calls (no allocation per step, and small enough to stay in L2), and its K×P layout is the
//! column-major panel the gemm microkernel reads without repacking. 1×1 stride-1 convolutions skip
//! the unfolding. Work is spread over images with rayon; each product runs on one thread.
//!
//! Determinism: every image is computed by calls of identical shape, so an image's outputs do not
//! depend on the batch it is in; the weight gradient is summed per fixed group of images and the
//! groups are added in order, so it does not depend on the thread count either.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::gemm::{matmul, matmul_col_major, Mat};
use crate::simd::multiversion;

/// Images per weight-gradient group is `ceil(n / WEIGHT_GRAD_GROUPS)`; the group count is fixed,
/// not derived from the thread count, so the summation order is too.
pub const WEIGHT_GRAD_GROUPS: usize = 16;

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub cin: usize,
    pub cout: usize,
    /// Square kernel side.
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
}

impl ConvShape {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Rows of the column matrix (Cin·k·k).
    pub fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Input values per image.
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// Output positions per image.
    pub fn out_plane(&self) -> usize {
        self.ho() * self.wo()
    }
    /// Output values per image.
    pub fn out_len(&self) -> usize {
        self.cout * self.out_plane()
    }
    /// Weight values (Cout·Cin·k·k).
    pub fn weight_len(&self) -> usize {
        self.cout * self.kdim()
    }
    /// Whether this is a stride-1 convolution whose output has the input's size.
    fn is_same(&self) -> bool {
        self.stride == 1 && 2 * self.pad + 1 == self.k
    }
    /// The convolution that maps the output gradient to the input gradient, when that is itself
    /// a "same" convolution (with the kernel flipped and its channel axes swapped).
    fn transposed(&self) -> Option<ConvShape> {
        (self.is_same() && self.k > 1).then_some(ConvShape {
            cin: self.cout,
            cout: self.cin,
            k: self.k,
            stride: 1,
            pad: self.pad,
            h: self.h,
            w: self.w,
        })
    }
    /// Whether the column matrix is the input itself.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    fn valid(&self) -> bool {
        self.cin > 0
            && self.cout > 0
            && self.k > 0
            && self.stride > 0
            && self.h + 2 * self.pad >= self.k
            && self.w + 2 * self.pad >= self.k
    }
}

thread_local! {
    static COL: RefCell<Unfolded> = const { RefCell::new(Unfolded { buf: Vec::new(), shape: None }) };
    static TCOL: RefCell<Unfolded> = const { RefCell::new(Unfolded { buf: Vec::new(), shape: None }) };
    static DCOL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A per-thread column-matrix buffer and the convolution it last unfolded: the entries that
/// padding makes zero are the same for every image of a convolution, so they are only written
/// when the buffer changes hands.
struct Unfolded {
    buf: Vec<f32>,
    shape: Option<ConvShape>,
}

/// Unfolds `x` for `s` into the per-thread buffer `key` and runs `f` on the column matrix.
fn with_unfolded<R>(
    key: &'static std::thread::LocalKey<RefCell<Unfolded>>,
    s: &ConvShape,
    x: &[f32],
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    key.with(|cell| {
        let mut u = cell.borrow_mut();
        let len = s.kdim() * s.out_plane();
        if u.buf.len() < len {
            u.buf.resize(len, 0.0);
        }
        let fresh = u.shape != Some(*s);
        u.shape = Some(*s);
        let col = &mut u.buf[..len];
        im2col(s, x, col, fresh);
        f(col)
    })
}

fn with_scratch<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Zeroes a slice that is usually a handful of values long (a call to memset costs more).
#[inline(always)]
fn zero(d: &mut [f32]) {
    if d.len() > 16 {
        d.fill(0.0);
    } else {
        for v in d {
            *v = 0.0;
        }
    }
}

/// The range of output columns `ox` whose input column `ox·stride + kx − pad` lies in `0..w`.
fn valid_cols(s: &ConvShape, kx: usize) -> (usize, usize) {
    let wo = s.wo();
    let lo = if kx >= s.pad {
        0
    } else {
        (s.pad - kx).div_ceil(s.stride)
    };
    let hi = if s.w + s.pad > kx {
        ((s.w - 1 + s.pad - kx) / s.stride + 1).min(wo)
    } else {
        0
    };
    (lo.min(hi), hi)
}

multiversion! {
    /// Unfolds one image (Cin×H×W) into `col` (K×P); the entries that padding makes zero are
    /// written only when `fresh` (otherwise `col` holds them from the same convolution).
    fn im2col(s: &ConvShape, x: &[f32], col: &mut [f32], fresh: bool) {
        if s.is_same() {
            return im2col_same(s, x, col, fresh);
        }
        let (ho, wo, p) = (s.ho(), s.wo(), s.out_plane());
        for c in 0..s.cin {
            let plane = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
            for ky in 0..s.k {
                for kx in 0..s.k {
                    let r = (c * s.k + ky) * s.k + kx;
                    let row = &mut col[r * p..(r + 1) * p];
                    let (lo, hi) = valid_cols(s, kx);
                    for oy in 0..ho {
                        let dst = &mut row[oy * wo..(oy + 1) * wo];
                        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                        if iy < 0 || iy >= s.h as isize {
                            if fresh {
                                dst.fill(0.0);
                            }
                            continue;
                        }
                        let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                        if fresh {
                            zero(&mut dst[..lo]);
                            zero(&mut dst[hi..]);
                        }
                        if lo < hi {
                            let first = lo * s.stride + kx - s.pad;
                            if s.stride == 1 {
                                dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                            } else if s.stride == 2 {
                                // Pairs, so the loop vectorises as a de-interleaving load.
                                let (body, last) = dst[lo..hi].split_at_mut(hi - lo - 1);
                                let pairs = src[first..first + 2 * body.len()].chunks_exact(2);
                                for (d, pair) in body.iter_mut().zip(pairs) {
                                    *d = pair[0];
                                }
                                last[0] = src[first + 2 * body.len()];
                            } else {
                                let taps = src[first..].iter().step_by(s.stride);
                                for (d, &v) in dst[lo..hi].iter_mut().zip(taps) {
                                    *d = v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// [`im2col`] for stride-1 convolutions whose output has the input's size: each row of the
    /// column matrix is the input plane shifted by (ky − pad, kx − pad), copied as one contiguous
    /// span, with the columns that wrapped around a row edge zeroed afterwards.
    fn im2col_same(s: &ConvShape, x: &[f32], col: &mut [f32], fresh: bool) {
        let (h, w) = (s.h, s.w);
        let p = h * w;
        for c in 0..s.cin {
            let plane = &x[c * p..(c + 1) * p];
            for ky in 0..s.k {
                let dy = ky as isize - s.pad as isize;
                let a = (-dy).max(0) as usize;
                let b = (h as isize - dy).min(h as isize) as usize;
                for kx in 0..s.k {
                    let dx = kx as isize - s.pad as isize;
                    let r = (c * s.k + ky) * s.k + kx;
                    let row = &mut col[r * p..(r + 1) * p];
                    if a >= b {
                        if fresh {
                            row.fill(0.0);
                        }
                        continue;
                    }
                    if fresh {
                        row[..a * w].fill(0.0);
                        row[b * w..].fill(0.0);
                    }
                    let skip_front = (-dx).max(0) as usize;
                    let skip_back = dx.max(0) as usize;
                    let dst = a * w + skip_front..b * w - skip_back;
                    let src0 = ((a as isize + dy) * w as isize + dx + skip_front as isize) as usize;
                    row[dst.clone()].copy_from_slice(&plane[src0..src0 + dst.len()]);
                    if dx != 0 {
                        for oy in a..b {
                            let line = &mut row[oy * w..(oy + 1) * w];
                            line[..skip_front].fill(0.0);
                            line[w - skip_back..].fill(0.0);
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Folds `col` (K×P) back onto one image's gradient (Cin×H×W), adding to it.
    fn col2im_add(s: &ConvShape, col: &[f32], dx: &mut [f32]) {
        let (ho, wo, p) = (s.ho(), s.wo(), s.out_plane());
        for c in 0..s.cin {
            let plane = &mut dx[c * s.h * s.w..(c + 1) * s.h * s.w];
            for ky in 0..s.k {
                for kx in 0..s.k {
                    let r = (c * s.k + ky) * s.k + kx;
                    let row = &col[r * p..(r + 1) * p];
                    let (lo, hi) = valid_cols(s, kx);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..ho {
                        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                        if iy < 0 || iy >= s.h as isize {
                            continue;
                        }
                        let src = &row[oy * wo..(oy + 1) * wo];
                        let dst = &mut plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                        let first = lo * s.stride + kx - s.pad;
                        if s.stride == 1 {
                            for (d, v) in dst[first..first + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *d += v;
                            }
                        } else {
                            for (o, v) in src[lo..hi].iter().enumerate() {
                                dst[first + o * s.stride] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What to apply to each image's output right after its product, while it is in cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Per-output-channel bias.
    pub bias: Option<&'a [f32]>,
    /// A tensor of the output's shape to add (the residual branch).
    pub residual: Option<&'a [f32]>,
    /// Clamp at zero.
    pub relu: bool,
}

fn check(s: &ConvShape, n: usize, x: usize, w: usize, y: usize) {
    assert!(s.valid(), "invalid convolution {s:?}");
    assert_eq!(x, n * s.in_len(), "conv input size");
    assert_eq!(w, s.weight_len(), "conv weight size");
    assert_eq!(y, n * s.out_len(), "conv output size");
}

/// One image's product `y (+)= w · im2col(x)`.
/// Uses the per-thread buffer `key` for the column matrix.
fn image_forward(
    key: &'static std::thread::LocalKey<RefCell<Unfolded>>,
    s: &ConvShape,
    xi: &[f32],
    w: &[f32],
    yi: &mut [f32],
    accumulate: bool,
) {
    let (p, kd) = (s.out_plane(), s.kdim());
    if s.is_pointwise() {
        matmul(
            s.cout,
            p,
            kd,
            yi,
            accumulate,
            Mat::rows(w, kd),
            Mat::rows(xi, p),
        );
    } else {
        with_unfolded(key, s, xi, |col| {
            matmul(
                s.cout,
                p,
                kd,
                yi,
                accumulate,
                Mat::rows(w, kd),
                Mat::rows(col, p),
            );
        });
    }
}

/// `w` with its kernel flipped and its channel axes swapped: the weights of [`ConvShape::transposed`].
fn flip_weights(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let kk = s.k * s.k;
    let mut out = vec![0.0f32; w.len()];
    for co in 0..s.cout {
        for ci in 0..s.cin {
            for t in 0..kk {
                out[(ci * s.cout + co) * kk + (kk - 1 - t)] = w[(co * s.cin + ci) * kk + t];
            }
        }
    }
    out
}

multiversion! {
    /// `plane = relu?(plane + b + residual?)`.
    fn epilogue_plane(plane: &mut [f32], b: f32, residual: Option<&[f32]>, relu: bool) {
        match residual {
            Some(r) => plane.iter_mut().zip(r).for_each(|(v, r)| *v += b + r),
            None if b != 0.0 => plane.iter_mut().for_each(|v| *v += b),
            None => {}
        }
        if relu {
            plane.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
}

/// `y = epilogue(conv(x, w))` for a batch of `n` images.
pub fn forward(s: &ConvShape, n: usize, x: &[f32], w: &[f32], epi: Epilogue, y: &mut [f32]) {
    check(s, n, x.len(), w.len(), y.len());
    if let Some(r) = epi.residual {
        assert_eq!(r.len(), y.len(), "residual size");
    }
    let p = s.out_plane();
    y.par_chunks_mut(s.out_len())
        .zip(x.par_chunks(s.in_len()))
        .enumerate()
        .for_each(|(i, (yi, xi))| {
            image_forward(&COL, s, xi, w, yi, false);
            let res = epi
                .residual
                .map(|r| &r[i * s.out_len()..(i + 1) * s.out_len()]);
            if epi.bias.is_some() || res.is_some() || epi.relu {
                for co in 0..s.cout {
                    let b = epi.bias.map_or(0.0, |b| b[co]);
                    let r = res.map(|r| &r[co * p..(co + 1) * p]);
                    epilogue_plane(&mut yi[co * p..(co + 1) * p], b, r, epi.relu);
                }
            }
        });
}

/// Gradients of a convolution: `dw` (overwritten) and, when given, `dx` (overwritten, or added to
/// when `accumulate`).
pub fn backward(
    s: &ConvShape,
    n: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
) {
    check(s, n, x.len(), w.len(), dy.len());
    assert_eq!(dw.len(), w.len(), "conv weight-gradient size");
    if n == 0 {
        dw.fill(0.0);
        if let Some((dx, false)) = dx {
            dx.fill(0.0);
        }
        return;
    }
    let per_group = n.div_ceil(WEIGHT_GRAD_GROUPS);
    let groups = n.div_ceil(per_group);
    with_scratch(&PARTIALS, groups * s.weight_len(), |partials| {
        backward_groups(s, n, x, w, dy, dx, dw, partials, per_group)
    })
}

/// [`backward`] with the per-group weight-gradient partials (K×Cout each) in `partials`.
#[allow(clippy::too_many_arguments)]
fn backward_groups(
    s: &ConvShape,
    n: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    partials: &mut [f32],
    per_group: usize,
) {
    let (p, kd, wl) = (s.out_plane(), s.kdim(), s.weight_len());
    let groups = partials.len() / wl;
    let transposed = s.transposed();
    let flipped = transposed.map(|_| flip_weights(s, w));
    let (dx, accumulate) = match dx {
        Some((d, a)) => {
            assert_eq!(d.len(), x.len(), "conv input-gradient size");
            (Some(d), a)
        }
        None => (None, false),
    };
    let mut dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => d.chunks_mut(per_group * s.in_len()).map(Some).collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    partials
        .par_chunks_mut(wl)
        .zip(dx_chunks.par_iter_mut())
        .enumerate()
        .for_each(|(g, (dw_g, dx_g))| {
            let first = g * per_group;
            let last = (first + per_group).min(n);
            for i in first..last {
                let xi = &x[i * s.in_len()..(i + 1) * s.in_len()];
                let dyi = &dy[i * s.out_len()..(i + 1) * s.out_len()];
                let acc = i > first;
                // dWᵀ (K×Cout, i.e. dW column-major): the product then needs no packing of the
                // column matrix.
                if s.is_pointwise() {
                    matmul_col_major(
                        s.cout,
                        kd,
                        p,
                        dw_g,
                        acc,
                        Mat::rows(dyi, p),
                        Mat::rows_t(xi, p),
                    );
                } else {
                    with_unfolded(&COL, s, xi, |col| {
                        matmul_col_major(
                            s.cout,
                            kd,
                            p,
                            dw_g,
                            acc,
                            Mat::rows(dyi, p),
                            Mat::rows_t(col, p),
                        );
                    });
                }
                if let Some(dx_g) = dx_g.as_deref_mut() {
                    let off = (i - first) * s.in_len();
                    let dxi = &mut dx_g[off..off + s.in_len()];
                    if let (Some(t), Some(wf)) = (&transposed, &flipped) {
                        image_forward(&TCOL, t, dyi, wf, dxi, accumulate);
                    } else if s.is_pointwise() {
                        matmul(
                            kd,
                            p,
                            s.cout,
                            dxi,
                            accumulate,
                            Mat::rows_t(w, kd),
                            Mat::rows(dyi, p),
                        );
                    } else {
                        with_scratch(&DCOL, kd * p, |dcol| {
                            matmul(
                                kd,
                                p,
                                s.cout,
                                dcol,
                                false,
                                Mat::rows_t(w, kd),
                                Mat::rows(dyi, p),
                            );
                            if !accumulate {
                                dxi.fill(0.0);
                            }
                            col2im_add(s, dcol, dxi);
                        });
                    }
                }
            }
        });
    for co in 0..s.cout {
        for k in 0..kd {
            let mut acc = partials[k * s.cout + co];
            for part in partials.chunks(wl).skip(1) {
                acc += part[k * s.cout + co];
            }
            dw[co * kd + k] = acc;
        }
    }
}

/// The convolution as a candle custom op with its own backward: `x` is N×Cin×H×W, `w` is
/// Cout×Cin×k×k (square kernels), both f32 on the CPU.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dGemm {
    pub stride: usize,
    pub padding: usize,
}

/// Convolves `x` with `w` through [`Conv2dGemm`] (no dilation, no groups).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dGemm { stride, padding })
}

fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("conv2d-gemm: {what} must be f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("conv2d-gemm: {what} must be contiguous"),
    }
}

impl Conv2dGemm {
    fn shape(&self, xs: &[usize], ws: &[usize]) -> candle_core::Result<(usize, ConvShape)> {
        let (&[n, cin, h, w], &[cout, wcin, kh, kw]) = (xs, ws) else {
            candle_core::bail!("conv2d-gemm: expected 4-d input and weight, got {xs:?} and {ws:?}")
        };
        if wcin != cin || kh != kw {
            candle_core::bail!(
                "conv2d-gemm: weight {ws:?} does not fit input {xs:?} (square kernels only)"
            )
        }
        let s = ConvShape {
            cin,
            cout,
            k: kh,
            stride: self.stride,
            pad: self.padding,
            h,
            w,
        };
        if !s.valid() {
            candle_core::bail!("conv2d-gemm: kernel {kh} larger than the padded input {h}×{w}")
        }
        Ok((n, s))
    }

    fn slice_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }
}

impl CustomOp2 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, s) = self.shape(l1.dims(), l2.dims())?;
        let x = cpu_slice(s1, l1, "input")?;
        let w = cpu_slice(s2, l2, "weight")?;
        let mut y = vec![0.0f32; n * s.out_len()];
        forward(&s, n, x, w, Epilogue::default(), &mut y);
        Ok((CpuStorage::F32(y), Shape::from((n, s.cout, s.ho(), s.wo()))))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, s) = self.shape(arg1.dims(), arg2.dims())?;
        let x = Self::slice_of(arg1)?;
        let w = Self::slice_of(arg2)?;
        let dy = Self::slice_of(grad_res)?;
        let mut dw = vec![0.0f32; w.len()];
        let want_dx = arg1.track_op();
        let mut dx = if want_dx {
            vec![0.0f32; x.len()]
        } else {
            Vec::new()
        };
        backward(
            &s,
            n,
            &x,
            &w,
            &dy,
            want_dx.then_some((dx.as_mut_slice(), false)),
            &mut dw,
        );
        let dx = if want_dx {
            Some(Tensor::from_vec(dx, arg1.shape(), arg1.device())?)
        } else {
            None
        };
        let dw = arg2
            .track_op()
            .then(|| Tensor::from_vec(dw, arg2.shape(), arg2.device()))
            .transpose()?;
        Ok((dx, dw))
    }
}
