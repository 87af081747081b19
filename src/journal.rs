//! The tables the kernel still refers to, kept where the death of a server cannot lose them.
//!
//! A server that dies is replaced by a new one on the same FUSE connection (see
//! `supervise`). The kernel goes on using what the dead one told it: node ids and their lookup
//! counts, open file handles, the passthrough backing id of each open inode, the result of
//! `FUSE_INIT`. They are written here before each reply that hands them out, as records
//! appended to a memfd that the supervisor keeps open. A write to a memfd never waits on a
//! disk or another filesystem, and what is written stays when the writer dies.
//!
//! Layout: a 4 KiB header (`MAGIC`, format, the active region), then two regions of
//! `REGION` bytes. Records (`len`, checksum, payload) follow each other in the active region
//! and end at the first record whose length is zero or whose checksum is wrong (a record cut
//! by the writer's death). When the log grows past what the tables need, the tables are
//! written afresh into the other region and the header switches to it in one 4-byte write.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::sync::Mutex;

/// The journal format this binary writes; it also reads every format in [`READS`].
pub const FORMAT: u32 = 1;
/// The formats this binary can take over (`imagecachefs restart` refuses a binary that does
/// not read the running journal's format).
pub const READS: &[u32] = &[1];

/// Bit 63 of a request's `unique`: set on a copy the kernel resends. Requests are journaled
/// under their `unique` without it, so that a copy resent again (after a second server died)
/// finds what the first copy did.
const RESENT: u64 = 1 << 63;

const MAGIC: &[u8; 8] = b"ICFSJRNL";
const HEADER: u64 = 4096;
/// Room for each region (sparse: only what is written takes memory).
const REGION: u64 = 256 << 20;
/// The log is rewritten once it is this long and four times what the tables need.
const COMPACT_MIN: u64 = 1 << 20;
/// A status-file rendering larger than this is not kept for a new server (it renders the
/// file again for a handle that reads on).
pub const SNAPSHOT_MAX: usize = 4 << 20;
/// The renderings kept at most, together.
const SNAPSHOTS_MAX: usize = 32 << 20;
/// Results of requests kept for resends (most recent first out).
const DONE_MAX: usize = 4096;

/// What `FUSE_INIT` settled, needed to serve the connection without a new handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Init {
    pub major: u32,
    pub minor: u32,
    /// The kernel's capability flags (`FUSE_HAS_RESEND` among them).
    pub kernel_flags: u64,
    pub passthrough: bool,
}

/// A node the kernel knows: how to find its file again, and its lookup count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRec {
    /// The covered file's inode number (the node id itself unless mapped).
    pub ino: u64,
    pub parent: u64,
    pub name: Vec<u8>,
    /// `name_to_handle_at` handle (type, then bytes), empty where the filesystem has none.
    pub handle: Vec<u8>,
    pub nlookup: u64,
    /// Creation order: parents come before their children when the tables are rewritten.
    seq: u64,
}

impl NodeRec {
    /// Creation order (parents before children).
    pub fn order(&self) -> u64 {
        self.seq
    }
}

/// An open file handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenRec {
    pub ino: u64,
    /// `open(2)` flags for the daemon's own fd.
    pub flags: i32,
    pub write: bool,
    /// The passthrough backing id replied with (0: daemon I/O).
    pub backing: u32,
    pub pid: u32,
    /// The request that opened it (a resent open gets this handle back).
    pub unique: u64,
}

