//! The label step over MPI: `mpirun -np R sela-assign --logits DIR --output OUT ...` (or `srun`
//! in a Slurm job), for problems whose N×K matrix outgrows one machine.
//!
//! - **Reading.** Rank r reads the part files `i` of the input with `i % R == r` (the extract
//!   stage's shards; any number of files for any R). Row counts are added up over all ranks,
//!   and ids are split at R − 1 global id values found by bisection on counts, so that rank r
//!   ends up with the global rows [`split_rows`]`(N, R)[r]..[r + 1]` in ascending id order:
//!   the same rows, in the same order, a single process reads. Rows travel to their rank in one
//!   all-to-all exchange per head.
//! - **Solving.** [`Sinkhorn::distributed`] over [`MpiReduce`]: per iteration one all-reduce of
//!   the K exact column-sum accumulators. Labels, confidences, statistics, warm start, priors,
//!   churn and `--exact-balance` are those of the single-process run, bit for bit.
//! - **Output.** `--output` names a directory; rank r writes `part-RRRRR-of-NNNNN.parquet`
//!   (N = R) into a hidden staging directory beside it, all ranks agree that every part was
//!   written, and only then rank 0 moves the directory into place (replacing an earlier output)
//!   and writes the statistics. The labels readers take the directory as they take one file.
//!   Staging directories of jobs that died are removed by the next run (named for their rank
//!   0's process id, removed once that process no longer runs).
//! - **Failure.** Every step that can fail on one rank (a bad part file, a full disk) ends in an
//!   agreement: if any rank failed, every rank stops with all failed ranks' messages
//!   (`rank 2: .../part-00002-of-00004.parquet: ...`), rank 0 prints them, all exit with
//!   status 1 and nothing is published. A rank that dies makes `mpirun` (or `srun`) end the
//!   job; nothing is published then either.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use arrow::array::AsArray;
use arrow::datatypes::{Float32Type, UInt64Type};
use mpi::collective::SystemOperation;
use mpi::datatype::{MutView, Partition, PartitionMut, UserDatatype, View};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use sela_io::contract::{Column, ColumnType, Contract};
use sela_io::features;
use sela_io::labels::{self, HeadLabels};
use sela_io::parts::Shard;
use sela_io::table::TableFile;
use sela_io::IoError;
use sela_metrics::Contingency;
use sela_sinkhorn::{split_rows, Reduce, Rows, Sinkhorn};

use crate::{
    duals_for, empty_stats, head_columns, head_stats, labels_meta, output_places, read_warm,
    report_head, solve_head, summary, write_stats, Args, Reporting, Settings, Summary,
};

/// Environment variable naming a rank that aborts just before the agreement on its written
/// part (for testing that a dying rank publishes nothing).
pub const ABORT_RANK: &str = "SELA_ASSIGN_ABORT_RANK";

/// [`Reduce`] over an MPI communicator: `MPI_Allreduce` with `MPI_SUM` and `MPI_MAX`.
pub struct MpiReduce<'a> {
    comm: &'a SimpleCommunicator,
}

impl<'a> MpiReduce<'a> {
    /// Reductions over `comm`.
    pub fn new(comm: &'a SimpleCommunicator) -> Self {
        MpiReduce { comm }
    }
}

impl Reduce for MpiReduce<'_> {
    fn ranks(&self) -> usize {
        self.comm.size() as usize
    }
    fn sum_i64(&self, values: &mut [i64]) {
        let mine = values.to_vec();
        self.comm
            .all_reduce_into(&mine[..], values, SystemOperation::sum());
    }
    fn max_f64(&self, values: &mut [f64]) {
        let mine = values.to_vec();
        self.comm
            .all_reduce_into(&mine[..], values, SystemOperation::max());
    }
}

/// Runs the stage as one rank of an MPI job: initialises MPI, runs, prints the summary (rank 0)
/// or the agreed error (rank 0), and returns every rank's exit status.
pub fn main(args: &Args) -> ExitCode {
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        eprintln!("error: MPI was already initialised");
        return ExitCode::from(sela_cli::EXIT_RUNTIME_ERROR);
    };
    let world = universe.world();
    let rank = world.rank();
    match run(args, &world) {
        Ok(summary) => {
            if rank == 0 {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summaries serialize")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if rank == 0 {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(sela_cli::EXIT_RUNTIME_ERROR)
        }
    }
}

