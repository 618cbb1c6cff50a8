//! The chat example (`examples/chat/`) under forced faults: a room and three members, each
//! member behind its own chaos proxy. Real connections are reset mid-conversation, while lines
//! are being typed, while a link is refused for several reconnect attempts, and while one is
//! silently stalled; every line must arrive exactly once, in order, at every other member.

mod common;

#[path = "../examples/chat/client.rs"]
mod client;
#[path = "../examples/chat/line.rs"]
mod line;
#[path = "../examples/chat/room.rs"]
mod room;
#[path = "../examples/chat/setup.rs"]
mod setup;

use std::collections::HashMap;
use std::time::Duration;

use client::{ClientError, Input};
use common::chaos::ChaosProxy;
use common::harness::fast_session;
use holdfast::keys::{AllowList, Keypair, PublicKey};
use holdfast::{ClientConfig, ServerConfig};
use line::Show;
use room::RoomOpts;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(30);
/// Bound for one wait inside a test (the whole test is bounded by `LIMIT`).
const WAIT: Duration = Duration::from_secs(20);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test exceeded its time bound")
}

/// A room on loopback with fast session timers, and a way to close it.
struct Room {
    addr: std::net::SocketAddr,
    key: PublicKey,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start_room(members: &[(&str, &Keypair)]) -> Room {
    start_room_allowing(AllowList::from_keys(members.iter().map(|(n, k)| (k.public, Some(n.to_string()))))).await
}

async fn start_room_allowing(allow: AllowList) -> Room {
    let server = Keypair::generate();
    let key = server.public;
    let mut cfg = ServerConfig::new(server, allow);
    cfg.session = fast_session();
    let listener = holdfast::bind("127.0.0.1:0", cfg).await.expect("bind");
    let addr = listener.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let (out, mut shown) = mpsc::unbounded_channel();
    tokio::spawn(async move { while shown.recv().await.is_some() {} });
    let task = tokio::spawn(room::run_room(listener, RoomOpts::default(), out, async {
        let _ = stopped.await;
    }));
    Room { addr, key, stop: Some(stop), task }
}

/// One member: its proxy, its keyboard, and everything it showed.
struct Client {
    name: String,
    proxy: ChaosProxy,
    keys: mpsc::Sender<Input>,
    shown: mpsc::UnboundedReceiver<Show>,
    text: Vec<String>,
    status: Vec<String>,
    task: JoinHandle<Result<(), ClientError>>,
}

fn client_config(keys: &Keypair, room: PublicKey, give_up: Duration) -> ClientConfig {
    let mut cfg = ClientConfig::new(Keypair::from_private(keys.private.clone()), room);
    cfg.session = fast_session();
    cfg.recovery.backoff_initial = Duration::from_millis(10);
    cfg.recovery.backoff_max = Duration::from_millis(100);
    cfg.recovery.give_up_after = give_up;
    cfg
}

async fn join_via(target: std::net::SocketAddr, name: &str, cfg: ClientConfig) -> Client {
    let proxy = ChaosProxy::start(target).await.expect("proxy");
    let stream = holdfast::connect(proxy.addr().to_string(), cfg).await.expect("connect");
    let (keys, typed) = mpsc::channel(1024);
    let (out, shown) = mpsc::unbounded_channel();
    let who = name.to_string();
    let task = tokio::spawn(async move { client::run_client(stream, &who, typed, out).await });
    Client { name: name.to_string(), proxy, keys, shown, text: vec![], status: vec![], task }
}

impl Client {
    fn take(&mut self, show: Show) {
        match show {
            Show::Text(t) => self.text.push(t),
            Show::Status(s) => self.status.push(s),
        }
    }

    /// Waits until a shown chat line satisfies `pred` (lines already shown count).
    async fn wait_text(&mut self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let name = self.name.clone();
        let done = tokio::time::timeout(WAIT, async {
            while !pred(&self.text) {
                let show = self.shown.recv().await.expect("client output ended");
                self.take(show);
            }
        })
        .await;
        assert!(done.is_ok(), "{name} never showed {what}; text: {:?}\nstatus: {:?}", self.text, self.status);
    }

