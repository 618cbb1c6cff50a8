//! The suspicion rule, driven by a virtual clock on two in-memory sessions (no sockets, no
//! real time): when a link is suspect, how often it can be, and that a race on a link that was
//! fine after all changes nothing in the streams.

use std::time::{Duration, Instant};

use holdfast::keys::Keypair;
use holdfast::proto::frame::split_record;
use holdfast::proto::handshake::{respond, ClientHandshake, ResumeLookup};
use holdfast::proto::rtt::MIN_SUSPECT;
use holdfast::proto::{Cipher, Event, Role, Session, SessionConfig, Ticket, Transport};

const MS: Duration = Duration::from_millis(1);

struct Pair {
    c: Session,
    s: Session,
    ck: Keypair,
    sk: Keypair,
    now: Instant,
    attempts: u64,
}

fn transports(ck: &Keypair, sk: &Keypair) -> (Transport, Transport) {
    let (hs, hello) = ClientHandshake::initial(&ck.private, &sk.public, Cipher::ChaChaPoly, 1).unwrap();
    let acc = respond(&hello, &sk.private, |_| true, |_| None).unwrap();
    (hs.read_reply(&acc.reply).unwrap().transport, acc.transport)
}

impl Pair {
    fn new() -> Pair {
        let (ck, sk) = (Keypair::generate(), Keypair::generate());
        let now = Instant::now();
        let (ct, st) = transports(&ck, &sk);
        let mut c = Session::new(Role::Client, SessionConfig::default());
        let mut s = Session::new(Role::Server, SessionConfig::default());
        c.attach(now, ct, 0, None, None).unwrap();
        s.attach(now, st, 0, None, Some(Ticket::generate())).unwrap();
        let mut p = Pair { c, s, ck, sk, now, attempts: 0 };
        p.exchange(MS);
        p
    }

    /// Moves records both ways until quiet, each hop taking `delay` of virtual time.
    fn exchange(&mut self, delay: Duration) {
        for _ in 0..64 {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            self.c.poll_transmit(self.now, &mut a, usize::MAX).unwrap();
            self.s.poll_transmit(self.now, &mut b, usize::MAX).unwrap();
            if a.is_empty() && b.is_empty() {
                return;
            }
            self.now += delay;
            feed(&mut self.s, self.now, &a);
            feed(&mut self.c, self.now, &b);
            self.tick();
        }
    }

    /// Runs both sessions' timers up to now.
    fn tick(&mut self) {
        let _ = self.c.handle_timeout(self.now);
        let _ = self.s.handle_timeout(self.now);
    }

    /// The client's events so far, other than tickets.
    fn client_events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.c.poll_event())
            .filter(|e| matches!(e, Event::Suspect(_) | Event::PathSuspect | Event::Healthy))
            .collect()
    }

    /// The client's records go nowhere from now on (a dead path); returns when the client
    /// reports the link suspect, or `None` within `limit`.
    fn silence_until_suspect(&mut self, limit: Duration) -> Option<Duration> {
        let start = self.now;
        while self.now - start < limit {
            let mut lost = Vec::new();
            self.c.poll_transmit(self.now, &mut lost, usize::MAX).unwrap();
            self.now += MS;
            let _ = self.c.handle_timeout(self.now);
            if self.client_events().iter().any(|e| matches!(e, Event::Suspect(_))) {
                return Some(self.now - start);
            }
        }
        None
    }
}

fn feed(s: &mut Session, now: Instant, mut wire: &[u8]) {
    while let Some((body, used)) = split_record(wire) {
        s.handle_record(now, body).expect("record");
        wire = &wire[used..];
    }
}

#[test]
fn unanswered_data_makes_the_link_suspect_after_four_round_trips_or_250_ms() {
    // A fast link (1 ms each way): the floor applies.
    let mut p = Pair::new();
    p.c.write(&[7u8; 1000]).unwrap();
    let t = p.silence_until_suspect(Duration::from_secs(5)).expect("never suspect");
    assert!(t >= MIN_SUSPECT && t <= MIN_SUSPECT + 2 * MS, "suspect after {t:?}");

    // A 100 ms path (200 ms round trip): four round trips.
    let mut p = Pair::new();
    for _ in 0..20 {
        p.c.write(&[1u8; 100]).unwrap();
        p.exchange(100 * MS);
    }
    let rtt = p.c.rtt().expect("measured");
    assert!(rtt >= 190 * MS && rtt <= 260 * MS, "rtt {rtt:?}");
    p.c.write(&[7u8; 1000]).unwrap();
    let t = p.silence_until_suspect(Duration::from_secs(5)).expect("never suspect");
    assert!(t >= rtt * 4 - 2 * MS && t <= rtt * 4 + 2 * MS, "suspect after {t:?} with rtt {rtt:?}");
    // Reported once, until the link is heard from again.
    assert_eq!(p.silence_until_suspect(Duration::from_secs(2)), None);
}

