//! Catch-up benchmark against PostgreSQL's own logical replication (see `harness.rs`).
//!
//! Run: `cargo build --release && cargo bench --bench catchup -- [w1|w2|w2-moves|w3|w4|copy|all] [--smoke]
//! [--repeat N]`. Prints one Markdown table per workload run (seconds, rows/s, ratio to native
//! and to the ceiling, shadowsync's peak RSS and CPU time); with `--repeat N` each workload runs
//! N times on fresh clusters, followed by the median and range of each ratio (single runs of a
//! few seconds vary by about 10%). `copy` is the initial-copy benchmark.

mod copy;
mod harness;

use harness::{Size, Workload};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let repeat: usize = args
        .iter()
        .position(|a| a == "--repeat")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--repeat takes a number"))
        .unwrap_or(1);
    let mut workloads: Vec<Workload> = args.iter().filter_map(|a| Workload::parse(a)).collect();
    let all = args.iter().any(|a| a == "all");
    let with_copy = all || args.iter().any(|a| a == "copy");
    if all || (workloads.is_empty() && !with_copy) {
        workloads = vec![
            Workload::W1,
            Workload::W2,
            Workload::W2Moves,
            Workload::W3,
            Workload::W4,
        ];
    }
    if args.iter().any(|a| a == "--list") {
        for w in workloads {
            println!("{w:?}: bench");
        }
        return;
    }
    let binary = harness::release_binary();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for w in workloads {
        let size = if smoke { Size::smoke(w) } else { Size::full(w) };
        let mut outcomes = Vec::new();
        for rep in 0..repeat.max(1) {
            let outcome = runtime.block_on(harness::run(w, size, &binary, rep % 2 == 1));
            println!("\n{}", outcome.table());
            outcomes.push(outcome);
        }
        if outcomes.len() > 1 {
            println!("\n{}", harness::summary(&outcomes));
        }
    }
    if with_copy {
        let (rows, per_table) = if smoke {
            (20_000, 5_000)
        } else {
            (5_000_000, 250_000)
        };
        let outcome = runtime.block_on(copy::run(rows, per_table, &binary));
        println!("\n{}", outcome.table());
    }
}
