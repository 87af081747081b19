//! The text of the virtual status files, rendered from the bookkeeping. Pure: everything it
//! needs (state, policy, referenced names, time, counters) comes in a `View`.
//!
//! Formats are a contract (PRODUCT.md "The status tree", docs/STATUS.md): `images/NAME` is
//! `key: value` lines in a fixed order; `status` is a header and one aligned row per file;
//! `status.json` the same as JSON; `metrics` is Prometheus text exposition.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write;
use std::time::SystemTime;

use crate::clock::rfc3339;
use crate::kind::Kind;
use crate::state::{Blocker, CacheState, Image, Policy, Use, Verified};
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

pub struct View<'a> {
    pub state: &'a CacheState,
    pub policy: &'a Policy,
    /// Names that instance disks use as backing files.
    pub referenced: &'a BTreeSet<OsString>,
    pub now: SystemTime,
    pub counters: &'a Counters,
}

/// One file's computed row.
struct Row {
    name: String,
    kind: Kind,
    size: u64,
    refs: usize,
    holders: String,
    age: u64,
    last_used: String,
    min_age: u64,
    state: Use,
    evicts_at: String,
    sha1: String,
    verified: String,
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
        let mut holders: Vec<String> = img
            .opens
            .values()
            .map(|o| holder_text(&o.holder, false))
            .chain(img.early.iter().map(|(h, _)| holder_text(h, true)))
            .collect();
        holders.dedup();
        Row {
            name: name.to_string_lossy().into_owned(),
            kind: img.kind,
            size: img.size,
            refs: img.refs(),
            holders: if holders.is_empty() { "-".into() } else { holders.join("; ") },
            age: img.age(self.now),
            last_used: rfc3339(img.last_used),
            min_age: self.policy.min_age(img.kind),
            state,
            evicts_at,
            sha1: img.shown_checksum().map(|c| hex(&c.sha1)).unwrap_or_else(|| "pending".into()),
            verified: match img.verified {
                Verified::Never => "never".into(),
                Verified::Pending => "pending".into(),
                Verified::Ok(t) => format!("ok {}", rfc3339(t)),
                Verified::Mismatch(t) => format!("mismatch {}", rfc3339(t)),
            },
        }
    }

    fn rows(&self) -> Vec<Row> {
        self.state.images().map(|i| self.row(i)).collect()
    }
}

fn holder_text(h: &crate::procfs::Holder, early: bool) -> String {
    let mut s = format!("{} {}", h.pid, h.program);
    if let Some(i) = &h.instance {
        s.push(' ');
        s.push_str(i);
    }
    if early {
        s.push_str(" (before mount)");
    }
    s
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
        r.holders,
        r.age,
        r.last_used,
        r.min_age,
        r.state.as_str(),
        r.evicts_at,
        r.sha1,
        r.verified
    )
}

/// `status`: a header and one aligned row per file.
pub fn table(view: &View) -> String {
    let head = ["NAME", "KIND", "SIZE", "REFS", "AGE", "STATE", "EVICTS_AT", "SHA1", "VERIFIED"];
    let rows: Vec<[String; 9]> = view
        .rows()
        .into_iter()
        .map(|r| {
            let short = if r.sha1.len() == 40 { r.sha1[..12].to_string() } else { r.sha1 };
            [
                r.name,
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

/// `status.json`: the rows of `images/NAME` as JSON (numbers as numbers).
pub fn json(view: &View) -> String {
    let mut out = format!("{{\"generated_at\":{},\"images\":[", json_str(&rfc3339(view.now)));
    for (i, r) in view.rows().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"name\":{},\"kind\":{},\"size\":{},\"refs\":{},\"holders\":{},\"age\":{},\
             \"last_used\":{},\"min_age\":{},\"state\":{},\"evicts_at\":{},\"sha1\":{},\"verified\":{}}}",
            json_str(&r.name),
            json_str(r.kind.as_str()),
            r.size,
            r.refs,
            json_str(&r.holders),
            r.age,
            json_str(&r.last_used),
            r.min_age,
            json_str(r.state.as_str()),
            json_str(&r.evicts_at),
            json_str(&r.sha1),
            json_str(&r.verified)
        );
    }
    out.push_str("]}\n");
    out
}

/// `events`: oldest first, newest last.
pub fn events(state: &CacheState) -> String {
    let mut out = String::new();
    for e in state.events() {
        let _ = write!(out, "{} {} {}", rfc3339(e.at), e.kind.as_str(), e.name);
        if !e.detail.is_empty() {
            let _ = write!(out, " {}", e.detail);
        }
        out.push('\n');
    }
    out
}

/// `config`: `key: value` lines.
pub fn config(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
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
        let _ = writeln!(out, "imagecachefs_files{{kind=\"{k}\",state=\"{s}\"}} {n}");
    }
    metric(&mut out, "bytes", "gauge", "Bytes of cache files by kind and state.");
    for ((k, s), (_, b)) in &files {
        let _ = writeln!(out, "imagecachefs_bytes{{kind=\"{k}\",state=\"{s}\"}} {b}");
    }
    metric(&mut out, "references", "gauge", "Open references to cache files.");
    let _ = writeln!(out, "imagecachefs_references {refs}");
    let c = view.counters;
    metric(&mut out, "evictions_total", "counter", "Cache files evicted, by reason.");
    for (r, n) in &c.evictions {
        let _ = writeln!(out, "imagecachefs_evictions_total{{reason=\"{r}\"}} {n}");
    }
    metric(&mut out, "eviction_refusals_total", "counter", "Evictions refused, by reason.");
    for (r, n) in &c.refusals {
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
    out
}
