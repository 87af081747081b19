//! Reads Nova's image cache settings from `nova.conf` (`mount --nova-conf FILE`), so that
//! operators keep one source of truth. This module owns only the reading: it applies no
//! defaults (a field is `None` when the file does not set it; the caller applies a flag or
//! Nova's default), touches no file but the one named, and never guesses: a line oslo.config
//! would refuse, or a value of one of our settings that Nova would refuse, is an error naming
//! the line. It follows oslo.config's INI rules (`oslo_config/iniparser.py` and `cfg.py`):
//! `key = value` or `key: value`, the first `=`/`:` splits, surrounding matching quotes are
//! dropped, `#`/`;` comment lines (no inline comments: `false # off` is the value), an
//! indented line continues the value (joined with a newline) until a blank, comment, header or
//! key line, a key before any `[section]` is an error, a repeated key or section: last wins.
//! Section names other than `DEFAULT` compare lowercased (as oslo normalises them), `DEFAULT`
//! is exact. Only the value that wins is checked (as oslo converts only that one); unknown
//! sections and keys are never checked. Paths get oslo's `$name`/`${name}` substitution from
//! `[DEFAULT]` (`$state_path/instances`); an `instances_path` that refers to a name the file
//! does not set is an error naming its line.
//!
//! Names accepted, first set wins (history from the Nova git tree):
//! - `[image_cache] remove_unused_base_images`, `remove_unused_original_minimum_age_seconds`,
//!   `remove_unused_resized_minimum_age_seconds`, `subdirectory_name`: the group since Ussuri
//!   (21.0.0, `828e8047e5`), which declares the legacy names below as its deprecated aliases.
//! - `[DEFAULT] remove_unused_base_images`, `[DEFAULT] remove_unused_original_minimum_age_seconds`,
//!   `[DEFAULT] image_cache_subdirectory_name`: where Icehouse–Train read them.
//! - `[libvirt] remove_unused_resized_minimum_age_seconds`: Icehouse (`5102ae18cb`) moved it
//!   there, Train still read it there.
//! - `[DEFAULT] instances_path`: never moved.
//! - `[libvirt] checksum_interval_seconds`: where Icehouse–Stein read it; removed in Train
//!   (20.0.0, `e141bcdb25`), so no current Nova reads it and it exists only in old files.
//!
//! Not accepted: names Nova stopped reading in Juno (2014.2, `d0a02fa390` "Remove deprecated
//! config option names"): `[DEFAULT] remove_unused_resized_minimum_age_seconds` and
//! `[DEFAULT] checksum_interval_seconds` (≤ Havana), `[DEFAULT] base_dir_name` (Folsom–Havana),
//! `[libvirt] remove_unused_base_images` and `[libvirt] remove_unused_original_minimum_age_seconds`
//! (Icehouse aliases only). Obeying a line that every Nova since Juno ignores would break the
//! one source of truth; they are ignored with a warning.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::MAX_SECS;

/// Settings found in nova.conf; `None` = not set there (the CLI default or flag applies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NovaImageCache {
    pub remove_unused_base_images: Option<bool>,
    /// `remove_unused_original_minimum_age_seconds`.
    pub original_min_age: Option<u64>,
    /// `remove_unused_resized_minimum_age_seconds`.
    pub resized_min_age: Option<u64>,
    /// `[image_cache] subdirectory_name` / legacy `[DEFAULT] image_cache_subdirectory_name`.
    pub subdirectory_name: Option<String>,
    /// `[DEFAULT] instances_path`.
    pub instances_path: Option<String>,
    /// Legacy `[libvirt] checksum_interval_seconds`, if present.
    pub checksum_interval: Option<u64>,
}

/// A file that cannot be read or that Nova would refuse. `line` is 1-based; 0 when the file
/// itself cannot be read (then `Display` leaves the line out).
#[derive(Debug, PartialEq, Eq)]
pub struct ConfError {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
        }
    }
}

impl std::error::Error for ConfError {}

/// `(section, key)`, the section as oslo normalises it.
type Name = (&'static str, &'static str);

const IMAGE_CACHE: &str = "image_cache";
const DEFAULT: &str = "DEFAULT";
const LIBVIRT: &str = "libvirt";

