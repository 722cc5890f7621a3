//! The landing page at `/`: what this node is, links to /metrics and the
//! API, and the VM table with each VM's explain timeline. Plain HTML, no
//! scripts, so it works in any browser and behind any proxy.

use std::fmt::Write as _;

use crate::export::Exposition;

/// The node's host name (what on-call sees in the alert's instance).
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn render(view: &Exposition, node: &str) -> String {
    let mut rows = String::new();
    for vm in &view.vms {
        let state = if vm.departed {
            "gone".to_owned()
        } else {
            vm.health
                .as_ref()
                .map_or_else(|| "-".to_owned(), |h| h.state.as_str().to_owned())
        };
        let backlog = vm
            .health
            .as_ref()
            .map_or_else(|| "-".to_owned(), |h| h.backlog.to_string());
        let dhcp = vm.dhcp.as_ref();
        let verdict = dhcp
            .and_then(|d| d.last_verdict)
            .map_or_else(|| "-".to_owned(), |v| v.as_str().to_owned());
        let lease = dhcp
            .and_then(|d| d.lease_remaining)
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
        let link = format!("/api/v1/vms/{}/explain", percent_encode(&vm.iface));
        let _ = writeln!(
            rows,
            "<tr class=\"state-{state_class}\"><td><a href=\"{link}\">{iface}</a></td><td>{name}</td><td>{uuid}</td><td>{mac}</td><td>{state}</td><td>{backlog}</td><td>{verdict}</td><td>{lease}</td><td><a href=\"{link}\">explain</a> · <a href=\"/api/v1/vms/{enc}/timeline\">timeline</a></td></tr>",
            state_class = escape(&state),
            link = escape(&link),
            enc = escape(&percent_encode(&vm.iface)),
            iface = escape(&vm.iface),
            name = escape(&vm.vm_name),
            uuid = escape(&vm.vm_uuid),
            mac = escape(&vm.mac),
            state = escape(&state),
            backlog = escape(&backlog),
            verdict = escape(&verdict),
            lease = escape(&lease),
        );
    }
    if view.vms.is_empty() {
        rows.push_str("<tr><td colspan=\"9\">no VM interface attached yet</td></tr>\n");
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hvnet on {node}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #999; padding: 4px 10px; text-align: left; }}
th {{ background: #dde; }}
tr.state-rx_stalled td {{ background: #f8c8c8; }}
tr.state-paused td, tr.state-no_carrier td {{ background: #eee; }}
</style></head>
<body>
<h1>hvnet on {node}</h1>
<p>hvnet {version}: per-VM packet counters, RX-stall detection and DHCP tracing for this compute node's VM taps
({attached} interface(s) attached, tc attach: {mechanism}).</p>
<p><a href="/metrics">/metrics</a> (Prometheus) · <a href="/api/v1/vms">/api/v1/vms</a> (JSON) · <a href="/healthz">/healthz</a></p>
<h2>VMs</h2>
<table id="vms">
<tr><th>interface</th><th>VM name</th><th>VM UUID</th><th>MAC</th><th>state</th><th>RX backlog</th><th>last DHCP</th><th>lease left</th><th>timeline</th></tr>
{rows}</table>
</body></html>
"#,
        node = escape(node),
        version = escape(&view.version),
        attached = view.attached_count(),
        mechanism = escape(&view.attach_mechanism),
    )
}

/// HTML-escapes text (names come from libvirt XML and command lines).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a path segment (RFC 3986 unreserved characters stay).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::VmView;

    #[test]
    fn names_are_escaped_and_links_encoded() {
        let view = Exposition {
            vms: vec![VmView {
                iface: "tap a".into(),
                vm_name: "<script>alert(1)</script>".into(),
                ..Default::default()
            }],
            version: "0.1.0".into(),
            ..Default::default()
        };
        let page = render(&view, "compute-1");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(!page.contains("<script>"), "{page}");
        assert!(
            page.contains("href=\"/api/v1/vms/tap%20a/explain\""),
            "{page}"
        );
        assert!(page.contains("<h1>hvnet on compute-1</h1>"), "{page}");
    }
}
