//! Who a process is, and which cache files it holds open, read from `/proc`.
//!
//! Owns every read of `/proc`: resolving a FUSE request's thread id to its process (program,
//! VM instance name, start time) and finding processes that hold a cache file open through a
//! descriptor that does not go through our mount (taken before it, inherited from such a
//! process, or opened where the covered directory is visible). `/proc` only enriches status
//! and finds those outside holders; it never drives the reference counts of handles opened
//! through the mount. A walk never touches a filesystem — no `stat` of a descriptor, which
//! could reach this very daemon from another mount namespace or a stalled NFS server — and it
//! is bounded in time and descriptors.
//! Invariants: a [`Holder`] names one process for good, because `(pid, start_time)` survives
//! pid reuse, and every lookup re-reads the start time after its other reads so that a pid
//! recycled midway is reported as gone, not as a mix of two processes. A process that vanishes
//! or denies access is skipped, never an error. The root is a plain directory so that tests
//! (ours and integration tests) can point it at a fake tree.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The root of a `/proc` tree: `/proc` itself, or a fake tree in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcRoot(pub PathBuf);

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot(PathBuf::from("/proc"))
    }
}

/// One process (thread group), identified across pid reuse by `(pid, start_time)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Thread group id, i.e. the process id.
    pub pid: u32,
    /// Basename of the executable (`qemu-system-x86_64`, `qemu-img`, ...), or `comm` when the
    /// executable cannot be read.
    pub program: String,
    /// For a QEMU VM: the guest name (`instance-0000002a`), else its `-uuid`.
    pub instance: Option<String>,
    /// Start time in clock ticks after boot (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
}

/// The cache files a `/proc` walk looks for, by covered inode number.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    /// The covered filesystem's device, as mountinfo shows it (`makedev(major, minor)`).
    pub dev: u64,
    /// Cache files by inode number on the covered filesystem, with their names.
    pub files: &'a HashMap<u64, OsString>,
    /// Our own mount's device (`None` before the mount): descriptors on it, in any mount
    /// namespace, are counted by file handle, never here.
    pub own_dev: Option<u64>,
}

/// A process holding a cache file open, found through `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub ino: u64,
    pub name: OsString,
    pub holder: Holder,
    /// One of its descriptors on the file was opened for writing.
    pub write: bool,
}

/// A `/proc` walk that could not look at everything: what it found cannot be trusted to be
/// complete, so no file may be evicted on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incomplete(pub &'static str);

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The longest a walk may take, and the most descriptors it looks at, before it gives up.
const WALK_TIME: Duration = Duration::from_secs(5);
const WALK_FDS: usize = 1 << 20;
/// Passes over `/proc` before a walk that keeps finding new processes gives up.
const WALK_PASSES: usize = 8;

/// What the walk knows of a mount id: its device, and whether it is an imagecachefs overlay.
#[derive(Clone, Copy, Debug)]
struct MountOf {
    dev: u64,
    /// A filesystem stacked on others (an imagecachefs overlay, overlayfs), whose inode
    /// numbers may be the covered ones: its descriptors count by inode and name.
    stacked: bool,
}

/// Mount ids seen during one walk (they are unique across mount namespaces).
#[derive(Default)]
struct Mounts {
    by_id: HashMap<u64, MountOf>,
    /// Mount tables read already, by mount namespace and root (a chrooted process sees only
    /// the mounts below its root).
    read: std::collections::HashSet<(OsString, OsString)>,
}

impl Mounts {
    /// The mount `id` as the process at `proc_dir` sees it; reads its mountinfo once per
    /// mount namespace and root. Nothing here reaches a filesystem: mountinfo is the kernel's
    /// table.
    fn get(&mut self, proc_dir: &Path, id: u64) -> Option<MountOf> {
        if let Some(m) = self.by_id.get(&id) {
            return Some(*m);
        }
        let link = |what: &str| fs::read_link(proc_dir.join(what)).map(|p| p.into_os_string());
        if let (Ok(ns), Ok(root)) = (link("ns/mnt"), link("root")) {
            if !self.read.insert((ns, root)) {
                return None;
            }
        }
        self.load(proc_dir);
        self.by_id.get(&id).copied()
    }

