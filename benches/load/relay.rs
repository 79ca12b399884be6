//! Reference relays for the CONNECT rows: what any relay process gets on this
//! machine, with no proxy logic at all. Each runs as its own process (`load relay
//! --kind ...`) pinned to the server core, relays every connection on a loopback
//! port to the origin's bulk source, and exits when its stdin closes:
//! - `tokio-copy`: tokio's `copy_bidirectional_with_sizes` with 256 KiB buffers
//!   on one current-thread runtime (a tokio proxy's relay without the proxy);
//! - `read-write`: the minimal relay, a blocking `read` then `write_all` loop
//!   with one 256 KiB buffer per direction, each direction on its own thread (a
//!   bulk tunnel only sends downstream, so one thread does all the work): the
//!   fewest system calls a copying relay can make, and no event loop;
//! - `splice`: blocking `splice(2)` from one socket into a 256 KiB pipe and from
//!   the pipe into the other socket, one thread per direction: the bytes never
//!   reach user space.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::ChildStdout;

use anyhow::Context;
use clap::ValueEnum;

use crate::servers::Process;

/// Buffer of every reference relay, per direction (the pipe's size for splice).
const BUFFER: usize = 256 * 1024;

/// How a reference relay moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RelayKind {
    TokioCopy,
    ReadWrite,
    Splice,
}

impl RelayKind {
    pub const ALL: [RelayKind; 3] = [
        RelayKind::TokioCopy,
        RelayKind::ReadWrite,
        RelayKind::Splice,
    ];

    /// Its row in the report.
    pub fn label(self) -> &'static str {
        match self {
            RelayKind::TokioCopy => crate::BARE_RELAY,
            RelayKind::ReadWrite => crate::MINIMAL_RELAY,
            RelayKind::Splice => crate::SPLICE_RELAY,
        }
    }

    /// Its `--kind` on the command line.
    fn flag(self) -> &'static str {
        match self {
            RelayKind::TokioCopy => "tokio-copy",
            RelayKind::ReadWrite => "read-write",
            RelayKind::Splice => "splice",
        }
    }
}

/// A reference relay process and its port; stopped on drop.
pub struct Relay {
    pub port: u16,
    pub process: Process,
    _stdout: ChildStdout,
}

impl Relay {
    /// Start `load relay --kind <kind>` to `upstream`, pinned to `cpu`.
    pub fn start(
        kind: RelayKind,
        cpu: usize,
        upstream: u16,
        dir: &std::path::Path,
    ) -> anyhow::Result<Relay> {
        let upstream = upstream.to_string();
        let log = dir.join(format!("relay-{}.log", kind.flag()));
        let (process, line, stdout) = crate::origin::start_internal(
            "relay",
            cpu,
            &["--upstream", &upstream, "--kind", kind.flag()],
            &log,
        )?;
        Ok(Relay {
            port: crate::origin::port_in(&line, "port=")?,
            process,
            _stdout: stdout,
        })
    }
}

/// Relay every connection on a loopback port to `upstream`, byte for byte,
/// until stdin closes. Runs in the `relay` child process.
pub fn serve(kind: RelayKind, upstream: u16) -> anyhow::Result<()> {
    std::thread::spawn(|| {
        let _ = io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    match kind {
        RelayKind::TokioCopy => serve_tokio_copy(upstream),
        RelayKind::ReadWrite | RelayKind::Splice => serve_blocking(kind, upstream),
    }
}

fn announce(port: u16) -> io::Result<()> {
    println!("relay port={port}");
    io::stdout().flush()
}

fn serve_tokio_copy(upstream: u16) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        announce(listener.local_addr()?.port())?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut server,
                    BUFFER,
                    BUFFER,
                )
                .await;
            });
        }
    })
}

fn serve_blocking(kind: RelayKind, upstream: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    announce(listener.local_addr()?.port())?;
    for client in listener.incoming() {
        let client = client.context("accepting")?;
        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
            continue;
        };
        let directions = [(server.try_clone()?, client.try_clone()?), (client, server)];
        for (from, to) in directions {
            std::thread::spawn(move || {
                let _ = match kind {
                    RelayKind::Splice => splice_through_pipe(&from, &to),
                    _ => read_write(&from, &to),
                };
                // Pass the end of this direction on, as a proxy would.
                let _ = to.shutdown(Shutdown::Write);
            });
        }
    }
    Ok(())
}

/// Copy `from` to `to` until `from` ends: read into one buffer, write it all.
fn read_write(mut from: &TcpStream, mut to: &TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

/// Move `from` to `to` until `from` ends, through a pipe, without copying to
/// user space.
fn splice_through_pipe(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (pipe_out, pipe_in) = kernel::pipe(BUFFER)?;
    loop {
        let mut queued = kernel::splice_up_to(from.as_fd(), pipe_in.as_fd(), BUFFER)?;
        if queued == 0 {
            return Ok(());
        }
        while queued > 0 {
            match kernel::splice_up_to(pipe_out.as_fd(), to.as_fd(), queued)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => queued -= n,
            }
        }
    }
}

/// The two system calls of the splice relay, which std does not wrap, declared
/// against the C library std already links.
mod kernel {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::os::raw::{c_int, c_uint};

    extern "C" {
        fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
        fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
        fn splice(
            fd_in: c_int,
            off_in: *mut i64,
            fd_out: c_int,
            off_out: *mut i64,
            len: usize,
            flags: c_uint,
        ) -> isize;
    }

    const O_CLOEXEC: c_int = 0o2_000_000;
    const F_SETPIPE_SZ: c_int = 1031;
    const SPLICE_F_MOVE: c_uint = 1;

    /// A pipe of `size` bytes: (read end, write end).
    pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds: [c_int; 2] = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array.
        if unsafe { pipe2(fds.as_mut_ptr(), O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened here and nothing else owns them.
        let (out, input) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = c_int::try_from(size).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: F_SETPIPE_SZ takes one int argument; the descriptor is open.
        if unsafe { fcntl(input.as_raw_fd(), F_SETPIPE_SZ, size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((out, input))
    }

    /// Move up to `len` bytes from `from` to `to` (one of them a pipe); 0 at the
    /// end of `from`.
    pub fn splice_up_to(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: both descriptors are borrowed open; null offsets mean "the
            // current position", which sockets and pipes require.
            let n = unsafe {
                splice(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    std::ptr::null_mut(),
                    len,
                    SPLICE_F_MOVE,
                )
            };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}