/// Every rank's bytes, in rank order.
fn all_gather_bytes(world: &SimpleCommunicator, mine: &[u8]) -> Vec<Vec<u8>> {
    let ranks = world.size() as usize;
    // One leading byte keeps every buffer non-empty: an empty byte slice's address is 1, which
    // OpenMPI takes for MPI_IN_PLACE.
    let mine: Vec<u8> = std::iter::once(0).chain(mine.iter().copied()).collect();
    let mut lens = vec![0 as Count; ranks];
    let len = Count::try_from(mine.len()).expect("messages are far below 2 GiB");
    world.all_gather_into(&len, &mut lens[..]);
    let displs: Vec<Count> = lens
        .iter()
        .scan(0, |at, &l| {
            let d = *at;
            *at += l;
            Some(d)
        })
        .collect();
    let total: usize = lens.iter().map(|&l| l as usize).sum();
    let mut all = vec![0u8; total];
    {
        let mut parts = PartitionMut::new(&mut all[..], &lens[..], &displs[..]);
        world.all_gather_varcount_into(&mine[..], &mut parts);
    }
    (0..ranks)
        .map(|r| all[displs[r] as usize + 1..(displs[r] + lens[r]) as usize].to_vec())
        .collect()
}

/// The collective outcome of a step every rank took: `Ok` on every rank if it succeeded on every
/// rank; otherwise, on every rank, an error listing each failed rank with its message.
fn agree<T>(world: &SimpleCommunicator, local: anyhow::Result<T>) -> anyhow::Result<T> {
    let message = match &local {
        Ok(_) => Vec::new(),
        Err(e) => format!("{e:#}").into_bytes(),
    };
    // Failed ranks grouped by message, in the order of their first rank.
    let mut failed: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
    for (r, m) in all_gather_bytes(world, &message).into_iter().enumerate() {
        if m.is_empty() {
            continue;
        }
        match failed.iter_mut().find(|(_, x)| *x == m) {
            Some((ranks, _)) => ranks.push(r),
            None => failed.push((vec![r], m)),
        }
    }
    if failed.is_empty() {
        return local;
    }
    let text: Vec<String> = failed
        .iter()
        .map(|(ranks, m)| {
            let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
            let s = if ranks.len() == 1 { "" } else { "s" };
            format!(
                "rank{s} {}: {}",
                list.join(", "),
                String::from_utf8_lossy(m)
            )
        })
        .collect();
    Err(anyhow!("{}", text.join("; ")))
}

/// One head's rows as one rank read them from its part files.
struct Read {
    ids: Vec<u64>,
    values: Vec<f32>,
    /// Values per row, when any row was read.
    width: Option<usize>,
}

/// Reads `id` and the vector column `column` of `files`, checking every value is finite (errors
/// name the file, the row and the column, as the single-process reader's do).
fn read_rows(files: &[PathBuf], column: &str) -> anyhow::Result<Read> {
    let contract = Contract {
        table: features::TABLE,
        version: features::VERSION,
        columns: vec![
            Column::required("id", ColumnType::UInt64),
            Column::required(column, ColumnType::F32Vector(None)),
        ],
    };
    let mut out = Read {
        ids: Vec::new(),
        values: Vec::new(),
        width: None,
    };
    for f in files {
        let table = TableFile::open(f, &contract)?;
        let mut batches = table.batches(16 * 1024)?;
        loop {
            let first_row = batches.next_row();
            let Some(batch) = batches.next() else { break };
            let batch = batch?;
            let list = batch.column(1).as_fixed_size_list();
            let width = list.value_length() as usize;
            match out.width {
                Some(c) if c != width => {
                    return Err(IoError::ColumnType {
                        path: f.clone(),
                        column: column.to_string(),
                        expected: ColumnType::F32Vector(Some(c)).describe(),
                        actual: ColumnType::F32Vector(Some(width)).describe(),
                    }
                    .into())
                }
                _ => out.width = Some(width),
            }
            let flat = list.values().as_primitive::<Float32Type>();
            let start = list.value_offset_at(0);
            let slice = &flat.values()[start..start + batch.num_rows() * width];
            if let Some(i) = slice.iter().position(|v| !v.is_finite()) {
                return Err(IoError::Value {
                    path: f.clone(),
                    column: column.to_string(),
                    row: first_row + (i / width) as u64,
                    message: format!("non-finite value {} at position {}", slice[i], i % width),
                }
                .into());
            }
            out.values.extend_from_slice(slice);
            let ids = batch.column(0).as_primitive::<UInt64Type>();
            out.ids.extend(ids.values().iter());
        }
    }
    Ok(out)
}

