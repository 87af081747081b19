//! The operator's files in `mount-scripts/`, for real: every script is shellcheck-clean and
//! answers `--help`; the systemd unit and the nova-compute drop-in pass `systemd-analyze
//! verify` and carry the keys the product relies on; the `mount.fuse.imagecachefs` helper maps
//! fstab options to flags and mounts (directly, through util-linux `mount -t`, and through
//! `mount -a` with an fstab), refuses bad input without mounting; `preflight.sh` passes a ready
//! machine and names each problem it finds; `try-it.sh` runs its whole tour and leaves nothing
//! behind.
//!
//! Nothing here skips: a missing `shellcheck`, `unshare` or root fails the test and says so.

mod common;

use common::{
    bin, daemon_pids, detach, kill_daemons, mounts_at, on_path, run, run_timeout,
    wait_daemons_gone, Mount, Scratch,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const FSTYPE: &str = "fuse.imagecachefs";
const HELPER: &str = "mount.fuse.imagecachefs";
const SCRIPTS: [&str; 3] = [HELPER, "preflight.sh", "try-it.sh"];

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts")
}

fn script(name: &str) -> PathBuf {
    scripts_dir().join(name)
}

/// Fails (never skips) when `name` is not on PATH, saying how to get it.
fn require(name: &str, package: &str) {
    assert!(
        on_path(name),
        "this test needs `{name}` on PATH: apt-get install -y {package} (see .ci/run)"
    );
}

fn is_our_mount(dir: &Path) -> bool {
    mounts_at(dir).last().map(String::as_str) == Some(FSTYPE)
}

/// A mount made by the helper (a background daemon): detached on drop, its daemon waited for
/// (and killed if it lingers), so no mount or process outlives the test.
struct HelperMount {
    dir: PathBuf,
}

impl HelperMount {
    fn unmount(&self) {
        let (code, out, err) =
            run_timeout(Command::new(bin()).arg("unmount").arg(&self.dir), Duration::from_secs(20));
        assert_eq!(code, 0, "imagecachefs unmount failed:\nstdout: {out}\nstderr: {err}");
        assert!(
            wait_daemons_gone(&self.dir, Duration::from_secs(20)),
            "the daemon for {:?} did not exit after the unmount",
            self.dir
        );
        assert!(!is_our_mount(&self.dir), "{:?} is still mounted after the unmount", self.dir);
    }
}

impl Drop for HelperMount {
    fn drop(&mut self) {
        while is_our_mount(&self.dir) && detach(&self.dir) {}
        if !wait_daemons_gone(&self.dir, Duration::from_secs(10)) {
            kill_daemons(&self.dir);
        }
    }
}

/// `mount.fuse.imagecachefs ARGS...` with `IMAGECACHEFS_BIN` set to the binary under test.
fn helper(args: &[&str]) -> (i32, String, String) {
    run_timeout(
        Command::new(script(HELPER)).args(args).env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(30),
    )
}

fn good_nova_conf(s: &Scratch) -> PathBuf {
    let p = s.path("nova.conf");
    fs::copy(script("nova.conf.snippet"), &p).unwrap();
    p
}