/// The result a request got, for a resent copy of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Err(i32),
    /// A new entry: the node id.
    Entry(u64),
    Written(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Record {
    Init(Init),
    Incarnation(u32),
    Node {
        id: u64,
        rec: NodeRec,
    },
    Lookup {
        id: u64,
        n: u64,
    },
    Forget {
        id: u64,
        n: u64,
    },
    Open {
        fh: u64,
        rec: OpenRec,
    },
    Release {
        fh: u64,
    },
    Done {
        unique: u64,
        outcome: Outcome,
    },
    /// Node id `id` stands for inode number `ino` (one too large to be its own id).
    Map {
        id: u64,
        ino: u64,
    },
    /// A status-file rendering, named `sid`.
    Snapshot {
        sid: u64,
        bytes: Vec<u8>,
    },
    /// Status-file handle `fh` reads rendering `sid`.
    Status {
        fh: u64,
        sid: u64,
    },
}

/// Everything the records say, applied in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub init: Option<Init>,
    /// How many servers have served this connection (the newest's number).
    pub incarnation: u32,
    pub nodes: BTreeMap<u64, NodeRec>,
    pub opens: HashMap<u64, OpenRec>,
    /// Node ids given to inode numbers too large to be their own (id → inode number).
    pub mapped: BTreeMap<u64, u64>,
    /// Status-file handles and the rendering each reads (by name, below).
    pub status: HashMap<u64, u64>,
    pub snapshots: HashMap<u64, Vec<u8>>,
    /// How many status handles read each rendering (it goes with the last one).
    readers: HashMap<u64, usize>,
    done: HashMap<u64, Outcome>,
    done_order: VecDeque<u64>,
    next_seq: u64,
}

impl Tables {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Init(i) => self.init = Some(i),
            Record::Incarnation(n) => self.incarnation = n,
            Record::Node { id, mut rec } => {
                rec.seq = self.next_seq;
                self.next_seq += 1;
                self.nodes.insert(id, rec);
            }
            Record::Lookup { id, n } => {
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.nlookup = node.nlookup.saturating_add(n);
                }
            }
            Record::Forget { id, n } => {
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.nlookup = node.nlookup.saturating_sub(n);
                    if node.nlookup == 0 {
                        self.nodes.remove(&id);
                    }
                }
            }
            Record::Open { fh, rec } => {
                self.opens.insert(fh, rec);
            }
            Record::Release { fh } => {
                self.opens.remove(&fh);
                if let Some(sid) = self.status.remove(&fh) {
                    let left = self.readers.get_mut(&sid).map(|n| {
                        *n -= 1;
                        *n
                    });
                    if left == Some(0) {
                        self.readers.remove(&sid);
                        self.snapshots.remove(&sid);
                    }
                }
            }
            Record::Snapshot { sid, bytes } => {
                self.snapshots.insert(sid, bytes);
            }
            Record::Status { fh, sid } => {
                if self.snapshots.contains_key(&sid) && self.status.insert(fh, sid).is_none() {
                    *self.readers.entry(sid).or_default() += 1;
                }
            }
            Record::Map { id, ino } => {
                self.mapped.insert(id, ino);
            }
            Record::Done { unique, outcome } => {
                if self.done.insert(unique, outcome).is_none() {
                    self.done_order.push_back(unique);
                }
                while self.done_order.len() > DONE_MAX {
                    if let Some(old) = self.done_order.pop_front() {
                        self.done.remove(&old);
                    }
                }
            }
        }
    }

    /// The result recorded for request `unique`.
    pub fn done(&self, unique: u64) -> Option<Outcome> {
        self.done.get(&unique).copied()
    }

    /// The handle a request `unique` opened.
    pub fn opened_by(&self, unique: u64) -> Option<(u64, OpenRec)> {
        self.opens.iter().find(|(_, o)| o.unique == unique).map(|(fh, o)| (*fh, *o))
    }

    /// The records that rebuild these tables.
    fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        if let Some(i) = self.init {
            out.push(Record::Init(i));
        }
        out.push(Record::Incarnation(self.incarnation));
        for (&id, &ino) in &self.mapped {
            out.push(Record::Map { id, ino });
        }
        let mut nodes: Vec<(&u64, &NodeRec)> = self.nodes.iter().collect();
        nodes.sort_by_key(|(_, n)| n.seq);
        for (id, rec) in nodes {
            out.push(Record::Node { id: *id, rec: rec.clone() });
        }
        for (fh, rec) in &self.opens {
            out.push(Record::Open { fh: *fh, rec: *rec });
        }
        for (sid, bytes) in &self.snapshots {
            out.push(Record::Snapshot { sid: *sid, bytes: bytes.clone() });
        }
        for (fh, sid) in &self.status {
            out.push(Record::Status { fh: *fh, sid: *sid });
        }
        for unique in &self.done_order {
            out.push(Record::Done { unique: *unique, outcome: self.done[unique] });
        }
        out
    }
}

