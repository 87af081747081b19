//! The documentation against the real thing, so that `docs/` cannot drift from the binary.
//!
//! - `docs/STATUS.md`: every example block (marked `<!-- example: LABEL -->`) was copied from a
//!   real mount. The main test rebuilds the same situation on a scratch mount and checks each
//!   block against what the mount prints: `images/NAME` keys and their order, `status` columns
//!   and alignment, `status.json` keys and JSON types, `metrics` names with their `# HELP` and
//!   `# TYPE` lines and labels (and both texts through Prometheus' own parser), `events`, and
//!   the output and exit code of every command of the `console` blocks. Values that vary from
//!   run to run (times, pids, sizes, digests, ages) are compared by shape, never literally.
//! - `docs/CONFIGURATION.md` names every flag `imagecachefs mount --help` prints, and no flag
//!   the binary does not have; each documented default and range is what `mount --check`
//!   accepts, refuses and reports; `--verify-interval 0` turns re-verification off.
//! - The README's test command is what `.ci/run` runs, and its setup step works here.
//! - Paths the docs give for repository files (`mount-scripts/...`, `src/...`) exist.
//!
//! Needs root, `/dev/fuse`, `qemu-io`, `qemu-img`, `setpriv`, `python3` and its
//! `prometheus_client` module; a missing one fails the test with its name, never skips it.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{bin, run, run_ok, wait_until, BindMount, Mount, Proc, Scratch};

/// Where the examples of STATUS.md were captured; replaced by the scratch root here.
const DOC_ROOT: &str = "/tmp/example";
/// The files of the example situation (see STATUS.md, "The examples on this page").
const IN_USE: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
const REFERENCED: &str = "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3";
const CORRUPT: &str = "da4b9237bacccdf19c0760cab7aec4a8359010b0";
const WRITING: &str = "1b6453892473a467d07372d45eb05abc2031647a.part";
const PINNED: &str = "swap_512";
const IDLE: &str = "ephemeral_1_0706d66";
const POLL: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc(name: &str) -> String {
    let p = repo().join("docs").join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Reading the examples out of the Markdown.

/// A fenced block that follows an `<!-- example: LABEL -->` line.
#[derive(Debug, Clone)]
struct Example {
    label: String,
    /// 1-based line of the marker, for messages.
    line: usize,
    body: String,
}

fn examples(md: &str) -> Vec<Example> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(label) = lines[i]
            .trim()
            .strip_prefix("<!-- example:")
            .and_then(|l| l.strip_suffix("-->"))
            .map(str::trim)
        else {
            i += 1;
            continue;
        };
        let line = i + 1;
        assert!(
            lines.get(i + 1).is_some_and(|l| l.starts_with("```")),
            "STATUS.md:{line}: the example marker must be followed by a ``` fence"
        );
        let mut body = String::new();
        let mut j = i + 2;
        while j < lines.len() && !lines[j].starts_with("```") {
            body.push_str(lines[j]);
            body.push('\n');
            j += 1;
        }
        assert!(j < lines.len(), "STATUS.md:{line}: unterminated fence");
        out.push(Example { label: label.to_string(), line, body });
        i = j + 1;
    }
    out
}

fn example<'a>(all: &'a [Example], label: &str) -> &'a Example {
    all.iter()
        .find(|e| e.label == label)
        .unwrap_or_else(|| panic!("STATUS.md has no `<!-- example: {label} -->` block"))
}

/// The example labels this test knows how to reproduce.
fn known_labels() -> BTreeSet<String> {
    let mut l: BTreeSet<String> = [IN_USE, WRITING, REFERENCED, PINNED, IDLE, CORRUPT]
        .iter()
        .map(|n| format!("images/{n}"))
        .collect();
    for s in [
        "status",
        "status.json",
        "metrics",
        "events",
        "config",
        "console control",
        "console control-file",
        "console corrupt",
        "console unpin",
    ] {
        l.insert(s.to_string());
    }
    l
}

// ---------------------------------------------------------------------------------------------
// Comparing by shape.

