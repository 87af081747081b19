//! The cache's bookkeeping: one entry per cache file (a regular file in the cache directory's
//! root), its live references, pins, last use, checksum and verification result, and the
//! events an operator reads. Pure: no clock, no files, no locks; every change takes `now`.
//!
//! Invariants:
//! - A reference is one open file handle (`fh`). `reference()` is the only way references
//!   change: an open adds one, its release removes it (unknown handles change nothing, counts
//!   never go below zero, and an entry is never revived by a late release).
//! - A file's identity is its inode: a rename moves the name and keeps everything else
//!   (`X.converted` → `X` carries the checksum); an unlinked file leaves the table when its
//!   last handle goes.
//! - A file is evictable only when nothing blocks it (`blocker()`): no open handle, no
//!   writer, no pin, no holder from before the mount, not named as a backing file, and its
//!   deadline has passed.
//! - A checksum is only ever compared with the content it was taken of: it carries the
//!   file's [`Stamp`] (inode, size, mtime), and a file whose stamp moved was written, not
//!   corrupted. A data change seen through the mount (truncate) drops the checksum; a
//!   write-open alone does not (the stamp decides once the last writer is gone); a touch
//!   moves the stamp's mtime along if nothing else had changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use crate::clock::{from_unix_secs, unix_secs};
use crate::kind::Kind;
use crate::procfs::Holder;
use crate::verify::hex;

/// How many events `events` keeps.
pub const EVENTS_KEPT: usize = 512;

/// Eviction thresholds and switches (defaults are Nova's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Originals, ephemeral and swap backing files (`remove_unused_original_minimum_age_seconds`).
    pub original_min_age: u64,
    /// Resized and unrecognised files (`remove_unused_resized_minimum_age_seconds`).
    pub resized_min_age: u64,
    /// Stale `.part`/`.converted` files with no writer.
    pub partial_min_age: u64,
    /// `false`: never evict by age (`remove_unused_base_images = False`); corrupt files still go.
    pub evict: bool,
    /// The cache directory is on storage other hosts share (its filesystem type) and nothing
    /// coordinates eviction with them: nothing is evicted, for any reason.
    pub shared: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            original_min_age: 86_400,
            resized_min_age: 3_600,
            partial_min_age: 3_600,
            evict: true,
            shared: None,
        }
    }
}

impl Policy {
    pub fn min_age(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Original | Kind::Ephemeral | Kind::Swap => self.original_min_age,
            Kind::Resized | Kind::Other => self.resized_min_age,
            Kind::Partial => self.partial_min_age,
        }
    }
}

/// One open handle on a cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRef {
    pub holder: Holder,
    pub write: bool,
    /// When the handle was opened.
    pub since: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    Never,
    Pending,
    Ok(SystemTime),
    Mismatch(SystemTime),
}

/// What a checksum was taken of: the file's inode, and the size and modification time
/// (nanoseconds) it had when hashing started and still had when hashing ended. The same stamp
/// means the same content, short of corruption; another stamp means the file was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub sha1: [u8; 20],
    pub at: SystemTime,
    pub stamp: Stamp,
    /// The file was opened for writing since: the checksum stands only if the stamp still
    /// matches once the last writer is gone (a write-open that wrote nothing, `touch(1)`).
    pub recheck: bool,
}

/// What the checksum thread is to do with a file, decided from its stamp now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckPlan {
    /// Nothing to do now (a writer came back, the file went or is being evicted).
    Skip,
    /// Writing ended and the stamp did not move: the checksum and its verdict stand, no hash.
    Kept,
    /// Hash the file (a first checksum, one after a change, or a re-verification).
    Hash,
}

/// What a finished hash meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashOutcome {
    /// A new checksum; `replaced`: the one it replaces, for a file changed behind the
    /// daemon's back (its stamp moved without a writer through the mount).
    Created { replaced: Option<[u8; 20]> },
    /// Same stamp, same content.
    Verified,
    /// Same stamp, other content: corrupt.
    Corrupt { expected: [u8; 20] },
}

/// What an operator sees in `state:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    InUse,
    Writing,
    Idle,
    Pinned,
    Referenced,
    Corrupt,
}

impl Use {
    pub fn as_str(self) -> &'static str {
        match self {
            Use::InUse => "in-use",
            Use::Writing => "writing",
            Use::Idle => "idle",
            Use::Pinned => "pinned",
            Use::Referenced => "referenced",
            Use::Corrupt => "corrupt",
        }
    }
}

/// Why a file may not be evicted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocker {
    Writing,
    InUse,
    HeldBeforeMount,
    Pinned,
    Referenced,
    /// The cache is on shared storage: another host may need the file.
    SharedStorage,
    /// Its deadline has not come (or eviction is off).
    NotDue,
}

impl Blocker {
    pub fn as_str(self) -> &'static str {
        match self {
            Blocker::Writing => "being written",
            Blocker::InUse => "in use",
            Blocker::HeldBeforeMount => "held open by a process from before the mount",
            Blocker::Pinned => "pinned",
            Blocker::Referenced => "named as a backing file by an instance disk",
            Blocker::SharedStorage => "on shared storage: another host may use it",
            Blocker::NotDue => "not due",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub name: Option<OsString>,
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub opens: BTreeMap<u64, OpenRef>,
    /// Processes that held the file open before the mount (found through /proc), and whether
    /// they may write it.
    pub early: Vec<(Holder, bool)>,
    pub pinned: bool,
    pub last_used: SystemTime,
    pub checksum: Option<Checksum>,
    pub verified: Verified,
    /// Bumped by every write-open and data change: a hash running meanwhile is abandoned.
    pub write_gen: u64,
    /// Being removed: opens that come now get `ENOENT` (the eviction has won the race).
    pub evicting: bool,
    /// The reason of the last refused eviction that was logged (see `note_refusal`).
    pub last_refusal: Option<&'static str>,
}

impl Image {
    fn unnamed(ino: u64) -> Self {
        Image {
            name: None,
            ino,
            kind: Kind::Other,
            size: 0,
            opens: BTreeMap::new(),
            early: Vec::new(),
            pinned: false,
            last_used: SystemTime::UNIX_EPOCH,
            checksum: None,
            verified: Verified::Never,
            write_gen: 0,
            evicting: false,
            last_refusal: None,
        }
    }