fn checksum(b: &[u8]) -> u32 {
    // FNV-1a: it only has to catch a record cut short, not an adversary.
    let mut h: u32 = 0x811c_9dc5;
    for &x in b {
        h = (h ^ x as u32).wrapping_mul(0x0100_0193);
    }
    h
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
}

fn encode(r: &Record) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(64));
    match r {
        Record::Init(i) => {
            e.u8(1);
            e.u32(i.major);
            e.u32(i.minor);
            e.u64(i.kernel_flags);
            e.u8(i.passthrough as u8);
        }
        Record::Incarnation(n) => {
            e.u8(2);
            e.u32(*n);
        }
        Record::Node { id, rec } => {
            e.u8(3);
            e.u64(*id);
            e.u64(rec.ino);
            e.u64(rec.parent);
            e.bytes(&rec.name);
            e.bytes(&rec.handle);
            e.u64(rec.nlookup);
        }
        Record::Lookup { id, n } => {
            e.u8(4);
            e.u64(*id);
            e.u64(*n);
        }
        Record::Forget { id, n } => {
            e.u8(5);
            e.u64(*id);
            e.u64(*n);
        }
        Record::Open { fh, rec } => {
            e.u8(6);
            e.u64(*fh);
            e.u64(rec.ino);
            e.u32(rec.flags as u32);
            e.u8(rec.write as u8);
            e.u32(rec.backing);
            e.u32(rec.pid);
            e.u64(rec.unique);
        }
        Record::Release { fh } => {
            e.u8(7);
            e.u64(*fh);
        }
        Record::Map { id, ino } => {
            e.u8(9);
            e.u64(*id);
            e.u64(*ino);
        }
        Record::Snapshot { sid, bytes } => {
            e.u8(10);
            e.u64(*sid);
            e.bytes(bytes);
        }
        Record::Status { fh, sid } => {
            e.u8(11);
            e.u64(*fh);
            e.u64(*sid);
        }
        Record::Done { unique, outcome } => {
            e.u8(8);
            e.u64(*unique);
            match outcome {
                Outcome::Ok => e.u8(0),
                Outcome::Err(n) => {
                    e.u8(1);
                    e.u32(*n as u32);
                }
                Outcome::Entry(id) => {
                    e.u8(2);
                    e.u64(*id);
                }
                Outcome::Written(n) => {
                    e.u8(3);
                    e.u32(*n);
                }
            }
        }
    }
    e.0
}