    /// Waits until a status line containing `needle` is shown after the first `from` ones.
    async fn wait_status(&mut self, from: usize, needle: &str) -> usize {
        let name = self.name.clone();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(i) = self.status.iter().skip(from).position(|s| s.contains(needle)) {
                    return from + i;
                }
                let show = self.shown.recv().await.expect("client output ended");
                self.take(show);
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{name} never showed status {needle:?}; status: {:?}", self.status))
    }

    async fn say(&self, line: String) {
        self.keys.send(Input::Line(line)).await.expect("client stopped");
    }

    /// Quits, waits for the client to end, and collects everything it showed.
    async fn quit(self) -> (Result<(), ClientError>, Vec<String>, Vec<String>) {
        self.keys.send(Input::Quit).await.expect("client stopped");
        self.finish().await
    }

    /// Waits for the client to end and collects everything it showed.
    async fn finish(mut self) -> (Result<(), ClientError>, Vec<String>, Vec<String>) {
        let result = (&mut self.task).await.expect("client task panicked");
        while let Ok(show) = self.shown.try_recv() {
            self.take(show);
        }
        (result, self.text, self.status)
    }
}

/// Lines `name` said, in the order this client showed them.
fn said_by(text: &[String], name: &str) -> Vec<String> {
    let prefix = format!("{name}: ");
    text.iter().filter_map(|l| l.strip_prefix(&prefix).map(str::to_string)).collect()
}

/// Asserts `got == want` with a short message: counts and the first difference.
fn assert_exactly_once(got: &[String], want: &[String], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} lines, want {}; first difference at line {at}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(at),
            want.get(at)
        );
    }
}

