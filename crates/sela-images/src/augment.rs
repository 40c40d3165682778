//! Turning 8-bit HWC images into normalised f32 CHW network inputs: the clean view (for
//! extraction) and seeded random views (for training).
//!
//! A random view is one inverse-affine resampling (random resized crop, rotation, translation and
//! horizontal flip composed into a single bilinear lookup), then brightness and contrast jitter,
//! random grayscale for RGB, and normalisation.

use sela_config::AugmentSection;

use crate::rng::Rng;

/// Per-channel normalisation `(x - mean) / std` of pixel values in 0..1.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// The shape of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Shape {
    /// Values per image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether the shape holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes the clean (unaugmented) view of `src` (HWC u8) into `out` (CHW f32, normalised).
pub fn clean_into(src: &[u8], shape: Shape, norm: &Normalize, out: &mut [f32]) {
    let Shape {
        channels: c,
        height: h,
        width: w,
    } = shape;
    debug_assert_eq!(src.len(), c * h * w);
    for ch in 0..c {
        let (m, s) = (norm.mean[ch], 1.0 / norm.std[ch]);
        let plane = &mut out[ch * h * w..(ch + 1) * h * w];
        for (i, o) in plane.iter_mut().enumerate() {
            *o = (src[i * c + ch] as f32 * (1.0 / 255.0) - m) * s;
        }
    }
}

/// The geometric part of a random view: maps output pixel centres to source coordinates.
#[derive(Debug, Clone, Copy)]
struct Affine {
    /// source = a * (u, v) + b, with (u, v) in output pixel units centred on the image.
    a: [[f32; 2]; 2],
    b: [f32; 2],
}

fn sample_affine(aug: &AugmentSection, h: usize, w: usize, rng: &mut Rng) -> Affine {
    let (wf, hf) = (w as f64, h as f64);
    let area = wf * hf;
    // Random resized crop, as torchvision: ten tries, then the whole image.
    let (mut cw, mut ch) = (wf, hf);
    for _ in 0..10 {
        let s = rng.range(aug.crop_scale[0] as f64, aug.crop_scale[1] as f64) * area;
        let r = rng
            .range(
                (aug.crop_ratio[0] as f64).ln(),
                (aug.crop_ratio[1] as f64).ln(),
            )
            .exp();
        let (tw, th) = ((s * r).sqrt(), (s / r).sqrt());
        if tw <= wf && th <= hf {
            (cw, ch) = (tw, th);
            break;
        }
    }
    let cx = rng.range(cw / 2.0, wf - cw / 2.0 + 1e-9);
    let cy = rng.range(ch / 2.0, hf - ch / 2.0 + 1e-9);
    let theta = rng.range(-1.0, 1.0) * (aug.rotation_deg as f64).to_radians();
    let tx = rng.range(-1.0, 1.0) * aug.translate as f64 * wf;
    let ty = rng.range(-1.0, 1.0) * aug.translate as f64 * hf;
    let flip = if aug.hflip && rng.uniform() < 0.5 {
        -1.0
    } else {
        1.0
    };
    let (sx, sy) = (flip * cw / wf, ch / hf);
    let (cos, sin) = (theta.cos(), theta.sin());
    Affine {
        a: [
            [(cos * sx) as f32, (-sin * sy) as f32],
            [(sin * sx) as f32, (cos * sy) as f32],
        ],
        b: [(cx + tx) as f32, (cy + ty) as f32],
    }
}

