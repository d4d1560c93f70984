//! One error type for the whole core. Every message says what went wrong, where (file, shard,
//! record, field) and what to do about it; the bindings map each [`ErrorKind`] to one Python
//! exception class of the `target_sft.CacheError` family.

use std::fmt;

/// What kind of failure an [`Error`] is; decides the Python exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad arguments from the caller: shapes, dtypes, values, duplicate keys, writer misuse.
    Input,
    /// A manifest or shard that is not a valid target-sft cache (wrong magic, bad header).
    Format,
    /// A cache written by a newer format version than this library reads.
    Version,
    /// Bytes that fail a checksum, a truncated file, a frame that does not decode.
    Corruption,
    /// A key that is not in the cache.
    KeyNotFound,
    /// A record looked up with token ids that differ from the cached ones, or a cache whose
    /// parameters (teacher, tokenizer, top-k, codec) differ from what the caller expects.
    Mismatch,
    /// An operating-system I/O failure.
    Io,
    /// Another writer holds a lock this writer needs (`crate::lock`; the message names it).
    Locked,
}

/// The error type of the core.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Input, message)
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Format, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corruption, message)
    }
    pub fn mismatch(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, message)
    }
    /// An I/O error on `path` while doing `what`.
    pub fn io(what: &str, path: &std::path::Path, err: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("{what} {}: {err}", path.display()))
    }
    /// Prefix the message with a location ("shard X, record 12: ...").
    pub fn at(mut self, location: impl fmt::Display) -> Self {
        self.message = format!("{location}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
