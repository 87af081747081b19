//! The status tree through a real mount (PRODUCT.md, "The status tree" and "Rules that must
//! always hold"): live references of real QEMU holders, kinds, the same content for every
//! reader, refusals, holders from before the mount, state across a `kill -9`, the hidden state
//! file, the CLI, and what counts as a use.
//!
//! Every test mounts over its own `<tmp>/instances/_base`, so that instance directories (and
//! their qcow2 overlays) sit beside the cache directory, as on a compute node. Background
//! processes are owned by a [`Proc`] (killed on drop), the daemon by a [`Mount`] declared
//! before them (so holders go first). Status is polled with a deadline: `release` can reach
//! the daemon after `close(2)` has returned.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{bin, run, run_ok, tool, BindMount, Mount, Proc, Scratch};

/// Cache file names as Nova makes them: the SHA-1 of a Glance image id.
const HASH: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
const HASH2: &str = "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3";
/// The keys of `images/NAME`, in the order PRODUCT.md gives them.
const KEYS: [&str; 12] = [
    "name",
    "kind",
    "size",
    "refs",
    "holders",
    "age",
    "last_used",
    "min_age",
    "state",
    "evicts_at",
    "sha1",
    "verified",
];
/// The status files that can be read (`control` is write-only).
const READABLE: [&str; 5] = ["status", "status.json", "metrics", "events", "config"];
const POLL: Duration = Duration::from_secs(10);

/// `<tmp>/instances/_base`: the cache directory with room for instance directories beside it.
struct Layout {
    s: Scratch,
    instances: PathBuf,
    base: PathBuf,
}

impl Layout {
    fn new() -> Self {
        let s = Scratch::new();
        let instances = s.path("instances");
        let base = instances.join("_base");
        fs::create_dir_all(&base).unwrap();
        Layout { s, instances, base }
    }
}

/// `DIR/.imagecache/REL`.
fn sfile(dir: &Path, rel: &str) -> PathBuf {
    dir.join(".imagecache").join(rel)
}

