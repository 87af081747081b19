//! What the node needs before the mount, called once from `run::serve`: a missing cache
//! directory made the way Nova would make it (`--create-dir`), and the SELinux `context=`
//! option (`--context`), refused at once where the kernel has no SELinux to take it.
//!
//! Runs before anything is mounted, on no FUSE worker and under no lock; it creates at most
//! the one directory DIR and never touches what is in it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::config::MountConfig;
use crate::mount::{self, Prepared, Refusal};

/// Where the kernel shows SELinux when it is enabled.
const SELINUXFS: &str = "/sys/fs/selinux";

/// Checks and opens everything the mount needs, as [`mount::prepare`] does, after creating
/// a missing DIR when told to; carries the SELinux context into the mount options.
pub fn prepare(cfg: &MountConfig) -> Result<Prepared, Refusal> {
    if cfg.context.is_some() {
        selinux_enabled().map_err(Refusal)?;
    }
    if cfg.create_dir {
        create_missing(&cfg.dir)?;
    }
    let mut prepared = mount::prepare(&cfg.dir)?;
    prepared.context = cfg.context.clone();
    warn_if_not_host_pid_namespace();
    Ok(prepared)
}

/// The host's (initial) PID namespace, as `/proc/self/ns/pid` names it: its inode number is
/// fixed by the kernel (`PROC_PID_INIT_INO`).
const HOST_PID_NS: &str = "pid:[4026531836]";

/// A daemon in a container without the host's PID namespace (`--pid=host`) sees requests from
/// processes outside its namespace as pid 0, and its `/proc` walk cannot find holders from
/// before the mount there: said once, loudly, at start.
fn warn_if_not_host_pid_namespace() {
    let Ok(ns) = fs::read_link("/proc/self/ns/pid") else { return };
    if ns.as_os_str() != HOST_PID_NS {
        log::warn!(
            "not in the host's PID namespace ({}): opens by processes of other PID namespaces \
             are counted but shown as pid 0 \"unknown\" (no program, no instance), and files \
             they opened outside the mount are not found; run with the host's PID namespace \
             (podman/docker --pid=host, Kubernetes hostPID: true)",
            ns.display()
        );
    }
}

/// `--context` needs SELinux: without it the kernel would refuse the mount option (or, with
/// another security module, ignore it).
pub fn selinux_enabled() -> Result<(), String> {
    if Path::new(SELINUXFS).join("enforce").exists() {
        Ok(())
    } else {
        Err(format!("--context needs SELinux, which is not enabled here (no {SELINUXFS})"))
    }
}

/// Creates `dir` if it does not exist, with its parent's owner, group and mode (Nova makes
/// `_base` as its own user inside the instances directory). Anything else at `dir` is left
/// for [`mount::prepare`] to judge; a missing parent is refused.
fn create_missing(dir: &Path) -> Result<(), Refusal> {
    let shown = dir.display();
    let abs = match mount::absolute(dir) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Refusal(format!(
                "{shown}: its parent directory does not exist (--create-dir makes only the \
                 cache directory itself)"
            )))
        }
        Err(e) => return Err(Refusal(format!("{shown}: {e}"))),
    };
    match fs::symlink_metadata(&abs) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // There (or a mount, live or dead): prepare() says what it is.
        _ => return Ok(()),
    }
    let Some(parent) = abs.parent() else { return Ok(()) };
    let like = fs::metadata(parent).map_err(|e| Refusal(format!("{}: {e}", parent.display())))?;
    match fs::DirBuilder::new().mode(0o700).create(&abs) {
        Ok(()) => {}
        // Nova made it meanwhile: it is Nova's.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Refusal(format!("creating {shown}: {e}"))),
    }
    let mode = like.mode() & 0o7777;
    let fix = |f: &File| -> io::Result<()> {
        std::os::unix::fs::fchown(f, Some(like.uid()), Some(like.gid()))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
    };
    let opened =
        OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(&abs);
    if let Err(e) = opened.and_then(|f| fix(&f)) {
        // Leave nothing half made behind.
        let _ = fs::remove_dir(&abs);
        return Err(Refusal(format!("creating {shown}: {e}")));
    }
    log::info!(
        "created {} (owner {}:{}, mode {mode:o}, as its parent {})",
        abs.display(),
        like.uid(),
        like.gid(),
        parent.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_dir_is_made_like_its_parent_and_an_existing_one_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("instances");
        fs::create_dir(&parent).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o2751)).unwrap();
        let base = parent.join("_base");
        create_missing(&base).unwrap();
        let (made, like) = (fs::metadata(&base).unwrap(), fs::metadata(&parent).unwrap());
        assert!(made.is_dir());
        assert_eq!(made.mode() & 0o7777, like.mode() & 0o7777);
        assert_eq!((made.uid(), made.gid()), (like.uid(), like.gid()));
        // Already there: untouched.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).unwrap();
        create_missing(&base).unwrap();
        assert_eq!(fs::metadata(&base).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn a_missing_parent_is_refused_and_nothing_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("instances/_base");
        let e = create_missing(&base).unwrap_err().to_string();
        assert!(e.contains("its parent directory does not exist"), "{e}");
        assert!(!tmp.path().join("instances").exists());
    }
}
