//! Batch normalisation over NCHW activations, in training mode, fused with the residual add and
//! ReLU that follow it in a residual block: `y = relu(γ·x̂ + β + residual)`.
//!
//! Channel statistics are summed per image (shifted by the channel's first value, which keeps
//! E[x²]−E[x]² accurate), and the per-image sums are added in image order in f64, so the result
//! does not depend on the thread count.

use rayon::prelude::*;

use crate::simd::multiversion;

/// ε added to the variance.
pub const EPS: f32 = 1e-5;
/// Weight of the batch statistics in the running averages (PyTorch's convention).
pub const MOMENTUM: f32 = 0.1;

/// Statistics of one training-mode forward pass, kept for the backward pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Saved {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Biased batch variance per channel.
    pub var: Vec<f32>,
    /// 1/sqrt(var + ε).
    pub invstd: Vec<f32>,
    /// Values per channel in the batch (N·H·W).
    pub count: usize,
}

multiversion! {
    /// Sum and sum of squares of `v − shift`, in 16 f32 lanes combined in f64.
    fn shifted_sums(v: &[f32], shift: f32) -> (f64, f64) {
        let mut s = [0.0f32; 16];
        let mut q = [0.0f32; 16];
        let chunks = v.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                let d = c[l] - shift;
                s[l] += d;
                q[l] += d * d;
            }
        }
        let (mut sum, mut sq) = (0.0f64, 0.0f64);
        for l in 0..16 {
            sum += s[l] as f64;
            sq += q[l] as f64;
        }
        for &x in rest {
            let d = (x - shift) as f64;
            sum += d;
            sq += d * d;
        }
        (sum, sq)
    }
}

multiversion! {
    /// Masks `dy` in place to g = dy·[y > 0] (when `relu`), and returns Σ g and Σ g·(x − mean).
    fn grad_sums(dy: &mut [f32], x: &[f32], y: &[f32], mean: f32, relu: bool) -> (f64, f64) {
        if relu {
            for (d, &yv) in dy.iter_mut().zip(y) {
                *d *= (yv > 0.0) as u32 as f32;
            }
        }
        let mut s = [0.0f32; 16];
        let mut q = [0.0f32; 16];
        let (dc, xc) = (dy.chunks_exact(16), x.chunks_exact(16));
        let (dr, xr) = (dc.remainder(), xc.remainder());
        for (d, xv) in dc.zip(xc) {
            for l in 0..16 {
                s[l] += d[l];
                q[l] += d[l] * (xv[l] - mean);
            }
        }
        let (mut sum, mut sq) = (0.0f64, 0.0f64);
        for l in 0..16 {
            sum += s[l] as f64;
            sq += q[l] as f64;
        }
        for (&g, &xv) in dr.iter().zip(xr) {
            sum += g as f64;
            sq += (g * (xv - mean)) as f64;
        }
        (sum, sq)
    }
}

multiversion! {
    /// `dx = kg·g + kx·x + k0` over one plane.
    fn grad_plane(g: &[f32], x: &[f32], k: (f32, f32, f32), dx: &mut [f32]) {
        let (kg, kx, k0) = k;
        for ((o, &gv), &xv) in dx.iter_mut().zip(g).zip(x) {
            *o = kg * gv + kx * xv + k0;
        }
    }
}

multiversion! {
    /// `y = relu?(a·x + b + residual?)` over one plane.
    fn affine_plane(x: &[f32], a: f32, b: f32, residual: Option<&[f32]>, relu: bool, y: &mut [f32]) {
        match residual {
            Some(r) => {
                for ((o, &v), &rv) in y.iter_mut().zip(x).zip(r) {
                    *o = v * a + b + rv;
                }
            }
            None => {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = v * a + b;
                }
            }
        }
        if relu {
            for o in y.iter_mut() {
                *o = o.max(0.0);
            }
        }
    }
}

/// Adds per-image pairs of per-channel sums in image order.
fn ordered_totals(parts: &[Vec<(f64, f64)>], c: usize) -> Vec<(f64, f64)> {
    let mut tot = vec![(0.0f64, 0.0f64); c];
    for p in parts {
        for (t, v) in tot.iter_mut().zip(p) {
            t.0 += v.0;
            t.1 += v.1;
        }
    }
    tot
}

