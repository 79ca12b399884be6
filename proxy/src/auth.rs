//! Authenticating a request against the agent directory, the same for both
//! listeners: credentials parsed from headers without allocating (egress
//! `Proxy-Authorization: Basic base64(agent_id:gateway_token)`, ingress
//! `Authorization: Bearer gateway_token` with the agent id from the route), the
//! directory lookup, the constant-time token comparison, and the binding of a
//! client connection to its first agent.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use uuid::Uuid;

use crate::agent_limits::AgentLimits;
use crate::directory::{Agent, Directory, Lookup};
use crate::gate::StreamGuard;
use crate::rescue::{AuthFailure, ProxyError};
use crate::server::ClientConn;
use crate::telemetry::Listener;

/// The agent `agent_id` if `token` is its gateway token: 407/401 for unknown
/// agents and wrong tokens alike, 503 when the directory cannot tell. `now`:
/// the request's arrival.
pub async fn authenticate(
    directory: &Directory,
    agent_id: Uuid,
    token: &[u8],
    now: Instant,
) -> Result<Arc<Agent>, ProxyError> {
    let agent = match directory.lookup(agent_id, now).await {
        Lookup::Found(agent) => agent,
        Lookup::Unknown => return Err(ProxyError::Auth(AuthFailure::UnknownAgent)),
        Lookup::Unavailable => return Err(ProxyError::DirectoryUnavailable),
    };
    match agent.token_matches(token) {
        true => Ok(agent),
        false => Err(ProxyError::Auth(AuthFailure::BadToken)),
    }
}

/// Whether `presented` is `secret`, in time that depends on their lengths
/// alone: the words' differences are gathered without a branch, a machine
/// word at a time (this runs for every request), and only the total is
/// judged, through `subtle`, as is the tail.
pub fn same_secret(presented: &[u8], secret: &[u8]) -> bool {
    if presented.len() != secret.len() {
        return false;
    }
    let (a, b) = (presented.chunks_exact(8), secret.chunks_exact(8));
    let (a_tail, b_tail) = (a.remainder(), b.remainder());
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("chunks of 8"));
    // Each word is looked at whatever the ones before held: the optimiser
    // sees no value it could stop early on.
    let differ = a.zip(b).fold(0, |differ, (a, b)| {
        differ | std::hint::black_box(word(a) ^ word(b))
    });
    bool::from(differ.ct_eq(&0) & a_tail.ct_eq(b_tail))
}

/// What the agent's requests, streams and tunnels on `listener` watch: its
/// user's gate, its credential and its bandwidth limit. Taken before the
/// decision is checked, so a block landing in between still reaches the stream.
pub fn guard(agent: &Agent, listener: Listener) -> StreamGuard {
    StreamGuard::new(&agent.gate, Some(agent.revoked().clone()))
        .with_bandwidth(agent.bandwidth.clone(), listener)
}

/// Refuse credentials of another agent than the one `conn` is bound to, before
/// looking them up.
pub fn check_binding(conn: &ClientConn, agent_id: Uuid) -> Result<(), ProxyError> {
    match conn.agent.get() {
        Some(bound) if *bound != agent_id => Err(ProxyError::Auth(AuthFailure::OtherAgent)),
        _ => Ok(()),
    }
}

/// Bind `conn` to `agent` (counting it under the agent's connection cap and
/// rate) and the client socket's byte count to the agent's VPS; refused if the
/// connection belongs to another agent, or the agent's VPS changed under the
/// open connection.
pub fn bind(
    conn: &ClientConn,
    agent: &Agent,
    limits: &AgentLimits,
    listener: Listener,
) -> Result<(), ProxyError> {
    let Some(counter) = agent.counter.as_ref() else {
        return Err(ProxyError::NoVps);
    };
    // Egress speaks HTTP/1 only (its `Shape`), one request at a time per
    // connection, so binding cannot race.
    match conn.agent.get() {
        Some(bound) if *bound != agent.agent_id => {
            return Err(ProxyError::Auth(AuthFailure::OtherAgent))
        }
        Some(_) => {}
        None => {
            let held = limits.connection(agent.agent_id, listener)?;
            let _ = conn.held.set(held);
            let _ = conn.agent.set(agent.agent_id);
        }
    }
    match conn.tally.as_ref().is_none_or(|t| t.bind(counter)) {
        true => Ok(()),
        false => Err(ProxyError::Auth(AuthFailure::OtherAgent)),
    }
}

/// Longest decoded `agent_id:token` accepted (a UUID and a 64-char token need 101).
const MAX_CREDENTIALS: usize = 256;

/// Decoded Basic credentials.
pub struct BasicCredentials {
    pub agent_id: Uuid,
    buf: [u8; MAX_CREDENTIALS],
    token_start: usize,
    len: usize,
}

impl BasicCredentials {
    pub fn token(&self) -> &[u8] {
        &self.buf[self.token_start..self.len]
    }
}

