//! Encrypted chat that keeps talking while the network breaks.
//!
//! A room relays lines between its members over holdfast streams: Noise-encrypted, each member
//! authenticated by its key, and resumed after every fault with nothing lost or repeated.
//!
//! ```sh
//! cargo run --release --example chat -- server        # terminal 1: the room, on 127.0.0.1:7710
//! cargo run --release --example chat -- join alice    # terminal 2
//! cargo run --release --example chat -- join bob      # terminal 3
//! ```
//!
//! Keys are made in `keys/` on first use (see `setup.rs`). Break the link while typing, for
//! example with `ss -K dst 127.0.0.1 dport = 7710`, and watch the `[link]` lines.
//!
//! Files: `main.rs` (command line and terminal), `line.rs` (the line protocol), `room.rs` (the
//! room), `client.rs` (the client), `setup.rs` (keys and the allow-list).

mod client;
mod line;
mod room;
mod setup;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use client::{ClientError, Input};
use holdfast::{ClientConfig, Error, ServerConfig};
use line::Show;
use room::RoomOpts;
use setup::{KeyDir, KeySource};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

/// Encrypted chat that keeps talking while the network breaks (a holdfast example).
#[derive(Parser)]
#[command(name = "chat")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the room (Ctrl-C closes it).
    Server {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7710")]
        listen: String,
        /// Key directory: the room's key, its allow-list and free seats.
        #[arg(long, default_value = "keys")]
        keys: PathBuf,
    },
    /// Join the room as NAME (/quit or Ctrl-C leaves).
    Join {
        /// Your name in the room; your key is keys/chat-NAME.key.
        name: String,
        /// The room's address.
        #[arg(long, default_value = "127.0.0.1:7710")]
        server: String,
        /// Key directory: needs the room's chat-server.pub.
        #[arg(long, default_value = "keys")]
        keys: PathBuf,
        /// Give up after this many seconds without a link (then exit with status 2).
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        give_up: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        match cli.cmd {
            Cmd::Server { listen, keys } => server(listen, KeyDir(keys)).await,
            Cmd::Join { name, server, keys, give_up } => join(name, server, KeyDir(keys), give_up).await,
        }
    });
    // Standard input is read on a blocking thread, and dropping the runtime would wait for that
    // read to finish (until the next Enter): leave now instead.
    std::process::exit(code)
}

/// Prints what the room or client shows: chat text on stdout, status lines on stderr.
fn printer() -> (line::Out, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Show>();
    let task = tokio::spawn(async move {
        while let Some(show) = rx.recv().await {
            match show {
                Show::Text(t) => {
                    let mut o = std::io::stdout().lock();
                    let _ = writeln!(o, "{t}").and_then(|()| o.flush());
                }
                Show::Status(s) => eprintln!("{s}"),
            }
        }
    });
    (tx, task)
}

async fn server(listen: String, dir: KeyDir) -> i32 {
    let keys = match setup::prepare_room(&dir) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("chat: {e:#}");
            return 1;
        }
    };
    for note in &keys.notes {
        eprintln!("{note}");
    }
    let seats = keys.allow.iter().filter(|p| p.name.as_deref().is_some_and(|n| n.starts_with("seat-"))).count();
    let members = keys.allow.len() - seats;
    let room_key = keys.keypair.public;
    let listener = match holdfast::bind(listen, ServerConfig::new(keys.keypair, keys.allow)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chat: {e}");
            return 1;
        }
    };
    eprintln!(
        "[room] listening on {}, room key {} ({})",
        listener.local_addr(),
        setup::short(&room_key),
        dir.server_pub().display()
    );
    eprintln!(
        "[room] allow-list {}: {members} member key(s), {seats} free seat(s) for new names on this machine",
        dir.allow().display()
    );
    // The default address needs no --server; any other one does.
    let at = listener.local_addr();
    let server = if at.to_string() == "127.0.0.1:7710" { String::new() } else { format!(" --server {at}") };
    eprintln!("[room] join from another terminal: cargo run --release --example chat -- join NAME{server}");
    let (out, print) = printer();
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = room::run_room(listener, RoomOpts { allow_file: Some(dir.allow()) }, out, stop).await;
    let _ = print.await;
    match result {
        Ok(()) => {
            eprintln!("[room] closed");
            0
        }
        Err(e) => {
            eprintln!("chat: the room stopped: {e}");
            1
        }
    }
}