    /// Handles open for writing, through the mount or from before it.
    pub fn writers(&self) -> usize {
        self.opens.values().filter(|o| o.write).count() + self.early.iter().filter(|e| e.1).count()
    }

    pub fn refs(&self) -> usize {
        self.opens.len() + self.early.len()
    }

    pub fn corrupt(&self) -> bool {
        matches!(self.verified, Verified::Mismatch(_))
    }

    /// The checksum as shown: none while the file may be changing (opened for writing, and
    /// its stamp not yet confirmed since).
    pub fn shown_checksum(&self) -> Option<Checksum> {
        self.checksum.filter(|c| !c.recheck)
    }

    /// A write handle appears: a hash running now is abandoned, and the checksum is kept but
    /// must be confirmed by its stamp once writing ends.
    fn begin_write(&mut self) {
        self.write_gen += 1;
        if let Some(c) = &mut self.checksum {
            c.recheck = true;
        }
    }

    /// Corrupt, and not opened for writing through the mount since: whatever changes it
    /// behind the mount, only the recorded content clears the verdict.
    fn corrupt_sticks(&self) -> bool {
        self.corrupt() && self.checksum.is_some_and(|c| !c.recheck)
    }

    /// The content changed: the checksum and its verdict go, a hash running now is abandoned.
    fn drop_checksum(&mut self) {
        self.write_gen += 1;
        self.checksum = None;
        self.verified = Verified::Never;
    }

    /// Seconds since last use; 0 while in use.
    pub fn age(&self, now: SystemTime) -> u64 {
        if self.refs() > 0 {
            return 0;
        }
        now.duration_since(self.last_used).map(|d| d.as_secs()).unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Verified,
    Corrupt,
    Evicted,
    Refused,
    Pinned,
    Unpinned,
    /// The server was replaced on the live connection (name `-`).
    Restarted,
    /// `restart` was refused (name `-`).
    RestartRefused,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Verified => "verified",
            EventKind::Corrupt => "corrupt",
            EventKind::Evicted => "evicted",
            EventKind::Refused => "eviction-refused",
            EventKind::Pinned => "pinned",
            EventKind::Unpinned => "unpinned",
            EventKind::Restarted => "server-restarted",
            EventKind::RestartRefused => "restart-refused",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub at: SystemTime,
    pub kind: EventKind,
    /// The file's name, escaped (`text::escape`): an event is one line whatever the name.
    pub name: String,
    pub detail: String,
}

/// A reference change: the one input that moves reference counts.
#[derive(Clone, Debug)]
pub enum RefChange {
    Open { fh: u64, ino: u64, holder: Holder, write: bool },
    Release { fh: u64 },
}

/// What a reference change means for the background work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefEffect {
    None,
    /// The last writer of this inode is gone: its checksum must be computed (generation given).
    WritingDone {
        ino: u64,
        write_gen: u64,
    },
    /// The last reference of this inode is gone: its deadline may be due.
    Unreferenced {
        ino: u64,
    },
    /// The open lost a race with an eviction: the file is gone, answer `ENOENT`.
    Gone,
}

/// What survives a restart, per name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub last_used: SystemTime,
    pub pinned: bool,
    pub checksum: Option<Checksum>,
    pub verified: Verified,
}

#[derive(Debug, Default)]
pub struct CacheState {
    images: BTreeMap<u64, Image>,
    names: BTreeMap<OsString, u64>,
    fh_ino: HashMap<u64, u64>,
    events: VecDeque<Event>,
    /// Restored records not yet matched with a file.
    saved: HashMap<OsString, Saved>,
    /// Bumped on every change worth persisting.
    pub version: u64,
    /// Bumped on every change a status file shows (those, and opens).
    pub shown: u64,
    /// Inodes evicted while the kernel may still hold a stale entry for them: an open that
    /// arrives late gets `ENOENT`. Cleared when the number names a file again.
    evicted: std::collections::HashSet<u64>,
}

fn shown(name: &OsStr) -> String {
    crate::text::escape(name.as_bytes())
}

