//! Writing outputs atomically: every file and directory the tools produce is written under a temporary
//! sibling name and renamed into place only once complete, so that a crash or an error never leaves a
//! half-written output under the real name. The temporary is removed on any error, a failed rename
//! included.
//!
//! Temporary names are `.{name}.tmp-{pid}-{n}` beside the destination: hidden, on the same file system
//! (so the rename is atomic), and unique per process and per call.
//!
//! - [`write_atomic`] / [`AtomicFile`]: one file (synced to disk before the rename).
//! - [`AtomicDir`]: a directory, either new ([`AtomicDir::commit_new`]) or replacing an older one
//!   ([`AtomicDir::commit_replace`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O error and the file or directory it is about.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FsError {
    /// The path the failed operation was about (the temporary or the destination).
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    fn new(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FsError {
            path: path.into(),
            source,
        }
    }

    /// Whether the destination already existed ([`AtomicDir::commit_new`] refuses to replace it).
    pub fn already_exists(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::AlreadyExists
    }
}

/// A fresh temporary path beside `dest`: `.{name}.tmp-{pid}-{n}` in the same directory.
pub fn temp_sibling(dest: &Path) -> Result<PathBuf, FsError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().ok_or_else(|| {
        FsError::new(
            dest,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file or directory name"),
        )
    })?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id());
    Ok(parent_dir(dest).join(tmp))
}

/// The directory `path` is in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `bytes` to `dest` atomically (see [`AtomicFile`]).
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let mut f = AtomicFile::create(dest)?;
    f.file().write_all(bytes).map_err(|e| FsError::new(f.temp_path(), e))?;
    f.commit()
}

/// A file being written under a temporary name beside its destination; [`AtomicFile::commit`] syncs it and
/// renames it into place, and dropping it uncommitted removes it.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file for `dest` (whose directory must exist).
    pub fn create(dest: &Path) -> Result<AtomicFile, FsError> {
        let tmp = temp_sibling(dest)?;
        let file = File::create(&tmp).map_err(|e| FsError::new(&tmp, e))?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// The temporary file's path, for error messages about writing it.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The open temporary file, to write (and seek) in.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("an AtomicFile's file is open until commit")
    }

    /// Syncs the file to disk and renames it to the destination, replacing any file there. On error the
    /// temporary is removed and the destination left as it was.
    pub fn commit(mut self) -> Result<(), FsError> {
        let file = self.file.take().expect("an AtomicFile is committed once");
        file.sync_all().map_err(|e| FsError::new(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| FsError::new(&self.dest, e))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A directory being filled under a temporary name beside its destination; a commit renames it into place,
/// and dropping it uncommitted removes it with everything in it.
#[derive(Debug)]
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicDir {
    /// Creates the (empty) temporary directory for `dest`, whose parent must exist. A leftover of the same
    /// name (an earlier process with the same pid) is removed first: it is ours by name.
    pub fn create(dest: &Path) -> Result<AtomicDir, FsError> {
        let tmp = temp_sibling(dest)?;
        if tmp.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(&tmp).map_err(|e| FsError::new(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| FsError::new(&tmp, e))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// The temporary directory, to write the output's files in.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the directory to its destination, which must not exist (checked just before the rename,
    /// since rename(2) would replace an empty directory): an existing one is an error naming it, for which
    /// [`FsError::already_exists`] holds. On error the temporary directory is removed.
    pub fn commit_new(self) -> Result<(), FsError> {
        if self.dest.symlink_metadata().is_ok() {
            return Err(FsError::new(
                &self.dest,
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output already exists"),
            ));
        }
        self.rename_into_place()
    }

    /// Renames the directory to its destination, replacing an existing one: the old directory is moved
    /// aside first and put back if the rename fails, so that a failure loses nothing; it is deleted once the
    /// new one is in place. On error the temporary directory is removed.
    pub fn commit_replace(self) -> Result<(), FsError> {
        if !self.dest.exists() {
            return self.rename_into_place();
        }
        let dest = self.dest.clone();
        let old = temp_sibling(&dest)?;
        std::fs::rename(&dest, &old).map_err(|e| FsError::new(&dest, e))?;
        let result = self.rename_into_place();
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        } else {
            let _ = std::fs::rename(&old, &dest);
        }
        result
    }

    fn rename_into_place(mut self) -> Result<(), FsError> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| FsError::new(&self.dest, e))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temp_siblings_are_hidden_unique_and_beside_the_destination() {
        let a = temp_sibling(Path::new("/x/out.bin")).unwrap();
        let b = temp_sibling(Path::new("/x/out.bin")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x")));
        let prefix = format!(".out.bin.tmp-{}-", std::process::id());
        assert!(
            a.file_name().unwrap().to_str().unwrap().starts_with(&prefix),
            "{}",
            a.display()
        );
        assert_eq!(temp_sibling(Path::new("out")).unwrap().parent(), Some(Path::new(".")));
        let e = temp_sibling(Path::new("/")).unwrap_err();
        assert_eq!(e.path, Path::new("/"));
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(d.path()), ["a.json"]);
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_and_names_the_destination() {
        let d = tempfile::tempdir().unwrap();
        // A non-empty directory at the destination: the rename fails after the data is written.
        let p = d.path().join("busy");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"x").unwrap();
        let e = write_atomic(&p, b"data").unwrap_err();
        assert_eq!(e.path, p);
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert_eq!(names(d.path()), ["busy"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("no/such/dir/f.bin");
        let e = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(e.contains("no/such/dir/.f.bin.tmp-"), "{e}");
    }

    #[test]
    fn an_uncommitted_file_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let mut f = AtomicFile::create(&d.path().join("f")).unwrap();
        f.file().write_all(b"partial").unwrap();
        assert!(f.temp_path().exists());
        drop(f);
        assert!(names(d.path()).is_empty());
    }

    #[test]
    fn a_new_directory_appears_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let t = AtomicDir::create(&out).unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        drop(t);
        assert!(names(d.path()).is_empty());
        let t = AtomicDir::create(&out).unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        t.commit_new().unwrap();
        assert_eq!(names(&out), ["a"]);
        // An existing destination (even an empty directory) is refused and the temporary removed.
        std::fs::remove_file(out.join("a")).unwrap();
        let e = AtomicDir::create(&out).unwrap().commit_new().unwrap_err();
        assert!(e.already_exists() && e.path == out, "{e}");
        assert_eq!(names(d.path()), ["out"]);
    }

    #[test]
    fn replacing_a_directory_swaps_it_and_a_failure_keeps_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ck");
        for v in [b"1", b"2"] {
            let t = AtomicDir::create(&out).unwrap();
            std::fs::write(t.path().join("v"), v).unwrap();
            t.commit_replace().unwrap();
            assert_eq!(std::fs::read(out.join("v")).unwrap(), v);
            assert_eq!(names(d.path()), ["ck"]);
        }
        let e = AtomicDir::create(&d.path().join("missing/ck")).unwrap_err();
        assert!(e.to_string().contains("missing/.ck.tmp-"), "{e}");
    }
}
