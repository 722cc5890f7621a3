//! Serving: the HTTP endpoint (routes, landing page), its web
//! configuration (TLS, basic auth, headers: the exporter-toolkit file) and
//! its reload on change or SIGHUP.

pub mod api_error;
pub mod basic_auth;
pub mod guard;
pub mod landing;
pub mod listener;
pub mod rate_limit;
pub mod routes;
pub mod tls;
pub mod web_config;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::{watch, Semaphore},
};

use crate::agent::AgentState;
use web_config::{WebConfig, WebConfigError};

/// At most this many `/api/v1/events` streams at once (each holds a
/// connection open for as long as the client wants).
pub const MAX_EVENT_STREAMS: usize = 16;
/// bcrypt checks of new credentials at once.
const BCRYPT_CONCURRENCY: usize = 2;
/// How often the web config file (and the certificates it names) is
/// checked for changes.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    WebConfig(#[from] WebConfigError),
    #[error("web config file {path}: {source}")]
    Tls {
        path: PathBuf,
        source: tls::TlsError,
    },
}

/// A loaded web configuration with its TLS settings compiled.
#[derive(Debug)]
pub struct ActiveWebConfig {
    pub web: WebConfig,
    pub tls: Option<Arc<ServerConfig>>,
    /// `rate_limit`, when set (a reload starts a fresh bucket).
    pub limiter: Option<rate_limit::TokenBucket>,
    /// Digest of every file it was built from, to notice changes.
    fingerprint: Vec<u8>,
}

impl ActiveWebConfig {
    /// Loads and compiles `path` (None: plain HTTP, no auth).
    pub fn load(path: Option<&Path>) -> Result<Self, ServeError> {
        let Some(path) = path else {
            return Ok(Self {
                web: WebConfig::open(),
                tls: None,
                limiter: None,
                fingerprint: Vec::new(),
            });
        };
        let web = WebConfig::load(path)?;
        let tls = match &web.tls {
            Some(settings) => Some(
                tls::server_config(settings, &mut |warning| {
                    log::warn!("{}: {warning}", path.display())
                })
                .map_err(|source| ServeError::Tls {
                    path: path.to_owned(),
                    source,
                })?,
            ),
            None => None,
        };
        let fingerprint = fingerprint(&web.watched_files());
        let limiter = web.rate_limit.map(|(interval, burst)| {
            rate_limit::TokenBucket::new(interval, burst, std::time::Instant::now())
        });
        Ok(Self {
            web,
            tls,
            limiter,
            fingerprint,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{}, {}",
            if self.tls.is_some() {
                "TLS"
            } else {
                "plain HTTP"
            },
            if self.web.requires_auth() {
                format!("basic auth ({} user(s))", self.web.users.len())
            } else {
                "no authentication".into()
            }
        )
    }
}

/// The web configuration in force; swapped as a whole on reload.
#[derive(Debug)]
pub struct WebState {
    path: Option<PathBuf>,
    current: RwLock<Arc<ActiveWebConfig>>,
    pub authenticator: basic_auth::Authenticator,
    /// bcrypt checks running at once (each takes a CPU for tens of ms).
    pub bcrypt_slots: Semaphore,
}

impl WebState {
    pub fn new(path: Option<PathBuf>, initial: ActiveWebConfig) -> Self {
        Self {
            path,
            current: RwLock::new(Arc::new(initial)),
            authenticator: basic_auth::Authenticator::default(),
            bcrypt_slots: Semaphore::new(BCRYPT_CONCURRENCY),
        }
    }

    pub fn current(&self) -> Arc<ActiveWebConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the file, or a certificate it names, changed since it was
    /// loaded (reads a few small files).
    pub fn changed(&self) -> bool {
        let current = self.current();
        self.path.is_some() && fingerprint(&current.web.watched_files()) != current.fingerprint
    }

    /// Re-reads the file; a broken new file keeps the old configuration.
    pub fn reload(&self) {
        let Some(path) = &self.path else {
            log::info!("SIGHUP: no --web.config.file to re-read");
            return;
        };
        let old = self.current();
        match ActiveWebConfig::load(Some(path)) {
            Ok(new) => {
                log::info!("web config {} reloaded: {}", path.display(), new.describe());
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
            }
            Err(err) => {
                log::error!(
                    "{err}; keeping the previous web configuration ({})",
                    old.describe()
                );
                // Do not repeat the error every check: remember what failed.
                let mut kept = self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *kept = Arc::new(ActiveWebConfig {
                    web: old.web.clone(),
                    tls: old.tls.clone(),
                    limiter: old.web.rate_limit.map(|(interval, burst)| {
                        rate_limit::TokenBucket::new(interval, burst, std::time::Instant::now())
                    }),
                    fingerprint: fingerprint(&old.web.watched_files()),
                });
            }
        }
    }
}

/// Contents of every file, hashed: a rewrite within the same second (or a
/// certificate renewed in place) is still noticed.
fn fingerprint(files: &[PathBuf]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for file in files {
        ctx.update(file.as_os_str().as_encoded_bytes());
        match std::fs::read(file) {
            Ok(bytes) => {
                ctx.update(&[1]);
                ctx.update(&bytes);
            }
            Err(_) => ctx.update(&[0]),
        }
    }
    ctx.finish().as_ref().to_vec()
}

/// Serves the agent's endpoint until `shutdown`, reloading the web config
/// on change or SIGHUP.
pub async fn run(
    listener: TcpListener,
    agent: Arc<AgentState>,
    web: Arc<WebState>,
    shutdown: watch::Receiver<bool>,
) {
    let reloader = tokio::spawn(reload_loop(web.clone(), shutdown.clone()));
    let app = routes::router(routes::RouteState {
        agent,
        web: web.clone(),
        event_streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
    });
    listener::serve(
        listener,
        app,
        web,
        listener::ConnectionLimits::default(),
        shutdown,
    )
    .await;
    reloader.abort();
}

async fn reload_loop(web: Arc<WebState>, mut shutdown: watch::Receiver<bool>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(err) => {
            log::warn!("cannot install the SIGHUP handler ({err}); the web config is still re-read on change");
            None
        }
    };
    let mut tick = tokio::time::interval(RELOAD_CHECK_EVERY);
    loop {
        let forced = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
        };
        // The change check reads a few small files in place (a blocking-pool
        // thread every two seconds would cost more than it saves); the
        // reload itself parses certificates: off the async workers.
        if forced || web.changed() {
            let web = web.clone();
            let _ = tokio::task::spawn_blocking(move || web.reload()).await;
        }
    }
}

/// Whether serving `addr` with `config` exposes tenant data to anyone who
/// can reach the address (logged as a warning at start).
pub fn exposed_without_protection(addr: &std::net::SocketAddr, config: &ActiveWebConfig) -> bool {
    !addr.ip().is_loopback() && (config.tls.is_none() || !config.web.requires_auth())
}
