//! What a build's parts already hold, for resuming it (`target_sft.build`): every record's key,
//! token hash, supervised count and a hash of its labels, read from the shards that the given
//! per-writer manifests list.

use std::path::Path;

use rayon::prelude::*;

use crate::codec::DecodeScratch;
use crate::error::Result;
use crate::hash;
use crate::manifest::Manifest;
use crate::record::Key;
use crate::shard::ShardReader;

/// One entry per record, in manifest order (part by part).
#[derive(Debug, Default)]
pub struct PartsIndex {
    pub keys: Vec<Key>,
    /// [`hash::token_hash`] of `input_ids` (from the shard index).
    pub token_hash: Vec<u64>,
    /// [`hash::token_hash`] of `labels` (decoded from the frame's tokens section), or 0 when the
    /// labels were not asked for.
    pub labels_hash: Vec<u64>,
    pub n_supervised: Vec<u64>,
    /// Index into the `manifests` argument of the part holding the record.
    pub part: Vec<u32>,
}

/// Read the records listed by the manifests `manifests` of `dir` (a missing manifest is an empty
/// part). With `labels`, each record's tokens section is decoded (in parallel, on the current
/// rayon pool) to hash its labels.
pub fn scan_parts(dir: &Path, manifests: &[String], labels: bool) -> Result<PartsIndex> {
    let mut out = PartsIndex::default();
    for (p, name) in manifests.iter().enumerate() {
        if !dir.join(name).exists() {
            continue;
        }
        let m = Manifest::load_named(dir, name)?;
        for s in &m.shards {
            let r = ShardReader::open(&dir.join(&s.file), Some(s.bytes))?;
            let rows: Vec<(Key, u64, u64, u64)> = (0..r.len())
                .into_par_iter()
                .map(|i| {
                    let row = r.index_row(i);
                    let lh = if labels {
                        DecodeScratch::with_thread_local(|scratch| -> Result<u64> {
                            let (nt, ns) = (row.n_tokens as usize, row.n_supervised as usize);
                            let mut f = r.codec.open_frame(r.frame(i), nt, ns, scratch)?;
                            let (mut ids, mut lab) = (Vec::new(), Vec::new());
                            f.tokens(&mut ids, &mut lab)?;
                            Ok(hash::token_hash(&lab))
                        })
                        .map_err(|e| e.at(format!("shard {}, record {i}", s.file)))?
                    } else {
                        0
                    };
                    Ok((r.key(i)?, row.token_hash, lh, row.n_supervised))
                })
                .collect::<Result<_>>()?;
            for (k, th, lh, ns) in rows {
                out.keys.push(k);
                out.token_hash.push(th);
                out.labels_hash.push(lh);
                out.n_supervised.push(ns);
                out.part.push(p as u32);
            }
        }
    }
    Ok(out)
}
