//! Checksums of cache files: the SHA-1 recorded when writing ends and the background
//! re-verification read. This module owns hashing only — no scheduling, no state, no paths: it
//! is handed an open file and reads it through that descriptor with `pread`, from offset 0 to
//! end of file, in 1 MiB chunks.
//!
//! Invariants kept by [`sha1_file`]:
//! - **Paced**: over any interval, bytes read never exceed `rate × interval` plus one chunk, and
//!   a whole file takes at least `size / rate`. Time lost to a slow disk is not made up later
//!   with a burst.
//! - **Cancellable**: `cancel` is polled before every chunk and at least every 50 ms while
//!   sleeping, so a cancellation takes effect within one chunk plus one sleep slice.
//! - **Leaves the page cache as it found it**, as far as the kernel can tell. Plain
//!   `POSIX_FADV_DONTNEED` on each chunk (what other background readers do) would also drop the
//!   pages VMs are using, so instead each page's residency is taken with `mincore(2)` (on a
//!   transient read-only mapping, never touched) 32 MiB ahead of the read position, before this
//!   read could have pulled it in, and `DONTNEED` drops only pages that were not resident then:
//!   behind the read position in whole 2 MiB-aligned units (the largest page-cache folio; the
//!   kernel skips a folio a range only partly covers, so 1 MiB ranges would leave large folios
//!   cached), and the remainder, including readahead past the last chunk, on return (end of
//!   file, cancel, error). The look-ahead is needed because `POSIX_FADV_RANDOM` (set on the
//!   descriptor, reset to `POSIX_FADV_NORMAL` on return) stops only our own readahead: another
//!   reader's readahead mark in a resident page still starts async readahead on ours. Accepted
//!   costs: a page a VM pulls in after it was looked at is dropped (re-read later, never lost);
//!   if `mmap`/`mincore` fail, pages count as not resident (plain `DONTNEED`); the kernel
//!   reports pages of files the caller may not write as resident, so an unprivileged caller
//!   drops nothing (the daemon runs as root); `DONTNEED` never drops dirty pages; resident
//!   pages are hashed from the cache, not re-read from disk.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

/// Bytes per `pread`.
const CHUNK: usize = 1 << 20;
/// Longest sleep between two polls of `cancel`.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// Bytes per second, or unlimited.
///
/// `Rate(Some(0))` is unlimited too (the `--bwlimit=0` convention): a zero can never stall a
/// verification forever.
#[derive(Clone, Copy, Debug)]
pub struct Rate(pub Option<u64>);

/// Outcome of hashing a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hashed {
    Done([u8; 20]),
    Cancelled,
}

/// SHA-1 of everything `file` holds, read sequentially with `pread` in 1 MiB chunks from offset
/// 0 until `pread` returns 0, paced to `rate` and cancellable (see the module doc for the
/// guarantees and the page-cache policy). `file` must be open for reading; its readahead mode
/// is reset to `POSIX_FADV_NORMAL` on return, so give it a descriptor of its own. A read error
/// (`EIO` included) is returned as is: whether that means "corrupt" is the caller's call.
pub fn sha1_file(file: &File, rate: Rate, cancel: &dyn Fn() -> bool) -> io::Result<Hashed> {
    let mut cache = PageCache::new(file.as_raw_fd());
    let mut pacer = Pacer::new(rate);
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        if cancel() {
            return Ok(Hashed::Cancelled);
        }
        cache.prepare(off);
        let n = loop {
            match file.read_at(&mut buf, off) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(Hashed::Done(hasher.finalize().into()));
        }
        hasher.update(&buf[..n]);
        off += n as u64;
        cache.release(off);
        if pacer.charge(n, cancel) {
            return Ok(Hashed::Cancelled);
        }
    }
}

