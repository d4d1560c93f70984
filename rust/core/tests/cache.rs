mod common;

use std::path::Path;

use common::{record, Rng};
use target_sft_core::codec::{Codebook, CodebookParams, LadderParams};
use target_sft_core::manifest::FORMAT_VERSION;
use target_sft_core::{
    CacheWriter, CodecKind, ErrorKind, Key, Manifest, Record, TeacherCache, WriterOptions,
};

fn opts(codec: CodecKind, k: usize, vocab: usize) -> WriterOptions {
    let mut o = WriterOptions::new(k, vocab);
    o.codec = codec;
    o.shard_bytes = 4096;
    o.threads = 2;
    o.prior_records = 3;
    o
}

fn write(dir: &Path, o: WriterOptions, recs: &[Record]) {
    let mut w = CacheWriter::create(dir, o).unwrap();
    for r in recs {
        w.add(r.clone()).unwrap();
    }
    w.close().unwrap();
}

fn records(n: usize, vocab: usize, k: usize, seed: u64) -> Vec<Record> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let key = if i % 3 == 0 {
                Key::Str(format!("doc-{i}"))
            } else {
                Key::Int(i as i64 * 7 - 5)
            };
            let t = 1 + rng.below(60) as usize;
            record(&mut rng, key, vocab, k, t)
        })
        .collect()
}

#[test]
fn exact_codec_roundtrips_bit_for_bit() {
    let dir = tempdir("exact");
    let recs = records(40, 1000, 8, 1);
    write(&dir, opts(CodecKind::Exact, 8, 1000), &recs);
    let c = TeacherCache::open(&dir).unwrap();
    assert_eq!(c.len(), 40);
    assert!(c.num_shards() > 1, "small shard size gives several shards");
    for (i, r) in recs.iter().enumerate() {
        let got = c.get(&r.key, Some(&r.input_ids)).unwrap();
        assert_eq!(got.input_ids, r.input_ids);
        assert_eq!(got.labels, r.labels);
        assert_eq!(got.topk_ids, r.topk_ids);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.topk_logprobs), bits(&r.topk_logprobs));
        assert_eq!(bits(&got.label_logprobs), bits(&r.label_logprobs));
        assert_eq!(got.label_ranks, r.label_ranks);
        assert_eq!(c.get_at(i as u64).unwrap().key, r.key);
    }
    assert_eq!(c.verify(|_, _| {}).unwrap(), 40);
}

#[test]
fn compact_codec_keeps_ids_and_bounds_values() {
    let (vocab, k) = (151_936, 64);
    let dir = tempdir("compact");
    let recs = records(25, vocab, k, 2);
    // fixed parameters: one codebook, whose error bound every value must meet
    let mut o = opts(CodecKind::Compact, k, vocab);
    o.ladder = LadderParams::fixed(CodebookParams::default());
    write(&dir, o, &recs);
    let c = TeacherCache::open(&dir).unwrap();
    let cb = Codebook::new(CodebookParams::default()).unwrap();
    for r in &recs {
        let got = c.get(&r.key, None).unwrap();
        assert_eq!(got.input_ids, r.input_ids);
        assert_eq!(got.labels, r.labels);
        assert_eq!(got.label_ranks, r.label_ranks);
        for row in 0..r.n_supervised() {
            let want: std::collections::HashMap<i32, f32> = (0..k)
                .map(|j| (r.topk_ids[row * k + j], r.topk_logprobs[row * k + j]))
                .filter(|(id, _)| *id >= 0)
                .collect();
            for j in 0..k {
                let (id, v) = (got.topk_ids[row * k + j], got.topk_logprobs[row * k + j]);
                if id < 0 {
                    assert_eq!(v, f32::NEG_INFINITY);
                    assert_eq!(want.len(), j, "padding only after the valid entries");
                    break;
                }
                let orig = want[&id];
                let q = cb.quantize(orig);
                if q == cb.escape() {
                    assert_eq!(v.to_bits(), orig.to_bits(), "escaped values are exact");
                } else {
                    assert!(
                        (v - orig).abs() <= cb.max_error(q as usize) + 1e-6,
                        "{v} vs {orig}"
                    );
                }
            }
            let valid = (0..k).filter(|&j| got.topk_ids[row * k + j] >= 0).count();
            assert_eq!(valid, want.len(), "every id comes back");
            let label = r.labels[(1..r.n_tokens())
                .filter(|&t| r.labels[t] != -100)
                .nth(row)
                .unwrap()];
            let orig = r.label_logprobs[row];
            let got_l = got.label_logprobs[row];
            if want.contains_key(&label) {
                assert_eq!(
                    got.topk_ids[row * k],
                    label,
                    "a label in the support decodes first"
                );
                assert_eq!(got_l.to_bits(), got.topk_logprobs[row * k].to_bits());
            } else {
                let q = cb.quantize(orig) as usize;
                assert!(
                    q == cb.escape() as usize || (got_l - orig).abs() <= cb.max_error(q) + 1e-6
                );
            }
        }
    }
    assert_eq!(c.verify(|_, _| {}).unwrap(), 25);
}

