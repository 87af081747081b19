//! What kind of cache file a name denotes, by Nova's own rules.
//!
//! Owns the mapping from a bare file name in `_base` to a [`Kind`], which picks the idle
//! threshold a file is evicted after. The tests mirror Nova's `ImageCacheManager`
//! (`_scan_base_images`, `_store_swap_image`, `_store_ephemeral_image`): length and split
//! tests, no regular expressions, no hex check (any 40-byte name is an original). Two
//! deliberate departures: in-flight `.part`/`.converted` downloads are recognised first (Nova
//! ignores them and never cleans them), and lengths are counted in bytes. Classification looks
//! at the name only, never at the file, so it is pure and total: every name has one kind.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// Length of a hex SHA-1 digest, Nova's name for an original image (`sha1(image_id)`).
const DIGEST_LEN: usize = 40;

/// The kind of a cache file, as Nova's image cache manager would classify its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `<sha1 hex>`: a downloaded (and possibly converted) image, exactly 40 bytes long.
    Original,
    /// `<hash>_<N>` or `<hash>_sm`: a legacy resized or small copy (longer than 42 bytes,
    /// `_` at byte 40).
    Resized,
    /// `*.part` or `*.converted`: a download or conversion in flight, or left behind by one.
    Partial,
    /// `ephemeral_<size>_<7 chars>`: an ephemeral disk backing file.
    Ephemeral,
    /// `swap_<size>`: a swap disk backing file.
    Swap,
    /// Anything else (`.info`, `.sha1`, `<hash>_1`, bare image ids, ...): Nova ignores these.
    Other,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Kind; 6] =
        [Kind::Original, Kind::Resized, Kind::Partial, Kind::Ephemeral, Kind::Swap, Kind::Other];

    /// Classifies a bare file name (no directory part).
    pub fn of(name: &OsStr) -> Kind {
        let name = name.as_bytes();
        if name.ends_with(b".part") || name.ends_with(b".converted") {
            Kind::Partial
        } else if name.len() == DIGEST_LEN {
            Kind::Original
        } else if name.len() > DIGEST_LEN + 2 && name[DIGEST_LEN] == b'_' {
            Kind::Resized
        } else if is_swap(name) {
            Kind::Swap
        } else if is_ephemeral(name) {
            Kind::Ephemeral
        } else {
            Kind::Other
        }
    }

    /// The name shown in status files: `original`, `resized`, `partial`, `ephemeral`, `swap`,
    /// `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Original => "original",
            Kind::Resized => "resized",
            Kind::Partial => "partial",
            Kind::Ephemeral => "ephemeral",
            Kind::Swap => "swap",
            Kind::Other => "other",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Non-empty and ASCII digits only (Python's `isdigit` also takes Unicode digits; Nova never
/// writes those).
fn is_digits(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(u8::is_ascii_digit)
}

/// `swap_<digits>`: splitting on `_` yields exactly two parts.
fn is_swap(name: &[u8]) -> bool {
    let parts: Vec<&[u8]> = name.split(|&b| b == b'_').collect();
    matches!(parts.as_slice(), [b"swap", size] if is_digits(size))
}

/// `ephemeral_<digits>_<7 chars>`: splitting on `_` yields exactly three parts.
fn is_ephemeral(name: &[u8]) -> bool {
    let parts: Vec<&[u8]> = name.split(|&b| b == b'_').collect();
    matches!(parts.as_slice(), [b"ephemeral", size, ext] if is_digits(size) && ext.len() == 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";

    fn kind(name: &str) -> Kind {
        Kind::of(OsStr::new(name))
    }

    #[test]
    fn swap_names() {
        assert_eq!(kind("swap_123"), Kind::Swap);
        assert_eq!(kind("swap_512"), Kind::Swap);
        assert_eq!(kind("swap_abc"), Kind::Other);
        assert_eq!(kind("swap_"), Kind::Other);
        assert_eq!(kind("swap_1_2"), Kind::Other);
    }

    #[test]
    fn ephemeral_names() {
        assert_eq!(kind("ephemeral_456_40d1d2c"), Kind::Ephemeral);
        assert_eq!(kind("ephemeral_4_0706d66"), Kind::Ephemeral);
        assert_eq!(kind("ephemeral_abc_40d1f2e"), Kind::Other);
        // The Grizzly–Juno name matches by accident: "default" is 7 characters.
        assert_eq!(kind("ephemeral_20_default"), Kind::Ephemeral);
        assert_eq!(kind("ephemeral_0_20_None"), Kind::Other);
        assert_eq!(kind("ephemeral__40d1d2c"), Kind::Other);
        assert_eq!(kind("ephemeral_20_40d1d2"), Kind::Other);
    }

    #[test]
    fn hash_names() {
        assert_eq!(HASH.len(), 40);
        assert_eq!(kind(HASH), Kind::Original);
        assert_eq!(kind(&format!("{HASH}_10")), Kind::Resized);
        assert_eq!(kind(&format!("{HASH}_10737418240")), Kind::Resized);
        assert_eq!(kind(&format!("{HASH}_sm")), Kind::Resized);
        // 42 bytes: too short for Nova's non-original test, so never touched.
        assert_eq!(kind(&format!("{HASH}_1")), Kind::Other);
        assert_eq!(kind(&format!("{HASH}.info")), Kind::Other);
        assert_eq!(kind(&format!("{HASH}.sha1")), Kind::Other);
        assert_eq!(kind(&format!("{HASH}.part")), Kind::Partial);
        assert_eq!(kind(&format!("{HASH}.converted")), Kind::Partial);
        assert_eq!(kind(&format!("{HASH}_10.part")), Kind::Partial);
    }

    #[test]
    fn any_forty_bytes_is_an_original() {
        assert_eq!(kind(&"z".repeat(40)), Kind::Original);
    }

    #[test]
    fn other_names() {
        let uuid = "6a3c2e8e-6f0a-4b8e-9c55-2f1d3a4b5c6d";
        assert_eq!(uuid.len(), 36);
        assert_eq!(kind(uuid), Kind::Other);
        assert_eq!(kind("00000001"), Kind::Other);
        assert_eq!(kind(&format!(".{HASH}.Ab12Cd")), Kind::Other);
        assert_eq!(kind(""), Kind::Other);
    }

    #[test]
    fn non_utf8_names_are_classified_by_bytes() {
        let mut name = vec![0xffu8; 40];
        assert_eq!(Kind::of(OsStr::from_bytes(&name)), Kind::Original);
        name.extend_from_slice(b"_sm");
        assert_eq!(Kind::of(OsStr::from_bytes(&name)), Kind::Resized);
    }

    #[test]
    fn names_round_trip() {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["original", "resized", "partial", "ephemeral", "swap", "other"]);
        for k in Kind::ALL {
            assert_eq!(k.to_string(), k.as_str());
        }
    }
}
