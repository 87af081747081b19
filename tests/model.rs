//! Model-based test of the reference and eviction bookkeeping (`state::CacheState`): random
//! sequences of opens, releases, renames, unlinks, pins, touches, backing-file references
//! and clock advances, checked against a plain reference model after every step.
//!
//! Invariants: reference counts equal the model's; a file with an open handle, a writer, a
//! pin or a backing-file reference is never evicted; every other file is evicted exactly
//! when its deadline (last use + its kind's threshold) has passed.

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
    Open { file: usize, write: bool },
    Release { pick: usize },
    ReleaseUnknown,
    Pin { file: usize, pinned: bool },
    Touch { file: usize },
    Reference { file: usize, on: bool },
    Rename { from: usize, to: usize },
    Unlink { file: usize },
    Create { file: usize },
    Advance { secs: u64 },
    EvictTick,
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
        3 => (0..5_000u64).prop_map(|secs| Op::Advance { secs }),
        3 => Just(Op::EvictTick),
    ]
}

/// The reference model: per inode, its open handles and what else guards it.
#[derive(Clone, Debug, Default)]
struct MFile {
    name: Option<String>,
    opens: BTreeMap<u64, bool>,
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
        };
        World {
            state: CacheState::new(),
            policy,
            now: 0,
            files: BTreeMap::new(),
            referenced: BTreeSet::new(),
            next_ino: 100,
            next_fh: 1,
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
            if f.name.is_none() {
                continue;
            }
            let img = self.state.image(*ino).expect("model file in state");
            assert_eq!(img.refs(), f.opens.len(), "refs of {ino}");
            assert_eq!(img.writers(), f.opens.values().filter(|w| **w).count());
            assert_eq!(img.pinned, f.pinned);
            assert_eq!(img.last_used, t(f.last_used), "last_used of {ino}");
            let age = if f.opens.is_empty() { self.now - f.last_used } else { 0 };
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
