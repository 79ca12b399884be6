//! A hostile tenant against the request path's own rules: destinations the
//! operator's lists deny, written in every address form that leads to them, and
//! request smuggling after tricks meant to switch the smuggling guard off. Real
//! PostgreSQL, real sockets, raw TCP clients; destinations resolve from a fixed
//! table and the dialer can only ever reach loopback, so no test here can send
//! a packet to a non-loopback address even if a refusal is broken.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::client::{assert_refused_both_ways, exchange, get_request};
use support::hostile::{closes, loopback_seams, read_response, LoopbackOnlyDialer};
use support::origin::Origin;
use support::proxy::{test_config, TestProxy};
use support::TestDb;

/// The operator's deny list catches a denied IPv4 address in every IPv6 form
/// that leads to it (IPv4-mapped, IPv4-compatible, NAT64, 6to4), literal or
/// behind a name, and allow entries for those IPv6 ranges do not open the
/// forms of addresses the built-in list denies.
#[tokio::test]
async fn every_spelling_of_a_denied_address_is_refused_without_dialing() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let mut config = test_config(&db.url);
    config.proxy.egress.deny_cidrs = vec!["93.184.216.0/24".parse().unwrap()];
    config.proxy.egress.allow_cidrs = ["2002::/16", "64:ff9b::/96", "::ffff:0:0/96", "0.0.0.0/8"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    config.proxy.egress.connect_ports = vec![443, 80];
    let table = HashMap::from([
        ("nat64.example", vec!["64:ff9b::5db8:d822".parse().unwrap()]),
        (
            "sixtofour.example",
            vec!["2002:5db8:d822::1".parse().unwrap()],
        ),
        (
            "metadata6to4.example",
            vec!["2002:a9fe:a9fe::".parse().unwrap()],
        ),
    ]);
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let proxy = TestProxy::start_with(config, loopback_seams(table, dialer.clone())).await;
    let auth = f.basic();
    let cases = [
        ("93.184.216.34", "denied_cidr"),
        ("1572395042", "denied_cidr"),
        ("[::ffff:93.184.216.34]", "denied_cidr"),
        ("[::93.184.216.34]", "denied_cidr"),
        ("[64:ff9b::5db8:d822]", "denied_cidr"),
        ("[2002:5db8:d822::1]", "denied_cidr"),
        ("[2002:5db8:d822:ffff:1:2:3:4]", "denied_cidr"),
        ("nat64.example", "denied_cidr"),
        ("sixtofour.example", "denied_cidr"),
        // Allowed IPv6 ranges do not open the forms of built-in-denied IPv4.
        ("[2002:7f00:1::]", "loopback"),
        ("[64:ff9b::7f00:1]", "loopback"),
        ("[64:ff9b::a00:1]", "private"),
        ("[::ffff:10.0.0.1]", "private"),
        ("metadata6to4.example", "link_local"),
        // An allowed IPv4 range does not open IPv6 loopback, whose
        // IPv4-compatible reading (0.0.0.1) it contains.
        ("[::1]", "loopback"),
    ];
    for (host, reason) in cases {
        assert_refused_both_ways(proxy.egress, &auth, host, reason).await;
    }
    assert_eq!(dialer.attempts(), [], "refused destinations were dialed");
    proxy.stop().await;
}

/// Ports outside 1..=65535 are refused, never replaced by a default.
#[tokio::test]
async fn an_out_of_range_port_is_a_bad_request() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let proxy = TestProxy::start_with(
        test_config(&db.url),
        loopback_seams(HashMap::new(), dialer.clone()),
    )
    .await;
    for authority in [
        "127.0.0.1:+80",
        "127.0.0.1:99999",
        "127.0.0.1:65536",
        "127.0.0.1:0",
        "localhost:99999",
    ] {
        let ex = exchange(
            proxy.egress,
            &get_request(&format!("http://{authority}/"), &f.basic()),
        )
        .await;
        assert_eq!(ex.status, 400, "http://{authority}/: {}", ex.head);
    }
    assert_eq!(dialer.attempts(), [], "a bad port was dialed");
    // The proxy still serves a good one.
    let ok = exchange(
        proxy.egress,
        &get_request(&origin.url("/status/204"), &f.basic()),
    )
    .await;
    assert_eq!(ok.status, 204, "{}", ok.head);
    proxy.stop().await;
}

