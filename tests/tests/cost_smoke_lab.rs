//! A short run of the real-traffic cost benchmark (`cargo xtask bench`
//! runs the long one): every hook it measures saw traffic, for hvnet's
//! program and for the empty one beside it, and every throughput sample
//! moved data. Figures are printed, not judged here: the budgets belong to
//! the benchmark and BENCHMARKS.md.

use hvnet_lab::{cost, testkit::require_root, unique_prefix};

#[test]
fn the_cost_benchmark_measures_every_hook_and_both_sides_of_the_ab() -> anyhow::Result<()> {
    require_root();
    let (rows, throughput) = cost::run(&unique_prefix("k"), 1, 1)?;
    eprintln!("{}", cost::render(&rows, &throughput));
    // tap UDP and TCP, uplink UDP and TCP, dequeue, drop.
    assert_eq!(rows.len(), 6);
    for row in &rows {
        assert!(
            row.hvnet.runs > 0 && row.empty.runs > 0,
            "{} / {}: no runs measured (hvnet {}, empty {})",
            row.phase,
            row.hook,
            row.hvnet.runs,
            row.empty.runs
        );
        assert!(row.hvnet.per_run().is_some_and(|ns| ns > 0.0));
    }
    for t in &throughput {
        assert!(
            t.with.iter().chain(&t.without).all(|v| *v > 0.0),
            "{}: a sample moved nothing",
            t.what
        );
    }
    Ok(())
}