const REMOVE_UNUSED: &[Name] =
    &[(IMAGE_CACHE, "remove_unused_base_images"), (DEFAULT, "remove_unused_base_images")];
const ORIGINAL_MIN_AGE: &[Name] = &[
    (IMAGE_CACHE, "remove_unused_original_minimum_age_seconds"),
    (DEFAULT, "remove_unused_original_minimum_age_seconds"),
];
const RESIZED_MIN_AGE: &[Name] = &[
    (IMAGE_CACHE, "remove_unused_resized_minimum_age_seconds"),
    (LIBVIRT, "remove_unused_resized_minimum_age_seconds"),
];
const SUBDIRECTORY_NAME: &[Name] =
    &[(IMAGE_CACHE, "subdirectory_name"), (DEFAULT, "image_cache_subdirectory_name")];
const INSTANCES_PATH: &[Name] = &[(DEFAULT, "instances_path")];
const CHECKSUM_INTERVAL: &[Name] = &[(LIBVIRT, "checksum_interval_seconds")];

/// Names no Nova since Juno reads, with the name to use instead.
const STALE: &[(Name, &str)] = &[
    (
        (DEFAULT, "remove_unused_resized_minimum_age_seconds"),
        "[image_cache] remove_unused_resized_minimum_age_seconds",
    ),
    ((DEFAULT, "checksum_interval_seconds"), "--verify-interval"),
    ((DEFAULT, "base_dir_name"), "[image_cache] subdirectory_name"),
    ((LIBVIRT, "remove_unused_base_images"), "[image_cache] remove_unused_base_images"),
    (
        (LIBVIRT, "remove_unused_original_minimum_age_seconds"),
        "[image_cache] remove_unused_original_minimum_age_seconds",
    ),
];

/// One assignment: its value (continuation lines joined with `\n`) and the line of its key.
#[derive(Debug)]
struct Value {
    text: String,
    line: usize,
}

/// Normalised section name → key → the last assignment.
#[derive(Debug, Default)]
struct Ini(HashMap<String, HashMap<String, Value>>);

impl Ini {
    /// The first of `names` that the file sets.
    fn get(&self, names: &[Name]) -> Option<(Name, &Value)> {
        names.iter().find_map(|&(section, key)| {
            self.0.get(section).and_then(|keys| keys.get(key)).map(|v| ((section, key), v))
        })
    }
}

/// Parses the text of a nova.conf; `path` only names the file in errors and logs.
pub fn parse(text: &str, path: &Path) -> Result<NovaImageCache, ConfError> {
    let error = |(line, message)| ConfError { path: path.to_path_buf(), line, message };
    let ini = read_ini(text).map_err(error)?;
    for &((section, key), instead) in STALE {
        if let Some((_, v)) = ini.get(&[(section, key)]) {
            log::warn!(
                "{}:{}: [{section}] {key} is ignored: Nova has not read it since Juno (2014.2); \
                 use {instead}",
                path.display(),
                v.line
            );
        }
    }
    let remove_unused = convert(&ini, path, REMOVE_UNUSED, boolean);
    let original = convert(&ini, path, ORIGINAL_MIN_AGE, seconds);
    let resized = convert(&ini, path, RESIZED_MIN_AGE, seconds);
    let checksum = convert(&ini, path, CHECKSUM_INTERVAL, seconds);
    let first_error = [
        remove_unused.as_ref().err(),
        original.as_ref().err(),
        resized.as_ref().err(),
        checksum.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|(line, _)| *line);
    if let Some(e) = first_error {
        return Err(error(e.clone()));
    }
    let string = |names| convert(&ini, path, names, |s| Ok(s.to_owned())).ok().flatten();
    // Paths may use oslo.config's `$name` substitution (`$state_path/instances`): expand it
    // from [DEFAULT], and refuse (naming the line) what the file cannot resolve, since a wrong
    // instances path would leave the backing-file guard looking in the wrong place.
    let instances_path = match ini.get(INSTANCES_PATH) {
        Some((_, v)) => Some(expand_value(&ini, &v.text).map_err(|m| error((v.line, m)))?),
        None => None,
    };
    // The subdirectory name is only compared with the mounted directory: an unresolvable
    // `_base_$my_ip` (my_ip defaults to the host's address) skips that check.
    let subdirectory_name = string(SUBDIRECTORY_NAME).and_then(|s| expand_value(&ini, &s).ok());
    Ok(NovaImageCache {
        remove_unused_base_images: remove_unused.ok().flatten(),
        original_min_age: original.ok().flatten(),
        resized_min_age: resized.ok().flatten(),
        subdirectory_name,
        instances_path,
        checksum_interval: checksum.ok().flatten(),
    })
}

