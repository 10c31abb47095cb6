//! The LUKS1 header that qcow2's LUKS encryption stores inside the image (located by the
//! full disk encryption header extension): what `qemu-img info` reports about it. No key
//! material is read or needed.

use crate::error::{Error, ErrorKind, Result};
use crate::window::{be16, be32};
use serde_json::{json, Value};

/// `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the LUKS1 header with its 8 key slots.
pub const HEADER_SIZE: usize = 592;
const SLOT_ENABLED: u32 = 0x00ac_71f3;

/// One key slot (48 bytes from offset 208 + 48 * i).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Slot bytes 0-3: 0x00ac71f3 when enabled.
    pub active: u32,
    /// Slot bytes 4-7: PBKDF2 iterations.
    pub iterations: u32,
    /// Slot bytes 40-43: key material offset in 512-byte sectors.
    pub key_offset_sector: u32,
    /// Slot bytes 44-47: anti-forensic stripes.
    pub stripes: u32,
}

impl KeySlot {
    /// Is the slot enabled?
    pub fn is_active(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

/// The LUKS1 header fields `qemu-img info` reports (big-endian on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Bytes 6-7: version (1).
    pub version: u16,
    /// Bytes 8-39: cipher name ("aes").
    pub cipher_name: String,
    /// Bytes 40-71: cipher mode ("xts-plain64", "cbc-essiv:sha256").
    pub cipher_mode: String,
    /// Bytes 72-103: hash ("sha256").
    pub hash_spec: String,
    /// Bytes 104-107: payload offset in 512-byte sectors.
    pub payload_offset_sector: u32,
    /// Bytes 108-111: master key length in bytes.
    pub key_bytes: u32,
    /// Bytes 164-167: master key digest iterations.
    pub master_key_iterations: u32,
    /// Bytes 168-207: UUID text.
    pub uuid: String,
    /// Bytes 208-591: the 8 key slots.
    pub slots: Vec<KeySlot>,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl LuksHeader {
    /// Parse the 592-byte header.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_SIZE {
            return Err(Error::new(ErrorKind::Truncated, "LUKS header is truncated"));
        }
        if b[0..6] != MAGIC {
            return Err(Error::new(ErrorKind::Invalid, "bad LUKS header magic"));
        }
        let version = be16(b, 6);
        if version != 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("LUKS version {version} is not supported"),
            ));
        }
        let slots = (0..8)
            .map(|i| {
                let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
                KeySlot {
                    active: be32(s, 0),
                    iterations: be32(s, 4),
                    key_offset_sector: be32(s, 40),
                    stripes: be32(s, 44),
                }
            })
            .collect();
        Ok(LuksHeader {
            version,
            cipher_name: cstr(&b[8..40]),
            cipher_mode: cstr(&b[40..72]),
            hash_spec: cstr(&b[72..104]),
            payload_offset_sector: be32(b, 104),
            key_bytes: be32(b, 108),
            master_key_iterations: be32(b, 164),
            uuid: cstr(&b[168..208]),
            slots,
        })
    }

    /// Block cipher mode ("xts", "cbc", ...) and IV generator ("plain64", "essiv", ...) and
    /// the IV generator's hash (for essiv).
    fn mode_parts(&self) -> (String, Option<String>, Option<String>) {
        let mut parts = self.cipher_mode.splitn(2, '-');
        let mode = parts.next().unwrap_or("").to_string();
        match parts.next() {
            Some(iv) => match iv.split_once(':') {
                Some((alg, hash)) => (mode, Some(alg.to_string()), Some(hash.to_string())),
                None => (mode, Some(iv.to_string()), None),
            },
            None => (mode, None, None),
        }
    }

    /// QEMU's name of the cipher algorithm ("aes-256"): XTS keys hold two cipher keys.
    pub fn cipher_alg(&self) -> String {
        let (mode, _, _) = self.mode_parts();
        let mut bits = u64::from(self.key_bytes) * 8;
        if mode == "xts" {
            bits /= 2;
        }
        match self.cipher_name.as_str() {
            "sm4" | "des" | "3des" => self.cipher_name.clone(),
            n => format!("{n}-{bits}"),
        }
    }

    /// The `encrypt` object of `qemu-img info --output=json`.
    pub fn to_json(&self) -> Value {
        let (mode, ivgen, ivhash) = self.mode_parts();
        let mut m = serde_json::Map::new();
        m.insert("format".into(), json!("luks"));
        m.insert("cipher-alg".into(), json!(self.cipher_alg()));
        m.insert("cipher-mode".into(), json!(mode));
        if let Some(iv) = ivgen {
            m.insert("ivgen-alg".into(), json!(iv));
        }
        if let Some(h) = ivhash {
            m.insert("ivgen-hash-alg".into(), json!(h));
        }
        m.insert("hash-alg".into(), json!(self.hash_spec));
        m.insert("detached-header".into(), json!(false));
        m.insert(
            "payload-offset".into(),
            json!(u64::from(self.payload_offset_sector) * 512),
        );
        m.insert("master-key-iters".into(), json!(self.master_key_iterations));
        m.insert("uuid".into(), json!(self.uuid));
        m.insert(
            "slots".into(),
            Value::Array(
                self.slots
                    .iter()
                    .map(|s| {
                        let mut o = serde_json::Map::new();
                        o.insert("active".into(), json!(s.is_active()));
                        if s.is_active() {
                            o.insert("iters".into(), json!(s.iterations));
                            o.insert("stripes".into(), json!(s.stripes));
                        }
                        o.insert(
                            "key-offset".into(),
                            json!(u64::from(s.key_offset_sector) * 512),
                        );
                        Value::Object(o)
                    })
                    .collect(),
            ),
        );
        Value::Object(m)
    }
}
