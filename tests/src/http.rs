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