/// oslo.config substitution: `$name` and `${name}` take the value of `name` in [DEFAULT]
/// (itself expanded), `$$` is a literal `$`.
fn expand_value(ini: &Ini, text: &str) -> Result<String, String> {
    expand(ini, text, 0, &mut SUBSTITUTIONS_MAX.clone())
}

/// Substitutions one value may make, however nested (empty ones cost work, not bytes).
const SUBSTITUTIONS_MAX: usize = 10_000;

fn expand(ini: &Ini, text: &str, depth: usize, budget: &mut usize) -> Result<String, String> {
    if depth > 8 {
        return Err(format!("{text:?}: substitutions nest too deep"));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (name, after) = match rest.strip_prefix('{') {
            Some(r) => r.split_once('}').ok_or_else(|| format!("{text:?}: unclosed ${{"))?,
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                rest.split_at(end)
            }
        };
        let value = ini
            .0
            .get(DEFAULT)
            .and_then(|keys| keys.get(name))
            .map(|v| v.text.as_str())
            .ok_or_else(|| format!("{text:?} refers to ${name}, which this file does not set"))?;
        *budget = budget.checked_sub(1).ok_or_else(|| {
            format!(
                "{}: more than {SUBSTITUTIONS_MAX} substitutions",
                crate::text::excerpt(text.as_bytes(), 80)
            )
        })?;
        out.push_str(&expand(ini, value, depth + 1, budget)?);
        if out.len() > EXPANDED_MAX {
            return Err(format!(
                "{}: substitutions expand to more than {EXPANDED_MAX} bytes",
                crate::text::excerpt(text.as_bytes(), 80)
            ));
        }
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// The longest value substitutions may expand to (a path is at most 4096 bytes).
const EXPANDED_MAX: usize = 64 * 1024;
/// The largest nova.conf read (Nova's own sample with every option is about 400 KiB).
const FILE_MAX: u64 = 4 << 20;

/// A regular file of at most `FILE_MAX` bytes (not a FIFO, which would block, nor a device
/// that never ends).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > FILE_MAX {
        return Err(std::io::Error::other(format!("larger than {FILE_MAX} bytes")));
    }
    let mut bytes = Vec::new();
    file.take(FILE_MAX + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > FILE_MAX {
        return Err(std::io::Error::other(format!("larger than {FILE_MAX} bytes")));
    }
    Ok(bytes)
}

/// Reads and parses a nova.conf; a file that cannot be read is an error on line 0.
pub fn load(path: &Path) -> Result<NovaImageCache, ConfError> {
    let error = |line, message| ConfError { path: path.to_path_buf(), line, message };
    let bytes = read_bounded(path).map_err(|e| error(0, format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        error(1 + valid.iter().filter(|&&b| b == b'\n').count(), "not valid UTF-8".to_owned())
    })?;
    parse(&text, path)
}

/// The winning value of `names`, converted; a refused value is `(line, message)`.
fn convert<T>(
    ini: &Ini,
    path: &Path,
    names: &[Name],
    conv: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, (usize, String)> {
    let Some(((section, key), v)) = ini.get(names) else { return Ok(None) };
    log::debug!("{}:{}: [{section}] {key} = {:?}", path.display(), v.line, v.text);
    let value = conv(&v.text).map_err(|why| {
        let hint = if v.text.contains(" #") || v.text.contains(" ;") {
            " (oslo.config has no inline comments)"
        } else {
            ""
        };
        (v.line, format!("{key}: {:?} {why}{hint}", v.text))
    })?;
    Ok(Some(value))
}

/// oslo.config's `Boolean`: case-insensitive, no surrounding blanks allowed.
fn boolean(s: &str) -> Result<bool, String> {
    match s.to_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err("is not a boolean (true/false, yes/no, on/off, 1/0)".to_owned()),
    }
}

