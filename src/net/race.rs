//! Resuming in the background: the client's connection attempts, started on a short staggered
//! schedule while the old link (if any) keeps running, until one resumes the session.
//!
//! A race starts when the link is lost, or earlier, when it is *suspect* (silent for much longer
//! than its round trip, a network change, a wake from sleep). Attempts do not wait on the
//! kernel: a new one starts every `RecoveryPolicy::stagger` (250 ms, jittered) while earlier ones
//! are still pending, so the first SYN sent after the path works again gets through, instead of
//! a SYN retransmission a second or more later. At most [`MAX_PENDING`] attempts are pending; the
//! oldest is abandoned for a new one. A BUSY answer, and refused connections (nothing listening,
//! or a middlebox resetting) after the first [`REFUSED_GRACE`], grow the delay instead, from
//! `backoff_initial` doubling to `backoff_max`, with jitter, so that many clients returning after
//! a server outage spread out. Silent closes and unknown REJECT codes (a server shedding load)
//! are treated as refusals.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

use crate::net::client::dial;
use crate::net::config::ClientConfig;
use crate::net::events::LinkEvent;
use crate::net::stream::Shared;
use crate::net::watch;
use crate::net::Error;
use crate::proto::frame::RESUME_ID_LEN;
use crate::proto::handshake::ClientDone;
use crate::proto::{HandshakeError, SessionError};

/// Most attempts pending at once.
pub(crate) const MAX_PENDING: usize = 8;
/// How long refused connections are retried on the short schedule: a few seconds of resets (a
/// middlebox, a server restarting) cost no more than the stagger; a longer outage backs off.
pub(crate) const REFUSED_GRACE: Duration = Duration::from_secs(5);

/// The longest stagger a long outage grows to.
pub(crate) const MAX_STAGGER: Duration = Duration::from_secs(5);

/// The stagger of a race that has gone on for `outage`: the policy's at first; past 25 s (at
/// the default) a hundredth of the outage, up to [`MAX_STAGGER`]. Found by a walk: a laptop left
/// behind a firewall that drops its packets started four attempts a second for as long as its
/// give-up time (a day: 350,000 SYNs); now one every 5 s after eight minutes. A network change
/// or a wake still starts an attempt at once, and a path that comes back silently is found
/// within the stagger (0.6 s after a minute).
fn stagger_after(base: Duration, outage: Duration) -> Duration {
    base.max((outage / 100).min(MAX_STAGGER))
}

/// A resumed connection, handshake done, not yet attached.
pub(crate) struct Won {
    pub(crate) sock: TcpStream,
    pub(crate) done: ClientDone,
    pub(crate) peer: SocketAddr,
    /// The client's received position that the hello carried.
    pub(crate) received: u64,
    /// When the race started.
    pub(crate) started: Instant,
    /// The race started on suspicion, with the old link still attached.
    pub(crate) suspicion: bool,
}

/// One attempt's result, with the received position its hello carried and the id of the
/// ticket it resumed with.
type Attempt = (Result<(TcpStream, ClientDone, SocketAddr), Error>, u64, [u8; RESUME_ID_LEN]);

/// What a race ends with.
pub(crate) type Outcome = Result<Won, SessionError>;

/// A running race: `cancel` stops it from starting new attempts (the old link answered again).
pub(crate) struct Race {
    cancel: Arc<AtomicBool>,
}

impl Race {
    /// Starts a race that sends its outcome on `tx`. `since` is when the link was lost or became
    /// suspect: the give-up time counts from there.
    pub(crate) fn start(
        shared: Arc<Shared>,
        cfg: ClientConfig,
        addr: String,
        tx: mpsc::Sender<Outcome>,
        since: Instant,
        suspicion: bool,
    ) -> Race {
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Some(outcome) = run(&shared, &cfg, &addr, &c, since, suspicion).await {
                let _ = tx.send(outcome).await;
            }
        });
        Race { cancel }
    }

    /// Starts no more attempts; one already past its TCP connect may still win.
    pub(crate) fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// True once [`Race::cancel`] was called.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// How one attempt ended, for the schedule.