/// A download whose last record before the silence was an ACK (the peer acknowledging what we
/// sent: keystrokes, in an ssh session) is watched like one whose last record was DATA. Found by
/// a walk through `holdfast ssh`: a dead link froze the screen for 5.25 s, the next keepalive.
#[test]
fn a_dead_download_is_suspected_soon_when_its_last_record_was_an_ack() {
    let mut p = Pair::new();
    for _ in 0..10 {
        p.s.write(&[3u8; 4000]).unwrap();
        p.c.write(&[1u8; 10]).unwrap();
        p.exchange(MS);
    }
    // The server's ACK of the client's last bytes comes after its ack delay, after its DATA.
    p.now += 20 * MS;
    p.tick();
    p.exchange(MS);
    assert!(p.client_events().is_empty(), "a live session was suspected");
    let t = p.silence_until_suspect(Duration::from_secs(5)).expect("a dead download was not suspected within 5 s");
    assert!(t <= MIN_SUSPECT * 3 / 2 + 2 * MS, "suspect after {t:?}");
}

/// A network change makes the link suspect at once, and says so: not as a silence (the link
/// may have been quiet for a millisecond), once until the link is heard from again.
#[test]
fn a_network_change_is_reported_as_such_once_until_the_link_answers() {
    let mut p = Pair::new();
    p.now += 3 * MS;
    p.c.path_changed(p.now);
    assert_eq!(p.client_events(), vec![Event::PathSuspect]);
    p.c.path_changed(p.now + MS);
    assert!(p.client_events().is_empty(), "reported twice");
    // The link still works: the next answer (the ACK, after the server's ack delay) makes it
    // healthy again.
    p.c.write(&[5u8; 100]).unwrap();
    p.exchange(MS);
    p.now += 20 * MS;
    p.tick();
    p.exchange(MS);
    assert_eq!(p.client_events(), vec![Event::Healthy]);
}

#[test]
fn a_quiet_download_is_probed_and_a_live_one_is_never_suspect() {
    let mut p = Pair::new();
    // The server streams to the client, which sends nothing but ACKs.
    for _ in 0..10 {
        p.s.write(&[3u8; 4000]).unwrap();
        p.exchange(MS);
    }
    assert!(p.client_events().is_empty(), "a live download was suspected");
    // The path dies: the client probes with a PING and then suspects the link.
    let t = p.silence_until_suspect(Duration::from_secs(5)).expect("a dead download was never suspected");
    assert!(t <= MIN_SUSPECT * 3 / 2 + 2 * MS, "suspect after {t:?}");
}

#[test]
fn races_double_the_threshold_up_to_the_dead_peer_time_until_the_stream_moves() {
    let mut p = Pair::new();
    let base = p.c.suspect_threshold();
    for k in 1..=10u32 {
        p.c.count_race(p.now);
        let want = (base * 2u32.pow(k)).min(SessionConfig::default().dead_after);
        assert_eq!(p.c.suspect_threshold(), want, "after {k} races");
    }
    // Without progress, nothing is forgotten; the stream moving again forgets the races.
    p.now += Duration::from_secs(60);
    let _ = p.c.handle_timeout(p.now);
    assert_eq!(p.c.suspect_threshold(), SessionConfig::default().dead_after);
    p.c.write(&[1u8; 10]).unwrap();
    p.exchange(MS);
    p.now += 20 * MS;
    p.exchange(MS);
    let rtt = p.c.rtt().unwrap_or_default();
    assert_eq!(p.c.suspect_threshold(), (rtt * 4).max(MIN_SUSPECT), "races were not forgotten");
}