impl CacheState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.names.values().filter_map(|ino| self.images.get(ino))
    }

    pub fn image(&self, ino: u64) -> Option<&Image> {
        self.images.get(&ino)
    }

    pub fn by_name(&self, name: &OsStr) -> Option<&Image> {
        self.names.get(name).and_then(|ino| self.images.get(ino))
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    pub fn event(&mut self, at: SystemTime, kind: EventKind, name: &OsStr, detail: String) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event { at, kind, name: shown(name), detail });
    }

    fn changed(&mut self) {
        self.version += 1;
        self.shown += 1;
    }

    /// A regular file seen under `name` in the cache directory (lookup, create, rename, start).
    /// `mtime` is its last use if it was never used since the mount and nothing was saved.
    pub fn observe(&mut self, name: &OsStr, ino: u64, size: u64, mtime: SystemTime) {
        if let Some(&old) = self.names.get(name) {
            if old == ino {
                if let Some(img) = self.images.get_mut(&ino) {
                    img.size = size;
                }
                return;
            }
            self.forget_name(name);
        }
        let saved = self.saved.remove(name);
        self.evicted.remove(&ino);
        let img = self
            .images
            .entry(ino)
            .or_insert_with(|| Image { last_used: mtime, ..Image::unnamed(ino) });
        if img.name.is_none() {
            // An inode that was open elsewhere before it got this name.
            img.last_used = img.last_used.max(mtime);
        }
        if let Some(old_name) = img.name.replace(name.to_os_string()) {
            // A second name for the same inode (hard link): the table follows the newest.
            self.names.remove(&old_name);
        }
        img.kind = Kind::of(name);
        img.size = size;
        if let Some(s) = saved {
            img.last_used = s.last_used;
            img.pinned = s.pinned;
            // A saved checksum is for the file it was taken of: the name may lead to a file
            // replaced or written while the daemon was down, which is hashed afresh.
            let now = Stamp { ino, size, mtime };
            if s.checksum.is_some_and(|c| c.stamp == now) {
                img.checksum = s.checksum;
                img.verified = s.verified;
            }
        }
        self.names.insert(name.to_os_string(), ino);
        self.changed();
    }

    /// `name` no longer names a cache file (unlink, or renamed away/over).
    pub fn forget_name(&mut self, name: &OsStr) {
        let Some(ino) = self.names.remove(name) else { return };
        if let Some(img) = self.images.get_mut(&ino) {
            img.name = None;
            if img.opens.is_empty() {
                self.images.remove(&ino);
            }
        }
        self.changed();
    }

    /// A rename within the cache directory: the file keeps its state under the new name.
    pub fn rename(&mut self, from: &OsStr, to: &OsStr) {
        let Some(&ino) = self.names.get(from) else { return };
        if from == to {
            return;
        }
        self.forget_name(to);
        self.names.remove(from);
        if let Some(img) = self.images.get_mut(&ino) {
            img.name = Some(to.to_os_string());
            img.kind = Kind::of(to);
        }
        self.names.insert(to.to_os_string(), ino);
        self.changed();
    }

    /// A rename that swaps two names (`RENAME_EXCHANGE`).
    pub fn exchange(&mut self, a: &OsStr, b: &OsStr) {
        let (ia, ib) = (self.names.remove(a), self.names.remove(b));
        for (name, ino) in [(b, ia), (a, ib)] {
            if let Some(ino) = ino {
                if let Some(img) = self.images.get_mut(&ino) {
                    img.name = Some(name.to_os_string());
                    img.kind = Kind::of(name);
                }
                self.names.insert(name.to_os_string(), ino);
            }
        }
        self.changed();
    }

    /// The one place references change.
    pub fn reference(&mut self, change: RefChange, now: SystemTime) -> RefEffect {
        match change {
            RefChange::Open { fh, ino, holder, write } => {
                if self.evicted.contains(&ino) {
                    return RefEffect::Gone;
                }
                // Every open of a regular file is a reference from the moment it happens,
                // wherever the file lives: an inode that is not a cache file (yet) gets an
                // unnamed entry, which a rename or link into the cache directory names.
                let img = self.images.entry(ino).or_insert_with(|| Image::unnamed(ino));
                if img.evicting {
                    return RefEffect::Gone;
                }
                if write {
                    img.begin_write();
                }
                img.opens.insert(fh, OpenRef { holder, write, since: now });
                self.shown += 1;
                self.fh_ino.insert(fh, ino);
                RefEffect::None
            }
            RefChange::Release { fh } => {
                let Some(ino) = self.fh_ino.remove(&fh) else { return RefEffect::None };
                let Some(img) = self.images.get_mut(&ino) else { return RefEffect::None };
                let Some(r) = img.opens.remove(&fh) else { return RefEffect::None };
                img.last_used = img.last_used.max(now);
                let effect = if r.write && img.writers() == 0 {
                    RefEffect::WritingDone { ino, write_gen: img.write_gen }
                } else if img.refs() == 0 {
                    RefEffect::Unreferenced { ino }
                } else {
                    RefEffect::None
                };
                if img.name.is_none() && img.opens.is_empty() {
                    self.images.remove(&ino);
                }
                self.changed();
                effect
            }
        }
    }

    /// A use that is not a release: `utime`/`touch`, a write, a size change.
    pub fn touch(&mut self, ino: u64, now: SystemTime) {
        if let Some(img) = self.images.get_mut(&ino) {
            img.last_used = img.last_used.max(now);
            self.changed();
        }
    }

    /// The file's size changed (a writer released it, or it was truncated).
    pub fn resized(&mut self, ino: u64, size: u64) {
        if let Some(img) = self.images.get_mut(&ino) {
            if img.size != size {
                img.size = size;
                self.changed();
            }
        }
    }

    /// The processes that hold the file open outside the mount (from before it, inherited
    /// from such a process, or through an earlier overlay), as a `/proc` walk just found them:
    /// they replace what was known. A new writer makes the checksum stale (the content is only
    /// known once it is gone); holders that left are a use. Returns what that changed, as
    /// reference changes do.
    pub fn set_outside(
        &mut self,
        ino: u64,
        found: Vec<(Holder, bool)>,
        now: SystemTime,
    ) -> RefEffect {
        let Some(img) = self.images.get_mut(&ino) else { return RefEffect::None };
        let mut found = found;
        found.sort_by_key(|(h, _)| (h.pid, h.start_time));
        found.dedup_by(|a, b| {
            a.0 == b.0 && {
                b.1 |= a.1;
                true
            }
        });
        if img.early == found {
            return RefEffect::None;
        }
        let (refs, writers) = (img.refs(), img.writers());
        let new_writer =
            found.iter().any(|(h, w)| *w && !img.early.iter().any(|(e, ew)| e == h && *ew));
        let left = img.early.iter().any(|(e, _)| !found.iter().any(|(h, _)| h == e));
        img.early = found;
        if new_writer {
            img.begin_write();
        }
        if left {
            img.last_used = img.last_used.max(now);
        }
        let effect = if writers > 0 && img.writers() == 0 {
            RefEffect::WritingDone { ino, write_gen: img.write_gen }
        } else if refs > 0 && img.refs() == 0 {
            RefEffect::Unreferenced { ino }
        } else {
            RefEffect::None
        };
        self.changed();
        effect
    }

    /// Inodes with holders outside the mount.
    pub fn held_outside(&self) -> Vec<u64> {
        self.images.values().filter(|i| !i.early.is_empty()).map(|i| i.ino).collect()
    }

    /// `utime`/`touch` (Nova touches a base file on every spawn): a use, not a data change.
    /// `before` and `after` are the file's stamp just before and after its times were set.
    /// If the file was still as hashed, the checksum follows the new mtime (a touch neither
    /// re-hashes a good file nor blesses a corrupt one); if it had changed, the checksum is
    /// dropped now (the times set may hide the change, e.g. `cp -p`). Returns whether the
    /// file must be hashed now (changed, and no writer left to queue it).
    pub fn touch_times(&mut self, ino: u64, before: Stamp, after: Stamp, now: SystemTime) -> bool {
        let Some(img) = self.images.get_mut(&ino) else { return false };
        img.last_used = img.last_used.max(now);
        img.size = after.size;
        let mut hash = false;
        if let Some(c) = &mut img.checksum {
            if c.stamp == before && after.size == before.size && after.ino == before.ino {
                c.stamp.mtime = after.mtime;
            } else if img.corrupt_sticks() {
                // Changed behind the mount while corrupt: the next verification compares it
                // with the recorded checksum, whatever the times say.
            } else {
                img.drop_checksum();
                hash = img.writers() == 0;
            }
        }
        self.changed();
        hash
    }

    /// A size change through the mount (`truncate`, `ftruncate`): a use and a data change.
    /// `before` and `after`: the file just before and after. Cutting a file to the size it
    /// already had changes no byte: that is treated as a touch (else a corrupt file would be
    /// blessed by it). Returns whether the file must be hashed now (no writer left to queue
    /// it).
    pub fn truncated(&mut self, ino: u64, before: Stamp, after: Stamp, now: SystemTime) -> bool {
        if before.size == after.size {
            return self.touch_times(ino, before, after, now);
        }
        let Some(img) = self.images.get_mut(&ino) else { return false };
        img.last_used = img.last_used.max(now);
        img.size = after.size;
        img.drop_checksum();
        let hash = img.writers() == 0;
        self.changed();
        hash
    }

    pub fn set_pin(&mut self, name: &OsStr, pinned: bool, now: SystemTime) -> bool {
        let Some(&ino) = self.names.get(name) else { return false };
        let img = self.images.get_mut(&ino).expect("names point at images");
        if img.pinned != pinned {
            img.pinned = pinned;
            let kind = if pinned { EventKind::Pinned } else { EventKind::Unpinned };
            self.event(now, kind, name, String::new());
            self.changed();
        }
        true
    }

    /// What a checksum job does with the file whose stamp is `now_stamp` (taken before
    /// hashing). Writing ended without moving the stamp: the checksum stands (`Kept`), unless
    /// a re-verification was asked for meanwhile.
    pub fn plan_check(&mut self, ino: u64, write_gen: u64, now_stamp: Stamp) -> CheckPlan {
        let Some(img) = self.images.get_mut(&ino) else { return CheckPlan::Skip };
        if img.write_gen != write_gen || img.writers() > 0 || img.evicting {
            return CheckPlan::Skip;
        }
        let pending = img.verified == Verified::Pending;
        match &mut img.checksum {
            Some(c) if c.recheck && c.stamp == now_stamp => {
                c.recheck = false;
                self.changed();
                if pending {
                    CheckPlan::Hash
                } else {
                    CheckPlan::Kept
                }
            }
            _ => CheckPlan::Hash,
        }
    }

    /// Records a hash of the file taken with stamp `stamp` (unchanged from start to end of
    /// the hash), unless a writer came since. Same stamp as the checksum: a verification
    /// (a different digest is corruption). No checksum, or another stamp: the file was
    /// written (through the mount, or behind the daemon's back), and this is its new
    /// checksum, never a verdict; except that a file already corrupt and changed behind the
    /// mount is verified against its recorded checksum (only that content passes).
    pub fn record_hash(
        &mut self,
        ino: u64,
        write_gen: u64,
        sha1: [u8; 20],
        stamp: Stamp,
        now: SystemTime,
    ) -> Option<HashOutcome> {
        let img = self.images.get_mut(&ino)?;
        if img.write_gen != write_gen || img.writers() > 0 {
            return None;
        }
        let name = img.name.clone().unwrap_or_default();
        // A corrupt file changed behind the mount stays corrupt unless it holds the recorded
        // content again: whoever changed it, that is the only content that passes.
        let sticks = img.corrupt_sticks();
        let outcome = match img.checksum {
            Some(c) if c.stamp == stamp || sticks => {
                let ok = c.sha1 == sha1;
                img.verified = if ok { Verified::Ok(now) } else { Verified::Mismatch(now) };
                img.checksum = Some(Checksum { recheck: false, stamp, ..c });
                if ok {
                    self.event(now, EventKind::Verified, &name, format!("sha1 {}", hex(&sha1)));
                    HashOutcome::Verified
                } else {
                    let detail = format!("expected sha1 {} found {}", hex(&c.sha1), hex(&sha1));
                    self.event(now, EventKind::Corrupt, &name, detail);
                    HashOutcome::Corrupt { expected: c.sha1 }
                }
            }
            old => {
                let replaced = old.filter(|c| !c.recheck).map(|c| c.sha1);
                img.checksum = Some(Checksum { sha1, at: now, stamp, recheck: false });
                img.verified = Verified::Never;
                let detail = match replaced {
                    Some(old) => format!(
                        "sha1 {} changed behind the mount (was sha1 {})",
                        hex(&sha1),
                        hex(&old)
                    ),
                    None => format!("sha1 {}", hex(&sha1)),
                };
                self.event(now, EventKind::Created, &name, detail);
                HashOutcome::Created { replaced }
            }
        };
        self.changed();
        Some(outcome)
    }

    pub fn set_verify_pending(&mut self, ino: u64) {
        if let Some(img) = self.images.get_mut(&ino) {
            if img.checksum.is_some() && !img.corrupt() {
                img.verified = Verified::Pending;
            }
        }
    }

    /// The state shown to operators. `referenced`: named as a backing file by an instance disk.
    pub fn use_of(img: &Image, referenced: bool) -> Use {
        if img.corrupt() {
            Use::Corrupt
        } else if img.writers() > 0 {
            Use::Writing
        } else if img.refs() > 0 {
            Use::InUse
        } else if img.pinned {
            Use::Pinned
        } else if referenced {
            Use::Referenced
        } else {
            Use::Idle
        }
    }

    /// When the file becomes due for eviction by age alone; `None`: never (eviction off and
    /// not corrupt). A corrupt file is due at once.
    pub fn deadline(img: &Image, policy: &Policy) -> Option<SystemTime> {
        if policy.shared.is_some() {
            return None;
        }
        if img.corrupt() {
            return Some(SystemTime::UNIX_EPOCH);
        }
        if !policy.evict {
            return None;
        }
        Some(crate::clock::add_secs(img.last_used, policy.min_age(img.kind)))
    }

    /// Why `img` may not be evicted at `now`, or `None` if it may.
    pub fn blocker(
        img: &Image,
        policy: &Policy,
        referenced: bool,
        now: SystemTime,
    ) -> Option<Blocker> {
        if img.writers() > 0 {
            Some(Blocker::Writing)
        } else if !img.opens.is_empty() {
            Some(Blocker::InUse)
        } else if !img.early.is_empty() {
            Some(Blocker::HeldBeforeMount)
        } else if img.pinned {
            Some(Blocker::Pinned)
        } else if referenced {
            Some(Blocker::Referenced)
        } else if policy.shared.is_some() {
            Some(Blocker::SharedStorage)
        } else if Self::deadline(img, policy).is_none_or(|d| d > now) {
            Some(Blocker::NotDue)
        } else {
            None
        }
    }

    /// Marks a file as being evicted if nothing blocks it at `now`; from then on opens get
    /// `ENOENT` until `evicted` or `evict_failed`.
    pub fn begin_evict(
        &mut self,
        ino: u64,
        policy: &Policy,
        referenced: bool,
        now: SystemTime,
        min_age_override: Option<u64>,
    ) -> Result<(), Blocker> {
        let img = self.images.get_mut(&ino).ok_or(Blocker::NotDue)?;
        if img.evicting || img.name.is_none() {
            // Another eviction of the same file is under way, or the name is gone.
            return Err(Blocker::NotDue);
        }
        let blocker = match Self::blocker(img, policy, referenced, now) {
            // Pressure and operators may go below the threshold (down to their own floor).
            Some(Blocker::NotDue) if min_age_override.is_some_and(|m| img.age(now) >= m) => None,
            b => b,
        };
        if let Some(b) = blocker {
            return Err(b);
        }
        img.evicting = true;
        Ok(())
    }

    /// An eviction of `ino` was refused for `reason`: true if that is news (the first refusal,
    /// or another reason than the last one), i.e. worth a log line and an event. A file
    /// refused again and again for the same reason (a stopped VM's base, every
    /// `--resized-min-age`) is logged once, not every time it is looked at.
    pub fn note_refusal(&mut self, ino: u64, reason: &'static str) -> bool {
        let Some(img) = self.images.get_mut(&ino) else { return false };
        let news = img.last_refusal != Some(reason);
        img.last_refusal = Some(reason);
        news
    }

    pub fn evict_failed(&mut self, ino: u64) {
        if let Some(img) = self.images.get_mut(&ino) {
            img.evicting = false;
        }
    }

    /// The kernel forgot the inode: no late open can name it any more.
    pub fn forgotten(&mut self, ino: u64) {
        self.evicted.remove(&ino);
    }

    /// Removes an evicted file's entry (its name is gone from disk).
    pub fn evicted(&mut self, ino: u64) {
        self.evicted.insert(ino);
        if let Some(name) = self.images.get(&ino).and_then(|i| i.name.clone()) {
            self.forget_name(&name);
        }
    }

    /// Text of the persistent state (version 2): one line per named file, then the records
    /// of names not seen yet.
    pub fn persist_text(&self) -> String {
        let mut out = format!("{STATE_HEADER}2\n");
        let mut line = |name: &OsStr, s: &Saved| {
            let (sum, at, stamp) = match s.checksum {
                Some(c) => (
                    hex(&c.sha1),
                    unix_secs(c.at).to_string(),
                    format!("{}\t{}\t{}", c.stamp.ino, c.stamp.size, nanos_text(c.stamp.mtime)),
                ),
                None => ("-".into(), "-".into(), "-\t-\t-".into()),
            };
            let (v, vat) = match s.verified {
                Verified::Never => ("never", 0),
                Verified::Pending => ("never", 0),
                Verified::Ok(t) => ("ok", unix_secs(t)),
                Verified::Mismatch(t) => ("mismatch", unix_secs(t)),
            };
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                hex(name.as_bytes()),
                unix_secs(s.last_used),
                u8::from(s.pinned),
                sum,
                at,
                v,
                vat,
                stamp
            ));
        };
        for img in self.images() {
            let saved = Saved {
                last_used: img.last_used,
                pinned: img.pinned,
                checksum: img.checksum,
                verified: img.verified,
            };
            line(img.name.as_deref().expect("named"), &saved);
        }
        // Records of files not seen yet this run are kept, not dropped.
        let pending: BTreeSet<_> = self.saved.keys().collect();
        for name in pending {
            line(name, &self.saved[name]);
        }
        out
    }

    /// Loads saved records; they apply when their files are observed. Malformed lines are
    /// skipped (and counted in the result) rather than failing the start. Version 1 records
    /// carry no stamp: their last use and pin are kept, their checksum and verdict dropped
    /// (the file is hashed afresh), since nothing ties them to the file now under the name.
    /// An unknown version counts every line as unreadable.
    pub fn restore(&mut self, text: &str) -> usize {
        let mut lines = text.lines();
        let version = match lines.next().and_then(|h| h.strip_prefix(STATE_HEADER)) {
            Some("1") => 1,
            Some("2") => 2,
            _ => return text.lines().count(),
        };
        let mut bad = 0;
        for line in lines {
            match parse_saved(line, version) {
                Some((name, s)) => {
                    self.saved.insert(name, s);
                }
                None => bad += 1,
            }
        }
        bad
    }
}