fn decode(b: &[u8]) -> Option<Record> {
    let mut d = Dec(b);
    let r = match d.u8()? {
        1 => Record::Init(Init {
            major: d.u32()?,
            minor: d.u32()?,
            kernel_flags: d.u64()?,
            passthrough: d.u8()? != 0,
        }),
        2 => Record::Incarnation(d.u32()?),
        3 => Record::Node {
            id: d.u64()?,
            rec: NodeRec {
                ino: d.u64()?,
                parent: d.u64()?,
                name: d.bytes()?,
                handle: d.bytes()?,
                nlookup: d.u64()?,
                seq: 0,
            },
        },
        4 => Record::Lookup { id: d.u64()?, n: d.u64()? },
        5 => Record::Forget { id: d.u64()?, n: d.u64()? },
        6 => Record::Open {
            fh: d.u64()?,
            rec: OpenRec {
                ino: d.u64()?,
                flags: d.u32()? as i32,
                write: d.u8()? != 0,
                backing: d.u32()?,
                pid: d.u32()?,
                unique: d.u64()?,
            },
        },
        7 => Record::Release { fh: d.u64()? },
        9 => Record::Map { id: d.u64()?, ino: d.u64()? },
        10 => Record::Snapshot { sid: d.u64()?, bytes: d.bytes()? },
        11 => Record::Status { fh: d.u64()?, sid: d.u64()? },
        8 => Record::Done {
            unique: d.u64()?,
            outcome: match d.u8()? {
                0 => Outcome::Ok,
                1 => Outcome::Err(d.u32()? as i32),
                2 => Outcome::Entry(d.u64()?),
                3 => Outcome::Written(d.u32()?),
                _ => return None,
            },
        },
        _ => return None,
    };
    d.0.is_empty().then_some(r)
}

/// One record as stored: length, checksum, payload.
fn frame(r: &Record, out: &mut Vec<u8>) {
    let p = encode(r);
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&p).to_le_bytes());
    out.extend_from_slice(&p);
}

fn region_start(r: u32) -> u64 {
    HEADER + r as u64 * REGION
}

struct Writer {
    region: u32,
    /// Where the next record goes (absolute offset).
    tail: u64,
    tables: Tables,
    /// Bytes the tables would take if written afresh (estimated at the last rewrite).
    base: u64,
    /// Set after a write failed: journaling stopped (a restart then loses these tables).
    broken: bool,
}

/// The journal of one FUSE connection.
pub struct Journal {
    file: File,
    w: Mutex<Writer>,
}

