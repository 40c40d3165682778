//! Atomic file creation: write under a temporary name in the destination directory, then rename.
//!
//! A reader never sees a half-written output, and an interrupted or failed writer leaves the
//! previous version of the file (if any) untouched.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};

/// A file being written under a temporary name; [`AtomicFile::commit`] publishes it.
///
/// Dropping it without committing removes the temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

/// The temporary name used while `target` is being written. Hidden, in the same directory (so the
/// rename is atomic), and unique per process.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_string());
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Whether `path` names one of [`temp_path`]'s temporary files.
pub fn is_temp_path(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
}

/// Removes the temporary files of `target` left by writers that were killed before they could
/// clean up: those named for a process that no longer runs. Only where `/proc` tells which
/// processes run (Linux); elsewhere they are left alone. (A writer on another machine sharing the
/// directory looks dead from here; two processes must not write one target at once anyway.)
/// [`AtomicFile::create`] does this for its target.
pub fn remove_stale_temps(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let pid = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| pid != std::process::id() && !process_runs(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` runs; `true` where that cannot be told.
fn process_runs(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

impl AtomicFile {
    /// Starts writing `target`. The parent directory must exist.
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        if target.is_dir() {
            return Err(IoError::os(
                &target,
                std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "output path is a directory",
                ),
            ));
        }
        remove_stale_temps(&target);
        let temp = temp_path(&target);
        let file = File::create(&temp).map_err(|e| {
            IoError::os(
                &target,
                std::io::Error::new(e.kind(), format!("cannot create the output: {e}")),
            )
        })?;
        Ok(AtomicFile {
            target,
            temp,
            file: Some(file),
        })
    }

    /// The path the file will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("AtomicFile used after commit")
    }

    /// Takes the open temporary file out, e.g. to hand it to a writer that owns its sink.
    /// Give it back with [`AtomicFile::commit_with`].
    pub fn take_file(&mut self) -> File {
        self.file.take().expect("AtomicFile used after commit")
    }

    /// Flushes, syncs and renames the temporary file onto the target.
    pub fn commit(mut self) -> Result<PathBuf> {
        let file = self.take_file();
        self.commit_with(file)
    }

    /// Like [`AtomicFile::commit`], for a file previously taken with [`AtomicFile::take_file`].
    pub fn commit_with(mut self, mut file: File) -> Result<PathBuf> {
        file.flush().map_err(|e| IoError::os(&self.temp, e))?;
        file.sync_all().map_err(|e| IoError::os(&self.temp, e))?;
        drop(file);
        std::fs::rename(&self.temp, &self.target).map_err(|e| IoError::os(&self.target, e))?;
        if let Some(dir) = self.target.parent() {
            // Persist the rename itself; not every filesystem supports syncing a directory.
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let target = std::mem::take(&mut self.target);
        self.temp = PathBuf::new();
        Ok(target)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `target` atomically.
pub fn write_bytes(target: impl AsRef<Path>, bytes: &[u8]) -> Result<PathBuf> {
    let mut out = AtomicFile::create(target)?;
    let temp = out.temp.clone();
    out.file()
        .write_all(bytes)
        .map_err(|e| IoError::os(&temp, e))?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_publishes_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.file().write_all(b"half").unwrap();
            assert!(!target.exists());
            // dropped without commit
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        write_bytes(&target, b"whole").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_rewrite_keeps_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        write_bytes(&target, b"v1").unwrap();
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.file().write_all(b"v2 partial").unwrap();
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"v1");
    }

    #[test]
    fn temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        // No process has this id (Linux pids stay below 2^22); pid 1 always runs.
        let dead = dir.path().join(format!(".out.bin.tmp-{}", u32::MAX));
        let alive = dir.path().join(".out.bin.tmp-1");
        let other = dir.path().join(format!(".other.bin.tmp-{}", u32::MAX));
        for p in [&dead, &alive, &other] {
            std::fs::write(p, b"half").unwrap();
        }
        write_bytes(&target, b"whole").unwrap();
        assert_eq!(!dead.exists(), cfg!(target_os = "linux"));
        assert!(alive.exists() && other.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nope").join("out.bin");
        let err = write_bytes(&target, b"x").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
