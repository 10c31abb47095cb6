//! The journal of in-flight operations: what a multi-step operation has done and how to undo
//! it, durable before each step runs, so that the next command after a crash can finish or
//! undo it.
//!
//! An operation is a `Begin` record (its id, kind and domain), then for each step a `Step`
//! record carrying the step's undo data (written *before* the step acts), a `Done` or
//! `Undone` mark per step, and an `End` record. [`Journal::pending`] returns the operations
//! without an `End`: after a crash, those are to be recovered, undoing their steps in reverse
//! order. The step type `S` is the caller's (the capture state machine's); it only needs to
//! be serde-serializable.
//!
//! # Record format
//!
//! The file is a sequence of records, appended and fsynced (`fdatasync`) one at a time;
//! nothing is ever rewritten in place. All integers are little-endian.
//!
//! | offset | size | field | meaning |
//! |---:|---:|---|---|
//! | 0 | 4 | magic | `VSJR` (`56 53 4a 52`) |
//! | 4 | 2 | version | format version, `1`; a reader refuses a version it does not know |
//! | 6 | 2 | reserved | `0` |
//! | 8 | 4 | length | payload length N in bytes, at most [`MAX_PAYLOAD`] |
//! | 12 | 4 | crc | CRC-32 (IEEE 802.3, as zlib's `crc32`) of bytes 0..12 followed by the payload |
//! | 16 | N | payload | one JSON object: an [`Entry`] (`{"type":"begin",...}`) |
//!
//! The next record starts at offset 16 + N.
//!
//! # Reading and damage
//!
//! [`read_records`] reads records until the first one that is incomplete or damaged and
//! reports it as a [`Damage`]: a short header or payload (a torn write), a wrong magic, an
//! unknown version, a length over the limit, a CRC mismatch, or a payload that is not a valid
//! entry. Nothing after it is trusted. A damaged record that reaches the end of the file (or
//! is followed only by zero bytes) is a *torn tail*: the crash interrupted its write, so its
//! operation step never started. [`Journal::open`] truncates a torn tail and carries on;
//! damage followed by more data is refused ([`ErrorKind::JournalCorrupt`]) and an unknown
//! version too ([`ErrorKind::UnsupportedVersion`]), leaving the file untouched for a person
//! to look at.
//!
//! Journal files are created 0600.

use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The record magic.
pub const MAGIC: [u8; 4] = *b"VSJR";
/// The record format version written.
pub const VERSION: u16 = 1;
/// The size of a record header.
pub const HEADER_LEN: usize = 16;
/// The largest payload accepted (16 MiB): a larger length is damage, not an allocation.
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// An operation's id, unique within a journal file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(pub u64);

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every step done and the metadata committed.
    Committed,
    /// Undone: every step that acted was undone.
    RolledBack,
    /// Given up: some steps could not be undone (reported to the user).
    Abandoned,
}

/// One journal record's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Entry<S> {
    /// An operation starts.
    Begin {
        /// Its id.
        op: OpId,
        /// What it is (`create`, `delete`, `revert`, ...).
        kind: String,
        /// The domain it concerns.
        domain: String,
    },
    /// A step is about to act; `undo` says how to undo it.
    Step {
        /// The operation.
        op: OpId,
        /// The step's index within the operation, from 0.
        step: u32,
        /// The step and its undo data.
        undo: S,
    },
    /// The step acted.
    Done {
        /// The operation.
        op: OpId,
        /// The step.
        step: u32,
    },
    /// The step was undone.
    Undone {
        /// The operation.
        op: OpId,
        /// The step.
        step: u32,
    },
    /// The operation is over.
    End {
        /// The operation.
        op: OpId,
        /// How it ended.
        outcome: Outcome,
    },
}

impl<S> Entry<S> {
    /// The operation the record belongs to.
    pub fn op(&self) -> OpId {
        match self {
            Entry::Begin { op, .. }
            | Entry::Step { op, .. }
            | Entry::Done { op, .. }
            | Entry::Undone { op, .. }
            | Entry::End { op, .. } => *op,
        }
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Recorded, perhaps started, not known to have acted: undo it if its effect exists.
    Recorded,
    /// It acted.
    Done,
    /// It was undone.
    Undone,
}

/// A step of a pending operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord<S> {
    /// Its index within the operation.
    pub index: u32,
    /// The step and its undo data.
    pub undo: S,
    /// Where it stands.
    pub state: StepState,
}