/// `KL(exact ‖ decoded)` of one row, both renormalised over the row's entries (ids matched).
fn row_kl(orig: &Record, dec: &Record, k: usize, row: usize) -> f64 {
    let pairs = |r: &Record| {
        let mut v: Vec<(i32, f64)> = (0..k)
            .map(|j| {
                (
                    r.topk_ids[row * k + j],
                    f64::from(r.topk_logprobs[row * k + j]),
                )
            })
            .filter(|&(id, a)| id >= 0 && a > f64::NEG_INFINITY)
            .collect();
        v.sort_by_key(|x| x.0);
        v
    };
    let (p, q) = (pairs(orig), pairs(dec));
    let ids = |v: &[(i32, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(ids(&p), ids(&q), "ids are lossless");
    let lse = |v: &[(i32, f64)]| {
        let m = v.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|x| (x.1 - m).exp()).sum::<f64>().ln()
    };
    let (zp, zq) = (lse(&p), lse(&q));
    p.iter()
        .zip(&q)
        .map(|(a, b)| (a.1 - zp).exp() * ((a.1 - zp) - (b.1 - zq)))
        .sum::<f64>()
        .max(0.0)
}

#[test]
fn a_kl_budget_holds_for_every_record_and_coarser_budgets_take_fewer_bytes() {
    let (vocab, k) = (151_936, 64);
    let recs = records(30, vocab, k, 11);
    let mut sizes = Vec::new();
    for budget in [2e-5, 1e-4, 5e-4] {
        let dir = tempdir(&format!("budget-{budget}"));
        let mut o = opts(CodecKind::Compact, k, vocab);
        o.ladder = LadderParams::budget(budget, -48.0);
        write(&dir, o, &recs);
        let c = TeacherCache::open(&dir).unwrap();
        let (mut sum, mut rows) = (0.0, 0usize);
        for r in &recs {
            let got = c.get(&r.key, None).unwrap();
            let kls: Vec<f64> = (0..r.n_supervised())
                .map(|row| row_kl(r, &got, k, row))
                .collect();
            let mean = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
            // the writer measured the same KL (up to float rounding) and kept it within budget
            assert!(
                mean <= budget * (1.0 + 1e-6),
                "record {}: {mean} > {budget}",
                r.key
            );
            sum += kls.iter().sum::<f64>();
            rows += kls.len();
        }
        let st = c.manifest.stats.clone().unwrap();
        assert_eq!(st.codec_kl_rows as usize, rows);
        assert!(
            (st.codec_kl_sum - sum).abs() <= 1e-9 + 1e-6 * sum,
            "{} vs {sum}",
            st.codec_kl_sum
        );
        // the budget is used, not just respected: each record takes the coarsest rung within
        // it and moves a prefix of its rows to the next coarser one
        assert!(
            sum / rows as f64 > 0.8 * budget,
            "{budget}: mean {}",
            sum / rows as f64
        );
        sizes.push(c.manifest.shards.iter().map(|s| s.bytes).sum::<u64>());
        assert_eq!(c.verify(|_, _| {}).unwrap(), 30);
    }
    assert!(sizes[0] > sizes[1] && sizes[1] > sizes[2], "{sizes:?}");
}

#[test]
fn a_budget_below_the_finest_codebook_is_an_error_naming_the_record() {
    let dir = tempdir("budget-tiny");
    let mut o = opts(CodecKind::Compact, 64, 151_936);
    o.ladder = LadderParams::budget(1e-9, -48.0);
    let mut w = CacheWriter::create(&dir, o).unwrap();
    let mut err = None;
    for r in records(8, 151_936, 64, 3) {
        if let Err(e) = w.add(r) {
            err = Some(e);
            break;
        }
    }
    let e = err
        .or_else(|| w.close().err())
        .expect("the budget cannot be met");
    assert!(e.message.contains("max_mean_kl"), "{}", e.message);
    assert!(e.message.contains("exact"), "{}", e.message);
}

#[test]
fn bad_input_is_rejected_with_location() {
    let dir = tempdir("bad");
    let mut w = CacheWriter::create(&dir, opts(CodecKind::Exact, 4, 100)).unwrap();
    let mut rng = Rng::new(3);
    let good = record(&mut rng, Key::Int(1), 100, 4, 10);
    w.add(good.clone()).unwrap();
    let dup = w.add(good.clone()).unwrap_err();
    assert_eq!(dup.kind, ErrorKind::Input);
    assert!(dup.message.contains("duplicate key 1"), "{}", dup.message);
    let mut bad = record(&mut rng, Key::Int(2), 100, 4, 10);
    bad.topk_ids[0] = 100;
    let e = w.add(bad).unwrap_err();
    assert!(
        e.message
            .contains("topk_ids[0, 0] = 100 is outside the vocabulary [0, 100)"),
        "{}",
        e.message
    );
    let mut nan = record(&mut rng, Key::Int(3), 100, 4, 10);
    nan.topk_logprobs[1] = f32::NAN;
    assert!(w
        .add(nan)
        .unwrap_err()
        .message
        .contains("topk_logprobs[0, 1] = NaN"));
    let mut short = record(&mut rng, Key::Int(4), 100, 4, 10);
    short.label_ranks.pop();
    assert!(w
        .add(short)
        .unwrap_err()
        .message
        .contains("label_ranks has"));
    w.close().unwrap();
    assert_eq!(TeacherCache::open(&dir).unwrap().len(), 1);
}

#[test]
fn corruption_is_detected() {
    let dir = tempdir("corrupt");
    let recs = records(10, 1000, 8, 4);
    let mut o = opts(CodecKind::Compact, 8, 1000);
    o.shard_bytes = 1 << 30;
    write(&dir, o, &recs);
    let c = TeacherCache::open(&dir).unwrap();
    let file = dir.join(&c.manifest.shards[0].file);
    let clean = std::fs::read(&file).unwrap();
    // a flipped byte in the last frame: zstd checksum or stream parser notices
    let mut bytes = clean.clone();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let c = TeacherCache::open(&dir).unwrap();
    let errs: Vec<_> = (0..10).filter_map(|i| c.get_at(i).err()).collect();
    assert!(!errs.is_empty() && errs.iter().all(|e| e.kind == ErrorKind::Corruption));
    assert!(errs[0].message.contains("shard"), "{}", errs[0].message);
    let v = c.verify(|_, _| {}).unwrap_err();
    assert_eq!(v.kind, ErrorKind::Corruption);
    assert!(v.message.contains("checksum"), "{}", v.message);
    // a truncated shard
    std::fs::write(&file, &clean[..n - 100]).unwrap();
    let c = TeacherCache::open(&dir).unwrap();
    let e = c.get_at(0).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corruption);
    assert!(e.message.contains("truncated"), "{}", e.message);
    // a missing shard
    std::fs::remove_file(&file).unwrap();
    let e = TeacherCache::open(&dir).unwrap().get_at(0).unwrap_err();
    assert!(e.message.contains("missing"), "{}", e.message);
}