    fn load(&mut self, proc_dir: &Path) {
        let Ok(text) = fs::read_to_string(proc_dir.join("mountinfo")) else { return };
        for m in crate::mount::parse_mountinfo(&text) {
            let dev = libc::makedev(m.dev.0, m.dev.1);
            let stacked = m.fstype == crate::mount::FSTYPE || m.fstype == "overlay";
            self.by_id.insert(m.id, MountOf { dev, stacked });
        }
    }
}

impl ProcRoot {
    /// Thread id (the FUSE request's pid) -> Holder of its thread group: `/proc/<tid>/status`
    /// `Tgid:`; program = basename of readlink `/proc/<tgid>/exe` (a trailing " (deleted)"
    /// stripped), falling back to `/proc/<tgid>/comm`; instance = for qemu, the `guest=NAME` in
    /// the `-name` argument of `/proc/<tgid>/cmdline` (NUL-separated;
    /// `-name guest=instance-0000002a,debug-threads=on` or `-name instance-0000002a`), else the
    /// `-uuid` value; start_time = field 22 of `/proc/<tgid>/stat` (parsed after the LAST `)`
    /// because comm may contain spaces and parentheses). None if the process is gone.
    pub fn holder(&self, tid: u32) -> Option<Holder> {
        let status = fs::read_to_string(self.0.join(tid.to_string()).join("status")).ok()?;
        self.process(parse_tgid(&status)?)
    }

    /// Every process that holds a wanted file open outside our mount, with whether any of its
    /// descriptors on it may write; one entry per process and file.
    ///
    /// A descriptor is matched without touching any filesystem: `readlink` of
    /// `/proc/<pid>/fd/<n>` (a path or not), `fdinfo` (`mnt_id`, `ino`, `flags`), and the mount
    /// table of the holder's mount namespace (`mnt_id` → device). It counts when it is on the
    /// covered filesystem (any mount of it, in any namespace) with a wanted inode, or on an
    /// earlier imagecachefs overlay (node ids are covered inode numbers) under the wanted
    /// name. Skipped: our own process, `O_PATH` descriptors (they cannot read or write: a
    /// daemon's own node handles), descriptors on our own mount in any namespace. Processes
    /// and descriptors that vanish midway are skipped; a walk that runs out of time or
    /// descriptors, or cannot read `/proc`, is `Incomplete`.
    pub fn holders_of(&self, want: &Wanted) -> Result<Vec<Held>, Incomplete> {
        let mut found = Vec::new();
        if want.files.is_empty() {
            return Ok(found);
        }
        let started = Instant::now();
        let me = std::process::id();
        let mut mounts = Mounts::default();
        // Our own mount table first: every mount of our namespace, whatever the root of the
        // process whose descriptor names it.
        mounts.load(&self.0.join(me.to_string()));
        let mut budget = WALK_FDS;
        let mut seen = std::collections::HashSet::new();
        // A holder may fork and exit while the walk runs: its child, a process the first pass
        // has not seen, is looked at by the next pass, until a pass finds no new process.
        for _ in 0..WALK_PASSES {
            let mut new = 0;
            let entries = fs::read_dir(&self.0).map_err(|_| Incomplete("/proc is unreadable"))?;
            for entry in entries.flatten() {
                if started.elapsed() > WALK_TIME {
                    return Err(Incomplete("the /proc walk ran out of time"));
                }
                let Some(pid) = parse_pid(entry.file_name().as_bytes()) else { continue };
                if pid == me {
                    continue;
                }
                let Some(start_time) = self.start_time(pid) else { continue };
                if !seen.insert((pid, start_time)) {
                    continue;
                }
                new += 1;
                let held = self.held_by(pid, want, &mut mounts, &mut budget)?;
                if held.is_empty() {
                    continue;
                }
                match self.process(pid) {
                    Some(holder) if holder.start_time == start_time => {
                        found.extend(held.into_iter().map(|(ino, name, write)| Held {
                            ino,
                            name,
                            holder: holder.clone(),
                            write,
                        }))
                    }
                    _ => {}
                }
            }
            if new == 0 {
                return Ok(found);
            }
        }
        Err(Incomplete("processes kept appearing during the /proc walk"))
    }

