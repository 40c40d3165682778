//! Exactly rounded sums: f64 terms added without rounding into fixed-point integers, rounded to
//! f64 once at the end. Integer addition is associative, so the result does not depend on the
//! order of the terms, on how they are grouped among threads, or among processes (whose
//! accumulators are added with an integer all-reduce).
//!
//! A value is Σ_t limb_t · 2^(LSB + 48·t) over [`LIMBS`] signed 64-bit limbs of 48 bits each. Terms
//! must be multiples of 2^−240 below 2^144 in magnitude (the partial sums of a solve lie far
//! inside: column sums are below N·e^16 and their smallest terms above 2^−140, and 2^144 is
//! beyond λ times any f32); a term outside,
//! or not finite, is counted in a trailing "bad" slot instead, which the solver reports as an
//! error rather than rounding it silently.

use rayon::prelude::*;

/// Bits per limb.
const LIMB_BITS: i32 = 48;
const LIMB_MASK: i64 = (1 << LIMB_BITS) - 1;
/// Limbs per value.
pub(crate) const LIMBS: usize = 9;
/// Weight of the lowest limb's lowest bit.
const LSB: i32 = -240;
/// Terms must lie below 2^TOP in magnitude; the top limb only takes carries.
const TOP: i32 = LSB + LIMB_BITS * (LIMBS as i32 - 1);
/// Accumulators from at most this many processes may be added before normalising.
pub(crate) const MAX_PROCESSES: usize = 1 << 14;

/// `len` exactly accumulated sums, laid out as `len × LIMBS` limbs and one count of bad terms,
/// so that the whole state is one `[i64]` an all-reduce can add.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExactSums {
    limbs: Vec<i64>,
    len: usize,
}

impl ExactSums {
    /// `len` sums, all zero.
    pub fn new(len: usize) -> Self {
        ExactSums {
            limbs: vec![0; len * LIMBS + 1],
            len,
        }
    }

    /// Terms that could not be added exactly (non-finite or out of range), over all sums.
    pub fn bad(&self) -> i64 {
        self.limbs[self.len * LIMBS]
    }

    /// Adds `terms[i]` to sum `i`, for every i.
    #[cfg(test)]
    pub fn add_all(&mut self, terms: &[f64]) {
        debug_assert_eq!(terms.len(), self.len);
        for (i, &x) in terms.iter().enumerate() {
            self.add(i, x);
        }
    }

    /// Adds the columns of `rows` (row-major, `len` values per row: e.g. per-chunk partial sums)
    /// to the sums: sum `i` gets every row's value `i`. Column by column through a 128-bit
    /// fixed-point accumulator placed at the column's largest exponent, which holds exactly every
    /// term within 2^62 of the largest (each other term is added on its own); the same exact
    /// result as adding the terms one by one, several times faster.
    pub fn add_columns(&mut self, rows: &[f64]) {
        let len = self.len;
        debug_assert_eq!(rows.len() % len.max(1), 0);
        if len == 0 || rows.is_empty() {
            return;
        }
        self.normalise();
        let (sums, bad) = self.limbs.split_at_mut(len * LIMBS);
        let block = |(b, slots): (usize, &mut [i64])| -> i64 {
            let first = b * COLUMN_BLOCK;
            let width = slots.len() / LIMBS;
            let mut bad = 0;
            let mut emax = [0u64; COLUMN_BLOCK];
            for row in rows.chunks_exact(len) {
                for (e, &x) in emax.iter_mut().zip(&row[first..first + width]) {
                    *e = (*e).max((x.to_bits() >> 52) & 0x7ff);
                }
            }
            let mut acc = [0i128; COLUMN_BLOCK];
            for (t, row) in rows.chunks_exact(len).enumerate() {
                for (c, &x) in row[first..first + width].iter().enumerate() {
                    let slot = &mut slots[c * LIMBS..(c + 1) * LIMBS];
                    if !add_fast(&mut acc[c], emax[c], x) && !add_term(slot, x) {
                        bad += 1;
                    }
                }
                // Each fast term is below 2^115: flush long before 2^12 of them add up.
                if (t + 1) % FAST_TERMS == 0 {
                    for (c, a) in acc.iter_mut().enumerate().take(width) {
                        let slot = &mut slots[c * LIMBS..(c + 1) * LIMBS];
                        bad += i64::from(!add_wide(slot, std::mem::take(a), fast_low(emax[c])));
                        normalise(slot);
                    }
                }
            }
            for (c, a) in acc.iter().enumerate().take(width) {
                let slot = &mut slots[c * LIMBS..(c + 1) * LIMBS];
                bad += i64::from(!add_wide(slot, *a, fast_low(emax[c])));
                normalise(slot);
            }
            bad
        };
        let size = COLUMN_BLOCK * LIMBS;
        bad[0] += if rows.len() >= PARALLEL_TERMS {
            sums.par_chunks_mut(size)
                .enumerate()
                .map(block)
                .sum::<i64>()
        } else {
            sums.chunks_mut(size).enumerate().map(block).sum::<i64>()
        };
    }

