//! `cargo bench --bench sha1`: SHA-1 throughput of `verify::sha1_of` on 256 MiB in memory,
//! compared with coreutils `sha1sum` on the same bytes in a temp file (page cache warm), and
//! `verify::sha1_file` unpaced on that file. Best of 3 runs each; prints MiB/s and ratios.

use std::fs::File;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use imagecachefs::verify::{hex, sha1_file, sha1_of, Hashed, Rate};

const MIB: usize = 1 << 20;
const SIZE: usize = 256 * MIB;
const RUNS: usize = 3;

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len);
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

/// Best time of RUNS calls of `f`, and the digest it returned (the same every time).
fn best_of(what: &str, mut f: impl FnMut() -> String) -> (Duration, String) {
    let mut best = Duration::MAX;
    let mut digest = String::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let d = f();
        best = best.min(start.elapsed());
        assert!(digest.is_empty() || digest == d, "{what}: digest changed between runs");
        digest = d;
    }
    (best, digest)
}

fn mib_per_sec(t: Duration) -> f64 {
    SIZE as f64 / MIB as f64 / t.as_secs_f64()
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    println!("cpu SHA extensions (sha_ni): {}", std::arch::is_x86_feature_detected!("sha"));
    let data = pseudo_random(SIZE);

    let (mem, mem_digest) = best_of("sha1_of", || hex(&sha1_of(&data[..]).unwrap()));
    println!("sha1_of, 256 MiB in memory:        {:8.1} MiB/s", mib_per_sec(mem));

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("data");
    File::create(&path).and_then(|mut f| f.write_all(&data)).expect("writing the temp file");
    drop(data);

    let (tool, tool_digest) = best_of("sha1sum", || {
        let out = Command::new("sha1sum").arg(&path).output().expect("running sha1sum");
        assert!(out.status.success(), "sha1sum failed");
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    });
    println!("sha1sum, same bytes in a file:     {:8.1} MiB/s", mib_per_sec(tool));

    let file = File::open(&path).unwrap();
    let (unpaced, file_digest) =
        best_of("sha1_file", || match sha1_file(&file, Rate(None), &|| false).unwrap() {
            Hashed::Done(d) => hex(&d),
            Hashed::Cancelled => unreachable!("never cancelled"),
        });
    println!("sha1_file, unpaced, same file:     {:8.1} MiB/s", mib_per_sec(unpaced));

    assert_eq!(mem_digest, tool_digest, "sha1_of and sha1sum disagree");
    assert_eq!(file_digest, tool_digest, "sha1_file and sha1sum disagree");
    println!("digest {tool_digest} (all three agree)");
    println!(
        "ratio sha1_of / sha1sum: {:.2}; sha1_file / sha1sum: {:.2}",
        tool.as_secs_f64() / mem.as_secs_f64(),
        tool.as_secs_f64() / unpaced.as_secs_f64()
    );
}