impl Journal {
    /// A new, empty journal (a memfd, not inherited by programs the caller starts).
    pub fn create() -> io::Result<OwnedFd> {
        let fd = unsafe { libc::memfd_create(c"imagecachefs-journal".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(HEADER + 2 * REGION)?;
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&FORMAT.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        file.write_all_at(&h, 0)?;
        Ok(file.into())
    }

    /// The format of the journal behind `fd`.
    pub fn format_of(fd: BorrowedFd<'_>) -> io::Result<u32> {
        let file = File::from(fd.try_clone_to_owned()?);
        let mut h = [0u8; 16];
        file.read_exact_at(&mut h, 0)?;
        if &h[..8] != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not an imagecachefs journal"));
        }
        Ok(u32::from_le_bytes(h[8..12].try_into().unwrap()))
    }

    /// Opens the journal behind `fd` (a duplicate is kept) and reads its tables.
    pub fn open(fd: BorrowedFd<'_>) -> io::Result<Journal> {
        let format = Self::format_of(fd)?;
        if !READS.contains(&format) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("journal format {format}; this binary reads {READS:?}"),
            ));
        }
        let file = File::from(fd.try_clone_to_owned()?);
        let mut h = [0u8; 16];
        file.read_exact_at(&mut h, 0)?;
        let region = u32::from_le_bytes(h[12..16].try_into().unwrap()) & 1;
        let (tables, tail) = Self::replay(&file, region)?;
        let base = tail - region_start(region);
        let w = Writer { region, tail, tables, base, broken: false };
        Ok(Journal { file, w: Mutex::new(w) })
    }

    fn replay(file: &File, region: u32) -> io::Result<(Tables, u64)> {
        let mut tables = Tables::default();
        let mut at = region_start(region);
        let end = at + REGION;
        let mut head = [0u8; 8];
        while at + 8 <= end {
            file.read_exact_at(&mut head, at)?;
            let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as u64;
            let sum = u32::from_le_bytes(head[4..].try_into().unwrap());
            if len == 0 || at + 8 + len > end {
                break;
            }
            let mut p = vec![0u8; len as usize];
            file.read_exact_at(&mut p, at + 8)?;
            if checksum(&p) != sum {
                break;
            }
            let Some(r) = decode(&p) else { break };
            tables.apply(r);
            at += 8 + len;
        }
        Ok((tables, at))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A copy of the tables as the records say now.
    pub fn tables(&self) -> Tables {
        self.w.lock().tables.clone()
    }

    fn append(&self, r: Record) {
        let mut w = self.w.lock();
        if w.broken {
            return;
        }
        let mut buf = Vec::with_capacity(80);
        frame(&r, &mut buf);
        w.tables.apply(r);
        let used = w.tail - region_start(w.region);
        let full = used + buf.len() as u64 + 8 > REGION;
        if full || (used > COMPACT_MIN && used > 4 * w.base.max(1)) {
            if let Err(e) = self.rewrite(&mut w) {
                log::error!("journal: rewriting the tables failed ({e}): a restart loses them");
                w.broken = true;
            }
            // The rewrite already holds this record (it was applied first).
            return;
        }
        // The record and an end marker in one write; the next record overwrites the marker.
        buf.extend_from_slice(&[0u8; 8]);
        if let Err(e) = self.file.write_all_at(&buf, w.tail) {
            log::error!("journal: write failed ({e}): a restart loses the tables");
            w.broken = true;
            return;
        }
        w.tail += buf.len() as u64 - 8;
    }

    /// Writes the tables into the other region and switches to it.
    fn rewrite(&self, w: &mut Writer) -> io::Result<()> {
        let other = w.region ^ 1;
        let mut buf = Vec::new();
        for r in w.tables.records() {
            frame(&r, &mut buf);
        }
        if buf.len() as u64 + 8 > REGION {
            return Err(io::Error::other("the tables outgrew the journal"));
        }
        let start = region_start(other);
        buf.extend_from_slice(&[0u8; 8]);
        self.file.write_all_at(&buf, start)?;
        // One 4-byte write switches; a death before it leaves the old region in force.
        self.file.write_all_at(&other.to_le_bytes(), 12)?;
        let old = region_start(w.region);
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                old as libc::off_t,
                REGION as libc::off_t,
            )
        };
        w.region = other;
        w.base = buf.len() as u64 - 8;
        w.tail = start + w.base;
        Ok(())
    }

    pub fn init(&self, i: Init) {
        self.append(Record::Init(i));
    }

    /// A new server: its number, which prefixes the file handles it hands out.
    pub fn next_incarnation(&self) -> u32 {
        let n = self.w.lock().tables.incarnation.wrapping_add(1).max(1);
        self.append(Record::Incarnation(n));
        n
    }

    pub fn node(&self, id: u64, ino: u64, parent: u64, name: &[u8], handle: Vec<u8>) {
        let rec = NodeRec { ino, parent, name: name.to_vec(), handle, nlookup: 0, seq: 0 };
        self.append(Record::Node { id, rec });
    }

    pub fn mapped(&self, id: u64, ino: u64) {
        self.append(Record::Map { id, ino });
    }

    pub fn lookup(&self, id: u64, n: u64) {
        self.append(Record::Lookup { id, n });
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.append(Record::Forget { id, n });
    }

    pub fn opened(&self, fh: u64, mut rec: OpenRec) {
        rec.unique &= !RESENT;
        self.append(Record::Open { fh, rec });
    }

    /// A status-file handle `fh` reading rendering `sid` (its bytes written once, while
    /// handles read it; none past [`SNAPSHOT_MAX`], nor past [`SNAPSHOTS_MAX`] together).
    pub fn status_opened(&self, fh: u64, sid: u64, bytes: &[u8]) {
        let known = {
            let w = self.w.lock();
            if w.tables.snapshots.contains_key(&sid) {
                true
            } else {
                let held: usize = w.tables.snapshots.values().map(Vec::len).sum();
                if bytes.len() > SNAPSHOT_MAX || held + bytes.len() > SNAPSHOTS_MAX {
                    return;
                }
                false
            }
        };
        if !known {
            self.append(Record::Snapshot { sid, bytes: bytes.to_vec() });
        }
        self.append(Record::Status { fh, sid });
    }

    pub fn released(&self, fh: u64) {
        self.append(Record::Release { fh });
    }

    pub fn done(&self, unique: u64, outcome: Outcome) {
        self.append(Record::Done { unique: unique & !RESENT, outcome });
    }

    /// The result recorded for request `unique` (a resent request).
    pub fn outcome(&self, unique: u64) -> Option<Outcome> {
        self.w.lock().tables.done(unique & !RESENT)
    }

    /// The handle request `unique` opened (a resent open).
    pub fn opened_by(&self, unique: u64) -> Option<(u64, OpenRec)> {
        self.w.lock().tables.opened_by(unique & !RESENT)
    }
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the type (4 bytes) and the handle, or empty
/// where the filesystem has none.
pub fn file_handle(fd: BorrowedFd<'_>) -> Vec<u8> {
    const MAX: usize = 128;
    #[repr(C)]
    struct Fh {
        bytes: u32,
        kind: i32,
        data: [u8; MAX],
    }
    let mut fh = Fh { bytes: MAX as u32, kind: 0, data: [0; MAX] };
    let mut mount_id: libc::c_int = 0;
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut fh as *mut Fh,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 || fh.bytes as usize > MAX {
        return Vec::new();
    }
    let mut out = fh.kind.to_le_bytes().to_vec();
    out.extend_from_slice(&fh.data[..fh.bytes as usize]);
    out
}

