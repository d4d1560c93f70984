//! Advisory locks that keep two writers off the same files of a cache directory
//! (docs/FORMAT.md §6, "Lock files").
//!
//! Every writer holds, for its whole life:
//! - `.lock` (the directory lock): **exclusively** when it keeps the cache's own `manifest.json`
//!   (a plain `CacheWriter`, or the merge of a multi-rank build), **shared** when it keeps a part
//!   manifest (`manifest.rank….json`: the ranks of one build write one directory together);
//! - `.lock-{shard_prefix}`, exclusively: nobody else writes or cleans up its shards;
//! - `.lock-{manifest_name}`, exclusively, for a part manifest.
//!
//! So two writers of one prefix, two plain writers, or a plain writer beside a build never both
//! proceed, while the N ranks of a build (distinct prefixes, part manifests) do. The locks are
//! `flock(2)` locks: the kernel drops them when the holder exits, however it exits (kill -9
//! included), so a lock file left behind never blocks anyone. An exclusive holder writes one line
//! of JSON into its lock file (pid, host, start time) so that a refused writer can name it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};
use crate::manifest::MANIFEST_NAME;

/// The directory lock's file name.
pub const DIR_LOCK: &str = ".lock";
/// Prefix of the per-prefix and per-manifest lock files.
pub const LOCK_PREFIX: &str = ".lock-";

/// What a writer does when another writer holds a lock it needs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LockWait {
    /// Fail at once with an [`ErrorKind::Locked`] error naming the holder.
    #[default]
    No,
    /// Wait until the lock is free.
    Forever,
    /// Wait at most this long, then fail as with `No`.
    For(Duration),
}

impl LockWait {
    /// From seconds: `0` = [`LockWait::No`], `+inf` = [`LockWait::Forever`].
    pub fn from_secs(s: f64) -> Result<Self> {
        if s.is_nan() || s < 0.0 {
            return Err(Error::input(format!(
                "wait = {s} must be False/0 (do not wait), True/inf (wait as long as it takes) or a number of seconds >= 0"
            )));
        }
        Ok(if s == 0.0 {
            LockWait::No
        } else if s.is_infinite() {
            LockWait::Forever
        } else {
            LockWait::For(Duration::from_secs_f64(s))
        })
    }
}

/// A held lock; dropping it (or the process dying) releases it.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    pub path: PathBuf,
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a file descriptor this process owns; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io("cannot open the lock file", path, e))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length; gethostname NUL-terminates or truncates.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".into()
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC).
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil date from days since 1970-01-01 (proleptic Gregorian)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The holder line written into an exclusively held lock file.
fn holder_line(what: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    serde_json::json!({
        "pid": std::process::id(),
        "host": hostname(),
        "since": utc(now),
        "writes": what,
    })
    .to_string()
}

/// "pid 123 on host h since T (writes X)" from a lock file's content.
fn describe_holder(content: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(content.trim()) {
        Ok(v) => format!(
            "pid {}@{} since {} (writing {})",
            v["pid"],
            v["host"].as_str().unwrap_or("?"),
            v["since"].as_str().unwrap_or("?"),
            v["writes"].as_str().unwrap_or("?"),
        ),
        Err(_) => "a writer that has not yet recorded its pid".into(),
    }
}

/// Live holders of the `.lock-*` files of `dir` (a lock file nobody holds is skipped).
fn live_holders(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(LOCK_PREFIX))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let Ok(mut f) = File::open(&path) else {
            continue;
        };
        // A shared probe fails only while someone holds the file exclusively.
        if let Ok(false) = flock(&f, libc::LOCK_SH) {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            out.push(describe_holder(&s));
        }
    }
    out
}