enum Failed {
    /// The session is lost (REJECT 1).
    Lost,
    /// The server no longer allows this key (REJECT 4).
    NotAllowed,
    /// The server answered BUSY: back off.
    Busy,
    /// Nothing listening (or a middlebox resetting): keep the short schedule for a few
    /// seconds, then back off.
    Refused,
    /// The server closed the connection without answering (how it sheds load, and what it does
    /// to a hello it cannot place) or answered with a code this version does not know, or one
    /// that a resume should never get (REJECT 3 or 5): keep the short schedule for a few
    /// seconds, then back off.
    Answered,
    /// Anything else (no answer in time, a reset on the path): keep the short schedule.
    Other,
}

fn classify(e: &Error) -> Failed {
    match e {
        Error::Handshake { source: HandshakeError::UnknownSession, .. } => Failed::Lost,
        Error::Handshake { source: HandshakeError::NoLongerAllowed, .. } => Failed::NotAllowed,
        Error::Busy { .. } => Failed::Busy,
        Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => Failed::Refused,
        // REJECT 3 and 5 to a resume come from no server that answered this session's first
        // connection (docs/PROTOCOL.md section 8): like an unknown code.
        Error::HandshakeRefused { .. }
        | Error::Handshake {
            source: HandshakeError::Rejected(_) | HandshakeError::Stale | HandshakeError::OtherVersion,
            ..
        } => Failed::Answered,
        _ => Failed::Other,
    }
}

/// True if the session resumes with another ticket than `used` now: an attempt made with
/// `used` was superseded by a resume.
fn superseded(shared: &Shared, used: &[u8; RESUME_ID_LEN]) -> bool {
    shared.lock().session.ticket().is_some_and(|t| &t.resume_id != used)
}

pub(crate) fn jittered(d: Duration, jitter: f64) -> Duration {
    let cut = rand::thread_rng().gen_range(0.0..=jitter.clamp(0.0, 1.0));
    d.mul_f64(1.0 - cut)
}

