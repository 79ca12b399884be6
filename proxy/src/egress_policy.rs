//! Which destinations agents may reach (SPEC §4.1, SSRF).
//!
//! A destination host is either an IP literal or a name. Literals are parsed the
//! way `inet_aton` and browsers do (`2130706433`, `0x7f.0.0.1`, `0177.1` are all
//! 127.0.0.1), so no spelling slips past the check. Names are resolved once; every
//! resolved address must pass, and the proxy connects only to those addresses
//! (never resolving again), so DNS rebinding cannot swap in a private address.
//!
//! An address passes unless it is in `deny_cidrs`, or it is in the built-in deny
//! list and not in `allow_cidrs`. The built-in list covers loopback, RFC 1918,
//! 100.64/10, link-local (incl. 169.254.169.254), multicast, broadcast,
//! unspecified, reserved and documentation ranges, IPv6 ULA and link-local.
//! An IPv6 address that carries an IPv4 address (IPv4-mapped, IPv4-compatible,
//! NAT64, 6to4) is judged as both: each must pass, against the built-in list
//! and against both operator lists, so no spelling of a denied IPv4 address
//! gets through and no allow entry opens more than it contains.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use ipnet::IpNet;
use tokio::net::TcpStream;

use tollgate_core::config::EgressConfig;

/// Why a destination is refused. The string forms go in the `X-Tollgate-Deny-Reason`
/// header, the JSON body, and the `reason` label of `tollgate_egress_denials_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    Loopback,
    Private,
    SharedAddressSpace,
    LinkLocal,
    Multicast,
    Broadcast,
    Unspecified,
    Reserved,
    Documentation,
    UniqueLocal,
    DeniedCidr,
    PortNotAllowed,
    /// A deny rule of the agent's egress policy ([`crate::agent_policy`]).
    PolicyRule,
    /// The agent's egress policy denies what no rule allows.
    PolicyDefault,
    /// The agent has an egress policy this proxy has not been able to read yet.
    PolicyUnavailable,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Loopback => "loopback",
            DenyReason::Private => "private",
            DenyReason::SharedAddressSpace => "shared_address_space",
            DenyReason::LinkLocal => "link_local",
            DenyReason::Multicast => "multicast",
            DenyReason::Broadcast => "broadcast",
            DenyReason::Unspecified => "unspecified",
            DenyReason::Reserved => "reserved",
            DenyReason::Documentation => "documentation",
            DenyReason::UniqueLocal => "unique_local",
            DenyReason::DeniedCidr => "denied_cidr",
            DenyReason::PortNotAllowed => "port_not_allowed",
            DenyReason::PolicyRule => "policy_rule",
            DenyReason::PolicyDefault => "policy_default",
            DenyReason::PolicyUnavailable => "policy_unavailable",
        }
    }
}

/// A destination host as written in a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    /// The name, when the host is one (not an IP literal).
    pub fn name(&self) -> Option<&str> {
        match self {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }
}

impl std::fmt::Display for Host {
    /// The host as it goes in an authority: `[v6]`, `v4` or the name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Parse the host part of an authority (`[::1]`, `10.0.0.1`, `0x7f.1`, `example.com`).
/// `None` if it is neither an IP literal nor a valid DNS name.
pub fn parse_host(host: &str) -> Option<Host> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // Zone ids (`%eth0`) are refused: they name an interface, not a destination.
        return inner
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    if let Some(ip) = parse_ipv4_lenient(host) {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return None;
    }
    // A name whose last label is all digits would be read as an address by some
    // resolvers (and is not a valid TLD): refuse rather than guess.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    Some(Host::Name(name))
}

