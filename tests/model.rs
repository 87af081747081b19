//! Model-based test of the reference and eviction bookkeeping (`state::CacheState`): random
//! sequences of opens, releases, renames, unlinks, pins, touches, backing-file references,
//! opens of files outside the cache directory's root that are then moved or linked into it,
//! `mknod`, holders outside the mount that fork and exit, clock advances and server restarts
//! (a new server rebuilt from the state file, the journal's open handles and a /proc walk),
//! checked against a plain reference model after every step.
//!
//! Invariants: reference counts equal the model's, wherever the file was opened; a file with
//! an open handle, a holder outside the mount, a writer, a pin or a backing-file reference is
//! never evicted; every other file is evicted exactly when its deadline (last use + its
//! kind's threshold) has passed.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::time::{Duration, SystemTime};

use imagecachefs::procfs::Holder;
use imagecachefs::state::{CacheState, Policy, RefChange};
use proptest::prelude::*;

const NAMES: [&str; 4] = [
    "0d5e6b61602d758984b3bf038267614d6016eb2a",
    "0d5e6b61602d758984b3bf038267614d6016eb2a_10",
    "swap_512",
    "0d5e6b61602d758984b3bf038267614d6016eb2a.part",
];

#[derive(Clone, Debug)]
enum Op {
    Open {
        file: usize,
        write: bool,
    },
    Release {
        pick: usize,
    },
    ReleaseUnknown,
    Pin {
        file: usize,
        pinned: bool,
    },
    Touch {
        file: usize,
    },
    Reference {
        file: usize,
        on: bool,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Unlink {
        file: usize,
    },
    /// A new regular file under the name (`create`, or `mknod` of a regular file).
    Create {
        file: usize,
    },
    /// An open of a file that lives in a subdirectory (not a cache file).
    OpenElsewhere {
        sub: usize,
        write: bool,
    },
    /// That file renamed (or hard-linked) into the cache directory.
    MoveIn {
        sub: usize,
        to: usize,
    },
    /// A hard link to a cache file under another cache name.
    Link {
        from: usize,
        to: usize,
    },
    /// A process outside the mount holding the file forks: the child inherits the descriptor.
    Fork {
        file: usize,
        write: bool,
    },
    /// One of the processes outside the mount holding the file exits.
    HolderExits {
        file: usize,
        pick: usize,
    },
    Advance {
        secs: u64,
    },
    EvictTick,
    /// The server is killed and a new one takes the connection over: it starts from the
    /// state file (as the persister last wrote it: the state as of now), looks the named
    /// files up again, is told every open handle by the journal (same fh, inode and writer
    /// flag), and walks /proc for the holders outside the mount. Nothing in the model
    /// changes: references, writers, pins and last uses must all carry over.
    ServerRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, any::<bool>()).prop_map(|(file, write)| Op::Open { file, write }),
        4 => (0..16usize).prop_map(|pick| Op::Release { pick }),
        1 => Just(Op::ReleaseUnknown),
        1 => (0..4usize, any::<bool>()).prop_map(|(file, pinned)| Op::Pin { file, pinned }),
        1 => (0..4usize).prop_map(|file| Op::Touch { file }),
        1 => (0..4usize, any::<bool>()).prop_map(|(file, on)| Op::Reference { file, on }),
        1 => (0..4usize, 0..4usize).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0..4usize).prop_map(|file| Op::Unlink { file }),
        2 => (0..4usize).prop_map(|file| Op::Create { file }),
        2 => (0..3usize, any::<bool>()).prop_map(|(sub, write)| Op::OpenElsewhere { sub, write }),
        1 => (0..3usize, 0..4usize).prop_map(|(sub, to)| Op::MoveIn { sub, to }),
        1 => (0..4usize, 0..4usize).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (0..4usize, any::<bool>()).prop_map(|(file, write)| Op::Fork { file, write }),
        1 => (0..4usize, 0..4usize).prop_map(|(file, pick)| Op::HolderExits { file, pick }),
        3 => (0..5_000u64).prop_map(|secs| Op::Advance { secs }),
        3 => Just(Op::EvictTick),
        2 => Just(Op::ServerRestart),
    ]
}

