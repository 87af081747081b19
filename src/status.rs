//! The text of the virtual status files, rendered from the bookkeeping. Pure: everything it
//! needs (state, policy, referenced names, time, counters) comes in a `View`.
//!
//! Formats are a contract (PRODUCT.md "The status tree", docs/STATUS.md): `images/NAME` is
//! `key: value` lines in a fixed order; `status` is a header and one aligned row per file;
//! `status.json` the same as JSON; `metrics` is Prometheus text exposition.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use crate::clock::rfc3339;
use crate::kind::Kind;
use crate::procfs::Holder;
use crate::state::{Blocker, CacheState, Image, Policy, Use, Verified};
use crate::text::{escape, label_value, shorten};
use crate::verify::hex;

/// Monotonic counters for `metrics`.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Evictions by reason (`idle`, `corrupt`, `pressure`, `operator`).
    pub evictions: BTreeMap<&'static str, u64>,
    /// Refused evictions by reason.
    pub refusals: BTreeMap<&'static str, u64>,
    pub reclaimed_bytes: u64,
    pub verifications: u64,
    pub mismatches: u64,
    pub verifier_bytes: u64,
    pub verifier_seconds: f64,
    pub passthrough_fallbacks: u64,
}

/// Who reads a status file. Everything about the files (names, kinds, sizes, reference
/// counts, states, ages, deadlines, verification results) is for everyone; what says more
/// than a directory listing would (SHA-1s, and who holds a file: pids, programs, instance
/// names) is for root only (docs/STATUS.md, "Who sees what").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reader {
    Root,
    Other,
}

/// Whether the state file on disk holds what a status file shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Persisted {
    /// Everything this rendering shows is in the state file.
    pub on_disk: bool,
    /// When the state file was last written by this daemon.
    pub at: Option<SystemTime>,
    /// State-file writes by this daemon.
    pub writes: u64,
}

pub struct View<'a> {
    pub state: &'a CacheState,
    pub policy: &'a Policy,
    /// Names that instance disks use as backing files.
    pub referenced: &'a BTreeSet<OsString>,
    pub now: SystemTime,
    pub counters: &'a Counters,
    pub reader: Reader,
    pub persisted: Persisted,
}

/// The width of the `NAME` column of `status`: longer names are cut (the full name is in
/// `images/NAME` and `status.json`).
pub const NAME_WIDTH: usize = 64;

/// Shown instead of what a non-root reader may not see.
const HIDDEN: &str = "hidden";

/// One holder of a file, for display.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HolderRow {
    pid: u32,
    /// Escaped.
    program: String,
    /// Escaped.
    instance: Option<String>,
    /// When its handle was opened (`None`: from before the mount).
    since: Option<SystemTime>,
}

impl HolderRow {
    fn text(&self) -> String {
        let mut s = format!("{} {}", self.pid, self.program);
        if let Some(i) = &self.instance {
            s.push(' ');
            s.push_str(i);
        }
        if self.since.is_none() {
            s.push_str(" (before mount)");
        }
        s
    }

    fn json(&self) -> String {
        format!(
            "{{\"pid\":{},\"program\":{},\"instance\":{},\"since\":{},\"before_mount\":{}}}",
            self.pid,
            json_str(&self.program),
            self.instance.as_deref().map_or("null".into(), json_str),
            self.since.map_or("null".into(), |t| json_str(&rfc3339(t))),
            self.since.is_none()
        )
    }
}

/// One file's computed row. Names are escaped (`text::escape`); `None` is withheld from
/// this reader.
struct Row {
    name: String,
    kind: Kind,
    size: u64,
    refs: usize,
    /// The holders shown (at most `HOLDERS_SHOWN`, one per process) and how many more there
    /// are; `None`: withheld from this reader.
    holders: Option<(Vec<HolderRow>, usize)>,
    age: u64,
    last_used: String,
    min_age: u64,
    state: Use,
    evicts_at: String,
    sha1: Option<String>,
    verified: String,
}

impl Row {
    fn holders_text(&self) -> String {
        match &self.holders {
            None => HIDDEN.into(),
            Some((h, _)) if h.is_empty() => "-".into(),
            Some((h, more)) => {
                let mut text = h.iter().map(HolderRow::text).collect::<Vec<_>>().join("; ");
                if *more > 0 {
                    let _ = write!(text, "; (+{more} more)");
                }
                text
            }
        }
    }

