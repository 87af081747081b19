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
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            original_min_age: 86_400,
            resized_min_age: 3_600,
            partial_min_age: 3_600,
            evict: true,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub sha1: [u8; 20],
    pub at: SystemTime,
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
    /// Bumped by every write-open: a checksum computed before it is stale.
    pub write_gen: u64,
    /// Being removed: opens that come now get `ENOENT` (the eviction has won the race).
    pub evicting: bool,
    /// The reason of the last refused eviction that was logged (see `note_refusal`).
    pub last_refusal: Option<&'static str>,
}

impl Image {
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
        let img = self.images.entry(ino).or_insert_with(|| Image {
            name: None,
            ino,
            kind: Kind::of(name),
            size,
            opens: BTreeMap::new(),
            early: Vec::new(),
            pinned: false,
            last_used: mtime,
            checksum: None,
            verified: Verified::Never,
            write_gen: 0,
            evicting: false,
            last_refusal: None,
        });
        if let Some(old_name) = img.name.replace(name.to_os_string()) {
            // A second name for the same inode (hard link): the table follows the newest.
            self.names.remove(&old_name);
        }
        img.kind = Kind::of(name);
        img.size = size;
        if let Some(s) = saved {
            img.last_used = s.last_used;
            img.pinned = s.pinned;
            img.checksum = s.checksum;
            img.verified = s.verified;
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
                let Some(img) = self.images.get_mut(&ino) else { return RefEffect::None };
                if img.evicting {
                    return RefEffect::Gone;
                }
                if write {
                    img.write_gen += 1;
                    img.checksum = None;
                }
                img.opens.insert(fh, OpenRef { holder, write, since: now });
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

    /// A holder found at start, from before the mount. A writer makes any checksum stale:
    /// the file's content is only known once it is gone.
    pub fn add_early_holder(&mut self, ino: u64, h: Holder, write: bool) {
        if let Some(img) = self.images.get_mut(&ino) {
            if !img.early.iter().any(|(e, _)| *e == h) {
                img.early.push((h, write));
            }
            if write {
                img.write_gen += 1;
                img.checksum = None;
            }
        }
    }

    /// Drops early holders for which `still_holds(holder, name)` says no (checked lazily, when
    /// asked). Returns what that changed, as reference changes do.
    pub fn recheck_early(
        &mut self,
        now: SystemTime,
        mut still_holds: impl FnMut(&Holder, &OsStr) -> bool,
    ) -> Vec<RefEffect> {
        let mut effects = Vec::new();
        for img in self.images.values_mut() {
            let Some(name) = img.name.clone() else { continue };
            if img.early.is_empty() {
                continue;
            }
            let (ino, refs, writers, before) =
                (img.ino, img.refs(), img.writers(), img.early.len());
            img.early.retain(|(h, _)| still_holds(h, &name));
            if img.early.len() == before {
                continue;
            }
            img.last_used = img.last_used.max(now);
            if writers > 0 && img.writers() == 0 {
                effects.push(RefEffect::WritingDone { ino, write_gen: img.write_gen });
            } else if refs > 0 && img.refs() == 0 {
                effects.push(RefEffect::Unreferenced { ino });
            }
        }
        if !effects.is_empty() {
            self.changed();
        }
        effects
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

    /// Records a checksum computed after writing ended, unless a writer came back since.
    pub fn set_checksum(
        &mut self,
        ino: u64,
        write_gen: u64,
        sha1: [u8; 20],
        now: SystemTime,
    ) -> bool {
        let Some(img) = self.images.get_mut(&ino) else { return false };
        if img.write_gen != write_gen || img.writers() > 0 {
            return false;
        }
        img.checksum = Some(Checksum { sha1, at: now });
        img.verified = Verified::Never;
        let name = img.name.clone().unwrap_or_default();
        self.event(now, EventKind::Created, &name, format!("sha1 {}", hex(&sha1)));
        self.changed();
        true
    }

    /// Records a re-verification; `None` if the file changed or has no checksum any more.
    /// Returns `Some(true)` for a match.
    pub fn set_verified(
        &mut self,
        ino: u64,
        write_gen: u64,
        actual: [u8; 20],
        now: SystemTime,
    ) -> Option<bool> {
        let img = self.images.get_mut(&ino)?;
        let expected = img.checksum?;
        if img.write_gen != write_gen || img.writers() > 0 {
            return None;
        }
        let ok = expected.sha1 == actual;
        img.verified = if ok { Verified::Ok(now) } else { Verified::Mismatch(now) };
        let name = img.name.clone().unwrap_or_default();
        if ok {
            self.event(now, EventKind::Verified, &name, format!("sha1 {}", hex(&actual)));
        } else {
            self.event(
                now,
                EventKind::Corrupt,
                &name,
                format!("expected sha1 {} found {}", hex(&expected.sha1), hex(&actual)),
            );
        }
        self.changed();
        Some(ok)
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
        if img.corrupt() {
            return Some(SystemTime::UNIX_EPOCH);
        }
        if !policy.evict {
            return None;
        }
        Some(img.last_used + Duration::from_secs(policy.min_age(img.kind)))
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

    /// Text of the persistent state: one line per named file.
    pub fn persist_text(&self) -> String {
        let mut out = String::from("imagecachefs-state 1\n");
        let mut line = |name: &OsStr, s: &Saved| {
            let (sum, at) = match s.checksum {
                Some(c) => (hex(&c.sha1), unix_secs(c.at).to_string()),
                None => ("-".into(), "-".into()),
            };
            let (v, vat) = match s.verified {
                Verified::Never => ("never", 0),
                Verified::Pending => ("never", 0),
                Verified::Ok(t) => ("ok", unix_secs(t)),
                Verified::Mismatch(t) => ("mismatch", unix_secs(t)),
            };
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                hex(name.as_bytes()),
                unix_secs(s.last_used),
                u8::from(s.pinned),
                sum,
                at,
                v,
                vat
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
    /// skipped (and counted in the result) rather than failing the start.
    pub fn restore(&mut self, text: &str) -> usize {
        let mut bad = 0;
        for line in text.lines().skip(1) {
            match parse_saved(line) {
                Some((name, s)) => {
                    self.saved.insert(name, s);
                }
                None => bad += 1,
            }
        }
        bad
    }
}

fn parse_saved(line: &str) -> Option<(OsString, Saved)> {
    use std::os::unix::ffi::OsStringExt;
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 7 {
        return None;
    }
    let name = OsString::from_vec(unhex(f[0])?);
    let last_used = from_unix_secs(f[1].parse().ok()?);
    let pinned = f[2] == "1";
    let checksum = match (f[3], f[4]) {
        ("-", _) => None,
        (s, at) => Some(Checksum {
            sha1: crate::verify::parse_hex(s)?,
            at: from_unix_secs(at.parse().ok()?),
        }),
    };
    let vat = from_unix_secs(f[6].parse().ok()?);
    let verified = match f[5] {
        "never" => Verified::Never,
        "ok" => Verified::Ok(vat),
        "mismatch" => Verified::Mismatch(vat),
        _ => return None,
    };
    Some((name, Saved { last_used, pinned, checksum, verified }))
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

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
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
