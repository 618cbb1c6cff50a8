//! `holdfast status` and the `--status` control sockets of `server` and `client`: the process
//! answers each connection of its socket with what it runs now, as a table or as JSON
//! (`holdfast::net::control` creates the socket and checks who connects).
//!
//! The exchange: the asking side sends one line, `table` or `json`; the answer is the text,
//! then the socket is closed.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use holdfast::net::{control, LinkEvent, SessionStatus, StatsHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{debug, info};

use crate::args::StatusArgs;

/// How long an asking side has to send its line, and to read the answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// `holdfast status`: asks the socket and prints the answer.
pub(crate) async fn status(args: StatusArgs) -> Result<()> {
    let path = &args.socket;
    let mut sock = control::connect(path).await?;
    let ask = if args.json { "json\n" } else { "table\n" };
    let exchange = async {
        sock.write_all(ask.as_bytes()).await?;
        let mut answer = String::new();
        sock.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.map_err(|_| {
        anyhow::anyhow!("{}: no answer within {}", path.display(), holdfast::human::Rounded(EXCHANGE_TIMEOUT))
    })?;
    // A process that refuses the asker closes the connection at once: the question may then
    // meet a closed socket.
    let answer = match answer {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
            String::new()
        }
        r => r.with_context(|| format!("{}: cannot read the answer", path.display()))?,
    };
    if answer.is_empty() {
        anyhow::bail!(
            "{}: the process there closed the connection without an answer (it answers only its own user and root)",
            path.display()
        );
    }
    crate::write_stdout(answer.as_bytes())
}

/// Binds the control socket at `path` and answers it in a task with `render(json)`. A live
/// process's socket there is taken over only with `take_over` (an upgrade), else refused.
///
/// # Errors
/// If the socket cannot be created.
pub(crate) fn serve(
    path: PathBuf,
    take_over: bool,
    render: impl Fn(bool) -> String + Send + Sync + 'static,
) -> Result<StatusSocket> {
    let listener = control::bind(&path, take_over).with_context(|| format!("--status {}", path.display()))?;
    info!(status = %path.display(), "status socket ready (holdfast status --socket PATH)");
    let file = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
    let task = tokio::spawn(answer_all(listener, path.clone(), render));
    Ok(StatusSocket { path, file, task })
}

/// A status socket being answered: dropped (the process ends), it stops answering and removes
/// its file, unless another process has bound the path since (an upgrade's new process). Found by
/// an operator's day: the files were left behind.
pub(crate) struct StatusSocket {
    path: PathBuf,
    /// The socket file's (device, inode) when bound.
    file: Option<(u64, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        self.task.abort();
        let now = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Answers one connection at a time, each within [`EXCHANGE_TIMEOUT`].
async fn answer_all(listener: UnixListener, path: PathBuf, render: impl Fn(bool) -> String) {
    let mut backoff = holdfast::net::AcceptBackoff::default();
    loop {
        let mut sock = match listener.accept().await {
            Ok((s, _)) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                backoff.wait_after("status", &e).await;
                continue;
            }
        };
        if let Err(e) = control::check_asker(&sock, &path) {
            debug!(error = %e, "status: connection refused");
            continue;
        }
        let exchange = async {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < 16 && sock.read(&mut byte).await? == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            let text = render(line == b"json");
            sock.write_all(text.as_bytes()).await?;
            sock.shutdown().await
        };
        match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "status: not answered"),
            Err(_) => debug!("status: the asking side took too long"),
        }
    }
}

/// The server's answer: its live sessions.
pub(crate) fn server_answer(stats: &StatsHandle, json: bool) -> String {
    let list = stats.sessions();
    let earlier = stats.stats().earlier_sessions;
    if json {
        sessions_json(&list, earlier, SystemTime::now())
    } else {
        let mut out = sessions_table(&list, SystemTime::now());
        if earlier > 0 {
            let _ = writeln!(
                out,
                "and {earlier} session(s) of an earlier server process, kept since an upgrade (not listed: they resume and end in that process)"
            );
        }
        out
    }
}