/// IPv4 in any form `inet_aton` accepts: 1 to 4 parts, each decimal, octal
/// (leading 0) or hex (0x), the last part filling the remaining bytes.
pub fn parse_ipv4_lenient(s: &str) -> Option<Ipv4Addr> {
    let s = s.strip_suffix('.').unwrap_or(s);
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) =
            if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                (hex, 16)
            } else if part.len() > 1 && part.starts_with('0') {
                (&part[1..], 8)
            } else {
                (*part, 10)
            };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let value = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        values.push(value);
    }
    let (last, init) = values.split_last()?;
    if init.iter().any(|v| *v > 255) {
        return None;
    }
    let remaining_bits = 8 * (4 - init.len() as u32);
    if remaining_bits < 64 && *last >= (1u64 << remaining_bits) {
        return None;
    }
    let mut addr: u32 = 0;
    for (i, v) in init.iter().enumerate() {
        addr |= (*v as u32) << (24 - 8 * i);
    }
    Some(Ipv4Addr::from(addr | *last as u32))
}

/// The built-in reason an IPv4 address is refused, if any.
fn builtin_v4(ip: Ipv4Addr) -> Option<DenyReason> {
    let o = ip.octets();
    let reason = match o {
        [0, ..] if ip.is_unspecified() => DenyReason::Unspecified,
        [0, ..] => DenyReason::Reserved, // "this network"
        [127, ..] => DenyReason::Loopback,
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => DenyReason::Private,
        [100, 64..=127, ..] => DenyReason::SharedAddressSpace,
        [169, 254, ..] => DenyReason::LinkLocal,
        [192, 0, 0, _] => DenyReason::Reserved, // IETF protocol assignments
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => DenyReason::Documentation,
        [192, 88, 99, _] => DenyReason::Reserved, // 6to4 relay anycast
        [198, 18..=19, ..] => DenyReason::Reserved, // benchmarking
        [224..=239, ..] => DenyReason::Multicast,
        [255, 255, 255, 255] => DenyReason::Broadcast,
        [240..=255, ..] => DenyReason::Reserved,
        _ => return None,
    };
    Some(reason)
}

/// The IPv4 address an IPv6 address carries, for the forms that lead to it:
/// IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64
/// (`64:ff9b::/96`) and 6to4 (`2002:aabb:ccdd::/48`).
pub(crate) fn carried_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let (hi, lo) = match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => (hi, lo),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses, not
        // IPv4-compatible ones (RFC 4291 §2.5.5.1).
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => return None,
        [0, 0, 0, 0, 0, 0, hi, lo] => (hi, lo),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => (hi, lo),
        [0x2002, hi, lo, ..] => (hi, lo),
        _ => return None,
    };
    Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
}

/// The built-in reason an IPv6 address is refused, if any, judging the address
/// itself: the IPv4 address a carrying form leads to is judged separately.
fn builtin_v6(ip: Ipv6Addr) -> Option<DenyReason> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(DenyReason::Unspecified);
    }
    if ip.is_loopback() {
        return Some(DenyReason::Loopback);
    }
    if carried_v4(ip).is_some() {
        return None;
    }
    let reason = match s[0] {
        0xfc00..=0xfdff => DenyReason::UniqueLocal,
        0xfe80..=0xfebf => DenyReason::LinkLocal,
        0xfec0..=0xfeff => DenyReason::Reserved, // site-local, deprecated
        0xff00..=0xffff => DenyReason::Multicast,
        0x2001 if s[1] == 0x0db8 => DenyReason::Documentation,
        0x3fff if s[1] <= 0x0fff => DenyReason::Documentation, // 3fff::/20
        0x2001 if s[1] == 0 => DenyReason::Reserved,           // Teredo: hides an IPv4 address
        0x0064 if s[1] == 0xff9b && s[2] == 1 => DenyReason::Reserved, // 64:ff9b:1::/48 local NAT64
        0x0100 if s[1..4] == [0, 0, 0] => DenyReason::Reserved, // discard-only 100::/64
        0x0000 => DenyReason::Reserved, // remaining ::/8 (other than the forms above)
        _ => return None,
    };
    Some(reason)
}