/// The reference model: per inode, its open handles and what else guards it.
#[derive(Clone, Debug, Default)]
struct MFile {
    name: Option<String>,
    opens: BTreeMap<u64, bool>,
    /// Processes outside the mount holding it (pid → may write).
    outside: BTreeMap<u32, bool>,
    pinned: bool,
    last_used: u64,
}

struct World {
    state: CacheState,
    policy: Policy,
    now: u64,
    files: BTreeMap<u64, MFile>,
    referenced: BTreeSet<String>,
    next_ino: u64,
    next_fh: u64,
    next_pid: u32,
    /// Inodes of files in a subdirectory, by slot.
    subs: BTreeMap<usize, u64>,
}

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn holder() -> Holder {
    Holder { pid: 42, program: "qemu-img".into(), instance: None, start_time: 1 }
}

impl World {
    fn new() -> Self {
        let policy = Policy {
            original_min_age: 3_000,
            resized_min_age: 1_000,
            partial_min_age: 500,
            evict: true,
            shared: None,
            coordinated: false,
        };
        World {
            state: CacheState::new(),
            policy,
            now: 0,
            files: BTreeMap::new(),
            referenced: BTreeSet::new(),
            next_ino: 100,
            next_fh: 1,
            next_pid: 1000,
            subs: BTreeMap::new(),
        }
    }

    fn ino_named(&self, name: &str) -> Option<u64> {
        self.files.iter().find(|(_, f)| f.name.as_deref() == Some(name)).map(|(i, _)| *i)
    }

    fn drop_name(&mut self, name: &str) {
        if let Some(ino) = self.ino_named(name) {
            let f = self.files.get_mut(&ino).unwrap();
            f.name = None;
            if f.opens.is_empty() {
                self.files.remove(&ino);
            }
        }
    }

    /// Tells the state what a /proc walk would find outside the mount for `ino`.
    fn walk(&mut self, ino: u64) {
        let found = self.files[&ino]
            .outside
            .iter()
            .map(|(&pid, &w)| {
                (Holder { pid, program: "qemu-nbd".into(), instance: None, start_time: 9 }, w)
            })
            .collect();
        self.state.set_outside(ino, found, t(self.now));
    }

    fn min_age(&self, name: &str) -> u64 {
        self.policy.min_age(imagecachefs::kind::Kind::of(name.as_ref()))
    }