/// Requests that once switched the smuggling guard off for the rest of the
/// connection: each is answered, and then a request carrying both
/// `Content-Length` and `Transfer-Encoding` on the same connection still gets
/// 400 and the connection closes, with nothing more reaching the origin.
async fn smuggling_is_refused_after_each_trick(
    listener: std::net::SocketAddr,
    origin: &Origin,
    tricks: &[(&str, String, u16)],
    smuggled: &str,
) {
    for (name, trick, expected) in tricks {
        let mut s = TcpStream::connect(listener).await.unwrap();
        s.write_all(trick.as_bytes()).await.unwrap();
        let answer = read_response(&mut s).await;
        assert_eq!(answer.status, *expected, "{name}: {}", answer.head);
        let origin_read = origin.socket_bytes().0;

        s.write_all(smuggled.as_bytes()).await.unwrap();
        let refused = read_response(&mut s).await;
        assert_eq!(refused.status, 400, "after {name}: {}", refused.head);
        assert!(closes(&mut s).await, "after {name}: connection left open");
        assert_eq!(
            origin.socket_bytes().0,
            origin_read,
            "after {name}: the smuggled request reached the origin"
        );
    }
}

#[tokio::test]
async fn egress_refuses_smuggling_after_upgrade_connect_and_bare_lf_tricks() {
    let db = TestDb::new().await;
    let f = db.fixture("fly").await;
    let origin = Origin::start().await;
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let proxy =
        TestProxy::start_with(test_config(&db.url), loopback_seams(HashMap::new(), dialer)).await;
    let (auth, at) = (f.basic(), origin.addr);
    let tricks = [
        (
            "a stray Upgrade header",
            format!("GET http://{at}/status/204 HTTP/1.1\r\nhost: {at}\r\nproxy-authorization: {auth}\r\nupgrade: websocket\r\n\r\n"),
            204,
        ),
        (
            "a refused CONNECT",
            format!("CONNECT {at} HTTP/1.1\r\nhost: {at}\r\nproxy-authorization: {auth}\r\n\r\n"),
            403,
        ),
        (
            "bare-LF line endings",
            format!("GET http://{at}/status/204 HTTP/1.1\nhost: {at}\nproxy-authorization: {auth}\n\n"),
            204,
        ),
    ];
    let smuggled = format!(
        "POST http://{at}/echo HTTP/1.1\r\nhost: {at}\r\nproxy-authorization: {auth}\r\n\
         content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: {at}\r\n\r\n"
    );
    smuggling_is_refused_after_each_trick(proxy.egress, &origin, &tricks, &smuggled).await;
    proxy.stop().await;
}

#[tokio::test]
async fn ingress_refuses_smuggling_after_upgrade_connect_and_bare_lf_tricks() {
    let db = TestDb::new().await;
    let f = db.fixture("k8s").await;
    let gateway = Origin::start().await;
    let mut config = test_config(&db.url);
    config.proxy.ingress.gateway_port = gateway.addr.port();
    let dialer = Arc::new(LoopbackOnlyDialer::default());
    let proxy = TestProxy::start_with(config, loopback_seams(HashMap::new(), dialer)).await;
    let ingress = proxy.ingress.unwrap();
    let (bearer, path) = (
        format!("Bearer {}", f.token),
        format!("/agents/{}/gateway", f.agent),
    );
    let tricks = [
        (
            "a stray Upgrade header",
            format!("GET {path}/status/204 HTTP/1.1\r\nhost: x\r\nauthorization: {bearer}\r\nupgrade: websocket\r\n\r\n"),
            204,
        ),
        (
            "a refused CONNECT",
            "CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n".to_owned(),
            404,
        ),
        (
            "bare-LF line endings",
            format!("GET {path}/status/204 HTTP/1.1\nhost: x\nauthorization: {bearer}\n\n"),
            204,
        ),
    ];
    let smuggled = format!(
        "POST {path}/echo HTTP/1.1\r\nhost: x\r\nauthorization: {bearer}\r\n\
         content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
    );
    smuggling_is_refused_after_each_trick(ingress, &gateway, &tricks, &smuggled).await;
    proxy.stop().await;
}