#[test]
fn newer_format_version_is_refused() {
    let dir = tempdir("version");
    write(&dir, opts(CodecKind::Exact, 4, 100), &records(2, 100, 4, 5));
    let p = dir.join("manifest.json");
    let s = std::fs::read_to_string(&p).unwrap().replace(
        &format!("\"format_version\": {FORMAT_VERSION}"),
        &format!("\"format_version\": {}", FORMAT_VERSION + 1),
    );
    std::fs::write(&p, s).unwrap();
    let e = TeacherCache::open(&dir).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Version);
    assert!(e.message.contains("upgrade target-sft"));
}

#[test]
fn token_mismatch_is_reported() {
    let dir = tempdir("mismatch");
    let recs = records(3, 100, 4, 6);
    write(&dir, opts(CodecKind::Exact, 4, 100), &recs);
    let c = TeacherCache::open(&dir).unwrap();
    let mut ids = recs[1].input_ids.clone();
    ids[0] = (ids[0] + 1) % 100;
    let e = c.get(&recs[1].key, Some(&ids)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Mismatch);
    assert_eq!(
        c.get(&Key::Str("nope".into()), None).unwrap_err().kind,
        ErrorKind::KeyNotFound
    );
}

#[test]
fn append_adopts_orphans_and_checks_settings() {
    let dir = tempdir("append");
    let recs = records(30, 1000, 8, 7);
    write(&dir, opts(CodecKind::Exact, 8, 1000), &recs[..10]);
    // simulate a crash after a shard commit but before the manifest update
    let c = TeacherCache::open(&dir).unwrap();
    let last = c.manifest.shards.last().unwrap().clone();
    let mut m = c.manifest.clone();
    m.shards.pop();
    m.recount();
    m.complete = false;
    m.store(&dir).unwrap();
    std::fs::write(dir.join(".tmp-1-shard-000099.safetensors"), b"half").unwrap();
    // a different top-k is refused, naming the field
    let mut other = opts(CodecKind::Exact, 4, 1000);
    other.append = true;
    let e = CacheWriter::create(&dir, other).err().unwrap();
    assert!(e.message.contains("top_k"), "{}", e.message);
    // create mode refuses a non-empty cache
    assert!(CacheWriter::create(&dir, opts(CodecKind::Exact, 8, 1000)).is_err());
    let mut o = opts(CodecKind::Exact, 8, 1000);
    o.append = true;
    let mut w = CacheWriter::create(&dir, o).unwrap();
    assert_eq!(w.num_records(), 10, "the orphan shard was adopted");
    assert!(
        w.add(recs[3].clone()).is_err(),
        "keys of adopted shards count as duplicates"
    );
    for r in &recs[10..] {
        w.add(r.clone()).unwrap();
    }
    w.close().unwrap();
    assert!(!dir.join(".tmp-1-shard-000099.safetensors").exists());
    let c = TeacherCache::open(&dir).unwrap();
    assert!(c.manifest.shards.iter().any(|s| s.file == last.file));
    assert_eq!(c.len(), 30);
    for r in &recs {
        assert_eq!(
            c.get(&r.key, Some(&r.input_ids)).unwrap().topk_ids,
            r.topk_ids
        );
    }
}

