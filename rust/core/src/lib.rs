//! target-sft core: the teacher log-prob cache (format, codecs, writer, reader).
//!
//! This crate has no Python dependency; `target_sft._core` (crate `target-sft-python`) is a thin
//! binding over it. The byte-level format is specified in `docs/FORMAT.md`.

pub mod batch;
pub mod cache;
pub mod codec;
pub mod container;
pub mod error;
pub mod fsutil;
pub mod hash;
pub mod lock;
pub mod manifest;
pub mod record;
pub mod resume;
pub mod shard;
pub mod stats;
pub mod writer;

pub use batch::{
    BatchBuffers, BatchOptions, BatchPlan, RecordView, Reference, ReferenceBuffers, Source,
};
pub use cache::TeacherCache;
pub use codec::{CodebookParams, CodecKind};
pub use error::{Error, ErrorKind, Result};
pub use manifest::{Manifest, Role};
pub use record::{Key, Record};
pub use stats::Fidelity;
pub use writer::{CacheWriter, WriterOptions};