#[test]
fn an_idle_link_with_a_silent_peer_is_suspect_after_a_keepalive_and_dead_at_the_dead_peer_time() {
    let mut p = Pair::new();
    let cfg = SessionConfig::default();
    let t = p.silence_until_suspect(Duration::from_secs(20)).expect("never suspect");
    assert!(t >= cfg.keepalive && t <= cfg.keepalive + MIN_SUSPECT + 2 * MS, "suspect after {t:?}");
    let start = p.now - t;
    let mut dead = None;
    while p.now - start < Duration::from_secs(20) {
        p.now += MS;
        if p.c.handle_timeout(p.now).is_err() {
            dead = Some(p.now - start);
            break;
        }
    }
    let dead = dead.expect("never dead");
    assert!(
        dead >= cfg.dead_after - 2 * MS && dead <= cfg.dead_after + 2 * MS,
        "dead after {dead:?}: the dead-peer time changed"
    );
}

#[test]
fn a_spurious_race_changes_nothing() {
    let mut p = Pair::new();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let back: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    p.c.write(&data[..150_000]).unwrap();
    p.s.write(&back[..100_000]).unwrap();
    p.exchange(MS);
    // The client suspects the link (it was only slow) and resumes on a second connection while
    // the first still delivers: the hello's offsets are older than what arrives meanwhile.
    let ticket = p.c.ticket().unwrap().clone();
    p.attempts += 1;
    let offsets = (p.c.received_offset(), p.c.written_offset());
    p.c.write(&data[150_000..]).unwrap();
    p.s.write(&back[100_000..]).unwrap();
    p.exchange(MS);
    let (hs, hello) =
        ClientHandshake::resume(&p.ck.private, &p.sk.public, &ticket, p.attempts, offsets, Cipher::AesGcm).unwrap();
    let (sr, sw) = (p.s.received_offset(), p.s.written_offset());
    let lookup = |_: &[u8; 16]| {
        Some(ResumeLookup { client: p.ck.public, psk: ticket.secret.clone(), received: sr, written: sw })
    };
    let acc = respond(&hello, &p.sk.private, |_| true, lookup).unwrap();
    let done = hs.read_reply(&acc.reply).unwrap();
    p.c.detach();
    let a = p.c.attach(p.now, done.transport, done.server_received.unwrap(), None, None).unwrap();
    assert_eq!(a.replayed, 0, "the client replays nothing: the server had everything");
    p.c.count_race(p.now);
    p.s.detach();
    let s = p.s.attach(p.now, acc.transport, offsets.0, Some(ticket.resume_id), Some(Ticket::generate())).unwrap();
    // The hello's offset predates what the old link delivered, but the client acknowledged it
    // since: the server takes the ACK and replays nothing either.
    assert_eq!(s.replayed, 0, "the server replays what was already acknowledged");
    p.exchange(MS);
    // The duplicates the server resent were trimmed: each stream arrived exactly once.
    let mut got_s = vec![0u8; data.len() + 10];
    let mut got_c = vec![0u8; back.len() + 10];
    let n_s = read_all(&mut p.s, &mut got_s);
    let n_c = read_all(&mut p.c, &mut got_c);
    assert_eq!(&got_s[..n_s], &data[..]);
    assert_eq!(&got_c[..n_c], &back[..]);
    assert_eq!(p.c.unacked(), 0);
    assert_eq!(p.s.unacked(), 0);
}

fn read_all(s: &mut Session, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while let Ok(Some(k)) = s.read(&mut buf[n..]) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

/// The round trip shown (status, metrics) is the path's, not the peer's ack delay: a small
/// write is acknowledged up to 10 ms late (the ack delay), and a 2 ms path must not show as
/// 12 ms. A PING follows the first acknowledged DATA, and its PONG is the sample shown.
#[test]
fn the_round_trip_shown_is_not_the_peers_ack_delay() {
    let mut p = Pair::new();
    assert_eq!(p.c.rtt(), None, "nothing measured yet");
    p.c.write(b"ls\n").unwrap();
    for _ in 0..40 {
        p.exchange(MS);
        p.now += MS;
        p.tick();
    }
    let rtt = p.c.rtt().expect("measured");
    assert!(rtt >= 2 * MS && rtt <= 3 * MS, "a 2 ms round trip shown as {rtt:?}");
    // The suspicion rule keeps its longer estimate (safe: it only waits longer).
    let t = {
        p.c.write(&[7u8; 1000]).unwrap();
        p.silence_until_suspect(Duration::from_secs(5)).expect("never suspect")
    };
    assert!(t >= MIN_SUSPECT, "suspect after {t:?}");
}