/// Opens (`O_PATH`) the file a [`file_handle`] names, on the filesystem of `mount_fd` (an
/// fd opened for reading: the kernel refuses an `O_PATH` one).
pub fn open_handle(mount_fd: BorrowedFd<'_>, handle: &[u8]) -> io::Result<OwnedFd> {
    if handle.len() < 4 || handle.len() > 4 + 128 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&((handle.len() - 4) as u32).to_le_bytes());
    buf.extend_from_slice(handle);
    // `struct file_handle` is read as u32 + i32 + bytes; keep it aligned.
    let mut aligned = vec![0u64; buf.len().div_ceil(8)];
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(aligned.as_mut_ptr() as *mut u8, aligned.len() * 8)
    };
    bytes[..buf.len()].copy_from_slice(&buf);
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            aligned.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Init(Init { major: 7, minor: 40, kernel_flags: 1 << 39, passthrough: true }),
            Record::Incarnation(3),
            Record::Node {
                id: 12,
                rec: NodeRec {
                    ino: 12,
                    parent: 1,
                    name: b"base".to_vec(),
                    handle: vec![1, 2, 3, 4, 5],
                    nlookup: 0,
                    seq: 0,
                },
            },
            Record::Lookup { id: 12, n: 2 },
            Record::Open {
                fh: 7 << 40 | 1,
                rec: OpenRec {
                    ino: 12,
                    flags: 2,
                    write: true,
                    backing: 4,
                    pid: 99,
                    unique: 1 << 63 | 5,
                },
            },
            Record::Done { unique: 8, outcome: Outcome::Err(17) },
            Record::Done { unique: 9, outcome: Outcome::Entry(12) },
            Record::Done { unique: 10, outcome: Outcome::Written(4096) },
            Record::Done { unique: 11, outcome: Outcome::Ok },
            Record::Forget { id: 12, n: 1 },
            Record::Release { fh: 3 },
            Record::Map { id: 1 << 61, ino: u64::MAX - 5 },
            Record::Snapshot { sid: 4, bytes: b"{\"images\":[]}".to_vec() },
            Record::Status { fh: 9, sid: 4 },
        ]
    }

    #[test]
    fn every_record_reads_back_as_written() {
        for r in sample() {
            assert_eq!(decode(&encode(&r)), Some(r.clone()), "{r:?}");
        }
        // A record cut short or with bytes after it is refused.
        let whole = encode(&sample()[2]);
        assert_eq!(decode(&whole[..whole.len() - 1]), None);
        let mut longer = whole.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
        assert_eq!(decode(&[99]), None);
    }

    /// The tables without creation order (renumbered by a rewrite).
    fn same(mut t: Tables) -> Tables {
        t.next_seq = 0;
        for n in t.nodes.values_mut() {
            n.seq = 0;
        }
        t
    }

    fn journal() -> Journal {
        let fd = Journal::create().unwrap();
        Journal::open(fd.as_fd()).unwrap()
    }

    #[test]
    fn a_reopened_journal_has_the_same_tables() {
        let j = journal();
        assert_eq!(j.next_incarnation(), 1);
        j.init(Init { major: 7, minor: 40, kernel_flags: 5, passthrough: true });
        j.node(12, 12, 1, b"base", vec![1, 0, 0, 0, 9]);
        j.mapped(1 << 61, u64::MAX);
        j.lookup(12, 3);
        j.opened(100, OpenRec { ino: 12, backing: 2, unique: 77, ..Default::default() });
        j.opened(101, OpenRec { ino: 12, backing: 2, unique: 78, ..Default::default() });
        j.released(100);
        j.forget(12, 1);
        j.done(55, Outcome::Entry(12));
        let again = Journal::open(j.fd()).unwrap();
        let t = again.tables();
        assert_eq!(same(t.clone()), same(j.tables()));
        assert_eq!(t.incarnation, 1);
        assert_eq!(t.nodes[&12].nlookup, 2);
        assert_eq!(t.mapped.get(&(1 << 61)), Some(&u64::MAX));
        assert_eq!(t.opens.len(), 1);
        assert_eq!(again.opened_by(78).map(|(fh, _)| fh), Some(101));
        assert_eq!(again.outcome(55), Some(Outcome::Entry(12)));
        assert_eq!(again.next_incarnation(), 2);
    }

    /// An OPEN whose first server died before it journaled anything is resent (bit 63 set);
    /// the server that runs that copy dies too before replying, and the kernel resends it
    /// again: the third server must find the handle the second one opened, not open another
    /// (whose reference no RELEASE would ever drop).
    #[test]
    fn a_request_resent_twice_finds_what_its_first_resent_copy_did() {
        let j = journal();
        let u = 4242;
        j.opened(7, OpenRec { ino: 12, unique: u | RESENT, ..Default::default() });
        j.done(u | RESENT, Outcome::Entry(12));
        let again = Journal::open(j.fd()).unwrap();
        // Asked with or without the bit (the adapter strips it), the handle is found.
        assert_eq!(again.opened_by(u).map(|(fh, _)| fh), Some(7));
        assert_eq!(again.opened_by(u | RESENT).map(|(fh, _)| fh), Some(7));
        assert_eq!(again.outcome(u | RESENT), Some(Outcome::Entry(12)));
    }

    #[test]
    fn a_rendering_is_kept_while_a_handle_reads_it() {
        let j = journal();
        j.status_opened(1, 7, b"abc");
        j.status_opened(2, 7, b"abc");
        j.status_opened(3, 8, &vec![0; SNAPSHOT_MAX + 1]);
        let t = Journal::open(j.fd()).unwrap().tables();
        assert_eq!(t.status.get(&1), Some(&7));
        assert_eq!(t.snapshots.get(&7).map(Vec::as_slice), Some(&b"abc"[..]));
        assert!(!t.status.contains_key(&3), "too large to keep");
        j.released(1);
        assert!(j.tables().snapshots.contains_key(&7), "handle 2 still reads it");
        j.released(2);
        assert!(j.tables().snapshots.is_empty());
    }

    #[test]
    fn a_node_forgotten_to_zero_is_gone() {
        let j = journal();
        j.node(5, 5, 1, b"x", Vec::new());
        j.lookup(5, 2);
        j.forget(5, 2);
        assert!(Journal::open(j.fd()).unwrap().tables().nodes.is_empty());
    }

    #[test]
    fn a_record_cut_by_death_ends_the_log_there() {
        let j = journal();
        j.node(5, 5, 1, b"x", Vec::new());
        j.lookup(5, 1);
        let tail = j.w.lock().tail;
        // A record whose length was written but whose payload was not.
        let mut cut = Vec::new();
        frame(&Record::Lookup { id: 5, n: 1 }, &mut cut);
        j.file.write_all_at(&cut[..10], tail).unwrap();
        let t = Journal::open(j.fd()).unwrap().tables();
        assert_eq!(t.nodes[&5].nlookup, 1);
    }

    #[test]
    fn a_long_log_is_rewritten_and_keeps_the_tables() {
        let j = journal();
        j.next_incarnation();
        j.node(5, 5, 1, b"x", vec![1, 0, 0, 0, 7]);
        j.mapped(1 << 61, 1 << 63);
        j.lookup(5, 1);
        // Enough lookups and forgets to pass the rewrite threshold several times.
        for i in 0..200_000u64 {
            j.lookup(5, 1);
            j.forget(5, 1);
            if i % 1000 == 0 {
                j.opened(i, OpenRec { ino: 5, unique: i, ..Default::default() });
                j.released(i);
            }
        }
        let w = j.w.lock();
        let used = w.tail - region_start(w.region);
        assert!(used < 2 * COMPACT_MIN, "the log was not rewritten: {used} bytes");
        drop(w);
        let t = Journal::open(j.fd()).unwrap().tables();
        assert_eq!(same(t.clone()), same(j.tables()));
        assert_eq!(t.nodes[&5].nlookup, 1);
        assert_eq!(t.nodes[&5].handle, vec![1, 0, 0, 0, 7]);
        assert_eq!(t.mapped.get(&(1 << 61)), Some(&(1 << 63)), "a rewrite keeps the map");
        assert!(t.opens.is_empty());
        assert_eq!(t.incarnation, 1);
    }

    #[test]
    fn results_for_resends_are_bounded() {
        let j = journal();
        for u in 0..(DONE_MAX as u64 + 10) {
            j.done(u, Outcome::Ok);
        }
        let t = j.tables();
        assert_eq!(t.done.len(), DONE_MAX);
        assert_eq!(t.done(0), None);
        assert_eq!(t.done(DONE_MAX as u64 + 9), Some(Outcome::Ok));
    }

    #[test]
    fn a_foreign_file_or_format_is_refused() {
        let fd = Journal::create().unwrap();
        let f = File::from(fd.try_clone().unwrap());
        f.write_all_at(&99u32.to_le_bytes(), 8).unwrap();
        let e = Journal::open(fd.as_fd()).err().unwrap();
        assert!(e.to_string().contains("format 99"), "{e}");
        f.write_all_at(b"NOTAJRNL", 0).unwrap();
        assert!(Journal::open(fd.as_fd()).is_err());
    }

    #[test]
    fn file_handles_reopen_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        // The root as the server holds it: an `O_PATH` fd.
        let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        let root = crate::backing::open_dir_path(&c).unwrap();
        assert!(open_handle(root.as_fd(), &[0; 8]).is_err(), "an O_PATH fd is refused");
        let root =
            crate::backing::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).unwrap();
        let f = File::open(dir.path().join("f")).unwrap();
        let h = file_handle(f.as_fd());
        assert!(!h.is_empty(), "the test directory's filesystem gives file handles");
        let again = open_handle(root.as_fd(), &h).unwrap();
        let a = crate::backing::stat(f.as_fd()).unwrap();
        let b = crate::backing::stat(again.as_fd()).unwrap();
        assert_eq!((a.dev, a.ino), (b.dev, b.ino));
    }
}