fn count_from(text: &[String], name: &str) -> usize {
    said_by(text, name).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_line_arrives_once_in_order_through_faults() {
    bounded(async {
        let keys: Vec<(&str, Keypair)> =
            ["alice", "bob", "carol"].into_iter().map(|n| (n, Keypair::generate())).collect();
        let listed: Vec<(&str, &Keypair)> = keys.iter().map(|(n, k)| (*n, k)).collect();
        let mut room = start_room(&listed).await;
        let cfg = |i: usize| client_config(&keys[i].1, room.key, Duration::from_secs(3600));

        let mut alice = join_via(room.addr, "alice", cfg(0)).await;
        alice.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, alice"))).await;
        let mut bob = join_via(room.addr, "bob", cfg(1)).await;
        bob.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, bob. Here: alice."))).await;
        let mut carol = join_via(room.addr, "carol", cfg(2)).await;
        carol.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, carol. Here: alice, bob."))).await;
        alice.wait_text("carol joining", |t| t.iter().any(|l| l == "* carol joined")).await;
        bob.wait_text("carol joining", |t| t.iter().any(|l| l == "* carol joined")).await;

        let a = |i: usize| format!("a{i:03} from alice, with some text to make the line longer");
        let b = |i: usize| format!("b{i:03} from bob");

        // 1. A conversation; alice's and bob's real connections are reset in the middle of it.
        for i in 0..40 {
            alice.say(a(i)).await;
            bob.say(b(i)).await;
        }
        carol.wait_text("10 lines of alice", |t| count_from(t, "alice") >= 10).await;
        let (a_mark, b_mark) = (alice.status.len(), bob.status.len());
        alice.proxy.kill_all();
        bob.proxy.kill_all();
        // Typing goes on while the links are being re-established.
        for i in 40..80 {
            alice.say(a(i)).await;
            bob.say(b(i)).await;
        }
        alice.wait_status(a_mark, "[link] lost").await;
        alice.wait_status(a_mark, "[link] resumed").await;
        bob.wait_status(b_mark, "[link] resumed").await;

        // 2. Alice's link stays down (new connections refused) while she types.
        let mark = alice.status.len();
        let dialled = alice.proxy.connections_accepted();
        alice.proxy.refuse_new(true);
        alice.proxy.kill_all();
        alice.wait_status(mark, "[link] lost").await;
        for i in 80..100 {
            alice.say(a(i)).await;
        }
        alice.wait_status(mark, "[link] down: line kept").await;
        // At least two reconnect attempts refused while she types.
        assert!(alice.proxy.wait_for_connections(dialled + 2, WAIT).await, "no reconnect attempts");
        for i in 100..110 {
            alice.say(a(i)).await;
        }
        alice.proxy.refuse_new(false);
        let resumed = alice.wait_status(mark, "[link] resumed").await;
        // Every one of the 30 lines typed while down was marked, and the resume counts them all.
        let marked = alice.status[mark..].iter().filter(|s| s.contains("[link] down: line kept")).count();
        assert_eq!(marked, 30, "{:#?}", &alice.status[mark..]);
        let n: usize = alice.status[resumed]
            .split("; the ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count: {}", alice.status[resumed]));
        assert!(n >= 30, "only {n} lines counted as not yet delivered: {}", alice.status[resumed]);
        // The others were told that alice was away, and that she is back.
        bob.wait_text("alice away", |t| t.iter().any(|l| l.starts_with("* alice's link is down"))).await;
        bob.wait_text("alice back", |t| t.iter().any(|l| l == "* alice is back")).await;

        // 3. Carol's link goes silent (stalled, not reset) while lines flow to her: her client
        //    finds it suspect (silent far longer than its round trip), races a new connection
        //    and resumes on it; then everyone's link is reset at once.
        let mark = carol.status.len();
        carol.proxy.stall_all();
        for i in 80..100 {
            bob.say(b(i)).await;
        }
        carol.wait_status(mark, "[link] suspect").await;
        carol.wait_status(mark, "[link] resumed").await;
        for i in 110..120 {
            alice.say(a(i)).await;
            bob.say(b(i - 10)).await;
        }
        bob.wait_text("alice's a112", |t| count_from(t, "alice") >= 113).await;
        for c in [&alice, &bob, &carol] {
            c.proxy.kill_all();
        }
        for i in 120..130 {
            alice.say(a(i)).await;
            bob.say(b(i - 10)).await;
        }

        // Everyone has everything; then alice leaves, and the others see it.
        let all_a: Vec<String> = (0..130).map(a).collect();
        let all_b: Vec<String> = (0..120).map(b).collect();
        carol.wait_text("all of alice and bob", |t| count_from(t, "alice") >= 130 && count_from(t, "bob") >= 120).await;
        bob.wait_text("all of alice", |t| count_from(t, "alice") >= 130).await;
        alice.wait_text("all of bob", |t| count_from(t, "bob") >= 120).await;

        let (result, a_text, a_status) = alice.quit().await;
        assert!(result.is_ok(), "alice: {:?}", result.unwrap_err());
        bob.wait_text("alice leaving", |t| t.iter().any(|l| l == "* alice left")).await;
        carol.wait_text("alice leaving", |t| t.iter().any(|l| l == "* alice left")).await;
        let (bob_result, b_text, b_status) = bob.quit().await;
        assert!(bob_result.is_ok(), "bob: {:?}", bob_result.unwrap_err());
        carol.wait_text("bob leaving", |t| t.iter().any(|l| l == "* bob left")).await;
        let (carol_result, c_text, c_status) = carol.quit().await;
        assert!(carol_result.is_ok(), "carol: {:?}", carol_result.unwrap_err());

        // Exactly once, in order, at every other member; nobody hears their own lines.
        assert_exactly_once(&said_by(&b_text, "alice"), &all_a, "alice's lines at bob");
        assert_exactly_once(&said_by(&c_text, "alice"), &all_a, "alice's lines at carol");
        assert_exactly_once(&said_by(&a_text, "bob"), &all_b, "bob's lines at alice");
        assert_exactly_once(&said_by(&c_text, "bob"), &all_b, "bob's lines at carol");
        assert!(said_by(&a_text, "alice").is_empty() && said_by(&b_text, "bob").is_empty());
        assert_eq!(c_text.iter().filter(|l| *l == "* bob left").count(), 1, "{c_text:?}");
        // Faults really happened and were shown.
        let resumes = |s: &[String]| s.iter().filter(|l| l.starts_with("[link] resumed")).count();
        assert!(resumes(&a_status) >= 3, "{a_status:?}");
        assert!(resumes(&b_status) >= 2, "{b_status:?}");
        assert!(resumes(&c_status) >= 2, "{c_status:?}");

        room.stop.take().unwrap().send(()).unwrap();
        room.task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn giving_up_is_reported_with_the_undelivered_lines() {
    bounded(async {
        let alice_keys = Keypair::generate();
        let room = start_room(&[("alice", &alice_keys)]).await;
        let cfg = client_config(&alice_keys, room.key, Duration::from_secs(1));
        let mut alice = join_via(room.addr, "alice", cfg).await;
        alice.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, alice"))).await;
        alice.proxy.refuse_new(true);
        alice.proxy.kill_all();
        alice.wait_status(0, "[link] lost").await;
        alice.say("typed into the void".into()).await;
        alice.say("and this one too".into()).await;
        let result = alice.task.await.unwrap();
        match result {
            Err(ClientError::GaveUp { reason, undelivered }) => {
                assert!(reason.contains("gave up"), "{reason}");
                assert_eq!(undelivered, ["typed into the void", "and this one too"]);
            }
            other => panic!("expected a give-up, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn quitting_while_the_link_is_down_delivers_first() {
    bounded(async {
        let (ak, bk) = (Keypair::generate(), Keypair::generate());
        let room = start_room(&[("alice", &ak), ("bob", &bk)]).await;
        let give_up = Duration::from_secs(3600);
        let mut alice = join_via(room.addr, "alice", client_config(&ak, room.key, give_up)).await;
        alice.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, alice"))).await;
        let mut bob = join_via(room.addr, "bob", client_config(&bk, room.key, give_up)).await;
        bob.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, bob"))).await;

        alice.proxy.refuse_new(true);
        alice.proxy.kill_all();
        alice.wait_status(0, "[link] lost").await;
        alice.say("last words".into()).await;
        alice.keys.send(Input::Quit).await.unwrap();
        alice.wait_status(0, "[link] leaving once the link is back").await;
        alice.proxy.refuse_new(false);
        let (result, _, status) = alice.finish().await;
        assert!(result.is_ok(), "{result:?} {status:?}");
        bob.wait_text("alice's last words, then her leaving", |t| t.iter().any(|l| l == "* alice left")).await;
        assert_eq!(said_by(&bob.text, "alice"), ["last words"]);
    })
    .await;
}

/// Runs a client that is expected to be refused, returning the reason.
async fn refused(room: &Room, keys: &Keypair, name: &str) -> String {
    let cfg = client_config(keys, room.key, Duration::from_secs(3600));
    let stream = holdfast::connect(room.addr.to_string(), cfg).await.unwrap();
    let (_keys, typed) = mpsc::channel(8);
    let (out, _shown) = mpsc::unbounded_channel();
    match client::run_client(stream, name, typed, out).await {
        Err(ClientError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn names_belong_to_keys_and_a_rejoin_replaces_the_old_session() {
    bounded(async {
        let (ak, mk, anon, bk) = (Keypair::generate(), Keypair::generate(), Keypair::generate(), Keypair::generate());
        let allow = AllowList::from_keys([
            (ak.public, Some("alice".to_string())),
            (mk.public, Some("mallory".to_string())),
            (anon.public, None),
            (bk.public, Some("bob".to_string())),
        ]);
        let room = start_room_allowing(allow).await;
        let give_up = Duration::from_secs(3600);

        // A key listed under a name cannot use another one.
        let why = refused(&room, &mk, "alice").await;
        assert!(why.contains("listed as \"mallory\""), "{why}");

        let mut alice = join_via(room.addr, "alice", client_config(&ak, room.key, give_up)).await;
        alice.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, alice"))).await;
        let mut bob = join_via(room.addr, "bob", client_config(&bk, room.key, give_up)).await;
        bob.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, bob"))).await;

        // An unnamed key cannot take a name someone in the room has.
        let why = refused(&room, &anon, "alice").await;
        assert!(why.contains("alice is already in the room"), "{why}");

        // alice's link dies for good (her client gives up, or crashes) while the room still holds
        // her session; when she joins again, the newer session replaces the old one.
        alice.proxy.refuse_new(true);
        alice.proxy.kill_all();
        alice.wait_status(0, "[link] lost").await;
        let mut again = join_via(room.addr, "alice", client_config(&ak, room.key, give_up)).await;
        again.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with("* welcome, alice. Here: bob."))).await;
        bob.wait_text("alice rejoining", |t| t.iter().any(|l| l == "* alice rejoined")).await;
        again.say("back again".into()).await;
        bob.wait_text("alice's line", |t| t.iter().any(|l| l == "alice: back again")).await;
        // The old session hears why it ended once its link returns.
        alice.proxy.refuse_new(false);
        let (result, text, _) = alice.finish().await;
        assert!(matches!(result, Err(ClientError::RoomClosed)), "{result:?}");
        assert!(text.iter().any(|l| l.starts_with("! you joined again from a newer session")), "{text:?}");
        assert!(!bob.text.iter().any(|l| l.contains("alice left") || l.contains("alice is gone")), "{:?}", bob.text);
    })
    .await;
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("holdfast-chat-{tag}-{}-{t}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first-run flow on one machine: the room starts with only its own key, then members made
/// afterwards (by taking free seats) get in without a restart, under their own names.
#[tokio::test]
async fn members_made_after_the_room_started_get_in() {
    bounded(async {
        let tmp = TempDir::new("seats");
        let dir = setup::KeyDir(tmp.0.join("keys"));
        let room_keys = setup::prepare_room(&dir).unwrap();
        assert_eq!(room_keys.allow.len() as u32, setup::FREE_SEATS);
        let room_key = room_keys.keypair.public;
        let mut cfg = ServerConfig::new(room_keys.keypair, room_keys.allow);
        cfg.session = fast_session();
        let listener = holdfast::bind("127.0.0.1:0", cfg).await.unwrap();
        let addr = listener.local_addr();
        let (out, mut shown) = mpsc::unbounded_channel();
        tokio::spawn(async move { while shown.recv().await.is_some() {} });
        let opts = RoomOpts { allow_file: Some(dir.allow()) };
        tokio::spawn(room::run_room(listener, opts, out, std::future::pending()));

        let mut clients = HashMap::new();
        for name in ["dave", "erin"] {
            let member = setup::prepare_member(&dir, name).unwrap();
            assert!(matches!(member.source, setup::KeySource::Seat(_)), "{:?}", member.source);
            assert_eq!(member.server_key, room_key);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(dir.member_key(name)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            let cfg = client_config(&member.keypair, room_key, Duration::from_secs(3600));
            let mut c = join_via(addr, name, cfg).await;
            c.wait_text("a welcome", |t| t.iter().any(|l| l.starts_with(&format!("* welcome, {name}")))).await;
            clients.insert(name, c);
        }
        // Their entries now carry their names; a second run reuses the key.
        let listed = AllowList::load(&dir.allow()).unwrap();
        let names: Vec<_> = listed.iter().filter_map(|p| p.name.clone()).collect();
        assert!(names.contains(&"dave".to_string()) && names.contains(&"erin".to_string()), "{names:?}");
        assert_eq!(setup::prepare_member(&dir, "dave").unwrap().source, setup::KeySource::Existing);

        let erin = clients.get_mut("erin").unwrap();
        erin.say("hello dave".into()).await;
        let dave = clients.get_mut("dave").unwrap();
        dave.wait_text("erin's line", |t| t.iter().any(|l| l == "erin: hello dave")).await;

        // The next start tops the free seats up again.
        let again = setup::prepare_room(&dir).unwrap();
        assert_eq!(again.allow.len() as u32, setup::FREE_SEATS + 2);
    })
    .await;
}