/// Training-mode forward pass over `n` images of `c` channels × `plane` values.
#[allow(clippy::too_many_arguments)]
pub fn train_forward(
    x: &[f32],
    n: usize,
    c: usize,
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
    saved: &mut Saved,
) {
    let img = c * plane;
    assert_eq!(x.len(), n * img, "batchnorm input size");
    assert_eq!(y.len(), x.len(), "batchnorm output size");
    assert!(
        n * plane > 0,
        "batchnorm needs at least one value per channel"
    );
    let shift: Vec<f32> = (0..c).map(|ch| x[ch * plane]).collect();
    let parts: Vec<Vec<(f64, f64)>> = x
        .par_chunks(img)
        .map(|xi| {
            (0..c)
                .map(|ch| shifted_sums(&xi[ch * plane..(ch + 1) * plane], shift[ch]))
                .collect()
        })
        .collect();
    let count = n * plane;
    let tot = ordered_totals(&parts, c);
    saved.count = count;
    saved.mean.clear();
    saved.var.clear();
    saved.invstd.clear();
    for (ch, &(s, q)) in tot.iter().enumerate() {
        let m = s / count as f64;
        let var = (q / count as f64 - m * m).max(0.0);
        saved.mean.push((m + shift[ch] as f64) as f32);
        saved.var.push(var as f32);
        saved.invstd.push((1.0 / (var + EPS as f64).sqrt()) as f32);
    }
    let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] * saved.invstd[ch]).collect();
    let offset: Vec<f32> = (0..c)
        .map(|ch| beta[ch] - saved.mean[ch] * scale[ch])
        .collect();
    y.par_chunks_mut(img)
        .zip(x.par_chunks(img))
        .enumerate()
        .for_each(|(i, (yi, xi))| {
            for ch in 0..c {
                let r = ch * plane..(ch + 1) * plane;
                let res = residual.map(|res| &res[i * img + r.start..i * img + r.end]);
                affine_plane(&xi[r.clone()], scale[ch], offset[ch], res, relu, &mut yi[r]);
            }
        });
}

/// Moves running statistics towards a batch's (unbiased variance, as PyTorch does).
pub fn update_running(running_mean: &mut [f32], running_var: &mut [f32], saved: &Saved) {
    let unbias = if saved.count > 1 {
        saved.count as f32 / (saved.count - 1) as f32
    } else {
        1.0
    };
    for ch in 0..running_mean.len() {
        running_mean[ch] = (1.0 - MOMENTUM) * running_mean[ch] + MOMENTUM * saved.mean[ch];
        running_var[ch] = (1.0 - MOMENTUM) * running_var[ch] + MOMENTUM * saved.var[ch] * unbias;
    }
}

/// Inference-mode forward pass with running statistics (the network folds these into the
/// preceding convolution instead; this form is the definition it is tested against).
#[allow(clippy::too_many_arguments)]
pub fn eval_forward(
    x: &[f32],
    c: usize,
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    relu: bool,
    y: &mut [f32],
) {
    for (i, (o, &v)) in y.iter_mut().zip(x).enumerate() {
        let ch = (i / plane) % c;
        let z = (v - running_mean[ch]) / (running_var[ch] + EPS).sqrt() * gamma[ch] + beta[ch];
        *o = if relu { z.max(0.0) } else { z };
    }
}

