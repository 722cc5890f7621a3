//! A minimal HTTP GET for the lab, run from inside a namespace (the agent
//! listens on that namespace's loopback).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::netns::NetNs;

pub struct Response {
    pub status: u16,
    pub body: String,
}

/// GET `path` from `addr` as seen from inside `ns`.
pub fn get(ns: &NetNs, addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    let path = path.to_owned();
    ns.enter(move || get_here(addr, &path))
}

/// GET from the calling thread's namespace. HTTP/1.0 keeps the reply
/// unchunked and the connection closed after it.
pub fn get_here(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP reply without a header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP reply without a status code")?;
    if !(100..600).contains(&status) {
        bail!("bad HTTP status {status}");
    }
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

/// Sends `request` as is from the calling thread's namespace and returns
/// whatever comes back until the server closes or `timeout` passes.
pub fn raw_here(addr: SocketAddr, request: &[u8], timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    // The server may close while we still write (e.g. huge headers).
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break
            }
            Err(_) => break,
        }
    }
    Ok(raw)
}

/// The status code of a raw HTTP reply (None: no HTTP answer).
pub fn status_of(reply: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(reply);
    let first = text.lines().next()?;
    if !first.starts_with("HTTP/") {
        return None;
    }
    first.split_whitespace().nth(1)?.parse().ok()
}
