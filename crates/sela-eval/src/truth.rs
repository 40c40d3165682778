//! Ground-truth classes from a dataset file, looked up by id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sela_io::dataset::DatasetFile;

/// The ground truth of one dataset file.
#[derive(Debug, Clone)]
pub struct Truth {
    /// The dataset file.
    pub path: PathBuf,
    /// Class names from the file's metadata (may be empty).
    pub class_names: Vec<String>,
    /// Class of each id (`None` where the row has no label).
    by_id: HashMap<u64, Option<u32>>,
    /// Rows with a label.
    pub labelled: usize,
    /// One more than the largest label (0 without labels).
    pub max_class_plus_one: usize,
}

impl Truth {
    /// Reads the `id` and `label` columns of a dataset file.
    pub fn read(path: &Path) -> Result<Self> {
        let file = DatasetFile::open(path)?;
        let class_names = file.class_names.clone();
        let (ids, labels) = file.ids_and_labels()?;
        let mut by_id = HashMap::with_capacity(ids.len());
        let mut labelled = 0;
        let mut max_class_plus_one = 0;
        for (row, (&id, label)) in ids.iter().zip(&labels).enumerate() {
            let class = match *label {
                None => None,
                Some(l) if l < 0 || l > u32::MAX as i64 => bail!(
                    "{}: column `label`, row {row}: class {l} is not a non-negative 32-bit index",
                    path.display()
                ),
                Some(l) => {
                    labelled += 1;
                    max_class_plus_one = max_class_plus_one.max(l as usize + 1);
                    Some(l as u32)
                }
            };
            if by_id.insert(id, class).is_some() {
                bail!(
                    "{}: column `id`: id {id} occurs more than once",
                    path.display()
                );
            }
        }
        Ok(Truth {
            path: path.to_path_buf(),
            class_names,
            by_id,
            labelled,
            max_class_plus_one,
        })
    }

    /// Rows in the dataset.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the dataset has no rows.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether any row has a label.
    pub fn has_labels(&self) -> bool {
        self.labelled > 0
    }

    /// The classes of `ids` (rows of `what`, e.g. a features directory), in that order. Fails
    /// unless `ids` are exactly the dataset's ids (any order).
    pub fn align(&self, ids: &[u64], what: &Path) -> Result<Vec<Option<u32>>> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.by_id.get(&id) {
                Some(&c) => out.push(c),
                None => bail!(
                    "{}: id {id} is not in the dataset {} ({} rows)",
                    what.display(),
                    self.path.display(),
                    self.len()
                ),
            }
        }
        // ids are distinct (checked by the readers), so equal counts mean equal sets.
        if ids.len() != self.len() {
            let present: std::collections::HashSet<u64> = ids.iter().copied().collect();
            let mut missing: Vec<u64> = self
                .by_id
                .keys()
                .filter(|id| !present.contains(id))
                .copied()
                .collect();
            missing.sort_unstable();
            bail!(
                "{}: {} rows, but the dataset {} has {} rows; missing ids include {:?}",
                what.display(),
                ids.len(),
                self.path.display(),
                self.len(),
                &missing[..missing.len().min(5)]
            );
        }
        Ok(out)
    }
}

/// The number of classes across the truths given: the class-name count or one more than the
/// largest label, whichever is larger.
pub fn num_classes<'a>(truths: impl IntoIterator<Item = &'a Truth>) -> usize {
    truths
        .into_iter()
        .map(|t| t.class_names.len().max(t.max_class_plus_one))
        .max()
        .unwrap_or(0)
}

/// The rows of `pred` that have a class, as (predictions, classes).
pub fn known(pred: &[u32], truth: &[Option<u32>]) -> (Vec<u32>, Vec<u32>) {
    pred.iter()
        .zip(truth)
        .filter_map(|(&p, t)| t.map(|t| (p, t)))
        .unzip()
}
