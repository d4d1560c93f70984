//! A record: one training sample with its teacher top-k (docs/FORMAT.md §Record).

use std::fmt;

use crate::error::{Error, Result};

/// The label value that marks an unsupervised position (Hugging Face convention).
pub const IGNORE_INDEX: i32 = -100;

/// A record key: an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Int(i64),
    Str(String),
}

impl Key {
    /// Canonical bytes: `b'i'` + i64 little-endian, or `b's'` + UTF-8.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Key::Int(v) => {
                let mut out = Vec::with_capacity(9);
                out.push(b'i');
                out.extend_from_slice(&v.to_le_bytes());
                out
            }
            Key::Str(s) => {
                let mut out = Vec::with_capacity(1 + s.len());
                out.push(b's');
                out.extend_from_slice(s.as_bytes());
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Key> {
        match bytes.split_first() {
            Some((b'i', rest)) if rest.len() == 8 => {
                Ok(Key::Int(i64::from_le_bytes(rest.try_into().unwrap())))
            }
            Some((b's', rest)) => std::str::from_utf8(rest)
                .map(|s| Key::Str(s.to_string()))
                .map_err(|_| Error::corrupt("a string key is not valid UTF-8")),
            _ => Err(Error::corrupt("a key has an unknown tag")),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(v) => write!(f, "{v}"),
            Key::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// One sample. `topk_*` hold `n_supervised() * k` entries row-major; a row `r` belongs to the
/// r-th position `t >= 1` with `labels[t] != -100` (the position whose label the teacher
/// predicted from the prefix `input_ids[..t]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: Key,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub topk_ids: Vec<i32>,
    pub topk_logprobs: Vec<f32>,
    pub label_logprobs: Vec<f32>,
    pub label_ranks: Vec<i32>,
}

/// The label of each supervised row, in row order: `labels[t]` for every position `t >= 1`
/// whose label is not ignored (nothing predicts position 0).
pub fn supervised_labels(labels: &[i32]) -> impl Iterator<Item = i32> + '_ {
    labels
        .iter()
        .skip(1)
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
}

/// Number of supervised rows of a label array.
pub fn count_supervised(labels: &[i32]) -> usize {
    supervised_labels(labels).count()
}

/// Largest log-prob accepted (a log-softmax computed in fp32 can round slightly above 0).
pub const MAX_LOGPROB: f32 = 1e-3;

impl Record {
    pub fn n_tokens(&self) -> usize {
        self.input_ids.len()
    }
    pub fn n_supervised(&self) -> usize {
        self.label_logprobs.len()
    }

    /// Check everything a codec relies on. `stamp` is scratch space of `vocab_size` entries used
    /// to detect duplicate ids in O(k) per row (pass the same buffer across calls).
    pub fn validate(&self, vocab_size: usize, k: usize, stamp: &mut Stamp) -> Result<()> {
        let at = |what: String| Error::input(format!("record {}: {what}", self.key));
        let t = self.input_ids.len();
        if t == 0 {
            return Err(at(
                "input_ids is empty; a record needs at least one token".into()
            ));
        }
        if self.labels.len() != t {
            return Err(at(format!(
                "labels has {} entries but input_ids has {t}; they must have the same length",
                self.labels.len()
            )));
        }
        let v = vocab_size as i64;
        if let Some((i, &x)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &x)| x < 0 || x as i64 >= v)
        {
            return Err(at(format!(
                "input_ids[{i}] = {x} is outside the vocabulary [0, {v})"
            )));
        }
        if let Some((i, &x)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &x)| x != IGNORE_INDEX && (x < 0 || x as i64 >= v))
        {
            return Err(at(format!(
                "labels[{i}] = {x} is neither -100 (ignored) nor inside the vocabulary [0, {v})"
            )));
        }
        let s = count_supervised(&self.labels);
        let shape_err = |name: &str, got: usize, want: usize, shape: &str| {
            at(format!(
                "{name} has {got} entries but must have shape {shape} = {want}: one row per position t >= 1 whose label is not -100 ({s} such rows)"
            ))
        };
        if self.topk_ids.len() != s * k {
            return Err(shape_err(
                "topk_ids",
                self.topk_ids.len(),
                s * k,
                &format!("[{s}, {k}]"),
            ));
        }
        if self.topk_logprobs.len() != s * k {
            return Err(shape_err(
                "topk_logprobs",
                self.topk_logprobs.len(),
                s * k,
                &format!("[{s}, {k}]"),
            ));
        }
        if self.label_logprobs.len() != s {
            return Err(shape_err(
                "label_logprobs",
                self.label_logprobs.len(),
                s,
                &format!("[{s}]"),
            ));
        }
        if self.label_ranks.len() != s {
            return Err(shape_err(
                "label_ranks",
                self.label_ranks.len(),
                s,
                &format!("[{s}]"),
            ));
        }
        let mut row_labels = supervised_labels(&self.labels);
        for r in 0..s {
            let label = row_labels.next().expect("s counts these rows");
            let ids = &self.topk_ids[r * k..(r + 1) * k];
            let lps = &self.topk_logprobs[r * k..(r + 1) * k];
            let gen = stamp.next_row(vocab_size);
            let mut padded = false;
            for j in 0..k {
                let (id, lp) = (ids[j], lps[j]);
                if id == -1 {
                    if lp != f32::NEG_INFINITY {
                        return Err(at(format!(
                            "topk_ids[{r}, {j}] is -1 (padding) but topk_logprobs[{r}, {j}] = {lp}; padding must carry -inf"
                        )));
                    }
                    padded = true;
                    continue;
                }
                if padded {
                    return Err(at(format!(
                        "topk_ids[{r}, {j}] = {id} follows padding (-1) in its row; padding must come last"
                    )));
                }
                if id < 0 || id as i64 >= v {
                    return Err(at(format!(
                        "topk_ids[{r}, {j}] = {id} is outside the vocabulary [0, {v}) and is not -1 (padding)"
                    )));
                }
                if stamp.seen(id as usize, gen) {
                    return Err(at(format!(
                        "topk_ids[{r}, {j}] = {id} appears twice in row {r}; a top-k row holds distinct ids"
                    )));
                }
                if lp.is_nan() || lp > MAX_LOGPROB {
                    return Err(at(format!(
                        "topk_logprobs[{r}, {j}] = {lp} is not a log-probability (NaN or > 1e-3)"
                    )));
                }
            }
            let ll = self.label_logprobs[r];
            if ll.is_nan() || ll > MAX_LOGPROB {
                return Err(at(format!(
                    "label_logprobs[{r}] = {ll} is not a log-probability (NaN or > 1e-3)"
                )));
            }
            if let Some(j) = ids.iter().position(|&x| x == label) {
                // The compact codec decodes the label's log-prob from its top-k entry, so the two
                // must agree; a label inside the top-k also has a rank below k.
                let (ej, ll) = (lps[j], self.label_logprobs[r]);
                let close =
                    ej.is_finite() && ll.is_finite() && (ej - ll).abs() <= 1e-4 * ej.abs().max(1.0);
                if !(ej == ll || close) {
                    return Err(at(format!(
                        "label_logprobs[{r}] = {ll} but the label {label} is in the top-k with topk_logprobs[{r}, {j}] = {ej}; they must be the same log-prob"
                    )));
                }
                if self.label_ranks[r] as usize >= k {
                    return Err(at(format!(
                        "label_ranks[{r}] = {} but the label {label} is in the top-k (column {j}); its rank must be below top_k = {k}",
                        self.label_ranks[r]
                    )));
                }
            }
            if self.label_ranks[r] < 0 {
                return Err(at(format!(
                    "label_ranks[{r}] = {} is negative; ranks are 0-based",
                    self.label_ranks[r]
                )));
            }
        }
        Ok(())
    }
}

