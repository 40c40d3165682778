//! Solving over rows split among processes: the few collective operations a solve needs, and
//! which rows a process holds.
//!
//! Every process holds a contiguous range of the global rows, whole blocks of
//! [`block_rows`]`(N)`, and calls the same methods of its [`crate::Sinkhorn`] in the same order.
//! The sweeps' column sums, the plan's measures and the balancing's counts are then combined
//! with [`Reduce`]; all of them are exact (integer sums of fixed-point accumulators, or maxima),
//! so every process ends each step with the same bits, and the same bits as one process holding
//! every row.

/// The collective operations of a distributed solve. Every process must make the same calls, in
/// the same order, with slices of the same length. [`Local`] is the single-process case.
pub trait Reduce {
    /// Number of processes sharing the rows.
    fn ranks(&self) -> usize;
    /// Replaces every element by its sum over all processes.
    fn sum_i64(&self, values: &mut [i64]);
    /// Replaces every element by its largest value over all processes.
    fn max_f64(&self, values: &mut [f64]);
}

/// One process holding every row: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Local;

impl Reduce for Local {
    fn ranks(&self) -> usize {
        1
    }
    fn sum_i64(&self, _: &mut [i64]) {}
    fn max_f64(&self, _: &mut [f64]) {}
}

impl<R: Reduce + ?Sized> Reduce for &R {
    fn ranks(&self) -> usize {
        (**self).ranks()
    }
    fn sum_i64(&self, values: &mut [i64]) {
        (**self).sum_i64(values)
    }
    fn max_f64(&self, values: &mut [f64]) {
        (**self).max_f64(values)
    }
}

/// Where this process's rows lie among all rows: global rows `first..first + local`, of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    /// Global index of this process's first row.
    pub first: usize,
    /// Rows of all processes together (N).
    pub total: usize,
}

/// Most chunks of rows per sweep for small N (each a unit of parallel work).
const TARGET_CHUNKS: usize = 64;
/// Most rows per chunk, so that large N gives many chunks: enough parallel work for every
/// process of a distributed solve, and blocks small enough for many processes.
const MAX_CHUNK_ROWS: usize = 4096;
/// Chunks per block: a block's chunk sums are added in chunk order, the blocks' sums exactly.
pub(crate) const CHUNKS_PER_BLOCK: usize = 8;

/// Rows per chunk (the unit of parallel work) for N = `total` rows: a multiple of 32 chosen from N
/// alone.
pub fn chunk_rows(total: usize) -> usize {
    let per = total.div_ceil(TARGET_CHUNKS);
    (per.div_ceil(crate::math::SUB_ROWS).max(1) * crate::math::SUB_ROWS).min(MAX_CHUNK_ROWS)
}

/// Rows per block for N = `total` rows: [`chunk_rows`] times 8. A sweep sums each chunk's rows in
/// a fixed order, a block's chunks in chunk order, and the blocks' sums exactly, so results
/// depend on this and on nothing else: a process's rows must be whole blocks.
pub fn block_rows(total: usize) -> usize {
    chunk_rows(total) * CHUNKS_PER_BLOCK
}

/// The global row ranges of `ranks` processes that split `total` rows into whole blocks as
/// evenly as possible: process r holds `bounds[r]..bounds[r + 1]`. Processes beyond the number
/// of blocks hold no rows.
pub fn split_rows(total: usize, ranks: usize) -> Vec<usize> {
    let br = block_rows(total);
    let blocks = total.div_ceil(br);
    (0..=ranks)
        .map(|r| (blocks * r / ranks * br).min(total))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_splits() {
        assert_eq!(chunk_rows(20_000), 320);
        assert_eq!(chunk_rows(200_000), 3136);
        assert_eq!(chunk_rows(1), 32);
        assert_eq!(chunk_rows(10_000_000), MAX_CHUNK_ROWS);
        assert_eq!(block_rows(20_000), 2560);
        for (total, ranks) in [(1000usize, 3usize), (97, 4), (5, 2), (200_000, 7)] {
            let b = split_rows(total, ranks);
            let br = block_rows(total);
            assert_eq!((b[0], b[ranks]), (0, total));
            for w in b.windows(2) {
                assert!(w[0] <= w[1]);
                assert!(w[0] % br == 0 || w[0] == total);
            }
        }
        // More processes than blocks: the extra ones hold nothing.
        assert_eq!(split_rows(300, 3), vec![0, 0, 256, 300]);
    }
}