/// `2026-11-21T09:00:00Z` at the start of `b`.
fn is_time(b: &[u8]) -> bool {
    b.len() >= 20
        && b[..20].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The shape of a value: RFC 3339 times become `<time>`, 40-hex digests `<sha1>`, other
/// numbers `<n>` (a number inside a word, like the 1 of `sha1`, stays).
fn norm(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let boundary = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        if boundary && is_time(&b[i..]) {
            out.push_str("<time>");
            i += 20;
            continue;
        }
        let hex = b[i..].iter().take_while(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
        let len = hex.count();
        let end_ok = b.get(i + len).is_none_or(|c| !c.is_ascii_alphanumeric());
        if boundary && end_ok && len > 0 {
            let run = &s[i..i + len];
            if len == 40 {
                out.push_str("<sha1>");
                i += len;
                continue;
            }
            if run.bytes().all(|c| c.is_ascii_digit()) {
                out.push_str("<n>");
                i += len;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// `key: value` lines.
fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| match l.split_once(": ") {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

/// An `images/NAME` text: same keys in the same order, `name` literal, the rest by shape.
fn check_image(what: &str, doc: &str, live: &str) {
    let (d, l) = (key_values(doc), key_values(live));
    let keys = |v: &[(String, String)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&d), keys(&l), "{what}: keys differ\n--- doc:\n{doc}--- live:\n{live}");
    for ((k, dv), (_, lv)) in d.iter().zip(&l) {
        let same = if k == "name" { dv == lv } else { norm(dv) == norm(lv) };
        assert!(
            same,
            "{what}: `{k}:` differs in shape: doc {dv:?} ({}), live {lv:?} ({})\n--- live:\n{live}",
            norm(dv),
            norm(lv)
        );
    }
}

/// A `status` table: header cells, and per row the cells cut at the header's column starts.
/// Checks the alignment on the way.
fn table(what: &str, text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_else(|| panic!("{what}: empty"));
    let mut starts = Vec::new();
    let hb = header.as_bytes();
    for i in 0..hb.len() {
        if hb[i] != b' ' && (i == 0 || hb[i - 1] == b' ') {
            starts.push(i);
        }
    }
    let names: Vec<String> = header.split_whitespace().map(str::to_string).collect();
    assert_eq!(names.len(), starts.len(), "{what}: header cells contain blanks: {header:?}");
    let mut rows = Vec::new();
    for line in lines {
        assert_eq!(line, line.trim_end(), "{what}: trailing blanks in {line:?}");
        let lb = line.as_bytes();
        let mut cells = Vec::new();
        for (c, &s) in starts.iter().enumerate() {
            assert!(
                s < lb.len() && lb[s] != b' ' && (s == 0 || lb[s - 2..s] == *b"  "),
                "{what}: column {} not aligned with the header in {line:?}",
                names[c]
            );
            let end = starts.get(c + 1).map_or(lb.len(), |&e| e);
            cells.push(line[s..end].trim_end().to_string());
        }
        rows.push(cells);
    }
    (names, rows)
}

fn check_table(what: &str, doc: &str, live: &str) {
    let (dh, drows) = table(&format!("{what} (doc)"), doc);
    let (lh, lrows) = table(&format!("{what} (live)"), live);
    assert_eq!(dh, lh, "{what}: header columns differ");
    let names = |rows: &[Vec<String>]| rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>();
    assert_eq!(names(&drows), names(&lrows), "{what}: rows differ\n--- live:\n{live}");
    let sha = dh.iter().position(|h| h == "SHA1").expect("a SHA1 column");
    let cell = |i: usize, v: &str| {
        if i == sha && v.len() == 12 && v.bytes().all(|c| c.is_ascii_hexdigit()) {
            "<sha1:12>".to_string()
        } else {
            norm(v)
        }
    };
    for (d, l) in drows.iter().zip(&lrows) {
        for (i, (dv, lv)) in d.iter().zip(l).enumerate() {
            assert_eq!(
                cell(i, dv),
                cell(i, lv),
                "{what}: row {}, column {}: doc {dv:?}, live {lv:?}",
                d[0],
                dh[i]
            );
        }
    }
}

/// Runs a Python snippet with `input` on stdin; returns (exit code, stdout, stderr).
fn python(script: &str, input: &str) -> (i32, String, String) {
    common::require_tool("python3");
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `status.json` as Python's `json` module reads it: the top-level keys with their types,
/// then per image `key=type=value` (values by shape, `name` literal).
fn json_shape(what: &str, text: &str) -> Vec<String> {
    const SCRIPT: &str = r#"
import json, sys
d = json.loads(sys.stdin.read())
print("top\t" + "\t".join("%s=%s" % (k, type(v).__name__) for k, v in d.items()))
for i in d["images"]:
    print("\t".join("%s=%s=%s" % (k, type(v).__name__, v) for k, v in i.items()))
"#;
    let (code, out, err) = python(SCRIPT, text);
    assert_eq!(code, 0, "{what}: not the JSON expected:\n{err}\n{text}");
    out.lines()
        .map(|l| {
            l.split('\t')
                .map(|f| if f.starts_with("name=") { f.to_string() } else { norm(f) })
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect()
}

/// The metric families Prometheus' own parser reads from `text`: `name type samples`.
fn prometheus_families(what: &str, text: &str) -> Vec<String> {
    const SCRIPT: &str = r#"
import sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    print("prometheus_client is missing: %s" % e, file=sys.stderr)
    sys.exit(3)
for f in text_string_to_metric_families(sys.stdin.read()):
    print(f.name, f.type, ",".join(sorted(set(s.name for s in f.samples))) or "-")
"#;
    let (code, out, err) = python(SCRIPT, text);
    assert_ne!(
        code,
        3,
        "the Python module prometheus_client is not installed for `python3` ({}): install it \
         with `python3 -m pip install prometheus_client` (or Debian's python3-prometheus-client); \
         .ci/run must install it",
        err.trim()
    );
    assert_eq!(code, 0, "{what}: Prometheus' parser refused the text:\n{err}\n{text}");
    out.lines().map(str::to_string).collect()
}

/// The families the `# HELP`/`# TYPE` lines promise, as the parser names them (a counter's
/// family drops `_total`).
fn expected_families(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
        let family = match kind {
            "counter" => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let samples: BTreeSet<&str> = text
            .lines()
            .filter(|s| !s.starts_with('#'))
            .filter_map(|s| s.split(['{', ' ']).next())
            .filter(|s| *s == name)
            .collect();
        let samples: Vec<&str> = samples.into_iter().collect();
        let samples = if samples.is_empty() { "-".to_string() } else { samples.join(",") };
        out.push(format!("{family} {kind} {samples}"));
    }
    out
}

fn check_metrics(doc: &str, live: &str) {
    // Comments literally, samples by shape (label values literally: they are all fixed words).
    let lines = |t: &str| {
        t.lines()
            .map(|l| if l.starts_with('#') { l.to_string() } else { norm(l) })
            .collect::<Vec<_>>()
    };
    let (d, l) = (lines(doc), lines(live));
    for (i, (dl, ll)) in d.iter().zip(&l).enumerate() {
        assert_eq!(dl, ll, "metrics line {}: doc and live differ\n--- live:\n{live}", i + 1);
    }
    assert_eq!(d.len(), l.len(), "metrics: doc and live differ in length\n--- live:\n{live}");
    let names = |t: &str| {
        t.lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(doc), names(live), "metric names differ");
    for (what, text) in [("metrics (doc)", doc), ("metrics (live)", live)] {
        assert_eq!(
            prometheus_families(what, text),
            expected_families(text),
            "{what}: Prometheus' parser reads other families than the # TYPE lines promise"
        );
    }
}

fn check_events(doc: &str, live: &str) {
    let shape = |t: &str| {
        let mut v: Vec<String> = t.lines().map(norm).collect();
        v.sort();
        v
    };
    for l in live.lines() {
        let f: Vec<&str> = l.splitn(4, ' ').collect();
        assert!(f.len() >= 3 && is_time(f[0].as_bytes()), "events: malformed line {l:?}");
    }
    assert_eq!(shape(doc), shape(live), "events differ (sorted, by shape)\n--- live:\n{live}");
    let kinds = |t: &str| t.lines().map(|l| l.split(' ').nth(1).unwrap().to_string()).collect();
    let (dk, lk): (BTreeSet<String>, BTreeSet<String>) = (kinds(doc), kinds(live));
    assert_eq!(dk, lk, "event kinds differ");
}

fn check_config(doc: &str, live: &str) {
    let (d, l) = (key_values(doc), key_values(live));
    let keys = |v: &[(String, String)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&d), keys(&l), "config: keys differ\n--- live:\n{live}");
    assert_eq!(d, l, "config: values differ\n--- live:\n{live}");
}

// ---------------------------------------------------------------------------------------------
// The situation of the examples.

/// A `qemu-io` reading commands from a pipe nobody writes to: it keeps its image open until
/// it is ended (on drop). Its output goes to `log`.
fn qemu_io(args: &[&str], file: &Path, log: PathBuf) -> Proc {
    let mut q = Proc::spawn_stdin_open(common::tool("qemu-io").args(args).arg(file), log);
    q.wait_open(file, POLL);
    q
}

fn random_file(path: &Path, len: u64, mtime: Option<SystemTime>) {
    let mut data = Vec::new();
    File::open("/dev/urandom").unwrap().take(len).read_to_end(&mut data).unwrap();
    fs::write(path, &data).unwrap();
    if let Some(t) = mtime {
        File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
    }
}

/// The mounted scratch situation and what the console blocks need.
struct Live {
    root: PathBuf,
    base: PathBuf,
    path_env: String,
}

impl Live {
    fn sfile(&self, rel: &str) -> PathBuf {
        self.base.join(".imagecache").join(rel)
    }

    fn read(&self, rel: &str) -> String {
        let p = self.sfile(rel);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
    }

    fn field(&self, name: &str, key: &str) -> Option<String> {
        let text = fs::read_to_string(self.sfile(&format!("images/{name}"))).ok()?;
        key_values(&text).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn wait_field(&self, name: &str, key: &str, what: &str, ok: impl Fn(&str) -> bool) {
        wait_until(POLL, &format!("images/{name}: {what}"), || {
            self.field(name, key).filter(|v| ok(v)).map(drop)
        });
    }

    /// Doc text with the doc's scratch root replaced by ours.
    fn here(&self, text: &str) -> String {
        text.replace(DOC_ROOT, &self.root.to_string_lossy())
    }

    /// Runs the commands of a `console` example and compares output and exit codes.
    fn console(&self, all: &[Example], label: &str) {
        let ex = example(all, label);
        let mut steps: Vec<(String, Vec<String>, Option<i32>)> = Vec::new();
        let mut lines = ex.body.lines();
        while let Some(l) = lines.next() {
            if l == "# echo $?" {
                let code = lines.next().and_then(|c| c.trim().parse().ok());
                let last = steps.last_mut().expect("`echo $?` after a command");
                last.2 = Some(code.expect("`# echo $?` is followed by the exit code"));
            } else if let Some(cmd) = l.strip_prefix("# ") {
                steps.push((cmd.to_string(), Vec::new(), None));
            } else {
                let last = steps.last_mut().expect("output after a command");
                last.1.push(l.to_string());
            }
        }
        for (cmd, want, code) in steps {
            let cmd = self.here(&cmd);
            let (rc, out, err) = run(Command::new("bash")
                .arg("-c")
                .arg(format!("exec 2>&1; {cmd}"))
                .env("PATH", &self.path_env)
                .env("LC_ALL", "C")
                .stdin(Stdio::null()));
            assert!(err.is_empty(), "{cmd}: unexpected stderr {err:?}");
            let want: Vec<String> = want.iter().map(|l| self.here(l)).collect();
            let got: Vec<&str> = out.lines().collect();
            assert_eq!(got, want, "STATUS.md:{} `{cmd}`: output differs", ex.line);
            if let Some(code) = code {
                assert_eq!(rc, code, "STATUS.md:{} `{cmd}`: exit code differs", ex.line);
            }
        }
    }
}

#[test]
fn status_md_examples_match_a_live_mount() {
    let md = doc("STATUS.md");
    let all = examples(&md);
    let labels: BTreeSet<String> = all.iter().map(|e| e.label.clone()).collect();
    assert_eq!(
        labels,
        known_labels(),
        "the examples of STATUS.md and those this test reproduces differ: add the situation \
         of a new example to tests/docs.rs"
    );
    assert_eq!(labels.len(), all.len(), "STATUS.md has two examples with the same label");
    for tool in ["qemu-img", "qemu-io", "setpriv", "tee", "dd", "bash"] {
        common::require_tool(tool);
    }
    // Fail at once, before any mount, if Prometheus' parser is missing.
    prometheus_families("an empty exposition", "");

    let s = Scratch::new();
    let root = s.tmp.path().to_path_buf();
    // As /tmp/example was: other users may walk in (the non-root examples must reach the
    // daemon's own refusal, not a closed scratch directory).
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let instances = root.join("instances");
    let base = instances.join("_base");
    fs::create_dir_all(&base).unwrap();
    let bin_dir = root.join("bin");
    fs::create_dir(&bin_dir).unwrap();
    std::os::unix::fs::symlink(bin(), bin_dir.join("imagecachefs")).unwrap();
    let path_env = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    for (name, mib) in [(IN_USE, 8), (REFERENCED, 4), (CORRUPT, 2), (PINNED, 16), (IDLE, 4)] {
        random_file(&base.join(name), mib << 20, Some(two_hours_ago));
    }
    let instance = instances.join("instance-0000002a");
    fs::create_dir(&instance).unwrap();
    let backing = base.join(REFERENCED);
    let (rc, out, err) = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
        .arg(&backing)
        .args(["-F", "raw"])
        .arg(instance.join("disk"))
        .arg("1G"));
    assert_eq!(rc, 0, "qemu-img create: {out}{err}");
    let _covered = BindMount::new(&base, &root.join("covered"));
    let _before_mount = qemu_io(&["-r", "-f", "raw"], &base.join(IN_USE), s.path("io-0.log"));

    let m = Mount::new(&base, &[]);
    let live = Live { root: root.clone(), base: base.clone(), path_env };
    let _reader = qemu_io(&["-r", "-f", "raw"], &base.join(IN_USE), s.path("io-1.log"));
    let corrupt_reader = qemu_io(&["-r", "-f", "raw"], &base.join(CORRUPT), s.path("io-2.log"));
    random_file(&base.join(WRITING), 1 << 20, None);
    for name in [IN_USE, REFERENCED, CORRUPT, PINNED, IDLE, WRITING] {
        live.wait_field(name, "sha1", "a SHA-1 recorded", |v| v != "pending");
    }
    let _writer = qemu_io(&["-f", "raw"], &base.join(WRITING), s.path("io-3.log"));
    live.wait_field(WRITING, "state", "state writing", |v| v == "writing");
    live.wait_field(IN_USE, "refs", "two references", |v| v == "2");
    live.wait_field(CORRUPT, "refs", "one reference", |v| v == "1");

    live.console(&all, "console control");
    live.console(&all, "console control-file");
    live.wait_field(IDLE, "verified", "verified ok", |v| v.starts_with("ok "));
    live.console(&all, "console corrupt");
    live.wait_field(CORRUPT, "state", "state corrupt", |v| v == "corrupt");

    for name in [IN_USE, WRITING, REFERENCED, PINNED, IDLE, CORRUPT] {
        let rel = format!("images/{name}");
        check_image(&rel, &example(&all, &rel).body, &live.read(&rel));
    }
    let status_doc = &example(&all, "status").body;
    check_table("status", status_doc, &live.read("status"));
    let cmd = run(Command::new(bin()).arg("status").arg(&base));
    assert_eq!(cmd.0, 0, "imagecachefs status: {}", cmd.2);
    check_table("imagecachefs status", status_doc, &cmd.1);
    let json_doc = json_shape("status.json (doc)", &example(&all, "status.json").body);
    for (what, text) in [
        ("status.json", live.read("status.json")),
        (
            "imagecachefs status --json",
            run(Command::new(bin()).arg("status").arg(&base).arg("--json")).1,
        ),
    ] {
        assert_eq!(json_doc, json_shape(what, &text), "{what}: differs in shape from STATUS.md");
        assert_eq!(text.lines().count(), 1, "{what}: not one line");
    }
    check_config(&live.here(&example(&all, "config").body), &live.read("config"));

    // The reader of the corrupt file goes: the file is evicted at once.
    drop(corrupt_reader);
    wait_until(POLL, "the corrupt file evicted", || {
        (!live.sfile(&format!("images/{CORRUPT}")).exists() && !base.join(CORRUPT).exists())
            .then_some(())
    });
    live.console(&all, "console unpin");
    check_events(&example(&all, "events").body, &live.read("events"));
    check_metrics(&example(&all, "metrics").body, &live.read("metrics"));

    // The tables of STATUS.md say what the live files do.
    let keys: Vec<String> =
        key_values(&live.read(&format!("images/{IN_USE}"))).into_iter().map(|(k, _)| k).collect();
    assert_eq!(doc_table_keys(&md, "## `images/NAME`"), keys, "the key table of images/NAME");
    let helps: Vec<String> = live
        .read("metrics")
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .map(|l| {
            let (name, help) = l.split_once(' ').unwrap();
            format!("{name} {help}")
        })
        .collect();
    assert_eq!(doc_metric_table(&md), helps, "the metric table of STATUS.md");

    drop((_writer, _reader));
    let st = m.stop();
    assert!(st.success(), "the daemon exited with {st}");
    assert!(!common::is_fuse(&base), "mount left behind at {base:?}");
}

/// The first column of the first table after `heading`: `| \`key\` | ...`.
fn doc_table_keys(md: &str, heading: &str) -> Vec<String> {
    let at = md.find(heading).unwrap_or_else(|| panic!("STATUS.md has no {heading:?}"));
    md[at..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_string()))
        .collect()
}

/// The rows of STATUS.md's metric table: `name help`.
fn doc_metric_table(md: &str) -> Vec<String> {
    md.lines()
        .filter_map(|l| l.strip_prefix("| `imagecachefs_"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_end_matches('|').split('|').map(str::trim).collect();
            let name = cells[0].trim_end_matches('`');
            let help = cells.last().unwrap();
            format!("imagecachefs_{name} {help}")
        })
        .collect()
}

/// `--flag` tokens in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    for i in 0..b.len().saturating_sub(2) {
        let starts = b[i] == b'-'
            && b[i + 1] == b'-'
            && b[i + 2].is_ascii_lowercase()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-'));
        if starts {
            let len = b[i + 2..]
                .iter()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || **c == b'-')
                .count();
            out.insert(text[i..i + 2 + len].trim_end_matches('-').to_string());
        }
    }
    out
}

fn help(args: &[&str]) -> String {
    run_ok(Command::new(bin()).args(args))
}

#[test]
fn configuration_md_names_every_mount_flag_and_no_other() {
    let md = doc("CONFIGURATION.md");
    let documented = flags(&md);
    let mount = flags(&help(&["mount", "--help"]));
    assert!(mount.contains("--original-min-age"), "parsed no flags from mount --help: {mount:?}");
    let missing: Vec<&String> = mount.difference(&documented).collect();
    assert!(missing.is_empty(), "CONFIGURATION.md does not mention {missing:?}");
    // Each has its own row in an options table (first cell), not just a mention in prose.
    let rows: BTreeSet<String> = md
        .lines()
        .filter_map(|l| l.strip_prefix('|'))
        .filter_map(|l| l.split('|').next())
        .flat_map(flags)
        .collect();
    let no_row: Vec<&String> = mount.difference(&rows).collect();
    assert!(no_row.is_empty(), "CONFIGURATION.md has no table row for {no_row:?}");
    let mut known = mount.clone();
    for cmd in ["unmount", "status", "pin", "unpin", "verify", "evict"] {
        known.extend(flags(&help(&[cmd, "--help"])));
    }
    known.extend(flags(&help(&["--help"])));
    let stale: Vec<&String> = documented.difference(&known).collect();
    assert!(
        stale.is_empty(),
        "CONFIGURATION.md mentions flags imagecachefs does not have: {stale:?}"
    );
}

#[test]
fn docs_name_repository_files_that_exist() {
    let mut missing = Vec::new();
    for entry in fs::read_dir(repo().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".md") || name == "PERFORMANCE.md" {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        for prefix in ["mount-scripts/", "src/", "tests/", ".ci/"] {
            let mut rest = text.as_str();
            while let Some(at) = rest.find(prefix) {
                let before = rest[..at].chars().last();
                let tail = &rest[at..];
                let len = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "._-/".contains(c)))
                    .unwrap_or(tail.len());
                let rel = tail[..len].trim_end_matches(['.', '/']);
                rest = &tail[len..];
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '/' || c == '.') {
                    continue; // part of another path (/usr/src/..., foo/src/...)
                }
                if rel.len() > prefix.len() && !repo().join(rel).exists() {
                    missing.push(format!("{name}: {rel}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "docs name files that do not exist: {missing:#?}");
}

#[test]
fn status_md_examples_parse_on_their_own() {
    // Cheap checks that need no mount: each example is well-formed in itself.
    let all = examples(&doc("STATUS.md"));
    for e in &all {
        match e.label.as_str() {
            "status" => {
                table("STATUS.md status", &e.body);
            }
            "status.json" => {
                json_shape("STATUS.md status.json", &e.body);
            }
            "metrics" => {
                assert_eq!(
                    prometheus_families("STATUS.md metrics", &e.body),
                    expected_families(&e.body)
                );
            }
            l if l.starts_with("images/") => {
                let kv = key_values(&e.body);
                assert_eq!(kv[0], ("name".to_string(), l["images/".len()..].to_string()));
                assert!(kv.iter().all(|(_, v)| !v.is_empty()), "{l}: a key without value");
            }
            l if l.starts_with("console") => {
                assert!(e.body.starts_with("# "), "{l}: must start with a `# ` command line");
            }
            _ => {}
        }
    }
    assert_eq!(norm("swap_512 sha1 2026-11-21T09:00:00Z"), "swap_<n> sha1 <time>");
    assert_eq!(norm("0d5e6b61602d758984b3bf038267614d6016eb2a.part"), "<sha1>.part");
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, blanks to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn links_between_docs_resolve() {
    let dir = repo().join("docs");
    let mut broken = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".md") || name == "PERFORMANCE.md" {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            let tail = &rest[at + 2..];
            let end = tail.find(')').unwrap_or(tail.len());
            let target = &tail[..end];
            rest = &tail[end..];
            if target.contains("://") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let file_path = if file.is_empty() { path.clone() } else { dir.join(file) };
            let Ok(linked) = fs::read_to_string(&file_path) else {
                broken.push(format!("{name}: {target} (no such file)"));
                continue;
            };
            let anchors: BTreeSet<String> = linked
                .lines()
                .filter(|l| l.starts_with('#'))
                .map(|l| slug(l.trim_start_matches('#')))
                .collect();
            if !anchor.is_empty() && !anchors.contains(anchor) {
                broken.push(format!("{name}: {target} (no such heading)"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links in docs/: {broken:#?}");
}

// ---------------------------------------------------------------------------------------------
// CONFIGURATION.md's semantics, exercised (not only named).

/// The rows of CONFIGURATION.md's option tables: flag, value cell, default cell, config key.
fn option_rows(md: &str) -> Vec<(String, String, String, Option<String>)> {
    md.lines()
        .filter(|l| l.starts_with("| `--"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            if cells.len() != 6 {
                return None;
            }
            let flag = cells[0].trim_matches('`').to_string();
            let key = cells[5]
                .strip_prefix('`')
                .and_then(|k| k.split_once('`'))
                .map(|(k, _)| k.to_string())
                .filter(|_| !cells[5].contains('('));
            Some((flag, cells[1].to_string(), cells[2].to_string(), key))
        })
        .collect()
}

/// `A to B` in a value cell.
fn range(cell: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> =
        cell.split(|c: char| c.is_whitespace() || c == ',' || c == ';').collect();
    words.windows(3).find_map(|w| match (w[0].parse(), w[1], w[2].parse()) {
        (Ok(a), "to", Ok(b)) => Some((a, b)),
        _ => None,
    })
}

/// `imagecachefs mount DIR --check ARGS...`: (exit code, `config` pairs, stderr).
fn check(dir: &Path, args: &[&str]) -> (i32, Vec<(String, String)>, String) {
    let (code, out, err) = run(Command::new(bin()).arg("mount").arg(dir).arg("--check").args(args));
    (code, key_values(&out), err)
}

#[test]
fn configuration_md_defaults_and_bounds_are_what_the_parser_does() {
    let md = doc("CONFIGURATION.md");
    let rows = option_rows(&md);
    let dir = tempfile::Builder::new().prefix("icfs-test-docs").tempdir().unwrap();
    let (code, defaults, err) = check(dir.path(), &[]);
    assert_eq!(code, 0, "mount --check with no flags: {err}");
    let value_of = |pairs: &[(String, String)], key: &str| {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    let mut bounded = 0;
    for (flag, value, default, key) in &rows {
        let Some(key) = key else { continue };
        // The documented default (its first number) is what the parser picks with no flag.
        if let Some(n) = default.split_whitespace().next().filter(|w| w.parse::<u64>().is_ok()) {
            assert_eq!(
                value_of(&defaults, key).as_deref(),
                Some(n),
                "CONFIGURATION.md gives {flag} the default {n}; `config` says otherwise"
            );
        }
        let Some((lo, hi)) = range(value) else { continue };
        bounded += 1;
        // Both ends are accepted and reach the configuration as given.
        for v in [lo, hi] {
            let (code, pairs, err) = check(dir.path(), &[flag, &v.to_string()]);
            assert_eq!(code, 0, "{flag} {v} is documented as accepted: {err}");
            assert_eq!(value_of(&pairs, key), Some(v.to_string()), "{flag} {v}");
        }
        // One past either end is refused with one line naming the range.
        let mut outside = vec![(hi + 1).to_string(), u64::MAX.to_string()];
        outside.push(if lo > 0 { (lo - 1).to_string() } else { "-1".into() });
        for v in outside {
            let (code, _, err) = check(dir.path(), &[flag, &v]);
            assert_eq!(code, 2, "{flag} {v} is outside the documented {lo} to {hi}: {err}");
            assert_eq!(err.lines().count(), 1, "{flag} {v}: one line: {err}");
            assert!(err.contains(&format!("from {lo} to {hi}")), "{flag} {v}: {err}");
        }
    }
    assert!(bounded >= 7, "CONFIGURATION.md gives a range for only {bounded} flags: {rows:#?}");
    // --min-free: the documented size and percentage limits.
    let (code, pairs, err) = check(dir.path(), &["--min-free", "9223372036854775807"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(value_of(&pairs, "min_free").as_deref(), Some("9223372036854775807"));
    for bad in ["9223372036854775808", "100%", "200%", "-1%"] {
        let (code, _, err) = check(dir.path(), &["--min-free", bad]);
        assert_eq!((code, err.lines().count()), (2, 1), "--min-free {bad}: {err}");
    }
    assert_eq!(check(dir.path(), &["--min-free", "99.5%"]).0, 0);
    // --instances-dir must exist.
    let missing = dir.path().join("missing");
    let (code, _, err) = check(dir.path(), &["--instances-dir", missing.to_str().unwrap()]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn verify_interval_zero_turns_re_verification_off() {
    use imagecachefs::cache::{Cache, Settings};
    use imagecachefs::clock::{from_unix_secs, ManualClock};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // As CONFIGURATION.md says: 0 is off (the first SHA-1 is still recorded), N re-reads N
    // seconds after the last check.
    let md = doc("CONFIGURATION.md");
    assert!(md.contains("A value of 0 turns periodic re-verification off"), "the claim tested");
    for interval in [0u64, 3600] {
        let tmp = tempfile::Builder::new().prefix("icfs-test-docs").tempdir().unwrap();
        let base = tmp.path().join("_base");
        fs::create_dir_all(&base).unwrap();
        fs::create_dir_all(tmp.path().join("proc")).unwrap();
        fs::write(base.join(IN_USE), b"an image").unwrap();
        let c = std::ffi::CString::new(base.as_os_str().as_bytes()).unwrap();
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
        assert!(fd >= 0);
        let clock = ManualClock::new(from_unix_secs(1_800_000_000));
        let cache = Cache::open(
            unsafe { OwnedFd::from_raw_fd(fd) },
            imagecachefs::state::Policy::default(),
            clock.clone(),
            imagecachefs::procfs::ProcRoot(tmp.path().join("proc")),
            Settings {
                cache_dir: base.clone(),
                instances_dir: tmp.path().to_path_buf(),
                min_free: None,
                pressure_min_age: 600,
                verify_interval: interval,
                verify_rate_mib: 0,
                own_dev: None,
            },
            Vec::new(),
        )
        .unwrap();
        assert_eq!(imagecachefs::checksums::run_once(&cache), 1, "the first SHA-1 is recorded");
        let mut reverified = 0;
        for _ in 0..3 {
            clock.advance(Duration::from_secs(3600));
            reverified += imagecachefs::checksums::run_once(&cache);
        }
        let want = if interval == 0 { 0 } else { 3 };
        assert_eq!(reverified, want, "--verify-interval {interval}: re-verifications in 3 hours");
    }
}

#[test]
fn readme_test_command_works_as_written() {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme.find("Run every test").expect("README says how to run the tests");
    let block = readme[at..].split("```sh\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let command = block.trim();
    assert_eq!(command.lines().count(), 1, "one command: {command:?}");
    assert!(command.contains("cargo test") && command.contains("--no-fail-fast"), "{command}");
    let ci = fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(ci.contains(command), ".ci/run must run the README's command {command:?}");
    // The setup step it starts with is there, executable, and leaves a ready machine ready
    // (it installed what this very test run needed).
    let setup = command.split("&&").next().unwrap().trim();
    let path = repo().join(setup);
    let mode = fs::metadata(&path).unwrap_or_else(|e| panic!("{setup}: {e}")).permissions().mode();
    assert!(mode & 0o111 != 0, "{setup} is executable");
    let (code, out, err) = run(Command::new(&path).current_dir(repo()));
    assert_eq!(code, 0, "{setup}\nstdout: {out}\nstderr: {err}");
    assert!(!err.contains("installing"), "a ready machine installs nothing: {err}");
    for tool in ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "setpriv", "shellcheck"]
    {
        common::require_tool(tool);
    }
}
