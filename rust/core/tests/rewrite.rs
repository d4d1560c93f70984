//! Dropping records from committed shards (`CacheWriter::drop_keys`) and the recovery of a
//! rewrite interrupted at each step; the settings comparison by content fingerprint.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{record, Rng};
use serde_json::json;
use target_sft_core::{CacheWriter, CodecKind, Key, Manifest, Record, TeacherCache, WriterOptions};

fn opts() -> WriterOptions {
    let mut o = WriterOptions::new(8, 1000);
    o.codec = CodecKind::Compact;
    o.shard_bytes = 2048;
    o.threads = 2;
    o.prior_records = 3;
    o.append = true;
    o
}

fn records(n: usize) -> Vec<Record> {
    let mut rng = Rng::new(5);
    (0..n)
        .map(|i| {
            let t = 1 + rng.below(40) as usize;
            record(&mut rng, Key::Int(i as i64), 1000, 8, t)
        })
        .collect()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tsft-rewrite-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn copy_all(from: &Path, to: &Path, only: &BTreeSet<String>) {
    for f in only {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// The cache holds exactly `recs` minus `dropped`, each once, bit for bit in ids and labels.
fn check(dir: &Path, recs: &[Record], dropped: &[i64]) {
    let mut w = CacheWriter::create(dir, opts()).unwrap(); // recovery happens here
    w.close().unwrap();
    Manifest::merge(dir, &["manifest.json".to_string()], true).unwrap();
    let c = TeacherCache::open(dir).unwrap();
    // rewritten shards go through the shard builder: they carry region checksums (FORMAT.md §7),
    // verified when the shard is opened
    for s in 0..c.num_shards() {
        assert!(c.shard(s).unwrap().checksummed, "shard {s}");
    }
    assert_eq!(
        c.verify(|_, _| {}).unwrap(),
        (recs.len() - dropped.len()) as u64
    );
    for r in recs {
        let Key::Int(i) = r.key else { unreachable!() };
        match c.get(&r.key, Some(&r.input_ids)) {
            Ok(got) => {
                assert!(!dropped.contains(&i), "{i} was dropped");
                // the compact codec keeps each row's ids, not their order
                let rows = |v: &[i32]| {
                    let mut rs: Vec<Vec<i32>> = v.chunks(8).map(<[i32]>::to_vec).collect();
                    rs.iter_mut().for_each(|x| x.sort());
                    rs
                };
                assert_eq!(got.labels, r.labels);
                assert_eq!(rows(&got.topk_ids), rows(&r.topk_ids));
            }
            Err(_) => assert!(dropped.contains(&i), "{i} was lost"),
        }
    }
    let listed: BTreeSet<String> = c.manifest.shards.iter().map(|s| s.file.clone()).collect();
    let on_disk: BTreeSet<String> = files(dir)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert_eq!(listed, on_disk, "no stale shard left behind");
}

#[test]
fn drop_keys_rewrites_shards_and_recovers_from_a_crash_at_each_step() {
    let recs = records(40);
    let dropped = [3i64, 4, 17, 39];
    let keys: Vec<Key> = dropped.iter().map(|&i| Key::Int(i)).collect();
    let before = tempdir("before");
    let mut w = CacheWriter::create(&before, opts()).unwrap();
    for r in &recs {
        w.add(r.clone()).unwrap();
    }
    w.close().unwrap();
    assert!(TeacherCache::open(&before).unwrap().num_shards() >= 4);
    let old_files = files(&before);

    // the whole operation
    let after = tempdir("after");
    copy_all(&before, &after, &old_files);
    let mut w = CacheWriter::create(&after, opts()).unwrap();
    assert_eq!(w.drop_keys(&keys).unwrap(), 4);
    assert_eq!(w.num_records(), 36);
    w.add(recs[3].clone()).unwrap(); // a dropped key can be added again
    assert!(w.drop_keys(&keys).is_err(), "only before the first add");
    w.close().unwrap();
    check(&after, &recs, &[4, 17, 39]);

    // the state after each step of a rewrite, as a crash would leave it
    let done = tempdir("done");
    copy_all(&before, &done, &old_files);
    let mut w = CacheWriter::create(&done, opts()).unwrap();
    w.drop_keys(&keys).unwrap();
    drop(w);
    let new_files = files(&done);
    let rewritten: BTreeSet<String> = new_files.difference(&old_files).cloned().collect();
    let replaced: BTreeSet<String> = old_files.difference(&new_files).cloned().collect();
    assert!(!rewritten.is_empty() && rewritten.len() == replaced.len());

    // 1. the new shards are committed, the manifest still lists the old ones
    let d1 = tempdir("step1");
    copy_all(&before, &d1, &old_files);
    copy_all(&done, &d1, &rewritten);
    check(&d1, &recs, &dropped);
    // 2. the manifest lists the new shards, the old files are still there
    let d2 = tempdir("step2");
    copy_all(&done, &d2, &new_files);
    copy_all(&before, &d2, &replaced);
    check(&d2, &recs, &dropped);
    // 3. only the first shard's rewrite was committed and listed, the rest not started
    let d3 = tempdir("step3");
    copy_all(&before, &d3, &old_files);
    let first_new = rewritten.iter().next().unwrap().clone();
    copy_all(&done, &d3, &BTreeSet::from([first_new.clone()]));
    let mut w = CacheWriter::create(&d3, opts()).unwrap(); // rolls the first one forward
    w.drop_keys(&keys).unwrap(); // the rest
    w.close().unwrap();
    check(&d3, &recs, &dropped);
    for d in [before, after, done, d1, d2, d3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn teacher_and_tokenizer_are_compared_by_their_fingerprints() {
    let m = |teacher: serde_json::Value, tokenizer: serde_json::Value| {
        let dir = tempdir("settings");
        let mut o = opts();
        o.append = false;
        o.teacher = teacher;
        o.tokenizer = tokenizer;
        let mut w = CacheWriter::create(&dir, o).unwrap();
        for r in records(2) {
            w.add(r).unwrap();
        }
        let m = w.close().unwrap();
        let _ = std::fs::remove_dir_all(dir);
        m
    };
    let t = |name: &str, weights: &str| {
        json!({"name": name, "revision": null, "config_hash": "c", "dtype": "bfloat16",
               "architecture": "LlamaForCausalLM", "weights_hash": weights})
    };
    let tok =
        |name: &str, fp: &str| json!({"name": name, "class": "A", "size": 10, "fingerprint": fp});
    let base = m(t("./t", "w1"), tok("./t", "f1"));
    base.check_same_settings(&m(t("/abs/t", "w1"), tok("t", "f1")), "part")
        .unwrap();
    let e = base
        .check_same_settings(&m(t("./t", "w2"), tok("./t", "f1")), "part")
        .unwrap_err();
    assert!(
        e.message.contains(r#"teacher.weights_hash = "w2" vs "w1""#),
        "{}",
        e.message
    );
    let e = base
        .check_same_settings(&m(t("./t", "w1"), tok("./t", "f2")), "part")
        .unwrap_err();
    assert!(e.message.contains("tokenizer.fingerprint"), "{}", e.message);
    // without a content fingerprint the whole description is the identity
    let plain = m(json!({"name": "a"}), json!({}));
    assert!(plain
        .check_same_settings(&m(json!({"name": "b"}), json!({})), "part")
        .is_err());
}
