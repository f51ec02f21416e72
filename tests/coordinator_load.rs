//! `tessera bench coordinator` end to end, small: a real coordinator process serves hundreds
//! of in-process simulated ranks that join, watch, heartbeat and finish. Only correctness is
//! checked here (every rank joined, no RPC failed, the heartbeat rate the ranks were told);
//! the join time and CPU figures against the targets are in docs/BENCHMARKS.md.

mod common;

use std::time::Duration;

use common::{json_rows, run, tessera};

#[test]
fn simulated_ranks_join_heartbeat_and_finish_without_failures() {
    let (join_ranks, heartbeat_ranks, seconds) = (256u64, 512u64, 3.0);
    let mut cmd = tessera();
    cmd.args(["bench", "coordinator", "--json"])
        .args(["--join-ranks", &join_ranks.to_string()])
        .args(["--heartbeat-ranks", &heartbeat_ranks.to_string()])
        .args(["--seconds", &seconds.to_string()]);
    let out = run(cmd, Duration::from_secs(240));
    assert!(out.status.success(), "the benchmark failed:\n{}", out.all_output());
    let rows = json_rows(&out);
    assert_eq!(rows.len(), 2, "one row per phase expected:\n{}", out.all_output());

    let row = |phase: &str| {
        rows.iter()
            .find(|r| r["phase"] == phase)
            .unwrap_or_else(|| panic!("no {phase} row:\n{}", out.all_output()))
    };
    for (phase, ranks) in [("join", join_ranks), ("heartbeat", heartbeat_ranks)] {
        let r = row(phase);
        assert_eq!(r["ranks"].as_u64(), Some(ranks), "{r}");
        assert_eq!(r["joined"].as_u64(), Some(ranks), "every rank must join: {r}");
        assert_eq!(r["rpcs_failed"].as_u64(), Some(0), "{r}");
        assert_eq!(r["coordinator_exit_ok"].as_bool(), Some(true), "{r}");
        for field in ["seconds", "coordinator_cpu_s", "cpu_percent_of_one_core"] {
            let v = r[field].as_f64().unwrap_or_else(|| panic!("{field} missing: {r}"));
            assert!(v.is_finite() && v >= 0.0, "{field} = {v}: {r}");
        }
        assert!(r["met"].is_boolean(), "{r}");
    }

    let hb = row("heartbeat");
    assert_eq!(hb["watch_done"].as_u64(), Some(heartbeat_ranks), "{hb}");
    let interval = hb["interval_s"].as_f64().expect("interval_s");
    assert!(interval > 0.0, "{hb}");
    let expected = heartbeat_ranks as f64 / interval;
    let rate = hb["heartbeats_per_s"].as_f64().expect("heartbeats_per_s");
    assert!(
        (rate - expected).abs() <= 0.2 * expected,
        "{rate} heartbeats/s, expected {expected} (ranks / interval) within 20%: {hb}"
    );
    assert_eq!(hb["heartbeats"].as_u64().map(|h| h > 0), Some(true), "{hb}");
}

#[test]
fn bad_arguments_are_refused_with_the_flag_named() {
    let mut cmd = tessera();
    cmd.args(["bench", "coordinator", "--heartbeat-ranks", "0"]);
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{}", out.all_output());
    assert!(out.stderr.contains("--heartbeat-ranks"), "{}", out.all_output());

    let mut cmd = tessera();
    cmd.args(["bench", "coordinator", "--seconds", "0.1"]);
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{}", out.all_output());
    assert!(out.stderr.contains("--seconds"), "{}", out.all_output());
}
