//! Internal snapshots: create, apply (goto) and delete, in QEMU's order.

use super::refcount::Refcounts;
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{
    Qcow2, Snapshot, SnapshotExtra, AUTOCLEAR_BITMAPS, MAX_L1_TABLE_SIZE, MAX_SNAPSHOTS,
    MAX_SNAPSHOT_TABLE_SIZE,
};
use crate::storage::Storage;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Longest snapshot name qemu-img keeps (it truncates longer ones; we refuse them).
pub const MAX_NAME_LEN: usize = 255;

/// How a snapshot is named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// By id, then by name (what `qemu-img snapshot -a` does).
    IdOrName(Vec<u8>),
    /// By name only (what `qemu-img snapshot -d` does); the first match in table order.
    Name(Vec<u8>),
    /// By id only.
    Id(Vec<u8>),
}

impl SnapshotRef {
    fn find(&self, snaps: &[Snapshot]) -> Option<usize> {
        let by_id = |id: &[u8]| snaps.iter().position(|s| s.id == id);
        let by_name = |n: &[u8]| snaps.iter().position(|s| s.name == n);
        match self {
            SnapshotRef::IdOrName(x) => by_id(x).or_else(|| by_name(x)),
            SnapshotRef::Name(n) => by_name(n),
            SnapshotRef::Id(i) => by_id(i),
        }
    }
    fn describe(&self) -> String {
        match self {
            SnapshotRef::IdOrName(x) | SnapshotRef::Name(x) => {
                format!("snapshot '{}' not found", String::from_utf8_lossy(x))
            }
            SnapshotRef::Id(x) => {
                format!(
                    "snapshot with id '{}' not found",
                    String::from_utf8_lossy(x)
                )
            }
        }
    }
}

/// Edits the internal snapshots of one qcow2 image. Opening checks everything that makes
/// QEMU refuse (or that would make a write unsafe) and changes nothing.
#[derive(Debug)]
pub struct SnapshotEditor<S: Storage> {
    storage: S,
    img: Qcow2,
    rc: Refcounts,
}

fn io<'a>(what: &'a str, off: u64) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(what, e).at(off)
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