/// Pure: SHA-1 of a reader (no pacing).
pub fn sha1_of(mut r: impl Read) -> io::Result<[u8; 20]> {
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Lowercase hex digits (40 for a digest).
pub fn hex(d: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(d.len() * 2);
    for &b in d {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// The inverse of [`hex`]: exactly 40 lowercase hex digits, nothing else (no whitespace, no
/// uppercase, so every accepted string is canonical and round-trips).
pub fn parse_hex(s: &str) -> Option<[u8; 20]> {
    let s = s.as_bytes();
    if s.len() != 40 {
        return None;
    }
    let mut d = [0u8; 20];
    for (byte, pair) in d.iter_mut().zip(s.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(d)
}

// Hand-rolled: u8::from_str_radix would accept a leading '+'.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Paces reads to a rate: each chunk is charged its cost (`n / rate`) on a virtual clock that
/// never runs behind real time, and the reader waits until the virtual clock is reached.
struct Pacer {
    bytes_per_sec: Option<u64>,
    due: Instant,
}

impl Pacer {
    fn new(rate: Rate) -> Self {
        Pacer { bytes_per_sec: rate.0.filter(|&r| r > 0), due: Instant::now() }
    }

    /// Charges `n` bytes just read and sleeps until they are paid for; true if `cancel` fired.
    fn charge(&mut self, n: usize, cancel: &dyn Fn() -> bool) -> bool {
        let Some(rate) = self.bytes_per_sec else { return false };
        let nanos = n as u128 * 1_000_000_000 / u128::from(rate);
        let cost = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        // max(due, now - cost) + cost: credit from a stall is forgotten, so no catch-up burst.
        self.due = (self.due + cost).max(Instant::now());
        loop {
            let now = Instant::now();
            if now >= self.due {
                return false;
            }
            if cancel() {
                return true;
            }
            std::thread::sleep((self.due - now).min(SLEEP_SLICE));
        }
    }
}

/// How far ahead of the read position residency is taken. Async readahead can run about two
/// windows ahead, so this covers read_ahead_kb up to 16 MiB.
const LOOKAHEAD: u64 = 32 << 20;

/// The verifier's page-cache hygiene on one descriptor (see the module doc).
struct PageCache {
    fd: RawFd,
    page: u64,
    /// Pages per drop unit: the largest page-cache folio (naturally aligned), so a `DONTNEED`
    /// range made of whole units never splits a folio (the kernel skips split folios).
    unit: u64,
    /// Pages `base..base + seen.len()`: whether each was resident when first looked at. Pages
    /// below `base` have been dropped (if unseen) and forgotten.
    base: u64,
    seen: VecDeque<bool>,
    logged: bool,
}

impl PageCache {
    fn new(fd: RawFd) -> Self {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096);
        // MAX_PAGECACHE_ORDER = min(PMD order, 11): 2 MiB with 4 KiB pages.
        let unit = 1 << (page / 8).trailing_zeros().min(11);
        let cache = PageCache { fd, page, unit, base: 0, seen: VecDeque::new(), logged: false };
        cache.advise(0, 0, libc::POSIX_FADV_RANDOM);
        cache
    }

    /// Before reading at `off`: looks at pages up to LOOKAHEAD past the chunk.
    fn prepare(&mut self, off: u64) {
        let have = self.base + self.seen.len() as u64;
        let want = (off + CHUNK as u64 + LOOKAHEAD).div_ceil(self.page);
        if want <= have {
            return;
        }
        match resident_pages(self.fd, have, want, self.page) {
            Ok(r) => self.seen.extend(r.iter().map(|b| b & 1 != 0)),
            Err(e) => {
                if !std::mem::replace(&mut self.logged, true) {
                    log::debug!("verify: page residency unknown, dropping all read pages: {e}");
                }
                self.seen.extend(std::iter::repeat_n(false, (want - have) as usize));
            }
        }
    }

    /// After hashing everything below `done`: drops the unseen pages of the whole drop units
    /// below it, and forgets them.
    fn release(&mut self, done: u64) {
        let end = done / self.page / self.unit * self.unit;
        if end > self.base {
            self.drop_unseen(self.base, end);
            self.seen.drain(..(end - self.base) as usize);
            self.base = end;
        }
    }

    fn drop_unseen(&self, first: u64, end: u64) {
        let first = first.max(self.base);
        let end = end.min(self.base + self.seen.len() as u64);
        let seen = |p: u64| self.seen[(p - self.base) as usize];
        let mut p = first;
        while p < end {
            let run = p;
            while p < end && !seen(p) {
                p += 1;
            }
            if p > run {
                let len = (p - run) * self.page;
                self.advise(run * self.page, len, libc::POSIX_FADV_DONTNEED);
            }
            while p < end && seen(p) {
                p += 1;
            }
        }
    }

    fn advise(&self, off: u64, len: u64, advice: libc::c_int) {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: advisory only; an invalid fd or range is reported as an error code.
        let rc = unsafe { libc::posix_fadvise(self.fd, off, len, advice) };
        if rc != 0 {
            log::debug!("verify: posix_fadvise({advice}): {}", io::Error::from_raw_os_error(rc));
        }
    }
}

/// `mincore(2)` of pages `first..end` of the file: one byte per page, bit 0 = resident.
fn resident_pages(fd: RawFd, first: u64, end: u64, page: u64) -> io::Result<Vec<u8>> {
    if end <= first {
        return Ok(Vec::new());
    }
    let too_big = || io::Error::from_raw_os_error(libc::EOVERFLOW);
    let len = usize::try_from((end - first) * page).map_err(|_| too_big())?;
    let off = libc::off_t::try_from(first * page).map_err(|_| too_big())?;
    // SAFETY: a fresh read-only shared mapping that is never dereferenced (pages past end of
    // file are fine as long as they are not touched) and is unmapped below.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, off)
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut resident = vec![0u8; (end - first) as usize];
    // SAFETY: addr..addr+len is the mapping made above; `resident` has one byte per page.
    let rc = unsafe { libc::mincore(addr, len, resident.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above; nothing refers to it.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err);
    }
    Ok(resident)
}

impl Drop for PageCache {
    fn drop(&mut self) {
        // The last partial unit, and whatever readahead brought in past the last chunk hashed.
        self.drop_unseen(self.base, self.base + self.seen.len() as u64);
        self.advise(0, 0, libc::POSIX_FADV_NORMAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;
    use std::process::Command;

    const MIB: usize = 1 << 20;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(data).expect("write temp file");
        f.as_file().sync_all().expect("fsync temp file");
        f
    }

    fn sha1sum(path: &Path) -> String {
        let out = Command::new("sha1sum")
            .arg(path)
            .output()
            .expect("running sha1sum (coreutils) failed: is it installed?");
        assert!(out.status.success(), "sha1sum failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    }

    fn done(h: Hashed) -> [u8; 20] {
        match h {
            Hashed::Done(d) => d,
            Hashed::Cancelled => panic!("cancelled, but cancel never fired"),
        }
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn fips_vectors() {
        let abc = "a9993e364706816aba3e25717850c26c9cd0d89d";
        let empty = "da39a3ee5e6b4b0d3255bfef95601890afd80709";
        assert_eq!(hex(&sha1_of(&b"abc"[..]).unwrap()), abc);
        assert_eq!(hex(&sha1_of(&b""[..]).unwrap()), empty);
        for (data, want) in [(&b"abc"[..], abc), (&b""[..], empty)] {
            let f = temp_file(data);
            assert_eq!(hex(&done(sha1_file(f.as_file(), Rate(None), &never).unwrap())), want);
        }
    }

    #[test]
    fn matches_sha1sum() {
        // Exactly 3 MiB (chunk-aligned end), and an odd size ending mid-page in a short chunk.
        for (len, seed) in [(3 * MIB, 1), (3 * MIB + 4097, 2)] {
            let data = pseudo_random(len, seed);
            let f = temp_file(&data);
            let want = sha1sum(f.path());
            assert_eq!(hex(&done(sha1_file(f.as_file(), Rate(None), &never).unwrap())), want);
            assert_eq!(hex(&sha1_of(&data[..]).unwrap()), want);
            assert_eq!(hex(&sha1_of(File::open(f.path()).unwrap()).unwrap()), want);
        }
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let d: [u8; 20] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
        let s = hex(&d);
        assert_eq!(s.len(), 40);
        assert!(s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(parse_hex(&s), Some(d));
        assert_eq!(parse_hex(&hex(&[0; 20])), Some([0; 20]));
        assert_eq!(parse_hex(&hex(&[0xff; 20])), Some([0xff; 20]));
        let good = "a9993e364706816aba3e25717850c26c9cd0d89d";
        assert!(parse_hex(good).is_some());
        for bad in [
            "",
            &good[..39],
            &format!("{good}0"),
            &format!("{good}\n"),
            &format!(" {}", &good[1..]),
            "A9993E364706816ABA3E25717850C26C9CD0D89D",
            "g9993e364706816aba3e25717850c26c9cd0d89d",
            "+9993e364706816aba3e25717850c26c9cd0d89d",
            "a9993e364706816aba3e25717850c26c9cd0d8-d",
            // 40 bytes, but not 40 ASCII characters.
            "é993e364706816aba3e25717850c26c9cd0d89d",
        ] {
            assert_eq!(parse_hex(bad), None, "accepted {bad:?}");
        }
    }

    #[test]
    fn cancel_before_start() {
        let f = temp_file(&pseudo_random(2 * MIB, 3));
        let hashed = sha1_file(f.as_file(), Rate(None), &|| true).unwrap();
        assert_eq!(hashed, Hashed::Cancelled);
    }

    #[test]
    fn cancel_while_paced_is_prompt() {
        // 16 MiB at 1 MiB/s would take 16 s; cancel fires at 200 ms, mid-sleep.
        let f = temp_file(&pseudo_random(16 * MIB, 4));
        let start = Instant::now();
        let fire = Duration::from_millis(200);
        let hashed = sha1_file(f.as_file(), Rate(Some(MIB as u64)), &|| start.elapsed() >= fire);
        let took = start.elapsed();
        assert_eq!(hashed.unwrap(), Hashed::Cancelled);
        // One chunk plus one 50 ms slice after the 200 ms mark; 3 s is slack for a loaded host.
        assert!(took < Duration::from_secs(3), "cancellation took {took:?}");
    }

    #[test]
    fn rate_limit_is_a_lower_bound_on_time() {
        let data = pseudo_random(16 * MIB, 5);
        let f = temp_file(&data);
        let start = Instant::now();
        let hashed = sha1_file(f.as_file(), Rate(Some(8 * MIB as u64)), &never).unwrap();
        let took = start.elapsed();
        assert_eq!(done(hashed), sha1_of(&data[..]).unwrap());
        assert!(took >= Duration::from_millis(1500), "16 MiB at 8 MiB/s took only {took:?}");
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let data = pseudo_random(4 * MIB, 6);
        let f = temp_file(&data);
        let hashed = sha1_file(f.as_file(), Rate(Some(0)), &never).unwrap();
        assert_eq!(done(hashed), sha1_of(&data[..]).unwrap());
    }

    /// Resident pages of `f` as `start..end` page-index runs (readable in a failed assert).
    fn resident_runs(f: &File) -> Vec<std::ops::Range<u64>> {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let pages = f.metadata().unwrap().len().div_ceil(page);
        let resident = resident_pages(f.as_raw_fd(), 0, pages, page).expect("mincore");
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for p in (0..pages).filter(|&p| resident[p as usize] & 1 != 0) {
            match runs.last_mut() {
                Some(run) if run.end == p => run.end = p + 1,
                _ => runs.push(p..p + 1),
            }
        }
        runs
    }

    /// A cold file, part of which a "VM" then reads through its own descriptor, with the
    /// kernel's default readahead (which leaves readahead markers in the pages it reads).
    fn partly_cached_file(data: &[u8]) -> (tempfile::NamedTempFile, Vec<std::ops::Range<u64>>) {
        let f = temp_file(data);
        let fd = f.as_file().as_raw_fd();
        // SAFETY: advisory only.
        let rc = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise");
        let tmpfs = "the temp dir must be on a disk filesystem, not tmpfs: set TMPDIR";
        assert_eq!(resident_runs(f.as_file()), vec![], "DONTNEED left pages: {tmpfs}");
        let vm = File::open(f.path()).unwrap();
        let mut buf = vec![0u8; 3 * MIB / 2];
        vm.read_exact_at(&mut buf, 0).unwrap();
        vm.read_exact_at(&mut buf[..8192], 5 * MIB as u64 + 123).unwrap();
        let before = resident_runs(f.as_file());
        let pages = (data.len() as u64).div_ceil(4096);
        let resident: u64 = before.iter().map(|r| r.end - r.start).sum();
        assert!(resident > 0 && resident < pages, "priming left {before:?} resident");
        (f, before)
    }

    /// Runs `attempt` (which returns the residency before and after a verification) until
    /// both match, up to three times. The kernel may drop a clean page by itself under memory
    /// pressure from whatever else runs on the machine; a verifier that evicts or leaves pages
    /// changes the residency every time.
    fn residency_unchanged(mut attempt: impl FnMut() -> (Vec<Range>, Vec<Range>)) {
        let mut last = None;
        for _ in 0..3 {
            let (before, after) = attempt();
            if before == after {
                return;
            }
            last = Some((before, after));
        }
        let (before, after) = last.expect("three attempts");
        assert_eq!(after, before, "residency changed by verification, three times in a row");
    }

    type Range = std::ops::Range<u64>;

    #[test]
    fn page_cache_left_as_found() {
        let data = pseudo_random(64 * MIB + 1000, 7);
        residency_unchanged(|| {
            let (f, before) = partly_cached_file(&data);
            let verifier = File::open(f.path()).unwrap();
            let hashed = sha1_file(&verifier, Rate(None), &never).unwrap();
            assert_eq!(done(hashed), sha1_of(&data[..]).unwrap());
            (before, resident_runs(f.as_file()))
        });
    }

    #[test]
    fn page_cache_left_as_found_after_cancel() {
        let data = pseudo_random(64 * MIB + 1000, 8);
        residency_unchanged(|| {
            let (f, before) = partly_cached_file(&data);
            let verifier = File::open(f.path()).unwrap();
            // Polled once per chunk when unpaced: three chunks are read, then it is cancelled.
            let polls = std::cell::Cell::new(0);
            let cancel = || {
                polls.set(polls.get() + 1);
                polls.get() > 3
            };
            assert_eq!(sha1_file(&verifier, Rate(None), &cancel).unwrap(), Hashed::Cancelled);
            assert_eq!(polls.get(), 4);
            (before, resident_runs(f.as_file()))
        });
    }
}