/// The built-in reason an address is refused, if any.
fn builtin(ip: IpAddr) -> Option<DenyReason> {
    match ip {
        IpAddr::V4(v4) => builtin_v4(v4),
        IpAddr::V6(v6) => builtin_v6(v6),
    }
}

/// The configured egress policy.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    connect_ports: Vec<u16>,
    http_ports: Vec<u16>,
}

impl EgressPolicy {
    pub fn from_config(config: &EgressConfig) -> Self {
        Self {
            allow: config.allow_cidrs.clone(),
            deny: config.deny_cidrs.clone(),
            connect_ports: config.connect_ports.clone(),
            http_ports: config.http_ports.clone(),
        }
    }

    /// Whether `ip` may be reached.
    ///
    /// An address is judged together with the IPv4 address it carries, if it is
    /// one of the forms that lead to one (IPv4-mapped, IPv4-compatible, NAT64,
    /// 6to4): both must pass. So `deny_cidrs` catches every spelling of a denied
    /// IPv4 address, and an entry of `allow_cidrs` opens exactly what it
    /// contains: an allowed `2002::/16` does not open the 6to4 form of a denied
    /// IPv4 address, and an allowed IPv4 range does not open `::1`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), DenyReason> {
        let carried = match ip {
            IpAddr::V6(v6) => carried_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let judged = [Some(ip), carried];
        let listed = |nets: &[IpNet], addr: IpAddr| nets.iter().any(|n| n.contains(&addr));
        if judged.iter().flatten().any(|a| listed(&self.deny, *a)) {
            return Err(DenyReason::DeniedCidr);
        }
        for addr in judged.into_iter().flatten() {
            if let Some(reason) = builtin(addr) {
                if !listed(&self.allow, addr) {
                    return Err(reason);
                }
            }
        }
        Ok(())
    }

    /// Whether a CONNECT tunnel may go to `port`.
    pub fn check_connect_port(&self, port: u16) -> Result<(), DenyReason> {
        if self.connect_ports.contains(&port) {
            Ok(())
        } else {
            Err(DenyReason::PortNotAllowed)
        }
    }

    /// Whether a plain HTTP request may go to `port`.
    pub fn check_http_port(&self, port: u16) -> Result<(), DenyReason> {
        if self.http_ports.is_empty() || self.http_ports.contains(&port) {
            Ok(())
        } else {
            Err(DenyReason::PortNotAllowed)
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns a host name into addresses. A seam: tests substitute a fixed table.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (getaddrinfo). `localhost` and `*.localhost` are loopback
/// without asking (RFC 6761).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            if name == "localhost" || name.ends_with(".localhost") {
                return Ok(vec![
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
                ]);
            }
            Ok(tokio::net::lookup_host((name, port)).await?.collect())
        })
    }
}

/// Opens TCP connections to checked addresses. A seam: tests substitute one that
/// can only ever dial loopback.
pub trait Dial: Send + Sync + 'static {
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDialer;

