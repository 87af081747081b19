//! The command line: clap lives here and nowhere else.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{
    parse_bounded, parse_secs, MinFree, MountConfig, StorageChoice, MAX_RATE_MIB, THREADS,
};
use crate::state::Policy;

#[derive(Parser, Debug)]
#[command(
    name = "imagecachefs",
    version,
    about = "FUSE overlay for OpenStack Nova's image cache: live references, status files, \
             checksums and lazy eviction, with the data path left to the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log detail (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

// Parsed once per process: the size of the `mount` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount imagecachefs over DIR (DIR is both the source and the mount point).
    Mount(MountArgs),
    /// Detach the imagecachefs mount at DIR; its daemon exits after the last open file closes.
    Unmount {
        /// The mounted cache directory.
        dir: PathBuf,
    },
    /// Replace the running server and its supervisor with the binary now on disk (an
    /// upgrade), without unmounting: open files, references and holders carry over.
    Restart {
        /// The mounted cache directory.
        dir: PathBuf,
    },
    /// Print the journal formats this binary can take over (used by `restart`).
    #[command(hide = true)]
    JournalFormats,
    /// Print the status table (or JSON) of a mounted cache.
    Status {
        /// The mounted cache directory.
        dir: PathBuf,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Keep NAME from being evicted (root only; persists across restarts).
    Pin(Target),
    /// Undo `pin`.
    Unpin(Target),
    /// Re-verify NAME's SHA-1 now.
    Verify(Target),
    /// Evict NAME now; refused if it is in use, being written, pinned or referenced.
    Evict(Target),
    /// Write the man pages (imagecachefs(8), one per command, mount.fuse.imagecachefs(8))
    /// into DIR; the package build runs it.
    #[command(hide = true)]
    Man {
        /// Where the pages go (created if missing).
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct Target {
    /// The mounted cache directory.
    pub dir: PathBuf,
    /// A cache file's name (no `/`).
    pub name: std::ffi::OsString,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The cache directory, e.g. /var/lib/nova/instances/_base.
    pub dir: PathBuf,

    /// Return once the mount is live and leave the daemon running.
    #[arg(long, help_heading = "Process")]
    pub background: bool,

    /// Check the configuration (flags, nova.conf, instances directory) and exit: prints the
    /// effective settings, mounts nothing.
    #[arg(long, help_heading = "Process")]
    pub check: bool,

    /// FUSE worker threads, 1 to 64 (only metadata reaches the daemon; data is the kernel's).
    #[arg(long, value_name = "N", default_value_t = 2, help_heading = "Process",
          value_parser = parse_threads, allow_negative_numbers = true)]
    pub threads: u64,

    /// Append the log to FILE instead of standard error.
    #[arg(long, value_name = "FILE", help_heading = "Process")]
    pub log_file: Option<PathBuf>,

    /// Serve every read and write through the daemon instead of kernel passthrough (several
    /// times slower; for troubleshooting, or where passthrough cannot work).
    #[arg(long, help_heading = "Process")]
    pub no_passthrough: bool,

    /// Create DIR when it does not exist yet (a fresh node where Nova has not made _base),
    /// owned like its parent, the instances directory, with the parent's mode.
    #[arg(long, help_heading = "Process")]
    pub create_dir: bool,

    /// The SELinux label of every file in the mount (the context= mount option), e.g.
    /// system_u:object_r:virt_content_t:s0; needs SELinux.
    #[arg(long, value_name = "CONTEXT", help_heading = "Process", value_parser = parse_context)]
    pub context: Option<String>,

    /// Idle age after which originals, ephemeral and swap files go (default 86400).
    #[arg(long, value_name = "SECS", help_heading = "Eviction", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub original_min_age: Option<u64>,

    /// Idle age after which resized and unrecognised files go (default 3600).
    #[arg(long, value_name = "SECS", help_heading = "Eviction", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub resized_min_age: Option<u64>,

    /// Idle age after which stale .part/.converted files with no writer go (default 3600).
    #[arg(long, value_name = "SECS", help_heading = "Eviction", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub partial_min_age: Option<u64>,

    /// Never evict by age (corrupt files still go once unused).
    #[arg(long, help_heading = "Eviction")]
    pub no_evict: bool,

    /// Read the settings above from nova.conf ([image_cache] and legacy names); flags win.
    #[arg(long, value_name = "FILE", help_heading = "Eviction")]
    pub nova_conf: Option<PathBuf>,

    /// Where instance directories live, for the backing-file guard [default: DIR's parent].
    #[arg(long, value_name = "DIR", help_heading = "Eviction")]
    pub instances_dir: Option<PathBuf>,

    /// Keep at least this much free on the cache filesystem by evicting least recently used
    /// unreferenced files first (e.g. 20G or 10%).
    #[arg(long, value_name = "SIZE|PCT", value_parser = MinFree::parse, help_heading = "Eviction",
          allow_hyphen_values = true)]
    pub min_free: Option<MinFree>,

    /// Under disk pressure, never evict a file idle for less than this.
    #[arg(long, value_name = "SECS", default_value_t = 600, help_heading = "Eviction",
          value_parser = parse_secs, allow_negative_numbers = true)]
    pub pressure_min_age: u64,

    /// Re-verify each file's SHA-1 this often [default: 86400, or nova.conf's
    /// checksum_interval_seconds].
    #[arg(long, value_name = "SECS", help_heading = "Checksums", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub verify_interval: Option<u64>,

    /// Read rate limit of the checksum thread, up to 1048576 (0: unlimited).
    #[arg(long, value_name = "MiB/s", default_value_t = 64, help_heading = "Checksums",
          value_parser = parse_rate, allow_negative_numbers = true)]
    pub verify_rate: u64,

    /// Whether other hosts share the cache directory [default: detected from the filesystem
    /// type: NFS, CephFS, GlusterFS, GPFS, Lustre, OCFS2, GFS2, CIFS, 9p, virtiofs and FUSE
    /// filesystems are shared]. On shared storage nothing is evicted.
    #[arg(long, value_name = "KIND", value_enum, help_heading = "Eviction")]
    pub storage: Option<Storage>,

    /// Serve the metrics status file over HTTP at http://ADDR:PORT/metrics for Prometheus
    /// (e.g. 127.0.0.1:9477; [::]:9477 for every address). Off by default.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen, help_heading = "Monitoring")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// On shared storage, coordinate eviction with the other hosts through the filesystem's
    /// own locks (each host holds a shared lock on what it uses; a file goes only once no
    /// host has held it for --shared-quarantine).
    #[arg(long, help_heading = "Shared storage")]
    pub shared: bool,

    /// With --shared: how long a file must be seen unlocked by every host before any host
    /// evicts it.
    #[arg(long, value_name = "SECS", default_value_t = crate::config::SHARED_QUARANTINE,
          help_heading = "Shared storage", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub shared_quarantine: u64,

    /// This host's name for its own files on shared storage (its state file), letters,
    /// digits, '.', '-' and '_' [default: /etc/machine-id, else the hostname].
    #[arg(long, value_name = "NAME", help_heading = "Shared storage",
          value_parser = crate::config::parse_node_name)]
    pub node_name: Option<String>,
}

