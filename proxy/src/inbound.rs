//! A request as its client sent it: what every listener's stages read. hyper's
//! requests arrive as one ([`Inbound::from`]); the fast path (`h1_server`)
//! makes its own, with an origin-form target kept as the bytes it came as
//! ([`Target::Origin`]) when they need no parsing.

use bytes::Bytes;
use http::{Extensions, Method, Request, Uri, Version};
use hyper::upgrade::OnUpgrade;

use crate::body::RequestBody;
use crate::fields::Fields;

pub struct Inbound {
    pub method: Method,
    pub target: Target,
    pub version: Version,
    pub fields: Fields,
    /// hyper's extensions of the request (its upgrade among them); none for
    /// a request the fast path read.
    pub extensions: Extensions,
    pub body: RequestBody,
}

impl From<Request<RequestBody>> for Inbound {
    fn from(req: Request<RequestBody>) -> Self {
        let (parts, body) = req.into_parts();
        Inbound {
            method: parts.method,
            target: Target::Uri(parts.uri),
            version: parts.version,
            fields: Fields::Map(parts.headers),
            extensions: parts.extensions,
            body,
        }
    }
}

impl Inbound {
    /// The client's side of the upgrade it asked for (HTTP/1 `Upgrade`,
    /// `CONNECT`), once hyper has sent the response that grants it.
    pub fn on_upgrade(&mut self) -> OnUpgrade {
        let mut carrier = Request::new(());
        std::mem::swap(carrier.extensions_mut(), &mut self.extensions);
        hyper::upgrade::on(&mut carrier)
    }
}

/// A request's target.
#[derive(Debug)]
pub enum Target {
    /// Parsed (every form; hyper's requests, and the fast path's that are
    /// not [`Target::Origin`]).
    Uri(Uri),
    /// An origin-form target (`/path?query`) kept as the bytes it came as.
    Origin(Origin),
}

/// An origin-form target that [`Target::origin`] checked: ASCII, no
/// fragment, and only bytes that [`Uri`] takes as they are, so it parses as
/// itself. Not parsed: its path and query are read straight from its bytes.
#[derive(Debug)]
pub struct Origin {
    bytes: Bytes,
    /// Where the query starts (its `?`), if there is one.
    query: Option<u16>,
}

impl Target {
    /// `bytes` as an origin-form target without parsing, if they are one
    /// [`Uri`] would take as it is; the bytes back for anything that needs
    /// the parser (another form, a fragment, a byte a URI may not hold,
    /// non-ASCII). Only for bytes httparse accepted as a request target (no
    /// controls, no spaces), which this does not check again.
    pub fn origin(bytes: Bytes) -> Result<Target, Bytes> {
        if bytes.first() != Some(&b'/') || bytes.len() >= MAX_TARGET {
            return Err(bytes);
        }
        let (odd, query) = scan(&bytes);
        if odd {
            return Err(bytes);
        }
        // Searched for only where there is one.
        let query = match query {
            true => bytes.iter().position(|&b| b == b'?').map(|at| at as u16),
            false => None,
        };
        Ok(Target::Origin(Origin { bytes, query }))
    }

    /// The parsed target; `None` for an origin-form one kept as its bytes.
    pub fn uri(&self) -> Option<&Uri> {
        match self {
            Target::Uri(uri) => Some(uri),
            Target::Origin(_) => None,
        }
    }

    /// Path and query, as [`Uri::path_and_query`].
    pub fn path_and_query(&self) -> Option<&str> {
        match self {
            Target::Uri(uri) => uri.path_and_query().map(|p| p.as_str()),
            Target::Origin(origin) => Some(origin.text()),
        }
    }

    /// The path, as [`Uri::path`].
    pub fn path(&self) -> &str {
        match self {
            Target::Uri(uri) => uri.path(),
            Target::Origin(origin) => match origin.query {
                Some(at) => &origin.text()[..at as usize],
                None => origin.text(),
            },
        }
    }

    /// The query, as [`Uri::query`]: `Some("")` for a `?` with nothing after.
    pub fn query(&self) -> Option<&str> {
        match self {
            Target::Uri(uri) => uri.query(),
            Target::Origin(origin) => origin.query.map(|at| &origin.text()[at as usize + 1..]),
        }
    }
}

impl Origin {
    /// The target as text.
    #[allow(unsafe_code)]
    fn text(&self) -> &str {
        debug_assert!(self.bytes.is_ascii());
        // SAFETY: `Target::origin`, the only maker of an `Origin`, took no
        // byte from 0x80 up: the bytes are ASCII, which is UTF-8. (Checked
        // for each of them in debug builds, which every test runs.)
        unsafe { std::str::from_utf8_unchecked(&self.bytes) }
    }
}