fn acquire(dir: &Path, name: &str, exclusive: bool, what: &str, wait: LockWait) -> Result<Lock> {
    let path = dir.join(name);
    let mut file = open_lock_file(&path)?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    let start = Instant::now();
    loop {
        if flock(&file, op).map_err(|e| Error::io("cannot lock", &path, e))? {
            break;
        }
        let waited = start.elapsed();
        let give_up = match wait {
            LockWait::No => true,
            LockWait::Forever => false,
            LockWait::For(d) => waited >= d,
        };
        if give_up {
            let holders = if exclusive && name != DIR_LOCK {
                let mut s = String::new();
                let _ = File::open(&path).and_then(|mut f| f.read_to_string(&mut s));
                vec![describe_holder(&s)]
            } else {
                live_holders(dir)
            };
            let holders = if holders.is_empty() {
                "another writer".to_string()
            } else {
                holders.join("; ")
            };
            let waited = if wait == LockWait::No {
                String::new()
            } else {
                format!(" (waited {:.1} s)", waited.as_secs_f64())
            };
            return Err(Error::new(
                ErrorKind::Locked,
                format!(
                    "cannot write {what} in {}: {} is held by {holders}{waited}. Two writers of the same files would lose each other's records. Wait for that writer to finish, or pass wait=True (or a timeout in seconds) to wait for it; if its process is gone the lock is released by the kernel (on a network file system whose locks do not reach this node, check that it is not running and delete {})",
                    dir.display(),
                    path.display(),
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if exclusive {
        // Our line replaces a dead holder's; nobody else can be writing it now.
        let line = holder_line(what);
        file.set_len(0)
            .and_then(|_| file.write_all(line.as_bytes()))
            .map_err(|e| Error::io("cannot write", &path, e))?;
    }
    Ok(Lock { _file: file, path })
}

/// The locks a writer of `dir` needs (module docs), in a fixed order so that waiting writers
/// never deadlock: the directory lock, the prefix lock, the part manifest's lock.
pub fn writer_locks(
    dir: &Path,
    shard_prefix: &str,
    manifest_name: &str,
    wait: LockWait,
) -> Result<Vec<Lock>> {
    let whole = manifest_name == MANIFEST_NAME;
    let what = format!("shards {shard_prefix}-* and {manifest_name}");
    let mut locks = vec![acquire(dir, DIR_LOCK, whole, &what, wait)?];
    locks.push(acquire(
        dir,
        &format!("{LOCK_PREFIX}{shard_prefix}"),
        true,
        &what,
        wait,
    )?);
    if !whole {
        locks.push(acquire(
            dir,
            &format!("{LOCK_PREFIX}{manifest_name}"),
            true,
            &what,
            wait,
        )?);
    }
    Ok(locks)
}

/// The lock of whoever writes the cache's `manifest.json` without a writer (the merge of a
/// multi-rank build): the directory lock, exclusively, plus a holder line in `.lock-manifest.json`.
pub fn manifest_locks(dir: &Path, wait: LockWait) -> Result<Vec<Lock>> {
    let what = format!("{MANIFEST_NAME} (merging part manifests)");
    Ok(vec![
        acquire(dir, DIR_LOCK, true, &what, wait)?,
        acquire(
            dir,
            &format!("{LOCK_PREFIX}{MANIFEST_NAME}"),
            true,
            &what,
            wait,
        )?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn second_writer_of_a_prefix_is_refused_and_a_dropped_lock_frees_it() {
        let dir = std::env::temp_dir().join(format!("tsft-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = writer_locks(&dir, "shard", MANIFEST_NAME, LockWait::No).unwrap();
        let e = writer_locks(&dir, "other", MANIFEST_NAME, LockWait::No).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Locked);
        assert!(
            e.message.contains(&format!("pid {}@", std::process::id())),
            "{e}"
        );
        // ranks of a build share the directory but not a prefix
        let e = writer_locks(&dir, "r0", "manifest.r0.json", LockWait::No).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Locked);
        drop(a);
        let r0 = writer_locks(&dir, "r0", "manifest.r0.json", LockWait::No).unwrap();
        let r1 = writer_locks(&dir, "r1", "manifest.r1.json", LockWait::No).unwrap();
        assert!(writer_locks(&dir, "r1", "manifest.r9.json", LockWait::No).is_err());
        assert!(manifest_locks(&dir, LockWait::No).is_err());
        let t = Instant::now();
        let e = manifest_locks(&dir, LockWait::For(Duration::from_millis(100))).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(100), "{e}");
        assert!(e.message.contains("waited"), "{e}");
        drop((r0, r1));
        manifest_locks(&dir, LockWait::No).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