/// Parse `Basic base64(agent_id:token)`.
pub fn basic(value: Option<&[u8]>) -> Result<BasicCredentials, AuthFailure> {
    let value = value.ok_or(AuthFailure::Missing)?;
    let (scheme, rest) = split_scheme(value).ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Err(AuthFailure::Scheme);
    }
    let encoded = trim(rest);
    if encoded.len() > MAX_CREDENTIALS * 4 / 3 + 4 {
        return Err(AuthFailure::Malformed);
    }
    let mut buf = [0u8; MAX_CREDENTIALS];
    let len = STANDARD
        .decode_slice(encoded, &mut buf)
        .map_err(|_| AuthFailure::Malformed)?;
    let colon = buf[..len]
        .iter()
        .position(|b| *b == b':')
        .ok_or(AuthFailure::Malformed)?;
    let agent_id = std::str::from_utf8(&buf[..colon])
        .ok()
        .and_then(|s| Uuid::try_parse(s).ok())
        .ok_or(AuthFailure::Malformed)?;
    if colon + 1 == len {
        return Err(AuthFailure::Malformed);
    }
    Ok(BasicCredentials {
        agent_id,
        buf,
        token_start: colon + 1,
        len,
    })
}

/// Parse `Bearer token`; returns the token bytes.
pub fn bearer(value: Option<&[u8]>) -> Result<&[u8], AuthFailure> {
    let value = value.ok_or(AuthFailure::Missing)?;
    let (scheme, rest) = split_scheme(value).ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthFailure::Scheme);
    }
    let token = trim(rest);
    if token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(token)
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let value = trim(value);
    let space = value.iter().position(|b| *b == b' ')?;
    Some((&value[..space], &value[space + 1..]))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn header(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn encode(s: &str) -> String {
        format!("Basic {}", STANDARD.encode(s))
    }

    #[test]
    fn basic_credentials_parse() {
        let id = Uuid::new_v4();
        let h = header(&encode(&format!("{id}:{}", "a".repeat(64))));
        let c = basic(Some(h.as_bytes())).unwrap();
        assert_eq!(c.agent_id, id);
        assert_eq!(c.token(), "a".repeat(64).as_bytes());
        // Scheme is case-insensitive; surrounding blanks are tolerated.
        let h = header(&format!(
            "  bAsIc   {}  ",
            STANDARD.encode(format!("{id}:tok"))
        ));
        assert_eq!(basic(Some(h.as_bytes())).unwrap().token(), b"tok");
    }

    #[test]
    fn basic_failures_are_classified() {
        let id = Uuid::new_v4();
        assert_eq!(basic(None).err(), Some(AuthFailure::Missing));
        assert_eq!(
            basic(Some(header("Bearer abc").as_bytes())).err(),
            Some(AuthFailure::Scheme)
        );
        assert_eq!(
            basic(Some(header("Basic").as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
        assert_eq!(
            basic(Some(header("Basic !!!notbase64").as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
        assert_eq!(
            basic(Some(header(&encode(&format!("{id}tok"))).as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
        assert_eq!(
            basic(Some(header(&encode("not-a-uuid:tok")).as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
        assert_eq!(
            basic(Some(header(&encode(&format!("{id}:"))).as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
        let long = encode(&format!("{id}:{}", "x".repeat(1000)));
        assert_eq!(
            basic(Some(header(&long).as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
    }

    proptest::proptest! {
        #[test]
        fn a_secret_matches_itself_and_nothing_else(
            secret in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            flip in proptest::num::usize::ANY,
            bit in 0u8..8,
        ) {
            proptest::prop_assert!(same_secret(&secret, &secret.clone()));
            // One bit different anywhere, a word or the tail.
            if !secret.is_empty() {
                let mut other = secret.clone();
                other[flip % secret.len()] ^= 1 << bit;
                proptest::prop_assert!(!same_secret(&other, &secret));
            }
            // A prefix or an extension never matches.
            let mut longer = secret.clone();
            longer.push(0);
            proptest::prop_assert!(!same_secret(&longer, &secret));
            proptest::prop_assert!(!same_secret(&secret, &longer));
        }

        #[test]
        fn arbitrary_headers_never_panic(raw in proptest::collection::vec(32u8..127, 0..600)) {
            if let Ok(h) = HeaderValue::from_bytes(&raw) {
                let _ = basic(Some(h.as_bytes()));
                let _ = bearer(Some(h.as_bytes()));
            }
        }

        #[test]
        fn any_encoded_credentials_round_trip(token in "[0-9a-f]{1,150}") {
            let id = Uuid::new_v4();
            let h = header(&encode(&format!("{id}:{token}")));
            let c = basic(Some(h.as_bytes())).unwrap();
            proptest::prop_assert_eq!((c.agent_id, c.token()), (id, token.as_bytes()));
        }
    }

    #[test]
    fn bearer_tokens_parse() {
        assert_eq!(
            bearer(Some(header("Bearer abc").as_bytes())).unwrap(),
            b"abc"
        );
        assert_eq!(
            bearer(Some(header("bearer   abc ").as_bytes())).unwrap(),
            b"abc"
        );
        assert_eq!(bearer(None).err(), Some(AuthFailure::Missing));
        assert_eq!(
            bearer(Some(header("Basic abc").as_bytes())).err(),
            Some(AuthFailure::Scheme)
        );
        assert_eq!(
            bearer(Some(header("Bearer ").as_bytes())).err(),
            Some(AuthFailure::Malformed)
        );
    }
}
