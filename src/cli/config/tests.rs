//! The config file through the real parser: the examples, unknown keys, the merge with flags,
//! relative paths, and the schema against the subcommands' flags.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::args::{Cli, ClientArgs, Cmd, ConnectArgs, ServerArgs};

fn parse(args: &[&str]) -> Result<Cli> {
    parse_from(std::iter::once("holdfast").chain(args.iter().copied()).map(OsString::from).collect())
}

fn server(args: &[&str]) -> ServerArgs {
    match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e:#}")).cmd {
        Cmd::Server(a) => a,
        _ => panic!("not server"),
    }
}

fn client(args: &[&str]) -> ClientArgs {
    match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e:#}")).cmd {
        Cmd::Client(a) => a,
        _ => panic!("not client"),
    }
}

fn connect(args: &[&str]) -> ConnectArgs {
    match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e:#}")).cmd {
        Cmd::Connect(a) => a,
        _ => panic!("not connect"),
    }
}

/// A config file in a fresh temp dir, removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(tag: &str, text: &str) -> Temp {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("holdfast-config-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("holdfast.toml"), text).unwrap();
        Temp(dir)
    }

    fn file(&self) -> String {
        self.0.join("holdfast.toml").to_str().unwrap().to_string()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_parses_with_the_real_parser() {
    let files = examples();
    assert!(files.len() >= 2, "examples/*.toml: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let p = path.to_str().unwrap();
        let dir = path.parent().unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let mut sections = 0;
        if table.contains_key("server") {
            sections += 1;
            let a = server(&["server", "--config", p]);
            assert!(a.listen.is_some() && a.key.is_some() && a.authorized.is_some(), "{p}: required keys");
            assert!(a.key.unwrap().starts_with(dir), "{p}: key not relative to the file");
        }
        if table.contains_key("client") {
            sections += 1;
            let a = client(&["client", "--config", p]);
            assert!(a.common.server.is_some() && a.common.key.is_some(), "{p}: required keys");
            assert!(!a.local.is_empty() || a.socks.is_some() || !a.remote.is_empty(), "{p}: nothing to forward");
            let c = connect(&["connect", "--config", p]);
            assert!(c.common.server_key.is_some(), "{p}: connect reads [client] too");
        }
        assert!(sections > 0, "{p} has neither [server] nor [client]");
    }
}

#[test]
fn an_unknown_key_is_refused_naming_it_the_file_and_the_line() {
    let t = Temp::new("unknown", "[server]\nlisten = \"127.0.0.1:0\"\nmax-sesions = 10\n");
    let e = parse(&["server", "--config", &t.file()]).err().expect("an unknown key was accepted");
    let msg = format!("{e:#}");
    for word in ["max-sesions", &t.file(), "line 3", "[server]", "max-sessions"] {
        assert!(msg.contains(word), "{word:?} missing from: {msg}");
    }
    let t = Temp::new("section", "[sever]\nlisten = \"127.0.0.1:0\"\n");
    let msg = format!("{:#}", parse(&["server", "--config", &t.file()]).err().expect("an unknown section"));
    assert!(msg.contains("sever"), "{msg}");
}

/// Issue 24: the TOML parser's words ("invalid float, expected nothing", "line 1 in []") are
/// replaced by what is wrong and how to fix it.
#[test]
fn toml_mistakes_are_said_with_their_fix() {
    let error = |text: &str| {
        let t = Temp::new("toml", text);
        let e = parse(&["server", "--config", &t.file()]).err().expect("a broken file was accepted");
        (format!("{e:#}"), t.file())
    };
    let (msg, file) = error("[server]\nlisten = 0.0.0.0:7700\n");
    let want = format!(
        "config {file}, line 2 in [server]: the value of `listen` is not quoted: write listen = \"0.0.0.0:7700\""
    );
    assert!(msg.starts_with(&want) && !msg.contains("float"), "{msg}");
    let (msg, file) = error("[server]\nkey = keys/server.key # the key\n");
    assert!(
        msg.starts_with(&format!(
            "config {file}, line 2 in [server]: the value of `key` is not quoted: write key = \"keys/server.key\""
        )),
        "{msg}"
    );
    // A list key: the hint is a list (found by a walk: `write local = "…"` was refused next).
    let (msg, file) = error("[server]\nservice = ssh=127.0.0.1:22\n");
    let want =
        format!("config {file}, line 2 in [server]: `service` takes a list: write service = [\"ssh=127.0.0.1:22\"]");
    assert!(msg.starts_with(&want), "{msg}");
    let (msg, file) = error("[sever]\nlisten = \"127.0.0.1:0\"\n");
    let want = format!("config {file}, line 1: unknown section [sever]; a config file has a [server] section");
    assert!(msg.starts_with(&want) && !msg.contains("[]"), "{msg}");
    let (msg, file) = error("listen = \"127.0.0.1:0\"\n[server]\n");
    assert!(
        msg.starts_with(&format!("config {file}, line 1: `listen` is outside any section; put it under [server]")),
        "{msg}"
    );
    let (msg, _) = error("[server]\nmax-sessions = 12x\n");
    assert!(msg.contains("line 2 in [server]: `max-sessions` takes a whole number, and 12x is not one"), "{msg}");
    let (msg, _) = error("[server]\nmetrics-public = yes\n");
    assert!(msg.contains("`metrics-public` takes true or false, and yes is not one"), "{msg}");
}

#[test]
fn a_bad_value_is_reported_as_the_files_with_its_key() {
    let t = Temp::new("value", "[server]\nbuffer = \"8XB\"\n");
    let msg = format!("{:#}", parse(&["server", "--config", &t.file()]).err().expect("a bad size was accepted"));
    assert!(msg.contains(&t.file()) && msg.contains("`buffer`") && msg.contains("8XB"), "{msg}");
    let t = Temp::new("type", "[server]\nmax-sessions = \"many\"\n");
    let msg = format!("{:#}", parse(&["server", "--config", &t.file()]).err().expect("a string count was accepted"));
    assert!(msg.contains("line 2") && msg.contains("many") && msg.contains("expected u64"), "{msg}");
}

#[test]
fn flags_override_the_file_and_a_list_flag_replaces_its_list() {
    let text = "[server]\nlisten = \"127.0.0.1:7000\"\nkey = \"k\"\nmax-sessions = 5\nkeepalive = \"2s\"\n\
                service = [\"a=127.0.0.1:1\", \"b=127.0.0.1:2\"]\nallow-connect = [\"*:443\"]\n";
    let t = Temp::new("override", text);
    let from_file = server(&["server", "--config", &t.file()]);
    assert_eq!(from_file.listen.as_deref(), Some("127.0.0.1:7000"));
    assert_eq!(from_file.max_sessions, 5);
    assert_eq!(from_file.timers.keepalive, Duration::from_secs(2));
    assert_eq!(from_file.services, ["a=127.0.0.1:1", "b=127.0.0.1:2"]);
    let a = server(&[
        "server",
        "--config",
        &t.file(),
        "--listen",
        "127.0.0.1:8000",
        "--max-sessions",
        "7",
        "--service",
        "c=127.0.0.1:3",
    ]);
    assert_eq!(a.listen.as_deref(), Some("127.0.0.1:8000"), "--listen did not override the file");
    assert_eq!(a.max_sessions, 7, "--max-sessions did not override the file");
    assert_eq!(a.services, ["c=127.0.0.1:3"], "--service did not replace the file's list");
    assert_eq!(a.allow_connect, ["*:443"], "a list not given on the command line comes from the file");
    assert_eq!(a.timers.keepalive, Duration::from_secs(2));
    // The defaults stay for what neither gives.
    assert_eq!(a.max_handshakes, 2048);
}

#[test]
fn relative_paths_are_relative_to_the_files_directory() {
    let key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    let text = format!(
        "[client]\nserver = \"h\"\nserver-key = \"{key}\"\nkey = \"keys/laptop.key\"\nlocal = [\"127.0.0.1:1=ssh\"]\n\n\
         [server]\nkey = \"/abs/server.key\"\nauthorized = \"keys/authorized\"\n"
    );
    let t = Temp::new("paths", &text);
    let c = client(&["client", "--config", &t.file()]);
    assert_eq!(c.common.key, Some(t.0.join("keys/laptop.key")));
    assert_eq!(c.common.server_key.as_deref(), Some(key), "a key itself is not a path");
    let s = server(&["server", "--config", &t.file()]);
    assert_eq!(s.key, Some(PathBuf::from("/abs/server.key")));
    assert_eq!(s.authorized, Some(t.0.join("keys/authorized")));
    // On the command line a path stays as given (relative to the working directory).
    let s = server(&["server", "--config", &t.file(), "--authorized", "here"]);
    assert_eq!(s.authorized, Some(PathBuf::from("here")));
}

#[test]
fn connect_skips_the_forward_keys_and_switches_follow_booleans() {
    let t =
        Temp::new("connect", "[client]\nserver = \"h\"\nlocal = [\"127.0.0.1:1\"]\nno-check = true\nno-mux = false\n");
    let c = client(&["client", "--config", &t.file()]);
    assert!(c.no_check && !c.no_mux);
    assert_eq!(connect(&["connect", "--config", &t.file()]).common.server.as_deref(), Some("h:7700"));
}

#[test]
fn a_file_is_checked_alone_without_refusing_what_the_command_line_completes() {
    // `metrics-public` is only meaningful with `metrics`, which the command line gives here.
    let t = Temp::new("complete", "[server]\nmetrics-public = true\n");
    let a = server(&["server", "--config", &t.file(), "--metrics", "0.0.0.0:9770"]);
    assert!(a.metrics_public && a.metrics.is_some());
}

#[test]
fn a_missing_section_is_an_error() {
    let t = Temp::new("nosection", "[client]\nserver = \"h\"\n");
    let msg = format!("{:#}", parse(&["server", "--config", &t.file()]).err().expect("no [server] section"));
    assert!(msg.contains("no [server] section"), "{msg}");
}

#[test]
fn a_required_flag_names_the_flag_and_the_key() {
    let msg = format!("{:#}", required(None::<String>, "listen", "server", "0.0.0.0:7700").unwrap_err());
    assert!(msg.contains("--listen") && msg.contains("`listen = ") && msg.contains("[server]"), "{msg}");
}

/// The keys a section accepts, as its schema lists them in an unknown-key error.
fn schema_keys<T: serde::de::DeserializeOwned>() -> BTreeSet<String> {
    let Err(e) = toml::from_str::<T>("not-a-flag-at-all = 1") else { panic!("the schema took any key") };
    let msg = e.message().to_string();
    let (_, list) = msg.split_once("expected one of").unwrap_or_else(|| panic!("{msg}"));
    list.split('`').skip(1).step_by(2).map(String::from).collect()
}

/// The long flags of a subcommand that the config file can set.
fn flags(name: &str) -> BTreeSet<String> {
    let cmd = crate::args::command();
    let sub = cmd.find_subcommand(name).unwrap();
    sub.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["config", "help", "verbose", "quiet"].contains(l))
        .map(String::from)
        .collect()
}