/// Whether `bytes` hold a byte an [`Origin`] may not (`#`, `<`, `>`, `` ` ``,
/// `"`, non-ASCII), and whether they hold a `?`.
fn scan(bytes: &[u8]) -> (bool, bool) {
    // Every byte is looked at, 16 at a time, without stopping at the first
    // odd one: each block compiles to a few vector compares. The last block
    // overlaps the one before it (or is padded), so no byte is looked at on
    // its own: a loop over the few left over cost more than the blocks.
    let (mut odd, mut query) = ([0u8; 16], [0u8; 16]);
    let mut look = |block: &[u8; 16]| {
        for ((odd, query), &b) in odd.iter_mut().zip(&mut query).zip(block) {
            let refused = (b == b'#') | (b == b'<') | (b == b'>') | (b == b'`') | (b == b'"');
            *odd |= (refused | (b >= 0x80)) as u8;
            *query |= (b == b'?') as u8;
        }
    };
    match bytes.len() {
        len @ 0..16 => {
            let mut padded = [b'/'; 16];
            padded[..len].copy_from_slice(bytes);
            look(&padded);
        }
        len => {
            let mut blocks = bytes.chunks_exact(16);
            for full in &mut blocks {
                look(full.try_into().expect("16 bytes"));
            }
            if !blocks.remainder().is_empty() {
                look(bytes[len - 16..].try_into().expect("16 bytes"));
            }
        }
    }
    (odd != [0; 16], query != [0; 16])
}

/// Longest target [`Uri`] takes (and hyper, which answers 414 beyond it).
const MAX_TARGET: usize = u16::MAX as usize - 1;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte httparse lets into a target, in the path and in the query:
    /// a target kept as its bytes is one `Uri` parses to the same path and
    /// query; the bytes it refuses are only those `Uri` refuses, reads
    /// differently (`#` starts a fragment) or must check as UTF-8.
    #[test]
    fn a_target_kept_as_its_bytes_is_the_one_uri_parses() {
        let mut kept = Vec::new();
        for b in (0x21..=0x7e).chain(0x80..=0xff_u8) {
            for text in [
                [&b"/a"[..], &[b], b"b?c=d"].concat(),
                [&b"/a?c="[..], &[b], b"d"].concat(),
            ] {
                let bytes = Bytes::from(text.clone());
                let Ok(target) = Target::origin(bytes.clone()) else {
                    continue;
                };
                let uri = Uri::from_maybe_shared(bytes).unwrap_or_else(|e| {
                    panic!(
                        "{:?} kept, but Uri refuses it: {e}",
                        text.escape_ascii().to_string()
                    )
                });
                let parsed = Target::Uri(uri);
                assert_eq!(target.path_and_query(), parsed.path_and_query());
                assert_eq!(target.path(), parsed.path());
                assert_eq!(target.query(), parsed.query());
                kept.push(b);
            }
        }
        // What only the parser may see, and nothing else.
        let refused: Vec<u8> = (0x21..=0x7e_u8)
            .filter(|b| kept.iter().filter(|&k| k == b).count() < 2)
            .collect();
        assert_eq!(refused, b"\"#<>`");
        assert!(
            kept.iter().all(|&b| b < 0x80),
            "non-ASCII goes to the parser"
        );
    }

    /// Each odd byte and each `?` is found wherever it is, in targets of
    /// every length around the 16-byte blocks.
    #[test]
    fn the_scan_finds_each_byte_at_every_place() {
        for len in 1..=50 {
            let plain = vec![b'a'; len];
            assert_eq!(scan(&plain), (false, false), "{len}");
            for at in 0..len {
                for (b, found) in [
                    (b'#', (true, false)),
                    (b'"', (true, false)),
                    (b'`', (true, false)),
                    (0xc3, (true, false)),
                    (b'?', (false, true)),
                ] {
                    let mut bytes = plain.clone();
                    bytes[at] = b;
                    assert_eq!(scan(&bytes), found, "{b:#x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn only_origin_form_is_kept() {
        let kept = |t: &'static str| Target::origin(Bytes::from_static(t.as_bytes())).is_ok();
        assert!(kept("/"));
        assert!(kept("/a/b?"));
        assert!(kept("/?x=1?y=2"));
        assert!(!kept("http://example.com/"));
        assert!(!kept("*"));
        assert!(!kept("example.com:443"));
        assert!(!kept(""));
        assert!(!kept("/a#b"));
        let long = format!("/{}", "a".repeat(MAX_TARGET));
        assert!(Target::origin(Bytes::from(long)).is_err());
    }

    #[test]
    fn path_and_query_split_at_the_first_question_mark() {
        let target = Target::origin(Bytes::from_static(b"/a/b?c=d?e")).unwrap();
        assert_eq!(target.path(), "/a/b");
        assert_eq!(target.query(), Some("c=d?e"));
        let bare = Target::origin(Bytes::from_static(b"/a?")).unwrap();
        assert_eq!((bare.path(), bare.query()), ("/a", Some("")));
        let none = Target::origin(Bytes::from_static(b"/a")).unwrap();
        assert_eq!((none.path(), none.query()), ("/a", None));
    }
}
