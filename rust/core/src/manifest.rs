//! The cache manifest, `manifest.json` (docs/FORMAT.md §Manifest).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::write_atomic;
use crate::stats::Fidelity;

pub const MANIFEST_NAME: &str = "manifest.json";
pub const CACHE_FORMAT: &str = "target-sft-cache";
/// The format version this library writes and the newest it reads. Version 2 added the
/// checksums of every region a reader uses (the shards' `checksums` tensor, the manifest's
/// `manifest_checksum`); version 1 caches are still read, with the weaker guarantee of
/// docs/FORMAT.md §7.
pub const FORMAT_VERSION: u32 = 3;
/// The first format version whose manifests and shards carry checksums of every region.
pub const CHECKSUMMED_VERSION: u32 = 2;
/// The first version whose compact codec has a codebook ladder (a rung byte per frame).
pub const LADDER_VERSION: u32 = 3;
/// The manifest's last field: XXH3-64 of the file's bytes before it (docs/FORMAT.md §1).
pub const MANIFEST_CHECKSUM: &str = "manifest_checksum";
/// What a `manifest_checksum` value starts with (then 16 lowercase hex digits).
pub const MANIFEST_CHECKSUM_PREFIX: &str = "xxh3-64:";

/// Append the `manifest_checksum` field to the pretty JSON `body` of a manifest (an object whose
/// last line is `}`): the checksum covers every byte before the field's opening quote.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let end = body
        .iter()
        .rposition(|&b| b == b'}')
        .expect("a manifest is a JSON object");
    let mut head = body[..end].to_vec();
    while head.last().is_some_and(u8::is_ascii_whitespace) {
        head.pop();
    }
    head.extend_from_slice(b",\n  ");
    let sum = crate::hash::region_checksum(&head);
    head.extend_from_slice(
        format!("\"{MANIFEST_CHECKSUM}\": \"{MANIFEST_CHECKSUM_PREFIX}{sum:016x}\"\n}}\n")
            .as_bytes(),
    );
    head
}

/// Check the seal of the manifest file `bytes` (already parsed into `value`), shown as `shown`
/// in errors. A `manifest_checksum` is verified whatever the version; from version 2 on it is
/// required. A manifest of a newer version whose seal does not verify is a version error (a
/// newer format may seal differently).
fn check_seal(bytes: &[u8], value: &Value, version: u64, shown: &str) -> Result<()> {
    let newer = version > u64::from(FORMAT_VERSION);
    let fail = |what: String| {
        if newer {
            Error::new(
                ErrorKind::Version,
                format!(
                    "{shown} was written with cache format version {version}, newer than the version {FORMAT_VERSION} this target-sft reads ({what} under this version's rules: if you expected no newer version, the file is damaged); upgrade target-sft"
                ),
            )
        } else {
            Error::corrupt(format!(
                "{shown}: {what}; the manifest was damaged or edited by hand — restore it from a copy or rebuild the cache (if you edited it on purpose, re-seal it with `target-sft cache verify --reseal DIR`, which accepts its current content)"
            ))
        }
    };
    let stored = value.get(MANIFEST_CHECKSUM);
    let Some(stored) = stored else {
        if version >= u64::from(CHECKSUMMED_VERSION) {
            return Err(fail(format!(
                "region manifest_checksum is missing (format version {version} requires it)"
            )));
        }
        return Ok(());
    };
    let needle = format!("\"{MANIFEST_CHECKSUM}\"");
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle.as_bytes());
    let want = stored
        .as_str()
        .and_then(|s| s.strip_prefix(MANIFEST_CHECKSUM_PREFIX))
        .filter(|h| h.len() == 16 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    let (Some(at), Some(want)) = (at, want) else {
        return Err(fail(format!(
            "region manifest_checksum is not \"{MANIFEST_CHECKSUM_PREFIX}\" + 16 lowercase hex digits"
        )));
    };
    let got = crate::hash::region_checksum(&bytes[..at]);
    if got != want {
        return Err(fail(format!(
            "region manifest body fails its checksum (stored {want:016x}, computed {got:016x})"
        )));
    }
    Ok(())
}

