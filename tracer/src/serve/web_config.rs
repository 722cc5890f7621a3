//! The Prometheus exporter-toolkit web configuration file
//! (`--web.config.file`), read unchanged: an operator reuses the file they
//! already have for node_exporter. See
//! <https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md>.
//!
//! This module only parses and validates the file; [`super::tls`] turns
//! `tls_server_config` into a rustls configuration and
//! [`super::basic_auth`] checks `basic_auth_users`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read web config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("web config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("web config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written (field names and spelling as exporter-toolkit's).
/// Unknown keys are errors, as exporter-toolkit's strict unmarshalling.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebConfigFile {
    #[serde(default)]
    pub tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    pub http_server_config: Option<HttpServerConfig>,
    #[serde(default)]
    pub basic_auth_users: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// exporter-toolkit's token bucket for the whole endpoint.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// A Go duration ("1s"); a bare number is nanoseconds, as Go reads it.
    #[serde(default)]
    pub interval: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Inline PEM instead of a file (newer exporter-toolkit releases).
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub client_auth_type: Option<String>,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_ca: Option<String>,
    #[serde(default)]
    pub client_allowed_sans: Option<Vec<String>>,
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub max_version: Option<String>,
    #[serde(default)]
    pub cipher_suites: Option<Vec<String>>,
    #[serde(default)]
    pub curve_preferences: Option<Vec<String>>,
    /// Go's server-side suite preference; rustls always prefers its own
    /// order, so this is accepted and has no effect.
    #[serde(default)]
    pub prefer_server_cipher_suites: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpServerConfig {
    /// HTTP/2 over TLS. hvnet serves HTTP/1.1 only; accepted for
    /// compatibility (Prometheus scrapes over HTTP/1.1 anyway).
    #[serde(default)]
    pub http2: Option<bool>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
}

/// Who must present what, as exporter-toolkit's `client_auth_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl ClientAuth {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "" | "NoClientCert" => Self::NoClientCert,
            "RequestClientCert" => Self::RequestClientCert,
            "RequireAnyClientCert" => Self::RequireAnyClientCert,
            "VerifyClientCertIfGiven" => Self::VerifyClientCertIfGiven,
            "RequireAndVerifyClientCert" => Self::RequireAndVerifyClientCert,
            _ => return None,
        })
    }

    pub fn verifies(self) -> bool {
        matches!(
            self,
            Self::VerifyClientCertIfGiven | Self::RequireAndVerifyClientCert
        )
    }
}

/// TLS protocol versions by exporter-toolkit's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls10,
    Tls11,
    Tls12,
    Tls13,
}

impl TlsVersion {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "TLS10" => Self::Tls10,
            "TLS11" => Self::Tls11,
            "TLS12" => Self::Tls12,
            "TLS13" => Self::Tls13,
            _ => return None,
        })
    }
}

/// Response headers exporter-toolkit allows, and the values it accepts
/// for the ones it restricts.
const ALLOWED_HEADERS: &[&str] = &[
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
];