fn read_config(dir: &Path) -> String {
    fs::read_to_string(dir.join(".imagecache/config"))
        .unwrap_or_else(|e| panic!("read {dir:?}/.imagecache/config: {e}"))
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// One refusal of the helper: exit 1, one line on stderr naming the problem, nothing mounted.
fn assert_helper_refuses(dir: &Path, args: &[&str], needle: &str) {
    let (code, out, err) = helper(args);
    let ctx = format!("{HELPER} {args:?}: exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 1, "{ctx}");
    assert_eq!(err.lines().count(), 1, "one line on stderr\n{ctx}");
    assert!(err.starts_with(&format!("{HELPER}: ")), "{ctx}");
    assert!(err.contains(needle), "stderr should say {needle:?}\n{ctx}");
    assert!(mounts_at(dir).is_empty(), "nothing may be mounted after a refusal\n{ctx}");
    assert!(daemon_pids(dir).is_empty(), "no daemon may be started after a refusal\n{ctx}");
}

#[test]
fn every_script_is_bash_strict_and_shellcheck_clean() {
    require("shellcheck", "shellcheck");
    let mut found = Vec::new();
    for entry in fs::read_dir(scripts_dir()).unwrap().flatten() {
        let text = fs::read(entry.path()).unwrap_or_default();
        if text.starts_with(b"#!") {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    let mut want: Vec<String> = SCRIPTS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "the scripts in mount-scripts/ (files starting with #!)");
    for name in SCRIPTS {
        let path = script(name);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("#!/usr/bin/env bash\n"), "{name}: #!/usr/bin/env bash");
        assert!(has_line(&text, "set -euo pipefail"), "{name}: set -euo pipefail");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
        assert!(mode & 0o111 == 0o111, "{name} must be executable (mode {mode:o})");
        let (code, out, err) =
            run(Command::new("shellcheck").args(["--shell=bash", "--severity=style"]).arg(&path));
        assert_eq!(code, 0, "shellcheck {name}:\n{out}{err}");
    }
    // The repository's other scripts (the README's test command starts with tests/setup.sh).
    for rel in ["tests/setup.sh", ".ci/run"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        let text = fs::read_to_string(&path).unwrap();
        assert!(has_line(&text, "set -euo pipefail"), "{rel}: set -euo pipefail");
        let (code, out, err) =
            run(Command::new("shellcheck").args(["--shell=bash", "--severity=style"]).arg(&path));
        assert_eq!(code, 0, "shellcheck {rel}:\n{out}{err}");
    }
}

#[test]
fn every_script_answers_help() {
    for name in SCRIPTS {
        for flag in ["--help", "-h"] {
            let (code, out, err) = run_timeout(
                Command::new(script(name)).arg(flag).env_remove("IMAGECACHEFS_BIN"),
                Duration::from_secs(10),
            );
            assert_eq!(code, 0, "{name} {flag}: exit {code}\nstderr: {err}");
            assert!(out.starts_with("Usage: "), "{name} {flag} prints its usage:\n{out}");
            assert!(out.lines().count() > 5, "{name} {flag} explains itself:\n{out}");
            assert!(err.is_empty(), "{name} {flag} writes nothing on stderr: {err}");
        }
    }
}

/// `[Section] Key=value` lines of a unit file (comments and blanks dropped).
fn unit_keys(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            keys.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    keys
}

fn unit_value(keys: &[(String, String, String)], section: &str, key: &str) -> String {
    let values: Vec<&str> = keys
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect();
    assert!(!values.is_empty(), "[{section}] {key}= is missing");
    values.join(" ")
}

#[test]
fn systemd_unit_and_drop_in_carry_the_required_keys_and_verify() {
    let unit = fs::read_to_string(script("imagecachefs.service")).unwrap();
    let keys = unit_keys(&unit);
    let before = unit_value(&keys, "Unit", "Before");
    for u in ["nova-compute.service", "libvirtd.service", "virtqemud.service"] {
        assert!(before.split_whitespace().any(|w| w == u), "Before= must name {u}: {before}");
    }
    assert!(unit_value(&keys, "Unit", "After").contains("local-fs.target"));
    assert_eq!(unit_value(&keys, "Unit", "RequiresMountsFor"), "/var/lib/nova/instances");
    assert_eq!(unit_value(&keys, "Service", "Type"), "notify");
    assert_eq!(unit_value(&keys, "Service", "NotifyAccess"), "main");
    assert_eq!(unit_value(&keys, "Service", "FileDescriptorStoreMax"), "3");
    assert_eq!(unit_value(&keys, "Service", "FileDescriptorStorePreserve"), "yes");
    assert!(unit_value(&keys, "Service", "ExecReload")
        .ends_with(" restart /var/lib/nova/instances/_base"));
    assert_eq!(
        unit_value(&keys, "Service", "ExecStart"),
        "/usr/local/bin/imagecachefs mount /var/lib/nova/instances/_base \
         --nova-conf /etc/nova/nova.conf",
        "the daemon runs in the foreground, without --background"
    );
    assert_eq!(unit_value(&keys, "Service", "Restart"), "on-failure");
    let kill_mode = unit_value(&keys, "Service", "KillMode");
    assert!(kill_mode == "mixed" || kill_mode == "process", "KillMode={kill_mode}");
    // The daemon serves running VMs' open files after the detach: systemd must wait.
    assert_eq!(unit_value(&keys, "Service", "TimeoutStopSec"), "infinity");
    assert_eq!(unit_value(&keys, "Service", "SendSIGKILL"), "no");
    assert_eq!(unit_value(&keys, "Install", "WantedBy"), "multi-user.target");
    // A private mount namespace would hide the mount from Nova, libvirt and QEMU.
    for (_, k, _) in &keys {
        assert!(
            !["PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "MountFlags"]
                .contains(&k.as_str())
                && !k.ends_with("Paths"),
            "{k}= gives the service its own mount namespace: the mount would be invisible"
        );
    }

    let drop_in = fs::read_to_string(script("nova-compute.service.d/imagecachefs.conf")).unwrap();
    let dkeys = unit_keys(&drop_in);
    assert_eq!(unit_value(&dkeys, "Unit", "Wants"), "imagecachefs.service");
    assert!(
        !dkeys.iter().any(|(_, k, _)| k == "Requires"),
        "Requires= would restart nova-compute with every restart of imagecachefs"
    );
    assert_eq!(unit_value(&dkeys, "Unit", "After"), "imagecachefs.service");

    if !Path::new("/usr/bin/systemd-analyze").exists()
        && !Path::new("/bin/systemd-analyze").exists()
    {
        eprintln!("systemd-analyze is not installed: the key checks above stand in for it");
        return;
    }
    // verify insists that ExecStart's binary exists: the copy points at the binary under test.
    let t = tempfile::tempdir().unwrap();
    fs::write(
        t.path().join("imagecachefs.service"),
        unit.replace("/usr/local/bin/imagecachefs", bin()),
    )
    .unwrap();
    fs::create_dir(t.path().join("nova-compute.service.d")).unwrap();
    fs::write(t.path().join("nova-compute.service.d/imagecachefs.conf"), &drop_in).unwrap();
    fs::write(
        t.path().join("nova-compute.service"),
        "[Unit]\nDescription=stand-in for nova-compute\n[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    let search = format!("{}:", t.path().display());
    let (code, out, err) = run_timeout(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(t.path().join("imagecachefs.service"))
            .arg(t.path().join("nova-compute.service"))
            .env("SYSTEMD_UNIT_PATH", &search)
            .env("SYSTEMD_LOG_LEVEL", "warning"),
        Duration::from_secs(30),
    );
    let ctx = format!("systemd-analyze verify: exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "{ctx}");
    // Unknown keys and bad values are warnings with exit 0: none may name our files.
    let ours: Vec<&str> = err
        .lines()
        .chain(out.lines())
        .filter(|l| l.contains("imagecachefs.service") || l.contains("imagecachefs.conf"))
        .collect();
    assert!(ours.is_empty(), "warnings about our unit files:\n{}\n{ctx}", ours.join("\n"));
}

#[test]
fn helper_mounts_with_fstab_options_and_unmounts() {
    let s = Scratch::new();
    let conf = good_nova_conf(&s);
    let dir = s.base.to_str().unwrap();
    let opts = format!("original_min_age=5,nova_conf={},rw,nodev", conf.display());
    let m = HelperMount { dir: s.base.clone() };
    let (code, out, err) = helper(&[dir, dir, "-o", &opts]);
    assert_eq!(code, 0, "{HELPER} {dir} {dir} -o {opts}:\nstdout: {out}\nstderr: {err}");
    assert!(is_our_mount(&s.base), "the helper returned before the mount was live");
    let config = read_config(&s.base);
    assert!(has_line(&config, "original_min_age: 5"), "the option wins over nova.conf:\n{config}");
    assert!(has_line(&config, &format!("nova_conf: {}", conf.display())), "{config}");
    assert!(has_line(&config, "resized_min_age: 3600"), "read from nova.conf:\n{config}");

    // `mount -a` again: the entry is already mounted and stays as it is, not stacked.
    let (code, _, err) = helper(&[dir, dir, "-o", &opts]);
    assert_eq!(code, 0, "a second mount of a mounted entry: {err}");
    assert!(err.contains("already an imagecachefs mount"), "{err}");
    assert_eq!(mounts_at(&s.base).iter().filter(|t| *t == FSTYPE).count(), 1);
    assert_eq!(daemon_pids(&s.base).len(), 1, "one daemon serves the mount");
    m.unmount();
}

#[test]
fn helper_detaches_a_dead_mount_and_mounts_again() {
    let s = Scratch::new();
    let dir = s.base.to_str().unwrap();
    let stale = Mount::new(&s.base, &[]).kill9_leave_stale();
    let m = HelperMount { dir: s.base.clone() };
    let (code, out, err) = helper(&[dir, dir, "-o", "original_min_age=6"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("dead imagecachefs mount"), "the helper says what it did: {err}");
    assert_eq!(mounts_at(&s.base).iter().filter(|t| *t == FSTYPE).count(), 1, "not stacked");
    assert!(has_line(&read_config(&s.base), "original_min_age: 6"));
    m.unmount();
    drop(stale);
}

#[test]
fn helper_maps_every_option_to_its_flag() {
    let s = Scratch::new();
    let dir = s.base.to_str().unwrap();
    // -f (fake) prints the command and mounts nothing; generic options are dropped.
    let opts = "rw,defaults,auto,noauto,nodev,nosuid,user,nouser,_netdev,nofail,\
                x-systemd.requires=a.service,comment=nova,original_min_age=1,resized_min_age=2,\
                partial_min_age=3,no_evict,nova_conf=/etc/nova/nova.conf,instances_dir=/srv/i,\
                min_free=10%,pressure_min_age=4,verify_interval=5,verify_rate=6,threads=7,\
                log_file=/var/log/icfs.log";
    let (code, out, err) = helper(&[dir, dir, "-f", "-n", "-v", "-o", opts]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let want = format!(
        "{HELPER}: {} mount {dir} --background --original-min-age 1 --resized-min-age 2 \
         --partial-min-age 3 --no-evict --nova-conf /etc/nova/nova.conf --instances-dir /srv/i \
         --min-free 10% --pressure-min-age 4 --verify-interval 5 --verify-rate 6 --threads 7 \
         --log-file /var/log/icfs.log",
        bin()
    );
    assert!(err.lines().any(|l| l == want), "want the line\n{want}\ngot\n{err}");
    assert!(mounts_at(&s.base).is_empty(), "-f must not mount");

    // A relative path is resolved against the caller's directory (the daemon runs in /), as
    // is a relative DIR; -o may be given twice.
    let (code, _, err) = run_timeout(
        Command::new(script(HELPER))
            .args(["_base", "./_base/", "-f", "-o", "nova_conf=nova.conf", "-o", "threads=2"])
            .current_dir(s.tmp.path())
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(10),
    );
    assert_eq!(code, 0, "{err}");
    let want = format!(
        "{HELPER}: {} mount {dir} --background --nova-conf {}/nova.conf --threads 2",
        bin(),
        s.tmp.path().display()
    );
    assert!(err.lines().any(|l| l == want), "want the line\n{want}\ngot\n{err}");
    // -s (sloppy) ignores an unknown option with a warning.
    let (code, _, err) = helper(&[dir, dir, "-f", "-s", "-o", "frobnicate"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ignoring unknown option frobnicate"), "{err}");
}

#[test]
fn helper_refuses_bad_input_and_mounts_nothing() {
    let s = Scratch::new();
    let dir = s.base.to_str().unwrap();
    assert_helper_refuses(
        &s.base,
        &[dir, dir, "-o", "original_min_age=5,bogus=1,nodev"],
        "unknown option bogus=1",
    );
    assert_helper_refuses(&s.base, &[dir, dir, "-o", "ro"], "option ro is not supported");
    assert_helper_refuses(&s.base, &[dir, dir, "-o", "threads=many"], "threads=many");
    // Values go through the daemon's own check: bounds and syntax, one line, nothing mounted.
    assert_helper_refuses(
        &s.base,
        &[dir, dir, "-o", "min_free=200%"],
        "\"200%\" is not a percentage from 0 up to (not including) 100",
    );
    assert_helper_refuses(
        &s.base,
        &[dir, dir, "-o", "original_min_age=18446744073709551615"],
        "is not a whole number from 0 to 315360000",
    );
    assert_helper_refuses(
        &s.base,
        &[dir, dir, "-o", "instances_dir=/nonexistent-icfs-instances"],
        "/nonexistent-icfs-instances (--instances-dir) does not exist",
    );
    assert_helper_refuses(&s.base, &[dir, dir, "-o", "nova_conf"], "nova_conf needs a value");
    assert_helper_refuses(&s.base, &[dir, dir, "-o", "no_evict=1"], "no_evict takes no value");
    let other = s.path("other");
    fs::create_dir(&other).unwrap();
    assert_helper_refuses(
        &s.base,
        &[other.to_str().unwrap(), dir, "-o", "original_min_age=5"],
        "must be the mount point",
    );
    assert_helper_refuses(&s.base, &[dir], "expected SOURCE and DIR");
    assert_helper_refuses(&s.base, &[dir, dir, "-t", "ext4"], "not ext4");
    assert!(mounts_at(&other).is_empty());

    // A failure of imagecachefs itself is mount(8)'s "mount failure", 32, with its reason.
    let missing = s.path("missing");
    let missing = missing.to_str().unwrap();
    let (code, _, err) = helper(&[missing, missing]);
    assert_eq!(code, 32, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

/// Runs `script` with bash in a private mount namespace where the helper is installed as
/// `/sbin/mount.fuse.imagecachefs`: util-linux only looks for helpers in /sbin, /sbin/fs.d and
/// /sbin/fs (compiled in, PATH is ignored), so an overlay over /sbin's real directory puts it
/// there without touching the host. The namespace ends with the script (its trap unmounts).
fn in_namespace_with_helper(s: &Scratch, script_text: &str) -> (i32, String, String) {
    require("unshare", "util-linux");
    require("mount", "mount");
    let helper_dir = s.path("helpers");
    fs::create_dir(&helper_dir).unwrap();
    fs::copy(script(HELPER), helper_dir.join(HELPER)).unwrap();
    let prologue = format!(
        "set -euo pipefail\n\
         sbin=$(readlink -f /sbin)\n\
         mount -t overlay overlay -o lowerdir={}:\"$sbin\" \"$sbin\"\n\
         trap '\"$IMAGECACHEFS_BIN\" unmount {} 2>/dev/null || true' EXIT\n",
        helper_dir.display(),
        s.base.display()
    );
    run_timeout(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c"])
            .arg(prologue + script_text)
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(60),
    )
}

#[test]
fn util_linux_mount_and_mount_a_run_the_helper() {
    let s = Scratch::new();
    let conf = good_nova_conf(&s);
    let dir = s.base.display().to_string();
    let fstab = s.path("fstab");
    fs::write(
        &fstab,
        format!(
            "# a test fstab\n{dir} {dir} {FSTYPE} original_min_age=9,nova_conf={},nofail,\
             x-systemd.requires=foo.service,comment=test 0 0\n",
            conf.display()
        ),
    )
    .unwrap();
    let guard = HelperMount { dir: s.base.clone() };
    let text = format!(
        "test -x /sbin/{HELPER}\n\
         mount -t {FSTYPE} {dir} {dir} -o original_min_age=7,nova_conf={conf},rw,nodev\n\
         echo \"== mount -t: $(grep original_min_age {dir}/.imagecache/config)\"\n\
         \"$IMAGECACHEFS_BIN\" unmount {dir}\n\
         mount -a -T {fstab}\n\
         echo \"== mount -a: $(grep original_min_age {dir}/.imagecache/config)\"\n\
         mount -a -T {fstab}\n\
         echo \"== mounts: $(grep -c ' {dir} {FSTYPE} ' /proc/self/mounts)\"\n\
         \"$IMAGECACHEFS_BIN\" unmount {dir}\n\
         echo \"== after unmount: $(grep -c ' {dir} {FSTYPE} ' /proc/self/mounts || true)\"\n",
        conf = conf.display(),
        fstab = fstab.display(),
    );
    let (code, out, err) = in_namespace_with_helper(&s, &text);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "{ctx}");
    assert!(has_line(&out, "== mount -t: original_min_age: 7"), "{ctx}");
    assert!(has_line(&out, "== mount -a: original_min_age: 9"), "{ctx}");
    assert!(has_line(&out, "== mounts: 1"), "a second mount -a stacks nothing\n{ctx}");
    assert!(has_line(&out, "== after unmount: 0"), "{ctx}");
    assert!(
        wait_daemons_gone(&s.base, Duration::from_secs(20)),
        "the daemons started in the namespace did not exit\n{ctx}"
    );
    drop(guard);
}

fn preflight(s: &Scratch, nova_conf: &Path) -> (i32, String, String) {
    run_timeout(
        Command::new(script("preflight.sh"))
            .arg("--cache-dir")
            .arg(&s.base)
            .arg("--nova-conf")
            .arg(nova_conf)
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(30),
    )
}

#[test]
fn preflight_passes_a_ready_machine_and_warns_about_open_files() {
    let s = Scratch::new();
    let conf = good_nova_conf(&s);
    let (code, out, err) = preflight(&s, &conf);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "{ctx}");
    assert!(!out.contains("FAIL"), "{ctx}");
    assert!(out.contains("remove_unused_base_images = False"), "{ctx}");
    assert!(out.contains("no process holds a file under"), "{ctx}");

    // A file held open before the mount is a warning naming the process, not a failure.
    let held = s.base.join("0d5e6b61602d758984b3bf038267614d6016eb2a");
    fs::write(&held, b"base").unwrap();
    let f = fs::File::open(&held).unwrap();
    let (code, out, err) = preflight(&s, &conf);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "{ctx}");
    let me = format!("pid {} (", std::process::id());
    assert!(
        out.lines().any(|l| l.contains(&me) && l.contains(held.to_str().unwrap())),
        "the holder is named\n{ctx}"
    );
    drop(f);
}

#[test]
fn preflight_fails_naming_each_problem() {
    let s = Scratch::new();
    let cases = [
        ("[image_cache]\nremove_unused_base_images = True\n", "remove_unused_base_images = True"),
        ("[DEFAULT]\nremove_unused_base_images=yes\n", "[DEFAULT] remove_unused_base_images = yes"),
        ("[image_cache]\nremove_unused_base_images = maybe\n", "not a boolean"),
        ("[DEFAULT]\ndebug = True\n", "does not set [image_cache] remove_unused_base_images"),
    ];
    for (text, needle) in cases {
        let conf = s.path("bad-nova.conf");
        fs::write(&conf, text).unwrap();
        let (code, out, err) = preflight(&s, &conf);
        let ctx = format!("nova.conf {text:?}: exit {code}\nstdout: {out}\nstderr: {err}");
        assert_eq!(code, 1, "{ctx}");
        let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(fails.len(), 1, "exactly the nova.conf problem\n{ctx}");
        assert!(fails[0].contains(needle), "{ctx}");
        assert!(out.contains("problem(s) to fix"), "the summary lists the failures\n{ctx}");
    }
    // [image_cache] wins over the legacy [DEFAULT] name.
    let conf = s.path("mixed-nova.conf");
    fs::write(&conf, "[DEFAULT]\nremove_unused_base_images = True\n[image_cache]\nremove_unused_base_images: off\n").unwrap();
    let (code, out, _) = preflight(&s, &conf);
    assert_eq!(code, 0, "{out}");

    // What the daemon itself refuses, preflight refuses: it runs `mount --check`.
    for (text, needle) in [
        (
            "[image_cache]\nremove_unused_base_images = False\n\
             remove_unused_original_minimum_age_seconds = 18446744073709551615\n",
            ":3: remove_unused_original_minimum_age_seconds: \"18446744073709551615\" is more than 315360000 seconds",
        ),
        (
            "[DEFAULT]\ninstances_path = /nonexistent-icfs-instances\n\
             [image_cache]\nremove_unused_base_images = False\n",
            "/nonexistent-icfs-instances (instances_path in",
        ),
    ] {
        let conf = s.path("refused-nova.conf");
        fs::write(&conf, text).unwrap();
        let (code, out, err) = preflight(&s, &conf);
        let ctx = format!("nova.conf {text:?}: exit {code}\nstdout: {out}\nstderr: {err}");
        assert_eq!(code, 1, "{ctx}");
        let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(fails.len(), 1, "exactly the refused value\n{ctx}");
        assert!(fails[0].contains("imagecachefs refuses the configuration"), "{ctx}");
        assert!(fails[0].contains(needle), "{ctx}");
        // And mount refuses it too, with the same words.
        let (code, _, err) = run_timeout(
            Command::new(bin()).arg("mount").arg(&s.base).arg("--nova-conf").arg(&conf),
            Duration::from_secs(20),
        );
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(mounts_at(&s.base).is_empty());
    }

    // An explicitly named nova.conf that does not exist is a failure.
    let (code, out, _) = preflight(&s, &s.path("absent.conf"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("absent.conf cannot be read"), "{out}");
}

#[test]
fn preflight_fails_on_a_directory_already_mounted() {
    let s = Scratch::new();
    let conf = good_nova_conf(&s);
    let m = Mount::new(&s.base, &[]);
    let (code, out, err) = preflight(&s, &conf);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 1, "{ctx}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{ctx}");
    assert!(fails[0].contains("is already an imagecachefs mount"), "{ctx}");
    assert!(m.stop().success());
}

#[test]
fn preflight_fails_on_a_dead_mount() {
    let s = Scratch::new();
    let conf = good_nova_conf(&s);
    let _stale = Mount::new(&s.base, &[]).kill9_leave_stale();
    let (code, out, err) = preflight(&s, &conf);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 1, "{ctx}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{ctx}");
    assert!(fails[0].contains("is a dead imagecachefs mount"), "{ctx}");
    assert!(fails[0].contains("imagecachefs unmount"), "and says how to fix it\n{ctx}");
}

#[test]
fn try_it_runs_the_whole_tour_and_leaves_nothing_behind() {
    common::require_fuse();
    for tool in ["qemu-img", "qemu-nbd"] {
        require(tool, "qemu-utils");
    }
    let started = Instant::now();
    let (code, out, err) = run_timeout(
        Command::new(script("try-it.sh")).env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(75),
    );
    let ctx = format!("exit {code} after {:?}\nstdout: {out}\nstderr: {err}", started.elapsed());
    assert_eq!(code, 0, "{ctx}");
    for want in [
        "state: writing",
        "state: idle",
        "state: referenced",
        "state: in-use",
        "holders: ",
        "Images are identical.",
        "eviction-refused",
        "reason idle",
        "No such file or directory",
        "everything is cleaned up",
    ] {
        assert!(out.contains(want), "the tour shows {want:?}\n{ctx}");
    }
    let evicted = out.lines().filter(|l| l.contains(" evicted ")).count();
    assert!(evicted >= 1, "the events file shows the eviction\n{ctx}");
    let scratch = out
        .lines()
        .find_map(|l| l.strip_prefix("Scratch instances directory: "))
        .map(|p| Path::new(p).parent().unwrap().to_path_buf())
        .unwrap_or_else(|| panic!("the tour names its scratch directory\n{ctx}"));
    assert!(!scratch.exists(), "{scratch:?} was not removed\n{ctx}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(FSTYPE) && l.contains(scratch.to_str().unwrap()))
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    assert!(
        wait_daemons_gone(&scratch.join("instances/_base"), Duration::from_secs(10)),
        "the tour's daemon is still running"
    );
}

/// A cache directory on shared storage (a FUSE filesystem: another imagecachefs stands in
/// for a cluster client) is a warning: the daemon would evict nothing there.
#[test]
fn preflight_warns_about_shared_storage() {
    let s = Scratch::new();
    let outer = Mount::new(&s.base, &["--no-evict"]);
    let dir = s.base.join("instances/_base");
    fs::create_dir_all(&dir).unwrap();
    let conf = good_nova_conf(&s);
    let (code, out, err) = run_timeout(
        Command::new(script("preflight.sh"))
            .arg("--cache-dir")
            .arg(&dir)
            .arg("--nova-conf")
            .arg(&conf)
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(30),
    );
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "{ctx}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("warn") && l.contains("shared storage (fuse.imagecachefs)")),
        "{ctx}"
    );
    drop(outer);
}