/// How rows move to their ranks: N, every rank's global rows, and the id values splitting them.
struct Plan {
    total: usize,
    bounds: Vec<usize>,
    /// Rank r ≥ 1 holds ids from `splits[r − 1]` on (2^64: no ids).
    splits: Vec<u128>,
}

impl Plan {
    /// Finds the id values at the global row bounds, from this rank's sorted ids: a bisection
    /// of the id range on counts added over all ranks (65 all-reduces of R − 1 counts).
    fn new(comm: &MpiReduce<'_>, sorted_ids: &[u64]) -> Plan {
        let ranks = comm.ranks();
        let mut total = [sorted_ids.len() as i64];
        comm.sum_i64(&mut total);
        let total = total[0] as usize;
        let bounds = split_rows(total, ranks);
        let want: Vec<i64> = bounds[1..ranks].iter().map(|&b| b as i64).collect();
        // Largest t with #{ids < t} ≤ want: the id at that global row (ids are distinct).
        let mut lo = vec![0u128; want.len()];
        let mut hi = vec![(1u128 << 64) + 1; want.len()];
        while lo.iter().zip(&hi).any(|(l, h)| l + 1 < *h) {
            let mid: Vec<u128> = lo.iter().zip(&hi).map(|(l, h)| l + (h - l) / 2).collect();
            let mut below: Vec<i64> = mid
                .iter()
                .map(|&m| sorted_ids.partition_point(|&x| (x as u128) < m) as i64)
                .collect();
            comm.sum_i64(&mut below);
            for s in 0..want.len() {
                if lo[s] + 1 < hi[s] {
                    if below[s] <= want[s] {
                        lo[s] = mid[s];
                    } else {
                        hi[s] = mid[s];
                    }
                }
            }
        }
        Plan {
            total,
            bounds,
            splits: lo,
        }
    }

    /// The rank that holds `id`.
    fn rank_of(&self, id: u64) -> usize {
        self.splits.partition_point(|&s| s <= id as u128)
    }
}

/// Sends every row to its rank (one all-to-all for the ids, one for the values, in rows of
/// `width` f32) and returns this rank's rows in ascending id order.
fn exchange(
    world: &SimpleCommunicator,
    plan: &Plan,
    mut read: Read,
    width: usize,
) -> anyhow::Result<(Vec<u64>, Vec<f32>)> {
    let ranks = world.size() as usize;
    features::sort_rows_by_id(&mut read.ids, &mut read.values, width);
    let too_many = |what: &str| {
        anyhow!("{what} exceed the 2^31 rows one MPI exchange can move: use more ranks")
    };
    let mut send_counts = vec![0 as Count; ranks];
    let mut at = 0;
    for (r, count) in send_counts.iter_mut().enumerate() {
        let end = at + read.ids[at..].partition_point(|&x| plan.rank_of(x) <= r);
        *count = Count::try_from(end - at).map_err(|_| too_many("rows for one rank"))?;
        at = end;
    }
    let mut recv_counts = vec![0 as Count; ranks];
    world.all_to_all_into(&send_counts[..], &mut recv_counts[..]);
    let offsets = |counts: &[Count]| -> anyhow::Result<Vec<Count>> {
        let mut at: i64 = 0;
        counts
            .iter()
            .map(|&c| {
                let d = Count::try_from(at).map_err(|_| too_many("this rank's rows"));
                at += c as i64;
                d
            })
            .collect()
    };
    let (send_displs, recv_displs) = (offsets(&send_counts)?, offsets(&recv_counts)?);
    let rows: usize = recv_counts.iter().map(|&c| c as usize).sum();
    let mut ids = vec![0u64; rows];
    {
        let send = Partition::new(&read.ids[..], &send_counts[..], &send_displs[..]);
        let mut recv = PartitionMut::new(&mut ids[..], &recv_counts[..], &recv_displs[..]);
        world.all_to_all_varcount_into(&send, &mut recv);
    }
    drop(read.ids);
    let mut values = vec![0f32; rows * width];
    {
        let row = UserDatatype::contiguous(width as Count, &f32::equivalent_datatype());
        let mine = Count::try_from(read.values.len() / width).map_err(|_| too_many("rows"))?;
        let theirs = Count::try_from(rows).map_err(|_| too_many("rows"))?;
        // SAFETY: `row` is `width` contiguous f32 with no padding, and the views hold exactly
        // `mine` and `theirs` such rows.
        let send_view = unsafe { View::with_count_and_datatype(&read.values[..], mine, &row) };
        let mut recv_view =
            unsafe { MutView::with_count_and_datatype(&mut values[..], theirs, &row) };
        let send = Partition::new(&send_view, &send_counts[..], &send_displs[..]);
        let mut recv = PartitionMut::new(&mut recv_view, &recv_counts[..], &recv_displs[..]);
        world.all_to_all_varcount_into(&send, &mut recv);
    }
    drop(read.values);
    features::sort_rows_by_id(&mut ids, &mut values, width);
    Ok((ids, values))
}

