//! The on-call commands (`events`, `top`, `explain`) talk to a running
//! agent over its HTTP API, on this node or any other: http or https, a CA
//! file, a client certificate, basic auth, timeouts (reqwest + rustls).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use tokio::io::AsyncWriteExt as _;
use url::Url;

use crate::{
    api::{ApiError, TimelineEntry, Vm},
    config::{FileConfig, DEFAULT_LISTEN},
    serve::web_config::WebConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid agent address {given:?}: {why} (use a URL such as https://compute-1:9478 or ADDR:PORT)")]
    Address { given: String, why: String },
    #[error("reading the agent's config {path}: {message}")]
    AgentConfig { path: PathBuf, message: String },
    #[error("reading {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("--user {0} needs a password: --password-file FILE or the HVNET_PASSWORD environment variable")]
    NoPassword(String),
    #[error("cannot reach the hvnet agent at {url}: {message}")]
    Unreachable { url: Url, message: String },
    #[error("the agent at {url} did not answer within {timeout:?} (raise --timeout?)")]
    Timeout { url: Url, timeout: Duration },
    #[error("the agent at {url} requires authentication: pass --user NAME with --password-file FILE (or HVNET_PASSWORD)")]
    Unauthorized { url: Url },
    #[error("{message}")]
    Ambiguous {
        message: String,
        candidates: Vec<String>,
    },
    #[error("the agent answered {status} for {url}: {message}")]
    Status {
        url: Url,
        status: u16,
        message: String,
    },
    #[error("the agent's reply from {url}: {message}")]
    Reply { url: Url, message: String },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// How to reach an agent, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// URL or ADDR:PORT (flag or HVNET_AGENT).
    pub agent: Option<String>,
    /// The agent's own config file: its `listen` (and whether it serves TLS).
    pub config: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// HVNET_PASSWORD, when set.
    pub password_env: Option<String>,
    pub connect_timeout: Duration,
    /// Whole-request limit for one-shot requests (not for event streams).
    pub timeout: Duration,
}

/// A connection to one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    base: Url,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(options: &AgentOptions) -> Result<Self, ClientError> {
        let base = agent_url(options)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!("hvnet/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls();
        if let Some(path) = &options.ca_file {
            let pem = read_file("--ca-file", path)?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::Pem {
                    what: "--ca-file",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(ClientError::Pem {
                    what: "--ca-file",
                    path: path.clone(),
                    message: "no PEM certificate in it".into(),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&options.cert_file, &options.key_file) {
            let mut pem = read_file("--cert-file", cert)?;
            pem.push(b'\n');
            pem.extend(read_file("--key-file", key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| ClientError::Pem {
                what: "--cert-file/--key-file",
                path: cert.clone(),
                message: e.to_string(),
            })?;
            builder = builder.identity(identity);
        }
        let credentials = match &options.user {
            None => None,
            Some(user) => {
                let password = match (&options.password_file, &options.password_env) {
                    (Some(path), _) => {
                        String::from_utf8_lossy(&read_file("--password-file", path)?)
                            .trim_end_matches(['\r', '\n'])
                            .to_owned()
                    }
                    (None, Some(password)) => password.clone(),
                    (None, None) => return Err(ClientError::NoPassword(user.clone())),
                };
                Some((user.clone(), password))
            }
        };
        let http = builder.build().map_err(|e| ClientError::Address {
            given: base.to_string(),
            why: error_chain(&e),
        })?;
        Ok(Self {
            base,
            http,
            credentials,
            timeout: options.timeout,
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The URL of an API path given as segments: each is escaped, so a VM
    /// name with spaces or slashes stays one segment.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn get(
        &self,
        url: Url,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.get(url.clone());
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(&url, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let api: Option<ApiError> = serde_json::from_str(&body).ok();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized { url });
        }
        match api {
            Some(api) if !api.candidates.is_empty() => Err(ClientError::Ambiguous {
                message: api.error,
                candidates: api.candidates,
            }),
            Some(api) => Err(ClientError::Status {
                url,
                status: status.as_u16(),
                message: api.error,
            }),
            None => Err(ClientError::Status {
                url,
                status: status.as_u16(),
                message: body.trim().to_owned(),
            }),
        }
    }

    fn transport_error(&self, url: &Url, err: &reqwest::Error) -> ClientError {
        if err.is_timeout() {
            return ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            };
        }
        let mut message = error_chain(err);
        if message.contains("certificate") || message.contains("UnknownIssuer") {
            message.push_str(" (pass the agent's CA with --ca-file)");
        } else if err.is_connect() {
            message.push_str(" (is `hvnet run` up there? pass --agent URL)");
        }
        ClientError::Unreachable {
            url: url.clone(),
            message,
        }
    }

    pub async fn get_text(&self, segments: &[&str]) -> Result<String, ClientError> {
        let url = self.url(segments);
        let response = self.get(url.clone(), Some(self.timeout)).await?;
        response.text().await.map_err(|e| ClientError::Reply {
            url,
            message: error_chain(&e),
        })
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
    ) -> Result<T, ClientError> {
        let url = self.url(segments);
        let text = self.get_text(segments).await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Reply {
            url,
            message: format!("not the JSON expected: {e}"),
        })
    }

    pub async fn explain(&self, vm: &str) -> Result<String, ClientError> {
        self.get_text(&["api", "v1", "vms", vm, "explain"]).await
    }

    /// `explain --json`: the plain-words explanation and the timeline.
    pub async fn explain_json(&self, vm: &str) -> Result<ExplainJson, ClientError> {
        let explanation = self.explain(vm).await?;
        let timeline = self.get_json(&["api", "v1", "vms", vm, "timeline"]).await?;
        Ok(ExplainJson {
            vm: vm.to_owned(),
            agent: self.base.to_string(),
            explanation,
            timeline,
        })
    }

    pub async fn vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.get_json(&["api", "v1", "vms"]).await
    }

    /// Copies the agent's event stream to stdout, line by line, until it
    /// ends. No overall timeout: the stream is meant to stay open.
    pub async fn follow_events(&self) -> Result<(), ClientError> {
        let url = self.url(&["api", "v1", "events"]);
        let mut response = self.get(url.clone(), None).await?;
        let mut stdout = tokio::io::stdout();
        while let Some(chunk) = response.chunk().await.map_err(|e| ClientError::Reply {
            url: url.clone(),
            message: error_chain(&e),
        })? {
            stdout.write_all(&chunk).await?;
            stdout.flush().await?;
        }
        Ok(())
    }
}

/// What `hvnet explain --json` prints.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ExplainJson {
    pub vm: String,
    pub agent: String,
    pub explanation: String,
    pub timeline: Vec<TimelineEntry>,
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

/// reqwest's errors keep the useful part (refused, unknown issuer) in
/// their sources.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Where the agent is: --agent/HVNET_AGENT, else the `listen` of the
/// agent's config file (https when its web config serves TLS), else the
/// default local address.
pub fn agent_url(options: &AgentOptions) -> Result<Url, ClientError> {
    if let Some(given) = &options.agent {
        return parse_agent(given);
    }
    let Some(path) = &options.config else {
        return parse_agent(&format!("http://{DEFAULT_LISTEN}"));
    };
    let config_error = |message: String| ClientError::AgentConfig {
        path: path.clone(),
        message,
    };
    let file = FileConfig::load(path).map_err(|e| config_error(e.to_string()))?;
    let listen_text = file.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let mut listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| config_error(format!("listen {listen_text:?} is not ADDR:PORT")))?;
    // An agent listening on every address is reached on this node's loopback.
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let tls = match &file.web_config_file {
        Some(web) => WebConfig::load(web)
            .map_err(|e| config_error(e.to_string()))?
            .tls
            .is_some(),
        None => false,
    };
    parse_agent(&format!(
        "{}://{listen}",
        if tls { "https" } else { "http" }
    ))
}

fn parse_agent(given: &str) -> Result<Url, ClientError> {
    let address_error = |why: String| ClientError::Address {
        given: given.to_owned(),
        why,
    };
    let text = if given.contains("://") {
        given.to_owned()
    } else {
        format!("http://{given}")
    };
    let url = Url::parse(&text).map_err(|e| address_error(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(address_error(format!(
            "scheme {} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(address_error("no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(address_error(
            "a query or fragment makes no sense here".into(),
        ));
    }
    Ok(url)
}

/// One row of `hvnet top --once --json`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct TopRow {
    pub iface: String,
    pub vm_name: String,
    pub state: String,
    pub to_vm_pps: Option<f64>,
    pub from_vm_pps: Option<f64>,
    pub backlog: Option<u64>,
    pub drops: u64,
    pub last_dhcp: String,
    pub lease_remaining_seconds: Option<f64>,
}

/// `hvnet top` rows from `/api/v1/vms` (two samples give rates).
pub fn top_rows(now: &[Vm], before: Option<(&[Vm], f64)>) -> Vec<TopRow> {
    let previous = |vm: &Vm| {
        before.and_then(|(prev, secs)| {
            prev.iter()
                .find(|p| p.iface == vm.iface)
                .map(|old| (old, secs))
        })
    };
    now.iter()
        .map(|vm| {
            let old = previous(vm);
            let rate = |packets: fn(&Vm) -> u64| {
                old.map(|(old, secs)| {
                    packets(vm).saturating_sub(packets(old)) as f64 / secs.max(0.001)
                })
            };
            // ACKs handed over but asked for again since the last refresh say
            // more than the verdict of the last exchange ("delivered").
            let unprocessed = |v: &Vm| v.dhcp.as_ref().map(|d| d.counters.replies_unprocessed);
            let newly_unprocessed = old
                .and_then(|(old, _)| Some(unprocessed(vm)? > unprocessed(old)?))
                .unwrap_or(false);
            let last_dhcp = if newly_unprocessed {
                "reply_unprocessed"
            } else {
                vm.dhcp
                    .as_ref()
                    .and_then(|d| d.last_verdict)
                    .map_or("-", |v| v.as_str())
            };
            let state = if vm.departed {
                "gone"
            } else {
                vm.health.as_ref().map_or("-", |h| h.state.as_str())
            };
            TopRow {
                iface: vm.iface.clone(),
                vm_name: vm.vm_name.clone(),
                state: state.to_owned(),
                to_vm_pps: rate(|v| v.to_vm.packets),
                from_vm_pps: rate(|v| v.from_vm.packets),
                backlog: vm.health.as_ref().map(|h| h.backlog),
                drops: vm.drops.iter().map(|d| d.packets).sum(),
                last_dhcp: last_dhcp.to_owned(),
                lease_remaining_seconds: vm.dhcp.as_ref().and_then(|d| d.lease_remaining),
            }
        })
        .collect()
}

/// The `hvnet top` table.
pub fn render_top(rows: &[TopRow]) -> String {
    let mut out = format!(
        "{:<16} {:<11} {:>9} {:>9} {:>8} {:>10} {:<18} {:>10}\n",
        "IFACE", "STATE", "TO_VM/s", "FROM_VM/s", "BACKLOG", "DROPS", "LAST DHCP", "LEASE LEFT"
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for row in rows {
        out.push_str(&format!(
            "{:<16} {:<11} {:>9} {:>9} {:>8} {:>10} {:<18} {:>10}\n",
            row.iface,
            row.state,
            or_dash(row.to_vm_pps.map(|r| format!("{r:.0}"))),
            or_dash(row.from_vm_pps.map(|r| format!("{r:.0}"))),
            or_dash(row.backlog.map(|b| b.to_string())),
            row.drops,
            row.last_dhcp,
            or_dash(row.lease_remaining_seconds.map(|s| format!("{s:.0} s"))),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{
        analysis::dhcp::Verdict,
        analysis::stall::VmState,
        api::{Dhcp, Drops, Health, Traffic},
    };

    fn vm(iface: &str) -> Vm {
        Vm {
            iface: iface.into(),
            ..Default::default()
        }
    }

    fn traffic(packets: u64) -> Traffic {
        Traffic {
            packets,
            ..Default::default()
        }
    }

    fn health(state: VmState, backlog: u64) -> Option<Health> {
        Some(Health {
            state,
            backlog,
            stalls_total: 0,
            stall_seconds: 0.0,
        })
    }

    fn dhcp(verdict: Option<Verdict>, unprocessed: u64) -> Option<Dhcp> {
        let mut dhcp = Dhcp {
            last_verdict: verdict,
            ..Default::default()
        };
        dhcp.counters.replies_unprocessed = unprocessed;
        Some(dhcp)
    }

    #[test]
    fn top_shows_rates_state_and_lease() {
        let before = vec![Vm {
            to_vm: traffic(100),
            from_vm: traffic(50),
            ..vm("tap0")
        }];
        let now = vec![Vm {
            to_vm: traffic(300),
            from_vm: traffic(70),
            health: health(VmState::RxStalled, 1000),
            drops: vec![Drops {
                packets: 412,
                ..Default::default()
            }],
            dhcp: dhcp(Some(Verdict::ReplyUndelivered), 0).map(|d| Dhcp {
                lease_remaining: Some(41.2),
                ..d
            }),
            ..vm("tap0")
        }];
        let table = render_top(&top_rows(&now, Some((&before, 2.0))));
        let row = table.lines().nth(1).unwrap();
        // Column by column: "100" alone would also match the backlog 1000.
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cols[..5],
            ["tap0", "rx_stalled", "100", "10", "1000"],
            "{row}"
        );
        assert!(
            row.contains("1000")
                && row.contains("412")
                && row.contains("reply_undelivered")
                && row.contains("41 s"),
            "{row}"
        );
    }

    #[test]
    fn top_flags_unprocessed_acks_and_departed_taps() {
        let before = vec![Vm {
            dhcp: dhcp(None, 1),
            ..vm("tap0")
        }];
        let now = vec![
            Vm {
                health: health(VmState::Ok, 0),
                dhcp: dhcp(Some(Verdict::Delivered), 2),
                ..vm("tap0")
            },
            Vm {
                departed: true,
                health: health(VmState::RxStalled, 0),
                ..vm("tap1")
            },
        ];
        let table = render_top(&top_rows(&now, Some((&before, 1.0))));
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(rows[0].contains("reply_unprocessed"), "{table}");
        assert!(
            rows[1].contains("gone") && !rows[1].contains("rx_stalled"),
            "{table}"
        );
        let steady = render_top(&top_rows(&now, Some((&now, 1.0))));
        assert!(
            steady.lines().nth(1).unwrap().contains("delivered"),
            "{steady}"
        );
    }
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn the_agent_is_a_url_or_an_address() {
        let url = |agent: &str| {
            agent_url(&AgentOptions {
                agent: Some(agent.into()),
                ..Default::default()
            })
        };
        assert_eq!(
            url("10.0.0.5:9478").unwrap().as_str(),
            "http://10.0.0.5:9478/"
        );
        assert_eq!(
            url("https://compute-1.example.org:9478").unwrap().as_str(),
            "https://compute-1.example.org:9478/"
        );
        assert_eq!(url("https://[::1]:9478").unwrap().host_str(), Some("[::1]"));
        for bad in [
            "ftp://host:1",
            "https://",
            "http://h:1/?x=1",
            "http://h:99999",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            agent_url(&AgentOptions::default()).unwrap().as_str(),
            "http://127.0.0.1:9478/"
        );
    }

    #[test]
    fn names_are_one_escaped_path_segment() {
        let client = AgentClient::new(&AgentOptions {
            agent: Some("https://node:9478/prefix/".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            client
                .url(&["api", "v1", "vms", "web 1/../x?y#z", "explain"])
                .as_str(),
            "https://node:9478/prefix/api/v1/vms/web%201%2F..%2Fx%3Fy%23z/explain"
        );
    }

    #[test]
    fn the_agents_config_file_gives_its_address_and_scheme() {
        let dir = std::env::temp_dir().join(format!("hvnet-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let web = dir.join("web.yml");
        std::fs::write(
            &web,
            "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n",
        )
        .unwrap();
        let config = dir.join("hvnet.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"0.0.0.0:9555\"\nweb_config_file = {:?}\n",
                web.display().to_string()
            ),
        )
        .unwrap();
        let url = agent_url(&AgentOptions {
            config: Some(config.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(url.as_str(), "https://127.0.0.1:9555/");
        std::fs::write(&config, "listen = \"10.1.2.3:9478\"\n").unwrap();
        let url = agent_url(&AgentOptions {
            config: Some(config.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(url.as_str(), "http://10.1.2.3:9478/");
        std::fs::write(&config, "listn = \"10.1.2.3:9478\"\n").unwrap();
        let err = agent_url(&AgentOptions {
            config: Some(config),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("listn"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_user_without_a_password_is_refused_up_front() {
        let err = AgentClient::new(&AgentOptions {
            user: Some("prom".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("HVNET_PASSWORD"), "{err}");
    }
}
