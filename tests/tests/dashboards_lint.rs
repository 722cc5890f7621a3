//! The shipped dashboards and rules, checked without privileges: valid
//! JSON in the current schema, every panel has a query, every query
//! parses (promtool) and uses only metrics hvnet exports or rules it
//! ships; the alert rules pass `promtool check` and their unit tests.

use std::process::Command;

use hvnet_lab::dashboards::{
    dashboards, dir, metric_names, panel_queries, recording_rules, substitute,
};

fn promtool(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir())
        .output()
        .map_err(|e| {
            anyhow::anyhow!("promtool (Debian package prometheus; `cargo xtask setup`): {e}")
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() -> anyhow::Result<()> {
    let check = promtool(&["check", "rules", "alerts.yml"])?;
    assert!(check.contains("SUCCESS"), "{check}");
    let tests = promtool(&["test", "rules", "alerts_test.yml"])?;
    assert!(tests.contains("SUCCESS"), "{tests}");
    Ok(())
}

#[test]
fn dashboards_are_current_schema_with_a_datasource_variable_and_no_empty_panel(
) -> anyhow::Result<()> {
    let all = dashboards()?;
    assert_eq!(all.len(), 3, "fleet, VM and incident dashboards");
    for (name, dash) in &all {
        assert!(
            dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
            "{name}: old schema"
        );
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{name}: no datasource variable"
        );
        assert!(
            vars.iter().any(|v| v["name"] == "node"),
            "{name}: no node variable"
        );
        let panels = dash["panels"].as_array().cloned().unwrap_or_default();
        assert!(!panels.is_empty(), "{name}: no panels");
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}/{title}: hard-wired datasource"
            );
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{name}/{title}: panel without a query");
            for t in targets {
                assert!(
                    !t["expr"].as_str().unwrap_or("").trim().is_empty(),
                    "{name}/{title}: empty query"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn every_panel_query_parses_and_uses_only_exported_metrics_or_shipped_rules() -> anyhow::Result<()>
{
    let queries = panel_queries()?;
    let rules = recording_rules()?;
    let exported = hvnet::export::metric_names();
    let mut problems = Vec::new();
    for q in &queries {
        for name in metric_names(&q.expr) {
            let known = exported.contains(&name)
                || rules.contains(&name)
                || name == "up"
                || name == "ALERTS";
            if !known {
                problems.push(format!(
                    "{} / {}: unknown metric {name}",
                    q.dashboard, q.panel
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // promtool parses PromQL in rule files: one recording rule per query.
    let mut file = String::from("groups:\n  - name: dashboard-lint\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let expr = substitute(&q.expr, ".*", "tap0");
        file.push_str(&format!(
            "      - record: lint:panel_{i}\n        expr: {}\n",
            serde_json::to_string(&expr)?
        ));
    }
    let path =
        std::env::temp_dir().join(format!("hvnet-dashboard-lint-{}.yml", std::process::id()));
    std::fs::write(&path, file)?;
    let result = promtool(&["check", "rules", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    let out = result?;
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
    Ok(())
}

/// GitHub's anchor for a README heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_leads_to_a_runbook_and_the_right_dashboard() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(dir().join("../README.md"))?;
    let anchors: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| anchor(h.trim_start_matches('#')))
        .collect();
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir().join("alerts.yml"))?)?;
    let mut alerts = 0;
    let mut problems = Vec::new();
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let severity = rule["labels"]["severity"].as_str().unwrap_or("");
            if severity != "critical" && severity != "warning" {
                problems.push(format!(
                    "{name}: severity {severity:?} (critical or warning)"
                ));
            }
            let annotation = |key: &str| rule["annotations"][key].as_str().unwrap_or("").to_owned();
            for key in ["summary", "description"] {
                if annotation(key).trim().is_empty() {
                    problems.push(format!("{name}: no {key}"));
                }
            }
            let runbook = annotation("runbook_url");
            match runbook.split_once("README.md#") {
                Some((_, anchor)) if anchors.iter().any(|a| a == anchor) => {}
                _ => problems.push(format!(
                    "{name}: runbook_url {runbook:?} is not a README heading anchor"
                )),
            }
            let dashboard = annotation("dashboard_url");
            let per_vm = rule["expr"].as_str().unwrap_or("").contains("iface");
            let expected = if per_vm {
                "/d/hvnet-vm/hvnet-vm?var-node={{ $labels.instance }}&var-vm={{ $labels.iface }}"
            } else {
                "/d/hvnet-fleet/hvnet-fleet?var-node={{ $labels.instance }}"
            };
            if !dashboard.ends_with(expected) {
                problems.push(format!(
                    "{name}: dashboard_url {dashboard:?} should end with {expected}"
                ));
            }
            if annotation("runbook").contains("hvnet explain")
                && !annotation("runbook").contains("--agent https://{{ $labels.instance }}")
            {
                problems.push(format!(
                    "{name}: the runbook's explain command has no --agent"
                ));
            }
        }
    }
    assert!(alerts >= 9, "only {alerts} alerts found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// libvirt's vnetN repeats on every node: the VM and incident dashboards
/// choose one node and one tap, and never add series of different VMs.
#[test]
fn a_vm_is_chosen_by_node_and_tap_and_never_summed_across_nodes() -> anyhow::Result<()> {
    for (name, dash) in dashboards()? {
        if name == "hvnet-fleet.json" {
            continue;
        }
        for var in dash["templating"]["list"].as_array().into_iter().flatten() {
            if var["name"] == "node" || var["name"] == "vm" {
                assert_eq!(
                    var["multi"], false,
                    "{name}: {} is multi-select",
                    var["name"]
                );
                assert_eq!(var["includeAll"], false, "{name}: {} has All", var["name"]);
            }
        }
        for q in panel_queries()?.iter().filter(|q| q.dashboard == name) {
            for agg in ["sum", "max", "min", "avg", "count"] {
                for (at, _) in q.expr.match_indices(&format!("{agg} ")) {
                    let rest = &q.expr[at + agg.len() + 1..];
                    let by = rest.strip_prefix("by (").and_then(|r| r.split_once(')'));
                    let keeps = by.is_some_and(|(labels, _)| {
                        labels.contains("instance") && labels.contains("iface")
                    });
                    assert!(
                        keeps,
                        "{name} / {}: {agg} without by (instance, iface): {}",
                        q.panel, q.expr
                    );
                }
                assert!(
                    !q.expr.contains(&format!("{agg}(")),
                    "{name} / {}: bare {agg}(: {}",
                    q.panel,
                    q.expr
                );
            }
        }
        let links = dash["links"].as_array().cloned().unwrap_or_default();
        assert!(
            links.iter().any(|l| l["includeVars"] == true
                && l["url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("/d/hvnet-"))),
            "{name}: no link carrying node and VM to the other dashboard"
        );
    }
    // Fleet -> VM: every panel listing VMs links to the VM and incident views.
    let (_, fleet) = dashboards()?
        .into_iter()
        .find(|(n, _)| n == "hvnet-fleet.json")
        .ok_or_else(|| anyhow::anyhow!("no fleet dashboard"))?;
    let mut linked = 0;
    for panel in fleet["panels"].as_array().into_iter().flatten() {
        let urls: Vec<&str> = panel["fieldConfig"]["defaults"]["links"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["url"].as_str())
            .collect();
        if urls.is_empty() {
            continue;
        }
        linked += 1;
        for target in ["/d/hvnet-vm/", "/d/hvnet-incident/"] {
            assert!(
                urls.iter().any(|u| u.starts_with(target)
                    && u.contains("var-node=${")
                    && u.contains("var-vm=${")),
                "{}: no {target} link with node and VM",
                panel["title"]
            );
        }
    }
    assert!(linked >= 2, "fleet panels listing VMs must link to them");
    Ok(())
}
