//! How bytes that anyone can choose (file names, program names, QEMU `-name`s, what is written
//! to `control`) are shown: one escaping for every status file, `status.json` and the log, so
//! that no name can add a line, a column or a key, and any byte string shows as printable
//! ASCII that [`unescape`] turns back into the same bytes.
//!
//! The rule (docs/STATUS.md, "Names and escaping"): the printable ASCII characters `!` to `~`
//! stand for themselves, except `\`, which is written `\\`; every other byte (space, tab,
//! newline, other control characters, DEL and every byte of a non-ASCII or non-UTF-8 name) is
//! written `\xNN`, two lowercase hex digits.

use std::fmt::Write;

/// The escaped form of `bytes` (see the module comment).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'!'..=b'~' => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

/// The bytes behind an escaped string; `None` if `s` is not one [`escape`] makes.
pub fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if b.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            b'\\' if b.get(i + 1) == Some(&b'x') => {
                let hex = s.get(i + 2..i + 4)?;
                if !hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 4;
            }
            c @ b'!'..=b'~' if c != b'\\' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// At most `max` bytes of `bytes`, escaped, for a log line; longer input says how long it was.
pub fn excerpt(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return escape(bytes);
    }
    format!("{}... ({} bytes)", escape(&bytes[..max]), bytes.len())
}

/// An escaped string cut to `width` characters for a table column: a longer one keeps its
/// first `width - 3` characters (never half an escape) and ends in `...`.
pub fn shorten(escaped: &str, width: usize) -> String {
    if escaped.len() <= width {
        return escaped.to_string();
    }
    let keep = width.saturating_sub(3);
    let b = escaped.as_bytes();
    let mut end = 0;
    while end < keep {
        let step = match (b[end], b.get(end + 1)) {
            (b'\\', Some(b'x')) => 4,
            (b'\\', _) => 2,
            _ => 1,
        };
        if end + step > keep {
            break;
        }
        end += step;
    }
    format!("{}...", &escaped[..end])
}

/// A Prometheus label value: `\`, `"` and newline escaped, as the text exposition format
/// requires.
pub fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_nova_makes_are_unchanged() {
        for n in ["0d5e6b61602d758984b3bf038267614d6016eb2a_20", "swap_512", "x.part", "a-b~c"] {
            assert_eq!(escape(n.as_bytes()), n);
        }
    }

    #[test]
    fn separators_and_control_bytes_are_escaped() {
        assert_eq!(escape(b"evil\nstate: idle"), "evil\\x0astate:\\x20idle");
        assert_eq!(escape(b"a\\b\tc\x7f\xff"), "a\\\\b\\x09c\\x7f\\xff");
        assert_eq!(escape("é".as_bytes()), "\\xc3\\xa9");
    }

    #[test]
    fn excerpts_are_bounded() {
        let long = vec![b'\n'; 100_000];
        let e = excerpt(&long, 80);
        assert!(e.len() <= 80 * 4 + 30, "{}", e.len());
        assert!(e.ends_with("... (100000 bytes)"), "{e}");
        assert!(!e.contains('\n'));
        assert_eq!(excerpt(b"pin x", 80), "pin\\x20x");
    }

    #[test]
    fn shortening_never_cuts_an_escape() {
        let s = escape(&[b'\n'; 40]);
        let t = shorten(&s, 20);
        assert!(t.len() <= 20, "{t}");
        assert!(t.ends_with("..."));
        assert_eq!(t, format!("{}...", "\\x0a".repeat(4)));
        assert_eq!(shorten("short", 20), "short");
    }

    #[test]
    fn label_values_follow_the_exposition_format() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    proptest! {
        #[test]
        fn escaping_is_printable_ascii_and_reversible(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let e = escape(&bytes);
            prop_assert!(e.bytes().all(|c| (b'!'..=b'~').contains(&c)), "{}", e);
            prop_assert_eq!(unescape(&e), Some(bytes));
        }
    }
}
