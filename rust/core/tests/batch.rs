//! The batch builder: decoding straight into the batch (cached sources) gives exactly the batch
//! built from the same records decoded into `Record`s first; the layout follows docs/DATA.md.
mod common;

use common::{record, rows, Rng};
use target_sft_core::{
    BatchBuffers, BatchOptions, BatchPlan, CacheWriter, CodecKind, ErrorKind, Key, Record,
    RecordView, Reference, ReferenceBuffers, Source, TeacherCache, WriterOptions,
};

const K: usize = 8;
const V: usize = 500;

fn cache(name: &str, codec: CodecKind, n: usize, seed: u64) -> (TeacherCache, Vec<Record>) {
    let mut rng = Rng::new(seed);
    let recs: Vec<Record> = (0..n)
        .map(|i| {
            let t = [1, 2, 5, 17, 30, 44][i % 6] + rng.below(3) as usize;
            record(&mut rng, Key::Int(i as i64), V, K, t)
        })
        .collect();
    (write_cache(name, codec, K, &recs), recs)
}

/// A cache of `recs` (`k` entries per row) in a fresh directory.
fn write_cache(name: &str, codec: CodecKind, k: usize, recs: &[Record]) -> TeacherCache {
    let dir = std::env::temp_dir().join(format!("tsft-batch-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut o = WriterOptions::new(k, V);
    o.codec = codec;
    o.shard_bytes = 2048;
    o.prior_records = 2;
    let mut w = CacheWriter::create(&dir, o).unwrap();
    for r in recs {
        w.add(r.clone()).unwrap();
    }
    w.close().unwrap();
    TeacherCache::open(&dir).unwrap()
}

/// The same samples as `recs` (keys, tokens, labels) with other rows of `k` entries: what a
/// reference model's cache of the same rows holds.
fn reference_records(recs: &[Record], k: usize, seed: u64) -> Vec<Record> {
    let mut rng = Rng::new(seed);
    recs.iter()
        .map(|r| {
            let (topk_ids, topk_logprobs, label_logprobs, label_ranks) =
                rows(&mut rng, &r.labels, V, k);
            Record {
                topk_ids,
                topk_logprobs,
                label_logprobs,
                label_ranks,
                ..r.clone()
            }
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Batch {
    rows: usize,
    len: usize,
    ids: Vec<i64>,
    side: Vec<i64>,
    labels: Vec<i64>,
    tids: Vec<i32>,
    tlps: Vec<u32>,
    cu: Vec<i32>,
    seq: Vec<i64>,
    /// Empty without a reference.
    rids: Vec<i32>,
    rlps: Vec<u32>,
    rlab: Vec<u32>,
    supervised: usize,
}

fn build(sources: &[Source<'_>], opts: &BatchOptions, parallel: bool) -> Batch {
    let plan = BatchPlan::new(sources, opts).unwrap();
    let (n, nt) = (plan.tokens(), plan.teacher_elements());
    // garbage everywhere: every element must be written
    let (mut ids, mut side, mut labels) = (vec![7i64; n], vec![7i64; n], vec![7i64; n]);
    let (mut tids, mut tlps) = (vec![7i32; nt], vec![7.0f32; nt]);
    let mut seq = vec![7i64; n];
    let nr = plan.reference_elements();
    let (mut rids, mut rlps) = (vec![7i32; nr], vec![7.0f32; nr]);
    let mut rlab = vec![7.0f32; if nr > 0 { n } else { 0 }];
    let (mask, pos) = if opts.packing {
        (None, Some(&mut side[..]))
    } else {
        (Some(&mut side[..]), None)
    };
    let out = BatchBuffers {
        input_ids: &mut ids,
        attention_mask: mask,
        labels: &mut labels,
        position_ids: pos,
        teacher_ids: &mut tids,
        teacher_logprobs: &mut tlps,
        sequence_ids: &mut seq,
        reference: plan.reference_top_k.map(|_| ReferenceBuffers {
            ids: &mut rids,
            logprobs: &mut rlps,
            label_logprobs: &mut rlab,
        }),
    };
    let supervised = if parallel {
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| plan.fill(sources, out, true))
    } else {
        plan.fill(sources, out, false)
    }
    .unwrap();
    Batch {
        rows: plan.rows,
        len: plan.len,
        ids,
        side,
        labels,
        tids,
        tlps: tlps.iter().map(|x| x.to_bits()).collect(),
        cu: plan.cu_seqlens.clone(),
        seq,
        rids,
        rlps: rlps.iter().map(|x| x.to_bits()).collect(),
        rlab: rlab.iter().map(|x| x.to_bits()).collect(),
        supervised,
    }
}

/// The error of planning and filling a batch of `sources` (padded layout, one thread).
fn batch_err(sources: &[Source<'_>]) -> target_sft_core::Error {
    let opts = BatchOptions::default();
    let plan = match BatchPlan::new(sources, &opts) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (n, nt) = (plan.tokens(), plan.teacher_elements());
    let (mut ids, mut mask, mut labels) = (vec![0i64; n], vec![0i64; n], vec![0i64; n]);
    let (mut tids, mut tlps) = (vec![0i32; nt], vec![0f32; nt]);
    let mut seq = vec![0i64; n];
    let nr = plan.reference_elements();
    let (mut rids, mut rlps, mut rlab) = (vec![0i32; nr], vec![0f32; nr], vec![0f32; n]);
    let out = BatchBuffers {
        input_ids: &mut ids,
        attention_mask: Some(&mut mask),
        labels: &mut labels,
        position_ids: None,
        teacher_ids: &mut tids,
        teacher_logprobs: &mut tlps,
        sequence_ids: &mut seq,
        reference: plan.reference_top_k.map(|_| ReferenceBuffers {
            ids: &mut rids,
            logprobs: &mut rlps,
            label_logprobs: &mut rlab,
        }),
    };
    plan.fill(sources, out, false)
        .expect_err("expected an error")
}

#[test]
fn given_ids_and_labels_are_checked_and_differences_described() {
    let (c, recs) = cache("describe", CodecKind::Compact, 6, 11);
    let p = recs.iter().position(|r| r.n_tokens() >= 17).unwrap();
    let r = &recs[p];
    let one = |ids: &[i32], labels: Option<&[i32]>| {
        batch_err(&[Source::Cached {
            cache: &c,
            position: p as u64,
            input_ids: Some(ids),
            labels,
            reference: None,
        }])
    };
    let n = r.n_tokens();
    // truncated after caching: a prefix (keep_start) or a suffix (keep_end) of the cached ids
    let e = one(&r.input_ids[..n - 3], None);
    assert_eq!(e.kind, ErrorKind::Mismatch);
    let want = format!(
        "batch item 0 (key {p}): the batch's ids are a prefix of the cached ids ({} of {n} tokens)",
        n - 3
    );
    assert!(e.message.starts_with(&want), "{e}");
    assert!(e.message.contains(&format!("max_length={}", n - 3)), "{e}");
    let e = one(&r.input_ids[3..], None);
    assert!(e.message.contains("are a suffix of the cached ids"), "{e}");
    // the cache truncated, the batch did not
    let mut longer = r.input_ids.clone();
    longer.push(5);
    let e = one(&longer, None);
    assert!(
        e.message.contains(&format!(
            "the cached ids are a truncation of the batch's ids ({n} of {} tokens)",
            n + 1
        )),
        "{e}"
    );
    // another token: the first differing position
    let mut other = r.input_ids.clone();
    other[4] = (other[4] + 1) % V as i32;
    let e = one(&other, None);
    assert!(
        e.message.contains("differ from the ids the cache at"),
        "{e}"
    );
    assert!(e.message.contains("at position 4 ("), "{e}");
    // labels: equal ones pass, a differing one names the position and both values
    let ok = BatchPlan::new(
        &[Source::Cached {
            cache: &c,
            position: p as u64,
            input_ids: Some(&r.input_ids),
            labels: Some(&r.labels),
            reference: None,
        }],
        &BatchOptions::default(),
    );
    assert!(ok.is_ok());
    let t = (1..n).find(|&t| r.labels[t] != -100).unwrap();
    let mut labels = r.labels.clone();
    labels[t] = -100;
    let e = one(&r.input_ids, Some(&labels));
    assert_eq!(e.kind, ErrorKind::Mismatch);
    assert!(
        e.message.starts_with(&format!("batch item 0 (key {p}): ")),
        "{e}"
    );
    assert!(
        e.message.contains(&format!(
            "the batch's labels differ from the cached labels at position {t} (batch -100 (not supervised), cache {} (supervised)",
            r.labels[t]
        )),
        "{e}"
    );
    let e = one(&r.input_ids, Some(&labels[1..]));
    assert_eq!(e.kind, ErrorKind::Input);
}

fn views(recs: &[Record]) -> Vec<Source<'_>> {
    recs.iter()
        .map(|r| {
            Source::Decoded(RecordView {
                key: r.key.clone(),
                input_ids: &r.input_ids,
                labels: &r.labels,
                topk_ids: &r.topk_ids,
                topk_logprobs: &r.topk_logprobs,
                label_logprobs: &r.label_logprobs,
                top_k: K,
            })
        })
        .collect()
}

fn layouts() -> Vec<BatchOptions> {
    let mut out = Vec::new();
    for label_in_support in [false, true] {
        let base = BatchOptions {
            label_in_support,
            pad_token_id: 3,
            ..Default::default()
        };
        out.push(base.clone());
        out.push(BatchOptions {
            pad_to_multiple_of: 8,
            max_length: Some(20),
            ..base.clone()
        });
        out.push(BatchOptions {
            packing: true,
            max_length: Some(50),
            ..base.clone()
        });
        out.push(BatchOptions {
            packing: true,
            max_length: Some(24),
            pad_to_max_length: true,
            pad_to_multiple_of: 16,
            ..base
        });
    }
    out
}

#[test]
fn direct_decoding_equals_the_record_round_trip() {
    for (name, codec) in [("exact", CodecKind::Exact), ("compact", CodecKind::Compact)] {
        let (c, _) = cache(name, codec, 18, 7);
        assert!(c.num_shards() > 1);
        let order: Vec<u64> = (0..c.len()).rev().collect();
        let decoded: Vec<Record> = order.iter().map(|&p| c.get_at(p).unwrap()).collect();
        let cached: Vec<Source<'_>> = order
            .iter()
            .map(|&p| Source::Cached {
                cache: &c,
                position: p,
                input_ids: None,
                labels: None,
                reference: None,
            })
            .collect();
        for opts in layouts() {
            let want = build(&views(&decoded), &opts, false);
            assert_eq!(build(&cached, &opts, false), want, "{name} {opts:?}");
            assert_eq!(
                build(&cached, &opts, true),
                want,
                "{name} {opts:?} parallel"
            );
        }
    }
}

#[test]
fn padded_layout_aligns_teacher_rows_with_labels() {
    let (_, recs) = cache("align", CodecKind::Exact, 6, 3);
    let opts = BatchOptions {
        label_in_support: true,
        ..Default::default()
    };
    let b = build(&views(&recs), &opts, false);
    let w = K + 1;
    let mut supervised = 0;
    for (i, r) in recs.iter().enumerate() {
        let mut row = 0;
        for t in 0..b.len {
            let at = i * b.len + t;
            let label = if t == 0 || t >= r.labels.len() {
                -100
            } else {
                r.labels[t]
            };
            assert_eq!(b.labels[at], i64::from(label));
            let tids = &b.tids[at * w..(at + 1) * w];
            if label == -100 {
                assert!(tids.iter().all(|&x| x == -1));
                continue;
            }
            // teacher row `row` of the record sits at the position of its label
            assert_eq!(&tids[..K], &r.topk_ids[row * K..(row + 1) * K]);
            let outside = !r.topk_ids[row * K..(row + 1) * K].contains(&label);
            assert_eq!(tids[K], if outside { label } else { -1 });
            if outside {
                assert_eq!(b.tlps[at * w + K], r.label_logprobs[row].to_bits());
            }
            row += 1;
            supervised += 1;
        }
        assert_eq!(row, r.n_supervised());
    }
    assert_eq!(b.supervised, supervised);
}

#[test]
fn packing_is_greedy_first_fit_with_segments_for_padding() {
    let (_, recs) = cache("pack", CodecKind::Exact, 6, 5);
    let opts = BatchOptions {
        packing: true,
        max_length: Some(48),
        pad_to_multiple_of: 8,
        ..Default::default()
    };
    let sources = views(&recs);
    let plan = BatchPlan::new(&sources, &opts).unwrap();
    let lens: Vec<usize> = recs.iter().map(|r| r.n_tokens().min(48)).collect();
    let mut fill: Vec<usize> = Vec::new();
    for (item, &n) in lens.iter().enumerate() {
        let row = fill.iter().position(|&f| f + n <= 48).unwrap_or_else(|| {
            fill.push(0);
            fill.len() - 1
        });
        let p = plan.placements.iter().find(|p| p.item == item).unwrap();
        assert_eq!((p.row, p.offset, p.len), (row, fill[row], n));
        fill[row] += n;
    }
    assert_eq!(plan.rows, fill.len());
    assert_eq!(plan.len, fill.iter().max().unwrap().next_multiple_of(8));
    let flat = (plan.rows * plan.len) as i32;
    assert_eq!(*plan.cu_seqlens.last().unwrap(), flat);
    assert!(plan.cu_seqlens.windows(2).all(|w| w[0] < w[1]));
    let b = build(&sources, &opts, false);
    for &start in &b.cu[..b.cu.len() - 1] {
        assert_eq!(
            b.side[start as usize], 0,
            "position ids restart at every segment"
        );
        assert_eq!(b.labels[start as usize], -100, "no label across a boundary");
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_item() {
    let (c, recs) = cache("errors", CodecKind::Compact, 4, 9);
    let opts = BatchOptions::default();
    let err = |sources: &[Source<'_>], opts: &BatchOptions| match BatchPlan::new(sources, opts) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert_eq!(err(&[], &opts).kind, ErrorKind::Input);
    let e = err(
        &[
            Source::Cached {
                cache: &c,
                position: 0,
                input_ids: None,
                labels: None,
                reference: None,
            },
            Source::Cached {
                cache: &c,
                position: 99,
                input_ids: None,
                labels: None,
                reference: None,
            },
        ],
        &opts,
    );
    assert_eq!(e.kind, ErrorKind::KeyNotFound);
    assert!(e.message.starts_with("batch item 1: position 99"), "{e}");
    let wrong = vec![1i32; recs[2].n_tokens()];
    let e = err(
        &[Source::Cached {
            cache: &c,
            position: 2,
            input_ids: Some(&wrong),
            labels: None,
            reference: None,
        }],
        &opts,
    );
    assert_eq!(e.kind, ErrorKind::Mismatch);
    assert!(
        e.message
            .starts_with("batch item 0 (key 2): the batch's ids differ from the ids"),
        "{e}"
    );
    let with_rows = recs.iter().position(|r| r.n_supervised() > 0).unwrap();
    let mut v = views(&recs[with_rows..with_rows + 1]);
    if let Source::Decoded(r) = &mut v[0] {
        r.top_k = 4;
    }
    assert_eq!(err(&v, &opts).kind, ErrorKind::Input);
    for bad in [
        BatchOptions {
            packing: true,
            ..Default::default()
        },
        BatchOptions {
            pad_to_multiple_of: 0,
            ..Default::default()
        },
        BatchOptions {
            max_length: Some(0),
            ..Default::default()
        },
    ] {
        assert_eq!(err(&views(&recs), &bad).kind, ErrorKind::Input);
    }
}

const KR: usize = 5;

/// Cached sources of `positions` in `c`, each with its record in `r` at `ref_positions`.
fn with_reference<'a>(
    c: &'a TeacherCache,
    positions: &[u64],
    r: &'a TeacherCache,
    ref_positions: &[u64],
) -> Vec<Source<'a>> {
    positions
        .iter()
        .zip(ref_positions)
        .map(|(&p, &q)| Source::Cached {
            cache: c,
            position: p,
            input_ids: None,
            labels: None,
            reference: Some(Reference {
                cache: r,
                position: q,
            }),
        })
        .collect()
}

fn cached<'a>(c: &'a TeacherCache, positions: &[u64]) -> Vec<Source<'a>> {
    positions
        .iter()
        .map(|&p| Source::Cached {
            cache: c,
            position: p,
            input_ids: None,
            labels: None,
            reference: None,
        })
        .collect()
}

#[test]
fn reference_rows_are_placed_like_teacher_rows() {
    for (name, codec) in [("exact", CodecKind::Exact), ("compact", CodecKind::Compact)] {
        let (t, recs) = cache(&format!("ref-t-{name}"), codec, 14, 21);
        let mut refs = reference_records(&recs, KR, 5);
        refs.reverse(); // stored in another order: found by position, checked by key
        let r = write_cache(&format!("ref-r-{name}"), codec, KR, &refs);
        let order: Vec<u64> = vec![3, 0, 7, 12, 5, 9, 1, 13];
        let ref_order: Vec<u64> = order.iter().map(|&p| recs.len() as u64 - 1 - p).collect();
        let sources = with_reference(&t, &order, &r, &ref_order);
        for opts in layouts() {
            let b = build(&sources, &opts, true);
            let teacher_only = build(&cached(&t, &order), &opts, false);
            // the reference cache's rows, placed as a teacher's would be
            let as_teacher = build(&cached(&r, &ref_order), &opts, false);
            assert_eq!(
                (&b.ids, &b.labels, &b.side, &b.tids, &b.tlps, &b.seq),
                (
                    &teacher_only.ids,
                    &teacher_only.labels,
                    &teacher_only.side,
                    &teacher_only.tids,
                    &teacher_only.tlps,
                    &teacher_only.seq
                ),
                "{name} {opts:?}"
            );
            assert_eq!(b.rids, as_teacher.tids, "{name} {opts:?}");
            assert_eq!(b.rlps, as_teacher.tlps, "{name} {opts:?}");
            assert_eq!(b, build(&sources, &opts, false), "{name} {opts:?} serial");
            // label log-probs: the record's, at its supervised positions; 0.0 elsewhere
            let plan = BatchPlan::new(&sources, &opts).unwrap();
            let mut want = vec![0f32.to_bits(); b.rows * b.len];
            let mut seq = vec![-1i64; b.rows * b.len];
            for p in &plan.placements {
                // decoded one by one (the compact codec quantises log-probs)
                let rec = r.get_at(ref_order[p.item]).unwrap();
                let start = p.row * b.len + p.offset;
                seq[start..start + p.len].fill(p.item as i64);
                let mut row = 0;
                for t in 1..rec.labels.len() {
                    if rec.labels[t] == -100 {
                        continue;
                    }
                    if t < p.len {
                        want[start + t] = rec.label_logprobs[row].to_bits();
                    }
                    row += 1;
                }
            }
            assert_eq!(b.rlab, want, "{name} {opts:?}");
            assert_eq!(b.seq, seq, "{name} {opts:?}");
            let w = KR + usize::from(opts.label_in_support);
            assert_eq!(b.rids.len(), b.rows * b.len * w);
        }
    }
}

#[test]
fn sequence_ids_name_the_item_of_every_position() {
    let (t, _) = cache("seq", CodecKind::Exact, 6, 2);
    let order = [4u64, 1, 0, 5];
    for opts in layouts() {
        let sources = cached(&t, &order);
        let plan = BatchPlan::new(&sources, &opts).unwrap();
        let b = build(&sources, &opts, false);
        for (flat, &s) in b.seq.iter().enumerate() {
            let (row, at) = (flat / b.len, flat % b.len);
            let owner = plan
                .placements
                .iter()
                .find(|p| p.row == row && (p.offset..p.offset + p.len).contains(&at));
            assert_eq!(s, owner.map_or(-1, |p| p.item as i64), "{opts:?} {flat}");
        }
    }
}

#[test]
fn a_reference_record_must_be_the_same_sample() {
    let (t, recs) = cache("ref-err-t", CodecKind::Exact, 6, 31);
    let i = recs.iter().position(|r| r.n_supervised() >= 2).unwrap();
    let good = reference_records(&recs, KR, 8);
    let r = write_cache("ref-err-r", CodecKind::Exact, KR, &good);
    let p = i as u64;
    // the same sample: fine
    assert!(BatchPlan::new(
        &with_reference(&t, &[p], &r, &[p]),
        &BatchOptions::default()
    )
    .is_ok());
    // another record (another key)
    let other = ((i + 1) % recs.len()) as u64;
    let e = batch_err(&with_reference(&t, &[p], &r, &[other]));
    assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
    assert!(
        e.message.starts_with(&format!(
            "batch item 0 (key {i}): the reference record at position {other}"
        )),
        "{e}"
    );
    // mixed: an item without a reference
    let mut mixed = with_reference(&t, &[p], &r, &[p]);
    mixed.extend(cached(&t, &[p]));
    let e = batch_err(&mixed);
    assert_eq!(e.kind, ErrorKind::Input, "{e}");
    assert!(
        e.message
            .contains("batch item 0 has a reference record but item 1 has none"),
        "{e}"
    );
    let mut mixed = cached(&t, &[p]);
    mixed.extend(with_reference(&t, &[p], &r, &[p]));
    assert!(batch_err(&mixed)
        .message
        .contains("batch item 1 has a reference record but item 0 has none"));
    // edited reference records (same key): other tokens, other supervision, other labels
    let edit = |name: &str, f: &dyn Fn(&mut Record)| {
        let mut recs2 = good.clone();
        f(&mut recs2[i]);
        let r2 = write_cache(name, CodecKind::Exact, KR, &recs2);
        let e = batch_err(&with_reference(&t, &[p], &r2, &[p]));
        assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
        assert!(
            e.message.starts_with(&format!("batch item 0 (key {i}): ")),
            "{e}"
        );
        assert!(e.message.contains(&t.dir.display().to_string()), "{e}");
        assert!(e.message.contains(&r2.dir.display().to_string()), "{e}");
        e.message
    };
    let m = edit("ref-err-ids", &|r| {
        r.input_ids[0] = (r.input_ids[0] + 1) % V as i32
    });
    assert!(
        m.contains("the reference record's tokens differ from the teacher record's at position 0"),
        "{m}"
    );
    let m = edit("ref-err-sup", &|r| {
        let t = r.labels.iter().rposition(|&l| l != -100).unwrap();
        r.labels[t] = -100;
        let (ids, lps, lab, ranks) = rows(&mut Rng::new(1), &r.labels, V, KR);
        (r.topk_ids, r.topk_logprobs, r.label_logprobs, r.label_ranks) = (ids, lps, lab, ranks);
    });
    assert!(
        m.contains("supervised tokens but the teacher record has"),
        "{m}"
    );
    let m = edit("ref-err-labels", &|r| {
        // the same number of supervised tokens, one of them another label
        let t = r.labels.iter().rposition(|&l| l != -100).unwrap();
        r.labels[t] = (r.labels[t] + 1) % V as i32;
        let (ids, lps, lab, ranks) = rows(&mut Rng::new(1), &r.labels, V, KR);
        (r.topk_ids, r.topk_logprobs, r.label_logprobs, r.label_ranks) = (ids, lps, lab, ranks);
    });
    assert!(
        m.contains("the reference record's labels differ from the teacher record's at position"),
        "{m}"
    );
}