    /// Adds `term` to sum `i`.
    #[cfg(test)]
    pub fn add(&mut self, i: usize, term: f64) {
        let slot = &mut self.limbs[i * LIMBS..(i + 1) * LIMBS];
        if add_term(slot, term) {
            normalise(slot);
        } else {
            self.limbs[self.len * LIMBS] += 1;
        }
    }

    /// Adds another set of sums of the same length.
    #[cfg(test)]
    pub fn merge(&mut self, mut other: ExactSums) {
        debug_assert_eq!(self.len, other.len);
        self.normalise();
        other.normalise();
        for (a, b) in self.limbs.iter_mut().zip(&other.limbs) {
            *a += b;
        }
    }

    /// The state as integers, normalised, for an all-reduce that adds them element-wise
    /// (from at most [`MAX_PROCESSES`] processes); call [`ExactSums::normalise`] after it.
    pub fn as_mut_slice(&mut self) -> &mut [i64] {
        self.normalise();
        &mut self.limbs
    }

    /// Moves carries up so every limb but the top one lies in [0, 2^48).
    pub fn normalise(&mut self) {
        let (sums, _) = self.limbs.split_at_mut(self.len * LIMBS);
        for slot in sums.chunks_exact_mut(LIMBS) {
            normalise(slot);
        }
    }

    /// Sum `i`, rounded to the nearest f64 (ties to even).
    pub fn value(&self, i: usize) -> f64 {
        let mut slot = [0i64; LIMBS];
        slot.copy_from_slice(&self.limbs[i * LIMBS..(i + 1) * LIMBS]);
        round(&mut slot)
    }

    /// Every sum, rounded.
    pub fn values(&self) -> Vec<f64> {
        (0..self.len).map(|i| self.value(i)).collect()
    }
}

/// Adds `x` into one value's limbs; false (nothing added) when `x` is not finite, too large, or
/// has bits below 2^LSB.
#[inline(always)]
fn add_term(slot: &mut [i64], x: f64) -> bool {
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    // x = ±m·2^(biased − 1075) with m an integer below 2^53; `shift` is that power over 2^LSB.
    let (mut m, mut shift) = if biased == 0 {
        if frac == 0 {
            return true;
        }
        (frac, -1074 - LSB)
    } else {
        (frac | (1u64 << 52), biased - 1075 - LSB)
    };
    if shift < 0 {
        let drop = -shift;
        if drop >= 64 || m & ((1u64 << drop) - 1) != 0 {
            return false;
        }
        m >>= drop;
        shift = 0;
    }
    // Also refuses inf and NaN (biased 0x7ff gives the largest shift).
    if shift + 53 > TOP - LSB {
        return false;
    }
    let limb = (shift / LIMB_BITS) as usize;
    let off = (shift % LIMB_BITS) as u32;
    // m·2^off (below 2^101) as three 48-bit digits, with two 64-bit shifts.
    let low = m << off;
    let high = if off == 0 { 0 } else { m >> (64 - off) };
    let digits = [
        (low & LIMB_MASK as u64) as i64,
        (((low >> LIMB_BITS) | (high << (64 - LIMB_BITS))) & LIMB_MASK as u64) as i64,
        (high >> (2 * LIMB_BITS - 64)) as i64,
    ];
    let slot: &mut [i64; 3] = (&mut slot[limb..limb + 3]).try_into().expect("three limbs");
    if bits >> 63 == 0 {
        for (l, d) in slot.iter_mut().zip(digits) {
            *l += d;
        }
    } else {
        for (l, d) in slot.iter_mut().zip(digits) {
            *l -= d;
        }
    }
    true
}