/// The manifest's top-level fields a reader needs (docs/FORMAT.md §1); `stats`, `created_by` and
/// (before version 2) `manifest_checksum` are optional.
pub const REQUIRED_FIELDS: &[&str] = &[
    "format",
    "format_version",
    "codec",
    "codec_params",
    "top_k",
    "vocab_size",
    "temperature",
    "tokenizer",
    "teacher",
    "complete",
    "num_records",
    "num_tokens",
    "num_supervised",
    "shards",
];
/// The counts every shard entry carries (non-negative integers).
const SHARD_COUNTS: &[&str] = &["records", "bytes", "tokens", "supervised"];
/// What a shard's whole-file `checksum` starts with (then 32 lowercase hex digits).
pub const FILE_CHECKSUM_PREFIX: &str = "xxh3-128:";

/// The 32 lowercase hex digits of a shard's `checksum` `"xxh3-128:<hex>"`, or `None` when it
/// does not have that form.
pub fn checksum_hex(checksum: &str) -> Option<&str> {
    checksum
        .strip_prefix(FILE_CHECKSUM_PREFIX)
        .filter(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// `v` as shown in an error: its JSON text, or `(absent)`.
fn show(v: Option<&Value>) -> String {
    v.map_or("(absent)".to_string(), Value::to_string)
}

/// The structural checks of a manifest `value` (whose `format` and `format_version` were checked)
/// that name what is wrong: every required field present, and every shard entry with a plain
/// file name, non-negative counts and a well-formed checksum. Type errors of the other fields are
/// left to the typed parse, which names their line and column.
fn check_fields(value: &Value, shown: &str) -> Result<()> {
    let missing: Vec<&str> = REQUIRED_FIELDS
        .iter()
        .copied()
        .filter(|k| value.get(k).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Error::format(format!(
            "{shown} lacks the manifest fields {missing:?}: it is not a complete target-sft manifest"
        )));
    }
    if let Some(role) = value.get("role") {
        if !role.as_str().is_some_and(|r| Role::NAMES.contains(&r)) {
            return Err(Error::format(format!(
                "{shown}: \"role\" is {}, expected \"teacher\" or \"reference\" (or no role: a teacher)",
                role
            )));
        }
    }
    let Some(shards) = value["shards"].as_array() else {
        return Err(Error::format(format!(
            "{shown}: \"shards\" is {}, not a list of shard entries",
            show(value.get("shards"))
        )));
    };
    for (i, s) in shards.iter().enumerate() {
        let file = s.get("file").and_then(Value::as_str).unwrap_or("");
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(Error::format(format!(
                "{shown}: shard {i}'s file name {} is not a plain file name",
                show(s.get("file"))
            )));
        }
        for k in SHARD_COUNTS {
            if s.get(k).and_then(Value::as_u64).is_none() {
                return Err(Error::format(format!(
                    "{shown}: shard {file:?} has no valid {k:?} (a non-negative integer; got {})",
                    show(s.get(k))
                )));
            }
        }
        let sum = s.get("checksum");
        if sum.and_then(Value::as_str).and_then(checksum_hex).is_none() {
            return Err(Error::format(format!(
                "{shown}: shard {file:?} has checksum {}, expected \"{FILE_CHECKSUM_PREFIX}\" followed by 32 lowercase hex digits",
                show(sum)
            )));
        }
    }
    Ok(())
}

/// One committed shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// File name relative to the cache directory.
    pub file: String,
    pub records: u64,
    pub bytes: u64,
    /// `"xxh3-128:<32 hex digits>"` of the whole file.
    pub checksum: String,
    pub tokens: u64,
    pub supervised: u64,
    /// What the shard's top-k kept and its codec cost (informational; absent in shards written
    /// before statistics existed and in shards adopted after a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Fidelity>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub codec: String,
    pub codec_params: Value,
    pub top_k: usize,
    pub vocab_size: usize,
    pub temperature: f64,
    /// Free-form description of the tokenizer; `fingerprint` identifies it.
    pub tokenizer: Value,
    /// Free-form description of the teacher: `name`, `revision`, `config_hash`, `dtype`.
    pub teacher: Value,
    /// False while a writer is still adding shards (or died before closing).
    pub complete: bool,
    pub num_records: u64,
    pub num_tokens: u64,
    pub num_supervised: u64,
    pub shards: Vec<ShardEntry>,
    /// Writer name and version (informational; optional for readers, docs/FORMAT.md §1).
    #[serde(default)]
    pub created_by: String,
    /// The fold of the shards' `stats` in shard order (informational; recomputed from the
    /// shards whenever the manifest is loaded or recounted, so it never disagrees with them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Fidelity>,
    /// What the cached model is to a training run (docs/FORMAT.md §1): absent in caches written
    /// before roles existed, which hold teachers.
    #[serde(default)]
    pub role: Role,
}

