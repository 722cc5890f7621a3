//! The on-call commands (`events`, `top`, `explain`) talk to a running
//! agent over its HTTP API: a minimal HTTP/1.0 GET is all they need.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the hvnet agent at {addr}: {source} (is `hvnet run` up? pass --agent ADDR:PORT)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the agent's reply is not HTTP")]
    BadReply,
    #[error("the agent's JSON: {0}")]
    Json(#[from] serde_json::Error),
}

async fn request(addr: SocketAddr, path: &str) -> Result<BufReader<TcpStream>, ClientError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ClientError::BadReply)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" {
            break;
        }
    }
    if status != 200 {
        let mut body = String::new();
        reader.read_to_string(&mut body).await?;
        return Err(ClientError::Status {
            status,
            body: body.trim().to_owned(),
        });
    }
    Ok(reader)
}

pub async fn get_text(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    let mut reader = request(addr, path).await?;
    let mut body = String::new();
    reader.read_to_string(&mut body).await?;
    Ok(body)
}

pub async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, ClientError> {
    Ok(serde_json::from_str(&get_text(addr, path).await?)?)
}

/// Copies the agent's event stream to stdout, line by line, until it ends.
pub async fn follow_events(addr: SocketAddr) -> Result<(), ClientError> {
    let mut reader = request(addr, "/api/v1/events").await?;
    let mut stdout = tokio::io::stdout();
    let mut line = String::new();
    while reader.read_line(&mut line).await? > 0 {
        stdout.write_all(line.as_bytes()).await?;
        stdout.flush().await?;
        line.clear();
    }
    Ok(())
}

/// The `hvnet top` table from `/api/v1/vms` (two samples give rates).
pub fn render_top(now: &serde_json::Value, before: Option<(&serde_json::Value, f64)>) -> String {
    let mut out = format!(
        "{:<16} {:<11} {:>9} {:>9} {:>8} {:>10} {:<18} {:>10}\n",
        "IFACE", "STATE", "TO_VM/s", "FROM_VM/s", "BACKLOG", "DROPS", "LAST DHCP", "LEASE LEFT"
    );
    let Some(vms) = now.as_array() else {
        return out;
    };
    for vm in vms {
        let iface = vm["iface"].as_str().unwrap_or("?");
        let rate = |key: &str| {
            before
                .and_then(|(prev, secs)| {
                    let old = prev
                        .as_array()?
                        .iter()
                        .find(|p| p["iface"] == vm["iface"])?;
                    let delta = vm[key]["packets"]
                        .as_u64()?
                        .saturating_sub(old[key]["packets"].as_u64()?);
                    Some(format!("{:.0}", delta as f64 / secs.max(0.001)))
                })
                .unwrap_or_else(|| "-".into())
        };
        let drops: u64 = vm["drops"]
            .as_array()
            .map(|d| d.iter().filter_map(|x| x["packets"].as_u64()).sum())
            .unwrap_or(0);
        let lease = vm["dhcp"]["lease_remaining"]
            .as_f64()
            .map_or_else(|| "-".into(), |s| format!("{s:.0} s"));
        // ACKs handed over but asked for again since the last refresh say
        // more than the verdict of the last exchange ("delivered").
        let unprocessed =
            |v: &serde_json::Value| v["dhcp"]["counters"]["replies_unprocessed"].as_u64();
        let newly_unprocessed = before
            .and_then(|(prev, _)| {
                prev.as_array()?
                    .iter()
                    .find(|p| p["iface"] == vm["iface"])
                    .cloned()
            })
            .and_then(|old| Some(unprocessed(vm)? > unprocessed(&old)?))
            .unwrap_or(false);
        let last_dhcp = if newly_unprocessed {
            "reply_unprocessed"
        } else {
            vm["dhcp"]["last_verdict"].as_str().unwrap_or("-")
        };
        let state = if vm["departed"] == true {
            "gone"
        } else {
            vm["health"]["state"].as_str().unwrap_or("-")
        };
        out.push_str(&format!(
            "{:<16} {:<11} {:>9} {:>9} {:>8} {:>10} {:<18} {:>10}\n",
            iface,
            state,
            rate("to_vm"),
            rate("from_vm"),
            vm["health"]["backlog"]
                .as_u64()
                .map_or_else(|| "-".into(), |b| b.to_string()),
            drops,
            last_dhcp,
            lease
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_shows_rates_state_and_lease() {
        let before = serde_json::json!([{"iface": "tap0", "to_vm": {"packets": 100}, "from_vm": {"packets": 50}}]);
        let now = serde_json::json!([{
            "iface": "tap0", "to_vm": {"packets": 300}, "from_vm": {"packets": 70},
            "health": {"state": "rx_stalled", "backlog": 1000},
            "drops": [{"packets": 412}],
            "dhcp": {"last_verdict": "reply_undelivered", "lease_remaining": 41.2}
        }]);
        let table = render_top(&now, Some((&before, 2.0)));
        let row = table.lines().nth(1).unwrap();
        assert!(
            row.contains("rx_stalled") && row.contains("100") && row.contains("10"),
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
        let before = serde_json::json!([{"iface": "tap0", "dhcp": {"counters": {"replies_unprocessed": 1}}}]);
        let now = serde_json::json!([
            {"iface": "tap0", "health": {"state": "ok"},
             "dhcp": {"last_verdict": "delivered", "counters": {"replies_unprocessed": 2}}},
            {"iface": "tap1", "departed": true, "health": {"state": "rx_stalled"}}
        ]);
        let table = render_top(&now, Some((&before, 1.0)));
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(rows[0].contains("reply_unprocessed"), "{table}");
        assert!(
            rows[1].contains("gone") && !rows[1].contains("rx_stalled"),
            "{table}"
        );
        let steady = render_top(&now, Some((&now, 1.0)));
        assert!(
            steady.lines().nth(1).unwrap().contains("delivered"),
            "{steady}"
        );
    }
}