async fn join(name: String, addr: String, dir: KeyDir, give_up: u64) -> i32 {
    if let Err(e) = line::check_name(&name) {
        eprintln!("chat: {e}");
        return 1;
    }
    let keys = match setup::prepare_member(&dir, &name) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("chat: {e:#}");
            return 1;
        }
    };
    let key_file = dir.member_key(&name);
    match &keys.source {
        KeySource::Existing => {}
        KeySource::Seat(n) => eprintln!(
            "[keys] new key {} (took free seat {n} of the room's allow-list, so the running room admits it)",
            key_file.display()
        ),
        KeySource::AddedNeedsRestart => eprintln!(
            "[keys] new key {}, added to {}. The room had no free seat left: it admits this key once restarted.",
            key_file.display(),
            dir.allow().display()
        ),
        KeySource::Remote(line) => eprintln!(
            "[keys] new key {}. No room runs from {} here: ask the room's host to append this line to its keys/chat-room.allow and restart the room:\n    {line}",
            key_file.display(),
            dir.0.display()
        ),
    }
    let room_key = keys.server_key;
    let mut cfg = ClientConfig::new(keys.keypair, keys.server_key);
    cfg.recovery.give_up_after = Duration::from_secs(give_up);
    let stream = match holdfast::connect(addr.clone(), cfg).await {
        Ok(s) => s,
        Err(e @ Error::Connect { .. }) => {
            eprintln!("chat: {e}\n      Is the room running? cargo run --release --example chat -- server");
            return 1;
        }
        Err(e @ Error::HandshakeRefused { .. }) => {
            eprintln!(
                "chat: {e}\n      A room admits the keys on its keys/chat-room.allow as it was when the room started.\n      Check that your line is there ({}), then restart the room.",
                dir.member_pub(&name).display()
            );
            return 1;
        }
        Err(e) => {
            eprintln!("chat: {e}");
            return 1;
        }
    };
    eprintln!(
        "[link] connected to {addr} as {name}, Noise-encrypted (room key {}). /quit or Ctrl-C leaves.",
        setup::short(&room_key)
    );

    let (tx, rx) = mpsc::channel(64);
    let typed = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match stdin.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_string();
                    if typed.send(Input::Line(line)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = typed.send(Input::Quit).await;
    });
    tokio::spawn(async move {
        let mut presses = 0;
        while tokio::signal::ctrl_c().await.is_ok() {
            presses += 1;
            let input = if presses == 1 { Input::Quit } else { Input::Abort };
            if presses > 2 || tx.send(input).await.is_err() {
                std::process::exit(130);
            }
        }
    });

    let (out, print) = printer();
    let result = client::run_client(stream, &name, rx, out).await;
    let _ = print.await;
    let code = match &result {
        Ok(()) => {
            eprintln!("[chat] you left the room; every line you typed was delivered.");
            return 0;
        }
        Err(ClientError::GaveUp { .. }) => {
            eprintln!("[chat] giving up: no link to the room at {addr} for {give_up}s (the --give-up limit). Exiting.");
            2
        }
        Err(ClientError::Aborted { .. }) => {
            eprintln!("[chat] left at once, without waiting for the link.");
            130
        }
        Err(e) => {
            eprintln!("[chat] {e}");
            1
        }
    };
    if let Err(e) = &result {
        let lost = e.undelivered();
        if !lost.is_empty() {
            eprintln!("[chat] not delivered ({} line(s)):", lost.len());
            for line in lost {
                eprintln!("  > {line}");
            }
        }
    }
    code
}
