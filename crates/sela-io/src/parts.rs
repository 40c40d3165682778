//! Inputs that may be split into part files: one file, a directory of parts, or a glob.
//!
//! Stages that run as batch-scheduler array jobs write `part-IIIII-of-NNNNN.parquet` files;
//! consumers resolve the whole set and refuse an incomplete or inconsistent one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoError, Result};

/// Metadata key holding a part file's [`Shard`].
pub const KEY_SHARD: &str = "sela.shard";

/// Which slice of a dataset a part file holds: the rows whose `id % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This part's index, `0..count`.
    pub index: usize,
    /// The number of parts.
    pub count: usize,
}

impl Shard {
    /// The whole dataset as one part.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Checks `index < count` and `count > 0`.
    pub fn new(index: usize, count: usize) -> std::result::Result<Self, String> {
        if count == 0 {
            return Err("the number of shards must be at least 1".to_string());
        }
        if index >= count {
            return Err(format!(
                "shard index {index} is out of range for {count} shards (0..{})",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }

    /// Whether row `id` belongs to this part.
    pub fn contains(&self, id: u64) -> bool {
        id % self.count as u64 == self.index as u64
    }

    /// The conventional file name of this part.
    pub fn file_name(&self) -> String {
        format!("part-{:05}-of-{:05}.parquet", self.index, self.count)
    }
}

/// Parses `part-IIIII-of-NNNNN.parquet` into a shard.
pub fn parse_part_name(name: &str) -> Option<Shard> {
    let rest = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let (i, n) = rest.split_once("-of-")?;
    Shard::new(i.parse().ok()?, n.parse().ok()?).ok()
}

/// Resolves a file, a directory of Parquet files, or a glob (`*` and `?` in the last path
/// component) into a sorted list of files. When the names are part names, the set must be
/// complete: every index of one common count, each exactly once.
pub fn resolve(spec: &Path) -> Result<Vec<PathBuf>> {
    let text = spec.to_string_lossy();
    let files = if spec.is_dir() {
        list_dir(spec, |name| name.ends_with(".parquet"))?
    } else if text.contains('*') || text.contains('?') {
        let dir = spec
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let pattern = spec
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if dir.to_string_lossy().contains(['*', '?']) {
            return Err(IoError::Parts {
                path: spec.to_path_buf(),
                message: "wildcards are supported in the file name only".to_string(),
            });
        }
        list_dir(dir, |name| glob_match(&pattern, name))?
    } else {
        if !spec.exists() {
            return Err(IoError::os(
                spec,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        return Ok(vec![spec.to_path_buf()]);
    };
    if files.is_empty() {
        return Err(IoError::Parts {
            path: spec.to_path_buf(),
            message: "no Parquet files found".to_string(),
        });
    }
    check_part_names(spec, &files)?;
    Ok(files)
}

fn list_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| IoError::os(dir, e))? {
        let entry = entry.map_err(|e| IoError::os(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && keep(&name) && entry.path().is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that part-named files form a complete set.
fn check_part_names(spec: &Path, files: &[PathBuf]) -> Result<()> {
    let shards: Vec<Option<Shard>> = files
        .iter()
        .map(|f| parse_part_name(&f.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    if shards.iter().all(Option::is_none) {
        return Ok(());
    }
    if let Some(i) = shards.iter().position(Option::is_none) {
        return Err(IoError::Parts {
            path: spec.to_path_buf(),
            message: format!(
                "{} is not named like the other part files (part-IIIII-of-NNNNN.parquet)",
                files[i].display()
            ),
        });
    }
    let shards: Vec<Shard> = shards.into_iter().flatten().collect();
    let count = shards[0].count;
    if let Some(s) = shards.iter().find(|s| s.count != count) {
        return Err(IoError::Parts {
            path: spec.to_path_buf(),
            message: format!(
                "parts disagree on the number of shards: {} and {}",
                count, s.count
            ),
        });
    }
    let indices: Vec<usize> = shards.iter().map(|s| s.index).collect();
    let (missing, total) = missing_indices(&indices, count, 8);
    if total > 0 {
        let names: Vec<String> = missing
            .iter()
            .map(|&index| Shard { index, count }.file_name())
            .collect();
        let more = if total > missing.len() {
            format!(" and {} more", total - missing.len())
        } else {
            String::new()
        };
        return Err(IoError::Parts {
            path: spec.to_path_buf(),
            message: format!(
                "incomplete set of {count} parts: missing {}{more}",
                names.join(", ")
            ),
        });
    }
    Ok(())
}

/// The first `limit` indices of `0..count` absent from `indices`, and how many are absent in
/// all. Memory grows with `indices`, not with `count` (which comes from file names or metadata).
pub(crate) fn missing_indices(
    indices: &[usize],
    count: usize,
    limit: usize,
) -> (Vec<usize>, usize) {
    let mut present: Vec<usize> = indices.iter().copied().filter(|&i| i < count).collect();
    present.sort_unstable();
    present.dedup();
    let mut missing = Vec::new();
    let mut next = 0;
    for end in present.iter().copied().chain([count]) {
        missing.extend((next..end).take(limit - missing.len()));
        next = end.saturating_add(1);
    }
    (missing, count - present.len())
}

/// Minimal glob matching: `*` matches any run of characters, `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The first id that occurs twice, if any (ids need not be sorted).
pub fn find_duplicate_id(ids: &[u64]) -> Option<u64> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_round_trip() {
        let s = Shard::new(3, 16).unwrap();
        assert_eq!(s.file_name(), "part-00003-of-00016.parquet");
        assert_eq!(parse_part_name(&s.file_name()), Some(s));
        assert_eq!(parse_part_name("part-00016-of-00016.parquet"), None);
        assert!(Shard::new(2, 2).is_err());
        assert!(Shard::new(0, 0).is_err());
    }

    #[test]
    fn shards_partition_ids() {
        let shards: Vec<Shard> = (0..4).map(|i| Shard::new(i, 4).unwrap()).collect();
        for id in 0..100u64 {
            assert_eq!(shards.iter().filter(|s| s.contains(id)).count(), 1);
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("part-*.parquet", "part-00001-of-00002.parquet"));
        assert!(!glob_match("part-*.parquet", "part-1.csv"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbx"));
    }

    #[test]
    fn resolve_checks_completeness() {
        let dir = tempfile::tempdir().unwrap();
        for i in [0, 2] {
            std::fs::write(dir.path().join(Shard::new(i, 3).unwrap().file_name()), b"").unwrap();
        }
        let err = resolve(dir.path()).unwrap_err().to_string();
        assert!(err.contains("missing part-00001-of-00003.parquet"), "{err}");
        std::fs::write(dir.path().join(Shard::new(1, 3).unwrap().file_name()), b"").unwrap();
        assert_eq!(resolve(dir.path()).unwrap().len(), 3);
        let glob = dir.path().join("part-*-of-00003.parquet");
        assert_eq!(resolve(&glob).unwrap().len(), 3);
        std::fs::write(dir.path().join(Shard::new(0, 4).unwrap().file_name()), b"").unwrap();
        let err = resolve(dir.path()).unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
    }

    /// Found by fuzzing: a part name with a huge count (`part-00000-of-18446744073709551615`)
    /// made the completeness check allocate a flag per shard and abort.
    #[test]
    fn huge_part_counts_are_refused_without_allocating_per_shard() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("part-00000-of-{}.parquet", usize::MAX);
        std::fs::write(dir.path().join(name), b"").unwrap();
        let err = resolve(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("missing part-00001-of-18446744073709551615.parquet")
                && err.contains(&format!("and {} more", usize::MAX - 9)),
            "{err}"
        );
        assert_eq!(missing_indices(&[3, 0, 3, 9], 6, 8), (vec![1, 2, 4, 5], 4));
        assert_eq!(missing_indices(&[1], 3, 1), (vec![0], 2));
        assert_eq!(missing_indices(&[0, 1], 2, 8), (vec![], 0));
    }

    #[test]
    fn duplicates() {
        assert_eq!(find_duplicate_id(&[3, 1, 2]), None);
        assert_eq!(find_duplicate_id(&[3, 1, 3]), Some(3));
    }
}
