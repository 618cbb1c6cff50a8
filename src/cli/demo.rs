//! `holdfast demo`: the whole tunnel on loopback, broken on purpose, and its report.

use std::io::IsTerminal;

use anyhow::Result;

pub(crate) async fn demo(bytes: u64, faults: u32) -> Result<bool> {
    let mib = |v: u64| v as f64 / (1 << 20) as f64;
    eprintln!("holdfast demo: app -> forward port -> holdfast client -> fault relay -> holdfast server -> service");
    eprintln!("  {:.0} MiB each way, {faults} faults (resets and a silent stall), all on loopback\n", mib(bytes));
    let opts = holdfast::demo::DemoOptions { bytes, faults, progress: std::io::stderr().is_terminal() };
    let r = holdfast::demo::run(opts).await?;
    let mut times = r.resume_times.clone();
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    let mark = |ok: bool| if ok { "match" } else { "MISMATCH" };
    println!("holdfast demo report");
    println!("  up:    sent {} B, received {} B, SHA-256 {} ({})", r.up.0, r.up.1, mark(r.up_match), r.up_hash);
    println!("  down:  sent {} B, received {} B, SHA-256 {} ({})", r.down.0, r.down.1, mark(r.down_match), r.down_hash);
    println!("  faults injected: {} ({} resets, {} silent stall)", r.resets + r.stalls, r.resets, r.stalls);
    println!("  resumes: {}", r.resumes);
    println!("  time to resume after detection: median {median:.1?}, max {max:.1?}");
    println!("  bytes replayed: {} by the client, {} by the server", r.replayed.0, r.replayed.1);
    let rate = mib(2 * bytes) / r.elapsed.as_secs_f64().max(1e-9);
    println!("  elapsed: {:.2?} ({rate:.0} MiB/s both ways combined, faults included)", r.elapsed);
    println!("  result: {}", if r.ok() { "OK: every byte arrived, exactly once, in order" } else { "FAILED" });
    Ok(r.ok())
}