/// A validated web configuration; relative paths resolved against the
/// file's own directory (as exporter-toolkit does).
#[derive(Debug, Clone, PartialEq)]
pub struct WebConfig {
    pub source: Option<PathBuf>,
    pub tls: Option<TlsSettings>,
    /// user -> bcrypt hash
    pub users: BTreeMap<String, String>,
    pub headers: Vec<(String, String)>,
    /// (interval, burst): one request per interval, bursts up to `burst`.
    pub rate_limit: Option<(std::time::Duration, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub cert: PemSource,
    pub key: PemSource,
    pub client_auth: ClientAuth,
    pub client_ca: Option<PemSource>,
    pub client_allowed_sans: Vec<String>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    pub cipher_suites: Vec<String>,
    pub curve_preferences: Vec<String>,
}

/// PEM text from a file (re-read on reload, so a rotated certificate is
/// picked up) or inline.
#[derive(Debug, Clone, PartialEq)]
pub enum PemSource {
    File(PathBuf),
    Inline(String),
}

impl PemSource {
    pub fn read(&self) -> Result<Vec<u8>, std::io::Error> {
        match self {
            Self::File(path) => std::fs::read(path),
            Self::Inline(text) => Ok(text.as_bytes().to_vec()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Inline(_) => "inline PEM".into(),
        }
    }
}

impl WebConfig {
    /// No file: plain HTTP, no authentication (the default, loopback only).
    pub fn open() -> Self {
        Self {
            source: None,
            tls: None,
            users: BTreeMap::new(),
            headers: Vec::new(),
            rate_limit: None,
        }
    }

    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, WebConfigError> {
        // An empty file is a valid exporter-toolkit config: no TLS, no auth.
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|err| WebConfigError::Parse {
                path: path.to_owned(),
                message: err.to_string(),
            })?
        };
        let invalid = |message: String| WebConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|t| tls_settings(t, base))
            .transpose()
            .map_err(invalid)?;
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.contains(':') {
                return Err(invalid(format!(
                    "basic_auth_users: user name {user:?} contains ':', which basic auth cannot carry"
                )));
            }
            bcrypt_hash_is_valid(hash).map_err(|why| {
                invalid(format!(
                    "basic_auth_users: the hash for {user:?} is not a bcrypt hash ({why}); make one with `htpasswd -nbBC 10 {user} PASSWORD`"
                ))
            })?;
        }
        let headers = file
            .http_server_config
            .and_then(|h| h.headers)
            .unwrap_or_default();
        let headers = validate_headers(headers).map_err(invalid)?;
        let rate_limit = file
            .rate_limit
            .map(rate_limit)
            .transpose()
            .map_err(invalid)?
            .flatten();
        Ok(Self {
            source: Some(path.to_owned()),
            tls,
            users,
            headers,
            rate_limit,
        })
    }

    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Files whose change means the configuration must be re-read.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.source.iter().cloned().collect();
        if let Some(tls) = &self.tls {
            for pem in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
                .into_iter()
                .flatten()
            {
                if let PemSource::File(path) = pem {
                    files.push(path.clone());
                }
            }
        }
        files
    }
}

fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn pem_source(
    base: &Path,
    file: Option<PathBuf>,
    inline: Option<String>,
    what: &str,
) -> Result<Option<PemSource>, String> {
    match (file, inline) {
        (Some(_), Some(_)) => Err(format!(
            "tls_server_config: give {what}_file or {what}, not both"
        )),
        (Some(path), None) if path.as_os_str().is_empty() => Ok(None),
        (Some(path), None) => Ok(Some(PemSource::File(resolve(base, path)))),
        (None, Some(text)) if text.trim().is_empty() => Ok(None),
        (None, Some(text)) => Ok(Some(PemSource::Inline(text))),
        (None, None) => Ok(None),
    }
}

