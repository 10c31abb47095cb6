//! The refcount layer: the refcount table and blocks of any width (1-64 bits), read lazily
//! and changed in memory. An operation never writes over the refcount structure on disk:
//! [`Refcounts::prepare`] moves every changed block to a fresh cluster and places a new
//! table in fresh clusters (the old blocks and table freed in the new structure), so the
//! header switch to the new table is the only commit point. Allocation is first-fit like
//! QEMU's, skipping clusters freed in the same operation (the on-disk state still uses
//! them); a new refcount block may describe itself.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{Header, MAX_REFTABLE_SIZE};
use crate::storage::Storage;

/// Bits of a refcount table entry that hold the block offset (bits 9-63).
const REFT_OFFSET_MASK: u64 = !0x1ff;

#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// Loaded refcount blocks by refcount-table index, with the last one looked up remembered
/// (consecutive clusters almost always share a block).
#[derive(Debug, Default)]
struct Blocks {
    list: Vec<(u64, Block)>,
    index: HashMap<u64, usize>,
    last: Option<(u64, usize)>,
}

impl Blocks {
    fn find(&mut self, b: u64) -> Option<usize> {
        if let Some((lb, li)) = self.last {
            if lb == b {
                return Some(li);
            }
        }
        let i = *self.index.get(&b)?;
        self.last = Some((b, i));
        Some(i)
    }
    fn insert(&mut self, b: u64, blk: Block) -> usize {
        let i = self.list.len();
        self.list.push((b, blk));
        self.index.insert(b, i);
        self.last = Some((b, i));
        i
    }
}

/// The refcounts of one image, cached and changed in memory.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount table entries (may be longer than the on-disk table: it then has to move).
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    blocks: Blocks,
    /// First-fit cursor (cluster index), like QEMU's free_cluster_index.
    cursor: u64,
    /// Blocks placed in this operation (the on-disk table does not point to them yet):
    /// changed in place.
    fresh: HashSet<u64>,
    /// Clusters whose refcount fell to 0 in this operation: the on-disk state may still use
    /// them, so they are not allocated again before the header switch.
    freed: HashSet<u64>,
    /// Where [`Refcounts::prepare`] placed the new table (offset, clusters).
    pending_table: Option<(u64, u32)>,
}

fn io(what: &str, off: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what, e).at(off)
}