impl<S: Storage> SnapshotEditor<S> {
    /// Open an image for snapshot changes, refusing what QEMU refuses.
    pub fn open(storage: S) -> Result<Self> {
        let img = Qcow2::read(&storage)?;
        let h = &img.header;
        let unknown = img.unknown_features();
        if let Some(u) = unknown
            .iter()
            .find(|u| u.feature_type == crate::qcow2::FeatureType::Incompatible)
        {
            return Err(refuse(format!(
                "unknown incompatible feature bit {}{}",
                u.bit,
                u.name
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ))
            .at(72));
        }
        if h.is_corrupt() {
            return Err(Error::new(
                ErrorKind::Invalid,
                "image is marked corrupt; repair it with 'qemu-img check -r all' first",
            )
            .at(72));
        }
        if h.is_dirty() {
            return Err(refuse(
                "image is dirty (refcounts need rebuilding); run 'qemu-img check -r all' first",
            )
            .at(72));
        }
        if img.has_data_file() {
            return Err(refuse(
                "internal snapshots are not supported with an external data file",
            ));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_TABLE_SIZE {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                "active L1 table too large",
            ));
        }
        if h.l1_table_offset % h.cluster_size() != 0 {
            return Err(Error::invalid("active L1 table offset invalid", 40));
        }
        let rc = Refcounts::load(&storage, h)?;
        Ok(SnapshotEditor { storage, img, rc })
    }

    /// The image's metadata as last read or written.
    pub fn image(&self) -> &Qcow2 {
        &self.img
    }

    /// The storage.
    pub fn into_storage(self) -> S {
        self.storage
    }

    fn cluster_bits(&self) -> u32 {
        self.img.header.cluster_bits
    }

    fn read_l1(&self, off: u64, size: u32) -> Result<Vec<u64>> {
        if u64::from(size) * 8 > MAX_L1_TABLE_SIZE {
            return Err(Error::new(ErrorKind::LimitExceeded, "L1 table too large"));
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        if off % self.img.header.cluster_size() != 0 || off == 0 {
            return Err(Error::invalid("L1 table offset invalid", off));
        }
        let mut buf = vec![0u8; size as usize * 8];
        self.storage
            .read_at(&mut buf, off)
            .map_err(io("cannot read an L1 table", off))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Read one L2 table. Tables are not kept: memory stays at a few clusters whatever the
    /// image size (the second read of a table in an operation comes from the page cache).
    fn read_l2(&self, off: u64) -> Result<Vec<u8>> {
        let cs = self.img.header.cluster_size();
        if off % cs != 0 {
            return Err(Error::invalid("L2 table offset not cluster aligned", off));
        }
        let mut buf = vec![0u8; cs as usize];
        self.storage
            .read_at(&mut buf, off)
            .map_err(io("cannot read an L2 table", off))?;
        Ok(buf)
    }

    /// Indices of the L1 entries that have an L2 table, in L2 offset order.
    fn by_l2_offset(l1: &[u64]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..l1.len())
            .filter(|&i| l1[i] & OFFSET_MASK != 0)
            .collect();
        idx.sort_unstable_by_key(|&i| l1[i] & OFFSET_MASK);
        idx
    }

    fn l2_entry_size(&self) -> usize {
        if self.img.header.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Add `delta` to every cluster reachable from the L1 entries (per L1 path).
    fn update_tree(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        let cb = self.cluster_bits();
        let esz = self.l2_entry_size();
        let csize_shift = 62 - (cb - 8);
        let csize_mask = (1u64 << (cb - 8)) - 1;
        let coff_mask = (1u64 << csize_shift) - 1;
        let cs = 1u64 << cb;
        for i in Self::by_l2_offset(l1) {
            let l2_off = l1[i] & OFFSET_MASK;
            self.rc.add(&self.storage, l2_off >> cb, delta)?;
            let table = self.read_l2(l2_off)?;
            for ent in table.chunks_exact(esz) {
                let x = u64::from_be_bytes(ent[..8].try_into().expect("8 bytes"));
                if x & COMPRESSED != 0 {
                    let coff = x & coff_mask;
                    let sectors = ((x >> csize_shift) & csize_mask) + 1;
                    let len = sectors * 512 - (coff & 511);
                    self.rc.add_range(&self.storage, coff, len, delta)?;
                } else {
                    let off = x & OFFSET_MASK;
                    if off != 0 {
                        if off % cs != 0 {
                            return Err(Error::invalid(
                                "data cluster offset not cluster aligned",
                                l2_off,
                            ));
                        }
                        self.rc.add(&self.storage, off >> cb, delta)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Recompute COPIED (refcount == 1) in the active L1 (`l1`, changed in place) and its L2
    /// tables, writing each changed L2 table at once (in offset order). Must run after the
    /// refcount writes it depends on. Returns (L1 changed, an L2 table was written).
    fn fix_copied(&mut self, l1: &mut [u64]) -> Result<(bool, bool)> {
        let cb = self.cluster_bits();
        let esz = self.l2_entry_size();
        let mut l1_changed = false;
        let mut l2_written = false;
        let mut last = None;
        for i in Self::by_l2_offset(l1) {
            let e = l1[i];
            let l2_off = e & OFFSET_MASK;
            let want = self.rc.get(&self.storage, l2_off >> cb)? == 1;
            let ne = if want { e | COPIED } else { e & !COPIED };
            if ne != e {
                l1[i] = ne;
                l1_changed = true;
            }
            if last == Some(l2_off) {
                continue; // the same table twice in one L1 (hostile): fixed once
            }
            last = Some(l2_off);
            let mut table = self.read_l2(l2_off)?;
            let mut changed = false;
            for ent in table.chunks_exact_mut(esz) {
                let x = u64::from_be_bytes(ent[..8].try_into().expect("8 bytes"));
                if x & COMPRESSED != 0 {
                    continue;
                }
                let off = x & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                let want = self.rc.get(&self.storage, off >> cb)? == 1;
                let nx = if want { x | COPIED } else { x & !COPIED };
                if nx != x {
                    ent[..8].copy_from_slice(&nx.to_be_bytes());
                    changed = true;
                }
            }
            if changed {
                self.write(&table, l2_off, "cannot write an L2 table")?;
                l2_written = true;
            }
        }
        Ok((l1_changed, l2_written))
    }

    fn write(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        self.storage.write_at(buf, off).map_err(io(what, off))
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io("cannot flush the image", e))
    }

    /// Write refcounts (and a moved refcount table with its header fields, after a flush
    /// that makes the new table durable first), then flush if `sync`.
    fn write_refcounts(&mut self, sync: bool) -> Result<()> {
        let moved = self.rc.write(&self.storage)?;
        if moved {
            self.flush()?;
            let (off, clusters) = self.rc.table_location();
            let mut b = [0u8; 12];
            b[..8].copy_from_slice(&off.to_be_bytes());
            b[8..].copy_from_slice(&clusters.to_be_bytes());
            self.write(&b, 48, "cannot write the header")?;
            self.img.header.refcount_table_offset = off;
            self.img.header.refcount_table_clusters = clusters;
        }
        if sync {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the active L1 if it changed, then flush if `sync` and anything (this or the L2
    /// tables `fix_copied` wrote) was written.
    fn write_copied(&mut self, l1: &[u64], changed: (bool, bool), sync: bool) -> Result<()> {
        let (l1_changed, l2_written) = changed;
        if l1_changed {
            self.write_l1(l1)?;
        }
        if sync && (l1_changed || l2_written) {
            self.flush()?;
        }
        Ok(())
    }

    fn write_l1(&self, l1: &[u64]) -> Result<()> {
        let buf: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        if !buf.is_empty() {
            self.write(
                &buf,
                self.img.header.l1_table_offset,
                "cannot write the L1 table",
            )?;
        }
        Ok(())
    }

    fn encode_table(snaps: &[Snapshot]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for s in snaps {
            out.extend_from_slice(&s.encode());
        }
        // Like QEMU, the table ends with the last entry's last byte (no padding after it).
        if let Some(last) = snaps.last() {
            let unpadded = 40 + last.extra_data_size() + last.id.len() + last.name.len();
            out.truncate(out.len() - last.encoded_len() as usize + unpadded);
        }
        if out.len() as u64 > MAX_SNAPSHOT_TABLE_SIZE {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                "snapshot table would exceed QEMU's 64 MiB limit",
            ));
        }
        Ok(out)
    }

    /// Allocate and write a new snapshot table (nothing for an empty one).
    fn place_table(&mut self, table: &[u8]) -> Result<u64> {
        if table.is_empty() {
            return Ok(0);
        }
        let off = self.rc.alloc_bytes(&self.storage, table.len() as u64)?;
        self.write(table, off, "cannot write the snapshot table")?;
        Ok(off)
    }

    /// The commit point: snapshot count and table offset, written together and flushed.
    fn commit(&mut self, snaps: Vec<Snapshot>, table_off: u64) -> Result<()> {
        self.commit_header(snaps.len() as u32, table_off)?;
        let mut off = table_off;
        let mut snaps = snaps;
        for s in snaps.iter_mut() {
            s.entry_offset = off;
            off += s.encoded_len();
        }
        self.img.snapshots = snaps;
        Ok(())
    }

    /// Write and flush bytes 60-71, then free the old table (in memory; the caller updates
    /// the snapshot list afterwards).
    fn commit_header(&mut self, count: u32, table_off: u64) -> Result<()> {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&count.to_be_bytes());
        b[4..].copy_from_slice(&table_off.to_be_bytes());
        self.write(&b, 60, "cannot write the snapshot header fields")?;
        self.flush()?;
        let old_off = self.img.header.snapshots_offset;
        let old_len: u64 = self.img.snapshots.iter().map(|s| s.encoded_len()).sum();
        self.img.header.nb_snapshots = count;
        self.img.header.snapshots_offset = table_off;
        if old_off != 0 && old_len > 0 {
            self.rc.free_bytes(&self.storage, old_off, old_len)?;
        }
        Ok(())
    }

    /// The current table as stored (up to the last entry's last byte), plus `entry`: what
    /// re-encoding every entry would give, without re-encoding them (kept byte for byte).
    fn table_with(&self, entry: &Snapshot) -> Result<(Vec<u8>, u64)> {
        let unpadded = |s: &Snapshot| (40 + s.extra_data_size() + s.id.len() + s.name.len()) as u64;
        let mut table = Vec::new();
        if let Some(last) = self.img.snapshots.last() {
            let start = self.img.header.snapshots_offset;
            let len = last.entry_offset + unpadded(last) - start;
            if len > MAX_SNAPSHOT_TABLE_SIZE {
                return Err(Error::new(
                    ErrorKind::LimitExceeded,
                    "snapshot table too large",
                ));
            }
            table.resize(len as usize, 0);
            self.storage
                .read_at(&mut table, start)
                .map_err(io("cannot read the snapshot table", start))?;
            table.resize(table.len().next_multiple_of(8), 0);
        }
        let at = table.len() as u64;
        let enc = entry.encode();
        table.extend_from_slice(&enc[..unpadded(entry) as usize]);
        if table.len() as u64 > MAX_SNAPSHOT_TABLE_SIZE {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                "snapshot table would exceed QEMU's 64 MiB limit",
            ));
        }
        Ok((table, at))
    }

    /// Write the refcount changes made after the commit (frees), then flush if `sync`.
    /// Frees need no flush for safety: lost, they only leak; a later operation rewrites the
    /// whole block (including them) before anything reuses a freed cluster.
    fn write_frees(&mut self, sync: bool) -> Result<()> {
        self.write_refcounts(false)?;
        self.rc.finish(&self.storage)?;
        if sync {
            self.flush()?;
        }
        Ok(())
    }

    /// `qemu-img snapshot -c NAME`: a new snapshot of the active state, id = max + 1.
    /// `date` is (seconds, nanoseconds) since the epoch. Returns the new id.
    pub fn create(&mut self, name: &[u8], date: (u32, u32)) -> Result<Vec<u8>> {
        if name.len() > MAX_NAME_LEN {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!("snapshot name longer than {MAX_NAME_LEN} bytes"),
            ));
        }
        if self.img.snapshots.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
            return Err(Error::new(ErrorKind::LimitExceeded, "too many snapshots"));
        }
        let max_id = self
            .img
            .snapshots
            .iter()
            .filter_map(|s| {
                // strtoul semantics: leading digits, anything else counts as 0.
                let d: Vec<u8> =
                    s.id.iter()
                        .copied()
                        .take_while(u8::is_ascii_digit)
                        .collect();
                std::str::from_utf8(&d).ok()?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0);
        let id = max_id
            .checked_add(1)
            .ok_or_else(|| Error::new(ErrorKind::LimitExceeded, "no snapshot id left"))?
            .to_string()
            .into_bytes();
        let h = self.img.header.clone();
        let mut l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;

        // Everything is decided in memory first: a refusal (refcount overflow, limits)
        // leaves the file untouched.
        // 1. A place for a copy of the active L1 (as it is on disk).
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        // (An empty L1, on a zero-sized image, takes no cluster: QEMU allocates 0 bytes.)
        let l1_copy = if l1_bytes.is_empty() {
            0
        } else {
            self.rc.alloc_bytes(&self.storage, l1_bytes.len() as u64)?
        };
        // 2. One more reference for everything the active L1 reaches.
        self.update_tree(&l1, 1)?;
        // 3. The new table, in a new place.
        let entry = Snapshot {
            entry_offset: 0,
            l1_table_offset: l1_copy,
            l1_size: h.l1_size,
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size_32: 0,
            extra: SnapshotExtra {
                vm_state_size_large: Some(0),
                disk_size: Some(h.size),
                icount: Some(0),
                unknown: Vec::new(),
            },
            id: id.clone(),
            name: name.to_vec(),
        };
        let (table, entry_at) = self.table_with(&entry)?;
        let table_off = self.rc.alloc_bytes(&self.storage, table.len() as u64)?;
        if !l1_bytes.is_empty() {
            self.write(&l1_bytes, l1_copy, "cannot write the snapshot's L1 table")?;
        }
        self.write(&table, table_off, "cannot write the snapshot table")?;
        // 4. Refcounts and COPIED cleared in the active tables, all durable before the
        //    commit (one flush: either half alone is a stale flag, never a low refcount).
        self.write_refcounts(false)?;
        let changed = self.fix_copied(&mut l1)?;
        self.write_copied(&l1, changed, false)?;
        self.flush()?;
        // 5. Commit, then free the old table.
        let old_start = self.img.header.snapshots_offset;
        self.commit_header(self.img.snapshots.len() as u32 + 1, table_off)?;
        for s in self.img.snapshots.iter_mut() {
            s.entry_offset = s.entry_offset - old_start + table_off;
        }
        self.img.snapshots.push(Snapshot {
            entry_offset: table_off + entry_at,
            ..entry
        });
        self.write_frees(false)?;
        Ok(id)
    }

    /// `qemu-img snapshot -d`: remove a snapshot, then drop its references.
    pub fn delete(&mut self, which: &SnapshotRef) -> Result<Snapshot> {
        let idx = which
            .find(&self.img.snapshots)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, which.describe()))?;
        let h = self.img.header.clone();
        let sn = self.img.snapshots[idx].clone();
        let sn_l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        let mut l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;
        let mut snaps = self.img.snapshots.clone();
        snaps.remove(idx);
        let table = Self::encode_table(&snaps)?;
        let table_off = self.place_table(&table)?;
        self.write_refcounts(true)?;
        self.commit(snaps, table_off)?;
        // After the commit nothing points to the snapshot's tree any more.
        self.update_tree(&sn_l1, -1)?;
        if sn.l1_size > 0 {
            self.rc
                .free_bytes(&self.storage, sn.l1_table_offset, u64::from(sn.l1_size) * 8)?;
        }
        self.write_frees(true)?;
        let changed = self.fix_copied(&mut l1)?;
        self.write_copied(&l1, changed, true)?;
        Ok(sn)
    }

    /// `qemu-img snapshot -a`: make a snapshot's state the active state.
    pub fn apply(&mut self, which: &SnapshotRef) -> Result<Snapshot> {
        let idx = which
            .find(&self.img.snapshots)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, which.describe()))?;
        let h = self.img.header.clone();
        if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 && !self.img.bitmaps.is_empty() {
            return Err(refuse(
                "cannot apply a snapshot to an image with persistent bitmaps",
            ));
        }
        let sn = self.img.snapshots[idx].clone();
        // Like QEMU: the image takes the snapshot's disk size (entries without the field
        // keep the current size), and the active L1 grows to the snapshot's if it is larger.
        let new_size = sn.extra.disk_size.unwrap_or(h.size);
        let cb = self.cluster_bits();
        let l2_bits = cb - if h.extended_l2() { 4 } else { 3 };
        let needed = new_size.div_ceil(1u64 << (cb + l2_bits));
        if u64::from(sn.l1_size) < needed {
            return Err(Error::invalid(
                "the snapshot's L1 table is too small for its disk size",
                sn.entry_offset,
            ));
        }
        let relocate = new_size != h.size || sn.l1_size > h.l1_size;
        let l1_len = h.l1_size.max(sn.l1_size);
        let mut new_l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        new_l1.resize(l1_len as usize, 0);
        let old_l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;
        // +1 on the snapshot's tree, durable before the active L1 points to it. COPIED is
        // computed for that state (the snapshot keeps referencing the tree, so it stays
        // right after the old tree is dropped) and written with the new L1: no window in
        // which a flag disagrees with a refcount.
        self.update_tree(&new_l1, 1)?;
        if relocate {
            // A new active L1 in new clusters, switched to together with the size by one
            // 24-byte header write (size, crypt method, L1 size, L1 offset).
            let off = self.rc.alloc_bytes(&self.storage, u64::from(l1_len) * 8)?;
            self.write_refcounts(true)?;
            let (_, l2_written) = self.fix_copied(&mut new_l1)?;
            self.img.header.l1_table_offset = off;
            self.write_copied(&new_l1, (true, l2_written), true)?;
            let mut b = Vec::with_capacity(24);
            b.extend_from_slice(&new_size.to_be_bytes());
            b.extend_from_slice(&h.crypt_method.to_be_bytes());
            b.extend_from_slice(&l1_len.to_be_bytes());
            b.extend_from_slice(&off.to_be_bytes());
            self.write(&b, 24, "cannot write the header")?;
            self.flush()?;
            self.img.header.size = new_size;
            self.img.header.l1_size = l1_len;
            if h.l1_size > 0 {
                self.rc
                    .free_bytes(&self.storage, h.l1_table_offset, u64::from(h.l1_size) * 8)?;
            }
        } else {
            self.write_refcounts(true)?;
            let (_, l2_written) = self.fix_copied(&mut new_l1)?;
            self.write_copied(&new_l1, (true, l2_written), true)?;
        }
        // The old active tree is no longer referenced.
        self.update_tree(&old_l1, -1)?;
        self.write_frees(true)?;
        let changed = self.fix_copied(&mut new_l1)?;
        self.write_copied(&new_l1, changed, true)?;
        Ok(sn)
    }
}
