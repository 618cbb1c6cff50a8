//! Small helpers shared by the benchmark's modules: errors, ports, statistics and `/proc`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// An `io::Error` with `msg`.
pub(crate) fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// `name` on the PATH (or in /usr/sbin, /sbin).
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// 127.0.0.1:`port`.
pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The median of `v`, or `None` when empty.
pub(crate) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

/// Nearest-rank percentile of durations, in microseconds.
pub(crate) fn pct_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// `bytes` in `d`, in Gbit/s.
pub(crate) fn gbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// The file at `p`, or empty.
pub(crate) fn read_to_string(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Resident memory of `pid`, KiB.
pub(crate) fn vm_rss_kib(pid: u32) -> Option<u64> {
    read_to_string(format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU time of a process.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let st = proc_stat(pid)?;
    Some(ticks(st.utime + st.stime))
}

/// User plus system CPU time of a process and of every process below it: of each living one,
/// its own and that of its children it has waited for (so a helper that was forked for a
/// connection and has ended still counts, once its parent has reaped it).
pub(crate) fn tree_cpu_time(pid: u32) -> Option<Duration> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if let Some(st) = e.file_name().to_str().and_then(|n| n.parse().ok()).and_then(proc_stat) {
            all.push(st);
        }
    }
    let root = all.iter().find(|s| s.pid == pid)?;
    let (mut total, mut todo) = (0u64, vec![root.pid]);
    while let Some(p) = todo.pop() {
        for st in all.iter().filter(|s| s.pid == p) {
            total += st.utime + st.stime + st.cutime + st.cstime;
        }
        todo.extend(all.iter().filter(|s| s.ppid == p).map(|s| s.pid));
    }
    Some(ticks(total))
}

/// The fields of `/proc/PID/stat` that the CPU figures use.
struct ProcStat {
    /// The process.
    pid: u32,
    /// Its parent.
    ppid: u32,
    /// User time, clock ticks.
    utime: u64,
    /// System time, clock ticks.
    stime: u64,
    /// User time of the children it has waited for.
    cutime: u64,
    /// System time of the children it has waited for.
    cstime: u64,
}

/// Reads `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = read_to_string(format!("/proc/{pid}/stat"));
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, ppid 1, utime is field 14 overall (index 11
    // here), then stime, cutime and cstime.
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat { pid, ppid: num(1)? as u32, utime: num(11)?, stime: num(12)?, cutime: num(13)?, cstime: num(14)? })
}

/// `n` clock ticks as a duration.
fn ticks(n: u64) -> Duration {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hz = *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    });
    Duration::from_secs_f64(n as f64 / hz as f64)
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    read_to_string("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// `v` as a `String`.
pub(crate) fn s(v: &str) -> String {
    v.to_string()
}