impl Refcounts {
    /// Read the refcount table of an image (blocks are read when first needed).
    pub fn load<S: Storage + ?Sized>(storage: &S, h: &Header) -> Result<Refcounts> {
        let cs = h.cluster_size();
        if h.refcount_table_offset % cs != 0 || h.refcount_table_offset == 0 {
            return Err(Error::invalid("refcount table offset invalid", 48));
        }
        let bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        if bytes > MAX_REFTABLE_SIZE || bytes == 0 {
            return Err(Error::new(ErrorKind::LimitExceeded, "refcount table size invalid").at(56));
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot get the image size", e))?;
        // The table may extend past the end of the file (reads as zeros there).
        let readable = bytes.min(file_len.saturating_sub(h.refcount_table_offset));
        let mut buf = vec![0u8; bytes as usize];
        storage
            .read_at(&mut buf[..readable as usize], h.refcount_table_offset)
            .map_err(io(
                "cannot read the refcount table",
                h.refcount_table_offset,
            ))?;
        let mut table: Vec<u64> = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        for (i, e) in table.iter().enumerate() {
            if e & 0x1ff != 0 || (e & REFT_OFFSET_MASK) % cs != 0 {
                return Err(Error::invalid(
                    format!("refcount table entry {i} is not cluster aligned"),
                    h.refcount_table_offset + 8 * i as u64,
                ));
            }
        }
        while table.last() == Some(&0) {
            table.pop();
        }
        Ok(Refcounts {
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            table,
            table_offset: h.refcount_table_offset,
            table_clusters: h.refcount_table_clusters,
            blocks: Blocks::default(),
            cursor: 0,
            fresh: HashSet::new(),
            freed: HashSet::new(),
            pending_table: None,
        })
    }

    /// Refcount table offset and clusters (changed when the table had to move).
    pub fn table_location(&self) -> (u64, u32) {
        (self.table_offset, self.table_clusters)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// log2 of the refcount entries per block.
    fn block_shift(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }
    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    fn block<S: Storage + ?Sized>(&mut self, storage: &S, b: u64) -> Result<Option<&mut Block>> {
        let i = match self.blocks.find(b) {
            Some(i) => i,
            None => {
                let off = match self.table.get(b as usize) {
                    Some(&e) if e & REFT_OFFSET_MASK != 0 => e & REFT_OFFSET_MASK,
                    _ => return Ok(None),
                };
                let mut data = vec![0u8; self.cluster_size() as usize];
                storage
                    .read_at(&mut data, off)
                    .map_err(io("cannot read a refcount block", off))?;
                self.blocks.insert(b, Block { data, dirty: false })
            }
        };
        Ok(Some(&mut self.blocks.list[i].1))
    }

    fn entry_get(data: &[u8], order: u32, i: u64) -> u64 {
        let i = i as usize;
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let per = 8 / bits;
                (u64::from(data[i / per]) >> ((i % per) * bits)) & ((1 << bits) - 1)
            }
            3 => u64::from(data[i]),
            4 => u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]])),
            5 => u64::from(u32::from_be_bytes(
                data[4 * i..4 * i + 4].try_into().expect("4 bytes"),
            )),
            _ => u64::from_be_bytes(data[8 * i..8 * i + 8].try_into().expect("8 bytes")),
        }
    }

    fn entry_set(data: &mut [u8], order: u32, i: u64, v: u64) {
        let i = i as usize;
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let per = 8 / bits;
                let shift = (i % per) * bits;
                let mask = (((1u16 << bits) - 1) as u8) << shift;
                data[i / per] = (data[i / per] & !mask) | (((v as u8) << shift) & mask);
            }
            3 => data[i] = v as u8,
            4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
            5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
            _ => data[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
        }
    }

    /// The refcount of cluster `c` (0 where no block covers it).
    pub fn get<S: Storage + ?Sized>(&mut self, storage: &S, c: u64) -> Result<u64> {
        let shift = self.block_shift();
        let order = self.order;
        let i = c & ((1 << shift) - 1);
        Ok(match self.block(storage, c >> shift)? {
            Some(b) => Self::entry_get(&b.data, order, i),
            None => 0,
        })
    }

    /// Add `delta` to the refcount of cluster `c`, refusing overflow and underflow.
    pub fn add<S: Storage + ?Sized>(&mut self, storage: &S, c: u64, delta: i64) -> Result<u64> {
        let shift = self.block_shift();
        let b = c >> shift;
        if self.block(storage, b)?.is_none() {
            if delta < 0 {
                return Err(Error::invalid(
                    format!("refcount underflow on cluster {c}"),
                    c << self.cluster_bits,
                ));
            }
            self.new_block(storage, b)?;
        }
        let (order, max, cb) = (self.order, self.max_value(), self.cluster_bits);
        let blk = self
            .block(storage, b)?
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "refcount block vanished"))?;
        let i = c & ((1 << shift) - 1);
        let old = Self::entry_get(&blk.data, order, i);
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= max)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::LimitExceeded,
                        format!("refcount overflow on cluster {c} (maximum {max})"),
                    )
                    .at(c << cb)
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::invalid(format!("refcount underflow on cluster {c}"), c << cb)
            })?
        };
        if new != old {
            Self::entry_set(&mut blk.data, order, i, new);
            blk.dirty = true;
        }
        if new == 0 && old != 0 {
            self.freed.insert(c);
        }
        if new == 0 && c < self.cursor {
            self.cursor = c;
        }
        Ok(new)
    }

    /// Add `delta` to every cluster touched by the bytes `[off, off + len)`.
    pub fn add_range<S: Storage + ?Sized>(
        &mut self,
        storage: &S,
        off: u64,
        len: u64,
        delta: i64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for c in first..=last {
            self.add(storage, c, delta)?;
        }
        Ok(())
    }

    /// A new (zeroed) refcount block for table index `b`, placed first-fit (possibly inside
    /// the range it describes, then it counts itself).
    fn new_block<S: Storage + ?Sized>(&mut self, storage: &S, b: u64) -> Result<()> {
        let entries = (b + 1)
            .checked_mul(8)
            .filter(|&x| x <= MAX_REFTABLE_SIZE)
            .ok_or_else(|| Error::new(ErrorKind::LimitExceeded, "refcount table too large"))?;
        let _ = entries;
        if self.table.len() <= b as usize {
            self.table.resize(b as usize + 1, 0);
        }
        self.blocks.insert(
            b,
            Block {
                data: vec![0u8; self.cluster_size() as usize],
                dirty: true,
            },
        );
        self.fresh.insert(b);
        let off = self.alloc(storage, 1)?;
        self.table[b as usize] = off;
        Ok(())
    }

    /// Is cluster `c` free (and not freed in this operation), without creating blocks?
    fn is_free<S: Storage + ?Sized>(&mut self, storage: &S, c: u64) -> Result<bool> {
        Ok(self.get(storage, c)? == 0 && !self.freed.contains(&c))
    }

    /// Allocate `n` contiguous clusters first-fit (refcount set to 1); returns the offset.
    pub fn alloc<S: Storage + ?Sized>(&mut self, storage: &S, n: u64) -> Result<u64> {
        let n = n.max(1);
        let shift = self.block_shift();
        loop {
            let (mut start, mut len, mut c) = (self.cursor, 0u64, self.cursor);
            while len < n {
                if self.is_free(storage, c)? {
                    len += 1;
                } else {
                    start = c + 1;
                    len = 0;
                }
                c += 1;
                if c > (1u64 << (56 - self.cluster_bits)) {
                    return Err(Error::new(ErrorKind::LimitExceeded, "image too large"));
                }
            }
            // Every block describing the run must exist before the run is taken; creating
            // one may use a cluster of the run, so search again afterwards.
            let mut created = false;
            for b in (start >> shift)..=((start + n - 1) >> shift) {
                if self.block(storage, b)?.is_none() {
                    self.new_block(storage, b)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for c in start..start + n {
                self.add(storage, c, 1)?;
            }
            self.cursor = start + n;
            return Ok(start << self.cluster_bits);
        }
    }

    /// Allocate enough clusters for `bytes` bytes.
    pub fn alloc_bytes<S: Storage + ?Sized>(&mut self, storage: &S, bytes: u64) -> Result<u64> {
        let n = bytes.div_ceil(self.cluster_size());
        self.alloc(storage, n)
    }

    /// Decrement every cluster of `[off, off + bytes)` (freeing metadata no longer used).
    pub fn free_bytes<S: Storage + ?Sized>(
        &mut self,
        storage: &S,
        off: u64,
        bytes: u64,
    ) -> Result<()> {
        let n = bytes.div_ceil(self.cluster_size()).max(1);
        self.add_range(storage, off, n << self.cluster_bits, -1)
    }

    /// Turn the changes made in memory into a refcount structure of their own, which shares
    /// nothing that changed with the one on disk: every changed block that the on-disk table
    /// points to moves to a fresh cluster (its old cluster freed), and a new table is placed
    /// in fresh clusters (the old one freed). Moving a block changes refcounts too, so this
    /// repeats until every changed block is fresh. Returns the new table's offset and
    /// clusters, for the header switch. Nothing is written.
    pub fn prepare<S: Storage + ?Sized>(&mut self, storage: &S) -> Result<(u64, u32)> {
        if !self.blocks.list.iter().any(|(_, b)| b.dirty) {
            return Ok((self.table_offset, self.table_clusters));
        }
        let cs = self.cluster_size();
        let old_bytes = u64::from(self.table_clusters) << self.cluster_bits;
        for c in 0..u64::from(self.table_clusters) {
            self.freed
                .insert((self.table_offset >> self.cluster_bits) + c);
        }
        self.free_bytes(storage, self.table_offset, old_bytes)?;
        let mut placed: Option<(u64, u64)> = None;
        loop {
            self.move_changed_blocks(storage)?;
            let need = (self.table.len() as u64 * 8)
                .div_ceil(cs)
                .max(u64::from(self.table_clusters));
            match placed {
                Some((_, n)) if n >= need => break,
                Some((off, n)) => self.free_bytes(storage, off, n * cs)?,
                None => {}
            }
            if need * cs > MAX_REFTABLE_SIZE {
                return Err(Error::new(
                    ErrorKind::LimitExceeded,
                    "refcount table too large",
                ));
            }
            placed = Some((self.alloc(storage, need)?, need));
        }
        let (off, n) = placed.expect("placed in the loop");
        self.pending_table = Some((off, n as u32));
        Ok((off, n as u32))
    }

    /// Move every changed block still at its on-disk place to a fresh cluster.
    fn move_changed_blocks<S: Storage + ?Sized>(&mut self, storage: &S) -> Result<()> {
        loop {
            let stale: Vec<u64> = self
                .blocks
                .list
                .iter()
                .filter(|(b, blk)| blk.dirty && !self.fresh.contains(b))
                .map(|(b, _)| *b)
                .collect();
            if stale.is_empty() {
                return Ok(());
            }
            for b in stale {
                let old = self.table[b as usize] & REFT_OFFSET_MASK;
                self.fresh.insert(b);
                self.freed.insert(old >> self.cluster_bits);
                let new = self.alloc(storage, 1)?;
                self.table[b as usize] = new;
                self.add(storage, old >> self.cluster_bits, -1)?;
            }
        }
    }

    /// Write what [`Refcounts::prepare`] planned: every changed block (all in fresh
    /// clusters, in offset order) and the new table. No flush: the caller flushes once
    /// before the header switch.
    pub fn write<S: Storage + ?Sized>(&mut self, storage: &S) -> Result<()> {
        let mut dirty: Vec<(u64, usize)> = self
            .blocks
            .list
            .iter()
            .enumerate()
            .filter(|(_, (_, blk))| blk.dirty)
            .map(|(i, (b, _))| (self.table[*b as usize] & REFT_OFFSET_MASK, i))
            .collect();
        dirty.sort_unstable();
        for (off, i) in dirty {
            let blk = &self.blocks.list[i].1;
            storage
                .write_at(&blk.data, off)
                .map_err(io("cannot write a refcount block", off))?;
        }
        if let Some((off, clusters)) = self.pending_table {
            let mut buf: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            buf.resize((u64::from(clusters) << self.cluster_bits) as usize, 0);
            storage
                .write_at(&buf, off)
                .map_err(io("cannot write the refcount table", off))?;
        }
        Ok(())
    }

    /// After the header points at the new structure: it is the one on disk now.
    pub fn committed(&mut self) {
        if let Some((off, clusters)) = self.pending_table.take() {
            self.table_offset = off;
            self.table_clusters = clusters;
        }
        for (_, blk) in self.blocks.list.iter_mut() {
            blk.dirty = false;
        }
        self.fresh.clear();
        // Clusters freed in the operation may be reused from now on.
        if let Some(&first) = self.freed.iter().min() {
            self.cursor = self.cursor.min(first);
        }
        self.freed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Refcounts;

    #[test]
    fn entries_of_every_width_round_trip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut data = vec![0u8; 64];
            let n = (64 * 8 / bits) as u64;
            for i in 0..n {
                Refcounts::entry_set(
                    &mut data,
                    order,
                    i,
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & max,
                );
            }
            for i in 0..n {
                let want = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(
                    Refcounts::entry_get(&data, order, i),
                    want,
                    "order {order} i {i}"
                );
            }
            // Sub-byte widths are packed from the least significant bit (QEMU's layout).
            if order < 3 {
                let mut d = vec![0u8; 1];
                Refcounts::entry_set(&mut d, order, 0, 1);
                assert_eq!(d[0], 1, "order {order}");
            }
        }
    }

    /// The structure `prepare` builds shares no changed cluster with the one on disk: the
    /// on-disk table and blocks are byte for byte as before until the header switch, and
    /// the new structure counts the old table and blocks as free.
    #[test]
    fn prepare_leaves_the_on_disk_structure_untouched() {
        use crate::qcow2::Qcow2;
        use crate::qcow2_write::{create, CreateOptions};
        use crate::storage::MemStorage;
        let mem = MemStorage::from_bytes(Vec::new());
        let opts = CreateOptions {
            size: 1 << 30,
            backing_file: None,
            backing_format: None,
        };
        create(&mem, &opts).unwrap();
        let h = Qcow2::read(&mem).unwrap().header;
        let before = mem.to_bytes();
        let mut rc = Refcounts::load(&mem, &h).unwrap();
        let a = rc.alloc(&mem, 3).unwrap();
        rc.add(&mem, 3, 1).unwrap(); // the L1 cluster
        let (off, clusters) = rc.prepare(&mem).unwrap();
        assert_ne!(off, h.refcount_table_offset);
        assert_eq!(clusters, 1);
        rc.write(&mem).unwrap();
        let after = mem.to_bytes();
        // Only clusters past the old end were written.
        assert_eq!(after[..before.len()], before[..]);
        rc.committed();
        let cb = h.cluster_bits;
        // Old table (cluster 1) and old block (cluster 2) are free; the allocation is not.
        assert_eq!(rc.get(&mem, h.refcount_table_offset >> cb).unwrap(), 0);
        assert_eq!(rc.get(&mem, 2).unwrap(), 0);
        assert_eq!(rc.get(&mem, a >> cb).unwrap(), 1);
        assert_eq!(rc.get(&mem, 3).unwrap(), 2);
        assert_eq!(rc.get(&mem, off >> cb).unwrap(), 1);
        // Freed clusters are reused only in a later operation.
        let again = rc.alloc(&mem, 1).unwrap();
        assert_eq!(again >> cb, 1);
    }
}
