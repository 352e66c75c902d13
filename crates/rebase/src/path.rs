//! Request path checks and joining onto the backend's base path.

use std::borrow::Cow;

/// Decoding rounds applied to a segment. A backend (or a proxy in front of it) that decodes more
/// than once could turn `%252e` into `.`; three rounds cover any sane stack, and a segment still
/// encoded after that is refused.
const MAX_DECODE_ROUNDS: usize = 3;

/// Whether a request path may be forwarded below a base path.
///
/// The path must be in origin form (start with `/`) and contain no backslash. No segment may be a
/// dot segment (`.`, `..`, also with a `;` parameter as in `..;x`), literally or once decoded, up
/// to [`MAX_DECODE_ROUNDS`] times, and no segment may contain an encoded slash or backslash, or
/// decode to bytes that are not UTF-8 (overlong encodings of `.` such as `%c0%ae`). A first-round
/// malformed escape (`%zz`, IIS-style `%u002e`) is refused, since backends disagree on it.
///
/// Paths without `%` are checked without allocating.
pub(crate) fn is_allowed(path: &str) -> bool {
    let Some(rest) = path.as_bytes().strip_prefix(b"/") else {
        return false;
    };
    is_plain(rest) || (!rest.contains(&b'\\') && rest.split(|&b| b == b'/').all(segment_allowed))
}

/// A path (after its leading `/`) with no `%`, no backslash and no segment starting with `.`:
/// allowed as it is. Only the bytes that could matter are visited (`memchr` finds them a vector
/// at a time); every other path takes the full check.
fn is_plain(rest: &[u8]) -> bool {
    memchr::memchr3_iter(b'%', b'\\', b'.', rest)
        .all(|at| rest[at] == b'.' && at > 0 && rest[at - 1] != b'/')
}

fn segment_allowed(segment: &[u8]) -> bool {
    if is_dot_segment(segment) {
        return false;
    }
    let mut current = Cow::Borrowed(segment);
    for round in 0..MAX_DECODE_ROUNDS {
        if !current.contains(&b'%') {
            return true;
        }
        let Decoded {
            bytes,
            changed,
            malformed,
        } = decode(&current);
        if malformed && round == 0 {
            return false;
        }
        if !changed {
            // Only literal `%` signs remain (sent encoded as `%25`): nothing more to decode.
            return true;
        }
        if bytes.contains(&b'/')
            || bytes.contains(&b'\\')
            || is_dot_segment(&bytes)
            || std::str::from_utf8(&bytes).is_err()
        {
            return false;
        }
        current = Cow::Owned(bytes);
    }
    !decode(&current).changed
}

/// `.` or `..`, ignoring a `;` path parameter, which some servers strip before normalizing.
fn is_dot_segment(segment: &[u8]) -> bool {
    let name = match segment.iter().position(|&b| b == b';') {
        Some(end) => &segment[..end],
        None => segment,
    };
    name == b"." || name == b".."
}

struct Decoded {
    bytes: Vec<u8>,
    /// At least one escape was decoded.
    changed: bool,
    /// At least one `%` was not followed by two hex digits; it was kept as is.
    malformed: bool,
}

fn decode(input: &[u8]) -> Decoded {
    let mut bytes = Vec::with_capacity(input.len());
    let mut changed = false;
    let mut malformed = false;
    let mut i = 0;
    while i < input.len() {
        let escape = match input.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)),
            _ => None,
        };
        match escape {
            Some((hi, lo)) => {
                bytes.push((hi << 4) | lo);
                changed = true;
                i += 3;
            }
            None => {
                malformed |= input[i] == b'%';
                bytes.push(input[i]);
                i += 1;
            }
        }
    }
    Decoded {
        bytes,
        changed,
        malformed,
    }
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// `base` without trailing slashes, so joining never doubles the slash at the joint.
pub(crate) fn trim_base(base: &str) -> &str {
    base.trim_end_matches('/')
}

/// A short, bounded preview of a refused path for error messages.
pub(crate) fn preview(path: &str) -> String {
    const MAX: usize = 64;
    if path.len() <= MAX {
        return path.to_owned();
    }
    let mut end = MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_ordinary_paths() {
        for path in [
            "/",
            "/openai/deployments/gpt-4o/chat/completions",
            "/deployments/my.model-v1_2/embeddings",
            "/files/file-abc/content",
            "/trailing/",
            "/a//b",
            "/.well-known/x",
            "/...",
            "/..a",
            "/a.b.",
            "/%41%42",
            "/50%25",
            "/%25zz",
            "/caf%C3%A9",
            "/;jsessionid=1",
        ] {
            assert!(is_allowed(path), "{path} should be allowed");
        }
    }

    #[test]
    fn refuses_paths_that_could_climb() {
        for path in [
            "",
            "*",
            "deployments/x",
            "/..",
            "/.",
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/a/.",
            "/%2e%2e",
            "/%2E%2E/x",
            "/%2E.",
            "/.%2e",
            "/a/%2e",
            "/%2f..",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/..\\x",
            "/..;/admin",
            "/.;x",
            "/%252e%252e",
            "/%25252e",
            "/%252f",
            "/%25zz%252f..",
            "/%2525252e",
            "/%c0%ae%c0%ae",
            "/%zz",
            "/%u002e%u002e",
            "/a%2",
        ] {
            assert!(!is_allowed(path), "{path} should be refused");
        }
    }

    #[test]
    fn only_paths_without_escapes_backslashes_or_leading_dots_skip_the_full_check() {
        for rest in [
            "",
            "openai/deployments/gpt-4.1-mini/chat/completions",
            "a./b.c",
            "a//b",
        ] {
            assert!(is_plain(rest.as_bytes()), "{rest} is plain");
        }
        for rest in [".well-known", "a/.b", "a//.", "a%41", "a\\b", "..", "a/.."] {
            assert!(!is_plain(rest.as_bytes()), "{rest} takes the full check");
        }
    }

    #[test]
    fn trims_trailing_slashes_of_the_base() {
        assert_eq!(trim_base(""), "");
        assert_eq!(trim_base("/"), "");
        assert_eq!(trim_base("/openai"), "/openai");
        assert_eq!(trim_base("/openai//"), "/openai");
    }

    #[test]
    fn previews_are_bounded() {
        assert_eq!(preview("/short"), "/short");
        let long = format!("/{}", "é".repeat(100));
        let shown = preview(&long);
        assert!(shown.len() <= 64 + 3, "{shown}");
        assert!(shown.ends_with("..."));
    }
}
