//! Crash-safe file writing: temp file in the same directory, fsync, rename, fsync the directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Prefix of temporary files; readers never open them and writers delete stale ones.
pub const TMP_PREFIX: &str = ".tmp-";

pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!("{TMP_PREFIX}{}-{name}", std::process::id()))
}

/// Write `parts` to `path` atomically: a reader sees either the old file or the complete new one.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("cannot create", &tmp, e))?;
        for p in parts {
            f.write_all(p)
                .map_err(|e| Error::io("cannot write", &tmp, e))?;
        }
        f.sync_all()
            .map_err(|e| Error::io("cannot fsync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot rename into place", path, e))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("cannot open directory", dir, e))?;
    // Some filesystems refuse fsync on directories; the rename is still atomic there.
    let _ = d.sync_all();
    Ok(())
}