    fn apply(&mut self, op: &Op) {
        let now = t(self.now);
        match *op {
            Op::Create { file } => {
                let name = NAMES[file];
                if self.ino_named(name).is_none() {
                    let ino = self.next_ino;
                    self.next_ino += 1;
                    self.state.observe(name.as_ref(), ino, 1, now);
                    let f = MFile {
                        name: Some(name.into()),
                        last_used: self.now,
                        ..Default::default()
                    };
                    self.files.insert(ino, f);
                }
            }
            Op::Open { file, write } => {
                if let Some(ino) = self.ino_named(NAMES[file]) {
                    let fh = self.next_fh;
                    self.next_fh += 1;
                    let change = RefChange::Open { fh, ino, holder: holder(), write };
                    self.state.reference(change, now);
                    self.files.get_mut(&ino).unwrap().opens.insert(fh, write);
                }
            }
            Op::Release { pick } => {
                let all: Vec<(u64, u64)> = self
                    .files
                    .iter()
                    .flat_map(|(ino, f)| f.opens.keys().map(move |fh| (*ino, *fh)))
                    .collect();
                if all.is_empty() {
                    return;
                }
                let (ino, fh) = all[pick % all.len()];
                self.state.reference(RefChange::Release { fh }, now);
                let f = self.files.get_mut(&ino).unwrap();
                f.opens.remove(&fh);
                f.last_used = f.last_used.max(self.now);
                if f.name.is_none() && f.opens.is_empty() {
                    self.files.remove(&ino);
                }
            }
            Op::OpenElsewhere { sub, write } => {
                let ino = *self.subs.entry(sub).or_insert_with(|| {
                    self.next_ino += 1;
                    self.next_ino - 1
                });
                let fh = self.next_fh;
                self.next_fh += 1;
                let change = RefChange::Open { fh, ino, holder: holder(), write };
                self.state.reference(change, now);
                self.files.entry(ino).or_default().opens.insert(fh, write);
            }
            Op::MoveIn { sub, to } => {
                let Some(ino) = self.subs.remove(&sub) else { return };
                let name = NAMES[to];
                self.state.observe(name.as_ref(), ino, 1, now);
                self.drop_name(name);
                let f = self.files.entry(ino).or_default();
                f.name = Some(name.into());
                f.last_used = f.last_used.max(self.now);
            }
            Op::Link { from, to } => {
                let (a, b) = (NAMES[from], NAMES[to]);
                let Some(ino) = self.ino_named(a) else { return };
                if a == b {
                    return;
                }
                self.state.observe(b.as_ref(), ino, 1, now);
                self.drop_name(b);
                // The table follows the newest name of an inode.
                self.files.get_mut(&ino).unwrap().name = Some(b.into());
            }
            Op::Fork { file, write } => {
                let Some(ino) = self.ino_named(NAMES[file]) else { return };
                self.next_pid += 1;
                let pid = self.next_pid;
                self.files.get_mut(&ino).unwrap().outside.insert(pid, write);
                self.walk(ino);
            }
            Op::HolderExits { file, pick } => {
                let Some(ino) = self.ino_named(NAMES[file]) else { return };
                let f = self.files.get_mut(&ino).unwrap();
                let Some(&pid) = f.outside.keys().nth(pick % f.outside.len().max(1)) else {
                    return;
                };
                f.outside.remove(&pid);
                f.last_used = f.last_used.max(self.now);
                self.walk(ino);
            }
            Op::ReleaseUnknown => {
                self.state.reference(RefChange::Release { fh: 999_999 }, now);
            }
            Op::Pin { file, pinned } => {
                let known = self.state.set_pin(NAMES[file].as_ref(), pinned, now);
                assert_eq!(known, self.ino_named(NAMES[file]).is_some());
                if let Some(ino) = self.ino_named(NAMES[file]) {
                    self.files.get_mut(&ino).unwrap().pinned = pinned;
                }
            }
            Op::Touch { file } => {
                if let Some(ino) = self.ino_named(NAMES[file]) {
                    self.state.touch(ino, now);
                    let f = self.files.get_mut(&ino).unwrap();
                    f.last_used = f.last_used.max(self.now);
                }
            }
            Op::Reference { file, on } => {
                if on {
                    self.referenced.insert(NAMES[file].into());
                } else {
                    self.referenced.remove(NAMES[file]);
                }
            }
            Op::Rename { from, to } => {
                let (a, b) = (NAMES[from], NAMES[to]);
                if a == b || self.ino_named(a).is_none() {
                    return;
                }
                self.state.rename(a.as_ref(), b.as_ref());
                self.drop_name(b);
                let ino = self.ino_named(a).unwrap();
                self.files.get_mut(&ino).unwrap().name = Some(b.into());
            }
            Op::Unlink { file } => {
                self.state.forget_name(NAMES[file].as_ref());
                self.drop_name(NAMES[file]);
            }
            Op::Advance { secs } => self.now += secs,
            Op::EvictTick => self.evict_tick(),
            Op::ServerRestart => self.server_restart(),
        }
    }

    /// What a new server rebuilds: the state file's records, the names found again, the
    /// journal's open handles, a /proc walk.
    fn server_restart(&mut self) {
        let now = t(self.now);
        let mut fresh = CacheState::new();
        let bad = fresh.restore(&self.state.persist_text());
        assert_eq!(bad, 0, "the state file reads back whole");
        for (&ino, f) in &self.files {
            if let Some(name) = &f.name {
                fresh.observe(name.as_ref(), ino, 1, now);
            }
        }
        for (&ino, f) in &self.files {
            for (&fh, &write) in &f.opens {
                fresh.reference(RefChange::Open { fh, ino, holder: holder(), write }, now);
            }
        }
        self.state = fresh;
        let held: Vec<u64> =
            self.files.iter().filter(|(_, f)| !f.outside.is_empty()).map(|(i, _)| *i).collect();
        for ino in held {
            self.walk(ino);
        }
    }