/// The race itself. `None` if it was cancelled before any attempt succeeded.
async fn run(
    shared: &Shared,
    cfg: &ClientConfig,
    addr: &str,
    cancel: &AtomicBool,
    since: Instant,
    suspicion: bool,
) -> Option<Outcome> {
    let policy = &cfg.recovery;
    let started = Instant::now();
    let mut pending: JoinSet<Attempt> = JoinSet::new();
    let mut order: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    let mut next = Instant::now();
    let mut backoff = policy.backoff_initial;
    let mut attempt = 0u32;
    let mut finished = 0u32;
    let mut signals = watch::signals();
    let mut signals_ok = true;
    // Since when every attempt that was answered at all was refused (nothing listening).
    let mut refused_since: Option<Instant> = None;
    loop {
        // Suspend counts: a laptop that slept past the give-up time gives up on waking, but
        // only after one attempt had its chance, so that it can learn the true answer (its
        // session may be gone from the server: "session lost" says more than "gave up").
        let elapsed = watch::boot_elapsed(since);
        let tried = finished > 0 || started.elapsed() >= policy.handshake_timeout;
        if elapsed >= policy.give_up_after && tried {
            return Some(Err(SessionError::GaveUp(elapsed)));
        }
        let stopped = cancel.load(Ordering::Relaxed);
        if stopped && pending.is_empty() {
            return None;
        }
        let left = policy.give_up_after.saturating_sub(elapsed).max(if tried {
            Duration::ZERO
        } else {
            policy.handshake_timeout
        });
        tokio::select! {
            () = tokio::time::sleep_until(next.into()), if !stopped => {
                let (ticket, number, offsets) = {
                    let mut inner = shared.lock();
                    let Some(t) = inner.session.ticket().cloned() else { return Some(Err(SessionError::Lost)) };
                    let number = inner.session.next_resume_attempt();
                    (t, number, (inner.session.received_offset(), inner.session.written_offset()))
                };
                attempt += 1;
                shared.emit(LinkEvent::Reconnecting { attempt, elapsed: watch::boot_elapsed(since) });
                if order.len() >= MAX_PENDING {
                    if let Some(oldest) = order.pop_front() {
                        oldest.abort();
                    }
                }
                let (cfg, addr) = (cfg.clone(), addr.to_string());
                let (received, used) = (offsets.0, ticket.resume_id);
                let h = pending.spawn(async move {
                    let limit = cfg.recovery.handshake_timeout.min(left);
                    let r = match tokio::time::timeout(limit, dial(&addr, &cfg, Some((&ticket, number, offsets)))).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::Timeout { addr: addr.clone(), after: limit }),
                    };
                    (r, received, used)
                });
                order.push_back(h);
                order.retain(|h| !h.is_finished());
                next = Instant::now() + jittered(stagger_after(policy.stagger, started.elapsed()), 0.2);
            }
            Some(done) = pending.join_next(), if !pending.is_empty() => {
                finished += 1;
                let Ok((r, received, used)) = done else { continue };
                // Something answers at the address (BUSY, a close, a REJECT): not a server
                // that is gone.
                if let Err(e) = &r {
                    if matches!(classify(e), Failed::Busy | Failed::Answered | Failed::Lost) {
                        refused_since = None;
                    }
                }
                match r {
                    Ok((sock, done, peer)) => {
                        pending.abort_all();
                        return Some(Ok(Won { sock, done, peer, received, started, suspicion }));
                    }
                    Err(e) => match classify(&e) {
                        Failed::Refused if policy.refused_ends_after.is_some_and(|d| {
                            refused_since.get_or_insert_with(Instant::now).elapsed() >= d
                        }) => {
                            debug!(error = %e, "reconnect attempts refused for too long: the server is gone");
                            pending.abort_all();
                            return Some(Err(SessionError::ServerGone(refused_since.map_or(Duration::ZERO, |t| t.elapsed()))));
                        }
                        // The server retires a ticket once the client has the next one, which
                        // it gets on a link that resumed: an attempt that resumed with an older
                        // ticket than the session's was superseded, and its refusal says nothing
                        // about the session (an attempt of an earlier race, whose SYN got
                        // through late, was refused after another had resumed, and the client
                        // took that for a lost session).
                        Failed::Lost if superseded(shared, &used) => {
                            debug!("a superseded reconnect attempt was refused");
                        }
                        Failed::Lost => return Some(Err(SessionError::Lost)),
                        Failed::NotAllowed => return Some(Err(SessionError::NotAllowed)),
                        Failed::Refused | Failed::Answered if started.elapsed() < REFUSED_GRACE => {
                            debug!(error = %e, "reconnect attempt refused");
                        }
                        // Past the grace, a refusal, a silent close (how a server sheds load,
                        // docs/PROTOCOL.md 9.2) or an unknown answer backs off like BUSY.
                        Failed::Busy | Failed::Refused | Failed::Answered => {
                            debug!(error = %e, "reconnect attempt refused; backing off");
                            next = next.max(Instant::now() + jittered(backoff, policy.jitter));
                            backoff = (backoff * 2).min(policy.backoff_max);
                        }
                        Failed::Other => debug!(error = %e, "reconnect attempt failed"),
                    },
                }
            }
            () = tokio::time::sleep(left) => {}
            // The network changed or the machine woke: the path may work now, try at once.
            r = signals.changed(), if signals_ok => match r {
                Ok(()) => {
                    next = Instant::now();
                    backoff = policy.backoff_initial;
                }
                Err(_) => signals_ok = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::proto::handshake::{reject, respond, ClientHandshake, RejectCode, Ticket};
    use crate::proto::{Cipher, Role, Session, SessionConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Attempts come every 250 ms for the first 25 s of an outage, then less often, never
    /// less than every 5 s.
    #[test]
    fn a_long_outage_staggers_its_attempts_further_apart() {
        let base = Duration::from_millis(250);
        let after = |s: u64| stagger_after(base, Duration::from_secs(s));
        assert_eq!((after(0), after(20)), (base, base));
        assert_eq!(after(60), Duration::from_millis(600));
        assert_eq!((after(500), after(86_400)), (MAX_STAGGER, MAX_STAGGER));
    }

    fn ticket(id: u8) -> Ticket {
        Ticket { resume_id: [id; RESUME_ID_LEN], secret: zeroize::Zeroizing::new([id; 32]) }
    }

    /// A client's session, attached once and holding ticket 1: its keys (client, server) and
    /// its shared state.
    fn attached() -> (Keypair, Keypair, Arc<Shared>) {
        let (c, s) = (Keypair::generate(), Keypair::generate());
        let (hs, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        let acc = respond(&hello, &s.private, |_| true, |_| None).unwrap();
        let mut session = Session::new(Role::Client, SessionConfig::default());
        session.attach(Instant::now(), hs.read_reply(&acc.reply).unwrap().transport, 0, None, None).unwrap();
        session.adopt_ticket(ticket(1));
        let shared = Shared::new(session, s.public, 1);
        (c, s, shared)
    }

    /// Found by a newcomer's run of the chat example through 8 s of silence: two races were
    /// running (the first cancelled when the old link answered again, its attempts still
    /// pending); one resumed, and the other's attempt, refused because it resumed with the
    /// ticket the server had since retired, ended the session as lost. Here a server answers
    /// every resume hello "unknown session"; while it reads the first, the session moves on to a
    /// new ticket (as a resume elsewhere gives it). That refusal is passed over; the next
    /// attempt, made with the session's ticket, is the true answer.
    #[tokio::test]
    async fn a_refusal_of_an_attempt_with_a_superseded_ticket_does_not_lose_the_session() {
        let (c, s, shared) = attached();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = {
            let (shared, seen) = (shared.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let (mut sock, _) = listener.accept().await.unwrap();
                    let mut hello = [0u8; 2048];
                    let _ = sock.read(&mut hello).await;
                    {
                        let mut inner = shared.lock();
                        let mut seen = seen.lock().unwrap();
                        seen.push(inner.session.ticket().unwrap().resume_id[0]);
                        if seen.len() == 1 {
                            inner.session.adopt_ticket(ticket(2));
                        }
                    }
                    let body = reject(RejectCode::UnknownSession);
                    let mut record = (body.len() as u16).to_be_bytes().to_vec();
                    record.extend_from_slice(&body);
                    let _ = sock.write_all(&record).await;
                    let _ = sock.shutdown().await;
                }
            })
        };
        let mut cfg = ClientConfig::new(c, s.public);
        cfg.recovery.stagger = Duration::from_millis(20);
        cfg.recovery.give_up_after = Duration::from_secs(60);
        let cancel = AtomicBool::new(false);
        let outcome =
            tokio::time::timeout(Duration::from_secs(30), run(&shared, &cfg, &addr, &cancel, Instant::now(), false))
                .await
                .expect("the race never ended");
        server.abort();
        assert!(matches!(outcome, Some(Err(SessionError::Lost))), "the race did not end lost");
        // The server saw the ticket in force when each attempt reached it: the race went on past
        // the first refusal (attempts started before the new ticket are passed over too, so a
        // busy machine may see more than two).
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.first(), Some(&1), "{seen:?}");
        assert!(seen.len() >= 2, "the session was lost on the refusal of a superseded attempt: {seen:?}");
    }

    /// Found by a walk through faults: `holdfast ssh`'s client, whose server had exited (its
    /// session expired, or it was killed), went on reconnecting until its give-up time (24 h)
    /// with a frozen terminal. With `refused_ends_after`, refusals for that long end the race
    /// as `ServerGone`; without it (the default) they go on.
    #[tokio::test]
    async fn refusals_for_long_enough_end_the_race_where_the_policy_says_so() {
        let (c, s, shared) = attached();
        // A port nothing listens on: every connection is refused.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut cfg = ClientConfig::new(c, s.public);
        cfg.recovery.stagger = Duration::from_millis(20);
        cfg.recovery.give_up_after = Duration::from_secs(3);
        cfg.recovery.refused_ends_after = Some(Duration::from_millis(200));
        let cancel = AtomicBool::new(false);
        let outcome = run(&shared, &cfg, &addr, &cancel, Instant::now(), false).await;
        assert!(matches!(outcome, Some(Err(SessionError::ServerGone(_)))), "{:?}", outcome.map(|o| o.err()));
        cfg.recovery.refused_ends_after = None;
        let outcome = run(&shared, &cfg, &addr, &cancel, Instant::now(), false).await;
        assert!(matches!(outcome, Some(Err(SessionError::GaveUp(_)))), "{:?}", outcome.map(|o| o.err()));
    }

    /// Every answer that is not BUSY, 1 or 4 backs off like a refusal after the grace: a server
    /// answering 3 or 5 to resumes is not asked four times a second until the give-up time.
    #[test]
    fn answers_a_resume_should_not_get_back_off_like_refusals() {
        let hs = |source| Error::Handshake { addr: "x".into(), source };
        for e in [HandshakeError::Stale, HandshakeError::OtherVersion, HandshakeError::Rejected(9)] {
            assert!(matches!(classify(&hs(e.clone())), Failed::Answered), "{e:?}");
        }
        assert!(matches!(classify(&hs(HandshakeError::UnknownSession)), Failed::Lost));
        assert!(matches!(classify(&hs(HandshakeError::NoLongerAllowed)), Failed::NotAllowed));
    }
}
