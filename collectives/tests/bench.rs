//! The all-reduce benchmark helpers.

mod common;

use std::time::Duration;

use common::{run_ranks, tcp_group};
use tessera_collectives::bench::{
    BenchRow, bench_all_reduce, format_table, parse_size, parse_sizes, size_range,
};
use tessera_collectives::tcp::TcpRingConfig;
use tessera_collectives::threads::ThreadComm;

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("1K").unwrap(), 1024);
    assert_eq!(parse_size("64M").unwrap(), 64 << 20);
    assert_eq!(parse_size("256m").unwrap(), 256 << 20);
    assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    assert_eq!(parse_size("2KB").unwrap(), 2048);
    for bad in ["", "K", "12X", "-1", "1.5M", "99999999999999999999999G"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert_eq!(size_range(1024, 8192, 2), vec![1024, 2048, 4096, 8192]);
    assert_eq!(size_range(1000, 5000, 2), vec![1000, 2000, 4000]);
    assert_eq!(parse_sizes("1K..4K").unwrap(), vec![1024, 2048, 4096]);
    assert_eq!(parse_sizes("1K,3M").unwrap(), vec![1024, 3 << 20]);
    assert!(parse_sizes("4K..1K").is_err());
}

fn check_rows(rows: &[BenchRow], sizes: &[usize], world: usize) {
    assert_eq!(rows.len(), sizes.len());
    for (row, &s) in rows.iter().zip(sizes) {
        assert_eq!(row.size_bytes, s / 4 * 4);
        assert_eq!(row.count, s / 4);
        assert_eq!(row.check, Some(true));
        assert!(row.time_us > 0.0);
        let algbw = row.size_bytes as f64 / (row.time_us * 1e-6) / 1e9;
        assert!((row.algbw_gbs - algbw).abs() <= 1e-9 * (1.0 + algbw));
        let factor = 2.0 * (world as f64 - 1.0) / world as f64;
        assert!((row.busbw_gbs - row.algbw_gbs * factor).abs() < 1e-9);
    }
}

#[test]
fn bench_threads_checks_and_agrees() {
    let sizes = [4, 1024, 100_000];
    let all = run_ranks(ThreadComm::group(3), |mut c| {
        bench_all_reduce(&mut c, &sizes, 3, 1, true).unwrap()
    });
    check_rows(&all[0], &sizes, 3);
    assert!(all.iter().all(|rows| *rows == all[0]), "ranks disagree on the rows");
    let table = format_table(&all[0]);
    assert!(table.contains("busbw") && table.contains("100000"), "{table}");
    assert_eq!(table.lines().count(), 2 + sizes.len());
    let json = all[0][0].to_json();
    assert!(json.starts_with("{\"size_bytes\":4,") && json.contains("\"check\":true"), "{json}");
}

#[test]
fn bench_tcp_checks_and_agrees() {
    let sizes = [0, 12, 1 << 20];
    let cfg = TcpRingConfig { timeout: Duration::from_secs(30), ..TcpRingConfig::default() };
    let all = run_ranks(tcp_group(4, &cfg), |mut c| {
        bench_all_reduce(&mut c, &sizes, 2, 1, true).unwrap()
    });
    for rows in &all {
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.check == Some(true)));
        assert_eq!(rows, &all[0]);
    }
}