/// The sessions as a JSON document: `{"sessions": [...], "earlier_process_sessions": N}` (the
/// sessions earlier server processes still hold after an upgrade, not listed).
pub(crate) fn sessions_json(list: &[SessionStatus], earlier: usize, now: SystemTime) -> String {
    let mut out = String::from("{\"sessions\":[");
    for (i, s) in list.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let rtt = s.rtt.map_or_else(|| "null".to_string(), |r| format!("{:.3}", r.as_secs_f64() * 1000.0));
        let forwards: Vec<String> = s.forwards.iter().map(|f| json_str(f)).collect();
        let _ = write!(
            out,
            "{{\"id\":{},\"client\":{},\"key\":{},\"addr\":{},\"state\":{},\"since\":{},\"since_seconds\":{},\
             \"opened\":{},\"rtt_ms\":{rtt},\"bytes_to_client\":{},\"bytes_from_client\":{},\"resumes\":{},\
             \"streams\":{},\"forwards\":[{}]}}",
            json_str(&s.id.to_string()),
            s.name.as_deref().map_or_else(|| "null".to_string(), json_str),
            json_str(&s.key.to_string()),
            json_str(&s.addr.to_string()),
            json_str(if s.attached { "attached" } else { "detached" }),
            json_str(&humantime::format_rfc3339_seconds(s.since).to_string()),
            now.duration_since(s.since).unwrap_or_default().as_secs(),
            json_str(&humantime::format_rfc3339_seconds(s.opened).to_string()),
            s.bytes_to_client,
            s.bytes_from_client,
            s.resumes,
            s.streams,
            forwards.join(","),
        );
    }
    let _ = writeln!(out, "],\"earlier_process_sessions\":{earlier}}}");
    out
}

/// The sessions as a table, one line each, oldest first.
pub(crate) fn sessions_table(list: &[SessionStatus], now: SystemTime) -> String {
    let head = [
        "ID",
        "CLIENT",
        "KEY",
        "ADDRESS",
        "STATE",
        "SINCE",
        "RTT",
        "TO CLIENT",
        "FROM CLIENT",
        "RESUMES",
        "STREAMS",
        "FORWARDS",
    ];
    let mut rows = vec![head.map(String::from).to_vec()];
    for s in list {
        let key = s.key.to_string();
        rows.push(vec![
            s.id.to_string(),
            s.name.as_deref().map_or_else(|| "-".to_string(), |n| holdfast::human::printable(n).into_owned()),
            format!("{}…", key.get(..8).unwrap_or(&key)),
            s.addr.to_string(),
            if s.attached { "attached" } else { "detached" }.to_string(),
            format!("{} ago", ago(now.duration_since(s.since).unwrap_or_default())),
            s.rtt.map_or_else(|| "-".to_string(), |r| format!("{:.1}ms", r.as_secs_f64() * 1000.0)),
            bytes(s.bytes_to_client),
            bytes(s.bytes_from_client),
            s.resumes.to_string(),
            s.streams.to_string(),
            if s.forwards.is_empty() { "-".to_string() } else { s.forwards.join(", ") },
        ]);
    }
    let mut out = table(&rows);
    if list.is_empty() {
        out.push_str("(no session)\n");
    }
    out
}

/// Rows as columns padded to their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// How long ago, to the second: `41s`, `2m05s`, `3h10m`.
fn ago(d: Duration) -> String {
    match d.as_secs() {
        n @ 0..60 => format!("{n}s"),
        n => holdfast::human::Rounded(Duration::from_secs(n)).to_string(),
    }
}

