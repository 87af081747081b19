//! The one place the lock types come from, so they can be swapped (e.g. for a model checker).
pub use parking_lot::{Condvar, Mutex, RwLock};
