//! `holdfast demo`: the whole tunnel on loopback, broken on purpose, and its report.

use std::io::IsTerminal;

use anyhow::Result;
use holdfast::human::Rounded;

pub(crate) async fn demo(bytes: u64, faults: u32) -> Result<bool> {
    let mib = |v: u64| v as f64 / (1 << 20) as f64;
    eprintln!("holdfast demo: app -> forward port -> holdfast client -> fault relay -> holdfast server -> service");
    eprintln!(
        "  {:.0} MiB each way, {faults} faults (resets, and every third one a silent path, as when a laptop roams), all on loopback\n",
        mib(bytes)
    );
    let opts = holdfast::demo::DemoOptions { bytes, faults, progress: std::io::stderr().is_terminal() };
    let r = holdfast::demo::run(opts).await?;
    let stats = |v: &[std::time::Duration]| {
        let mut v = v.to_vec();
        v.sort();
        match (v.get(v.len() / 2), v.last()) {
            (Some(m), Some(x)) => format!("median {}, max {}", Rounded(*m), Rounded(*x)),
            _ => "none".to_string(),
        }
    };
    let mark = |ok: bool| if ok { "match" } else { "MISMATCH" };
    println!("holdfast demo report");
    println!("  up:    sent {} B, received {} B, SHA-256 {} ({})", r.up.0, r.up.1, mark(r.up_match), r.up_hash);
    println!("  down:  sent {} B, received {} B, SHA-256 {} ({})", r.down.0, r.down.1, mark(r.down_match), r.down_hash);
    println!(
        "  faults that hit the live link: {} ({} resets, {} silent paths){}",
        r.resets + r.stalls,
        r.resets,
        r.stalls,
        if r.skipped > 0 { format!("; {} not injected: the transfer had finished", r.skipped) } else { String::new() }
    );
    println!("  resumes: {}", r.resumes);
    println!("  fault to data flowing again both ways (detection included):");
    println!("    after a reset:        {}", stats(&r.reset_times));
    println!("    after a silent path:  {}", stats(&r.stall_times));
    println!(
        "  timers: the defaults (keepalive {}, dead-peer time {}); a silent path is noticed by the suspicion rule",
        Rounded(r.timers.0),
        Rounded(r.timers.1)
    );
    println!("  bytes replayed: {} by the client, {} by the server", r.replayed.0, r.replayed.1);
    let rate = mib(2 * bytes) / r.elapsed.as_secs_f64().max(1e-9);
    println!("  elapsed: {:.2?} ({rate:.0} MiB/s both ways combined, faults included)", r.elapsed);
    println!("  result: {}", if r.ok() { "OK: every byte arrived, exactly once, in order" } else { "FAILED" });
    Ok(r.ok())
}
