//! Batches of augmented training images, prepared ahead of the training step on a background
//! thread (augmentation itself fans out over rayon), so the step does not wait on the loader.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use sela_config::AugmentSection;

use crate::augment::{augment_into, clean_into, Normalize, Shape};
use crate::imageset::ImageSet;
use crate::rng::Rng;

/// Stream tags, so the shuffle and the per-sample augmentation draw from unrelated generators.
const STREAM_SHUFFLE: u64 = 1;
const STREAM_AUGMENT: u64 = 2;

/// The order in which an epoch visits the dataset: a permutation derived from (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(&[seed, STREAM_SHUFFLE, epoch]).shuffle(&mut order);
    order
}

/// Number of batches in an epoch of `n` images. The last incomplete batch is dropped (a tiny
/// final batch makes BatchNorm statistics noisy), unless the whole set is smaller than a batch.
pub fn batches_per_epoch(n: usize, batch_size: usize) -> usize {
    if n < batch_size {
        usize::from(n > 0)
    } else {
        n / batch_size
    }
}

/// One prepared batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Index of the batch within its epoch.
    pub index: usize,
    /// Row indices (into the image set) of the batch's images.
    pub rows: Vec<usize>,
    /// `rows.len()` images, NCHW, normalised.
    pub images: Vec<f32>,
}

/// How batch images are produced.
#[derive(Debug, Clone)]
pub enum View {
    /// Unaugmented.
    Clean,
    /// Randomly augmented, seeded per (seed, epoch, image).
    Augmented(AugmentSection),
}

/// Fills `out` with the images of `rows`.
pub fn fill_batch(
    set: &ImageSet,
    rows: &[usize],
    view: &View,
    norm: &Normalize,
    seed: u64,
    epoch: u64,
    out: &mut [f32],
) {
    let shape = Shape {
        channels: set.channels,
        height: set.height,
        width: set.width,
    };
    out.par_chunks_mut(shape.len())
        .zip(rows.par_iter())
        .for_each(|(dst, &row)| match view {
            View::Clean => clean_into(set.image(row), shape, norm, dst),
            View::Augmented(aug) => {
                let mut rng = Rng::derive(&[seed, STREAM_AUGMENT, epoch, set.ids[row]]);
                augment_into(set.image(row), shape, aug, norm, &mut rng, dst)
            }
        });
}

/// Prepares an epoch's batches ahead of use.
pub struct Prefetcher {
    rx: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
    waited: Duration,
}

impl Prefetcher {
    /// Starts preparing the batches of `epoch`, from batch `first_batch` on (to resume mid-epoch),
    /// keeping up to `depth` batches ready.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        set: Arc<ImageSet>,
        batch_size: usize,
        view: View,
        norm: Normalize,
        seed: u64,
        epoch: u64,
        first_batch: usize,
        depth: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::spawn(move || {
            let order = epoch_order(set.len(), seed, epoch);
            let per_image = set.image_len();
            for index in first_batch..batches_per_epoch(set.len(), batch_size) {
                let start = index * batch_size;
                let rows = order[start..(start + batch_size).min(order.len())].to_vec();
                let mut images = vec![0.0f32; rows.len() * per_image];
                fill_batch(&set, &rows, &view, &norm, seed, epoch, &mut images);
                if tx
                    .send(Batch {
                        index,
                        rows,
                        images,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        Prefetcher {
            rx,
            handle: Some(handle),
            waited: Duration::ZERO,
        }
    }

    /// Total time `next` spent blocked waiting for a batch.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Iterator for Prefetcher {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let t = Instant::now();
        let batch = self.rx.recv().ok();
        self.waited += t.elapsed();
        if batch.is_none() {
            if let Some(h) = self.handle.take() {
                h.join().expect("loader thread panicked");
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> Arc<ImageSet> {
        Arc::new(ImageSet {
            ids: (100..100 + n as u64).collect(),
            labels: vec![None; n],
            class_names: vec![],
            channels: 1,
            height: 4,
            width: 4,
            pixels: (0..n * 16).map(|i| (i % 256) as u8).collect(),
        })
    }

    fn norm() -> Normalize {
        Normalize {
            mean: vec![0.0],
            std: vec![1.0],
        }
    }

    #[test]
    fn epoch_covers_every_image_once_and_is_reproducible() {
        let order = epoch_order(10, 3, 1);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(order, epoch_order(10, 3, 1));
        assert_ne!(order, epoch_order(10, 3, 2));
    }

    #[test]
    fn prefetched_batches_are_deterministic_and_resumable() {
        let view = View::Augmented(AugmentSection::default());
        let all: Vec<Batch> =
            Prefetcher::start(set(10), 4, view.clone(), norm(), 1, 0, 0, 2).collect();
        assert_eq!(all.len(), 2);
        let again: Vec<Batch> =
            Prefetcher::start(set(10), 4, view.clone(), norm(), 1, 0, 0, 1).collect();
        assert_eq!(all, again);
        let resumed: Vec<Batch> = Prefetcher::start(set(10), 4, view, norm(), 1, 0, 1, 2).collect();
        assert_eq!(resumed[..], all[1..]);
        assert_eq!(batches_per_epoch(3, 4), 1);
        assert_eq!(batches_per_epoch(0, 4), 0);
    }
}
