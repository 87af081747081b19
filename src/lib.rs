//! imagecachefs: a FUSE overlay mounted over Nova's image cache directory (`_base`).
//!
//! Module map: `cli` → `config` → `run` (wiring) → `fuse` (the only module that sees fuser's
//! requests and replies) → `fs` (the core: plain results) → `backing` (the only module that
//! makes syscalls on the covered files) and `passthrough` (kernel backing ids); `mount`
//! mounts over the directory itself and detaches.

pub mod backing;
pub mod cache;
pub mod checksums;
pub mod cli;
pub mod clock;
pub mod config;
pub mod disks;
pub mod error;
pub mod evict;
pub mod fs;
pub mod fuse;
pub mod guard;
pub mod journal;
pub mod kind;
pub mod mount;
pub mod novaconf;
pub mod passthrough;
pub mod procfs;
pub mod run;
pub mod state;
pub mod status;
pub mod supervise;
pub mod sync;
pub mod text;
pub mod verify;
