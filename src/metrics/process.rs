//! The process metrics Prometheus client libraries export under their standard names
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`), read from `/proc/self` at each scrape.
//!
//! Why by hand: the figures are a few lines of `/proc` each, so no new dependency is needed.
//! Elsewhere than Linux, the series are exported at 0 except the start time (the names stay,
//! so dashboards and rules do not break).

use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Clock ticks per second in `/proc/<pid>/stat`: the kernel reports CPU times in USER_HZ,
/// which is 100 on every Linux architecture (sysconf(_SC_CLK_TCK) would need libc).
const USER_HZ: f64 = 100.0;

/// The process gauges, refreshed by [`Process::refresh`] before each encoding.
#[derive(Debug)]
pub struct Process {
    cpu: Counter<f64, AtomicU64>,
    rss: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
}

impl Process {
    /// Registers the process metrics in `registry` (which must have no prefix).
    pub fn register(registry: &mut Registry) -> Process {
        let cpu = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "process_cpu",
            "Total user and system CPU time spent by the process, in seconds",
            Unit::Seconds,
            cpu.clone(),
        );
        let rss = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size of the process, in bytes",
            Unit::Bytes,
            rss.clone(),
        );
        let open_fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            open_fds.clone(),
        );
        let max_fds = Gauge::default();
        registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors (the soft limit)",
            max_fds.clone(),
        );
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch, in seconds",
            Unit::Seconds,
            start,
        );
        Process {
            cpu,
            rss,
            open_fds,
            max_fds,
        }
    }

    /// Reads `/proc/self` into the gauges; a figure that cannot be read keeps its last value.
    pub fn refresh(&self) {
        if let Some(cpu) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| cpu_seconds(&s))
        {
            // A counter only goes up: add what was spent since the last scrape.
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
        }
        if let Some(rss) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| rss_bytes(&s))
        {
            self.rss.set(rss as i64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries: not counted.
            self.open_fds.set(dir.count() as i64 - 1);
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| max_fds(&s))
        {
            self.max_fds.set(max as i64);
        }
    }
}

/// utime + stime of `/proc/self/stat`, in seconds. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from the last `)`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// `VmRSS` of `/proc/self/status` (in kB there), in bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (tokio (x) 1) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 9 0 100 200000 300";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(
            rss_bytes("Name:\tshadowsync\nVmRSS:\t   2048 kB\n"),
            Some(2048 * 1024)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_fds(limits), Some(1024));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let mut registry = Registry::default();
        let p = Process::register(&mut registry);
        p.refresh();
        assert!(p.rss.get() > 0);
        assert!(p.open_fds.get() > 0);
        assert!(p.max_fds.get() > 0);
    }
}