    fn sha1_text(&self) -> &str {
        self.sha1.as_deref().unwrap_or(HIDDEN)
    }
}

/// Processes shown per file in `holders` (`refs` counts them all).
pub const HOLDERS_SHOWN: usize = 32;

fn holder_row(h: &Holder, since: Option<SystemTime>) -> HolderRow {
    HolderRow {
        pid: h.pid,
        program: escape(h.program.as_bytes()),
        instance: h.instance.as_ref().map(|i| escape(i.as_bytes())),
        since,
    }
}

impl View<'_> {
    fn row(&self, img: &Image) -> Row {
        let name = img.name.as_deref().unwrap_or_default();
        let referenced = self.referenced.contains(name);
        let state = CacheState::use_of(img, referenced);
        let evictable = CacheState::blocker(img, self.policy, referenced, SystemTime::UNIX_EPOCH)
            .is_none_or(|b| matches!(b, Blocker::NotDue | Blocker::SharedStorage));
        let evicts_at = match CacheState::deadline(img, self.policy) {
            _ if !evictable => "-".to_string(),
            None => "never".to_string(),
            Some(d) => rfc3339(d.max(self.now)),
        };
        let root = self.reader == Reader::Root;
        let holders = root.then(|| {
            // One row per process (QEMU opens a file more than once), and a bounded number of
            // rows: the cost of a status file does not grow with what one user holds open.
            let mut seen = std::collections::HashSet::new();
            let (mut rows, mut more) = (Vec::new(), 0);
            let all = img
                .opens
                .values()
                .map(|o| (&o.holder, Some(o.since)))
                .chain(img.early.iter().map(|(h, _)| (h, None)));
            for (h, since) in all {
                if !seen.insert((h.pid, h.start_time)) {
                    continue;
                }
                if rows.len() < HOLDERS_SHOWN {
                    rows.push(holder_row(h, since));
                } else {
                    more += 1;
                }
            }
            (rows, more)
        });
        let sha1 = img.shown_checksum().map(|c| hex(&c.sha1)).unwrap_or_else(|| "pending".into());
        Row {
            name: escape(name.as_bytes()),
            kind: img.kind,
            size: img.size,
            refs: img.refs(),
            holders,
            age: img.age(self.now),
            last_used: rfc3339(img.last_used),
            min_age: self.policy.min_age(img.kind),
            state,
            evicts_at,
            sha1: root.then_some(sha1),
            verified: match img.verified {
                Verified::Never => "never".into(),
                Verified::Pending => "pending".into(),
                Verified::Ok(t) => format!("ok {}", rfc3339(t)),
                Verified::Mismatch(t) => format!("mismatch {}", rfc3339(t)),
            },
        }
    }

    fn rows(&self) -> impl Iterator<Item = Row> + '_ {
        self.state.images().map(|i| self.row(i))
    }
}

/// `images/NAME`.
pub fn image(view: &View, img: &Image) -> String {
    let r = view.row(img);
    format!(
        "name: {}\nkind: {}\nsize: {}\nrefs: {}\nholders: {}\nage: {}\nlast_used: {}\n\
         min_age: {}\nstate: {}\nevicts_at: {}\nsha1: {}\nverified: {}\n",
        r.name,
        r.kind.as_str(),
        r.size,
        r.refs,
        r.holders_text(),
        r.age,
        r.last_used,
        r.min_age,
        r.state.as_str(),
        r.evicts_at,
        r.sha1_text(),
        r.verified
    )
}