/// Columns summed together by [`ExactSums::add_columns`] (one cache line of f64 per row).
const COLUMN_BLOCK: usize = 8;
/// Terms added to a fast accumulator between flushes.
const FAST_TERMS: usize = 2048;
/// [`ExactSums::add_columns`] runs its column blocks in parallel from this many terms on.
const PARALLEL_TERMS: usize = 1 << 16;

/// The weight of a fast accumulator's lowest bit for a column whose largest biased exponent is
/// `emax`: the largest term's 53-bit mantissa then sits at bits 62..115.
#[inline(always)]
fn fast_low(emax: u64) -> i32 {
    (emax.max(1) as i32) - 1075 - 62
}

/// Adds `x` exactly to a fast accumulator (see [`fast_low`]); false when it does not fit (more
/// than 2^62 below the largest term, or not finite), and then nothing was added.
#[inline(always)]
fn add_fast(acc: &mut i128, emax: u64, x: f64) -> bool {
    let bits = x.to_bits();
    let biased = (bits >> 52) & 0x7ff;
    if emax == 0x7ff {
        return false;
    }
    let m = if biased == 0 {
        bits & ((1u64 << 52) - 1)
    } else {
        (bits & ((1u64 << 52) - 1)) | (1u64 << 52)
    };
    let shift = biased.max(1) as i32 - 1075 - fast_low(emax);
    if shift < 0 {
        return m == 0;
    }
    let v = ((m as u128) << shift) as i128;
    if bits >> 63 == 0 {
        *acc += v;
    } else {
        *acc -= v;
    }
    true
}

/// Adds `acc`·2^`low` into one value's limbs; false (nothing added) when it has bits outside
/// them.
fn add_wide(slot: &mut [i64], acc: i128, low: i32) -> bool {
    if acc == 0 {
        return true;
    }
    let negative = acc < 0;
    let mut mag = acc.unsigned_abs();
    let mut pos = low - LSB;
    if pos < 0 {
        let drop = -pos;
        if drop >= 128 || mag & ((1u128 << drop) - 1) != 0 {
            return false;
        }
        mag >>= drop;
        pos = 0;
    }
    if pos + (128 - mag.leading_zeros() as i32) > TOP - LSB {
        return false;
    }
    let mut limb = (pos / LIMB_BITS) as usize;
    let off = (pos % LIMB_BITS) as u32;
    let mut digit = ((mag & ((1u128 << (LIMB_BITS as u32 - off)) - 1)) << off) as i64;
    mag >>= LIMB_BITS as u32 - off;
    loop {
        if negative {
            slot[limb] -= digit;
        } else {
            slot[limb] += digit;
        }
        if mag == 0 {
            return true;
        }
        limb += 1;
        digit = (mag & LIMB_MASK as u128) as i64;
        mag >>= LIMB_BITS;
    }
}

fn normalise(slot: &mut [i64]) {
    for t in 0..LIMBS - 1 {
        let carry = slot[t] >> LIMB_BITS;
        slot[t] -= carry << LIMB_BITS;
        slot[t + 1] += carry;
    }
}