/// Backward pass of [`train_forward`]: overwrites `dy` with the gradient that reaches the BatchNorm
/// output through the ReLU (which is also the residual's gradient), writes `dx`, and overwrites
/// `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    y: &[f32],
    dy: &mut [f32],
    n: usize,
    c: usize,
    plane: usize,
    gamma: &[f32],
    saved: &Saved,
    relu: bool,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let img = c * plane;
    assert_eq!(x.len(), n * img, "batchnorm input size");
    assert!(y.len() == x.len() && dy.len() == x.len() && dx.len() == x.len());
    let parts: Vec<Vec<(f64, f64)>> = dy
        .par_chunks_mut(img)
        .enumerate()
        .map(|(i, dyi)| {
            (0..c)
                .map(|ch| {
                    let r = i * img + ch * plane..i * img + (ch + 1) * plane;
                    let local = ch * plane..(ch + 1) * plane;
                    grad_sums(&mut dyi[local], &x[r.clone()], &y[r], saved.mean[ch], relu)
                })
                .collect()
        })
        .collect();
    let tot = ordered_totals(&parts, c);
    let m = saved.count as f32;
    let mut k = Vec::with_capacity(c);
    for ch in 0..c {
        let (sg, sgx) = (tot[ch].0 as f32, tot[ch].1 as f32);
        let inv = saved.invstd[ch];
        dbeta[ch] = sg;
        dgamma[ch] = sgx * inv;
        // dx = γ·inv·(g − Σg/M − x̂·Σgx̂/M) with x̂ = (x − μ)·inv.
        let a = gamma[ch] * inv;
        let kx = -a * inv * inv * sgx / m;
        k.push((a, kx, -a * sg / m - kx * saved.mean[ch]));
    }
    let g: &[f32] = dy;
    dx.par_chunks_mut(img).enumerate().for_each(|(i, dxi)| {
        for (ch, &kc) in k.iter().enumerate() {
            let r = i * img + ch * plane..i * img + (ch + 1) * plane;
            grad_plane(
                &g[r.clone()],
                &x[r],
                kc,
                &mut dxi[ch * plane..(ch + 1) * plane],
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 3.0)
            .collect()
    }

    #[test]
    fn training_mode_normalises_with_batch_statistics() {
        let (n, c, plane) = (3, 2, 5);
        let x = data(n * c * plane);
        let mut y = vec![0.0; x.len()];
        let mut saved = Saved::default();
        train_forward(
            &x,
            n,
            c,
            plane,
            &[1.0, 2.0],
            &[0.0, 0.5],
            None,
            false,
            &mut y,
            &mut saved,
        );
        for ch in 0..c {
            let vals: Vec<f32> = (0..n)
                .flat_map(|i| y[i * c * plane + ch * plane..][..plane].to_vec())
                .collect();
            let mean = vals.iter().sum::<f32>() / vals.len() as f32;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
            let (g, b) = ([1.0, 2.0][ch], [0.0, 0.5][ch]);
            assert!((mean - b).abs() < 1e-5, "{mean}");
            assert!((var - g * g).abs() < 1e-3, "{var}");
        }
        // Running statistics move by MOMENTUM towards the batch's; eval mode then uses them.
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        update_running(&mut rm, &mut rv, &saved);
        assert!((rm[0] - MOMENTUM * saved.mean[0]).abs() < 1e-6);
        let unbiased = saved.var[1] * 15.0 / 14.0;
        assert!((rv[1] - (0.9 + 0.1 * unbiased)).abs() < 1e-5);
        let mut e = vec![0.0; x.len()];
        eval_forward(
            &x,
            c,
            plane,
            &[1.0, 2.0],
            &[0.0, 0.5],
            &rm,
            &rv,
            false,
            &mut e,
        );
        assert!(e.iter().zip(&y).any(|(a, b)| (a - b).abs() > 0.1));
        // Eval mode treats images independently: one image alone gives the same values.
        let mut one = vec![0.0; c * plane];
        eval_forward(
            &x[..c * plane],
            c,
            plane,
            &[1.0, 2.0],
            &[0.0, 0.5],
            &rm,
            &rv,
            false,
            &mut one,
        );
        assert_eq!(&one[..], &e[..c * plane]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, c, plane) = (2, 3, 4);
        let x: Vec<f32> = data(n * c * plane).iter().map(|v| v * 0.7 + 0.1).collect();
        let res: Vec<f32> = data(n * c * plane).iter().rev().map(|v| v * 0.3).collect();
        let gamma = [0.5, 1.5, -1.0];
        let beta = [0.1, -0.2, 0.3];
        let w: Vec<f32> = (0..x.len()).map(|i| ((i * 31) % 7) as f32 - 3.0).collect();
        let loss = |x: &[f32], res: &[f32], g: &[f32]| -> f64 {
            let mut y = vec![0.0; x.len()];
            train_forward(
                x,
                n,
                c,
                plane,
                g,
                &beta,
                Some(res),
                true,
                &mut y,
                &mut Saved::default(),
            );
            y.iter()
                .zip(&w)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let mut y = vec![0.0; x.len()];
        let mut saved = Saved::default();
        train_forward(
            &x,
            n,
            c,
            plane,
            &gamma,
            &beta,
            Some(&res),
            true,
            &mut y,
            &mut saved,
        );
        let mut dx = vec![0.0; x.len()];
        let mut dr = w.clone();
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        backward(
            &x, &y, &mut dr, n, c, plane, &gamma, &saved, true, &mut dx, &mut dg, &mut db,
        );
        let h = 1e-2f32;
        for i in [0, 5, 11, 17, 23] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &res, &gamma) - loss(&xm, &res, &gamma)) / (2.0 * h as f64);
            assert!(
                (fd - dx[i] as f64).abs() < 2e-2,
                "dx[{i}]: {fd} vs {}",
                dx[i]
            );
            let (mut rp, mut rm) = (res.clone(), res.clone());
            rp[i] += h;
            rm[i] -= h;
            let fd = (loss(&x, &rp, &gamma) - loss(&x, &rm, &gamma)) / (2.0 * h as f64);
            assert!(
                (fd - dr[i] as f64).abs() < 2e-2,
                "dres[{i}]: {fd} vs {}",
                dr[i]
            );
        }
        for ch in 0..c {
            let (mut gp, mut gm) = (gamma, gamma);
            gp[ch] += h;
            gm[ch] -= h;
            let fd = (loss(&x, &res, &gp) - loss(&x, &res, &gm)) / (2.0 * h as f64);
            assert!(
                (fd - dg[ch] as f64).abs() < 2e-2,
                "dgamma[{ch}]: {fd} vs {}",
                dg[ch]
            );
        }
    }
}
