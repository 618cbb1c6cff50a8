//! The manual page as man shows it, and the help texts it is made of.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::*;
use crate::args;

/// The page rendered to text by `man -l` (or groff), 120 columns; `None` if neither is
/// installed.
fn rendered(page: &str) -> Option<String> {
    let dir = std::env::temp_dir().join(format!("holdfast-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join("holdfast.1");
    std::fs::write(&path, page).ok()?;
    let man = Command::new("man")
        .args(["-l", "-E", "UTF-8"])
        .arg(&path)
        .env("MANWIDTH", "120")
        .env("MAN_KEEP_FORMATTING", "0")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .stdin(Stdio::null())
        .output();
    let out = match man {
        Ok(out) if out.status.success() => Some(out),
        _ => Command::new("groff")
            .args(["-man", "-Tutf8", "-rLL=120n", "-P-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success()),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let warnings = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(warnings.trim().is_empty(), "the page renders with warnings:\n{warnings}");
    // Remove overstrike bold/underline, should a formatter still emit it.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut clean = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            clean.pop();
        } else {
            clean.push(c);
        }
    }
    Some(clean)
}

#[test]
fn the_man_page_shows_what_exists_with_examples_verbatim() {
    let page = render(&args::command());
    let Some(text) = rendered(&page) else {
        let _ = writeln!(std::io::stderr(), "manpage tests: skipped: neither man nor groff is installed");
        assert!(
            std::env::var("HOLDFAST_REQUIRE_TOOLS").map_or(true, |v| v != "1"),
            "man/groff missing and HOLDFAST_REQUIRE_TOOLS=1"
        );
        return;
    };
    // No references to pages that do not exist (holdfast-keygen(1) and the like), no section
    // headed EXTRA.
    assert!(!text.contains("holdfast-"), "a holdfast-COMMAND page is named:\n{text}");
    for l in text.lines() {
        assert_ne!(l.trim(), "EXTRA", "a section headed EXTRA:\n{text}");
    }
    for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXAMPLES", "SEE ALSO"] {
        assert!(text.lines().any(|l| l == section), "no {section} section:\n{text}");
    }
    // Options with their values, in the synopsis and in the lists.
    assert!(text.contains("[--listen HOST[:PORT]]"), "--listen without its value:\n{text}");
    assert!(text.contains("[--service NAME=HOST:PORT]..."), "{text}");
    assert!(text.contains("--key FILE"), "{text}");
    // Examples are verbatim: each line whole, with its spacing, on its own line.
    for example in [
        "holdfast demo                                   # see it survive faults, no set-up needed",
        "holdfast server --listen 0.0.0.0:7700 --key keys/server.key \\",
        "    --authorized keys/authorized --service ssh=127.0.0.1:22",
        "[server]",
        "listen = \"0.0.0.0:7700\"",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw= alice-laptop services=ssh,db",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start() == example.trim_start() && l.ends_with(example)),
            "not verbatim on a line of its own: {example:?}\n{text}"
        );
    }
    // Every subcommand and every flag is there.
    let cmd = args::command();
    // Hidden ones (the remote end of `holdfast ssh`) are not for people.
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help" && !s.is_hide_set()) {
        assert!(text.contains(&format!("holdfast {}", sub.get_name())), "{} missing", sub.get_name());
        for arg in sub.get_arguments().filter_map(|a| a.get_long()) {
            assert!(text.contains(&format!("--{arg}")), "holdfast {} --{arg} missing", sub.get_name());
        }
    }
}

/// The help of `name`'s subcommand, as `holdfast NAME --help` prints it.
fn help(name: &str) -> String {
    let mut cmd = args::command();
    cmd.build();
    let sub = cmd.find_subcommand_mut(name).expect("subcommand");
    sub.render_long_help().to_string()
}

/// The help of `--flag` in `help`: its line and the indented lines under it.
fn flag_help(help: &str, flag: &str) -> String {
    let mut lines = help.lines().skip_while(|l| !l.trim_start().split([',', ' ']).any(|w| w == flag));
    let mut text: Vec<&str> = lines.next().into_iter().collect();
    assert!(!text.is_empty(), "no {flag} in:\n{help}");
    text.extend(lines.take_while(|l| l.is_empty() || l.starts_with("          ")));
    text.join("\n")
}

#[test]
fn help_texts_say_only_what_applies() {
    for sub in ["keygen", "pubkey", "server", "client", "connect", "demo", "completions", "man"] {
        let h = help(sub);
        let quiet = flag_help(&h, "--quiet");
        assert!(!quiet.contains("connect"), "holdfast {sub} --help: -q mentions connect: {quiet}");
    }
    let connect = help("connect");
    let service = flag_help(&connect, "--service");
    assert!(!service.contains("--local"), "connect --help: --service mentions --local: {service}");
    assert!(
        connect.contains("window title") && connect.contains("-q turns that off"),
        "connect --help does not say what -q turns off"
    );
    let client = help("client");
    assert!(flag_help(&client, "--service").contains("--local"), "client --help: --service lost its --local note");
    let server = help("server");
    for flag in ["--listen", "--key", "--authorized"] {
        let text = flag_help(&server, flag);
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains("Required (here or in the config file)"), "server --help {flag}: {text}");
    }
    for flag in ["--server", "--server-key", "--key"] {
        let text = flag_help(&connect, flag);
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains("Required (here or in the config file)"), "connect --help {flag}: {text}");
    }
}