/// A byte count for people: exact below 10 KiB, else in KiB, MiB or GiB.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if n < 10 * 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `text` as a JSON string, quoted and escaped.
pub(crate) fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What a client runs, for its `--status` socket: its forwards, and the state of its session.
pub(crate) struct ClientStatus {
    server: String,
    /// False with --no-mux: each connection has a session of its own, not shown.
    multiplexed: bool,
    /// Each forward: (kind, where it listens, where it goes).
    forwards: Vec<(&'static str, String, String)>,
    session: Mutex<SessionState>,
}

struct SessionState {
    state: &'static str,
    since: SystemTime,
    resumes: u64,
    faults: u64,
    /// A suspicion (silence, a network change) not yet counted as a fault: it is one if it
    /// ends in a resume (the link was given up), not if the link answers again.
    suspected: bool,
    cause: Option<String>,
}

impl ClientStatus {
    pub(crate) fn new(server: String, multiplexed: bool) -> Arc<ClientStatus> {
        let state = if multiplexed {
            "not open yet (it opens with the first connection)"
        } else {
            "one session per connection (--no-mux)"
        };
        Arc::new(ClientStatus {
            server,
            multiplexed,
            forwards: Vec::new(),
            session: Mutex::new(SessionState {
                state,
                since: SystemTime::now(),
                resumes: 0,
                faults: 0,
                suspected: false,
                cause: None,
            }),
        })
    }

    /// Adds a forward (before the status is shared).
    pub(crate) fn add(self: &mut Arc<Self>, kind: &'static str, listen: String, to: String) {
        if let Some(me) = Arc::get_mut(self) {
            me.forwards.push((kind, listen, to));
        }
    }

    /// Follows the session's link events.
    pub(crate) fn event(&self, ev: &LinkEvent) {
        if !self.multiplexed {
            return;
        }
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        // A new session, or a new link, starts its time anew (a session the server ended is
        // replaced by a new one at the next connection: its counts start again).
        let fresh = matches!(ev, LinkEvent::Connected { .. } | LinkEvent::Resumed { .. });
        let (state, cause) = match ev {
            LinkEvent::Connected { .. } => {
                // A new session: the last cause was the ended one's.
                (s.resumes, s.faults, s.suspected, s.cause) = (0, 0, false, None);
                ("attached", None)
            }
            LinkEvent::Resumed { .. } => {
                s.resumes += 1;
                // Found by an operator's day: an outage that went silent (the commonest, Wi-Fi
                // gone) ends in a resume without a "lost" event, and was not counted.
                if std::mem::take(&mut s.suspected) {
                    s.faults += 1;
                }
                ("attached", None)
            }
            LinkEvent::Lost(l) => {
                // One outage is one fault, suspected first or not.
                s.suspected = false;
                s.faults += 1;
                ("reconnecting", Some(l.cause.clone()))
            }
            // Silent for much longer than its round trip: a new connection is being tried
            // while the old one may still answer.
            LinkEvent::Suspect { quiet } => {
                s.suspected = true;
                (
                    "suspect (no answer; trying a new connection)",
                    Some(format!("no answer for {}", holdfast::human::Rounded(*quiet))),
                )
            }
            LinkEvent::NetworkChanged => {
                s.suspected = true;
                (
                    "suspect (the network changed; trying a new connection)",
                    Some("the network changed (an address or route, or the machine woke)".to_string()),
                )
            }
            LinkEvent::Healthy => {
                // The old link answered again: no fault.
                s.suspected = false;
                ("attached", None)
            }
            // The server ended the session (it stopped, say): the next connection opens another.
            LinkEvent::Closed => ("closed (a new session opens with the next connection)", None),
            LinkEvent::Failed { reason } => ("failed", Some(reason.clone())),
            _ => return,
        };
        if s.state != state || fresh {
            s.since = SystemTime::now();
        }
        s.state = state;
        if cause.is_some() {
            s.cause = cause;
        }
    }