/// A non-negative decimal integer of seconds (blanks around it are allowed: oslo's `Integer`
/// strips), at most [`MAX_SECS`] (ten years): a larger value is refused here, naming its line,
/// rather than overflowing a deadline later.
fn seconds(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not a non-negative integer".to_owned());
    }
    match s.parse::<u64>() {
        Ok(n) if n <= MAX_SECS => Ok(n),
        _ => Err(format!("is more than {MAX_SECS} seconds (ten years), the largest accepted")),
    }
}

/// oslo normalises every group name but `DEFAULT` to lower case.
fn section_name(name: &str) -> String {
    if name == DEFAULT {
        name.to_owned()
    } else {
        name.to_lowercase()
    }
}

/// oslo.config's `BaseParser.parse` + `ConfigParser.assignment`; errors are `(line, message)`.
fn read_ini(text: &str) -> Result<Ini, (usize, String)> {
    let mut ini = Ini::default();
    let mut section: Option<String> = None;
    // The assignment being read: indented lines that follow still extend its value.
    let mut pending: Option<(String, Value)> = None;
    for (index, line) in text.lines().enumerate() {
        let lineno = index + 1;
        let line = line.trim_end();
        if line.is_empty() {
            flush(&mut ini, section.as_deref(), &mut pending)?;
        } else if line.starts_with([' ', '\t']) {
            let Some((_, value)) = pending.as_mut() else {
                return Err((
                    lineno,
                    format!(
                        "{line:?} is indented (a continuation line) but continues no value \
                         (a blank, comment or [section] line ends a value)"
                    ),
                ));
            };
            value.text.push('\n');
            value.text.push_str(line.trim_start());
        } else {
            flush(&mut ini, section.as_deref(), &mut pending)?;
            if let Some(header) = line.strip_prefix('[') {
                let Some(name) = header.strip_suffix(']') else {
                    return Err((lineno, format!("{line:?}: a [section] header must end with ]")));
                };
                if name.is_empty() {
                    return Err((lineno, "empty section name \"[]\"".to_owned()));
                }
                section = Some(section_name(name));
            } else if !line.starts_with(['#', ';']) {
                let Some((key, value)) = split_key_value(line) else {
                    return Err((
                        lineno,
                        format!(
                            "{line:?} is neither a [section] header, a comment nor a \
                             key = value line"
                        ),
                    ));
                };
                if key.is_empty() {
                    return Err((lineno, format!("{line:?} has an empty key")));
                }
                pending = Some((key.to_owned(), Value { text: value.to_owned(), line: lineno }));
            }
        }
    }
    flush(&mut ini, section.as_deref(), &mut pending)?;
    Ok(ini)
}

/// Ends the assignment being read, if any: stores it in its section (last wins).
fn flush(
    ini: &mut Ini,
    section: Option<&str>,
    pending: &mut Option<(String, Value)>,
) -> Result<(), (usize, String)> {
    let Some((key, value)) = pending.take() else { return Ok(()) };
    let Some(section) = section else {
        return Err((value.line, format!("{key:?} is set before any [section] header")));
    };
    ini.0.entry(section.to_owned()).or_default().insert(key, value);
    Ok(())
}