#[test]
fn writers_with_their_own_prefix_and_manifest_share_a_directory_and_merge() {
    let dir = tempdir("ranks");
    let recs = records(40, 1000, 8, 11);
    let rank_opts = |r: usize| {
        let mut o = opts(CodecKind::Compact, 8, 1000);
        o.append = true;
        o.shard_prefix = format!("rank{r:05}-of-00002");
        o.manifest_name = format!("manifest.rank{r:05}-of-00002.json");
        o.shard_bytes = 1; // one shard per record
        o
    };
    let parts: Vec<String> = (0..2).map(|r| rank_opts(r).manifest_name).collect();
    write(&dir, rank_opts(0), &recs[..20]);
    // rank 1 starts while a temp file of rank 0 is in flight: it must neither delete it nor
    // adopt rank 0's shards
    let in_flight = dir.join(".tmp-7-rank00000-of-00002-000099.safetensors");
    std::fs::write(&in_flight, b"being written").unwrap();
    let stale = dir.join(".tmp-8-rank00001-of-00002-000005.safetensors");
    std::fs::write(&stale, b"dead").unwrap();
    let mut w1 = CacheWriter::create(&dir, rank_opts(1)).unwrap();
    assert_eq!(w1.num_records(), 0);
    assert!(in_flight.exists() && !stale.exists());
    for r in &recs[20..] {
        w1.add(r.clone()).unwrap();
    }
    w1.close().unwrap();
    assert!(
        !dir.join("manifest.json").exists(),
        "writers with their own manifest never write manifest.json"
    );
    let m = Manifest::merge(&dir, &parts, true).unwrap();
    assert_eq!((m.num_records, m.shards.len(), m.complete), (40, 40, true));
    assert!(
        m.shards[0].file.starts_with("rank00000") && m.shards[39].file.starts_with("rank00001")
    );
    let c = TeacherCache::open(&dir).unwrap();
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(c.position(&r.key).unwrap(), i as u64);
    }
    // a part with other settings is refused, naming the field
    let mut odd = rank_opts(2);
    odd.temperature = 2.0;
    write(&dir, odd.clone(), &records(3, 1000, 8, 12));
    let e = Manifest::merge(&dir, &[parts[0].clone(), odd.manifest_name], true).unwrap_err();
    assert!(e.message.contains("temperature"), "{}", e.message);
    let e = Manifest::merge(&dir, &[parts[0].clone(), parts[0].clone()], true).unwrap_err();
    assert!(e.message.contains("listed by two"), "{}", e.message);
    let mut bad = opts(CodecKind::Compact, 8, 1000);
    bad.manifest_name = "../manifest.json".into();
    assert!(CacheWriter::create(&dir, bad).is_err());
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tsft-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
