//! Catch-up benchmark against PostgreSQL's own logical replication (see `harness.rs`).
//!
//! Run: `cargo build --release && cargo bench --bench catchup -- [w1|w2|w3|w4|all] [--smoke]`.
//! Prints one Markdown table per workload (seconds, rows/s, ratio to native and to the
//! ceiling, shadowsync's peak RSS and CPU time).

mod harness;

use harness::{Size, Workload};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut workloads: Vec<Workload> = args.iter().filter_map(|a| Workload::parse(a)).collect();
    if workloads.is_empty() || args.iter().any(|a| a == "all") {
        workloads = vec![Workload::W1, Workload::W2, Workload::W3, Workload::W4];
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
        let outcome = runtime.block_on(harness::run(w, size, &binary));
        println!("\n{}", outcome.table());
    }
}