    /// The wanted files `pid` holds, with write access.
    fn held_by(
        &self,
        pid: u32,
        want: &Wanted,
        mounts: &mut Mounts,
        budget: &mut usize,
    ) -> Result<Vec<(u64, OsString, bool)>, Incomplete> {
        let proc_dir = self.0.join(pid.to_string());
        let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else { return Ok(Vec::new()) };
        let mut out: Vec<(u64, OsString, bool)> = Vec::new();
        for fd in fds.flatten() {
            *budget = budget.checked_sub(1).ok_or(Incomplete("too many descriptors to look at"))?;
            // Sockets, pipes, anonymous inodes: not a path, never a cache file.
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            if !target.as_os_str().as_bytes().starts_with(b"/") {
                continue;
            }
            let info_path = proc_dir.join("fdinfo").join(fd.file_name());
            let Ok(text) = fs::read_to_string(&info_path) else { continue };
            let info = parse_fdinfo(&text);
            let (Some(ino), Some(mnt)) = (info.ino, info.mnt) else { continue };
            if info.flags.is_some_and(|f| f & libc::O_PATH != 0) {
                continue;
            }
            let Some(name) = want.files.get(&ino) else { continue };
            let counts = match mounts.get(&proc_dir, mnt) {
                Some(m) if m.dev == want.dev => true,
                Some(m) if Some(m.dev) == want.own_dev => false,
                Some(m) if m.stacked => link_name(&target) == name.as_bytes(),
                Some(_) => false,
                // A mount that vanished from the table while the descriptor stays open (a
                // lazily detached mount): count it if it names the file, to be safe.
                None => link_name(&target) == name.as_bytes(),
            };
            if !counts {
                continue;
            }
            let write = info.flags.is_some_and(|f| f & libc::O_ACCMODE != libc::O_RDONLY);
            match out.iter_mut().find(|(i, _, _)| *i == ino) {
                Some(e) => e.2 |= write,
                None => out.push((ino, name.clone(), write)),
            }
        }
        Ok(out)
    }

    /// The thread group `pid` itself (not resolved through `status`).
    fn process(&self, pid: u32) -> Option<Holder> {
        let dir = self.0.join(pid.to_string());
        let start_time = self.start_time(pid)?;
        let program = match fs::read_link(dir.join("exe")) {
            Ok(exe) => exe_basename(exe.as_os_str().as_bytes()),
            Err(_) => None,
        };
        let program = match program {
            Some(program) => program,
            None => fs::read_to_string(dir.join("comm")).ok()?.trim_end_matches('\n').to_owned(),
        };
        let instance = if is_vm(&program) {
            fs::read(dir.join("cmdline")).ok().and_then(|cmdline| parse_instance(&cmdline))
        } else {
            None
        };
        // Re-read last: a pid recycled while we read is reported as gone.
        (self.start_time(pid)? == start_time).then_some(Holder {
            pid,
            program,
            instance,
            start_time,
        })
    }

    /// Start time (field 22 of `/proc/<pid>/stat`) of a process or thread; one small read.
    pub fn start_time(&self, pid: u32) -> Option<u64> {
        use std::io::Read;
        let mut buf = [0u8; 1024];
        let mut f = fs::File::open(self.0.join(pid.to_string()).join("stat")).ok()?;
        let n = f.read(&mut buf).ok()?;
        parse_start_time(std::str::from_utf8(&buf[..n]).ok()?)
    }