/// An operation without an `End` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingOp<S> {
    /// Its id.
    pub id: OpId,
    /// What it is.
    pub kind: String,
    /// The domain it concerns.
    pub domain: String,
    /// Its steps in the order they were recorded.
    pub steps: Vec<StepRecord<S>>,
}

/// What is wrong with the first unreadable record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DamageKind {
    /// Fewer than 16 bytes of header.
    TruncatedHeader,
    /// The magic is not `VSJR`.
    BadMagic,
    /// A version this code does not know.
    UnsupportedVersion(u16),
    /// A length over [`MAX_PAYLOAD`].
    TooLong(u32),
    /// The payload is shorter than its length says.
    TruncatedPayload,
    /// The CRC does not match.
    BadCrc,
    /// The CRC matches but the payload is not a valid entry.
    BadPayload(String),
}

/// The first unreadable record of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Its offset in the file.
    pub offset: u64,
    /// What is wrong.
    pub kind: DamageKind,
    /// Nothing but zero bytes follows the damaged record (or it reaches the end): a torn
    /// write.
    pub torn_tail: bool,
}

/// What [`read_records`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReport<S> {
    /// The good records, with their offsets.
    pub records: Vec<(u64, Entry<S>)>,
    /// The length of the good prefix.
    pub valid_len: u64,
    /// The first damaged record, if any.
    pub damage: Option<Damage>,
}

/// Encodes one record.
pub fn encode_record<S: Serialize>(entry: &Entry<S>) -> Result<Vec<u8>> {
    let payload = serde_json::to_vec(entry).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            "journal record",
            "cannot encode",
        )
        .with_source(e)
    })?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                "journal record",
                format!(
                    "{} bytes is over the {MAX_PAYLOAD}-byte limit",
                    payload.len()
                ),
            )
        })?;
    let mut rec = Vec::with_capacity(HEADER_LEN + payload.len());
    rec.extend_from_slice(&MAGIC);
    rec.extend_from_slice(&VERSION.to_le_bytes());
    rec.extend_from_slice(&0u16.to_le_bytes());
    rec.extend_from_slice(&len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[..12]);
    h.update(&payload);
    rec.extend_from_slice(&h.finalize().to_le_bytes());
    rec.extend_from_slice(&payload);
    Ok(rec)
}

/// Decodes the records of a journal's bytes, stopping at the first damaged one.
pub fn decode_records<S: DeserializeOwned>(bytes: &[u8]) -> ReadReport<S> {
    let mut records = Vec::new();
    let mut at = 0usize;
    let damage = 'records: loop {
        if at == bytes.len() {
            break None;
        }
        let rest = &bytes[at..];
        let kind = 'rec: {
            let Some(h) = rest.get(..HEADER_LEN) else {
                break 'rec DamageKind::TruncatedHeader;
            };
            if h[..4] != MAGIC {
                break 'rec DamageKind::BadMagic;
            }
            let version = u16::from_le_bytes([h[4], h[5]]);
            if version != VERSION {
                break 'rec DamageKind::UnsupportedVersion(version);
            }
            let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
            if len > MAX_PAYLOAD {
                break 'rec DamageKind::TooLong(len);
            }
            let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
            let Some(payload) = rest.get(HEADER_LEN..HEADER_LEN + len as usize) else {
                break 'rec DamageKind::TruncatedPayload;
            };
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&h[..12]);
            hasher.update(payload);
            if hasher.finalize() != crc {
                break 'rec DamageKind::BadCrc;
            }
            match serde_json::from_slice::<Entry<S>>(payload) {
                Ok(e) => {
                    records.push((at as u64, e));
                    at += HEADER_LEN + len as usize;
                    continue 'records;
                }
                Err(e) => break 'rec DamageKind::BadPayload(e.to_string()),
            }
        };
        // How far the damaged record claims to reach; beyond that, only zeros is torn.
        let claimed = rest
            .get(8..12)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .filter(|l| *l <= MAX_PAYLOAD as usize && !matches!(kind, DamageKind::BadMagic))
            .map_or(0, |l| HEADER_LEN + l);
        let after = rest.get(claimed..).unwrap_or(&[]);
        let torn_tail = match kind {
            // Both reach the end of the file by definition.
            DamageKind::TruncatedHeader | DamageKind::TruncatedPayload => true,
            DamageKind::UnsupportedVersion(_) => false,
            _ => after.iter().all(|b| *b == 0) || rest.iter().all(|b| *b == 0),
        };
        break Some(Damage {
            offset: at as u64,
            kind,
            torn_tail,
        });
    };
    ReadReport {
        records,
        valid_len: at as u64,
        damage,
    }
}