/// Generation-stamped scratch for O(1) duplicate detection inside a row.
#[derive(Default)]
pub struct Stamp {
    marks: Vec<u32>,
    gen: u32,
}

impl Stamp {
    fn next_row(&mut self, vocab_size: usize) -> u32 {
        if self.marks.len() < vocab_size {
            self.marks.resize(vocab_size, 0);
        }
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.gen = 1;
        }
        self.gen
    }
    fn seen(&mut self, id: usize, gen: u32) -> bool {
        let m = &mut self.marks[id];
        if *m == gen {
            true
        } else {
            *m = gen;
            false
        }
    }
}

/// How the token ids given for a sample differ from the cached ones: a truncation (the given
/// ids are a prefix or a suffix of the cached ids, or the reverse), or a change at a position.
/// `what` names the given ids (`"the batch's ids"`).
pub fn describe_ids(what: &str, given: &[i32], cached: &[i32], cache: &str) -> String {
    let (g, c) = (given.len(), cached.len());
    if g < c && cached.starts_with(given) {
        return format!(
            "{what} are a prefix of the cached ids ({g} of {c} tokens): the sample was \
             truncated to {g} tokens after caching (a trainer's max_length={g}?); build the cache \
             with the same max_length (build_teacher_cache(max_length={g})), or raise max_length \
             to at least {c} (or None)"
        );
    }
    if g < c && cached.ends_with(given) {
        return format!(
            "{what} are a suffix of the cached ids (the last {g} of {c} tokens): the \
             sample was truncated from its start after caching (truncation keep_end, a \
             trainer's max_length={g}?), and teacher rows cached with the whole context do not \
             apply to it; build the cache with max_length={g}, truncation=\"keep_end\", or \
             raise max_length to at least {c} (or None)"
        );
    }
    if c < g && (given.starts_with(cached) || given.ends_with(cached)) {
        return format!(
            "the cached ids are a truncation of {what} ({c} of {g} tokens): the cache \
             was built with max_length={c} and the batch was not truncated to it; set the \
             trainer's max_length to {c} (with the cache's truncation side), or build the cache \
             without max_length"
        );
    }
    let t = given.iter().zip(cached).take_while(|(a, b)| a == b).count();
    let at = match (given.get(t), cached.get(t)) {
        (Some(a), Some(b)) => format!("batch id {a}, cached id {b}"),
        (Some(a), None) => format!("batch id {a}, the cached ids end"),
        (None, Some(b)) => format!("the batch's ids end, cached id {b}"),
        (None, None) => "equal ids but another hash".to_string(),
    };
    format!(
        "{what} differ from the ids the cache at {cache} was built from at position \
         {t} ({at}; {g} vs {c} tokens): the data or its tokenisation (tokenizer, chat template) \
         changed after caching; rebuild the cache or fix the dataset"
    )
}

fn label_text(l: Option<&i32>) -> String {
    match l {
        Some(&IGNORE_INDEX) => "-100 (not supervised)".to_string(),
        Some(l) => format!("{l} (supervised)"),
        None => "none".to_string(),
    }
}

/// How the labels given for a sample differ from the cached ones (same token ids).
pub fn describe_labels(given: &[i32], cached: &[i32]) -> String {
    let t = given.iter().zip(cached).take_while(|(a, b)| a == b).count();
    format!(
        "the batch's labels differ from the cached labels at position {t} (batch {}, cache {}; \
         {} vs {} supervised positions): the batch supervises other tokens than the cache was \
         built for (e.g. a trainer's assistant_only_loss or completion_only_loss that \
         target_sft.tokenize_sft did not apply); supervise the same tokens, or build the cache \
         from rows carrying these labels",
        label_text(given.get(t)),
        label_text(cached.get(t)),
        count_supervised(given),
        count_supervised(cached),
    )
}
