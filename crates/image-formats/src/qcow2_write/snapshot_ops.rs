//! Internal snapshots: create, apply (goto) and delete, each switched to by one header write
//! after its new metadata is written to free clusters (see the `qcow2_write` module doc).

use std::collections::HashMap;

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

    /// One L2 table with COPIED set in its data entries iff the cluster's refcount is 1;
    /// and whether that changed anything.
    fn fixed_l2(&mut self, l2_off: u64) -> Result<(Vec<u8>, bool)> {
        let cb = self.cluster_bits();
        let esz = self.l2_entry_size();
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
        Ok((table, changed))
    }

    /// Make COPIED right for the new active state (set iff refcount == 1) in `l1`, the new
    /// active L1 (changed in place), and in its L2 tables. The L2 tables belong to the state
    /// on disk too, so they are never changed in place: a table whose flags change is copied
    /// to a fresh cluster (queued in `writes`; the copy is made when written, so memory stays
    /// at one table), the copy takes the active L1's reference and the original loses it.
    /// Must run after every refcount change of data clusters (copying an L2 table changes no
    /// data refcount: the active path just goes through the copy).
    fn cow_copied(&mut self, l1: &mut [u64], writes: &mut Vec<NewCluster>) -> Result<()> {
        let cb = self.cluster_bits();
        let mut copies: HashMap<u64, u64> = HashMap::new();
        for i in Self::by_l2_offset(l1) {
            let l2_off = l1[i] & OFFSET_MASK;
            if let Some(&copy) = copies.get(&l2_off) {
                // The same table twice in one L1 (hostile): both entries take the copy.
                self.rc.add(&self.storage, copy >> cb, 1)?;
                self.rc.add(&self.storage, l2_off >> cb, -1)?;
                l1[i] = (l1[i] & !OFFSET_MASK) | copy;
                continue;
            }
            if self.fixed_l2(l2_off)?.1 {
                let copy = self.rc.alloc(&self.storage, 1)?;
                self.rc.add(&self.storage, l2_off >> cb, -1)?;
                copies.insert(l2_off, copy);
                l1[i] = (l1[i] & !OFFSET_MASK) | copy;
                writes.push(NewCluster::L2Copy {
                    from: l2_off,
                    to: copy,
                });
            }
        }
        // L1 flags last: copying changes the L2 tables' own refcounts.
        for e in l1.iter_mut() {
            let off = *e & OFFSET_MASK;
            if off != 0 {
                let one = self.rc.get(&self.storage, off >> cb)? == 1;
                *e = if one { *e | COPIED } else { *e & !COPIED };
            }
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        self.storage.write_at(buf, off).map_err(io(what, off))
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io("cannot flush the image", e))
    }

    fn l1_bytes(l1: &[u64]) -> Vec<u8> {
        l1.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    /// A new active L1 table in fresh clusters (queued in `writes`); returns its offset.
    fn place_l1(&mut self, l1: &[u64], writes: &mut Vec<NewCluster>) -> Result<u64> {
        let buf = Self::l1_bytes(l1);
        let off = self.rc.alloc_bytes(&self.storage, buf.len() as u64)?;
        writes.push(NewCluster::Bytes(off, buf));
        Ok(off)
    }

    /// Free the current snapshot table (in the new refcount structure).
    fn free_snapshot_table(&mut self) -> Result<()> {
        let old_off = self.img.header.snapshots_offset;
        let old_len: u64 = self.img.snapshots.iter().map(|s| s.encoded_len()).sum();
        if old_off != 0 && old_len > 0 {
            self.rc.free_bytes(&self.storage, old_off, old_len)?;
        }
        Ok(())
    }

    /// Free the current active L1 table (in the new refcount structure).
    fn free_active_l1(&mut self) -> Result<()> {
        let h = &self.img.header;
        let (off, size) = (h.l1_table_offset, h.l1_size);
        if size > 0 {
            self.rc
                .free_bytes(&self.storage, off, u64::from(size) * 8)?;
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

    /// Write the new state and switch to it. Everything it needs is in fresh clusters (free
    /// in the state on disk): `writes` (L2 copies, L1 tables, snapshot table), then the
    /// refcount blocks and table from [`Refcounts::prepare`]; one flush; then bytes 24-71 of
    /// the header in one write inside one sector (virtual size, crypt method, L1 size and
    /// offset, refcount table offset and clusters, snapshot count and table offset), the
    /// only write over metadata in use; one flush. A crash before that write leaves the old
    /// state untouched, after it the new state complete, its refcounts exact (no leak).
    fn switch(&mut self, mut writes: Vec<NewCluster>, new: NewState) -> Result<()> {
        let (rt_off, rt_clusters) = self.rc.prepare(&self.storage)?;
        writes.sort_unstable_by_key(NewCluster::offset);
        for w in &writes {
            match w {
                NewCluster::Bytes(off, buf) => {
                    self.write(buf, *off, "cannot write new metadata")?;
                }
                NewCluster::L2Copy { from, to } => {
                    let (table, _) = self.fixed_l2(*from)?;
                    self.write(&table, *to, "cannot write an L2 table")?;
                }
            }
        }
        self.rc.write(&self.storage)?;
        self.flush()?;
        let h = &self.img.header;
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&new.size.to_be_bytes());
        b.extend_from_slice(&h.crypt_method.to_be_bytes());
        b.extend_from_slice(&new.l1_size.to_be_bytes());
        b.extend_from_slice(&new.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&rt_off.to_be_bytes());
        b.extend_from_slice(&rt_clusters.to_be_bytes());
        b.extend_from_slice(&(new.snapshots.len() as u32).to_be_bytes());
        b.extend_from_slice(&new.snapshots_offset.to_be_bytes());
        self.write(&b, 24, "cannot write the header")?;
        self.flush()?;
        self.rc.committed();
        let h = &mut self.img.header;
        h.size = new.size;
        h.l1_size = new.l1_size;
        h.l1_table_offset = new.l1_table_offset;
        h.refcount_table_offset = rt_off;
        h.refcount_table_clusters = rt_clusters;
        h.nb_snapshots = new.snapshots.len() as u32;
        h.snapshots_offset = new.snapshots_offset;
        self.img.snapshots = new.snapshots;
        Ok(())
    }

    /// After a failed operation the in-memory state may be half changed: read it again.
    fn reload(&mut self) {
        if let Ok(img) = Qcow2::read(&self.storage) {
            if let Ok(rc) = Refcounts::load(&self.storage, &img.header) {
                self.img = img;
                self.rc = rc;
            }
        }
    }

    /// `qemu-img snapshot -c NAME`: a new snapshot of the active state, id = max + 1.
    /// `date` is (seconds, nanoseconds) since the epoch. Returns the new id.
    pub fn create(&mut self, name: &[u8], date: (u32, u32)) -> Result<Vec<u8>> {
        let r = self.create_inner(name, date);
        if r.is_err() {
            self.reload();
        }
        r
    }

    fn create_inner(&mut self, name: &[u8], date: (u32, u32)) -> Result<Vec<u8>> {
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
        let l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;

        // The new state is computed in memory first: a refusal (refcount overflow, limits)
        // leaves the file untouched. The active tree as it is on disk becomes the
        // snapshot's: the snapshot entry points to the current L1 table, and everything it
        // reaches gains a reference.
        self.update_tree(&l1, 1)?;
        let mut writes = Vec::new();
        // (An empty L1, on a zero-sized image, takes no cluster: QEMU allocates 0 bytes.)
        let (snap_l1, active_l1) = if l1.is_empty() {
            (0, h.l1_table_offset)
        } else {
            // The active state gets a new L1 (and copies of the L2 tables whose COPIED
            // flags clear), in fresh clusters.
            let mut active = l1.clone();
            self.cow_copied(&mut active, &mut writes)?;
            (h.l1_table_offset, self.place_l1(&active, &mut writes)?)
        };
        let entry = Snapshot {
            entry_offset: 0,
            l1_table_offset: snap_l1,
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
        self.free_snapshot_table()?;
        let table_off = self.rc.alloc_bytes(&self.storage, table.len() as u64)?;
        writes.push(NewCluster::Bytes(table_off, table));
        let old_start = h.snapshots_offset;
        let mut snapshots = self.img.snapshots.clone();
        for s in snapshots.iter_mut() {
            s.entry_offset = s.entry_offset - old_start + table_off;
        }
        snapshots.push(Snapshot {
            entry_offset: table_off + entry_at,
            ..entry
        });
        self.switch(
            writes,
            NewState {
                size: h.size,
                l1_size: h.l1_size,
                l1_table_offset: active_l1,
                snapshots,
                snapshots_offset: table_off,
            },
        )?;
        Ok(id)
    }

    /// `qemu-img snapshot -d`: remove a snapshot and drop its references.
    pub fn delete(&mut self, which: &SnapshotRef) -> Result<Snapshot> {
        let r = self.delete_inner(which);
        if r.is_err() {
            self.reload();
        }
        r
    }

    fn delete_inner(&mut self, which: &SnapshotRef) -> Result<Snapshot> {
        let idx = which
            .find(&self.img.snapshots)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, which.describe()))?;
        let h = self.img.header.clone();
        let sn = self.img.snapshots[idx].clone();
        let sn_l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        let l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;
        let mut snapshots = self.img.snapshots.clone();
        snapshots.remove(idx);
        let table = Self::encode_table(&snapshots)?;
        // The new state: the snapshot's references, its L1 and the old table gone...
        self.update_tree(&sn_l1, -1)?;
        if sn.l1_size > 0 && sn.l1_table_offset != h.l1_table_offset {
            self.rc
                .free_bytes(&self.storage, sn.l1_table_offset, u64::from(sn.l1_size) * 8)?;
        }
        self.free_snapshot_table()?;
        // ...COPIED set where refcounts fell to 1 (in copies of the tables)...
        let mut writes = Vec::new();
        let mut active = l1.clone();
        self.cow_copied(&mut active, &mut writes)?;
        let l1_off = if active != l1 {
            self.free_active_l1()?;
            self.place_l1(&active, &mut writes)?
        } else {
            h.l1_table_offset
        };
        // ...and the table without the entry, in fresh clusters.
        let table_off = if table.is_empty() {
            0
        } else {
            let off = self.rc.alloc_bytes(&self.storage, table.len() as u64)?;
            writes.push(NewCluster::Bytes(off, table));
            off
        };
        let mut at = table_off;
        for s in snapshots.iter_mut() {
            s.entry_offset = at;
            at += s.encoded_len();
        }
        self.switch(
            writes,
            NewState {
                size: h.size,
                l1_size: h.l1_size,
                l1_table_offset: l1_off,
                snapshots,
                snapshots_offset: table_off,
            },
        )?;
        Ok(sn)
    }

    /// `qemu-img snapshot -a`: make a snapshot's state the active state.
    pub fn apply(&mut self, which: &SnapshotRef) -> Result<Snapshot> {
        let r = self.apply_inner(which);
        if r.is_err() {
            self.reload();
        }
        r
    }

    fn apply_inner(&mut self, which: &SnapshotRef) -> Result<Snapshot> {
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
        let l1_len = h.l1_size.max(sn.l1_size);
        let mut new_l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        new_l1.resize(l1_len as usize, 0);
        let old_l1 = self.read_l1(h.l1_table_offset, h.l1_size)?;
        // The new state: +1 on the snapshot's tree, -1 on the old active tree, the old
        // active L1 freed, COPIED for the new state (in copies of the L2 tables whose flags
        // change), and a new active L1 in fresh clusters; the header switches L1, size and
        // refcounts together.
        self.update_tree(&new_l1, 1)?;
        self.update_tree(&old_l1, -1)?;
        self.free_active_l1()?;
        let mut writes = Vec::new();
        self.cow_copied(&mut new_l1, &mut writes)?;
        let l1_off = if new_l1.is_empty() {
            h.l1_table_offset
        } else {
            self.place_l1(&new_l1, &mut writes)?
        };
        self.switch(
            writes,
            NewState {
                size: new_size,
                l1_size: l1_len,
                l1_table_offset: l1_off,
                snapshots: self.img.snapshots.clone(),
                snapshots_offset: h.snapshots_offset,
            },
        )?;
        Ok(sn)
    }
}

/// A cluster run of new metadata, written before the header switch.
enum NewCluster {
    /// These bytes at this offset (L1 and snapshot tables).
    Bytes(u64, Vec<u8>),
    /// The L2 table at `from` with COPIED made right, at `to`.
    L2Copy { from: u64, to: u64 },
}

impl NewCluster {
    fn offset(&self) -> u64 {
        match self {
            NewCluster::Bytes(off, _) => *off,
            NewCluster::L2Copy { to, .. } => *to,
        }
    }
}

/// The header fields of the state an operation switches to, and its snapshot list.
struct NewState {
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    snapshots: Vec<Snapshot>,
    snapshots_offset: u64,
}