/// The manifest's `role`: which slot of a training run the cached model fills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The model the student is trained towards (`teacher_*` batch tensors).
    #[default]
    Teacher,
    /// A frozen reference (e.g. the student's base) for KL anchors and importance weights
    /// (`reference_*` batch tensors).
    Reference,
}

impl Role {
    /// The spellings the manifest and the APIs accept.
    pub const NAMES: [&'static str; 2] = ["teacher", "reference"];

    pub fn name(self) -> &'static str {
        match self {
            Role::Teacher => "teacher",
            Role::Reference => "reference",
        }
    }

    /// The role spelled `s`, else an input error naming `what` and the accepted spellings.
    pub fn parse(s: &str, what: &str) -> Result<Self> {
        match s {
            "teacher" => Ok(Role::Teacher),
            "reference" => Ok(Role::Reference),
            _ => Err(Error::input(format!(
                "{what} must be \"teacher\" or \"reference\", got {s:?}"
            ))),
        }
    }
}

/// The `teacher` field holding a content fingerprint of the weights; when present, the fields in
/// [`TEACHER_INFO`] are informational (docs/FORMAT.md §1).
pub const TEACHER_CONTENT: &str = "weights_hash";
/// Informational teacher fields: where the weights were loaded from and the hub revision.
pub const TEACHER_INFO: &[&str] = &["name", "revision"];
/// The `tokenizer` field holding a content fingerprint (vocabulary, merges, special tokens,
/// chat template).
pub const TOKENIZER_CONTENT: &str = "fingerprint";
/// Informational tokenizer fields: its path or hub name and its Python class.
pub const TOKENIZER_INFO: &[&str] = &["name", "class"];

/// The identifying part of a free-form `teacher`/`tokenizer` object: without its informational
/// fields when it carries the content fingerprint `content`; the whole value otherwise (a
/// description without a fingerprint can only be compared as a whole).
pub fn identity(v: &Value, content: &str, info: &[&str]) -> Value {
    match v {
        Value::Object(m) if m.contains_key(content) => Value::Object(
            m.iter()
                .filter(|(k, _)| !info.contains(&k.as_str()))
                .map(|(k, x)| (k.clone(), x.clone()))
                .collect(),
        ),
        _ => v.clone(),
    }
}

