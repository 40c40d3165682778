//! Per-cluster statistics, computed with polars: size and mean confidence of every cluster of
//! every head, and (with ground truth) the majority class and the purity.

use anyhow::Result;
use polars::prelude::*;
use sela_io::cluster_stats::ClusterStatRow;

/// One head's hard assignment of the training rows.
#[derive(Debug, Clone, Copy)]
pub struct HeadAssignment<'a> {
    /// Head index.
    pub head: u32,
    /// Number of clusters K of the head (clusters without rows get a row too).
    pub k: usize,
    /// Row ids.
    pub ids: &'a [u64],
    /// Cluster of each row.
    pub clusters: &'a [u32],
    /// Confidence of each row's assignment.
    pub confidence: &'a [f32],
}

/// The statistics of every cluster `0..K` of every head, ordered by head then cluster.
///
/// `truth` holds (id, class) pairs of the training rows (a class of `None` or a missing id means
/// unknown); rows are joined to it by id. Without any known class, purity and majority class are
/// null. An empty cluster has size 0, null purity and class, and a NaN mean confidence.
pub fn cluster_stats(
    round: u32,
    heads: &[HeadAssignment<'_>],
    truth: &[(u64, Option<u32>)],
) -> Result<Vec<ClusterStatRow>> {
    anyhow::Context::context(compute(round, heads, truth), "computing cluster statistics")
}

fn compute(
    round: u32,
    heads: &[HeadAssignment<'_>],
    truth: &[(u64, Option<u32>)],
) -> PolarsResult<Vec<ClusterStatRow>> {
    let mut ids = Vec::new();
    let mut head_col = Vec::new();
    let mut cluster_col = Vec::new();
    let mut confidence = Vec::new();
    let mut all_heads = Vec::new();
    let mut all_clusters = Vec::new();
    for h in heads {
        assert_eq!(h.ids.len(), h.clusters.len(), "ids and clusters");
        assert_eq!(h.ids.len(), h.confidence.len(), "ids and confidences");
        ids.extend_from_slice(h.ids);
        head_col.extend(std::iter::repeat_n(h.head, h.ids.len()));
        cluster_col.extend_from_slice(h.clusters);
        confidence.extend(h.confidence.iter().map(|&c| c as f64));
        all_heads.extend(std::iter::repeat_n(h.head, h.k));
        all_clusters.extend(0..h.k as u32);
    }
    let assigned = df!(
        "id" => ids,
        "head" => head_col,
        "cluster" => cluster_col,
    )?;
    let keys = ["head", "cluster"];

    // Size and mean confidence of each cluster.
    let groups = assigned.group_by(keys)?;
    let mut sizes = DataFrame::new_infer_height(groups.keys())?;
    sizes.with_column(Column::new(
        "mean_confidence".into(),
        group_means(groups.get_groups(), &confidence),
    ))?;
    sizes.with_column(Column::new(
        "size".into(),
        groups
            .get_groups()
            .iter()
            .map(|g| g.len() as u64)
            .collect::<Vec<u64>>(),
    ))?;

    // Class counts per cluster, through a join with the ground truth on id.
    let truth_df = df!(
        "id" => truth.iter().map(|t| t.0).collect::<Vec<u64>>(),
        "class" => truth.iter().map(|t| t.1).collect::<Vec<Option<u32>>>(),
    )?;
    let labelled = assigned
        .left_join(&truth_df, ["id"], ["id"])?
        .drop_nulls(Some(&["class".to_string()]))?;
    let class_counts = labelled
        .group_by(["head", "cluster", "class"])?
        .select(["id"])
        .count()?;
    let labelled_sizes = labelled.group_by(keys)?.select(["id"]).count()?;
    // The majority class: the largest count, ties to the smallest class.
    let majority = class_counts
        .sort(
            ["head", "cluster", "id_count", "class"],
            SortMultipleOptions::default().with_order_descending_multi([false, false, true, false]),
        )?
        .unique_stable(
            Some(&["head".to_string(), "cluster".to_string()]),
            UniqueKeepStrategy::First,
            None,
        )?
        .select(["head", "cluster", "class", "id_count"])?;
    let mut majority = majority;
    majority.rename("id_count", "majority_count".into())?;

    // Every cluster 0..K of every head, empty ones included.
    let mut table = df!("head" => all_heads, "cluster" => all_clusters)?;
    for other in [&sizes, &labelled_sizes, &majority] {
        let mut args = JoinArgs::new(JoinType::Left);
        args.maintain_order = MaintainOrderJoin::Left;
        table = table.join(other, keys, keys, args, None)?;
    }
    let table = table.sort(keys, SortMultipleOptions::default())?;

    let u64_col = |name: &str| -> PolarsResult<Vec<Option<u64>>> {
        Ok(table
            .column(name)?
            .cast(&DataType::UInt64)?
            .u64()?
            .iter()
            .collect())
    };
    let head = u64_col("head")?;
    let cluster = u64_col("cluster")?;
    let size = u64_col("size")?;
    let labelled_size = u64_col("id_count")?;
    let majority_class = u64_col("class")?;
    let majority_size = u64_col("majority_count")?;
    let mean_conf: Vec<Option<f64>> = table.column("mean_confidence")?.f64()?.iter().collect();

    Ok((0..table.height())
        .map(|i| {
            let purity = match (majority_size[i], labelled_size[i]) {
                (Some(m), Some(l)) if l > 0 => Some(m as f64 / l as f64),
                _ => None,
            };
            ClusterStatRow {
                round,
                head: head[i].expect("key") as u32,
                cluster: cluster[i].expect("key") as u32,
                size: size[i].unwrap_or(0),
                purity,
                majority_class: majority_class[i].map(|c| c as i64),
                mean_confidence: mean_conf[i].unwrap_or(f64::NAN),
            }
        })
        .collect())
}

/// The mean of `values` over each group's rows, summed in row order (so the result does not
/// depend on how the grouping was parallelised).
fn group_means(groups: &GroupPositions, values: &[f64]) -> Vec<f64> {
    groups
        .iter()
        .map(|g| {
            let mut rows: Vec<usize> = match g {
                GroupsIndicator::Idx((_, idx)) => idx.iter().map(|&i| i as usize).collect(),
                GroupsIndicator::Slice([first, len]) => {
                    (first as usize..(first + len) as usize).collect()
                }
            };
            rows.sort_unstable();
            rows.iter().map(|&i| values[i]).sum::<f64>() / rows.len() as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_by_hand() {
        // Head 0, K = 3: cluster 0 = ids 1,2,3 (classes 5,5,7), cluster 1 = ids 4,5
        // (classes 7, unknown), cluster 2 empty. Head 1, K = 1: everything.
        let ids = [1, 2, 3, 4, 5];
        let c0 = [0, 0, 0, 1, 1];
        let conf0 = [0.5, 0.25, 0.75, 1.0, 0.5];
        let c1 = [0; 5];
        let conf1 = [1.0; 5];
        let truth = vec![
            (5, None),
            (4, Some(7)),
            (3, Some(7)),
            (2, Some(5)),
            (1, Some(5)),
            (99, Some(1)),
        ];
        let heads = [
            HeadAssignment {
                head: 0,
                k: 3,
                ids: &ids,
                clusters: &c0,
                confidence: &conf0,
            },
            HeadAssignment {
                head: 1,
                k: 1,
                ids: &ids,
                clusters: &c1,
                confidence: &conf1,
            },
        ];
        let rows = cluster_stats(4, &heads, &truth).unwrap();
        assert_eq!(rows.len(), 4);
        let r = &rows[0];
        assert_eq!((r.round, r.head, r.cluster, r.size), (4, 0, 0, 3));
        assert_eq!(r.majority_class, Some(5));
        assert_eq!(r.purity, Some(2.0 / 3.0));
        assert_eq!(r.mean_confidence, 0.5);
        let r = &rows[1];
        assert_eq!((r.head, r.cluster, r.size), (0, 1, 2));
        assert_eq!((r.majority_class, r.purity), (Some(7), Some(1.0)));
        assert_eq!(r.mean_confidence, 0.75);
        let r = &rows[2];
        assert_eq!((r.head, r.cluster, r.size), (0, 2, 0));
        assert_eq!((r.majority_class, r.purity), (None, None));
        assert!(r.mean_confidence.is_nan());
        let r = &rows[3];
        assert_eq!((r.head, r.cluster, r.size), (1, 0, 5));
        // Classes 5,5,7,7 (one unknown): a tie, broken towards the smaller class.
        assert_eq!((r.majority_class, r.purity), (Some(5), Some(0.5)));

        // No ground truth at all.
        let rows = cluster_stats(0, &heads, &[]).unwrap();
        assert!(rows
            .iter()
            .all(|r| r.purity.is_none() && r.majority_class.is_none()));
        assert_eq!(
            rows.iter().map(|r| r.size).collect::<Vec<_>>(),
            vec![3, 2, 0, 5]
        );
    }
}