/// The state file's first line, before its version number.
const STATE_HEADER: &str = "imagecachefs-state ";

/// One record: 7 tab-separated fields in version 1, 10 in version 2 (the checksum's stamp:
/// inode, size, mtime in nanoseconds since the epoch).
fn parse_saved(line: &str, version: u32) -> Option<(OsString, Saved)> {
    use std::os::unix::ffi::OsStringExt;
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != if version == 1 { 7 } else { 10 } {
        return None;
    }
    let name = OsString::from_vec(unhex(f[0])?);
    let last_used = from_unix_secs(f[1].parse().ok()?);
    let pinned = f[2] == "1";
    let vat = from_unix_secs(f[6].parse().ok()?);
    let verified = match f[5] {
        "never" => Verified::Never,
        "ok" => Verified::Ok(vat),
        "mismatch" => Verified::Mismatch(vat),
        _ => return None,
    };
    let checksum = match (f[3], version) {
        ("-", _) => None,
        (s, 1) => {
            // Well-formed, but not tied to any file: dropped.
            crate::verify::parse_hex(s)?;
            f[4].parse::<u64>().ok()?;
            None
        }
        (s, _) => Some(Checksum {
            sha1: crate::verify::parse_hex(s)?,
            at: from_unix_secs(f[4].parse().ok()?),
            stamp: Stamp {
                ino: f[7].parse().ok()?,
                size: f[8].parse().ok()?,
                mtime: nanos_time(f[9])?,
            },
            recheck: false,
        }),
    };
    let verified = if checksum.is_some() { verified } else { Verified::Never };
    Some((name, Saved { last_used, pinned, checksum, verified }))
}