#[test]
fn the_sections_name_exactly_the_flags() {
    let (server_keys, client_keys) = (schema_keys::<ServerSection>(), schema_keys::<ClientSection>());
    assert_eq!(
        server_keys,
        flags("server"),
        "config::ServerSection and the flags of `holdfast server` differ: a new flag needs a field there"
    );
    assert_eq!(client_keys, flags("client"), "config::ClientSection and `holdfast client` differ");
    assert!(flags("connect").is_subset(&client_keys), "a flag of `connect` is missing from [client]");
}

#[test]
fn a_config_others_can_change_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = Temp::new("writable", "[server]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::set_permissions(t.file(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let msg = format!("{:#}", parse(&["server", "--config", &t.file()]).err().expect("a world-writable config"));
    assert!(msg.contains("--config") && msg.contains(&t.file()) && msg.contains("chmod"), "{msg}");
    std::fs::set_permissions(t.file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(parse(&["server", "--config", &t.file()]).is_ok());
}

#[test]
fn a_config_larger_than_the_bound_is_refused() {
    let t = Temp::new("large", &format!("[server]\n# {}\n", "x".repeat(MAX_FILE as usize)));
    let msg = format!("{:#}", parse(&["server", "--config", &t.file()]).err().expect("a huge config"));
    assert!(msg.contains("larger than"), "{msg}");
}

/// The seed corpus of the fuzz target `config` (`fuzz/corpus/config/`, with any crash input
/// added as a regression) goes through the same entry point without a panic.
#[test]
fn the_fuzz_seeds_parse_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            check_text(text);
        }
        n += 1;
    }
    assert!(n > 0, "no seeds in {}", dir.display());
}