    /// Supplementary groups of a thread (`Groups:` of `/proc/<tid>/status`).
    pub fn groups(&self, tid: u32) -> Vec<u32> {
        let Ok(status) = fs::read_to_string(self.0.join(tid.to_string()).join("status")) else {
            return Vec::new();
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|v| v.split_whitespace().filter_map(|g| g.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The mount that `fd` of this process was opened on, as `makedev(major, minor)` of
    /// mountinfo (for btrfs subvolumes that is not `st_dev`, so the walk compares like with
    /// like).
    pub fn mount_dev_of(&self, fd: i32) -> Option<u64> {
        let me = self.0.join(std::process::id().to_string());
        let mnt =
            parse_fdinfo(&fs::read_to_string(me.join("fdinfo").join(fd.to_string())).ok()?).mnt?;
        Mounts::default().get(&me, mnt).map(|m| m.dev)
    }
}

/// The last component of a descriptor's path, without the " (deleted)" the kernel appends
/// once the name is gone.
fn link_name(target: &Path) -> &[u8] {
    let b = target.as_os_str().as_bytes();
    let b = b.strip_suffix(b" (deleted)").unwrap_or(b);
    b.rsplit(|&c| c == b'/').next().unwrap_or(b)
}

/// What `/proc/<pid>/fdinfo/<fd>` says of a descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// The mount it was opened on.
    pub mnt: Option<u64>,
    /// Its open flags.
    pub flags: Option<i32>,
    /// The inode number on that mount.
    pub ino: Option<u64>,
}

/// Parses `mnt_id:`, `flags:` (octal) and `ino:` of an fdinfo text.
pub fn parse_fdinfo(text: &str) -> FdInfo {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    FdInfo {
        mnt: field("mnt_id:").and_then(|v| v.parse().ok()),
        flags: field("flags:").and_then(|v| i32::from_str_radix(v, 8).ok()),
        ino: field("ino:").and_then(|v| v.parse().ok()),
    }
}

/// The `Tgid:` line of `/proc/<tid>/status`.
pub fn parse_tgid(status: &str) -> Option<u32> {
    status.lines().find_map(|line| line.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`. Fields are counted after the last `)`,
/// because field 2 (`comm`) may itself hold spaces and parentheses.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (`state`).
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The instance a QEMU command line (`/proc/<pid>/cmdline`, NUL-separated) runs: the guest
/// name of `-name` (`guest=NAME,...`, or a bare `NAME,...`), else the value of `-uuid`.
/// Where an option repeats, the last one counts, as in QEMU.
pub fn parse_instance(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let last_value = |option: &str| {
        args.windows(2)
            .filter(|w| {
                w[0].strip_prefix(b"-") == Some(option.as_bytes()) || w[0] == option.as_bytes()
            })
            .map(|w| w[1])
            .next_back()
    };
    let guest = last_value("-name").and_then(|value| {
        let opts = split_qemu_opts(value);
        let implied = opts.first().filter(|first| !first.contains(&b'=')).cloned();
        opts.into_iter()
            .filter_map(|opt| opt.strip_prefix(b"guest=").map(<[u8]>::to_vec))
            .next_back()
            .or(implied)
    });
    let uuid = || last_value("-uuid").map(<[u8]>::to_vec);
    guest
        .filter(|name| !name.is_empty())
        .or_else(uuid)
        .filter(|name| !name.is_empty())
        // Any user chooses a command line: what is kept of it per open handle is bounded.
        .map(|name| String::from_utf8_lossy(&name[..name.len().min(INSTANCE_MAX)]).into_owned())
}

/// The longest instance name kept (libvirt's are `instance-0000002a` or a UUID).
pub const INSTANCE_MAX: usize = 255;

/// Splits a QEMU option string on `,`, where `,,` stands for a literal comma.
fn split_qemu_opts(value: &[u8]) -> Vec<Vec<u8>> {
    let mut opts = vec![Vec::new()];
    let mut bytes = value.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        if b == b',' && bytes.next_if_eq(&b',').is_none() {
            opts.push(Vec::new());
        } else {
            opts.last_mut().expect("never empty").push(b);
        }
    }
    opts
}

/// A `/proc` entry name that is a pid (`self`, `thread-self`, `sys`, ... are not).
fn parse_pid(name: &[u8]) -> Option<u32> {
    if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// Basename of an `exe` link target, without the " (deleted)" the kernel appends once the
/// executable was replaced (a package upgrade under a running VM).
fn exe_basename(target: &[u8]) -> Option<String> {
    let target = target.strip_suffix(b" (deleted)").unwrap_or(target);
    let base = target.rsplit(|&b| b == b'/').next().filter(|base| !base.is_empty())?;
    Some(String::from_utf8_lossy(base).into_owned())
}

/// A program that runs a VM and so carries `-name`/`-uuid`: `qemu-system-*`, `qemu-kvm`
/// (also as the 15-byte `comm` fallback, `qemu-system-x86`).
fn is_vm(program: &str) -> bool {
    program.starts_with("qemu-system-") || program == "qemu-kvm" || program == "kvm"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    /// Pids above `PID_MAX_LIMIT` (2^22): never a real process, never our own pid.
    const TGID: u32 = 9_000_001;
    const TID: u32 = 9_000_002;

    /// A command line as `/proc/<pid>/cmdline` holds it: every argument NUL-terminated.
    fn argv(args: &[&str]) -> Vec<u8> {
        args.iter().flat_map(|arg| arg.bytes().chain([0])).collect()
    }

    /// What libvirt starts for a Nova instance (abridged).
    fn qemu_cmdline() -> Vec<u8> {
        argv(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=instance-0000002a,debug-threads=on",
            "-S",
            "-uuid",
            "6a3c2e8e-6f0a-4b8e-9c55-2f1d3a4b5c6d",
            "-m",
            "512",
        ])
    }

    fn stat_line(pid: u32, comm: &str, start_time: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1000 0 0 0 12 34 0 0 20 0 4 0 \
             {start_time} 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 17 3 0 0\n"
        )
    }

    /// Writes `<root>/<pid>/{status,comm,cmdline,stat}` and, if given, the `exe` symlink.
    fn fake_process(
        root: &Path,
        pid: u32,
        tgid: u32,
        exe: Option<&str>,
        comm: &str,
        cmdline: &[u8],
        start_time: u64,
    ) -> PathBuf {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(
            dir.join("status"),
            format!(
                "Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{tgid}\n\
                 Ngid:\t0\nPid:\t{pid}\nPPid:\t1\n"
            ),
        )
        .unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(dir.join("cmdline"), cmdline).unwrap();
        fs::write(dir.join("stat"), stat_line(pid, comm, start_time)).unwrap();
        if let Some(exe) = exe {
            symlink(exe, dir.join("exe")).unwrap();
        }
        dir
    }

    #[test]
    fn fdinfo_fields() {
        let text = "pos:\t5\nflags:\t02100002\nmnt_id:\t43\nino:\t10018924\n";
        let i = parse_fdinfo(text);
        assert_eq!((i.mnt, i.ino), (Some(43), Some(10_018_924)));
        assert_eq!(i.flags.map(|f| f & libc::O_ACCMODE), Some(libc::O_RDWR));
        assert_eq!(parse_fdinfo(""), FdInfo::default());
    }

    #[test]
    fn tgid_from_status() {
        let status = "Name:\tworker\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t22503\n\
                      Ngid:\t0\nPid:\t22547\nPPid:\t1\nTracerPid:\t0\n";
        assert_eq!(parse_tgid(status), Some(22503));
        assert_eq!(parse_tgid("Name:\tx\nPid:\t1\n"), None);
        assert_eq!(parse_tgid("Tgid:\tnope\n"), None);
    }

    #[test]
    fn start_time_after_the_last_paren() {
        assert_eq!(parse_start_time(&stat_line(42, "sleep", 987654)), Some(987654));
        // comm with spaces and parentheses must not shift the fields.
        assert_eq!(parse_start_time(&stat_line(42, "a) (b c) S 1", 55)), Some(55));
        assert_eq!(parse_start_time(&stat_line(42, "", 7)), Some(7));
        assert_eq!(parse_start_time("42 (sleep) S 1 42 42 0"), None);
        assert_eq!(parse_start_time("42 sleep S 1"), None);
        assert_eq!(parse_start_time(""), None);
    }

    #[test]
    fn instance_from_cmdline() {
        assert_eq!(parse_instance(&qemu_cmdline()).as_deref(), Some("instance-0000002a"));
        assert_eq!(
            parse_instance(&argv(&[
                "qemu-system-x86_64",
                "-name",
                "instance-0000002a",
                "-m",
                "512"
            ]))
            .as_deref(),
            Some("instance-0000002a")
        );
        assert_eq!(
            parse_instance(&argv(&["qemu", "-name", "instance-0000002b,debug-threads=on"]))
                .as_deref(),
            Some("instance-0000002b")
        );
        assert_eq!(
            parse_instance(&argv(&["qemu", "-name", "process=qemu:vm,guest=instance-0000002c"]))
                .as_deref(),
            Some("instance-0000002c")
        );
        // ",," is QEMU's escaped comma; "--name" is accepted as well.
        assert_eq!(
            parse_instance(&argv(&["qemu", "--name", "guest=a,,b,debug-threads=on"])).as_deref(),
            Some("a,b")
        );
        // No -name: the -uuid value.
        assert_eq!(
            parse_instance(&argv(&["qemu", "-uuid", "6a3c2e8e-6f0a-4b8e-9c55-2f1d3a4b5c6d"]))
                .as_deref(),
            Some("6a3c2e8e-6f0a-4b8e-9c55-2f1d3a4b5c6d")
        );
        // A -name without a guest name falls back to -uuid too.
        assert_eq!(
            parse_instance(&argv(&["qemu", "-name", "debug-threads=on", "-uuid", "u-1"]))
                .as_deref(),
            Some("u-1")
        );
        assert_eq!(parse_instance(&argv(&["qemu-img", "info", "/x"])), None);
        // Any user chooses a command line: what is kept of it is bounded.
        let long = "i".repeat(131_000);
        let kept = parse_instance(&argv(&["qemu", "-name", &long])).unwrap();
        assert_eq!(kept.len(), INSTANCE_MAX);
        assert_eq!(parse_instance(&argv(&["qemu", "-name"])), None);
        assert_eq!(parse_instance(b"qemu\x00-name"), None);
        assert_eq!(parse_instance(b""), None);
    }

    #[test]
    fn holder_of_a_qemu_thread() {
        let root = tempfile::tempdir().unwrap();
        fake_process(
            root.path(),
            TGID,
            TGID,
            Some("/usr/bin/qemu-system-x86_64"),
            "qemu-system-x86",
            &qemu_cmdline(),
            123456,
        );
        // A helper thread: its own status names the thread group, its comm is the thread's.
        fake_process(root.path(), TID, TGID, None, "call_rcu", b"", 999);
        let proc = ProcRoot(root.path().to_owned());
        let expected = Holder {
            pid: TGID,
            program: "qemu-system-x86_64".into(),
            instance: Some("instance-0000002a".into()),
            start_time: 123456,
        };
        assert_eq!(proc.holder(TID), Some(expected.clone()));
        assert_eq!(proc.holder(TGID), Some(expected));
    }

    #[test]
    fn holder_program_fallbacks() {
        let root = tempfile::tempdir().unwrap();
        let proc = ProcRoot(root.path().to_owned());
        // Executable replaced under the running process.
        fake_process(
            root.path(),
            9_000_010,
            9_000_010,
            Some("/usr/bin/qemu-img (deleted)"),
            "qemu-img",
            &argv(&["qemu-img", "info"]),
            1,
        );
        let h = proc.holder(9_000_010).unwrap();
        assert_eq!((h.program.as_str(), h.instance), ("qemu-img", None));
        // exe unreadable: comm (truncated to 15 bytes) still recognises a VM.
        fake_process(
            root.path(),
            9_000_011,
            9_000_011,
            None,
            "qemu-system-x86",
            &qemu_cmdline(),
            2,
        );
        let h = proc.holder(9_000_011).unwrap();
        assert_eq!(h.program, "qemu-system-x86");
        assert_eq!(h.instance.as_deref(), Some("instance-0000002a"));
        // RHEL's qemu-kvm with only -uuid.
        fake_process(
            root.path(),
            9_000_012,
            9_000_012,
            Some("/usr/libexec/qemu-kvm"),
            "qemu-kvm",
            &argv(&["/usr/libexec/qemu-kvm", "-uuid", "u-2"]),
            3,
        );
        assert_eq!(proc.holder(9_000_012).unwrap().instance.as_deref(), Some("u-2"));
        // Not a VM: a -name argument means nothing.
        fake_process(
            root.path(),
            9_000_013,
            9_000_013,
            Some("/usr/bin/python3"),
            "python3",
            &argv(&["python3", "-name", "x"]),
            4,
        );
        assert_eq!(proc.holder(9_000_013).unwrap().instance, None);
    }

    #[test]
    fn holder_of_a_gone_process() {
        let root = tempfile::tempdir().unwrap();
        let proc = ProcRoot(root.path().to_owned());
        assert_eq!(proc.holder(TID), None);
        // The thread's status names a thread group that is gone.
        fake_process(root.path(), TID, TGID, None, "call_rcu", b"", 999);
        assert_eq!(proc.holder(TID), None);
        // A half-gone process (stat vanished) is gone.
        let dir = fake_process(root.path(), TGID, TGID, Some("/usr/bin/sleep"), "sleep", b"", 5);
        assert!(proc.holder(TID).is_some());
        fs::remove_file(dir.join("stat")).unwrap();
        assert_eq!(proc.holder(TID), None);
    }

    /// Adds descriptor `fd` of fake process `dir`: its link target and its fdinfo.
    fn fake_fd(dir: &Path, fd: u32, target: &Path, mnt: u64, ino: u64, flags: &str) {
        fs::create_dir_all(dir.join("fdinfo")).unwrap();
        symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
        fs::write(
            dir.join("fdinfo").join(fd.to_string()),
            format!("pos:\t0\nflags:\t{flags}\nmnt_id:\t{mnt}\nino:\t{ino}\n"),
        )
        .unwrap();
    }

    /// Mount 50: the covered filesystem (8:1); 60: our own overlay (0:77); 70: an earlier
    /// overlay (0:66); 80: some other filesystem (0:99).
    fn fake_mounts(dir: &Path) {
        fs::create_dir_all(dir.join("ns")).unwrap();
        symlink("mnt:[4026531841]", dir.join("ns/mnt")).unwrap();
        fs::write(
            dir.join("mountinfo"),
            "50 1 8:1 / / rw - ext4 /dev/vda rw\n\
             60 50 0:77 / /c/_base rw - fuse.imagecachefs imagecachefs rw\n\
             70 50 0:66 / /old/_base rw - fuse.imagecachefs imagecachefs rw\n\
             80 50 0:99 / /other rw - nfs4 srv:/x rw\n",
        )
        .unwrap();
    }

    #[test]
    fn holders_in_a_fake_tree() {
        let root = tempfile::tempdir().unwrap();
        let proc = ProcRoot(root.path().to_owned());
        let dir = fake_process(
            root.path(),
            TGID,
            TGID,
            Some("/usr/bin/qemu-system-x86_64"),
            "qemu-system-x86",
            &qemu_cmdline(),
            77,
        );
        fake_mounts(&dir);
        let base = Path::new("/c/_base/base");
        // Two descriptors on the same file count once, a writer makes it a writer.
        fake_fd(&dir, 3, base, 50, 11, "0100000");
        fake_fd(&dir, 4, base, 50, 11, "0100002");
        // On our own mount: counted by handle, not here. O_PATH: a daemon's node handle.
        fake_fd(&dir, 5, Path::new("/c/_base/other"), 60, 12, "0100000");
        fake_fd(&dir, 6, Path::new("/c/_base/other"), 50, 12, "012100000");
        // Same inode number on another filesystem; a socket.
        fake_fd(&dir, 7, Path::new("/other/base"), 80, 12, "0100000");
        fake_fd(&dir, 8, Path::new("socket:[1234]"), 80, 12, "02");
        // Through an earlier overlay: by inode and name.
        fake_fd(&dir, 9, Path::new("/old/_base/third (deleted)"), 70, 13, "0100000");
        fake_fd(&dir, 10, Path::new("/old/_base/renamed"), 70, 14, "0100000");
        // Our own process is never a holder.
        let me = std::process::id();
        let mine = fake_process(root.path(), me, me, Some("/x/me"), "me", b"", 1);
        fake_mounts(&mine);
        fake_fd(&mine, 3, base, 50, 11, "0100000");

        let files = HashMap::from([
            (11, OsString::from("base")),
            (12, OsString::from("other")),
            (13, OsString::from("third")),
            (14, OsString::from("fourth")),
        ]);
        let want =
            Wanted { dev: libc::makedev(8, 1), files: &files, own_dev: Some(libc::makedev(0, 77)) };
        let mut found = proc.holders_of(&want).unwrap();
        found.sort_by_key(|h| h.ino);
        let got: Vec<(u64, &str, bool)> =
            found.iter().map(|h| (h.ino, h.name.to_str().unwrap(), h.write)).collect();
        assert_eq!(got, [(11, "base", true), (13, "third", false)], "{found:?}");
        assert_eq!(found[0].holder.pid, TGID);
        assert_eq!(found[0].holder.instance.as_deref(), Some("instance-0000002a"));
        let none = HashMap::new();
        assert!(proc.holders_of(&Wanted { files: &none, ..want }).unwrap().is_empty());
        // Before the mount there is no own device: the same descriptor then counts.
        let found = proc.holders_of(&Wanted { own_dev: None, ..want }).unwrap();
        assert!(found.iter().any(|h| h.ino == 12), "{found:?}");
        // No /proc at all: the walk cannot vouch for anything.
        let gone = ProcRoot(root.path().join("nonexistent"));
        assert!(gone.holders_of(&want).is_err());
    }

    #[test]
    fn holder_of_our_own_thread() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let h = ProcRoot::default().holder(tid).expect("our own process is alive");
        assert_eq!(h.pid, std::process::id());
        assert!(h.start_time > 0);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(h.program, exe.file_name().unwrap().to_string_lossy());
    }

    /// Kills and reaps the child on drop, so a failed assertion leaves no `sleep` behind.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn finds_a_real_process_holding_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0d5e6b61602d758984b3bf038267614d6016eb2a");
        fs::write(&path, b"image").unwrap();
        let ino = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&path).unwrap().ino()
        };
        let probe = fs::File::open(dir.path()).unwrap();
        let proc = ProcRoot::default();
        let dev = proc
            .mount_dev_of(std::os::fd::AsRawFd::as_raw_fd(&probe))
            .expect("our own descriptor's mount");
        let mut child = Reaped(
            Command::new("sh")
                .args(["-c", r#"exec 3<"$1"; exec sleep 30"#, "sh"])
                .arg(&path)
                .spawn()
                .expect("spawn sh -c 'exec sleep 30'"),
        );
        let pid = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let files = HashMap::from([(ino, OsString::from("image"))]);
        let want = Wanted { dev, files: &files, own_dev: None };
        let holder = loop {
            let found = proc.holders_of(&want).unwrap();
            // Until `sh` has exec'd, the holder's program is `sh`.
            if let Some(held) = found.iter().find(|h| h.holder.program == "sleep") {
                assert_eq!(found.len(), 1, "{found:?}");
                assert_eq!(held.name, "image");
                assert!(!held.write, "opened read-only");
                break held.holder.clone();
            }
            assert!(Instant::now() < deadline, "sleep {pid} not found holding the file: {found:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(holder.pid, pid);
        assert_eq!(holder.instance, None);
        let elsewhere = HashMap::from([(ino.wrapping_add(1), OsString::from("image"))]);
        assert!(proc.holders_of(&Wanted { files: &elsewhere, ..want }).unwrap().is_empty());

        child.0.kill().unwrap();
        child.0.wait().unwrap();
        assert!(proc.holders_of(&want).unwrap().iter().all(|h| h.holder.pid != pid));
        // Gone, or (if the pid was recycled already) another process.
        assert_ne!(proc.holder(pid).map(|h| h.start_time), Some(holder.start_time));
    }
}