/// 2^e for e in the normal range.
fn pow2(e: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&e));
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// The value of one set of limbs, rounded to nearest (ties to even).
fn round(slot: &mut [i64; LIMBS]) -> f64 {
    normalise(slot);
    let negative = slot[LIMBS - 1] < 0;
    if negative {
        slot.iter_mut().for_each(|l| *l = -*l);
        normalise(slot);
    }
    let Some(h) = slot.iter().rposition(|&l| l != 0) else {
        return 0.0;
    };
    // Terms stay below 2^TOP and there are far fewer than 2^48 of them, so even the top limb
    // holds less than 2^48 here.
    debug_assert!(slot[h] < 1 << LIMB_BITS);
    let magnitude = if h < 2 {
        // At most 96 bits: the integer conversion rounds exactly once.
        let m = (slot[0] as u128) | ((slot[1] as u128) << LIMB_BITS);
        m as f64 * pow2(LSB)
    } else {
        // The top 128 bits of limbs h, h−1, h−2 (at least 81 significant), with every lower bit
        // folded into the lowest one: far below the rounding position, it only breaks ties.
        let m = ((slot[h] as u128) << 80)
            | ((slot[h - 1] as u128) << 32)
            | ((slot[h - 2] as u128) >> 16);
        let sticky = (slot[h - 2] & 0xffff) != 0 || slot[..h - 2].iter().any(|&l| l != 0);
        (m | sticky as u128) as f64 * pow2(LSB + LIMB_BITS * (h as i32 - 2) + 16)
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Terms on a 2^−60 grid below 2^60: their exact sum fits an i128, whose conversion to f64
    /// is correctly rounded — an independent reference.
    fn reference(terms: &[f64]) -> f64 {
        let scale = 2f64.powi(60);
        let total: i128 = terms.iter().map(|&x| (x * scale) as i128).sum();
        total as f64 / scale
    }

    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *state >> 11
    }

    fn exact_sum(terms: &[f64]) -> (f64, i64) {
        let mut s = ExactSums::new(1);
        for &x in terms {
            s.add(0, x);
        }
        s.normalise();
        (s.value(0), s.bad())
    }

    #[test]
    fn sums_are_correctly_rounded_and_order_free() {
        let mut state = 7u64;
        for case in 0..200 {
            let n = 1 + (lcg(&mut state) % 300) as usize;
            let terms: Vec<f64> = (0..n)
                .map(|_| {
                    let mant = (lcg(&mut state) % (1 << 50)) as f64;
                    let exp = (lcg(&mut state) % 60) as i32 - 60;
                    let sign = if case % 3 == 0 && lcg(&mut state) % 2 == 0 {
                        -1.0
                    } else {
                        1.0
                    };
                    sign * mant * 2f64.powi(exp)
                })
                .filter(|x| x.abs() < 2f64.powi(55))
                .collect();
            let (got, bad) = exact_sum(&terms);
            assert_eq!(bad, 0);
            assert_eq!(got.to_bits(), reference(&terms).to_bits(), "case {case}");
            let mut rev = terms.clone();
            rev.reverse();
            assert_eq!(exact_sum(&rev).0.to_bits(), got.to_bits());
        }
    }

    #[test]
    fn ties_round_to_even_and_sticky_bits_break_them() {
        let big = 2f64.powi(53);
        // 2^53 + 1 is a tie between 2^53 and 2^53 + 2: to even.
        assert_eq!(exact_sum(&[big, 1.0]).0, big);
        assert_eq!(exact_sum(&[big, 3.0]).0, big + 4.0);
        // Anything beyond the tie, however far below, rounds up.
        assert_eq!(exact_sum(&[big, 1.0, 2f64.powi(-200)]).0, big + 2.0);
        assert_eq!(exact_sum(&[big, 1.0, -(2f64.powi(-200))]).0, big);
        // Cancellation leaves the small terms exactly.
        let tiny = 2f64.powi(-230) * 3.0;
        assert_eq!(exact_sum(&[1e20, tiny, -1e20]).0, tiny);
        assert_eq!(exact_sum(&[-1.5, 0.25]).0, -1.25);
        assert_eq!(exact_sum(&[]).0, 0.0);
        // Plain f64 addition loses these; the exact sum does not.
        assert_eq!(exact_sum(&[1.0, 1e-30, -1.0]).0, 1e-30);
    }

    #[test]
    fn grouping_and_merging_do_not_change_bits() {
        let mut state = 11u64;
        let terms: Vec<f64> = (0..5000)
            .map(|_| {
                (lcg(&mut state) as f64 / 3.0) * 2f64.powi((lcg(&mut state) % 100) as i32 - 80)
            })
            .collect();
        let (whole, _) = exact_sum(&terms);
        for parts in [2usize, 3, 7] {
            let mut acc = ExactSums::new(1);
            for c in terms.chunks(terms.len().div_ceil(parts)).rev() {
                let mut part = ExactSums::new(1);
                for &x in c {
                    part.add(0, x);
                }
                acc.merge(part);
            }
            acc.normalise();
            assert_eq!(acc.value(0).to_bits(), whole.to_bits(), "{parts} parts");
        }
        // Many additions into one value.
        let mut s = ExactSums::new(2);
        for _ in 0..100_000 {
            s.add_all(&[2f64.powi(143) * 1.5, 1.0]);
        }
        s.normalise();
        assert_eq!(
            s.values(),
            vec![2f64.powi(143) * 1.5 * 100_000.0, 100_000.0]
        );
    }

    #[test]
    fn columns_add_as_their_terms_one_by_one() {
        let mut state = 5u64;
        for (rows, len) in [(63usize, 100usize), (5000, 3), (1, 17), (300, 1)] {
            let terms: Vec<f64> = (0..rows * len)
                .map(|i| {
                    let mant = (lcg(&mut state) % (1 << 53)) as f64;
                    // Mostly similar magnitudes, some far below (the slow path), some negative,
                    // zeros, and one column of huge spread.
                    let exp = match lcg(&mut state) % 10 {
                        0 => -200,
                        1 => -120,
                        _ => -40 - (lcg(&mut state) % 8) as i32,
                    };
                    let sign = if i % 7 == 3 { -1.0 } else { 1.0 };
                    if i % 13 == 0 {
                        0.0
                    } else {
                        sign * mant * 2f64.powi(exp + if i % len == 0 { 90 } else { 0 })
                    }
                })
                .collect();
            let mut fast = ExactSums::new(len);
            fast.add_columns(&terms);
            let mut slow = ExactSums::new(len);
            for row in terms.chunks(len) {
                slow.add_all(row);
            }
            slow.normalise();
            fast.normalise();
            assert_eq!(fast.bad(), 0);
            assert_eq!(fast.values(), slow.values(), "{rows}×{len}");
            assert_eq!(fast, slow);
        }
        let mut s = ExactSums::new(2);
        s.add_columns(&[1.0, f64::NAN, 2.0, 1.0, 1e-300, 3.0]);
        assert_eq!(s.bad(), 2);
        assert_eq!(s.values()[0], 3.0);
    }

    #[test]
    fn terms_it_cannot_hold_are_counted_not_rounded() {
        let mut s = ExactSums::new(1);
        for x in [
            f64::NAN,
            f64::INFINITY,
            2f64.powi(150),
            f64::MIN_POSITIVE,
            1e-300,
            1.0,
        ] {
            s.add(0, x);
        }
        assert_eq!(s.bad(), 5);
        assert_eq!(s.value(0), 1.0);
        let mut ok = ExactSums::new(1);
        ok.add(0, 2f64.powi(-240));
        ok.add(0, 2f64.powi(143));
        assert_eq!(ok.bad(), 0);
    }
}
