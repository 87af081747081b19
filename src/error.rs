//! The one error type of the filesystem core and its errno mapping.
//!
//! `errno()` is an exhaustive `match` with no catch-all arm: adding a variant forces a
//! decision. Errors from the covered filesystem travel as `Io` and keep their raw errno;
//! nothing is converted through `io::ErrorKind` (which would turn most errors into `EIO`).

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// An error from a syscall on the covered filesystem; carries its errno.
    Io(io::Error),
    /// A node id the kernel sent that this daemon does not know (forgotten, or never issued).
    UnknownNode(u64),
    /// A file handle this daemon does not know.
    BadHandle(u64),
    /// A name that may not be used here (contains `/`, is `.`/`..`, or is reserved).
    InvalidName,
    /// A name reserved by imagecachefs for its own use; refused as if absent.
    Reserved,
    /// An operation the daemon refuses on this node (e.g. crossing into another filesystem).
    NotSupported,
    /// A write to a read-only virtual file, or a non-root writer of the control file.
    AccessDenied,
    /// A control command refused (already logged with its reason); carries its errno.
    Refused(i32),
    /// Non-root readers hold too many status-file snapshots: try again after closing some.
    TooManySnapshots,
}

impl Error {
    /// The errno returned to the kernel for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::UnknownNode(_) => libc::ESTALE,
            Error::BadHandle(_) => libc::EBADF,
            Error::InvalidName => libc::EINVAL,
            Error::Reserved => libc::ENOENT,
            Error::NotSupported => libc::EOPNOTSUPP,
            Error::AccessDenied => libc::EACCES,
            Error::Refused(errno) => *errno,
            Error::TooManySnapshots => libc::EAGAIN,
        }
    }

    /// Expected, caller-caused failures log at debug (any user can repeat them as often as
    /// they like: a `stat` of a 300-byte name is not worth a line); the rest at warn.
    pub fn log_level(&self) -> log::Level {
        match self {
            Error::Io(e) => match e.raw_os_error() {
                Some(
                    libc::ENOENT
                    | libc::EEXIST
                    | libc::ENOTEMPTY
                    | libc::ENODATA
                    | libc::EACCES
                    | libc::EPERM
                    | libc::ENOTDIR
                    | libc::EISDIR
                    | libc::ENXIO
                    | libc::ERANGE
                    | libc::EOPNOTSUPP
                    | libc::ENOSYS
                    | libc::EINVAL
                    | libc::EXDEV
                    | libc::ENAMETOOLONG
                    | libc::ELOOP
                    | libc::EBUSY
                    | libc::ETXTBSY
                    | libc::EAGAIN
                    | libc::EINTR,
                ) => log::Level::Debug,
                _ => log::Level::Warn,
            },
            Error::Reserved
            | Error::InvalidName
            | Error::AccessDenied
            | Error::Refused(_)
            | Error::TooManySnapshots => log::Level::Debug,
            Error::UnknownNode(_) | Error::BadHandle(_) | Error::NotSupported => log::Level::Warn,
        }
    }

    /// The current thread's last OS error.
    pub fn last() -> Self {
        Error::Io(io::Error::last_os_error())
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::UnknownNode(n) => write!(f, "unknown node {n}"),
            Error::BadHandle(h) => write!(f, "unknown file handle {h:#x}"),
            Error::InvalidName => write!(f, "invalid name"),
            Error::Reserved => write!(f, "name reserved by imagecachefs"),
            Error::NotSupported => write!(f, "operation not supported here"),
            Error::AccessDenied => write!(f, "access denied"),
            Error::Refused(e) => write!(f, "refused ({})", io::Error::from_raw_os_error(*e)),
            Error::TooManySnapshots => write!(f, "too many status snapshots held open"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_errno() {
        let cases = [
            (Error::Io(io::Error::from_raw_os_error(libc::ENOSPC)), libc::ENOSPC),
            (Error::Io(io::Error::other("no errno")), libc::EIO),
            (Error::UnknownNode(7), libc::ESTALE),
            (Error::BadHandle(7), libc::EBADF),
            (Error::InvalidName, libc::EINVAL),
            (Error::Reserved, libc::ENOENT),
            (Error::NotSupported, libc::EOPNOTSUPP),
            (Error::AccessDenied, libc::EACCES),
            (Error::Refused(libc::EBUSY), libc::EBUSY),
            (Error::TooManySnapshots, libc::EAGAIN),
        ];
        for (e, errno) in cases {
            assert_eq!(e.errno(), errno, "{e:?}");
        }
    }

    #[test]
    fn expected_misses_are_quiet() {
        assert_eq!(
            Error::Io(io::Error::from_raw_os_error(libc::ENOENT)).log_level(),
            log::Level::Debug
        );
        assert_eq!(
            Error::Io(io::Error::from_raw_os_error(libc::EIO)).log_level(),
            log::Level::Warn
        );
        // Anyone can stat a name longer than NAME_MAX as often as they like.
        assert_eq!(
            Error::Io(io::Error::from_raw_os_error(libc::ENAMETOOLONG)).log_level(),
            log::Level::Debug
        );
        assert_eq!(Error::TooManySnapshots.log_level(), log::Level::Debug);
    }
}
