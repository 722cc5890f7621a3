//! A real Prometheus and Alertmanager (Debian packages) for the end-to-end
//! test, inside the lab's node netns on its loopback, with their own config
//! and data directories; plus the webhook receiver that records what
//! Alertmanager sends.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{http, netns::NetNs};

pub const PROMETHEUS: &str = "127.0.0.1:9090";
pub const ALERTMANAGER: &str = "127.0.0.1:9093";
pub const WEBHOOK: &str = "127.0.0.1:5001";

pub struct Stack {
    children: Vec<Child>,
    pub notifications: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_logged(ns: &NetNs, program: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    ns.command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| {
            format!("starting {program} (Debian packages prometheus, prometheus-alertmanager)")
        })
}

/// Starts the webhook receiver, Alertmanager and Prometheus (scraping
/// `agent` with job="hvnet", evaluating `rules`).
pub fn start(ns: &NetNs, dir: &Path, agent: SocketAddr, rules: &Path) -> anyhow::Result<Stack> {
    let job = format!("  - job_name: hvnet\n    static_configs:\n      - targets: ['{agent}']\n");
    start_with_jobs(ns, dir, &job, rules)
}

/// Like [`start`], with the given `scrape_configs` entries (YAML, indented
/// as list items), e.g. https targets with a CA and basic auth.
pub fn start_with_jobs(ns: &NetNs, dir: &Path, jobs: &str, rules: &Path) -> anyhow::Result<Stack> {
    let notifications = Arc::new(Mutex::new(Vec::new()));
    let listener = ns.enter(|| Ok(TcpListener::bind(WEBHOOK)?))?;
    {
        let store = notifications.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(body) = read_post(stream) {
                    if let Ok(json) = serde_json::from_slice(&body) {
                        if let Ok(mut all) = store.lock() {
                            all.push(json);
                        }
                    }
                }
            }
        });
    }

    let am_config = dir.join("alertmanager.yml");
    std::fs::write(
        &am_config,
        format!(
            "route:\n  receiver: webhook\n  group_by: [alertname, iface]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: webhook\n    webhook_configs:\n      - url: http://{WEBHOOK}/\n        send_resolved: true\n"
        ),
    )?;
    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{ALERTMANAGER}']\nscrape_configs:\n{jobs}",
            rules.display()
        ),
    )?;
    let mut children = Vec::new();
    children.push(spawn_logged(
        ns,
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", am_config.display()),
            format!("--storage.path={}", dir.join("am-data").display()),
            format!("--web.listen-address={ALERTMANAGER}"),
            "--cluster.listen-address=".into(),
        ],
        &dir.join("alertmanager.log"),
    )?);
    children.push(spawn_logged(
        ns,
        "prometheus",
        &[
            format!("--config.file={}", prom_config.display()),
            format!("--storage.tsdb.path={}", dir.join("prom-data").display()),
            format!("--web.listen-address={PROMETHEUS}"),
        ],
        &dir.join("prometheus.log"),
    )?);
    let stack = Stack {
        children,
        notifications,
    };
    for (what, addr, path) in [
        ("alertmanager", ALERTMANAGER, "/-/ready"),
        ("prometheus", PROMETHEUS, "/-/ready"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if http::get(ns, addr.parse()?, path).is_ok_and(|r| r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(dir.join(format!("{what}.log"))).unwrap_or_default();
                bail!("{what} did not become ready:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(stack)
}

fn read_post(mut stream: std::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(body)
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query: Ok(result array) or the error Prometheus reported.
pub fn query(ns: &NetNs, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let resp = http::get(
        ns,
        PROMETHEUS.parse()?,
        &format!("/api/v1/query?query={}", percent_encode(promql)),
    )?;
    let json: serde_json::Value =
        serde_json::from_str(&resp.body).with_context(|| resp.body.clone())?;
    if json["status"] != "success" {
        bail!("query failed ({}): {}", resp.status, json["error"]);
    }
    Ok(json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Alerts (alertname, status, labels) in the notifications received so far.
pub fn received(stack: &Stack) -> Vec<(String, String, serde_json::Value)> {
    let all = stack
        .notifications
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    all.iter()
        .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["status"].as_str().unwrap_or("").to_owned(),
                a["labels"].clone(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_promql_intact() {
        assert_eq!(
            super::percent_encode("up{job=\"hvnet\"} > 0"),
            "up%7Bjob%3D%22hvnet%22%7D%20%3E%200"
        );
    }
}