/// Splits at the first `=` or `:`, strips both sides, drops matching surrounding quotes.
fn split_key_value(line: &str) -> Option<(&str, &str)> {
    let at = match (line.find('='), line.find(':')) {
        (Some(e), Some(c)) => e.min(c),
        (Some(i), None) | (None, Some(i)) => i,
        (None, None) => return None,
    };
    let key = line[..at].trim();
    let value = line[at + 1..].trim();
    let quoted = |q| value.starts_with(q) && value.ends_with(q);
    if quoted('"') || quoted('\'') {
        // Like Python's value[1:-1]: a lone quote character leaves "".
        return Some((key, value.get(1..value.len() - 1).unwrap_or("")));
    }
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<NovaImageCache, ConfError> {
        parse(text, Path::new("nova.conf"))
    }

    /// The line and message of the error `text` gives.
    fn err(text: &str) -> (usize, String) {
        let e = p(text).expect_err("should be refused");
        assert_eq!(e.path, PathBuf::from("nova.conf"));
        (e.line, e.message)
    }

    const REALISTIC: &str = "\
# nova.conf of a compute node
[DEFAULT]
state_path = /var/lib/nova
instances_path=/srv/nova/instances
transport_url = rabbit://nova:s3cr=t:x@10.0.0.5:5672/
my_ip: 10.0.0.21
enabled_apis = osapi_compute,
    metadata
; legacy names, shadowed by [image_cache] below
remove_unused_base_images = True
image_cache_subdirectory_name = _base_old

[database]
connection = mysql+pymysql://nova:pw@db/nova?charset=utf8

[libvirt]
virt_type = kvm
images_type = qcow2
checksum_interval_seconds = 7200
remove_unused_resized_minimum_age_seconds = 1800

[image_cache]
# managed by imagecachefs: Nova's scanner must not delete
remove_unused_base_images = False
remove_unused_original_minimum_age_seconds = 172800
subdirectory_name = _base

[oslo_concurrency]
lock_path = /var/lib/nova/tmp
";

    #[test]
    fn paths_expand_oslo_substitutions_or_name_their_line() {
        let c =
            p("[DEFAULT]\nstate_path = /var/lib/nova\ninstances_path = $state_path/instances\n\
                   [image_cache]\nsubdirectory_name = _base_${my_ip}\n")
            .unwrap();
        assert_eq!(c.instances_path.as_deref(), Some("/var/lib/nova/instances"));
        assert_eq!(c.subdirectory_name, None, "my_ip is not set: no sanity check");
        let c = p("[DEFAULT]\nmy_ip = 10.0.0.5\ninstances_path = /srv/$$x\n[image_cache]\n\
                   subdirectory_name = _base_$my_ip\n")
        .unwrap();
        assert_eq!(c.instances_path.as_deref(), Some("/srv/$x"));
        assert_eq!(c.subdirectory_name.as_deref(), Some("_base_10.0.0.5"));
        let (line, msg) = err("[DEFAULT]\n\ninstances_path = $state_path/instances\n");
        assert_eq!(line, 3);
        assert!(msg.contains("$state_path"), "{msg}");
    }

    #[test]
    fn a_bomb_of_empty_substitutions_is_refused_quickly() {
        let mut text = String::from("[DEFAULT]\nx0 =\n");
        for i in 1..6 {
            text.push_str(&format!("x{i} = {}\n", format!("$x{}", i - 1).repeat(200)));
        }
        text.push_str("instances_path = $x5\n");
        let started = std::time::Instant::now();
        let (_, msg) = err(&text);
        assert!(msg.contains("substitutions"), "{msg}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_substitution_bomb_is_refused_quickly() {
        let mut text = String::from("[DEFAULT]\nx0 = aaaaaaaaaaaaaaaa\n");
        for i in 1..4 {
            text.push_str(&format!("x{i} = {}\n", format!("$x{} ", i - 1).repeat(1000)));
        }
        text.push_str("instances_path = $x3\n");
        let started = std::time::Instant::now();
        let (_, msg) = err(&text);
        assert!(msg.contains("expand to more than"), "{msg}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.conf");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for path in [fifo.as_path(), Path::new("/dev/zero")] {
            let e = load(path).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        let big = dir.path().join("big.conf");
        std::fs::write(&big, vec![b'#'; (FILE_MAX + 1) as usize]).unwrap();
        assert!(load(&big).unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn realistic_nova_conf() {
        let c = p(REALISTIC).unwrap();
        assert_eq!(
            c,
            NovaImageCache {
                remove_unused_base_images: Some(false),
                original_min_age: Some(172800),
                resized_min_age: Some(1800),
                subdirectory_name: Some("_base".into()),
                instances_path: Some("/srv/nova/instances".into()),
                checksum_interval: Some(7200),
            }
        );
        // CRLF line endings read the same.
        assert_eq!(p(&REALISTIC.replace('\n', "\r\n")).unwrap(), c);
    }

    #[test]
    fn nothing_set_is_all_none() {
        assert_eq!(p("").unwrap(), NovaImageCache::default());
        assert_eq!(p("# only\n\n[DEFAULT]\ndebug = true\n").unwrap(), NovaImageCache::default());
    }

    #[test]
    fn image_cache_wins_over_legacy_names_whatever_the_order() {
        let c = p("[image_cache]\n\
             remove_unused_base_images = yes\n\
             remove_unused_original_minimum_age_seconds = 1\n\
             remove_unused_resized_minimum_age_seconds = 2\n\
             subdirectory_name = new\n\
             [DEFAULT]\n\
             remove_unused_base_images = no\n\
             remove_unused_original_minimum_age_seconds = 10\n\
             image_cache_subdirectory_name = old\n\
             [libvirt]\n\
             remove_unused_resized_minimum_age_seconds = 20\n")
        .unwrap();
        assert_eq!(c.remove_unused_base_images, Some(true));
        assert_eq!(c.original_min_age, Some(1));
        assert_eq!(c.resized_min_age, Some(2));
        assert_eq!(c.subdirectory_name.as_deref(), Some("new"));
    }

    #[test]
    fn legacy_names_apply_when_image_cache_is_silent() {
        let c = p("[DEFAULT]\n\
             remove_unused_base_images = off\n\
             remove_unused_original_minimum_age_seconds = 10\n\
             image_cache_subdirectory_name = _base_$my_ip\n\
             [libvirt]\n\
             remove_unused_resized_minimum_age_seconds = 20\n\
             [image_cache]\n\
             manager_interval = -1\n")
        .unwrap();
        assert_eq!(c.remove_unused_base_images, Some(false));
        assert_eq!(c.original_min_age, Some(10));
        assert_eq!(c.resized_min_age, Some(20));
        // `$my_ip` is not set in the file: no name to compare the mount with.
        assert_eq!(c.subdirectory_name, None);
    }

    #[test]
    fn names_nova_stopped_reading_in_juno_are_ignored_and_never_checked() {
        let c = p("[DEFAULT]\n\
             remove_unused_resized_minimum_age_seconds = 5\n\
             checksum_interval_seconds = 6\n\
             base_dir_name = _old\n\
             [libvirt]\n\
             remove_unused_base_images = maybe\n\
             remove_unused_original_minimum_age_seconds = soon\n\
             [image_cache]\n\
             checksum_interval_seconds = 7\n\
             image_cache_subdirectory_name = x\n")
        .unwrap();
        assert_eq!(c, NovaImageCache::default());
    }

    #[test]
    fn section_names_compare_like_oslo() {
        // oslo lowercases every group name but DEFAULT, which must be exact.
        let c = p("[Image_Cache]\nremove_unused_base_images = false\n\
                   [LibVirt]\nremove_unused_resized_minimum_age_seconds = 9\n\
                   [default]\ninstances_path = /nope\n")
        .unwrap();
        assert_eq!(c.remove_unused_base_images, Some(false));
        assert_eq!(c.resized_min_age, Some(9));
        assert_eq!(c.instances_path, None);
    }

    #[test]
    fn repeated_keys_and_sections_last_wins() {
        let c = p("[image_cache]\n\
             remove_unused_original_minimum_age_seconds = 1\n\
             remove_unused_original_minimum_age_seconds = 2\n\
             remove_unused_base_images = bogus\n\
             [DEFAULT]\n\
             instances_path = /a\n\
             [image_cache]\n\
             remove_unused_original_minimum_age_seconds = 3\n\
             remove_unused_base_images = true\n\
             [DEFAULT]\n\
             instances_path = /b\n")
        .unwrap();
        assert_eq!(c.original_min_age, Some(3));
        // The shadowed "bogus" is never converted, as in oslo.
        assert_eq!(c.remove_unused_base_images, Some(true));
        assert_eq!(c.instances_path.as_deref(), Some("/b"));
    }

    #[test]
    fn continuation_lines() {
        // An indented line extends the value; the keys after it are unaffected.
        let c = p("[DEFAULT]\n\
             enabled_apis = osapi_compute,\n\
             \tmetadata\n\
             instances_path = /var/lib/nova/\n\
             \x20   instances\n\
             [image_cache]\n\
             remove_unused_base_images = false\n")
        .unwrap();
        assert_eq!(c.instances_path.as_deref(), Some("/var/lib/nova/\ninstances"));
        assert_eq!(c.remove_unused_base_images, Some(false));
        // A continued value of ours is checked whole, at the line of its key.
        let text = "[image_cache]\nremove_unused_base_images = true\n  false\n";
        assert_eq!(err(text), (2, r#"remove_unused_base_images: "true\nfalse" is not a boolean (true/false, yes/no, on/off, 1/0)"#.to_owned()));
        // An indented comment is a continuation too (oslo has no other reading).
        let text = "[image_cache]\nremove_unused_base_images = true\n    # keep\n";
        assert_eq!(err(text).0, 2);
    }

    #[test]
    fn continuation_with_nothing_to_continue_names_its_line() {
        assert_eq!(err("  indented\n[DEFAULT]\n").0, 1);
        // A blank line or a comment ends a value: what follows continues nothing.
        assert_eq!(err("[DEFAULT]\ndebug = true\n\n    more\n").0, 4);
        assert_eq!(err("[DEFAULT]\ndebug = true\n# c\n    more\n").0, 4);
        assert_eq!(err("[DEFAULT]\n    more\n").0, 2);
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let (line, message) = err("[DEFAULT]\ndebug = true\n\ngarbage\n[image_cache]\n");
        assert_eq!(line, 4);
        assert_eq!(
            message,
            r#""garbage" is neither a [section] header, a comment nor a key = value line"#
        );
        let (line, message) = err("[DEFAULT]\ndebug = true\n[image_cache\nx = 1\n");
        assert_eq!(
            (line, message.as_str()),
            (3, r#""[image_cache": a [section] header must end with ]"#)
        );
        // No comment after a header either.
        assert_eq!(err("# c\n[image_cache] # ours\n").0, 2);
        assert_eq!(err("[DEFAULT]\n[]\n"), (2, r#"empty section name "[]""#.to_owned()));
        assert_eq!(err("[DEFAULT]\na = 1\n= 5\n"), (3, r#""= 5" has an empty key"#.to_owned()));
        assert_eq!(
            err("# header comes later\ninstances_path = /x\n[DEFAULT]\n"),
            (2, r#""instances_path" is set before any [section] header"#.to_owned())
        );
        // Unknown sections and keys are parsed but never checked.
        assert!(p("[anything]\nfoo = maybe\nbar = -1\n").is_ok());
    }

    #[test]
    fn error_display_names_file_and_line() {
        let mut text = String::from("[DEFAULT]\n");
        for i in 0..9 {
            text.push_str(&format!("# comment {i}\n"));
        }
        text.push_str("[image_cache]\nremove_unused_base_images = maybe\n");
        let e = p(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"nova.conf:12: remove_unused_base_images: "maybe" is not a boolean (true/false, yes/no, on/off, 1/0)"#
        );
    }

    #[test]
    fn bad_values_of_our_keys_name_their_line_and_the_first_wins() {
        let text = "[DEFAULT]\n\
             remove_unused_original_minimum_age_seconds = 1d\n\
             [libvirt]\n\
             checksum_interval_seconds = -5\n\
             [image_cache]\n\
             remove_unused_resized_minimum_age_seconds = 3600 # one hour\n";
        let (line, message) = err(text);
        assert_eq!(line, 2);
        assert_eq!(
            message,
            r#"remove_unused_original_minimum_age_seconds: "1d" is not a non-negative integer"#
        );
        let (line, message) = err(&text.replace("= 1d", "= 1"));
        assert_eq!(line, 4);
        assert!(message.starts_with(r#"checksum_interval_seconds: "-5" is not"#), "{message}");
        let (line, message) = err(&text.replace("= 1d", "= 1").replace("= -5", "= 5"));
        assert_eq!(line, 6);
        assert_eq!(
            message,
            r#"remove_unused_resized_minimum_age_seconds: "3600 # one hour" is not a non-negative integer (oslo.config has no inline comments)"#
        );
    }

    #[test]
    fn booleans_accepted_and_refused() {
        let value = |v: &str| {
            p(&format!("[image_cache]\nremove_unused_base_images = {v}\n"))
                .map(|c| c.remove_unused_base_images.unwrap())
                .map_err(|e| (e.line, e.message))
        };
        for v in ["true", "True", "TRUE", "yes", "Yes", "on", "ON", "1", "\"true\"", "'on'"] {
            assert_eq!(value(v), Ok(true), "{v}");
        }
        for v in ["false", "False", "FALSE", "no", "NO", "off", "Off", "0", "\"False\""] {
            assert_eq!(value(v), Ok(false), "{v}");
        }
        for v in ["maybe", "", "t", "y", "2", "01", "enabled", "\" true\"", "\"true"] {
            let (line, message) = value(v).expect_err(v);
            assert_eq!(line, 2, "{v}");
            assert!(message.contains("is not a boolean"), "{v}: {message}");
        }
    }

    #[test]
    fn integers_accepted_and_refused() {
        let value = |v: &str| {
            p(&format!(
                "[DEFAULT]\n\n[image_cache]\nremove_unused_original_minimum_age_seconds={v}\n"
            ))
            .map(|c| c.original_min_age.unwrap())
            .map_err(|e| (e.line, e.message))
        };
        for (v, n) in [("0", 0), ("3600", 3600), ("007", 7), ("'86400'", 86400), ("\" 5 \"", 5)] {
            assert_eq!(value(v), Ok(n), "{v}");
        }
        assert_eq!(value(&MAX_SECS.to_string()), Ok(MAX_SECS));
        for v in ["", "-1", "+5", "1.5", "1e3", "1_000", "0x10", "24h", "\"\"", "5 # s"] {
            let (line, message) = value(v).expect_err(v);
            assert_eq!(line, 4, "{v}");
            assert!(message.contains("is not a non-negative integer"), "{v}: {message}");
        }
        for v in
            ["315360001", "9223372036854775807", "18446744073709551615", "18446744073709551616"]
        {
            let (line, message) = value(v).unwrap_err();
            assert_eq!(
                (line, message),
                (
                    4,
                    format!(
                        "remove_unused_original_minimum_age_seconds: {v:?} is more than \
                         315360000 seconds (ten years), the largest accepted"
                    )
                )
            );
        }
    }

    #[test]
    fn key_value_separators_and_quotes() {
        let c = p("[DEFAULT]\n\
             instances_path:/x:y=z\n\
             [image_cache]\n\
             subdirectory_name='_base'\n\
             remove_unused_base_images=0\n")
        .unwrap();
        // The first of `:` and `=` splits.
        assert_eq!(c.instances_path.as_deref(), Some("/x:y=z"));
        assert_eq!(c.subdirectory_name.as_deref(), Some("_base"));
        assert_eq!(c.remove_unused_base_images, Some(false));
        assert_eq!(split_key_value("a = \""), Some(("a", "")));
        assert_eq!(split_key_value("a = 'b\""), Some(("a", "'b\"")));
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("nova.conf");
        std::fs::write(&good, REALISTIC).unwrap();
        assert_eq!(load(&good).unwrap(), p(REALISTIC).unwrap());

        let missing = dir.path().join("missing.conf");
        let e = load(&missing).unwrap_err();
        assert_eq!((e.path.as_path(), e.line), (missing.as_path(), 0));
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("{}: cannot read: ", missing.display())), "{shown}");

        let bad = dir.path().join("bad.conf");
        std::fs::write(&bad, b"[DEFAULT]\nx = 1\nname = \xff\n").unwrap();
        let e = load(&bad).unwrap_err();
        assert_eq!(e.to_string(), format!("{}:3: not valid UTF-8", bad.display()));

        let broken = dir.path().join("broken.conf");
        std::fs::write(&broken, "[DEFAULT]\ngarbage\n").unwrap();
        assert_eq!(load(&broken).unwrap_err().line, 2);
    }
}