/// Reads a journal file (see the module doc); a missing file reads as empty.
pub fn read_records<S: DeserializeOwned>(path: &Path) -> Result<ReadReport<S>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(|e| Error::io("cannot read", path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot open", path, e)),
    }
    Ok(decode_records(&bytes))
}

/// An open journal file, appended to one fsynced record at a time.
#[derive(Debug)]
pub struct Journal<S> {
    file: File,
    path: PathBuf,
    next_op: u64,
    pending: BTreeMap<OpId, PendingOp<S>>,
    repaired: Option<Damage>,
}

impl<S: Serialize + DeserializeOwned + Clone> Journal<S> {
    /// Opens (or creates, 0600) the journal at `path` and replays it. A torn tail is cut
    /// off (see [`Journal::repaired`]); other damage or an unknown version is an error.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let existed = path.exists();
        let report = read_records::<S>(&path)?;
        if let Some(d) = &report.damage {
            if let DamageKind::UnsupportedVersion(v) = d.kind {
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    path.display().to_string(),
                    format!("journal record version {v}, this program knows {VERSION}"),
                )
                .with_offset(d.offset));
            }
            if !d.torn_tail {
                return Err(Error::new(
                    ErrorKind::JournalCorrupt,
                    path.display().to_string(),
                    format!("damaged record ({:?}) followed by more data", d.kind),
                )
                .with_offset(d.offset));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(fsutil::FILE_MODE)
            .open(&path)
            .map_err(|e| Error::io("cannot open", &path, e))?;
        if report.damage.is_some() {
            file.set_len(report.valid_len)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("cannot truncate the torn tail of", &path, e))?;
        }
        if !existed {
            fsutil::sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        }
        let mut j = Journal {
            file,
            path,
            next_op: 1,
            pending: BTreeMap::new(),
            repaired: report.damage,
        };
        for (_, e) in report.records {
            j.apply(e);
        }
        Ok(j)
    }

    /// The torn tail [`Journal::open`] cut off, if it did.
    pub fn repaired(&self) -> Option<&Damage> {
        self.repaired.as_ref()
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn apply(&mut self, e: Entry<S>) {
        self.next_op = self.next_op.max(e.op().0 + 1);
        match e {
            Entry::Begin { op, kind, domain } => {
                self.pending.insert(
                    op,
                    PendingOp {
                        id: op,
                        kind,
                        domain,
                        steps: Vec::new(),
                    },
                );
            }
            Entry::Step { op, step, undo } => {
                if let Some(p) = self.pending.get_mut(&op) {
                    p.steps.push(StepRecord {
                        index: step,
                        undo,
                        state: StepState::Recorded,
                    });
                }
            }
            Entry::Done { op, step } => self.mark(op, step, StepState::Done),
            Entry::Undone { op, step } => self.mark(op, step, StepState::Undone),
            Entry::End { op, .. } => {
                self.pending.remove(&op);
            }
        }
    }

    fn mark(&mut self, op: OpId, step: u32, state: StepState) {
        if let Some(s) = self
            .pending
            .get_mut(&op)
            .and_then(|p| p.steps.iter_mut().find(|s| s.index == step))
        {
            s.state = state;
        }
    }

    fn append(&mut self, e: &Entry<S>) -> Result<()> {
        let rec = encode_record(e)?;
        self.file
            .write_all(&rec)
            .and_then(|()| self.file.sync_data())
            .map_err(|err| Error::io("cannot append to", &self.path, err))
    }

    fn check(&self, op: OpId, step: Option<u32>) -> Result<()> {
        let bad = |why: String| {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("journal operation {}", op.0),
                why,
            ))
        };
        let Some(p) = self.pending.get(&op) else {
            return bad("is not pending (unknown or finished)".into());
        };
        if let Some(i) = step {
            if !p.steps.iter().any(|s| s.index == i) {
                return bad(format!("has no step {i}"));
            }
        }
        Ok(())
    }

    /// Starts an operation: its `Begin` record is durable when this returns.
    pub fn begin(&mut self, kind: &str, domain: &str) -> Result<OpId> {
        let op = OpId(self.next_op);
        let e = Entry::Begin {
            op,
            kind: kind.to_string(),
            domain: domain.to_string(),
        };
        self.append(&e)?;
        self.apply(e);
        Ok(op)
    }

    /// Records a step and its undo data before the step acts; returns its index.
    pub fn record_step(&mut self, op: OpId, undo: S) -> Result<u32> {
        self.check(op, None)?;
        let step = self.pending[&op].steps.len() as u32;
        let e = Entry::Step { op, step, undo };
        self.append(&e)?;
        self.apply(e);
        Ok(step)
    }

    /// Marks a step as having acted.
    pub fn step_done(&mut self, op: OpId, step: u32) -> Result<()> {
        self.check(op, Some(step))?;
        let e = Entry::Done { op, step };
        self.append(&e)?;
        self.apply(e);
        Ok(())
    }

    /// Marks a step as undone.
    pub fn step_undone(&mut self, op: OpId, step: u32) -> Result<()> {
        self.check(op, Some(step))?;
        let e = Entry::Undone { op, step };
        self.append(&e)?;
        self.apply(e);
        Ok(())
    }

    /// Ends an operation: it is no longer pending.
    pub fn finish(&mut self, op: OpId, outcome: Outcome) -> Result<()> {
        self.check(op, None)?;
        let e = Entry::End { op, outcome };
        self.append(&e)?;
        self.apply(e);
        Ok(())
    }

    /// The operations without an `End`, oldest first: what recovery must finish or undo.
    pub fn pending(&self) -> Vec<&PendingOp<S>> {
        self.pending.values().collect()
    }

    /// Rewrites the journal with only the pending operations (atomically: temporary file,
    /// fsync, rename, directory fsync), so that it does not grow without bound. Operation ids
    /// keep increasing across compactions.
    pub fn compact(&mut self) -> Result<()> {
        let mut bytes = Vec::new();
        // Keep the id high-water mark: an ended marker operation when nothing is pending.
        if self.pending.is_empty() && self.next_op > 1 {
            let op = OpId(self.next_op - 1);
            for e in [
                Entry::<S>::Begin {
                    op,
                    kind: "compacted".into(),
                    domain: String::new(),
                },
                Entry::End {
                    op,
                    outcome: Outcome::Committed,
                },
            ] {
                bytes.extend(encode_record(&e)?);
            }
        }
        for p in self.pending.values() {
            bytes.extend(encode_record(&Entry::<S>::Begin {
                op: p.id,
                kind: p.kind.clone(),
                domain: p.domain.clone(),
            })?);
            for s in &p.steps {
                bytes.extend(encode_record(&Entry::Step {
                    op: p.id,
                    step: s.index,
                    undo: s.undo.clone(),
                })?);
                let mark = match s.state {
                    StepState::Recorded => None,
                    StepState::Done => Some(Entry::<S>::Done {
                        op: p.id,
                        step: s.index,
                    }),
                    StepState::Undone => Some(Entry::Undone {
                        op: p.id,
                        step: s.index,
                    }),
                };
                if let Some(m) = mark {
                    bytes.extend(encode_record(&m)?);
                }
            }
        }
        fsutil::write_atomic(&self.path, &bytes)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io("cannot reopen", &self.path, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    enum Step {
        Overlay { path: String },
        Paused,
    }

    type J = Journal<Step>;

    fn three_records() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(
            encode_record(&Entry::<Step>::Begin {
                op: OpId(1),
                kind: "create".into(),
                domain: "vm".into(),
            })
            .unwrap(),
        );
        b.extend(
            encode_record(&Entry::Step {
                op: OpId(1),
                step: 0,
                undo: Step::Paused,
            })
            .unwrap(),
        );
        b.extend(
            encode_record(&Entry::<Step>::Done {
                op: OpId(1),
                step: 0,
            })
            .unwrap(),
        );
        b
    }

    fn offsets(b: &[u8]) -> Vec<usize> {
        decode_records::<Step>(b)
            .records
            .iter()
            .map(|(o, _)| *o as usize)
            .collect()
    }

    #[test]
    fn record_layout_matches_the_table() {
        let e = Entry::<Step>::Done {
            op: OpId(7),
            step: 2,
        };
        let r = encode_record(&e).unwrap();
        let payload = br#"{"type":"done","op":7,"step":2}"#;
        assert_eq!(&r[0..4], b"VSJR");
        assert_eq!(&r[4..6], &[1, 0]);
        assert_eq!(&r[6..8], &[0, 0]);
        assert_eq!(&r[8..12], &(payload.len() as u32).to_le_bytes());
        let mut crc_in = r[..12].to_vec();
        crc_in.extend_from_slice(payload);
        assert_eq!(&r[12..16], &crc32fast::hash(&crc_in).to_le_bytes());
        assert_eq!(&r[16..], payload);
        // zlib's CRC-32 check value, so other tools can verify records.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn clean_journal_reads_fully() {
        let b = three_records();
        let r = decode_records::<Step>(&b);
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.valid_len, b.len() as u64);
        assert_eq!(r.damage, None);
    }

    fn damage(b: &[u8]) -> (usize, Damage) {
        let r = decode_records::<Step>(b);
        (r.records.len(), r.damage.expect("damage"))
    }

    #[test]
    fn truncated_header() {
        let b = three_records();
        let third = offsets(&b)[2];
        let (good, d) = damage(&b[..third + 7]);
        assert_eq!(
            (good, d.kind, d.torn_tail),
            (2, DamageKind::TruncatedHeader, true)
        );
        assert_eq!(d.offset, third as u64);
    }

    #[test]
    fn truncated_payload() {
        let b = three_records();
        let (good, d) = damage(&b[..b.len() - 1]);
        assert_eq!(
            (good, d.kind, d.torn_tail),
            (2, DamageKind::TruncatedPayload, true)
        );
    }

    #[test]
    fn bad_crc() {
        let mut b = three_records();
        let n = b.len();
        b[n - 3] ^= 0x01;
        let (good, d) = damage(&b);
        assert_eq!((good, d.kind, d.torn_tail), (2, DamageKind::BadCrc, true));
        // The same damage in the middle is not a torn tail.
        let mut b = three_records();
        let second = offsets(&b)[1];
        b[second + HEADER_LEN + 2] ^= 0x20;
        let (good, d) = damage(&b);
        assert_eq!((good, d.kind, d.torn_tail), (1, DamageKind::BadCrc, false));
    }

    #[test]
    fn bad_magic() {
        let mut b = three_records();
        let second = offsets(&b)[1];
        b[second] = b'X';
        let (good, d) = damage(&b);
        assert_eq!(
            (good, d.kind, d.torn_tail),
            (1, DamageKind::BadMagic, false)
        );
    }

    #[test]
    fn unsupported_version() {
        let mut b = three_records();
        let third = offsets(&b)[2];
        b[third + 4] = 2;
        let (good, d) = damage(&b);
        assert_eq!(
            (good, d.kind, d.torn_tail),
            (2, DamageKind::UnsupportedVersion(2), false)
        );
    }

    #[test]
    fn too_long() {
        let mut b = three_records();
        let third = offsets(&b)[2];
        b[third + 8..third + 12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let (good, d) = damage(&b);
        assert_eq!((good, d.kind), (2, DamageKind::TooLong(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn bad_payload_with_a_good_crc() {
        let mut b = three_records();
        let payload = b"{\"type\":\"nonsense\"}";
        let mut rec = Vec::new();
        rec.extend_from_slice(&MAGIC);
        rec.extend_from_slice(&VERSION.to_le_bytes());
        rec.extend_from_slice(&[0, 0]);
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&rec[..12]);
        h.update(payload);
        rec.extend_from_slice(&h.finalize().to_le_bytes());
        rec.extend_from_slice(payload);
        b.extend(rec);
        let (good, d) = damage(&b);
        assert_eq!(good, 3);
        assert!(matches!(d.kind, DamageKind::BadPayload(_)), "{d:?}");
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut b = three_records();
        b.extend([0u8; 4096]);
        let (good, d) = damage(&b);
        assert_eq!((good, d.torn_tail), (3, true));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let b = three_records();
        for cut in 0..b.len() {
            for flip in [0usize, 5, 9, 13, 20] {
                let mut c = b[..cut].to_vec();
                if let Some(x) = c.get_mut(flip) {
                    *x ^= 0xff;
                }
                let _ = decode_records::<Step>(&c);
            }
        }
    }

    #[test]
    fn operations_round_trip_and_pending_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = J::open(&path).unwrap();
        let a = j.begin("create", "vm1").unwrap();
        let s0 = j.record_step(a, Step::Paused).unwrap();
        j.step_done(a, s0).unwrap();
        let s1 = j
            .record_step(
                a,
                Step::Overlay {
                    path: "/img/o1".into(),
                },
            )
            .unwrap();
        let b = j.begin("delete", "vm2").unwrap();
        j.finish(b, Outcome::Committed).unwrap();
        assert_eq!(
            j.finish(b, Outcome::Committed).unwrap_err().kind(),
            ErrorKind::InvalidOperation
        );
        assert_eq!(
            j.step_done(a, 9).unwrap_err().kind(),
            ErrorKind::InvalidOperation
        );
        drop(j);

        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut j = J::open(&path).unwrap();
        assert_eq!(j.repaired(), None);
        let p = j.pending();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].id, p[0].kind.as_str(), p[0].domain.as_str()),
            (a, "create", "vm1")
        );
        assert_eq!(
            p[0].steps,
            vec![
                StepRecord {
                    index: 0,
                    undo: Step::Paused,
                    state: StepState::Done
                },
                StepRecord {
                    index: s1,
                    undo: Step::Overlay {
                        path: "/img/o1".into()
                    },
                    state: StepState::Recorded
                },
            ]
        );
        // Recovery undoes in reverse order and ends the operation.
        j.step_undone(a, s1).unwrap();
        j.step_undone(a, s0).unwrap();
        j.finish(a, Outcome::RolledBack).unwrap();
        let c = j.begin("create", "vm1").unwrap();
        assert!(c.0 > b.0, "ids keep increasing");
        drop(j);
        let j = J::open(&path).unwrap();
        assert_eq!(j.pending().len(), 1);
        let r = read_records::<Step>(&path).unwrap();
        assert_eq!(r.records.len(), 10, "refused calls wrote nothing");
    }

    #[test]
    fn open_cuts_a_torn_tail_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let b = three_records();
        std::fs::write(&path, &b[..b.len() - 4]).unwrap();
        let mut j = J::open(&path).unwrap();
        assert_eq!(j.repaired().unwrap().kind, DamageKind::TruncatedPayload);
        // The torn `Done` never happened: step 0 is only recorded.
        assert_eq!(j.pending()[0].steps[0].state, StepState::Recorded);
        j.step_done(OpId(1), 0).unwrap();
        drop(j);
        let r = read_records::<Step>(&path).unwrap();
        assert_eq!(r.damage, None);
        assert_eq!(r.records.len(), 3);
        assert_eq!(std::fs::read(&path).unwrap(), b);
    }

    #[test]
    fn open_refuses_damage_in_the_middle_and_new_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut b = three_records();
        b[HEADER_LEN + 3] ^= 0x10;
        std::fs::write(&path, &b).unwrap();
        let e = J::open(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::JournalCorrupt);
        assert_eq!(e.offset(), Some(0));
        assert_eq!(std::fs::read(&path).unwrap(), b, "left untouched");

        let mut b = three_records();
        b[4] = 9;
        std::fs::write(&path, &b).unwrap();
        let e = J::open(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
        assert!(e.to_string().contains("version 9"), "{e}");
    }

    #[test]
    fn compact_keeps_pending_operations_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut j = J::open(&path).unwrap();
        for _ in 0..50 {
            let op = j.begin("create", "vm").unwrap();
            let s = j.record_step(op, Step::Paused).unwrap();
            j.step_done(op, s).unwrap();
            j.finish(op, Outcome::Committed).unwrap();
        }
        let live = j.begin("delete", "vm").unwrap();
        let s = j
            .record_step(live, Step::Overlay { path: "/o".into() })
            .unwrap();
        j.step_undone(live, s).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        j.compact().unwrap();
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(after < before / 10, "{before} -> {after}");
        let next = j.begin("create", "vm").unwrap();
        assert_eq!(next.0, live.0 + 1);
        drop(j);
        let j = J::open(&path).unwrap();
        let p = j.pending();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].steps[0].state, StepState::Undone);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing left behind but the journal.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