/// `--metrics-listen`: an IP address and a port other than 0 (no host names: the listener
/// binds before anything is resolved, and must bind where it is told).
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        Ok(_) => Err(format!("{s:?}: give a port other than 0")),
        Err(_) => Err(format!(
            "{s:?} is not ADDR:PORT with an IP address (like 127.0.0.1:9477 or [::1]:9477)"
        )),
    }
}

/// `--storage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    /// Only this host uses the cache directory: evict as configured.
    Local,
    /// Other hosts may use the files: evict nothing.
    Shared,
}

fn parse_threads(s: &str) -> Result<u64, String> {
    parse_bounded(s, THREADS)
}

fn parse_rate(s: &str) -> Result<u64, String> {
    parse_bounded(s, 0..=MAX_RATE_MIB)
}

/// An SELinux context goes into the mount options as `context="..."`: no quote, no control
/// character, at most a page.
fn parse_context(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 4096 || s.chars().any(|c| c == '"' || c.is_control()) {
        return Err(format!(
            "{s:?} is not an SELinux context (like system_u:object_r:virt_content_t:s0)"
        ));
    }
    Ok(s.to_owned())
}

impl MountArgs {
    /// Resolves the options: a flag wins over nova.conf, which wins over Nova's defaults.
    pub fn into_config(mut self) -> Result<MountConfig, String> {
        // The daemon works from `/`: every path it keeps is made absolute here.
        for p in
            [&mut self.nova_conf, &mut self.log_file, &mut self.instances_dir].into_iter().flatten()
        {
            *p = std::path::absolute(&*p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        let nova = match &self.nova_conf {
            Some(path) => crate::novaconf::load(path).map_err(|e| e.to_string())?,
            None => Default::default(),
        };
        // An instances directory that does not exist would leave the backing-file guard
        // unable to read any disk, and so age eviction silently off: refuse it now.
        let instances_dir = match (self.instances_dir, nova.instances_path) {
            (Some(flag), _) => Some((flag, "--instances-dir".to_owned())),
            (None, Some(conf)) => Some((
                PathBuf::from(conf),
                format!(
                    "instances_path in {}",
                    self.nova_conf.as_deref().unwrap_or(Path::new("nova.conf")).display()
                ),
            )),
            (None, None) => None,
        };
        if let Some((dir, from)) = &instances_dir {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("{} ({from}) is not a directory", dir.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!("{} ({from}) does not exist", dir.display()))
                }
                Err(e) => return Err(format!("{} ({from}): {e}", dir.display())),
            }
        }
        if self.context.is_some() {
            crate::setup::selinux_enabled()?;
        }
        let d = Policy::default();
        let policy = Policy {
            original_min_age: self
                .original_min_age
                .or(nova.original_min_age)
                .unwrap_or(d.original_min_age),
            resized_min_age: self
                .resized_min_age
                .or(nova.resized_min_age)
                .unwrap_or(d.resized_min_age),
            partial_min_age: self.partial_min_age.unwrap_or(d.partial_min_age),
            // Not nova.conf's remove_unused_base_images: operators set it to False so that
            // Nova's own scanner stops deleting, which must not switch off ours.
            evict: !self.no_evict,
            // Decided at mount, once the filesystem is known.
            shared: None,
            coordinated: self.shared,
        };
        if self.shared && self.shared_quarantine == 0 {
            // A replaced server takes its locks again within milliseconds: only a quarantine
            // keeps another host from evicting in that gap.
            return Err("--shared-quarantine 0 with --shared: another host could evict a file \
                        in use here while this host's server is being replaced; give 1 or more"
                .into());
        }
        Ok(MountConfig {
            dir: self.dir,
            background: self.background,
            threads: self.threads as usize,
            check: self.check,
            passthrough: !self.no_passthrough,
            log_file: self.log_file,
            policy,
            instances_dir: instances_dir.map(|(dir, _)| dir),
            min_free: self.min_free,
            pressure_min_age: self.pressure_min_age,
            verify_interval: self.verify_interval.or(nova.checksum_interval).unwrap_or(86_400),
            storage: match self.storage {
                None => StorageChoice::Detect,
                Some(Storage::Local) => StorageChoice::Local,
                Some(Storage::Shared) => StorageChoice::Shared,
            },
            nova_subdirectory: nova.subdirectory_name,
            nova_scanner_on: self.nova_conf.is_some()
                && nova.remove_unused_base_images != Some(false),
            verify_rate_mib: self.verify_rate,
            nova_conf: self.nova_conf,
            metrics_listen: self.metrics_listen,
            create_dir: self.create_dir,
            context: self.context,
            shared_quarantine: self.shared_quarantine,
            node_name: self.node_name,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Man pages, generated from the definitions above so that they never drift from `--help`.

/// Section 8: system administration commands.
const MAN_SECTION: &str = "8";
/// The mount(8) helper of `mount-scripts/`, documented from the `mount` flags it maps.
pub const HELPER: &str = "mount.fuse.imagecachefs";

/// Writes imagecachefs.8, imagecachefs-COMMAND.8 for each command, and
/// mount.fuse.imagecachefs.8 into `dir`; returns the files written.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(man(sub.clone()).generate_to(dir)?);
    }
    written.push(man(cmd.clone()).generate_to(dir)?);
    let mount = cmd.find_subcommand("mount").expect("the mount command").clone();
    let path = dir.join(format!("{HELPER}.{MAN_SECTION}"));
    std::fs::write(&path, helper_page(&mount)?)?;
    written.push(path);
    Ok(written)
}

fn man(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd).section(MAN_SECTION).manual("imagecachefs")
}

/// The `-o` option the fstab helper maps to a `mount` flag: `--min-free` is `min_free`.
pub fn helper_option(flag: &str) -> String {
    flag.trim_start_matches('-').replace('-', "_")
}

/// mount.fuse.imagecachefs(8): its own arguments, then one `-o` option per `mount` flag.
fn helper_page(mount: &clap::Command) -> std::io::Result<String> {
    use clap::{Arg, ArgAction};
    use roff::{bold, italic, roman, Roff};
    let helper = clap::Command::new(HELPER)
        .version(env!("CARGO_PKG_VERSION"))
        .about("mount(8) helper for /etc/fstab entries of type fuse.imagecachefs")
        .long_about(
            "mount(8) runs this helper for /etc/fstab entries (and `mount -t fuse.imagecachefs`) \
             of type fuse.imagecachefs. imagecachefs is mounted over the cache directory \
             itself, so SOURCE must be the same directory as DIR. The helper checks the \
             options with `imagecachefs mount DIR --check FLAGS`, detaches a dead mount left \
             by a killed daemon, leaves a live one as it is, then runs `imagecachefs mount \
             DIR --background FLAGS` and returns once the mount is live. The binary is \
             $IMAGECACHEFS_BIN if set, else /usr/bin/imagecachefs where the package \
             installed the helper, else imagecachefs on PATH. Exit status: 0 mounted (or \
             already mounted), 1 bad usage or option, 32 the mount failed.",
        )
        .disable_version_flag(true)
        .arg(Arg::new("source").value_name("SOURCE").required(true).help("The cache directory"))
        .arg(Arg::new("dir").value_name("DIR").required(true).help("The same directory"))
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTIONS")
                .help("Comma-separated filesystem options (see FILESYSTEM OPTIONS)"),
        )
        .arg(
            Arg::new("sloppy")
                .short('s')
                .action(ArgAction::SetTrue)
                .help("Sloppy: ignore unknown options with a warning instead of refusing them"),
        )
        .arg(
            Arg::new("fake")
                .short('f')
                .action(ArgAction::SetTrue)
                .help("Fake: print the command that would run, mount nothing"),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .action(ArgAction::SetTrue)
                .help("Print the command before running it"),
        )
        .arg(Arg::new("no-mtab").short('n').action(ArgAction::SetTrue).help("Accepted (no mtab)"))
        .arg(
            Arg::new("type")
                .short('t')
                .value_name("TYPE")
                .help("Checked: fuse.imagecachefs or imagecachefs"),
        );
    let page = man(helper);
    let mut out = Vec::new();
    page.render_title(&mut out)?;
    page.render_name_section(&mut out)?;
    page.render_synopsis_section(&mut out)?;
    page.render_description_section(&mut out)?;
    page.render_options_section(&mut out)?;
    let mut roff = Roff::new();
    roff.control("SH", ["FILESYSTEM OPTIONS"]);
    roff.text([roman(
        "Each option becomes the imagecachefs mount flag of the same name (see \
         imagecachefs-mount(8)); values are checked by imagecachefs itself before anything \
         is mounted. An option given twice counts once, with its last value: mount(8) puts \
         the fstab entry's options before those of mount -o, which so override them.",
    )]);
    for arg in mount.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if ["background", "check", "help", "verbose"].contains(&long) {
            continue;
        }
        let name = helper_option(long);
        let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
        roff.control("TP", []);
        match arg.get_value_names().and_then(|v| v.first()).filter(|_| takes_value) {
            Some(v) => roff.text([bold(format!("{name}=")), italic(v.to_string())]),
            None => roff.text([bold(name)]),
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        roff.text([roman(format!("--{long}: {help}"))]);
    }
    roff.control("TP", []);
    roff.text([bold(
        "rw, defaults, auto, noauto, nodev, nosuid, user, nouser, _netdev, nofail, x-*, comment=*",
    )]);
    roff.text([roman(
        "Accepted and ignored (the mount is always nodev,nosuid). ro is refused: Nova, \
         libvirt and QEMU write into the cache. Any other option is refused unless -s is given.",
    )]);
    roff.control("SH", ["EXAMPLE"]);
    roff.text([roman(
        "/var/lib/nova/instances/_base /var/lib/nova/instances/_base fuse.imagecachefs \
         nova_conf=/etc/nova/nova.conf,create_dir,log_file=/var/log/imagecachefs.log 0 0",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman("imagecachefs(8), imagecachefs-mount(8), mount(8), fstab(5)")]);
    roff.to_writer(&mut out)?;
    page.render_version_section(&mut out)?;
    String::from_utf8(out).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_defaults() {
        let cli = Cli::try_parse_from(["imagecachefs", "mount", "/x"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let c = m.into_config().unwrap();
        assert_eq!(c.dir, PathBuf::from("/x"));
        assert!(!c.background);
        assert_eq!(c.threads, 2);
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.verify_rate_mib, 64);
    }

    #[test]
    fn flags_set_the_policy() {
        let cli = Cli::try_parse_from([
            "imagecachefs",
            "mount",
            "/x",
            "--original-min-age",
            "5",
            "--resized-min-age",
            "6",
            "--partial-min-age",
            "7",
            "--no-evict",
            "--min-free",
            "10%",
        ])
        .unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let c = m.into_config().unwrap();
        assert_eq!((c.policy.original_min_age, c.policy.resized_min_age), (5, 6));
        assert_eq!(c.policy.partial_min_age, 7);
        assert!(!c.policy.evict);
        assert_eq!(c.min_free, Some(MinFree::Percent(10.0)));
    }

    fn parse_error(args: &[&str]) -> String {
        let mut all = vec!["imagecachefs", "mount", "/x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect_err("refused").render().to_string()
    }

    #[test]
    fn every_number_is_bounded_where_it_is_parsed() {
        use crate::config::MAX_SECS;
        let max = MAX_SECS.to_string();
        for flag in [
            "--original-min-age",
            "--resized-min-age",
            "--partial-min-age",
            "--pressure-min-age",
            "--verify-interval",
            "--shared-quarantine",
        ] {
            for bad in ["18446744073709551615", "9223372036854775807", "315360001", "-5"] {
                let e = parse_error(&[flag, bad]);
                assert!(
                    e.contains("is not a whole number from 0 to 315360000"),
                    "{flag} {bad}: {e}"
                );
                assert!(!e.contains("-- -5"), "{flag} {bad}: no clap tip: {e}");
            }
            let ok = Cli::try_parse_from(["imagecachefs", "mount", "/x", flag, &max]);
            assert!(ok.is_ok(), "{flag} {max} is accepted");
        }
        assert!(parse_error(&["--verify-rate", "1048577"]).contains("from 0 to 1048576"));
        assert!(parse_error(&["--threads", "65"]).contains("from 1 to 64"));
        assert!(parse_error(&["--threads", "-1"]).contains("from 1 to 64"));
        assert!(parse_error(&["--min-free", "-5%"]).contains("from 0 up to (not including) 100"));
        assert!(parse_error(&["--min-free", "200%"]).contains("from 0 up to (not including) 100"));
        assert!(parse_error(&["--min-free", "-5"]).contains("is not a size"));
    }

    #[test]
    fn a_missing_instances_dir_is_refused() {
        let cli = Cli::try_parse_from([
            "imagecachefs",
            "mount",
            "/x",
            "--instances-dir",
            "/nonexistent-icfs-instances",
        ])
        .unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let e = m.into_config().unwrap_err();
        assert_eq!(e, "/nonexistent-icfs-instances (--instances-dir) does not exist");
    }

    #[test]
    fn metrics_listen_takes_an_ip_address_and_a_port() {
        let parse = |v: &str| {
            Cli::try_parse_from(["imagecachefs", "mount", "/x", "--metrics-listen", v]).map(|c| {
                let Command::Mount(m) = c.command else { panic!("not mount") };
                m.into_config().unwrap().metrics_listen
            })
        };
        assert_eq!(parse("127.0.0.1:9477").unwrap(), Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(parse("[::1]:9477").unwrap(), Some("[::1]:9477".parse().unwrap()));
        for bad in ["localhost:9477", "127.0.0.1", "9477", ":9477", "127.0.0.1:70000", ""] {
            let e = parse_error(&["--metrics-listen", bad]);
            assert!(e.contains("is not ADDR:PORT"), "{bad}: {e}");
        }
        assert!(parse_error(&["--metrics-listen", "127.0.0.1:0"]).contains("other than 0"));
        let cli = Cli::try_parse_from(["imagecachefs", "mount", "/x"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        assert_eq!(m.into_config().unwrap().metrics_listen, None, "off by default");
    }

    #[test]
    fn shared_coordination_is_off_by_default() {
        let config = |args: &[&str]| {
            let mut all = vec!["imagecachefs", "mount", "/x"];
            all.extend_from_slice(args);
            let Command::Mount(m) = Cli::try_parse_from(all).unwrap().command else {
                panic!("not mount")
            };
            m.into_config().unwrap()
        };
        let off = config(&[]);
        assert!(!off.policy.coordinated);
        assert_eq!(off.shared_quarantine, crate::config::SHARED_QUARANTINE);
        let on = config(&["--shared", "--shared-quarantine", "60"]);
        assert!(on.policy.coordinated);
        assert_eq!(on.shared_quarantine, 60);
        let zero = Cli::try_parse_from(["imagecachefs", "mount", "/x", "--shared"])
            .ok()
            .and_then(|c| match c.command {
                Command::Mount(m) => Some(m),
                _ => None,
            })
            .map(|mut m| {
                m.shared_quarantine = 0;
                m.into_config().unwrap_err()
            });
        assert!(zero.is_some_and(|e| e.contains("--shared-quarantine 0")));
        assert_eq!(config(&["--node-name", "node-a.1"]).node_name.as_deref(), Some("node-a.1"));
        for bad in ["", "a/b", "tmp", "a b", &"x".repeat(65)] {
            assert!(parse_error(&["--node-name", bad]).contains("is not a node name"), "{bad}");
        }
    }

    #[test]
    fn bad_thread_count_is_a_usage_error() {
        assert!(Cli::try_parse_from(["imagecachefs", "mount", "/x", "--threads", "0"]).is_err());
    }

    #[test]
    fn man_pages_name_every_flag_and_the_helper_every_option() {
        use clap::CommandFactory;
        let tmp = tempfile::tempdir().unwrap();
        let written = write_man_pages(tmp.path()).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for want in ["imagecachefs.8", "imagecachefs-mount.8", "mount.fuse.imagecachefs.8"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("-man.")), "the hidden command has no page");
        let read = |n: &str| std::fs::read_to_string(tmp.path().join(n)).unwrap();
        let (mount_page, helper_page) =
            (read("imagecachefs-mount.8"), read("mount.fuse.imagecachefs.8"));
        let script = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts").join(HELPER),
        )
        .unwrap();
        let cmd = Cli::command();
        let mount = cmd.find_subcommand("mount").unwrap();
        let mut options = 0;
        for long in mount.get_arguments().filter_map(|a| a.get_long()) {
            // roff escapes the dashes of flags.
            let escaped = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(mount_page.contains(&escaped), "--{long} in imagecachefs-mount.8");
            if ["background", "check", "help", "verbose"].contains(&long) {
                continue;
            }
            let option = helper_option(long);
            assert!(
                helper_page.contains(&option.replace('-', "\\-")),
                "{option} in the helper's page"
            );
            assert!(script.contains(&format!("        {option})")), "the helper maps {option}");
            options += 1;
        }
        assert!(options > 10, "only {options} helper options");
    }

    #[test]
    fn a_context_is_refused_where_selinux_is_off_and_a_bad_one_everywhere() {
        let bad = Cli::try_parse_from(["imagecachefs", "mount", "/x", "--context", "a\"b"]);
        assert!(bad.expect_err("refused").to_string().contains("is not an SELinux context"));
        let cli =
            Cli::try_parse_from(["imagecachefs", "mount", "/x", "--context", "u:r:t:s0"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        match (m.into_config(), crate::setup::selinux_enabled()) {
            (Ok(c), Ok(())) => assert_eq!(c.context.as_deref(), Some("u:r:t:s0")),
            (Err(e), Err(why)) => assert_eq!(e, why),
            (got, selinux) => panic!("{got:?} with SELinux {selinux:?}"),
        }
    }
}
