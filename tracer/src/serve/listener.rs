//! The accept loop: TLS (when configured), HTTP/1.1 with header size and
//! read/idle timeouts, and a cap on open connections, so no client, slow
//! or malicious, can hold the agent's endpoint hostage.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{watch, Semaphore},
    task::JoinSet,
};
use tower::ServiceExt as _;

use super::WebState;

/// Limits for every connection (Prometheus and on-call tools need far less).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The whole request head must arrive within this; it is also how long
    /// an idle keep-alive connection may wait for its next request.
    pub read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Request line plus headers.
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_connections: 512,
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    app: Router,
    web: Arc<WebState>,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("http: accepting a connection failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            log::debug!(
                "http: {peer} refused: {} connections open",
                limits.max_connections
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tls = web.current().tls.clone();
        let app = app.clone();
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_http(stream, app, limits).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(
                        limits.tls_handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls_stream)) => serve_http(tls_stream, app, limits).await,
                        Ok(Err(err)) => {
                            log::debug!("http: TLS handshake with {peer} failed: {err}")
                        }
                        Err(_) => log::debug!("http: TLS handshake with {peer} timed out"),
                    }
                }
            }
            log_peer_done(peer);
        });
    }
    connections.abort_all();
}

fn log_peer_done(peer: SocketAddr) {
    log::trace!("http: connection from {peer} closed");
}

async fn serve_http<S>(stream: S, app: Router, limits: ConnectionLimits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| app.clone().oneshot(request));
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        log::debug!("http: connection ended: {err}");
    }
}