/// The labels a previous round gave this rank's ids, per head: read whole, kept for `ids`.
fn previous_for(
    path: &Path,
    prev: &labels::Labels,
    head: u32,
    ids: &[u64],
    total: usize,
) -> anyhow::Result<Option<Vec<u32>>> {
    let Some(rows) = prev.heads.get(&head) else {
        return Ok(None);
    };
    if rows.len() != total {
        bail!(
            "{}: head {head} labels {} rows, the logits have {total}",
            path.display(),
            rows.len()
        );
    }
    let index: HashMap<u64, u32> = rows
        .ids
        .iter()
        .zip(&rows.labels)
        .filter(|(id, _)| ids.binary_search(id).is_ok())
        .map(|(&id, &l)| (id, l))
        .collect();
    let aligned = ids
        .iter()
        .map(|id| {
            index.get(id).copied().ok_or_else(|| {
                anyhow!(
                    "{}: head {head} has no label for dataset id {id}",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    Ok(Some(aligned))
}

/// The contingency table of (previous, new) labels over all ranks: each rank's sparse cells are
/// gathered and merged, which gives exactly the table of the whole label vectors.
fn global_contingency(world: &SimpleCommunicator, before: &[u32], after: &[u32]) -> Contingency {
    let local = Contingency::new(before, after);
    let mut mine = Vec::with_capacity(local.cells.len() * 16);
    for &(i, j, c) in &local.cells {
        let pair = ((local.row_labels[i] as u64) << 32) | local.col_labels[j] as u64;
        mine.extend_from_slice(&pair.to_le_bytes());
        mine.extend_from_slice(&c.to_le_bytes());
    }
    let mut cells: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for part in all_gather_bytes(world, &mine) {
        for cell in part.chunks_exact(16) {
            let pair = u64::from_le_bytes(cell[..8].try_into().expect("8 bytes"));
            let count = u64::from_le_bytes(cell[8..].try_into().expect("8 bytes"));
            *cells.entry(((pair >> 32) as u32, pair as u32)).or_default() += count;
        }
    }
    let distinct = |v: Vec<u32>| {
        let mut v = v;
        v.sort_unstable();
        v.dedup();
        v
    };
    let row_labels = distinct(cells.keys().map(|k| k.0).collect());
    let col_labels = distinct(cells.keys().map(|k| k.1).collect());
    let at = |labels: &[u32], x: u32| labels.binary_search(&x).expect("label of a cell");
    let mut table = Contingency {
        row_sums: vec![0; row_labels.len()],
        col_sums: vec![0; col_labels.len()],
        cells: Vec::with_capacity(cells.len()),
        n: 0,
        row_labels,
        col_labels,
    };
    for (&(a, b), &c) in &cells {
        let (i, j) = (at(&table.row_labels, a), at(&table.col_labels, b));
        table.cells.push((i, j, c));
        table.row_sums[i] += c;
        table.col_sums[j] += c;
        table.n += c;
    }
    table
}

/// The hidden name beside `output` of one of its temporaries (`staging` or `replaced`) for the
/// job whose rank 0 has process id `pid`.
fn beside(output: &Path, what: &str, pid: u32) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.{what}-{pid}"))
}

/// Removes the temporaries beside `output` of jobs whose rank 0 no longer runs (killed before
/// they could clean up), as the atomic writers do for their own temporaries: only where
/// `/proc` tells which processes run.
fn remove_stale(output: &Path) {
    let (Some(dir), Some(name)) = (output.parent(), output.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let name = name.to_string_lossy();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let pid = ["staging", "replaced"].iter().find_map(|what| {
            file.strip_prefix(&format!(".{name}.{what}-"))
                .and_then(|p| p.parse::<u32>().ok())
        });
        if pid.is_some_and(|pid| pid != std::process::id() && !process_runs(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` runs on this machine: not when `/proc` has no such process or only its
/// zombie (a killed rank whose parent is gone stays one where nothing reaps it); `true` where
/// there is no `/proc` to ask.
fn process_runs(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Moves the staged directory onto `output`, moving an earlier output aside first and removing
/// it after: readers see the old set of parts, then (after a moment with none) the new set,
/// never a mixture.
fn publish(staging: &Path, output: &Path, pid: u32) -> anyhow::Result<()> {
    let old = beside(output, "replaced", pid);
    let had_old = output.symlink_metadata().is_ok();
    if had_old {
        std::fs::rename(output, &old)
            .with_context(|| format!("moving the earlier {} aside", output.display()))?;
    }
    std::fs::rename(staging, output)
        .with_context(|| format!("publishing {} as {}", staging.display(), output.display()))?;
    if let Some(dir) = output.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    if had_old {
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        removed.with_context(|| format!("removing the earlier output {}", old.display()))?;
    }
    Ok(())
}

/// The distributed run: every rank calls this; every fallible step ends in [`agree`].
pub fn run(args: &Args, world: &SimpleCommunicator) -> anyhow::Result<Summary> {
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let comm = MpiReduce::new(world);
    let launched = crate::mpi_launch().unwrap_or(0);
    agree(
        world,
        if launched > ranks {
            Err(anyhow!(
                "the launcher started {launched} processes but MPI sees {ranks}: the launcher \
                 and the MPI library do not talk (with srun, pass --mpi=pmix or --mpi=pmi2)"
            ))
        } else {
            Ok(())
        },
    )?;
    let quiet = args.out.quiet || rank != 0;
    let settings = agree(
        world,
        Settings::resolve(args).and_then(|s| {
            if s.neighbours > 0 {
                bail!(
                    "assign.neighbours = {} is not supported over MPI (each rank holds only its \
                     own rows, and the search needs them all); run sela-assign as one process",
                    s.neighbours
                );
            }
            if s.spectral > 0 {
                bail!(
                    "assign.spectral = {} is not supported over MPI (the neighbour graph needs \
                     every rank's rows); run sela-assign as one process",
                    s.spectral
                );
            }
            Ok(s)
        }),
    )?;
    let setup = (|| -> anyhow::Result<_> {
        let heads = head_columns(&args.logits, args.column.as_deref())?;
        let warm = read_warm(args)?;
        let previous = match &args.previous {
            Some(p) => Some((p.clone(), labels::read(p)?)),
            None => None,
        };
        let files = sela_io::parts::resolve(&args.logits)?;
        if rank == 0 {
            // The checks of the whole set (one layout, every shard once, rows adding up to
            // the dataset) read only the footers.
            features::open_parts(&args.logits)?;
        }
        Ok((heads, warm, previous, files))
    })();
    let (heads, warm, previous, files) = agree(world, setup)?;
    let mine: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .filter(|(i, _)| i % ranks == rank)
        .map(|(_, f)| f.clone())
        .collect();

    let mut stats = empty_stats(&settings);
    let mut out: BTreeMap<u32, HeadLabels> = BTreeMap::new();
    let mut plan: Option<(Plan, Vec<u64>)> = None;
    let mut total = 0;
    for (head, column) in &heads {
        let (head, column) = (*head, column.as_str());
        let start = Instant::now();
        let mut read = agree(world, read_rows(&mine, column))?;
        let ctx = format!("{}: column `{column}`", args.logits.display());
        // One K for every rank's rows.
        let mut widths = [
            read.width.map_or(f64::NEG_INFINITY, |w| w as f64),
            read.width.map_or(f64::NEG_INFINITY, |w| -(w as f64)),
        ];
        comm.max_f64(&mut widths);
        let k = if widths[0] > f64::NEG_INFINITY {
            widths[0] as usize
        } else {
            0
        };
        agree(
            world,
            match read.width {
                Some(w) if w as f64 != -widths[1] || w != k => Err(anyhow!(
                    "{ctx}: this rank's parts ({}) have K = {w}, other ranks' parts have K from \
                     {} to {k}",
                    mine.iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    -widths[1]
                )),
                _ if k == 0 => Err(anyhow!("{ctx}: no rows")),
                _ => Ok(()),
            },
        )?;
        if plan.is_none() {
            let mut sorted = read.ids.clone();
            sorted.sort_unstable();
            plan = Some((Plan::new(&comm, &sorted), sorted));
        } else if let Some((_, first_ids)) = &plan {
            let mut sorted = read.ids.clone();
            sorted.sort_unstable();
            agree(
                world,
                if &sorted == first_ids {
                    Ok(())
                } else {
                    Err(anyhow!(
                        "{ctx}: the parts hold other ids than for the first head"
                    ))
                },
            )?;
        }
        let (p, _) = plan.as_ref().expect("planned above");
        read.width = Some(k);
        let exchanged = exchange(world, p, read, k);
        let (ids, values) = agree(world, exchanged)?;
        let (lo, hi) = (p.bounds[rank], p.bounds[rank + 1]);
        agree(
            world,
            if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                Err(anyhow!("{ctx}: id {} occurs more than once", w[0]))
            } else if ids.len() != hi - lo {
                Err(anyhow!(
                    "{ctx}: rank {rank} received {} rows for global rows {lo}..{hi}",
                    ids.len()
                ))
            } else {
                Ok(())
            },
        )?;
        total = p.total;
        let marginals = agree(
            world,
            settings
                .prior
                .marginals(k)
                .with_context(|| format!("{ctx}: prior for K = {k}")),
        )?;
        let duals = agree(world, duals_for(&warm, head, k, settings.lambda))?;
        let rows = Rows {
            first: lo,
            total: p.total,
        };
        // Errors of the solver are the same on every rank (it agrees on them itself).
        let mut solver =
            Sinkhorn::distributed(values, k, settings.lambda, duals.as_deref(), rows, &comm)
                .map_err(|e| anyhow!("{ctx}: {e}"))?
                .with_acceleration(settings.acceleration);
        let report = Reporting {
            ctx: &ctx,
            quiet,
            warn: rank == 0,
            strict: args.strict,
        };
        let solution = solve_head(&mut solver, &marginals, &settings, (head, column), &report)?;
        let mut assignment = solver.assign().map_err(|e| anyhow!("{ctx}: {e}"))?;
        if settings.exact_balance {
            solver.balance(&mut assignment, settings.seed);
        }
        let mut h = head_stats(
            head,
            column,
            &solver,
            &solution,
            &assignment,
            duals.is_some(),
        );
        if let Some((path, prev)) = &previous {
            let before = agree(world, previous_for(path, prev, head, &ids, p.total))?;
            if let Some(before) = before {
                let mut changed = [before
                    .iter()
                    .zip(&assignment.labels)
                    .filter(|(a, b)| a != b)
                    .count() as i64];
                comm.sum_i64(&mut changed);
                h.churn_fraction = Some(changed[0] as f64 / p.total as f64);
                h.churn_nmi = Some(global_contingency(world, &before, &assignment.labels).nmi());
            }
        }
        // Rank 0's wall time, so that every rank writes the same statistics.
        let mut seconds = start.elapsed().as_secs_f64();
        world.process_at_rank(0).broadcast_into(&mut seconds);
        h.seconds = seconds;
        drop(solver);
        if !quiet {
            report_head(&h);
        }
        stats.heads.push(h);
        out.insert(
            head,
            HeadLabels {
                ids,
                labels: assignment.labels,
                confidence: assignment.confidence,
            },
        );
    }

    // Every part into one staging directory; published only once all ranks wrote theirs.
    let meta = labels_meta(args, &settings, &stats);
    let (dir, stats_path) = output_places(args);
    let mut pid = std::process::id();
    world.process_at_rank(0).broadcast_into(&mut pid);
    let staging = beside(&args.output, "staging", pid);
    agree(
        world,
        if rank == 0 {
            remove_stale(&args.output);
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::create_dir(&staging))
                .with_context(|| format!("{}", staging.display()))
        } else {
            Ok(())
        },
    )?;
    let shard = Shard::new(rank, ranks).map_err(|e| anyhow!(e))?;
    let part = staging.join(shard.file_name());
    let write = labels::write(&part, &out, &meta);
    // Fault injection for the tests: this rank dies with its part staged, before the agreement.
    if std::env::var(ABORT_RANK).is_ok_and(|r| r == rank.to_string()) {
        std::process::abort();
    }
    let written = agree(world, write.map(|_| ()).map_err(anyhow::Error::from));
    if let Err(e) = written {
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&staging);
        }
        return Err(e);
    }
    agree(
        world,
        if rank == 0 {
            publish(&staging, &args.output, pid).and_then(|_| write_stats(&stats_path, &stats))
        } else {
            Ok(())
        },
    )?;
    Ok(summary(&args.output, &stats_path, total, &stats))
}
