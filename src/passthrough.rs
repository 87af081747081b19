//! Kernel FUSE passthrough backing ids, managed explicitly.
//!
//! A backing id tells the kernel which covered file serves the reads and writes of a FUSE
//! inode, so the data path never reaches the daemon. Ids are opened and closed here by hand
//! (not by a `Drop`), because the kernel allows one backing file per inode while it has opens,
//! and a later daemon taking over the `/dev/fuse` connection must be able to find and close
//! the ids this one left open.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// `_IOW(229, 2, uint32_t)`: `FUSE_DEV_IOC_BACKING_CLOSE` from `<linux/fuse.h>`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// The `/dev/fuse` connection the ids belong to.
#[derive(Debug)]
pub struct Passthrough {
    dev: OwnedFd,
}

impl Passthrough {
    pub fn new(dev: OwnedFd) -> Self {
        Passthrough { dev }
    }

    /// Registers the covered file behind `fd` (an `O_PATH` fd is enough) and returns its id.
    pub fn open(&self, fd: BorrowedFd<'_>) -> io::Result<u32> {
        fuser::BackingId::create_raw(&self.dev, fd)
    }

    pub fn close(&self, id: u32) -> io::Result<()> {
        let rc = unsafe {
            libc::ioctl(self.dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id as *const u32)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