impl Dial for TcpDialer {
    fn dial(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EgressPolicy {
        EgressPolicy::from_config(&EgressConfig::default())
    }

    fn ip(host: &str) -> IpAddr {
        match parse_host(host) {
            Some(Host::Ip(ip)) => ip,
            other => panic!("{host} parsed as {other:?}"),
        }
    }

    #[test]
    fn legacy_ipv4_spellings_are_addresses() {
        for (text, expected) in [
            ("127.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("10.1.65535", "10.1.255.255"),
            ("169.254.169.254", "169.254.169.254"),
            ("0", "0.0.0.0"),
            ("8.8.8.8.", "8.8.8.8"),
            ("0x", "0.0.0.0"), // as inet_aton and browsers read it
        ] {
            assert_eq!(ip(text), expected.parse::<IpAddr>().unwrap(), "{text}");
        }
        for not_ip in ["256.0.0.1", "1.2.3.4.5", "09.1.1.1", "4294967296", "0xg"] {
            assert!(!matches!(parse_host(not_ip), Some(Host::Ip(_))), "{not_ip}");
        }
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(
            parse_host("Example.COM."),
            Some(Host::Name("example.com".into()))
        );
        assert_eq!(parse_host("[::1]"), Some(Host::Ip("::1".parse().unwrap())));
        for bad in [
            "",
            "a..b",
            "-a.com",
            "a b",
            "exa%mple.com",
            "[fe80::1%eth0]",
            "1.2.3.999",
            "x.123",
        ] {
            assert_eq!(parse_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_deny_list() {
        let p = policy();
        let denied = [
            ("127.0.0.1", DenyReason::Loopback),
            ("127.255.0.9", DenyReason::Loopback),
            ("::1", DenyReason::Loopback),
            ("::ffff:127.0.0.1", DenyReason::Loopback),
            ("::127.0.0.1", DenyReason::Loopback),
            ("64:ff9b::7f00:1", DenyReason::Loopback),
            ("2002:7f00:1::", DenyReason::Loopback),
            ("169.254.169.254", DenyReason::LinkLocal),
            ("::ffff:169.254.169.254", DenyReason::LinkLocal),
            ("10.0.0.1", DenyReason::Private),
            ("172.16.0.1", DenyReason::Private),
            ("172.31.255.255", DenyReason::Private),
            ("192.168.1.1", DenyReason::Private),
            ("64:ff9b::a00:1", DenyReason::Private),
            ("100.64.0.1", DenyReason::SharedAddressSpace),
            ("100.127.255.255", DenyReason::SharedAddressSpace),
            ("0.0.0.0", DenyReason::Unspecified),
            ("::", DenyReason::Unspecified),
            ("0.1.2.3", DenyReason::Reserved),
            ("224.0.0.1", DenyReason::Multicast),
            ("ff02::1", DenyReason::Multicast),
            ("255.255.255.255", DenyReason::Broadcast),
            ("240.0.0.1", DenyReason::Reserved),
            ("192.0.2.1", DenyReason::Documentation),
            ("198.51.100.7", DenyReason::Documentation),
            ("203.0.113.9", DenyReason::Documentation),
            ("2001:db8::1", DenyReason::Documentation),
            ("198.18.0.1", DenyReason::Reserved),
            ("fd00::1", DenyReason::UniqueLocal),
            ("fc00::1", DenyReason::UniqueLocal),
            ("fe80::1", DenyReason::LinkLocal),
            ("2001:0:4136:e378::1", DenyReason::Reserved),
        ];
        for (addr, reason) in denied {
            assert_eq!(p.check_ip(addr.parse().unwrap()), Err(reason), "{addr}");
        }
        for allowed in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(p.check_ip(allowed.parse().unwrap()), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn configured_cidrs_allow_and_deny() {
        let config = EgressConfig {
            allow_cidrs: vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.20.0.0/16".parse().unwrap(),
            ],
            deny_cidrs: vec![
                "10.20.30.0/24".parse().unwrap(),
                "8.8.4.0/24".parse().unwrap(),
            ],
            ..EgressConfig::default()
        };
        let p = EgressPolicy::from_config(&config);
        assert_eq!(p.check_ip("127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(p.check_ip("::ffff:127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(p.check_ip("10.20.1.1".parse().unwrap()), Ok(()));
        assert_eq!(
            p.check_ip("10.20.30.1".parse().unwrap()),
            Err(DenyReason::DeniedCidr)
        );
        assert_eq!(
            p.check_ip("8.8.4.4".parse().unwrap()),
            Err(DenyReason::DeniedCidr)
        );
        assert_eq!(
            p.check_ip("10.21.0.1".parse().unwrap()),
            Err(DenyReason::Private)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_hosts_never_panic_and_literals_are_checked(host in "\\PC{0,80}") {
            let p = policy();
            if let Some(Host::Ip(ip)) = parse_host(&host) {
                let _ = p.check_ip(ip);
            }
        }

        #[test]
        fn every_spelling_of_a_loopback_address_is_refused(a in 0u32..=0x00ff_ffff) {
            let ip = std::net::Ipv4Addr::from(0x7f00_0000 | a);
            for text in [ip.to_string(), u32::from(ip).to_string(), format!("0x{:x}", u32::from(ip))] {
                match parse_host(&text) {
                    Some(Host::Ip(parsed)) => proptest::prop_assert_eq!(policy().check_ip(parsed), Err(DenyReason::Loopback)),
                    other => proptest::prop_assert!(false, "{} parsed as {:?}", text, other),
                }
            }
        }
    }

    /// Every way to write an IPv4 address: as itself, and in each IPv6 form
    /// that leads to it (6to4 with any subnet and interface bits). `::` and
    /// `::1` are IPv6's own addresses, not IPv4-compatible spellings of 0.0.0.0
    /// and 0.0.0.1.
    fn spellings(v4: Ipv4Addr, subnet: u16, interface: u64) -> Vec<IpAddr> {
        let [hi, lo] = [(u32::from(v4) >> 16) as u16, u32::from(v4) as u16];
        let [i0, i1, i2, i3] = [48, 32, 16, 0].map(|shift| (interface >> shift) as u16);
        let mut all = vec![
            IpAddr::V4(v4),
            IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo)),
            IpAddr::V6(Ipv6Addr::new(0x2002, hi, lo, subnet, i0, i1, i2, i3)),
        ];
        if u32::from(v4) > 1 {
            all.push(IpAddr::V6(v4.to_ipv6_compatible()));
        }
        all
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// Allow entries that cover every IPv6 form carrying an IPv4 address.
    const CARRIER_ALLOWS: &[&str] = &["2002::/16", "64:ff9b::/96", "::ffff:0:0/96", "::/96"];

    #[test]
    fn the_operator_deny_list_catches_every_spelling() {
        let p = EgressPolicy::from_config(&EgressConfig {
            deny_cidrs: nets(&["93.184.216.0/24"]),
            allow_cidrs: nets(CARRIER_ALLOWS),
            ..EgressConfig::default()
        });
        let target: Ipv4Addr = "93.184.216.34".parse().unwrap();
        for addr in spellings(target, 0, 0)
            .into_iter()
            .chain(spellings(target, 0xbeef, 1))
        {
            assert_eq!(p.check_ip(addr), Err(DenyReason::DeniedCidr), "{addr}");
        }
        for text in [
            "1572395042",
            "0x5db8d822",
            "0135.0270.0330.042",
            "93.184.55330",
            "[::ffff:93.184.216.34]",
            "[::93.184.216.34]",
            "[64:ff9b::5db8:d822]",
            "[2002:5db8:d822::1]",
        ] {
            assert_eq!(p.check_ip(ip(text)), Err(DenyReason::DeniedCidr), "{text}");
        }
        // Its neighbours outside the denied range still pass, in every form.
        for addr in spellings("93.184.217.34".parse().unwrap(), 7, 7) {
            assert_eq!(p.check_ip(addr), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allow_entries_open_only_what_they_contain() {
        let p = EgressPolicy::from_config(&EgressConfig {
            allow_cidrs: nets(&["2002::/16", "64:ff9b::/96", "0.0.0.0/8", "203.0.113.0/24"]),
            ..EgressConfig::default()
        });
        let refused = [
            // 6to4 and NAT64 forms of denied IPv4 stay denied under a v6 allow.
            ("2002:7f00:1::", DenyReason::Loopback),
            ("2002:a9fe:a9fe::1", DenyReason::LinkLocal),
            ("64:ff9b::a00:1", DenyReason::Private),
            ("64:ff9b::7f00:1", DenyReason::Loopback),
            // An IPv4 allow does not open IPv6's own loopback or unspecified,
            // whose IPv4-compatible reading (0.0.0.1, 0.0.0.0) it contains.
            ("::1", DenyReason::Loopback),
            ("::", DenyReason::Unspecified),
            ("::ffff:10.0.0.1", DenyReason::Private),
        ];
        for (addr, reason) in refused {
            assert_eq!(p.check_ip(addr.parse().unwrap()), Err(reason), "{addr}");
        }
        // An allow entry for IPv6 loopback opens it (and nothing else).
        let loopback = EgressPolicy::from_config(&EgressConfig {
            allow_cidrs: nets(&["::1/128"]),
            ..EgressConfig::default()
        });
        assert_eq!(loopback.check_ip("::1".parse().unwrap()), Ok(()));
        assert_eq!(
            loopback.check_ip("::2".parse().unwrap()),
            Err(DenyReason::Reserved)
        );
        for addr in [
            "2002:808:808::",
            "64:ff9b::808:808",
            "203.0.113.7",
            "::ffff:203.0.113.7",
            "64:ff9b::cb00:7107",
            "2002:cb00:7107::1",
        ] {
            assert_eq!(p.check_ip(addr.parse().unwrap()), Ok(()), "{addr}");
        }
    }

    proptest::proptest! {
        /// Whatever the allow list says about the IPv6 forms, every spelling of
        /// an IPv4 address the built-in list denies is denied.
        #[test]
        fn every_spelling_of_a_builtin_denied_ipv4_address_is_denied(
            a in proptest::prelude::any::<u32>(),
            subnet in proptest::prelude::any::<u16>(),
            interface in proptest::prelude::any::<u64>(),
        ) {
            let v4 = Ipv4Addr::from(a);
            let p = EgressPolicy::from_config(&EgressConfig {
                allow_cidrs: nets(CARRIER_ALLOWS),
                ..EgressConfig::default()
            });
            let denied = builtin_v4(v4).is_some();
            for addr in spellings(v4, subnet, interface) {
                proptest::prop_assert_eq!(p.check_ip(addr).is_err(), denied, "{}", addr);
            }
        }

        /// Every spelling of an IPv4 address in `deny_cidrs` is refused as such,
        /// allow lists notwithstanding.
        #[test]
        fn every_spelling_of_an_operator_denied_ipv4_address_is_denied(
            a in proptest::prelude::any::<u32>(),
            prefix in 8u8..=32,
            subnet in proptest::prelude::any::<u16>(),
            interface in proptest::prelude::any::<u64>(),
        ) {
            let v4 = Ipv4Addr::from(a);
            let net = ipnet::Ipv4Net::new(v4, prefix).unwrap().trunc();
            let mut allow = nets(CARRIER_ALLOWS);
            allow.push(IpNet::V4(net));
            let p = EgressPolicy::from_config(&EgressConfig {
                deny_cidrs: vec![IpNet::V4(net)],
                allow_cidrs: allow,
                ..EgressConfig::default()
            });
            for addr in spellings(v4, subnet, interface) {
                proptest::prop_assert_eq!(p.check_ip(addr), Err(DenyReason::DeniedCidr), "{}", addr);
            }
            for text in [v4.to_string(), a.to_string(), format!("0x{a:x}")] {
                proptest::prop_assert_eq!(p.check_ip(ip(&text)), Err(DenyReason::DeniedCidr), "{}", text);
            }
        }
    }

    #[test]
    fn ports() {
        let p = policy();
        assert_eq!(p.check_connect_port(443), Ok(()));
        assert_eq!(p.check_connect_port(22), Err(DenyReason::PortNotAllowed));
        assert_eq!(p.check_http_port(8080), Ok(()));
        let strict = EgressPolicy::from_config(&EgressConfig {
            http_ports: vec![80],
            ..EgressConfig::default()
        });
        assert_eq!(
            strict.check_http_port(8080),
            Err(DenyReason::PortNotAllowed)
        );
    }
}
