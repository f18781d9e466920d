//! CI smoke run of the catch-up benchmark harness (`benches/catchup`): every workload at a few
//! thousand changes, drained three ways, both greens verified. Timings are printed, not
//! asserted (performance goals are reported by the benchmark, not tested).

#[path = "../benches/catchup/copy.rs"]
mod copy;
#[path = "../benches/catchup/harness.rs"]
mod harness;

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workload_drains_three_ways_and_verifies() {
    let binary = Path::new(env!("CARGO_BIN_EXE_shadowsync"));
    for w in [
        harness::Workload::W1,
        harness::Workload::W2,
        harness::Workload::W3,
        harness::Workload::W4,
    ] {
        let outcome = harness::run(w, harness::Size::smoke(w), binary, false).await;
        eprintln!("{}", outcome.table());
    }
    eprintln!("{}", copy::run(20_000, 2_000, binary).await.table());
}
