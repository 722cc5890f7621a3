//! Reading hvnet's shipped dashboards and rules for the lint and the
//! end-to-end checks: every panel query, with template variables filled in.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// One panel query of a dashboard.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
}

pub fn dashboards() -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            out.push((
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                json,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub fn panel_queries() -> anyhow::Result<Vec<PanelQuery>> {
    let mut out = Vec::new();
    for (name, dash) in dashboards()? {
        for panel in dash["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    dashboard: name.clone(),
                    panel: title.clone(),
                    expr: target["expr"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
    }
    Ok(out)
}

/// The query as Grafana would send it for `node` and `vm`.
pub fn substitute(expr: &str, node: &str, vm: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$node", node)
        .replace("$vm", vm)
}

/// Metric names a PromQL expression refers to (identifiers followed by a
/// selector or range, or standing alone), hvnet's and recording rules.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut in_string = false;
    let mut in_braces = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' {
            in_string = !in_string;
        } else if !in_string && c == '{' {
            in_braces += 1;
        } else if !in_string && c == '}' {
            in_braces -= 1;
        } else if !in_string && in_braces == 0 && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':')
            {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            if word.starts_with("hvnet_")
                || word.contains(":hvnet_")
                || word == "up"
                || word == "ALERTS"
            {
                names.push(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

/// Recording rule names in alerts.yml.
pub fn recording_rules() -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(dir().join("alerts.yml"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(|s| s.trim().to_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_metric_names_outside_label_matchers_and_strings() {
        let names = metric_names(
            r#"sum by (direction) (rate(hvnet_vm_packets_total{iface=~"hvnet_x"}[1m])) * on (iface) group_left (vm_name) instance:hvnet_vm_state:sum"#,
        );
        assert_eq!(
            names,
            ["hvnet_vm_packets_total", "instance:hvnet_vm_state:sum"]
        );
    }
}