/// Writes a random view of `src` (HWC u8) into `out` (CHW f32, normalised). The view depends only
/// on `rng`'s state, so a generator derived from (seed, epoch, sample) makes it reproducible.
pub fn augment_into(
    src: &[u8],
    shape: Shape,
    aug: &AugmentSection,
    norm: &Normalize,
    rng: &mut Rng,
    out: &mut [f32],
) {
    let Shape {
        channels: c,
        height: h,
        width: w,
    } = shape;
    let t = sample_affine(aug, h, w, rng);
    let brightness = 1.0 + rng.range(-1.0, 1.0) as f32 * aug.brightness;
    let contrast = 1.0 + rng.range(-1.0, 1.0) as f32 * aug.contrast;
    let gray = c == 3 && rng.uniform() < aug.grayscale_p as f64;

    // Geometry: bilinear lookup with zero padding, into `out` as CHW values in 0..1.
    let (half_w, half_h) = (w as f32 / 2.0, h as f32 / 2.0);
    for y in 0..h {
        let v = y as f32 + 0.5 - half_h;
        for x in 0..w {
            let u = x as f32 + 0.5 - half_w;
            let sx = t.a[0][0] * u + t.a[0][1] * v + t.b[0] - 0.5;
            let sy = t.a[1][0] * u + t.a[1][1] * v + t.b[1] - 0.5;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for ch in 0..c {
                let px = |xx: isize, yy: isize| -> f32 {
                    if xx < 0 || yy < 0 || xx >= w as isize || yy >= h as isize {
                        0.0
                    } else {
                        src[(yy as usize * w + xx as usize) * c + ch] as f32
                    }
                };
                let top = px(x0, y0) * (1.0 - fx) + px(x0 + 1, y0) * fx;
                let bottom = px(x0, y0 + 1) * (1.0 - fx) + px(x0 + 1, y0 + 1) * fx;
                out[ch * h * w + y * w + x] = (top * (1.0 - fy) + bottom * fy) * (1.0 / 255.0);
            }
        }
    }

    let plane = h * w;
    if gray {
        for i in 0..plane {
            let l = 0.299 * out[i] + 0.587 * out[plane + i] + 0.114 * out[2 * plane + i];
            for ch in 0..3 {
                out[ch * plane + i] = l;
            }
        }
    }
    // Photometric jitter: brightness scales, contrast blends with the mean intensity.
    let n = c * plane;
    let mut sum = 0.0f32;
    for v in out[..n].iter_mut() {
        *v = (*v * brightness).clamp(0.0, 1.0);
        sum += *v;
    }
    let mean = sum / n as f32;
    for ch in 0..c {
        let (m, s) = (norm.mean[ch], 1.0 / norm.std[ch]);
        for v in out[ch * plane..(ch + 1) * plane].iter_mut() {
            let j = ((*v - mean) * contrast + mean).clamp(0.0, 1.0);
            *v = (j - m) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> AugmentSection {
        AugmentSection {
            crop_scale: [1.0, 1.0],
            crop_ratio: [1.0, 1.0],
            rotation_deg: 0.0,
            translate: 0.0,
            hflip: false,
            brightness: 0.0,
            contrast: 0.0,
            grayscale_p: 0.0,
            off_from_round: None,
        }
    }

    fn image(c: usize) -> Vec<u8> {
        (0..8 * 6 * c).map(|i| (i * 37 % 251) as u8).collect()
    }

    const NORM1: fn() -> Normalize = || Normalize {
        mean: vec![0.5],
        std: vec![0.25],
    };

    #[test]
    fn identity_augmentation_equals_clean_view() {
        let shape = Shape {
            channels: 1,
            height: 6,
            width: 8,
        };
        let src = image(1);
        let mut clean = vec![0.0; 48];
        clean_into(&src, shape, &NORM1(), &mut clean);
        let mut aug = vec![0.0; 48];
        augment_into(
            &src,
            shape,
            &identity(),
            &NORM1(),
            &mut Rng::new(1),
            &mut aug,
        );
        for (a, b) in clean.iter().zip(&aug) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn flip_mirrors_the_image() {
        let shape = Shape {
            channels: 1,
            height: 6,
            width: 8,
        };
        let src = image(1);
        let mut aug = identity();
        aug.hflip = true;
        let mut flipped = None;
        for seed in 0..20 {
            let mut out = vec![0.0; 48];
            augment_into(&src, shape, &aug, &NORM1(), &mut Rng::new(seed), &mut out);
            let mut clean = vec![0.0; 48];
            clean_into(&src, shape, &NORM1(), &mut clean);
            if (out[0] - clean[0]).abs() > 1e-4 {
                flipped = Some((out, clean));
                break;
            }
        }
        let (out, clean) = flipped.expect("some seed flips");
        for y in 0..6 {
            for x in 0..8 {
                assert!((out[y * 8 + x] - clean[y * 8 + 7 - x]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn same_rng_same_view_different_rng_different_view() {
        let shape = Shape {
            channels: 3,
            height: 6,
            width: 8,
        };
        let src = image(3);
        let aug = AugmentSection {
            grayscale_p: 0.5,
            hflip: true,
            ..AugmentSection::default()
        };
        let norm = Normalize {
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        };
        let run = |parts: &[u64]| {
            let mut out = vec![0.0; shape.len()];
            augment_into(&src, shape, &aug, &norm, &mut Rng::derive(parts), &mut out);
            out
        };
        assert_eq!(run(&[1, 2, 3]), run(&[1, 2, 3]));
        assert_ne!(run(&[1, 2, 3]), run(&[1, 3, 3]));
        assert!(run(&[5, 5, 5]).iter().all(|v| v.is_finite()));
    }
}