fn tls_settings(t: TlsServerConfig, base: &Path) -> Result<TlsSettings, String> {
    let cert = pem_source(base, t.cert_file, t.cert, "cert")?;
    let key = pem_source(base, t.key_file, t.key, "key")?;
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, _) => return Err("tls_server_config: missing cert_file".into()),
        (_, None) => return Err("tls_server_config: missing key_file".into()),
    };
    let auth_text = t.client_auth_type.unwrap_or_default();
    let client_auth = ClientAuth::parse(&auth_text).ok_or_else(|| {
        format!(
            "tls_server_config: invalid client_auth_type {auth_text:?}: use NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
    })?;
    let client_ca = pem_source(base, t.client_ca_file, t.client_ca, "client_ca")?;
    if client_auth.verifies() && client_ca.is_none() {
        return Err(format!(
            "tls_server_config: client_auth_type {auth_text} needs client_ca_file"
        ));
    }
    if client_ca.is_some() && !client_auth.verifies() {
        return Err(
            "tls_server_config: client_ca_file is set but client_auth_type does not verify client certificates (use RequireAndVerifyClientCert)"
                .into(),
        );
    }
    let client_allowed_sans = t.client_allowed_sans.unwrap_or_default();
    if !client_allowed_sans.is_empty() && client_auth != ClientAuth::RequireAndVerifyClientCert {
        return Err(
            "tls_server_config: client_allowed_sans needs client_auth_type RequireAndVerifyClientCert"
                .into(),
        );
    }
    let version = |field: &str, text: Option<String>, default| match text {
        None => Ok(default),
        Some(text) => TlsVersion::parse(&text).ok_or_else(|| {
            format!("tls_server_config: invalid {field} {text:?}: use TLS10, TLS11, TLS12 or TLS13")
        }),
    };
    let min_version = version("min_version", t.min_version, TlsVersion::Tls12)?;
    let max_version = version("max_version", t.max_version, TlsVersion::Tls13)?;
    if max_version < TlsVersion::Tls12 {
        return Err(
            "tls_server_config: max_version below TLS12: hvnet (rustls) serves TLS 1.2 and 1.3 only"
                .into(),
        );
    }
    if min_version > max_version {
        return Err("tls_server_config: min_version is above max_version".into());
    }
    Ok(TlsSettings {
        cert,
        key,
        client_auth,
        client_ca,
        client_allowed_sans,
        min_version,
        max_version,
        cipher_suites: t.cipher_suites.unwrap_or_default(),
        curve_preferences: t.curve_preferences.unwrap_or_default(),
    })
}

fn rate_limit(config: RateLimitConfig) -> Result<Option<(std::time::Duration, u32)>, String> {
    let interval = match &config.interval {
        None => std::time::Duration::ZERO,
        Some(serde_yaml_ng::Value::String(text)) => super::rate_limit::parse_go_duration(text)
            .ok_or_else(|| {
                format!("rate_limit: invalid interval {text:?}: use a duration such as 1s or 250ms")
            })?,
        Some(serde_yaml_ng::Value::Number(n)) => n
            .as_u64()
            .map(std::time::Duration::from_nanos)
            .ok_or_else(|| format!("rate_limit: invalid interval {n}"))?,
        Some(other) => return Err(format!("rate_limit: invalid interval {other:?}")),
    };
    // As exporter-toolkit: an interval of 0 turns the limiter off.
    if interval.is_zero() {
        return Ok(None);
    }
    Ok(Some((interval, config.burst.unwrap_or(0))))
}

fn validate_headers(headers: BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let Some(canonical) = ALLOWED_HEADERS
            .iter()
            .find(|allowed| allowed.eq_ignore_ascii_case(&name))
        else {
            return Err(format!(
                "http_server_config.headers: {name:?} is not allowed (allowed: {})",
                ALLOWED_HEADERS.join(", ")
            ));
        };
        let ok = match *canonical {
            "X-Content-Type-Options" => value.eq_ignore_ascii_case("nosniff"),
            "X-Frame-Options" => {
                value.eq_ignore_ascii_case("deny") || value.eq_ignore_ascii_case("sameorigin")
            }
            _ => true,
        };
        if !ok {
            return Err(format!(
                "http_server_config.headers: invalid value {value:?} for {canonical}"
            ));
        }
        if axum::http::HeaderValue::from_str(&value).is_err() {
            return Err(format!(
                "http_server_config.headers: {canonical} value {value:?} is not a valid header value"
            ));
        }
        out.push(((*canonical).to_owned(), value));
    }
    Ok(out)
}

