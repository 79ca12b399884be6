//! A minimal HTTP/1.1 client over one TCP connection that counts every byte it
//! writes and reads, for the measurements that need exact socket byte counts or
//! thousands of connections (tunnels, idle keep-alives, enforcement).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Connection {
    pub stream: TcpStream,
    /// Bytes read past the last response (the start of a tunnel's data).
    pub leftover: Vec<u8>,
    pub written: u64,
    pub read: u64,
}

/// The status of a response (its body has been read).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            leftover: Vec::new(),
            written: 0,
            read: 0,
        })
    }

    /// Send `request` and read one response. With `tunnel`, the response has no
    /// body (a CONNECT answer) and whatever follows stays in `leftover`.
    pub async fn exchange(&mut self, request: &[u8], tunnel: bool) -> io::Result<Response> {
        self.stream.write_all(request).await?;
        self.written += request.len() as u64;
        let mut buf = std::mem::take(&mut self.leftover);
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill(&mut buf).await?;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line in {head:?}")))?;
        let body_len = if tunnel {
            0
        } else {
            head.lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| invalid(format!("no content-length in {head:?}")))?
        };
        while buf.len() < head_end + body_len {
            self.fill(&mut buf).await?;
        }
        self.leftover = buf.split_off(head_end + body_len);
        Ok(Response { status })
    }

    async fn fill(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.read += n as u64;
        buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `GET {target}` with the given headers, keep-alive.
pub fn get(target: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut req = format!("GET {target} HTTP/1.1\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// `CONNECT {authority}` with the given headers.
pub fn connect(authority: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}