fn icfs() -> Command {
    let mut c = Command::new(bin());
    c.env("LC_ALL", "C").stdin(Stdio::null());
    c
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Seconds since the epoch of an RFC 3339 UTC time with whole seconds
/// (`2026-11-21T09:00:00Z`); panics on anything else.
fn parse_time(s: &str) -> i64 {
    let b = s.as_bytes();
    let shape = b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z';
    assert!(shape, "not an RFC 3339 UTC time: {s:?}");
    let n = |from: usize, to: usize| -> i64 {
        s[from..to].parse().unwrap_or_else(|_| panic!("not an RFC 3339 UTC time: {s:?}"))
    };
    let (y, mo, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days since 1970-01-01 in the proleptic Gregorian calendar, years starting in March.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)
}

/// One `images/NAME` file, parsed into `key: value` lines (the text kept for messages).
#[derive(Clone, Debug)]
struct Image {
    text: String,
    fields: Vec<(String, String)>,
}

impl Image {
    fn parse(text: &str) -> Self {
        let fields = text
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect();
        Image { text: text.to_string(), fields }
    }

    fn field(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn get(&self, key: &str) -> &str {
        self.field(key).unwrap_or_else(|| panic!("no `{key}:` line in:\n{}", self.text))
    }

    fn is(&self, key: &str, value: &str) -> bool {
        self.field(key) == Some(value)
    }

    fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        v.parse().unwrap_or_else(|_| panic!("`{key}: {v}` is not a number in:\n{}", self.text))
    }

    fn time(&self, key: &str) -> i64 {
        parse_time(self.get(key))
    }

    /// The entries of `holders:` (`-` is none).
    fn holders(&self) -> BTreeSet<String> {
        match self.get("holders") {
            "-" => BTreeSet::new(),
            h => h.split("; ").map(str::to_string).collect(),
        }
    }
}

fn read_image(dir: &Path, name: &str) -> Image {
    let p = sfile(dir, &format!("images/{name}"));
    Image::parse(&fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}")))
}

/// Polls `images/NAME` until `ok` holds; on timeout panics with the last text and the log.
fn wait_image(m: &Mount, name: &str, what: &str, ok: impl Fn(&Image) -> bool) -> Image {
    let p = sfile(&m.dir, &format!("images/{name}"));
    let deadline = Instant::now() + POLL;
    loop {
        let last = match fs::read_to_string(&p) {
            Ok(text) => {
                let img = Image::parse(&text);
                if ok(&img) {
                    return img;
                }
                text
            }
            Err(e) => format!("<read {p:?}: {e}>"),
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {POLL:?} waiting for images/{name}: {what}\nlast read:\n{last}\n\
             daemon log:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the file's SHA-1 has been computed (it is made in the background after the
/// last writer's release).
fn wait_sha1(m: &Mount, name: &str) -> Image {
    wait_image(m, name, "sha1 computed", |i| i.field("sha1").is_some_and(|s| s != "pending"))
}

/// `sh -c 'exec 3<FILE; exec sleep 60'`: holds FILE open on fd 3 as program `sleep`.
fn sleeper(file: &Path, log: PathBuf) -> Proc {
    let mut p = Proc::spawn_logged(
        tool("sh").args(["-c", r#"exec 3<"$1"; exec sleep 60"#, "sh"]).arg(file),
        log,
    );
    p.wait_for_exec_holding("sleep", 3, file);
    p
}

/// `qemu-img create -f qcow2 -F raw -b BASE DISK`, DISK in its own instance directory.
fn overlay(l: &Layout, instance: &str, base: &Path) -> PathBuf {
    let disk = l.instances.join(instance).join("disk");
    common::overlay(&disk, base);
    disk
}

/// Reads `path` with `cat`, `less` (stdout not a tty), `grep ''`, Python and `std::fs`;
/// returns the outputs (reader, text).
fn read_with_every_tool(path: &Path) -> Vec<(&'static str, String)> {
    let py = "import sys; sys.stdout.write(open(sys.argv[1]).read())";
    let (gcode, grep, gerr) = run(tool("grep").args(["-h", ""]).arg(path));
    assert!(gcode == 0 || (gcode == 1 && grep.is_empty()), "grep {path:?} failed: {gerr}");
    vec![
        ("cat", run_ok(tool("cat").arg(path))),
        ("less", run_ok(tool("less").env_remove("LESSOPEN").env_remove("LESSCLOSE").arg(path))),
        ("grep", grep),
        ("python3", run_ok(tool("python3").args(["-c", py]).arg(path))),
        ("std::fs", fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"))),
    ]
}

/// Every reader sees the same text. Status files move with the clock (ages, times), so a few
/// attempts are made and one of them must agree throughout; returns the agreed text.
fn same_for_every_tool(path: &Path) -> String {
    let mut last = Vec::new();
    for _ in 0..6 {
        let outs = read_with_every_tool(path);
        if outs.iter().all(|(_, t)| *t == outs[0].1) {
            return outs[0].1.clone();
        }
        last = outs;
        std::thread::sleep(Duration::from_millis(150));
    }
    let shown: Vec<String> = last.iter().map(|(who, t)| format!("--- {who}:\n{t}")).collect();
    panic!("readers disagree on {path:?}:\n{}", shown.join("\n"));
}

/// Asserts that `open(path)` for writing fails with `EACCES`.
fn assert_write_refused(path: &Path) {
    for (how, opts) in [
        ("O_WRONLY", OpenOptions::new().write(true).clone()),
        ("O_RDWR", OpenOptions::new().read(true).write(true).clone()),
        ("O_WRONLY|O_APPEND", OpenOptions::new().append(true).clone()),
        ("O_WRONLY|O_TRUNC", OpenOptions::new().write(true).truncate(true).clone()),
    ] {
        match opts.open(path) {
            Ok(mut f) => {
                let w = f.write_all(b"x\n");
                panic!("open({path:?}, {how}) by root succeeded (then write: {w:?}); want EACCES")
            }
            Err(e) => assert_eq!(
                e.raw_os_error(),
                Some(libc::EACCES),
                "open({path:?}, {how}) by root: want EACCES, got {e}"
            ),
        }
    }
}

/// A real QEMU process holds a qcow2 overlay (made outside the mount, in an instance
/// directory) whose backing file is a raw base in the mount: the base's `images/` file counts
/// it, names it and calls the base in use; a second holder counts twice; stopping them
/// releases the references, after which the base is no longer in use, its age grows and
/// `last_used` is the release time.
#[test]
fn qemu_holders_of_a_backing_file_are_counted_named_and_released() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let base = l.base.join(HASH);
    run_ok(tool("qemu-img").args(["create", "-f", "raw"]).arg(&base).arg("16M"));
    let disk1 = overlay(&l, "instance-00000001", &base);
    let disk2 = overlay(&l, "instance-00000002", &base);
    wait_image(&m, HASH, "refs 0 once qemu-img is done", |i| i.is("refs", "0"));

    let sock1 = l.s.path("qsd.sock");
    let mut qsd = Proc::spawn_logged(
        tool("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=qcow2,node-name=disk0,read-only=on,file.driver=file,file.filename={}",
                disk1.display()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock1.display()))
            .args(["--export", "type=nbd,id=exp0,node-name=disk0,name=disk0"]),
        l.s.path("qsd.log"),
    );
    qsd.wait_for_socket(&sock1);
    let qsd_holder = format!("{} qemu-storage-daemon", qsd.pid());
    let img = wait_image(&m, HASH, "refs 1 (qemu-storage-daemon)", |i| i.is("refs", "1"));
    assert_eq!(img.holders(), BTreeSet::from([qsd_holder.clone()]), "{}", img.text);
    assert_eq!(img.get("state"), "in-use", "{}", img.text);
    assert_eq!(img.get("age"), "0", "{}", img.text);
    assert_eq!(img.get("evicts_at"), "-", "an in-use file is not evictable:\n{}", img.text);

    let sock2 = l.s.path("nbd.sock");
    let mut nbd = Proc::spawn_logged(
        tool("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=4", "-f", "qcow2", "-k"])
            .arg(&sock2)
            .arg(&disk2),
        l.s.path("qemu-nbd.log"),
    );
    nbd.wait_for_socket(&sock2);
    let nbd_holder = format!("{} qemu-nbd", nbd.pid());
    let img =
        wait_image(&m, HASH, "refs 2 (qemu-storage-daemon and qemu-nbd)", |i| i.is("refs", "2"));
    assert_eq!(
        img.holders(),
        BTreeSet::from([qsd_holder.clone(), nbd_holder.clone()]),
        "{}",
        img.text
    );
    assert_eq!((img.get("state"), img.get("age")), ("in-use", "0"), "{}", img.text);

    qsd.stop();
    let img =
        wait_image(&m, HASH, "refs 1 after qemu-storage-daemon stopped", |i| i.is("refs", "1"));
    assert_eq!(img.holders(), BTreeSet::from([nbd_holder]), "{}", img.text);
    assert_eq!((img.get("state"), img.get("age")), ("in-use", "0"), "{}", img.text);

    nbd.assert_alive();
    let before = unix_now();
    nbd.stop();
    let img = wait_image(&m, HASH, "refs 0 after both stopped", |i| i.is("refs", "0"));
    let after = unix_now();
    assert_eq!(img.get("holders"), "-", "{}", img.text);
    assert_ne!(img.get("state"), "in-use", "{}", img.text);
    // The instance disks still name the base as their backing file.
    assert_eq!(img.get("state"), "referenced", "overlays in instance dirs name it:\n{}", img.text);
    let used = img.time("last_used");
    assert!(
        used >= before - 2 && used <= after + 2,
        "last_used {} is not the release time (between {before} and {after}, within 2 s):\n{}",
        img.get("last_used"),
        img.text
    );
    let age1 = img.num("age");
    assert!(age1 <= 2, "age right after the release: {age1}\n{}", img.text);
    std::thread::sleep(Duration::from_millis(2200));
    let img2 = read_image(&l.base, HASH);
    let age2 = img2.num("age");
    assert!(age2 >= age1 + 2, "age did not grow over 2.2 s: {age1} then {age2}\n{}", img2.text);
    let now = unix_now();
    assert!(
        (now - used - age2 as i64).abs() <= 1,
        "age {age2} is not now - last_used ({now} - {used}):\n{}",
        img2.text
    );
    assert_eq!(img2.get("last_used"), img.get("last_used"), "idle time is not a use");
    assert_eq!(img2.get("refs"), "0", "{}", img2.text);
}

/// Files named as Nova names them get the kind of Nova's rules, with that kind's threshold
/// as `min_age`; `images/` lists exactly the cache files; every `images/NAME` has the
/// documented keys in order.
#[test]
fn kinds_follow_novas_names() {
    let l = Layout::new();
    let m = Mount::new(
        &l.base,
        &["--original-min-age", "1000", "--resized-min-age", "2000", "--partial-min-age", "3000"],
    );
    let cases: [(String, &str, u64); 7] = [
        (HASH.to_string(), "original", 1000),
        (format!("{HASH}_10"), "resized", 2000),
        (format!("{HASH}_sm"), "resized", 2000),
        (format!("{HASH2}.part"), "partial", 3000),
        ("ephemeral_20_40d1d2c".to_string(), "ephemeral", 1000),
        ("swap_512".to_string(), "swap", 1000),
        ("junk".to_string(), "other", 2000),
    ];
    for (i, (name, _, _)) in cases.iter().enumerate() {
        fs::write(l.base.join(name), vec![b'a' + i as u8; 100 * (i + 1)]).unwrap();
    }
    fs::create_dir(l.base.join("subdir")).unwrap();
    let mut wrong_sizes = Vec::new();
    for (i, (name, kind, min_age)) in cases.iter().enumerate() {
        let img = wait_image(&m, name, "no reference left by the write", |i| i.is("refs", "0"));
        assert_eq!(img.get("name"), name, "{}", img.text);
        assert_eq!(img.get("kind"), *kind, "kind of {name}:\n{}", img.text);
        assert_eq!(img.num("min_age"), *min_age, "min_age of a {kind} file:\n{}", img.text);
        let (size, on_disk) = (img.num("size"), fs::metadata(l.base.join(name)).unwrap().len());
        assert_eq!(on_disk, 100 * (i as u64 + 1), "stat of {name} through the mount");
        if size != on_disk {
            wrong_sizes.push(format!("{name}: size: {size}, stat says {on_disk}"));
        }
        let keys: Vec<&str> =
            img.fields.iter().map(|(k, _)| k.as_str()).filter(|k| KEYS.contains(k)).collect();
        assert_eq!(keys, KEYS, "keys of images/{name} missing or out of order:\n{}", img.text);
        assert_eq!(img.fields[0].0, "name", "images/{name} starts with name:\n{}", img.text);
        assert_eq!(img.get("state"), "idle", "{}", img.text);
        let due = img.time("last_used") + *min_age as i64;
        let at = img.time("evicts_at");
        assert!(
            (at - due).abs() <= 1,
            "evicts_at of an idle {kind} file is last_used + {min_age}:\n{}",
            img.text
        );
    }
    let listed: BTreeSet<String> = fs::read_dir(sfile(&l.base, "images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = cases.iter().map(|c| c.0.clone()).collect();
    assert_eq!(listed, want, "images/ lists the regular files of the cache directory");
    // Checked last, so that a wrong size does not hide the checks above.
    assert!(
        wrong_sizes.is_empty(),
        "images/NAME size differs from the file's size after writing it through the mount:\n{}",
        wrong_sizes.join("\n")
    );
    drop(m);
}

/// Every status file reads the same with `cat`, `less`, `grep`, Python and `std::fs`; the
/// formats hold (table with header, JSON, Prometheus text); status files report no blocks;
/// writes to them are refused with `EACCES`, even for root; `control` refuses a non-root
/// writer and takes root's lines; nothing can be created in the status tree.
#[test]
fn status_files_read_the_same_everywhere_and_refuse_writes() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let names = [HASH, "swap_512"];
    for n in names {
        fs::write(l.base.join(n), format!("content of {n}\n")).unwrap();
    }
    for n in names {
        wait_sha1(&m, n);
    }

    let mut texts = std::collections::BTreeMap::new();
    let image_files: Vec<String> = names.iter().map(|n| format!("images/{n}")).collect();
    for rel in READABLE.iter().copied().chain(image_files.iter().map(String::as_str)) {
        let p = sfile(&l.base, rel);
        let meta = fs::metadata(&p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"));
        assert!(meta.is_file(), "{rel} is a regular file");
        assert_eq!(meta.blocks(), 0, "{rel} reports st_blocks = 0");
        let text = same_for_every_tool(&p);
        if rel != "events" {
            assert!(!text.is_empty(), "{rel} is empty");
        }
        texts.insert(rel, text);
    }

    let table = &texts["status"];
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].split_whitespace().next() == Some("NAME"), "status header:\n{table}");
    assert_eq!(lines.len(), 1 + names.len(), "status: a header and one row per file:\n{table}");
    let rows: BTreeSet<&str> =
        lines[1..].iter().map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    assert_eq!(rows, BTreeSet::from(names), "status rows:\n{table}");

    let json = sfile(&l.base, "status.json");
    run_ok(tool("python3").args(["-m", "json.tool"]).arg(&json));
    let walk = "import json, sys\n\
                def strs(v):\n\
                \x20   if isinstance(v, dict): v = list(v.values())\n\
                \x20   if isinstance(v, list): return [s for x in v for s in strs(x)]\n\
                \x20   return [v] if isinstance(v, str) else []\n\
                print('\\n'.join(strs(json.load(open(sys.argv[1])))))\n";
    let strings = run_ok(tool("python3").args(["-c", walk]).arg(&json));
    for n in names {
        assert!(strings.lines().any(|s| s == n), "status.json does not name {n}:\n{strings}");
    }

    let metrics = &texts["metrics"];
    let typed: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert!(metrics.lines().any(|l| l.starts_with("# HELP ")), "no # HELP in metrics:\n{metrics}");
    assert!(!typed.is_empty(), "no # TYPE in metrics:\n{metrics}");
    for l in metrics.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let family = l.split(['{', ' ']).next().unwrap();
        assert!(family.starts_with("imagecachefs_"), "metric {family} lacks the prefix");
        let base = family.trim_end_matches("_total");
        assert!(
            typed.contains(family) || typed.contains(base),
            "sample `{l}` has no # TYPE line:\n{metrics}"
        );
    }

    // Writes to status files: refused for root too, and nothing changes.
    for rel in READABLE.iter().copied().chain(image_files.iter().map(String::as_str)) {
        let p = sfile(&l.base, rel);
        assert_write_refused(&p);
        let (code, _, err) = run(tool("sh").args(["-c", r#"echo x > "$1""#, "sh"]).arg(&p));
        assert!(code != 0 && err.contains("Permission denied"), "echo > {rel}: {code} {err}");
        let (code, _, err) = run(tool("truncate").args(["-s", "0"]).arg(&p));
        assert!(code != 0 && err.contains("Permission denied"), "truncate {rel}: {code} {err}");
        let (code, _, err) = run(tool("touch").arg(&p));
        assert!(code != 0 && err.contains("Permission denied"), "touch {rel}: {code} {err}");
    }
    let img = read_image(&l.base, HASH);
    assert_eq!(img.get("name"), HASH, "images/{HASH} after refused writes:\n{}", img.text);

    // The control file: a non-root writer is refused, although it can reach and read the tree.
    for dir in [l.s.tmp.path(), &l.instances] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nobody = |script: &str| {
        run(tool("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c", script])
            .arg("sh")
            .arg(sfile(&l.base, "status"))
            .arg(sfile(&l.base, "control")))
    };
    let (code, out, err) = nobody(r#"cat "$1""#);
    assert_eq!(code, 0, "uid 65534 must be able to read status: {err}");
    assert!(out.starts_with("NAME"), "{out}");
    let (code, _, err) = nobody(&format!(r#"echo "pin {HASH}" > "$2""#));
    assert!(
        code != 0 && err.contains("Permission denied"),
        "uid 65534 writing control: want EACCES, got exit {code}: {err}"
    );
    let img = read_image(&l.base, HASH);
    assert_eq!(img.get("state"), "idle", "a refused pin changed the file:\n{}", img.text);
    // Root's line is taken.
    let mut c = OpenOptions::new().write(true).open(sfile(&l.base, "control")).unwrap();
    c.write_all(format!("pin {HASH}\n").as_bytes()).unwrap();
    drop(c);
    wait_image(&m, HASH, "pinned by root's control line", |i| i.is("state", "pinned"));
    // Reading control is refused to root too (write-only).
    let e = File::open(sfile(&l.base, "control")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "reading control: {e}");

    // Nothing can be created in the status tree.
    for rel in ["x", "images/x", &format!("images/{HASH}.x")] {
        let p = sfile(&l.base, rel);
        let (code, _, err) = run(tool("touch").arg(&p));
        assert_ne!(code, 0, "touch {rel} succeeded");
        assert!(!err.is_empty(), "touch {rel} failed silently");
        assert!(fs::symlink_metadata(&p).is_err(), "{rel} exists after a refused touch");
    }
    let e = fs::create_dir(sfile(&l.base, "d")).unwrap_err();
    assert!(fs::symlink_metadata(sfile(&l.base, "d")).is_err(), "mkdir in the tree: {e}");
    assert!(!l.base.join("x").exists() && !l.base.join("images").exists());
    drop(m);
}

/// A process that opened a cache file before the mount is a holder `(before mount)` with one
/// reference; once it is gone the reference goes too, found when the status is read.
#[test]
fn holders_from_before_the_mount_count_until_they_exit() {
    let l = Layout::new();
    let file = l.base.join(HASH);
    fs::write(&file, b"opened before the mount\n").unwrap();
    let early = sleeper(&file, l.s.path("sleeper.log"));
    let pid = early.pid();
    let m = Mount::new(&l.base, &[]);
    let img = wait_image(&m, HASH, "the early holder counted", |i| i.is("refs", "1"));
    assert_eq!(
        img.holders(),
        BTreeSet::from([format!("{pid} sleep (before mount)")]),
        "{}",
        img.text
    );
    assert_eq!((img.get("state"), img.get("age")), ("in-use", "0"), "{}", img.text);
    assert_eq!(img.get("evicts_at"), "-", "{}", img.text);

    early.kill();
    let img =
        wait_image(&m, HASH, "refs 0 after the early holder was killed", |i| i.is("refs", "0"));
    assert_eq!(img.get("holders"), "-", "{}", img.text);
    assert_ne!(img.get("state"), "in-use", "{}", img.text);
    drop(m);
}

/// `kill -9` of the daemon loses nothing it reported: after detaching the dead mount and
/// mounting again, `last_used`, the pin and the SHA-1 are what they were.
#[test]
fn last_use_pin_and_sha1_survive_kill_9() {
    let l = Layout::new();
    let covered = l.s.path("covered");
    let _bind = BindMount::new(&l.base, &covered);
    let m = Mount::new(&l.base, &["--no-evict"]);
    let file = l.base.join(HASH);
    let data: Vec<u8> =
        (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(&file, &data).unwrap();
    let img = wait_sha1(&m, HASH);
    let want = run_ok(tool("sha1sum").arg(covered.join(HASH)));
    let want = want.split_whitespace().next().unwrap();
    assert_eq!(img.get("sha1"), want, "sha1 of what was written:\n{}", img.text);
    let written = img.time("last_used");

    // A later use, so that last_used differs from the file's mtime.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::read(&file).unwrap(), data);
    let img = wait_image(&m, HASH, "last_used moved by the read", |i| {
        i.field("last_used").is_some_and(|t| parse_time(t) > written) && i.is("refs", "0")
    });
    let (code, out, err) = run(icfs().arg("pin").arg(&l.base).arg(HASH));
    assert_eq!(code, 0, "imagecachefs pin: {out}{err}");
    let before = wait_image(&m, HASH, "pinned", |i| i.is("state", "pinned"));
    assert_eq!(before.get("last_used"), img.get("last_used"), "pinning is not a use");

    let stale = m.kill9_leave_stale();
    drop(stale);
    assert!(!common::is_fuse(&l.base), "the dead mount is still attached");
    assert!(covered.join(".imagecachefs.state").is_file(), "no state file in the covered dir");

    let m = Mount::new(&l.base, &["--no-evict"]);
    let after = read_image(&l.base, HASH);
    for key in ["last_used", "state", "sha1"] {
        assert_eq!(
            after.get(key),
            before.get(key),
            "{key} changed across kill -9 and remount\nbefore:\n{}\nafter:\n{}",
            before.text,
            after.text
        );
    }
    // The pin still works as one: it can be undone.
    run_ok(icfs().arg("unpin").arg(&l.base).arg(HASH));
    wait_image(&m, HASH, "unpinned", |i| i.is("state", "idle"));
    drop(m);
}

/// `ls -a` of the mount shows the covered directory's entries and `.imagecache`, never the
/// state file, which is `ENOENT` through the mount while it exists underneath.
#[test]
fn the_state_file_is_invisible_through_the_mount() {
    let l = Layout::new();
    let covered = l.s.path("covered");
    let _bind = BindMount::new(&l.base, &covered);
    fs::write(l.base.join(HASH), b"one").unwrap();
    fs::write(l.base.join("swap_512"), b"two").unwrap();
    fs::write(l.base.join(".hidden"), b"three").unwrap();
    fs::create_dir(l.base.join("sub")).unwrap();
    let m = Mount::new(&l.base, &[]);
    // Reading a status file persists what it shows.
    fs::read_to_string(sfile(&l.base, "status")).unwrap();
    let state = covered.join(".imagecachefs.state");
    common::wait_until(POLL, "the state file in the covered dir", || state.is_file().then_some(()));

    let ls = |dir: &Path| -> BTreeSet<String> {
        run_ok(tool("ls").args(["-a", "-1"]).arg(dir)).lines().map(str::to_string).collect()
    };
    let under = ls(&covered);
    assert!(under.contains(".imagecachefs.state"), "covered dir: {under:?}");
    assert!(!under.contains(".imagecache"), "the status tree leaked into the covered dir");
    let through = ls(&l.base);
    let mut want: BTreeSet<String> =
        under.iter().filter(|n| !n.starts_with(".imagecachefs.state")).cloned().collect();
    want.insert(".imagecache".into());
    assert_eq!(through, want, "ls -a through the mount");

    let (code, _, err) = run(tool("stat").arg(l.base.join(".imagecachefs.state")));
    assert!(code != 0 && err.contains("No such file or directory"), "stat: {code} {err}");
    for name in [".imagecachefs.state", ".imagecachefs.state.tmp"] {
        let e = fs::symlink_metadata(l.base.join(name)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "lstat {name} through the mount: {e}");
        let e = File::open(l.base.join(name)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "open {name} through the mount: {e}");
    }
    assert!(state.is_file(), "the state file is still there underneath");
    let images = ls(&sfile(&l.base, "images"));
    assert_eq!(
        images,
        BTreeSet::from([
            ".".into(),
            "..".into(),
            HASH.to_string(),
            "swap_512".into(),
            ".hidden".into()
        ]),
        "images/ lists the regular files only"
    );
    drop(m);
}

/// `imagecachefs status DIR [--json]` prints the status files; pin, unpin and evict refuse an
/// unknown name, a name with `/`, and (evict) a file in use, with exit 1 and one clear line,
/// changing nothing.
#[test]
fn cli_status_and_control_refusals() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let file = l.base.join(HASH);
    fs::write(&file, b"in use\n").unwrap();
    fs::write(l.base.join("swap_512"), b"idle\n").unwrap();
    wait_sha1(&m, HASH);
    wait_sha1(&m, "swap_512");

    for (args, rel) in [(&[][..], "status"), (&["--json"][..], "status.json")] {
        let mut last = String::new();
        let same = (0..6).any(|_| {
            let (code, out, err) = run(icfs().arg("status").arg(&l.base).args(args));
            assert_eq!(code, 0, "imagecachefs status {args:?}: {err}");
            let file = fs::read_to_string(sfile(&l.base, rel)).unwrap();
            last = format!("--- CLI:\n{out}--- {rel}:\n{file}");
            out == file || {
                std::thread::sleep(Duration::from_millis(150));
                false
            }
        });
        assert!(same, "imagecachefs status {args:?} differs from {rel}:\n{last}");
    }

    let holder = sleeper(&file, l.s.path("sleeper.log"));
    let img = wait_image(&m, HASH, "the holder counted", |i| i.is("refs", "1"));
    // The program is the one that opened the file (`sh`, before its `exec sleep`).
    let holders = img.holders();
    assert!(
        holders.len() == 1 && holders.iter().all(|h| h.starts_with(&format!("{} ", holder.pid()))),
        "{}",
        img.text
    );
    let snapshot = |n: &str| {
        let i = read_image(&l.base, n);
        (i.get("refs").to_string(), i.get("state").to_string(), i.get("sha1").to_string())
    };
    let (hash_before, swap_before) = (snapshot(HASH), snapshot("swap_512"));

    let one_line = |args: &[&str], needle: &str| {
        let (code, out, err) = run(icfs().args(&args[..1]).arg(&l.base).args(&args[1..]));
        let ctx = format!("imagecachefs {args:?}: exit {code}\nstdout: {out:?}\nstderr: {err:?}");
        assert_eq!(code, 1, "{ctx}");
        assert_eq!(err.lines().count(), 1, "one line on stderr\n{ctx}");
        assert!(err.contains(needle), "stderr says {needle:?}\n{ctx}");
    };
    for verb in ["pin", "unpin", "evict", "verify"] {
        one_line(&[verb, "no-such-image"], "no cache file named");
        one_line(&[verb, &format!("../_base/{HASH}")], "");
        one_line(&[verb, "a/b"], "");
    }
    one_line(&["evict", HASH], "refused");
    assert!(file.is_file(), "a refused evict removed the file");
    assert_eq!(fs::read(&file).unwrap(), b"in use\n");
    assert_eq!(snapshot(HASH).0, hash_before.0, "refs changed by refusals");
    assert_eq!(snapshot(HASH).1, hash_before.1, "state changed by refusals");
    assert_eq!(snapshot(HASH).2, hash_before.2, "sha1 changed by refusals");
    assert_eq!(snapshot("swap_512"), swap_before, "an unrelated file changed");
    assert!(!l.base.join("no-such-image").exists());
    holder.kill();
    wait_image(&m, HASH, "refs 0 once the holder is gone", |i| i.is("refs", "0"));
    drop(m);
}

/// A `touch`/`utime` through the mount is a use and moves `last_used`; reading status files
/// (or stat-ing the file) is not.
#[test]
fn touch_is_a_use_and_reading_status_is_not() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let file = l.base.join(HASH);
    fs::write(&file, b"base image\n").unwrap();
    let img = wait_sha1(&m, HASH);
    let used0 = img.get("last_used").to_string();

    std::thread::sleep(Duration::from_millis(1100));
    for rel in READABLE.iter().copied().chain([&*format!("images/{HASH}")]) {
        run_ok(tool("cat").arg(sfile(&l.base, rel)));
    }
    run_ok(icfs().arg("status").arg(&l.base));
    run_ok(tool("stat").arg(&file));
    run_ok(tool("ls").arg("-l").arg(&l.base));
    let img = read_image(&l.base, HASH);
    assert_eq!(img.get("last_used"), used0, "reading status moved last_used:\n{}", img.text);

    let t = unix_now();
    run_ok(tool("touch").arg("-m").arg(&file));
    let img = wait_image(&m, HASH, "last_used moved by touch -m", |i| {
        i.field("last_used").is_some_and(|u| u != used0)
    });
    let used1 = img.time("last_used");
    assert!((used1 - t).abs() <= 2, "last_used after touch is not now ({t}):\n{}", img.text);
    assert!(used1 > parse_time(&used0), "{}", img.text);

    std::thread::sleep(Duration::from_millis(1100));
    let t = unix_now();
    run_ok(tool("python3").args(["-c", "import os, sys; os.utime(sys.argv[1], None)"]).arg(&file));
    let img = wait_image(&m, HASH, "last_used moved by os.utime", |i| {
        i.field("last_used").is_some_and(|u| parse_time(u) > used1)
    });
    assert!((img.time("last_used") - t).abs() <= 2, "{}", img.text);
    drop(m);
}

/// The control file reports a command's error from `write(2)`, also without a final newline
/// (`printf 'pin nosuch' > control` fails in the shell); a refused line ends its write, and
/// the lines after it neither run nor stick to the next write; a line over 4 KiB is refused
/// whole.
#[test]
fn control_errors_come_from_write_and_lines_never_glue() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let names = [HASH, HASH2, "swap_512"];
    for n in names {
        fs::write(l.base.join(n), b"x\n").unwrap();
    }
    for n in names {
        wait_sha1(&m, n);
    }
    let control = sfile(&l.base, "control");
    let printf = |data: &str| {
        run(tool("sh").args(["-c", r#"printf "$1" > "$2""#, "sh", data]).arg(&control))
    };
    let state = |n: &str| read_image(&l.base, n).get("state").to_string();

    // (dash's printf says "I/O error" whatever the errno; the errno is checked below.)
    let (code, _, err) = printf("pin nosuch");
    assert!(code != 0 && !err.is_empty(), "printf 'pin nosuch' > control: exit {code} {err}");
    let (code, _, err) = printf(&format!("pin {HASH}"));
    assert_eq!(code, 0, "a command without a newline: {err}");
    assert_eq!(state(HASH), "pinned", "ran at write(2), before close");

    // The first refused line ends the write: the line after it does not run.
    let (code, _, err) = printf(&format!("unpin {HASH}\\npin nosuch\\npin {HASH2}"));
    assert!(code != 0 && !err.is_empty(), "{code} {err}");
    assert_eq!(state(HASH), "idle", "the line before the refused one ran");
    assert_eq!(state(HASH2), "idle", "the line after the refused one did not");
    // Nothing is left over to glue onto the next write.
    let mut f = OpenOptions::new().write(true).open(&control).unwrap();
    let e = f.write_all(b"pin no").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    f.write_all(b"pin swap_512").unwrap();
    drop(f);
    assert_eq!(state("swap_512"), "pinned", "the second write is a command of its own");

    // Commands streamed in blocks (dd, a buffered writer): a line cut at a block's end is
    // never run as a shorter name, which may be another file; it is completed by the next
    // block, or run at close.
    let resized = format!("{HASH2}_10");
    fs::write(l.base.join(&resized), b"x\n").unwrap();
    wait_sha1(&m, &resized);
    let head = format!("pin {HASH2}");
    let mut block = vec![b'\n'; 4096 - head.len()];
    block.extend_from_slice(head.as_bytes());
    let mut f = OpenOptions::new().write(true).open(&control).unwrap();
    f.write_all(&block).unwrap();
    assert_eq!(state(HASH2), "idle", "a line cut at the block's end ran");
    f.write_all(b"_10\n").unwrap();
    drop(f);
    assert_eq!((state(HASH2).as_str(), state(&resized).as_str()), ("idle", "pinned"));
    let tail = "unpin swap_512";
    let mut block = vec![b'\n'; 4096 - tail.len()];
    block.extend_from_slice(tail.as_bytes());
    let mut f = OpenOptions::new().write(true).open(&control).unwrap();
    f.write_all(&block).unwrap();
    assert_eq!(state("swap_512"), "pinned", "kept for the next write");
    // A copy of the descriptor closing (a dup, a child's) runs nothing; the last close does.
    let dup = f.try_clone().unwrap();
    drop(dup);
    assert_eq!(state("swap_512"), "pinned", "a dup's close ran half a stream");
    drop(f);
    common::wait_until(POLL, "the kept line to run at the last close", || {
        (state("swap_512") == "idle").then_some(())
    });

    // An over-long line: EINVAL, and none of the write runs.
    let long = format!("pin {HASH2}\npin {}\n", "x".repeat(5000));
    let e = fs::write(&control, long).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert_eq!(state(HASH2), "idle", "a refused write ran one of its lines");
    let log = m.log_text();
    assert!(!log.contains(&"x".repeat(200)), "the long line was logged in full");
    drop(m);
}
