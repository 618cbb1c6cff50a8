//! What `connect` shows on a terminal: its link's state in the terminal's title, and the
//! one-key recovery question.
//!
//! Under `ssh -o ProxyCommand`, the ProxyCommand's stderr is ssh's terminal, where a full-screen
//! program (vi, less, tmux) may be drawing: a line written there would stay painted over its
//! screen until it redraws. So the state of the link goes to the window title instead (OSC 2),
//! which leaves the screen alone: the title in force is pushed on the terminal's title stack
//! (`CSI 22;2 t`) when the link is first lost, and popped back (`CSI 23;2 t`) once it is back.
//! Terminals with a title stack (xterm, VTE, tmux) show their old title again; others keep the
//! last line, "link back". The question of `--on-fault ask` needs an answer, so it is written
//! on the terminal itself, as `\r\n…` (which displays correctly in raw and in cooked mode).

use std::io::{Read, Write};
use std::os::fd::AsFd;

use holdfast::human::{os_errors_in_words, printable};
use holdfast::net::{LinkEvent, Recovery, Rounded};
use tokio::sync::{broadcast, watch, Notify};

/// Set (to the fault's cause) when the user answers "no" to `--on-fault ask` under `connect`.
pub(crate) static DECLINED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// Notified when [`DECLINED`] is set.
pub(crate) static DECLINE: Notify = Notify::const_new();

/// One line on the terminal (or stderr), safe in raw mode.
pub(crate) fn said(text: &str) {
    write_stderr(&format!("\r\nholdfast: {text}\r\n"));
}

/// The state of the link shown in the terminal's title, written with `W`.
struct Title<W: FnMut(&str)> {
    /// The title in force before ours is on the terminal's title stack.
    pushed: bool,
    write: W,
}

impl<W: FnMut(&str)> Title<W> {
    /// Shows `text` as the window title (pushing the one in force first).
    fn show(&mut self, text: &str) {
        let push = if self.pushed { "" } else { "\x1b[22;2t" };
        self.pushed = true;
        (self.write)(&format!("{push}\x1b]2;holdfast: {text}\x07"));
    }

    /// Gives the terminal back the title it had.
    fn restore(&mut self) {
        if std::mem::take(&mut self.pushed) {
            (self.write)("\x1b[23;2t");
        }
    }
}

fn write_stderr(bytes: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(bytes.as_bytes());
    let _ = err.flush();
}

/// The status for a link event, if it deserves one. Reconnect attempts are shown at 4, 8,
/// 16… so that a long outage says it is still trying.
pub(crate) fn describe(ev: &LinkEvent) -> Option<String> {
    match ev {
        LinkEvent::Lost(l) => Some(format!("link lost ({}); reconnecting…", printable(&os_errors_in_words(&l.cause)))),
        LinkEvent::Reconnecting { attempt, elapsed } if *attempt >= 4 && attempt.is_power_of_two() => {
            Some(format!("still reconnecting (attempt {attempt}, {} so far)", Rounded(*elapsed)))
        }
        LinkEvent::Suspect { quiet } => {
            Some(format!("link suspect (no answer for {}); trying a new connection…", Rounded(*quiet)))
        }
        LinkEvent::NetworkChanged => Some("the network changed; trying a new connection…".to_string()),
        LinkEvent::Healthy => Some("link answering again".to_string()),
        LinkEvent::Resumed { after, .. } => Some(format!("link back; resumed after {}", Rounded(*after))),
        // A failure gets no status: `connect` exits with the error, said once.
        _ => None,
    }
}

/// How long a fault lasts before the title tells of it. The title is written on the terminal
/// that ssh writes to, from another process: a write that lands while the screen's output is in
/// the middle of an escape sequence (ssh's last bytes before the fault may end inside one, and
/// the rest arrives only once the link is back) breaks that sequence, leaving text such as
/// `27m` on the screen. Most faults are over in milliseconds (a reset, a new address): those
/// now write nothing at all; a longer outage, which a user wants explained, still is.
const SHOW_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Shows the stream's link events in the terminal's title until the stream ends or the
/// program on stdio is gone (`gone` turns true: nothing more is shown, the title is given
/// back), once a fault has lasted [`SHOW_AFTER`]: a fault over sooner shows nothing. With
/// `asking` (the `--on-fault ask` question tells of each loss itself), losses are not shown.
pub(crate) async fn show_events(events: broadcast::Receiver<LinkEvent>, asking: bool, gone: watch::Receiver<bool>) {
    show_events_with(events, asking, gone, write_stderr).await;
}