    /// What the eviction thread does for each file, with the model's expectation.
    fn evict_tick(&mut self) {
        let now = t(self.now);
        let inos: Vec<u64> = self.files.keys().copied().collect();
        for ino in inos {
            let f = self.files[&ino].clone();
            let Some(name) = f.name.clone() else { continue };
            let referenced = self.referenced.contains(&name);
            let expect = f.opens.is_empty()
                && f.outside.is_empty()
                && !f.pinned
                && !referenced
                && self.now >= f.last_used + self.min_age(&name);
            let got = self.state.begin_evict(ino, &self.policy, referenced, now, None).is_ok();
            assert_eq!(got, expect, "eviction of {name} (model {f:?}, now {})", self.now);
            if got {
                self.state.evicted(ino);
                self.files.remove(&ino);
            }
        }
    }

    fn check(&self) {
        let names: BTreeMap<OsString, u64> = self
            .files
            .iter()
            .filter_map(|(ino, f)| Some((OsString::from(f.name.clone()?), *ino)))
            .collect();
        let got: BTreeMap<OsString, u64> =
            self.state.images().map(|i| (i.name.clone().unwrap(), i.ino)).collect();
        assert_eq!(got, names, "named files");
        for (ino, f) in &self.files {
            let img = self.state.image(*ino).expect("model file in state");
            let refs = f.opens.len() + f.outside.len();
            assert_eq!(img.refs(), refs, "refs of {ino}");
            let writers = f.opens.values().chain(f.outside.values()).filter(|w| **w).count();
            assert_eq!(img.writers(), writers, "writers of {ino}");
            if f.name.is_none() {
                continue;
            }
            assert_eq!(img.pinned, f.pinned);
            assert_eq!(img.last_used, t(f.last_used), "last_used of {ino}");
            let age = if refs == 0 { self.now - f.last_used } else { 0 };
            assert_eq!(img.age(t(self.now)), age);
        }
    }
}

fn run(ops: &[Op]) {
    let mut w = World::new();
    for op in ops {
        w.apply(op);
        w.check();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn bookkeeping_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops);
    }
}

#[test]
fn regression_release_after_rename_keeps_last_use_on_the_new_name() {
    run(&[
        Op::Create { file: 0 },
        Op::Open { file: 0, write: false },
        Op::Rename { from: 0, to: 2 },
        Op::Advance { secs: 10 },
        Op::Release { pick: 0 },
        Op::Advance { secs: 3_000 },
        Op::EvictTick,
    ]);
}

#[test]
fn regression_open_file_survives_unlink_and_goes_at_release() {
    run(&[
        Op::Create { file: 1 },
        Op::Open { file: 1, write: true },
        Op::Unlink { file: 1 },
        Op::Create { file: 1 },
        Op::Advance { secs: 5_000 },
        Op::EvictTick,
        Op::Release { pick: 0 },
        Op::EvictTick,
    ]);
}

#[test]
fn regression_file_opened_in_a_subdirectory_is_held_once_moved_in() {
    run(&[
        Op::Create { file: 2 },
        Op::OpenElsewhere { sub: 0, write: false },
        Op::MoveIn { sub: 0, to: 2 },
        Op::Advance { secs: 10_000 },
        Op::EvictTick,
        Op::Release { pick: 0 },
        Op::Advance { secs: 3_000 },
        Op::EvictTick,
    ]);
}

#[test]
fn regression_child_that_inherited_a_descriptor_keeps_the_file() {
    run(&[
        Op::Create { file: 1 },
        Op::Fork { file: 1, write: false },
        Op::Fork { file: 1, write: false },
        Op::HolderExits { file: 1, pick: 0 },
        Op::Advance { secs: 10_000 },
        Op::EvictTick,
        Op::HolderExits { file: 1, pick: 0 },
        Op::Advance { secs: 1_000 },
        Op::EvictTick,
    ]);
}
