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
    let mut problems = Vec::new();
    for q in &queries {
        for name in metric_names(&q.expr) {
            let known = hvnet::export::METRIC_NAMES.contains(&name.as_str())
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