/// [`show_events`], writing the terminal's bytes with `write`.
async fn show_events_with(
    mut events: broadcast::Receiver<LinkEvent>,
    asking: bool,
    mut gone: watch::Receiver<bool>,
    write: impl FnMut(&str),
) {
    let mut title = Title { pushed: false, write };
    // A fault not shown yet: when it will be, and what started it (the first word of the
    // outage, not the attempts made since: "still reconnecting" would come first otherwise).
    let mut pending: Option<(tokio::time::Instant, String)> = None;
    // An outage's first event was seen, and the link has not come back since.
    let mut outage = false;
    loop {
        let due = pending.as_ref().map(|p| p.0);
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = gone.wait_for(|g| *g) => break,
            () = async { match due { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                if let Some((_, text)) = pending.take() {
                    title.show(&text);
                }
                continue;
            }
        };
        match ev {
            Ok(ev) => {
                if asking && matches!(ev, LinkEvent::Lost(_)) {
                    continue;
                }
                let over = matches!(ev, LinkEvent::Resumed { .. } | LinkEvent::Healthy);
                // The old link given up during an outage already told (a suspicion, a network
                // change) adds nothing: the attempts go on, and "lost" after them reads backwards.
                let old_news = outage && matches!(ev, LinkEvent::Lost(_));
                if let Some(text) = describe(&ev).filter(|_| !old_news) {
                    if title.pushed {
                        title.show(&text);
                    } else if over {
                        // Over before it was shown: nothing to say.
                        pending = None;
                    } else if pending.is_none() {
                        pending = Some((tokio::time::Instant::now() + SHOW_AFTER, text));
                    }
                    outage = !over;
                }
                match ev {
                    LinkEvent::Resumed { .. } | LinkEvent::Healthy => title.restore(),
                    LinkEvent::Closed | LinkEvent::Failed { .. } => break,
                    _ => {}
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    title.restore();
}

/// Said once: `--on-fault ask` does not ask while another program reads the terminal key by key.
static RAW_TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks on the controlling terminal whether to recover, answered by one key: `n` gives up,
/// anything else (`y`, Enter) recovers. The terminal is put in raw mode for the one key and
/// given back its mode afterwards. Without a terminal, or with one already in raw mode (an
/// interactive ssh reads it key by key, and would lose keys to the question or take the
/// answer), recovers without asking.
pub(crate) fn ask(cause: &str) -> Recovery {
    let Ok(mut tty) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") else {
        write_stderr("\r\nholdfast: --on-fault ask: no terminal to ask on; recovering\r\n");
        return Recovery::Recover;
    };
    let saved = rustix::termios::tcgetattr(tty.as_fd()).ok();
    if saved.as_ref().is_some_and(|t| !t.local_modes.contains(rustix::termios::LocalModes::ICANON)) {
        // Found by a walk through `--on-fault ask` under interactive ssh: ssh reads this
        // terminal key by key too, so the answer was taken from it (it then waited for one more
        // key, which went to the remote program) or an `n` went to the remote shell instead.
        // Not asked: said once, and the link recovered, as without --on-fault ask.
        if !RAW_TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let _ = write!(
                tty,
                "\r\nholdfast: link lost ({}); recovering without asking: another program (ssh) reads this terminal key by key, so an answer typed here would be taken from it. --on-fault ask asks only for a command that does not (ssh HOST COMMAND, scp, git)\r\n",
                printable(&os_errors_in_words(cause))
            );
        }
        return Recovery::Recover;
    }
    if let Some(mut raw) = saved.clone() {
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(tty.as_fd(), rustix::termios::OptionalActions::Now, &raw);
    }
    let _ = write!(tty, "\r\nholdfast: link lost ({}). Recover? [Y/n] ", printable(&os_errors_in_words(cause)));
    let _ = tty.flush();
    let mut key = [0u8; 1];
    let answer = match tty.read(&mut key) {
        Ok(1) if key[0].eq_ignore_ascii_case(&b'n') => Recovery::Fail,
        _ => Recovery::Recover,
    };
    let word = if answer == Recovery::Fail { "no: ending the session" } else { "yes: reconnecting" };
    let _ = write!(tty, "{word}\r\n");
    if let Some(saved) = saved {
        let _ = rustix::termios::tcsetattr(tty.as_fd(), rustix::termios::OptionalActions::Now, &saved);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast::net::LinkLost;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// [`show_events_with`] running on a channel: its sender, what it wrote, its task, and the
    /// `gone` sender it watches (kept, so that the program on stdio stays).
    fn titles() -> (broadcast::Sender<LinkEvent>, Arc<Mutex<String>>, tokio::task::JoinHandle<()>, watch::Sender<bool>)
    {
        let (tx, rx) = broadcast::channel(16);
        let (gone_tx, gone) = watch::channel(false);
        let written = Arc::new(Mutex::new(String::new()));
        let sink = written.clone();
        let shown = tokio::spawn(show_events_with(rx, false, gone, move |b| sink.lock().unwrap().push_str(b)));
        (tx, written, shown, gone_tx)
    }

    /// Found by a walk through faults: a title written while ssh's output stood inside an escape
    /// sequence broke it (`27m` on the screen, 11 lines in 20 kills). A fault over within
    /// [`SHOW_AFTER`] now writes nothing; a longer one is shown, and the title given back.
    #[tokio::test(start_paused = true)]
    async fn a_fault_over_quickly_writes_nothing_on_the_terminal() {
        let (tx, written, shown, _gone) = titles();
        let lost = || LinkEvent::Lost(LinkLost { cause: "reset".into(), faults: 1 });
        let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let back =
            || LinkEvent::Resumed { peer, after: Duration::from_millis(5), replayed_sent: 0, replayed_received: 0 };
        tx.send(lost()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(back()).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(written.lock().unwrap().as_str(), "", "a 300 ms fault was shown");
        tx.send(lost()).unwrap();
        tokio::time::sleep(SHOW_AFTER + Duration::from_millis(100)).await;
        assert!(written.lock().unwrap().contains("link lost"), "{:?}", written.lock().unwrap());
        tx.send(back()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(written.lock().unwrap().ends_with("\x1b[23;2t"), "the title was not given back");
        drop(tx);
        shown.await.unwrap();
    }

    /// Found by a walk through `holdfast ssh`: the title's first words in an outage were
    /// "still reconnecting (attempt 4, …)", and a "link lost" came 14 s after the attempts
    /// began. The outage's first event is what is shown; the old link given up is not news.
    #[tokio::test(start_paused = true)]
    async fn an_outage_is_shown_by_what_started_it_and_then_its_attempts() {
        let (tx, written, shown, _gone) = titles();
        tx.send(LinkEvent::NetworkChanged).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        tx.send(LinkEvent::Reconnecting { attempt: 4, elapsed: Duration::from_millis(600) }).unwrap();
        tokio::time::sleep(SHOW_AFTER).await;
        let text = written.lock().unwrap().clone();
        assert!(text.contains("the network changed") && !text.contains("still reconnecting"), "{text:?}");
        tx.send(LinkEvent::Lost(LinkLost { cause: "peer silent for 15.0s".into(), faults: 1 })).unwrap();
        tx.send(LinkEvent::Reconnecting { attempt: 8, elapsed: Duration::from_secs(2) }).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let text = written.lock().unwrap().clone();
        assert!(text.contains("still reconnecting (attempt 8") && !text.contains("link lost"), "{text:?}");
        drop(tx);
        shown.await.unwrap();
    }

    #[test]
    fn status_lines_are_short_and_rounded() {
        let lost = LinkEvent::Lost(LinkLost { cause: "link failed: reset".into(), faults: 1 });
        assert_eq!(describe(&lost).unwrap(), "link lost (link failed: reset); reconnecting…");
        let back = LinkEvent::Resumed {
            peer: "127.0.0.1:1".parse().unwrap(),
            after: Duration::from_nanos(812_345_678),
            replayed_sent: 0,
            replayed_received: 0,
        };
        assert_eq!(describe(&back).unwrap(), "link back; resumed after 812ms");
        let quiet = LinkEvent::Reconnecting { attempt: 3, elapsed: Duration::from_secs(1) };
        assert_eq!(describe(&quiet), None);
        let loud = LinkEvent::Reconnecting { attempt: 8, elapsed: Duration::from_secs(14) };
        assert_eq!(describe(&loud).unwrap(), "still reconnecting (attempt 8, 14.0s so far)");
    }

    // Errno 103 is Linux's ECONNABORTED.
    #[cfg(target_os = "linux")]
    #[test]
    fn status_lines_say_system_errors_in_words() {
        let raw = std::io::Error::from_raw_os_error(103);
        let lost = LinkEvent::Lost(LinkLost { cause: format!("link failed: {raw}"), faults: 1 });
        let line = describe(&lost).unwrap();
        assert_eq!(line, "link lost (link failed: the connection was aborted); reconnecting…");
        assert!(!line.contains("os error"), "{line}");
    }

    #[test]
    fn peer_text_in_status_lines_is_escaped() {
        let lost = LinkEvent::Lost(LinkLost { cause: "peer said: x\r\n\u{1b}[2Jfake".into(), faults: 1 });
        assert_eq!(describe(&lost).unwrap(), "link lost (peer said: x\\r\\n\\u{1b}[2Jfake); reconnecting…");
        let failed = LinkEvent::Failed { reason: "session lost".into() };
        assert_eq!(describe(&failed), None, "a failure is said once, by connect's exit error");
    }
}