/// `status`: a header and one aligned row per file.
pub fn table(view: &View) -> String {
    let head = ["NAME", "KIND", "SIZE", "REFS", "AGE", "STATE", "EVICTS_AT", "SHA1", "VERIFIED"];
    let rows: Vec<[String; 9]> = view
        .rows()
        .map(|r| {
            let sha1 = r.sha1_text();
            let short = if sha1.len() == 40 { sha1[..12].to_string() } else { sha1.to_string() };
            [
                shorten(&r.name, NAME_WIDTH),
                r.kind.as_str().into(),
                r.size.to_string(),
                r.refs.to_string(),
                r.age.to_string(),
                r.state.as_str().into(),
                r.evicts_at,
                short,
                r.verified,
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&head);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `status.json`: the rows of `images/NAME` as JSON (numbers as numbers, `holders` as an
/// array of objects, withheld values as `null`), and whether the state file holds them.
pub fn json(view: &View) -> String {
    let p = view.persisted;
    let mut out = format!(
        "{{\"generated_at\":{},\"persisted\":{},\"persisted_at\":{},\"images\":[",
        json_str(&rfc3339(view.now)),
        p.on_disk,
        json_str(&p.at.map_or("never".into(), rfc3339)),
    );
    for (i, r) in view.rows().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let holders = match &r.holders {
            None => "null".to_string(),
            Some((h, _)) => {
                format!("[{}]", h.iter().map(HolderRow::json).collect::<Vec<_>>().join(","))
            }
        };
        let _ = write!(
            out,
            "{{\"name\":{},\"kind\":{},\"size\":{},\"refs\":{},\"holders\":{},\"age\":{},\
             \"last_used\":{},\"min_age\":{},\"state\":{},\"evicts_at\":{},\"sha1\":{},\"verified\":{}}}",
            json_str(&r.name),
            json_str(r.kind.as_str()),
            r.size,
            r.refs,
            holders,
            r.age,
            json_str(&r.last_used),
            r.min_age,
            json_str(r.state.as_str()),
            json_str(&r.evicts_at),
            r.sha1.as_deref().map_or("null".into(), json_str),
            json_str(&r.verified)
        );
    }
    out.push_str("]}\n");
    out
}

/// `events`: oldest first, newest last.
/// Names are stored escaped; a non-root reader sees `hidden` for every SHA-1 in the details.
pub fn events(state: &CacheState, reader: Reader) -> String {
    let mut out = String::new();
    for e in state.events() {
        let _ = write!(out, "{} {} {}", rfc3339(e.at), e.kind.as_str(), e.name);
        if !e.detail.is_empty() {
            out.push(' ');
            if reader == Reader::Root {
                out.push_str(&e.detail);
            } else {
                let words: Vec<&str> = e
                    .detail
                    .split(' ')
                    .map(|w| if crate::verify::parse_hex(w).is_some() { HIDDEN } else { w })
                    .collect();
                out.push_str(&words.join(" "));
            }
        }
        out.push('\n');
    }
    out
}

/// `config`: `key: value` lines.
/// `config`: `key: value` lines, values escaped (paths are shown as every name is).
pub fn config(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}: {}\n", escape(v.as_bytes()))).collect()
}

/// `server`: the process serving the mount now, and the last time one was replaced.
pub fn server(info: Option<&crate::cache::ServerInfo>) -> String {
    let Some(s) = info else { return String::new() };
    let last = match &s.last_restart {
        Some(l) => format!(
            "{} at {} ({} ms)",
            l.cause.replace('\n', " "),
            crate::clock::rfc3339(l.at),
            l.duration.as_millis()
        ),
        None => "-".into(),
    };
    format!(
        "pid: {}\nstarted: {}\nrestarts: {}\nlast_restart: {last}\n",
        s.pid,
        crate::clock::rfc3339(s.started),
        s.restarts
    )
}

/// The server's lines of `metrics`.
pub fn server_metrics(info: Option<&crate::cache::ServerInfo>) -> String {
    let Some(s) = info else { return String::new() };
    let mut out = String::new();
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
    };
    metric(&mut out, "server_start_time_seconds", "gauge", "When the serving process started.");
    let _ = writeln!(out, "imagecachefs_server_start_time_seconds {:.3}", secs(s.started));
    metric(
        &mut out,
        "restarts_total",
        "counter",
        "Servers replaced on the live connection since the mount (crashes and upgrades).",
    );
    let _ = writeln!(out, "imagecachefs_restarts_total {}", s.restarts);
    metric(
        &mut out,
        "last_restart_duration_seconds",
        "gauge",
        "From the previous server's end to this one serving (0 before any restart).",
    );
    let d = s.last_restart.as_ref().map(|l| l.duration.as_secs_f64()).unwrap_or(0.0);
    let _ = writeln!(out, "imagecachefs_last_restart_duration_seconds {d:.3}");
    out
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP imagecachefs_{name} {help}");
    let _ = writeln!(out, "# TYPE imagecachefs_{name} {kind}");
}

/// `metrics`: Prometheus text exposition.
pub fn metrics(view: &View) -> String {
    let mut files: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    let mut refs = 0;
    for img in view.state.images() {
        let referenced = img.name.as_ref().is_some_and(|n| view.referenced.contains(n));
        let state = CacheState::use_of(img, referenced);
        let e = files.entry((img.kind.as_str(), state.as_str())).or_default();
        e.0 += 1;
        e.1 += img.size;
        refs += img.refs();
    }
    let mut out = String::new();
    metric(&mut out, "files", "gauge", "Cache files by kind and state.");
    for ((k, s), (n, _)) in &files {
        let (k, s) = (label_value(k), label_value(s));
        let _ = writeln!(out, "imagecachefs_files{{kind=\"{k}\",state=\"{s}\"}} {n}");
    }
    metric(&mut out, "bytes", "gauge", "Bytes of cache files by kind and state.");
    for ((k, s), (_, b)) in &files {
        let (k, s) = (label_value(k), label_value(s));
        let _ = writeln!(out, "imagecachefs_bytes{{kind=\"{k}\",state=\"{s}\"}} {b}");
    }
    metric(&mut out, "references", "gauge", "Open references to cache files.");
    let _ = writeln!(out, "imagecachefs_references {refs}");
    let c = view.counters;
    metric(&mut out, "evictions_total", "counter", "Cache files evicted, by reason.");
    for (r, n) in &c.evictions {
        let r = label_value(r);
        let _ = writeln!(out, "imagecachefs_evictions_total{{reason=\"{r}\"}} {n}");
    }
    metric(&mut out, "eviction_refusals_total", "counter", "Evictions refused, by reason.");
    for (r, n) in &c.refusals {
        let r = label_value(r);
        let _ = writeln!(out, "imagecachefs_eviction_refusals_total{{reason=\"{r}\"}} {n}");
    }
    metric(&mut out, "reclaimed_bytes_total", "counter", "Bytes freed by evictions.");
    let _ = writeln!(out, "imagecachefs_reclaimed_bytes_total {}", c.reclaimed_bytes);
    metric(&mut out, "verifications_total", "counter", "Checksum re-verifications completed.");
    let _ = writeln!(out, "imagecachefs_verifications_total {}", c.verifications);
    metric(
        &mut out,
        "checksum_mismatches_total",
        "counter",
        "Re-verifications that found corruption.",
    );
    let _ = writeln!(out, "imagecachefs_checksum_mismatches_total {}", c.mismatches);
    metric(&mut out, "verifier_bytes_total", "counter", "Bytes hashed by the checksum thread.");
    let _ = writeln!(out, "imagecachefs_verifier_bytes_total {}", c.verifier_bytes);
    metric(
        &mut out,
        "verifier_bytes_per_second",
        "gauge",
        "Average hashing rate of the checksum thread.",
    );
    let rate =
        if c.verifier_seconds > 0.0 { c.verifier_bytes as f64 / c.verifier_seconds } else { 0.0 };
    let _ = writeln!(out, "imagecachefs_verifier_bytes_per_second {rate:.0}");
    metric(
        &mut out,
        "passthrough_fallbacks_total",
        "counter",
        "Inodes served by the daemon because the kernel refused passthrough.",
    );
    let _ = writeln!(out, "imagecachefs_passthrough_fallbacks_total {}", c.passthrough_fallbacks);
    let p = view.persisted;
    metric(&mut out, "state_writes_total", "counter", "Writes of the state file.");
    let _ = writeln!(out, "imagecachefs_state_writes_total {}", p.writes);
    metric(
        &mut out,
        "state_persisted",
        "gauge",
        "1 if the state file holds everything this rendering shows, else 0.",
    );
    let _ = writeln!(out, "imagecachefs_state_persisted {}", u8::from(p.on_disk));
    metric(
        &mut out,
        "state_persisted_timestamp_seconds",
        "gauge",
        "When the state file was last written (0: not yet by this daemon).",
    );
    let at = p.at.map_or(0, crate::clock::unix_secs);
    let _ = writeln!(out, "imagecachefs_state_persisted_timestamp_seconds {at}");
    out
}

/// A change detector for the counters: every counter only grows, so any change moves the
/// sum.
pub fn counters_sum(c: &Counters) -> u64 {
    let maps = c.evictions.values().chain(c.refusals.values());
    maps.fold(0u64, |a, n| a.wrapping_add(*n))
        .wrapping_add(c.reclaimed_bytes)
        .wrapping_add(c.verifications)
        .wrapping_add(c.mismatches)
        .wrapping_add(c.verifier_bytes)
        .wrapping_add(c.passthrough_fallbacks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RefChange;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStringExt;
    use std::time::Duration;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A state with one file per name, each held by one handle of the matching holder.
    fn state_of(names: &[Vec<u8>], holders: &[(String, Option<String>)]) -> CacheState {
        let mut s = CacheState::new();
        for (i, n) in names.iter().enumerate() {
            let ino = 100 + i as u64;
            s.observe(&OsString::from_vec(n.clone()), ino, 4096, t(1_000));
            let (program, instance) = holders[i % holders.len()].clone();
            let holder = Holder { pid: 4242, program, instance, start_time: 1 };
            s.reference(RefChange::Open { fh: ino, ino, holder, write: false }, t(1_500));
            let stamp = crate::state::Stamp { ino, size: 4096, mtime: t(1_000) };
            s.record_hash(ino, 0, [0xab; 20], stamp, t(1_600));
        }
        s
    }

    #[test]
    fn holders_show_once_per_process_and_at_most_a_bounded_number() {
        let mut s = CacheState::new();
        s.observe(std::ffi::OsStr::new("swap_512"), 7, 10, t(1_000));
        let h = |pid| Holder { pid, program: "qemu-img".into(), instance: None, start_time: 1 };
        for fh in 0..500u64 {
            let change = RefChange::Open { fh, ino: 7, holder: h(1_000), write: false };
            s.reference(change, t(1_500));
        }
        for pid in 0..100u32 {
            let change = RefChange::Open {
                fh: 1_000 + u64::from(pid),
                ino: 7,
                holder: h(pid),
                write: false,
            };
            s.reference(change, t(1_500));
        }
        let (policy, refs, counters) = (Policy::default(), BTreeSet::new(), Counters::default());
        let v = view(&s, &policy, &refs, &counters, Reader::Root);
        let text = image(&v, s.image(7).unwrap());
        let holders = text.lines().find(|l| l.starts_with("holders: ")).unwrap();
        assert_eq!(holders.matches("qemu-img").count(), HOLDERS_SHOWN, "{holders}");
        assert!(holders.ends_with(&format!("(+{} more)", 101 - HOLDERS_SHOWN)), "{holders}");
        assert!(text.contains("refs: 600\n"), "{text}");
    }

    fn view<'a>(
        s: &'a CacheState,
        policy: &'a Policy,
        referenced: &'a BTreeSet<OsString>,
        counters: &'a Counters,
        reader: Reader,
    ) -> View<'a> {
        View {
            state: s,
            policy,
            referenced,
            now: t(2_000),
            counters,
            reader,
            persisted: Persisted::default(),
        }
    }

    fn names() -> impl Strategy<Value = Vec<Vec<u8>>> {
        // Any bytes but '/' and NUL, as a file name may hold; up to 255 bytes.
        let name = proptest::collection::vec(
            any::<u8>().prop_filter("", |b| *b != b'/' && *b != 0),
            1..256,
        );
        proptest::collection::btree_set(name, 1..6).prop_map(|s| s.into_iter().collect())
    }

    fn holders() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
        proptest::collection::vec((any::<String>(), proptest::option::of(any::<String>())), 1..4)
    }

    proptest! {
        #[test]
        fn no_name_or_program_adds_a_line_a_key_or_a_column(names in names(), holders in holders()) {
            let s = state_of(&names, &holders);
            let (policy, referenced, counters) = (Policy::default(), BTreeSet::new(), Counters::default());
            for reader in [Reader::Root, Reader::Other] {
                let v = view(&s, &policy, &referenced, &counters, reader);
                let table = table(&v);
                prop_assert_eq!(table.lines().count(), 1 + names.len(), "{}", table);
                for line in table.lines() {
                    // Nine columns, the last (`VERIFIED`) "ok <time>" or "never".
                    let cells = line.split_whitespace().count();
                    prop_assert!(cells == 9 || cells == 10, "{}", line);
                    prop_assert!(line.split_whitespace().next().unwrap().len() <= NAME_WIDTH);
                }
                for img in s.images() {
                    let text = image(&v, img);
                    let keys: Vec<&str> = text.lines().map(|l| l.split_once(": ").unwrap().0).collect();
                    prop_assert_eq!(keys.len(), 12, "{}", text);
                    let name = text.lines().next().unwrap().strip_prefix("name: ").unwrap();
                    prop_assert_eq!(
                        crate::text::unescape(name),
                        Some(img.name.as_ref().unwrap().as_bytes().to_vec())
                    );
                }
                let json = json(&v);
                prop_assert_eq!(json.lines().count(), 1);
                let doc: serde_json::Value = serde_json::from_str(&json).map_err(|e| {
                    TestCaseError::fail(format!("{e}: {json}"))
                })?;
                let imgs = doc["images"].as_array().unwrap();
                prop_assert_eq!(imgs.len(), names.len());
                for (img, want) in imgs.iter().zip(s.images()) {
                    let name = img["name"].as_str().unwrap();
                    prop_assert_eq!(
                        crate::text::unescape(name),
                        Some(want.name.as_ref().unwrap().as_bytes().to_vec())
                    );
                    match reader {
                        Reader::Root => {
                            let h = img["holders"].as_array().unwrap();
                            prop_assert_eq!(h.len(), 1);
                            prop_assert_eq!(h[0]["pid"].as_u64(), Some(4242));
                            let program = h[0]["program"].as_str().unwrap();
                            let o = want.opens.values().next().unwrap();
                            prop_assert_eq!(crate::text::unescape(program), Some(o.holder.program.as_bytes().to_vec()));
                            prop_assert_eq!(h[0]["since"].as_str(), Some("1970-01-01T00:25:00Z"));
                            prop_assert_eq!(img["sha1"].as_str().map(str::len), Some(40));
                        }
                        Reader::Other => {
                            prop_assert!(img["holders"].is_null());
                            prop_assert!(img["sha1"].is_null());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn non_root_readers_see_no_holders_and_no_sha1() {
        let holders = [("qemu-system-x86_64".to_string(), Some("instance-0000002a".to_string()))];
        let s = state_of(&[b"0d5e6b61602d758984b3bf038267614d6016eb2a".to_vec()], &holders);
        let (policy, referenced, counters) =
            (Policy::default(), BTreeSet::new(), Counters::default());
        let img = s.images().next().unwrap();
        let root = image(&view(&s, &policy, &referenced, &counters, Reader::Root), img);
        assert!(root.contains("holders: 4242 qemu-system-x86_64 instance-0000002a\n"), "{root}");
        assert!(root.contains(&format!("sha1: {}\n", "ab".repeat(20))), "{root}");
        let other = view(&s, &policy, &referenced, &counters, Reader::Other);
        let text = image(&other, img);
        assert!(
            text.contains("holders: hidden\nage:") && text.contains("sha1: hidden\n"),
            "{text}"
        );
        assert!(text.contains("refs: 1\n"), "the count is for everyone: {text}");
        for out in [text, table(&other), json(&other), events(&s, Reader::Other)] {
            assert!(!out.contains("abab") && !out.contains("4242"), "{out}");
            assert!(!out.contains("instance-0000002a"), "{out}");
        }
        assert!(events(&s, Reader::Root).contains(&"ab".repeat(20)));
    }

    #[test]
    fn a_forged_name_stays_on_its_row() {
        let s =
            state_of(&[b"evil\nstate: idle".to_vec(), vec![b'x'; 255]], &[("a\nb".into(), None)]);
        let (policy, referenced, counters) =
            (Policy::default(), BTreeSet::new(), Counters::default());
        let v = view(&s, &policy, &referenced, &counters, Reader::Root);
        let table = table(&v);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.contains("evil\\x0astate:\\x20idle "), "{table}");
        let widest = table.lines().map(str::len).max().unwrap();
        assert!(
            widest < NAME_WIDTH + 120,
            "a 255-byte name widens no row past its column: {table}"
        );
        let img = s.by_name(std::ffi::OsStr::new("evil\nstate: idle")).unwrap();
        let text = image(&v, img);
        assert_eq!(text.lines().filter(|l| l.starts_with("state: ")).count(), 1, "{text}");
        assert!(text.contains("holders: 4242 a\\x0ab\n"), "{text}");
    }
}