    /// The answer of the client's socket.
    pub(crate) fn answer(&self, json: bool) -> String {
        let s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let ago = SystemTime::now().duration_since(s.since).unwrap_or_default();
        if json {
            let forwards: Vec<String> = self
                .forwards
                .iter()
                .map(|(k, l, t)| {
                    format!("{{\"kind\":{},\"listen\":{},\"to\":{}}}", json_str(k), json_str(l), json_str(t))
                })
                .collect();
            let cause = s.cause.as_deref().map_or_else(|| "null".to_string(), json_str);
            return format!(
                "{{\"server\":{},\"session\":{{\"state\":{},\"since\":{},\"since_seconds\":{},\"resumes\":{},\"faults\":{},\"last_cause\":{cause}}},\"forwards\":[{}]}}\n",
                json_str(&self.server),
                json_str(s.state),
                json_str(&humantime::format_rfc3339_seconds(s.since).to_string()),
                ago.as_secs(),
                s.resumes,
                s.faults,
                forwards.join(","),
            );
        }
        let mut out = format!(
            "session with {}: {} for {}, {} resumes, {} link faults",
            holdfast::human::printable(&self.server),
            s.state,
            self::ago(ago),
            s.resumes,
            s.faults
        );
        if let Some(c) = &s.cause {
            let _ = write!(out, " (last: {})", holdfast::human::printable(c));
        }
        out.push('\n');
        let mut rows = vec![vec!["FORWARD".to_string(), "LISTEN".to_string(), "TO".to_string()]];
        rows.extend(self.forwards.iter().map(|(k, l, t)| vec![k.to_string(), l.clone(), t.clone()]));
        out.push_str(&table(&rows));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: &ClientStatus) -> (String, u64, u64, SystemTime) {
        let s = status.session.lock().unwrap();
        (s.state.to_string(), s.resumes, s.faults, s.since)
    }

    /// Found by an operator's look: through a silent outage the client's status said "attached"
    /// with the old link's time, and after the server stopped it still showed the ended
    /// session's. A suspect link, a resume, an end and a new session each show.
    #[test]
    fn the_client_status_follows_suspicion_resumes_and_new_sessions() {
        let status = ClientStatus::new("s".into(), true);
        let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        status.event(&LinkEvent::Connected { peer });
        let (st, _, _, first) = state(&status);
        assert_eq!(st, "attached");
        status.event(&LinkEvent::Suspect { quiet: Duration::from_secs(2) });
        assert!(state(&status).0.starts_with("suspect"), "{:?}", state(&status));
        let resumed =
            LinkEvent::Resumed { peer, after: Duration::from_secs(3), replayed_sent: 0, replayed_received: 0 };
        std::thread::sleep(Duration::from_millis(5));
        status.event(&resumed);
        let (st, resumes, faults, since) = state(&status);
        // A silent outage given up and resumed is a fault, though no "lost" came.
        assert_eq!((st.as_str(), resumes, faults), ("attached", 1, 1));
        assert!(since > first, "the new link's time did not start anew");
        status.event(&LinkEvent::Closed);
        assert!(state(&status).0.starts_with("closed"), "{:?}", state(&status));
        status.event(&LinkEvent::Connected { peer });
        let (st, resumes, faults, _) = state(&status);
        assert_eq!((st.as_str(), resumes, faults), ("attached", 0, 0), "a new session's counts start again");
        // Found by an operator's day: the new session showed the ended one's last cause.
        let text = status.answer(false);
        assert!(!text.contains("last:"), "{text}");
    }

    /// One outage is one fault whatever its events; a suspicion the link then clears is none.
    #[test]
    fn each_outage_is_one_fault_and_a_cleared_suspicion_none() {
        let status = ClientStatus::new("s".into(), true);
        let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let resumed = LinkEvent::Resumed { peer, after: Duration::ZERO, replayed_sent: 0, replayed_received: 0 };
        let lost = || LinkEvent::Lost(holdfast::net::LinkLost { cause: "reset".into(), faults: 1 });
        status.event(&LinkEvent::Connected { peer });
        status.event(&LinkEvent::Suspect { quiet: Duration::from_secs(1) });
        status.event(&LinkEvent::Healthy);
        assert_eq!(state(&status).2, 0, "the link answered again");
        status.event(&LinkEvent::Suspect { quiet: Duration::from_secs(1) });
        status.event(&lost());
        status.event(&resumed);
        assert_eq!(state(&status).2, 1, "suspect, lost, resumed: one outage");
        status.event(&lost());
        status.event(&resumed);
        status.event(&LinkEvent::NetworkChanged);
        status.event(&resumed);
        assert_eq!(state(&status).2, 3);
    }
}