/// A time as signed nanoseconds since the epoch (mtimes may be set before it).
fn nanos_text(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos().to_string(),
        Err(e) => format!("-{}", e.duration().as_nanos()),
    }
}

fn nanos_time(s: &str) -> Option<SystemTime> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u128 = digits.parse().ok()?;
    let d = Duration::new(u64::try_from(n / 1_000_000_000).ok()?, (n % 1_000_000_000) as u32);
    if neg {
        SystemTime::UNIX_EPOCH.checked_sub(d)
    } else {
        SystemTime::UNIX_EPOCH.checked_add(d)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INO: u64 = 42;
    const NAME: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
    const GOOD: [u8; 20] = [0x11; 20];
    const OTHER: [u8; 20] = [0x22; 20];

    fn t(secs: u64) -> SystemTime {
        from_unix_secs(secs)
    }

    fn stamp(size: u64, mtime_ns: u64) -> Stamp {
        Stamp { ino: INO, size, mtime: SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns) }
    }

    fn holder() -> Holder {
        Holder { pid: 7, program: "qemu-img".into(), instance: None, start_time: 1 }
    }

    fn img(s: &CacheState) -> &Image {
        s.image(INO).expect("the file is known")
    }

    /// A state with one file hashed under `at`.
    fn hashed(at: Stamp) -> CacheState {
        let mut s = CacheState::new();
        s.observe(OsStr::new(NAME), INO, at.size, at.mtime);
        let gen = img(&s).write_gen;
        assert_eq!(s.plan_check(INO, gen, at), CheckPlan::Hash);
        let outcome = s.record_hash(INO, gen, GOOD, at, t(100));
        assert_eq!(outcome, Some(HashOutcome::Created { replaced: None }));
        s
    }

    fn open(s: &mut CacheState, fh: u64, write: bool) {
        let change = RefChange::Open { fh, ino: INO, holder: holder(), write };
        assert_eq!(s.reference(change, t(200)), RefEffect::None);
    }

    fn release(s: &mut CacheState, fh: u64) -> RefEffect {
        s.reference(RefChange::Release { fh }, t(300))
    }

    #[test]
    fn a_write_open_alone_keeps_the_checksum_and_its_verdict() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        let gen = img(&s).write_gen;
        assert_eq!(s.record_hash(INO, gen, GOOD, at, t(150)), Some(HashOutcome::Verified));
        open(&mut s, 1, true);
        let c = img(&s).checksum.expect("a write-open keeps the checksum");
        assert!(c.recheck && c.sha1 == GOOD);
        assert_eq!(img(&s).shown_checksum(), None, "shown as pending while written");
        let gen = img(&s).write_gen;
        assert_eq!(s.plan_check(INO, gen, at), CheckPlan::Skip, "never hashed while written");
        assert_eq!(release(&mut s, 1), RefEffect::WritingDone { ino: INO, write_gen: gen });
        // Writing ended and the stamp did not move: nothing to hash, the verdict stands.
        assert_eq!(s.plan_check(INO, gen, at), CheckPlan::Kept);
        assert_eq!(img(&s).checksum.map(|c| (c.sha1, c.recheck)), Some((GOOD, false)));
        assert_eq!(img(&s).shown_checksum().map(|c| c.sha1), Some(GOOD));
        assert_eq!(img(&s).verified, Verified::Ok(t(150)));
        // Asked again (periodic or `verify NAME`), the same stamp is a real re-verification.
        assert_eq!(s.plan_check(INO, gen, at), CheckPlan::Hash);
    }

    #[test]
    fn a_written_file_gets_a_new_checksum_never_a_verdict() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        open(&mut s, 1, true);
        let gen = img(&s).write_gen;
        release(&mut s, 1);
        let written = stamp(4096, 2_000_000_456);
        assert_eq!(s.plan_check(INO, gen, written), CheckPlan::Hash);
        let outcome = s.record_hash(INO, gen, OTHER, written, t(400));
        assert_eq!(outcome, Some(HashOutcome::Created { replaced: None }));
        assert_eq!(img(&s).checksum.map(|c| (c.sha1, c.stamp)), Some((OTHER, written)));
        assert!(!img(&s).corrupt());
    }

    #[test]
    fn a_stamp_that_moved_behind_the_mount_is_a_change_not_corruption() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        let gen = img(&s).write_gen;
        let moved = stamp(4096, 1_000_000_124);
        assert_eq!(s.plan_check(INO, gen, moved), CheckPlan::Hash);
        let outcome = s.record_hash(INO, gen, OTHER, moved, t(400));
        assert_eq!(outcome, Some(HashOutcome::Created { replaced: Some(GOOD) }));
        assert!(!img(&s).corrupt());
        assert_eq!(img(&s).verified, Verified::Never);
        let last = s.events().last().expect("an event");
        assert_eq!(last.kind, EventKind::Created);
        assert!(last.detail.contains("changed behind the mount"), "{}", last.detail);
        // Only the same stamp with another digest is corruption.
        assert_eq!(
            s.record_hash(INO, gen, GOOD, moved, t(500)),
            Some(HashOutcome::Corrupt { expected: OTHER })
        );
        assert!(img(&s).corrupt());
    }

    #[test]
    fn a_corrupt_file_changed_behind_the_mount_passes_only_with_its_recorded_content() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        let gen = img(&s).write_gen;
        s.record_hash(INO, gen, OTHER, at, t(150));
        assert!(img(&s).corrupt());
        // Written behind the mount, then touched: still compared with the recorded SHA-1.
        let moved = stamp(4096, 2_000_000_000);
        assert!(!s.touch_times(INO, moved, stamp(4096, 3_000_000_000), t(160)));
        let moved = stamp(4096, 3_000_000_000);
        assert_eq!(s.plan_check(INO, gen, moved), CheckPlan::Hash);
        let outcome = s.record_hash(INO, gen, OTHER, moved, t(200));
        assert_eq!(outcome, Some(HashOutcome::Corrupt { expected: GOOD }));
        assert_eq!(img(&s).checksum.map(|c| (c.sha1, c.stamp)), Some((GOOD, moved)));
        // The recorded content put back: it passes.
        let back = stamp(4096, 4_000_000_000);
        assert_eq!(s.record_hash(INO, gen, GOOD, back, t(300)), Some(HashOutcome::Verified));
        assert!(!img(&s).corrupt());
        // Rewritten through the mount, a corrupt file gets a new checksum as any file does.
        s.record_hash(INO, gen, OTHER, back, t(400));
        open(&mut s, 1, true);
        let gen = img(&s).write_gen;
        release(&mut s, 1);
        let written = stamp(4096, 5_000_000_000);
        assert_eq!(
            s.record_hash(INO, gen, OTHER, written, t(500)),
            Some(HashOutcome::Created { replaced: None })
        );
        assert!(!img(&s).corrupt());
    }

    #[test]
    fn a_hash_overtaken_by_a_writer_or_a_truncate_is_discarded() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        let gen = img(&s).write_gen;
        open(&mut s, 1, true);
        assert_eq!(s.record_hash(INO, gen, OTHER, at, t(400)), None);
        release(&mut s, 1);
        let gen = img(&s).write_gen;
        assert!(s.truncated(INO, at, stamp(0, 2_000_000_000), t(500)), "no writer: hash now");
        assert_eq!(s.record_hash(INO, gen, OTHER, at, t(600)), None);
    }

    #[test]
    fn a_touch_keeps_the_checksum_and_a_corrupt_verdict_of_an_unchanged_file() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        let gen = img(&s).write_gen;
        assert!(matches!(
            s.record_hash(INO, gen, OTHER, at, t(150)),
            Some(HashOutcome::Corrupt { .. })
        ));
        // touch(1): open for writing, set the times, close.
        open(&mut s, 1, true);
        let touched = stamp(4096, 5_000_000_789);
        assert!(!s.touch_times(INO, at, touched, t(250)));
        assert_eq!(img(&s).checksum.map(|c| c.stamp), Some(touched));
        assert_eq!(img(&s).last_used, t(250), "a touch is a use");
        let gen = img(&s).write_gen;
        release(&mut s, 1);
        assert_eq!(s.plan_check(INO, gen, touched), CheckPlan::Kept);
        assert!(img(&s).corrupt(), "a touch does not bless a corrupt file");
        assert_eq!(img(&s).checksum.map(|c| c.sha1), Some(GOOD));
    }

    #[test]
    fn a_touch_of_a_changed_file_drops_its_checksum() {
        let at = stamp(4096, 1_000_000_123);
        // Written through a handle, then its mtime set back (`cp -p`): the times set must not
        // hide the change.
        let mut s = hashed(at);
        open(&mut s, 1, true);
        assert!(!s.touch_times(INO, stamp(4096, 3_000_000_000), at, t(250)), "a writer is left");
        assert_eq!(img(&s).checksum, None);
        let gen = img(&s).write_gen;
        release(&mut s, 1);
        assert_eq!(s.plan_check(INO, gen, at), CheckPlan::Hash);
        // Changed behind the mount, then touched with no writer: hash now.
        let mut s = hashed(at);
        assert!(s.touch_times(INO, stamp(8192, 3_000_000_000), stamp(8192, 4_000_000_000), t(9)));
        assert_eq!((img(&s).checksum, img(&s).verified), (None, Verified::Never));
    }

    #[test]
    fn a_truncate_is_a_data_change() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        open(&mut s, 1, true);
        let gen = img(&s).write_gen;
        let cut = stamp(100, 2_000_000_000);
        assert!(!s.truncated(INO, at, cut, t(250)), "the writer's release queues the hash");
        assert_eq!((img(&s).checksum, img(&s).size), (None, 100));
        assert!(img(&s).write_gen > gen, "a hash running now is abandoned");
        release(&mut s, 1);
        assert_eq!(s.plan_check(INO, img(&s).write_gen, cut), CheckPlan::Hash);
    }

    #[test]
    fn a_truncate_to_the_same_size_changes_no_byte() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        let gen = img(&s).write_gen;
        assert!(matches!(
            s.record_hash(INO, gen, OTHER, at, t(150)),
            Some(HashOutcome::Corrupt { .. })
        ));
        // `ftruncate` sets the mtime even when the size stays.
        let after = stamp(4096, 2_000_000_000);
        assert!(!s.truncated(INO, at, after, t(250)));
        assert_eq!(img(&s).checksum.map(|c| c.stamp), Some(after));
        assert!(img(&s).corrupt(), "a corrupt file stays corrupt");
        // The same size, but the file had changed before: a good file's checksum goes, a
        // corrupt one's stays to be compared with.
        assert!(!s.truncated(INO, stamp(4096, 3), stamp(4096, 4), t(300)));
        assert!(img(&s).corrupt());
        let mut s = hashed(at);
        assert!(s.truncated(INO, stamp(4096, 3), stamp(4096, 4), t(300)));
        assert_eq!(img(&s).checksum, None);
    }

    #[test]
    fn a_verify_asked_for_while_written_still_hashes() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        s.set_verify_pending(INO);
        open(&mut s, 1, true);
        release(&mut s, 1);
        assert_eq!(s.plan_check(INO, img(&s).write_gen, at), CheckPlan::Hash);
    }

    #[test]
    fn a_version_2_record_applies_only_to_the_file_it_was_taken_of() {
        let at = stamp(4096, 1_000_000_123);
        let mut s = hashed(at);
        assert!(s.set_pin(OsStr::new(NAME), true, t(120)));
        let gen = img(&s).write_gen;
        s.record_hash(INO, gen, GOOD, at, t(150));
        let text = s.persist_text();
        assert!(text.starts_with("imagecachefs-state 2\n"), "{text}");

        // The same file: everything comes back, and is written back the same.
        let mut same = CacheState::new();
        assert_eq!(same.restore(&text), 0);
        same.observe(OsStr::new(NAME), INO, at.size, at.mtime);
        assert_eq!(img(&same).checksum.map(|c| (c.sha1, c.stamp)), Some((GOOD, at)));
        assert_eq!(img(&same).verified, Verified::Ok(t(150)));
        assert!(img(&same).pinned);
        assert_eq!(same.persist_text(), text);

        // Not yet seen: the record is kept as it was.
        let mut unseen = CacheState::new();
        unseen.restore(&text);
        assert_eq!(unseen.persist_text(), text);

        // Replaced (another inode), or written (another size or mtime) while the daemon was
        // down: last use and pin stay with the name, the checksum and verdict do not.
        for (ino, size, mtime) in
            [(INO + 1, at.size, at.mtime), (INO, 8192, at.mtime), (INO, at.size, t(7))]
        {
            let mut other = CacheState::new();
            other.restore(&text);
            other.observe(OsStr::new(NAME), ino, size, mtime);
            let i = other.image(ino).unwrap();
            assert_eq!((i.checksum, i.verified), (None, Verified::Never), "{ino} {size}");
            assert!(i.pinned, "the pin stays with the name");
            assert_eq!(unix_secs(i.last_used), unix_secs(img(&s).last_used), "last use stays");
        }
    }

    #[test]
    fn a_version_1_record_keeps_use_and_pin_but_not_its_checksum() {
        let name = hex(NAME.as_bytes());
        let sha = hex(&GOOD);
        let text = format!(
            "imagecachefs-state 1\n\
             {name}\t1800000000\t1\t{sha}\t1799990000\tmismatch\t1799995000\n\
             not-hex\t1\t0\t-\t-\tnever\t0\n\
             {name}\t1800000000\t1\t{sha}\t1799990000\tbogus\t0\n"
        );
        let mut s = CacheState::new();
        assert_eq!(s.restore(&text), 2, "two unreadable lines");
        s.observe(OsStr::new(NAME), INO, 4096, t(1));
        let i = img(&s);
        assert!(i.pinned);
        assert_eq!(i.last_used, t(1_800_000_000));
        assert_eq!((i.checksum, i.verified), (None, Verified::Never));
        // An unknown version is not guessed at.
        let mut s = CacheState::new();
        assert_eq!(s.restore("imagecachefs-state 9\nwhatever\n"), 2);
        assert!(s.persist_text().lines().count() == 1);
    }

    #[test]
    fn stamp_times_round_trip_to_the_nanosecond() {
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::new(86_400, 5);
        for t in [SystemTime::UNIX_EPOCH + Duration::new(1_796_529_558, 751_026_801), before_epoch]
        {
            assert_eq!(nanos_time(&nanos_text(t)), Some(t));
        }
        assert_eq!(nanos_time("-"), None);
        assert_eq!(nanos_time("12a"), None);
        assert_eq!(nanos_time(""), None);
    }

    #[test]
    fn a_refusal_is_news_only_when_its_reason_changes() {
        let mut s = CacheState::new();
        s.observe(OsStr::new("swap_512"), 7, 10, t(0));
        assert!(s.note_refusal(7, "referenced"), "the first refusal is news");
        for _ in 0..1000 {
            assert!(!s.note_refusal(7, "referenced"), "the same reason again is not");
        }
        assert!(s.note_refusal(7, "locked by nova"), "another reason is");
        assert!(s.note_refusal(7, "referenced"), "and back again");
        assert!(!s.note_refusal(99, "referenced"), "an unknown inode is never news");
    }

    #[test]
    fn an_open_records_when_it_was_made() {
        let mut s = CacheState::new();
        s.observe(OsStr::new("swap_512"), 7, 10, t(0));
        let holder = Holder { pid: 1, program: "qemu-img".into(), instance: None, start_time: 0 };
        s.reference(RefChange::Open { fh: 1, ino: 7, holder, write: false }, t(42));
        assert_eq!(s.image(7).unwrap().opens[&1].since, t(42));
    }

    #[test]
    fn event_names_are_escaped() {
        let mut s = CacheState::new();
        s.event(t(1), EventKind::Pinned, OsStr::new("evil\nstate: idle"), String::new());
        assert_eq!(s.events().next().unwrap().name, "evil\\x0astate:\\x20idle");
    }
}