/// `field = value` for the first (sub)field in which two settings differ: for objects, the first
/// key (sorted) whose values differ, e.g. `teacher.weights_hash = "…" vs "…"`.
pub fn first_difference(field: &str, ours: &Value, theirs: &Value) -> String {
    if let (Value::Object(a), Value::Object(b)) = (ours, theirs) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let (x, y) = (a.get(k), b.get(k));
            if x != y {
                let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
                return format!("{field}.{k} = {} vs {}", show(x), show(y));
            }
        }
    }
    format!("{field} = {ours} vs {theirs}")
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_named(dir, MANIFEST_NAME)
    }

    /// Load the manifest file `name` of `dir` (a multi-writer build keeps one per writer).
    pub fn load_named(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    ErrorKind::Format,
                    format!(
                        "{} has no {name}: it is not a target-sft cache (or its writer died before the first shard was committed)",
                        dir.display()
                    ),
                )
            } else {
                Error::io("cannot read", &path, e)
            }
        })?;
        Self::from_bytes(&bytes, &path.display().to_string(), true)
    }

    /// Parse and check the manifest file `bytes`, shown as `shown` in errors. With `sealed`
    /// false, its `manifest_checksum` is not verified (re-sealing a hand-edited manifest).
    pub fn from_bytes(bytes: &[u8], shown: &str, sealed: bool) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("{} is not valid JSON ({e})", shown)))?;
        if value.get("format").and_then(Value::as_str) != Some(CACHE_FORMAT) {
            return Err(Error::format(format!(
                "{} is not a target-sft cache manifest (its \"format\" field is not {CACHE_FORMAT:?})",
                shown
            )));
        }
        let version = value
            .get("format_version")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if sealed {
            check_seal(bytes, &value, version, shown)?;
        }
        if version > u64::from(FORMAT_VERSION) {
            return Err(Error::new(
                ErrorKind::Version,
                format!(
                    "{} was written with cache format version {version}, newer than the version {FORMAT_VERSION} this target-sft reads; upgrade target-sft",
                    shown
                ),
            ));
        }
        if version == 0 {
            return Err(Error::format(format!(
                "{} has no valid format_version",
                shown
            )));
        }
        check_fields(&value, shown)?;
        let mut m: Manifest = serde_json::from_value(value).map_err(|_| {
            // the same parse from the bytes says where (line and column) the bad field is
            let e = serde_json::from_slice::<Manifest>(bytes).err();
            Error::format(format!(
                "{shown} does not have the manifest's fields ({})",
                e.map_or_else(
                    || "a field has the wrong type".to_string(),
                    |e| e.to_string()
                )
            ))
        })?;
        let sum = |f: fn(&ShardEntry) -> u64| m.shards.iter().map(f).sum::<u64>();
        if sum(|s| s.records) != m.num_records
            || sum(|s| s.tokens) != m.num_tokens
            || sum(|s| s.supervised) != m.num_supervised
        {
            return Err(Error::corrupt(format!(
                "{}: the totals do not equal the sums over its shards",
                shown
            )));
        }
        m.stats = Fidelity::fold(m.shards.iter().filter_map(|s| s.stats.as_ref()));
        Ok(m)
    }

    pub fn store(&self, dir: &Path) -> Result<()> {
        self.store_named(dir, MANIFEST_NAME)
    }

    pub fn store_named(&self, dir: &Path, name: &str) -> Result<()> {
        write_atomic(&dir.join(name), &[&self.to_bytes()])
    }

    /// The manifest file's bytes: pretty JSON, sealed with its `manifest_checksum` (version 2;
    /// a manifest written by this library is always of the current version).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.format_version = FORMAT_VERSION;
        seal(&serde_json::to_vec_pretty(&m).expect("manifest serialises"))
    }

    /// Re-seal the manifest file `name` of `dir` after a deliberate edit: parse it without
    /// verifying its `manifest_checksum` (every other check applies) and store it sealed.
    pub fn reseal(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io("cannot read", &path, e))?;
        let m = Self::from_bytes(&bytes, &path.display().to_string(), false)?;
        m.store_named(dir, name)?;
        Ok(m)
    }

    /// The settings two parts of one cache must share, as (field, value) pairs. `tokenizer` and
    /// `teacher` enter through their identifying fields only ([`identity`]): the same weights
    /// loaded from `./t`, `/abs/t` or a copy on another node are the same teacher.
    pub fn settings(&self) -> [(&'static str, Value); 8] {
        [
            ("role", Value::from(self.role.name())),
            ("codec", Value::from(self.codec.clone())),
            ("codec_params", self.codec_params.clone()),
            ("top_k", Value::from(self.top_k)),
            ("vocab_size", Value::from(self.vocab_size)),
            ("temperature", Value::from(self.temperature)),
            (
                "tokenizer",
                identity(&self.tokenizer, TOKENIZER_CONTENT, TOKENIZER_INFO),
            ),
            (
                "teacher",
                identity(&self.teacher, TEACHER_CONTENT, TEACHER_INFO),
            ),
        ]
    }

    /// The first setting in which `other` differs from `self`, as an error naming it.
    pub fn check_same_settings(&self, other: &Manifest, what: &str) -> Result<()> {
        for ((field, ours), (_, theirs)) in self.settings().iter().zip(other.settings().iter()) {
            if ours != theirs {
                return Err(Error::mismatch(format!(
                    "{what}: {} (this part vs the first); all parts of one cache must be built with the same settings",
                    first_difference(field, theirs, ours)
                )));
            }
        }
        Ok(())
    }

    /// Merge the per-writer manifests `parts` of `dir` (in order) into `dir/manifest.json`:
    /// their shards concatenated, totals recounted, `complete` as given. All parts must share
    /// every setting and no shard may be listed twice.
    pub fn merge(dir: &Path, parts: &[String], complete: bool) -> Result<Manifest> {
        let Some((first, rest)) = parts.split_first() else {
            return Err(Error::input("merge needs at least one manifest"));
        };
        let mut merged = Self::load_named(dir, first)?;
        let mut files: std::collections::HashSet<String> =
            merged.shards.iter().map(|s| s.file.clone()).collect();
        for name in rest {
            let part = Self::load_named(dir, name)?;
            merged.check_same_settings(&part, &format!("{}", dir.join(name).display()))?;
            for s in part.shards {
                if !files.insert(s.file.clone()) {
                    return Err(Error::corrupt(format!(
                        "{}: shard {} is listed by two writers' manifests",
                        dir.display(),
                        s.file
                    )));
                }
                merged.shards.push(s);
            }
        }
        merged.complete = complete;
        merged.recount();
        merged.store(dir)?;
        Ok(merged)
    }

    pub fn recount(&mut self) {
        self.num_records = self.shards.iter().map(|s| s.records).sum();
        self.num_tokens = self.shards.iter().map(|s| s.tokens).sum();
        self.num_supervised = self.shards.iter().map(|s| s.supervised).sum();
        self.stats = Fidelity::fold(self.shards.iter().filter_map(|s| s.stats.as_ref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: CACHE_FORMAT.into(),
            format_version: FORMAT_VERSION,
            codec: "exact".into(),
            codec_params: serde_json::json!({"zstd_level": 3}),
            top_k: 4,
            vocab_size: 100,
            temperature: 1.0,
            tokenizer: serde_json::json!({"fingerprint": "f"}),
            teacher: serde_json::json!({"name": "t"}),
            complete: true,
            num_records: 0,
            num_tokens: 0,
            num_supervised: 0,
            shards: vec![],
            created_by: "test".into(),
            stats: None,
            role: Role::Teacher,
        }
    }

    #[test]
    fn role_is_teacher_when_absent_and_checked_when_present() {
        let mut v = serde_json::to_value(sample()).unwrap();
        let parse = |v: &Value| Manifest::from_bytes(&serde_json::to_vec(v).unwrap(), "m", false);
        v.as_object_mut().unwrap().remove("role");
        assert_eq!(parse(&v).unwrap().role, Role::Teacher);
        v["role"] = "reference".into();
        assert_eq!(parse(&v).unwrap().role, Role::Reference);
        for bad in [Value::from("Teacher"), Value::from(1), Value::Null] {
            v["role"] = bad.clone();
            let e = parse(&v).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Format, "{e}");
            assert!(e.message.contains(&format!("\"role\" is {bad}")), "{e}");
        }
        // a different role is a different setting: no append or merge across roles
        let mut r = sample();
        r.role = Role::Reference;
        let e = sample().check_same_settings(&r, "part").unwrap_err();
        assert!(
            e.message.contains(r#"role = "reference" vs "teacher""#),
            "{e}"
        );
        assert_eq!(Role::parse("reference", "role").unwrap(), Role::Reference);
        assert!(Role::parse("ref", "role")
            .unwrap_err()
            .message
            .contains("role must be"));
    }

    #[test]
    fn the_seal_covers_every_byte_before_it() {
        let bytes = sample().to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.ends_with("\"\n}\n") && text.contains(",\n  \"manifest_checksum\": \"xxh3-64:")
        );
        assert_eq!(Manifest::from_bytes(&bytes, "m", true).unwrap(), sample());
        // every byte flip before the closing brace is refused or changes nothing
        for at in 0..bytes.len() - 2 {
            let mut b = bytes.clone();
            b[at] ^= 0x01;
            if let Ok(m) = Manifest::from_bytes(&b, "m", true) {
                assert_eq!(m, sample(), "byte {at}");
            }
        }
        // an edit is refused, saying how to re-seal; without the check it parses
        let edited = text.replace("\"t\"", "\"u\"");
        let e = Manifest::from_bytes(edited.as_bytes(), "m", true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corruption);
        assert!(e
            .message
            .contains("m: region manifest body fails its checksum"));
        assert!(e.message.contains("target-sft cache verify --reseal"));
        assert!(Manifest::from_bytes(edited.as_bytes(), "m", false).is_ok());
        // version 2 requires the seal; version 1 has none
        let mut v: Value = serde_json::from_slice(&bytes).unwrap();
        v.as_object_mut().unwrap().remove(MANIFEST_CHECKSUM);
        let bare = serde_json::to_vec(&v).unwrap();
        let e = Manifest::from_bytes(&bare, "m", true).unwrap_err();
        assert!(
            e.message.contains("region manifest_checksum is missing"),
            "{e}"
        );
        v["format_version"] = Value::from(1);
        let old = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            Manifest::from_bytes(&old, "m", true)
                .unwrap()
                .format_version,
            1
        );
    }

    #[test]
    fn every_field_check_names_what_is_wrong() {
        let mut m = sample();
        m.shards.push(ShardEntry {
            file: "shard-0.safetensors".into(),
            records: 2,
            bytes: 10,
            checksum: format!("{FILE_CHECKSUM_PREFIX}{}", "0a".repeat(16)),
            tokens: 5,
            supervised: 3,
            stats: None,
        });
        m.recount();
        let good: Value = serde_json::to_value(&m).unwrap();
        let check = |edit: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            edit(&mut v);
            Manifest::from_bytes(&serde_json::to_vec(&v).unwrap(), "m", false)
        };
        assert_eq!(check(&|_| {}).unwrap(), m);
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, ErrorKind, &str)> = vec![
            (
                Box::new(|v| v["format"] = "other".into()),
                ErrorKind::Format,
                "m is not a target-sft cache manifest",
            ),
            (
                Box::new(|v| v["format_version"] = Value::from(-1)),
                ErrorKind::Format,
                "m has no valid format_version",
            ),
            (
                Box::new(|v| v["format_version"] = Value::from(FORMAT_VERSION + 1)),
                ErrorKind::Version,
                "newer than the version",
            ),
            (
                Box::new(|v| {
                    let o = v.as_object_mut().unwrap();
                    o.remove("top_k");
                    o.remove("teacher");
                }),
                ErrorKind::Format,
                r#"m lacks the manifest fields ["top_k", "teacher"]"#,
            ),
            (
                Box::new(|v| v["shards"] = Value::from(3)),
                ErrorKind::Format,
                r#"m: "shards" is 3, not a list"#,
            ),
            (
                Box::new(|v| v["shards"][0]["file"] = "../x".into()),
                ErrorKind::Format,
                r#"m: shard 0's file name "../x" is not a plain file name"#,
            ),
            (
                Box::new(|v| v["shards"][0]["file"] = "".into()),
                ErrorKind::Format,
                "is not a plain file name",
            ),
            (
                Box::new(|v| v["shards"][0]["bytes"] = Value::from(-1)),
                ErrorKind::Format,
                r#"m: shard "shard-0.safetensors" has no valid "bytes" (a non-negative integer; got -1)"#,
            ),
            (
                Box::new(|v| v["shards"][0]["checksum"] = "xxh3-128:ABC".into()),
                ErrorKind::Format,
                r#"has checksum "xxh3-128:ABC", expected "xxh3-128:" followed by 32"#,
            ),
            (
                Box::new(|v| v["top_k"] = "four".into()),
                ErrorKind::Format,
                "m does not have the manifest's fields (invalid type: string \"four\", expected usize at line",
            ),
            (
                Box::new(|v| v["num_records"] = Value::from(3)),
                ErrorKind::Corruption,
                "the totals do not equal the sums",
            ),
        ];
        for (edit, kind, msg) in cases {
            let e = check(&*edit).unwrap_err();
            assert_eq!(e.kind, kind, "{e}");
            assert!(e.message.contains(msg), "{e}");
        }
    }
}