/// Checks the shape of a bcrypt hash ($2a$/$2b$/$2y$, cost, 53 chars of
/// salt and hash) so a typo is found at load time, not at the first login.
fn bcrypt_hash_is_valid(hash: &str) -> Result<(), &'static str> {
    let parts: Vec<&str> = hash.split('$').collect();
    match parts.as_slice() {
        ["", "2a" | "2b" | "2y" | "2x", cost, rest] => {
            let cost: u32 = cost.parse().map_err(|_| "bad cost")?;
            if !(4..=31).contains(&cost) {
                return Err("cost out of range");
            }
            if rest.len() != 53 {
                return Err("wrong length");
            }
            Ok(())
        }
        _ => Err("expected $2y$<cost>$<53 characters>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG";

    fn parse(text: &str) -> Result<WebConfig, WebConfigError> {
        WebConfig::parse(Path::new("/etc/hvnet/web.yml"), text)
    }

    #[test]
    fn node_exporters_file_is_read_unchanged() {
        let cfg = parse(&format!(
            r#"
# node_exporter's web-config.yml
tls_server_config:
  cert_file: node.crt
  key_file: /etc/ssl/node.key
  client_auth_type: "RequireAndVerifyClientCert"
  client_ca_file: ca.crt
  min_version: TLS13
  cipher_suites:
    - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
  prefer_server_cipher_suites: true
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
    Strict-Transport-Security: max-age=31536000
basic_auth_users:
  prometheus: {HASH}
"#
        ))
        .unwrap();
        let tls = cfg.tls.as_ref().unwrap();
        assert_eq!(tls.cert, PemSource::File("/etc/hvnet/node.crt".into()));
        assert_eq!(tls.key, PemSource::File("/etc/ssl/node.key".into()));
        assert_eq!(tls.client_auth, ClientAuth::RequireAndVerifyClientCert);
        assert_eq!(tls.min_version, TlsVersion::Tls13);
        assert_eq!(tls.max_version, TlsVersion::Tls13);
        assert!(cfg.requires_auth());
        assert_eq!(
            cfg.headers,
            vec![
                (
                    "Strict-Transport-Security".into(),
                    "max-age=31536000".into()
                ),
                ("X-Frame-Options".into(), "deny".into())
            ]
        );
        assert_eq!(cfg.watched_files().len(), 4);
    }

    #[test]
    fn the_rate_limit_reads_go_durations_and_zero_is_off() {
        let cfg = parse("rate_limit:\n  interval: 1s\n  burst: 20\n").unwrap();
        assert_eq!(
            cfg.rate_limit,
            Some((std::time::Duration::from_secs(1), 20))
        );
        let cfg = parse("rate_limit:\n  interval: \"0\"\n  burst: 20\n").unwrap();
        assert_eq!(cfg.rate_limit, None);
        let err = parse("rate_limit:\n  interval: soon\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("interval"), "{err}");
    }

    #[test]
    fn an_empty_file_means_no_tls_and_no_auth() {
        let cfg = parse("").unwrap();
        assert!(cfg.tls.is_none() && !cfg.requires_auth());
    }

    #[test]
    fn mistakes_are_errors_that_say_what_to_fix() {
        let cases = [
            ("tls_server_config:\n  cert_fil: a\n", "cert_fil"),
            ("tls_server_config:\n  key_file: k\n", "missing cert_file"),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n",
                "needs client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: Always\n",
                "invalid client_auth_type",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS14\n",
                "invalid min_version",
            ),
            (
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  max_version: TLS11\n",
                "TLS 1.2 and 1.3 only",
            ),
            ("basic_auth_users:\n  alice: secret\n", "not a bcrypt hash"),
            (
                "http_server_config:\n  headers:\n    Server: hvnet\n",
                "not allowed",
            ),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "invalid value",
            ),
            ("basic_auth_users: [alice]\n", "web.yml"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains("/etc/hvnet/web.yml"), "{err}");
        }
    }
}

#[cfg(test)]
mod shipped_example {
    use super::*;

    /// The example shipped for operators is valid as written.
    #[test]
    fn the_example_web_config_parses() {
        let text = include_str!("../../deploy/web-config.yml");
        let cfg = WebConfig::parse(Path::new("/etc/hvnet/web-config.yml"), text).unwrap();
        assert!(cfg.tls.is_some() && cfg.requires_auth());
        assert_eq!(cfg.headers.len(), 3);
    }
}
