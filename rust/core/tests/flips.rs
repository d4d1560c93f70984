//! Issue 17's acceptance test: flip every byte of a small cache (both codecs, two shards each:
//! header, tables, index, keys, payload, and the manifest) one at a time, open the cache fresh
//! after each flip and read every record by position, by key and through the batch builder. Every
//! read must equal the original exactly or fail with a corruption/format/version error naming the
//! flipped file: never different data, never a panic.
mod common;

use std::path::Path;

use common::{record, Rng};
use target_sft_core::{
    BatchBuffers, BatchOptions, BatchPlan, CacheWriter, CodecKind, Error, ErrorKind, Key, Record,
    Source, TeacherCache, WriterOptions,
};

const K: usize = 4;
const V: usize = 300;

/// Everything a reader can get out of a cache, or the first error on the way.
#[derive(Debug, PartialEq)]
struct Reads {
    by_position: Vec<Record>,
    keys: Vec<Key>,
    by_key: Vec<Record>,
    batch: (usize, usize, Vec<i64>, Vec<i64>, Vec<i32>, Vec<u32>),
}

fn read_all(dir: &Path, keys: &[Key], ids: &[Vec<i32>]) -> Result<Reads, Error> {
    let c = TeacherCache::open(dir)?;
    let n = c.len();
    let by_position = (0..n).map(|p| c.get_at(p)).collect::<Result<Vec<_>, _>>()?;
    let keys_read = (0..n).map(|p| c.key_at(p)).collect::<Result<Vec<_>, _>>()?;
    let by_key = keys
        .iter()
        .zip(ids)
        .map(|(k, t)| c.get(k, Some(t)))
        .collect::<Result<Vec<_>, _>>()?;
    let sources: Vec<Source<'_>> = (0..n)
        .map(|p| Source::Cached {
            cache: &c,
            position: p,
            input_ids: Some(&ids[p as usize]),
            labels: None,
            reference: None,
        })
        .collect();
    let opts = BatchOptions {
        label_in_support: true,
        ..Default::default()
    };
    let plan = BatchPlan::new(&sources, &opts)?;
    let (nt, ne) = (plan.tokens(), plan.teacher_elements());
    let (mut tok, mut mask, mut lab) = (vec![0i64; nt], vec![0i64; nt], vec![0i64; nt]);
    let (mut tids, mut tlps) = (vec![0i32; ne], vec![0f32; ne]);
    plan.fill(
        &sources,
        BatchBuffers {
            input_ids: &mut tok,
            attention_mask: Some(&mut mask),
            labels: &mut lab,
            position_ids: None,
            teacher_ids: &mut tids,
            teacher_logprobs: &mut tlps,
            sequence_ids: &mut vec![0i64; nt],
            reference: None,
        },
        false,
    )?;
    tok.extend(mask);
    Ok(Reads {
        by_position,
        keys: keys_read,
        by_key,
        batch: (
            plan.rows,
            plan.len,
            tok,
            lab,
            tids,
            tlps.iter().map(|x| x.to_bits()).collect(),
        ),
    })
}

#[derive(Default, Debug)]
struct Counts {
    flipped: usize,
    identical: usize,
    detected: usize,
}

/// Flip each byte once, with `masks[offset % masks.len()]` (so that every bit position is
/// flipped somewhere in every region, and whole bytes too).
fn campaign(codec: CodecKind, masks: &[u8]) -> Counts {
    let dir = std::env::temp_dir().join(format!(
        "tsft-flips-{}-{}",
        std::process::id(),
        codec.name()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut o = WriterOptions::new(K, V);
    o.codec = codec;
    // two shards of two records each
    o.shard_bytes = if codec == CodecKind::Exact { 300 } else { 150 };
    o.threads = 1;
    o.prior_records = 2;
    let mut rng = Rng::new(17);
    let recs: Vec<Record> = (0..4)
        .map(|i| {
            let key = if i % 2 == 0 {
                Key::Str(format!("doc-{i}"))
            } else {
                Key::Int(i as i64 * 1000 + 3)
            };
            record(&mut rng, key, V, K, 4 + 3 * i)
        })
        .collect();
    let mut w = CacheWriter::create(&dir, o).unwrap();
    for r in &recs {
        w.add(r.clone()).unwrap();
    }
    w.close().unwrap();
    let keys: Vec<Key> = recs.iter().map(|r| r.key.clone()).collect();
    let ids: Vec<Vec<i32>> = recs.iter().map(|r| r.input_ids.clone()).collect();
    let want = read_all(&dir, &keys, &ids).unwrap();
    assert_eq!(want.by_position.len(), recs.len());
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| !f.starts_with('.')) // the writers' lock files: no reader opens them
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "two shards and the manifest: {files:?}");
    let mut counts = Counts::default();
    for file in &files {
        let path = dir.join(file);
        let orig = std::fs::read(&path).unwrap();
        let mut bytes = orig.clone();
        for at in 0..orig.len() {
            {
                let m = masks[at % masks.len()];
                bytes[at] = orig[at] ^ m;
                std::fs::write(&path, &bytes).unwrap();
                counts.flipped += 1;
                match read_all(&dir, &keys, &ids) {
                    Ok(got) => {
                        assert!(
                            got == want,
                            "{} {file}: byte {at} ^ {m:#04x} changed what a reader reads without an error",
                            codec.name()
                        );
                        counts.identical += 1;
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e.kind,
                                ErrorKind::Corruption | ErrorKind::Format | ErrorKind::Version
                            ),
                            "{} {file}: byte {at} ^ {m:#04x}: error of kind {:?}: {}",
                            codec.name(),
                            e.kind,
                            e.message
                        );
                        assert!(
                            e.message.contains(file.as_str()),
                            "{} {file}: byte {at} ^ {m:#04x}: the error does not name the file: {}",
                            codec.name(),
                            e.message
                        );
                        counts.detected += 1;
                    }
                }
            }
            bytes[at] = orig[at];
        }
        std::fs::write(&path, &orig).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    counts
}

const MASKS: [u8; 9] = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff];

#[test]
fn every_byte_flip_reads_identical_or_fails_exact() {
    let c = campaign(CodecKind::Exact, &MASKS);
    eprintln!("exact: {c:?}");
    assert_eq!(c.identical + c.detected, c.flipped);
    assert!(c.detected > c.flipped / 2, "{c:?}");
}

#[test]
fn every_byte_flip_reads_identical_or_fails_compact() {
    let c = campaign(CodecKind::Compact, &MASKS);
    eprintln!("compact: {c:?}");
    assert_eq!(c.identical + c.detected, c.flipped);
    assert!(c.detected > c.flipped / 2, "{c:?}");
}
