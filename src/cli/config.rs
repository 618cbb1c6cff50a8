//! `--config FILE`: the settings of `server`, `client` and `connect` from a TOML file.
//!
//! The file has a `[server]` section, read by `holdfast server`, and a `[client]` section, read
//! by `holdfast client` and `holdfast connect` (`connect` uses the keys it has and skips the
//! forwards' keys: `local`, `socks`, `remote`, `no-check`, `no-mux`). A key is a flag's long
//! name, kebab-case as on the command line (`max-sessions-per-key = 64`); a value is what the
//! flag takes: a string for addresses, files, sizes ("8MiB") and durations ("5s"), an integer
//! for a count, a boolean for a switch (`no-check = true`), an array for a flag that repeats
//! (`service = ["ssh=127.0.0.1:22"]`).
//!
//! How it merges: the file's settings become flags, appended to the command line, except the
//! ones the command line already gives, which win; a list flag given there replaces the file's
//! whole list. Clap then parses the whole again, so a value from the file goes through the
//! same parser as the flag. Relative paths in the file (the values of the file-valued flags,
//! `key`, `authorized`, `server-key`) are taken relative to the file's own directory, like most
//! daemons' configs, so that a config and its keys can move together; on the command line they
//! stay relative to the working directory. The file names key files only, never key material
//! (`server-key` may be the base64 public key itself: public keys are not secret). It is read
//! only if others cannot change it ([`holdfast::keys::read_trusted_file`]): it decides who
//! gets in.
//!
//! The typed sections below are the file's schema: they refuse an unknown key or a wrong type
//! with its line, before anything runs. A test checks that each names exactly its
//! subcommands' flags, so a new flag needs one line in its section.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, FromArgMatches, ValueHint};
use serde::Deserialize;

use crate::args::Cli;

/// A config file larger than this is refused (a real one is a few hundred bytes).
const MAX_FILE: u64 = 1 << 20;

/// The whole file: its sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "a schema: values are read from the TOML table, checked by clap")]
struct File {
    server: Option<ServerSection>,
    client: Option<ClientSection>,
}

/// `[server]`: one field per flag of `holdfast server` (`args::ServerArgs`), by its long name.
/// A new flag is one line here: `Option<String>` for any value clap parses from text,
/// `Option<u64>` for a count, `Option<bool>` for a switch, `Option<Vec<String>>` for a list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code, reason = "a schema: values are read from the TOML table, checked by clap")]
struct ServerSection {
    listen: Option<String>,
    key: Option<String>,
    authorized: Option<String>,
    service: Option<Vec<String>>,
    allow_connect: Option<Vec<String>>,
    allow_listen: Option<Vec<String>>,
    max_sessions: Option<u64>,
    max_sessions_per_key: Option<u64>,
    buffer_budget: Option<String>,
    buffer_per_key: Option<String>,
    max_handshakes: Option<u64>,
    handshake_rate: Option<u64>,
    session_expiry: Option<String>,
    metrics: Option<String>,
    metrics_public: Option<bool>,
    server_id: Option<u64>,
    proxy_from: Option<Vec<String>>,
    handover: Option<String>,
    status: Option<String>,
    retire_after: Option<String>,
    drain_time: Option<String>,
    keepalive: Option<String>,
    dead_after: Option<String>,
    buffer: Option<String>,
}

/// `[client]`: one field per flag of `holdfast client` (`args::ClientArgs`, which includes
/// every flag of `connect`), as for [`ServerSection`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code, reason = "a schema: values are read from the TOML table, checked by clap")]
struct ClientSection {
    server: Option<String>,
    server_key: Option<String>,
    key: Option<String>,
    service: Option<String>,
    on_fault: Option<String>,
    give_up: Option<String>,
    cipher: Option<String>,
    keepalive: Option<String>,
    dead_after: Option<String>,
    buffer: Option<String>,
    local: Option<Vec<String>>,
    socks: Option<String>,
    remote: Option<Vec<String>>,
    no_check: Option<bool>,
    no_mux: Option<bool>,
    status: Option<String>,
}

/// Parses the command line (`argv`, the program name first) and merges in the `--config` file
/// of `server`, `client` or `connect`.
///
/// # Errors
/// A [`clap::Error`] (to be shown by clap: `--help`, `--version`, a bad flag) or a message
/// about the config file.
pub(crate) fn parse_from(argv: Vec<OsString>) -> Result<Cli> {
    let cmd = crate::args::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let config = matches.subcommand().and_then(|(name, sub)| {
        let path = sub.try_get_one::<PathBuf>("config").ok().flatten()?;
        Some((name, sub, path))
    });
    let Some((name, given, path)) = config else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let sub = cmd.find_subcommand(name).ok_or_else(|| anyhow!("no subcommand {name}"))?;
    let section = if name == "server" { "server" } else { "client" };
    let settings = read(path, section, sub)?;
    // The file alone first, so that a bad value is reported as the file's.
    let mut alone = vec![argv.first().cloned().unwrap_or_else(|| "holdfast".into()), name.into()];
    alone.extend(settings.iter().flat_map(|s| s.args.iter().cloned()));
    if let Err(e) = cmd.clone().try_get_matches_from(&alone) {
        bail!("config {}: [{section}] {}", path.display(), clap_message(&e));
    }
    let mut merged = argv;
    for s in settings.into_iter().filter(|s| !given_on_command_line(given, &s.id)) {
        merged.extend(s.args);
    }
    let matches = cmd
        .try_get_matches_from(&merged)
        .map_err(|e| anyhow!("{} (with the settings of config {})", clap_message(&e), path.display()))?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The value of a required flag after merging: an error names the flag and its config key.
///
/// # Errors
/// If neither the command line nor the config file gave it.
pub(crate) fn required<T>(value: Option<T>, flag: &str, section: &str, example: &str) -> Result<T> {
    value.ok_or_else(|| {
        anyhow!(
            "--{flag} is required: give --{flag} {example}, or `{flag} = \"{example}\"` in the [{section}] section of a --config file"
        )
    })
}

/// One key of the file, as flags.
struct Setting {
    /// The clap id of its flag.
    id: String,
    args: Vec<OsString>,
}

/// Reads `path` and turns its `section` into flags of the subcommand `sub`.
fn read(path: &Path, section: &str, sub: &Command) -> Result<Vec<Setting>> {
    // Checked like the allow-list: whoever can change the config decides who gets in.
    let text = holdfast::keys::read_trusted_file(path, MAX_FILE).map_err(|e| anyhow!("--config {e}"))?;
    settings(path, &text, section, sub)
}

/// A config file's text through the whole parser, for each subcommand that reads it, as
/// [`parse_from`] runs it but without a file: the entry point of the fuzz target `config`
/// (`fuzz/fuzz_targets/config.rs`, which includes this file) and of the seed-corpus test.
/// Refusals are the parser's answers; only a panic is a bug.
#[cfg_attr(not(test), allow(dead_code, reason = "the fuzz target's entry point"))]
pub(crate) fn check_text(text: &str) {
    let cmd = crate::args::command();
    let path = Path::new("/etc/holdfast/holdfast.toml");
    for name in ["server", "client", "connect"] {
        let Some(sub) = cmd.find_subcommand(name) else { continue };
        let section = if name == "server" { "server" } else { "client" };
        let Ok(settings) = settings(path, text, section, sub) else { continue };
        let mut alone: Vec<OsString> = vec!["holdfast".into(), name.into()];
        alone.extend(settings.into_iter().flat_map(|s| s.args));
        if let Ok(matches) = cmd.clone().try_get_matches_from(&alone) {
            let _ = Cli::from_arg_matches(&matches);
        }
    }
}

/// Turns the `section` of `text`, the contents of the config file `path`, into flags of the
/// subcommand `sub`.
fn settings(path: &Path, text: &str, section: &str, sub: &Command) -> Result<Vec<Setting>> {
    let shown = path.display();
    let file: File = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let present = if section == "server" { file.server.is_some() } else { file.client.is_some() };
    let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let Some(toml::Value::Table(values)) = table.get(section).filter(|_| present) else {
        bail!("config {shown} has no [{section}] section, which `holdfast {}` reads", sub.get_name());
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut settings = Vec::new();
    for (key, value) in values {
        // A key of the section that this subcommand lacks: a forward's key, for `connect`.
        let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(key.as_str())) else { continue };
        let file_valued = matches!(arg.get_value_hint(), ValueHint::FilePath | ValueHint::AnyPath);
        let items = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        let mut args = Vec::new();
        for item in items {
            let text = match item {
                toml::Value::Boolean(true) => {
                    args.push(OsString::from(format!("--{key}")));
                    continue;
                }
                toml::Value::Boolean(false) => continue,
                toml::Value::Integer(n) => n.to_string().into(),
                toml::Value::String(s) if file_valued => relative_to(dir, s),
                toml::Value::String(s) => s.into(),
                other => bail!("config {shown}: [{section}] {key}: a {} is not a value here", other.type_str()),
            };
            // One word (`--key=value`), so that a value starting with '-' is not a flag.
            let mut arg = OsString::from(format!("--{key}="));
            arg.push(text);
            args.push(arg);
        }
        settings.push(Setting { id: arg.get_id().to_string(), args });
    }
    Ok(settings)
}

/// `value` taken relative to the config file's directory, unless it is absolute or looks like a
/// base64 key (`--server-key` also takes the key itself; a bad one is then reported as a key).
fn relative_to(dir: &Path, value: &str) -> OsString {
    let p = Path::new(value);
    if p.is_absolute() || holdfast::keys::looks_like_key(value) {
        return value.into();
    }
    dir.join(p).into_os_string()
}

/// True if the flag `id` was given on the command line (or by its environment variable).
fn given_on_command_line(given: &ArgMatches, id: &str) -> bool {
    matches!(given.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// A clap error as one line, without its "error: " and usage, and with the config key of the
/// flag it names.
fn clap_message(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line).to_string();
    match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(flag)) => {
            let key = flag.trim_start_matches('-').split([' ', '=']).next().unwrap_or_default();
            format!("{line} (the key `{key}`)")
        }
        _ => line,
    }
}

/// A TOML or schema error: the file, the line and its section, what is wrong and how to fix
/// it. The parser's own words are kept where they are plain (an unknown key's message lists the
/// known keys); an unquoted value and an unknown section are said in words of their own.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let shown = path.display();
    let Some(span) = e.span() else { return anyhow!("config {shown}: {}", e.message()) };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let this_line = text.lines().nth(line - 1).unwrap_or_default().trim();
    // The section the line is in: the last header above it (not the line itself).
    let above = before.rsplit_once('\n').map_or("", |(above, _)| above);
    let section = above.lines().rev().map(str::trim).find(|l| l.starts_with('[')).and_then(header);
    let message = e.message().trim();
    let sections = "a config file has a [server] section (read by holdfast server) and a [client] section (read by \
                    holdfast client and holdfast connect)";
    if message.starts_with("unknown field") {
        if let Some(name) = header(this_line) {
            return anyhow!("config {shown}, line {line}: unknown section [{name}]; {sections}");
        }
        if section.is_none() {
            let key = this_line.split('=').next().unwrap_or_default().trim();
            return anyhow!(
                "config {shown}, line {line}: `{}` is outside any section; put it under [server] or [client] ({sections})",
                holdfast::human::printable(key)
            );
        }
    }
    let place = section.map(|s| format!(" in [{s}]")).unwrap_or_default();
    if let Some((key, value)) = unquoted(this_line) {
        let takes = quoted_takes(text, line, key, value);
        let (key, value) = (holdfast::human::printable(key), holdfast::human::printable(value));
        return match takes {
            None => anyhow!(
                "config {shown}, line {line}{place}: the value of `{key}` is not quoted: write {key} = \"{value}\" \
                 (text, sizes, durations, addresses and paths go in double quotes; numbers and true or false do not)"
            ),
            // Found by a walk: the hint for a list key led to a second error.
            Some(A_LIST) => anyhow!(
                "config {shown}, line {line}{place}: `{key}` takes a list: write {key} = [\"{value}\"] (several: \
                 [\"A\", \"B\"])"
            ),
            Some(takes) => anyhow!(
                "config {shown}, line {line}{place}: `{key}` takes {takes}, and {value} is not one (write it without quotes)"
            ),
        };
    }
    let hint = if message.starts_with("unknown field") {
        " (keys are the long flag names: of `holdfast server --help` in [server], of `holdfast client --help` in [client])"
    } else {
        ""
    };
    anyhow!("config {shown}, line {line}{place}: {message}{hint}")
}

/// What the key on line `line` takes if not text, found by parsing the file again with `value`
/// quoted: `None` if the quoted value is accepted there (quoting is the fix).
/// What [`quoted_takes`] says of a key whose value is a list.
const A_LIST: &str = "a list";

fn quoted_takes(text: &str, line: usize, key: &str, value: &str) -> Option<&'static str> {
    let fixed: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i + 1 == line { format!("{key} = {}", toml::Value::from(value)) } else { l.to_owned() })
        .collect();
    let e = toml::from_str::<File>(&fixed.join("\n")).err()?;
    let same_line =
        e.span().is_some_and(|s| fixed.join("\n").get(..s.start).unwrap_or("").matches('\n').count() + 1 == line);
    let message = e.message();
    if !same_line {
        None
    } else if message.contains("expected u64") || message.contains("expected i64") {
        Some("a whole number")
    } else if message.contains("expected a boolean") {
        Some("true or false")
    } else if message.contains("expected a sequence") {
        Some(A_LIST)
    } else {
        None
    }
}

/// The name in a section header line, `[name]` (`None` for any other line).
fn header(line: &str) -> Option<&str> {
    let inner = line.strip_prefix('[')?.split(']').next()?;
    Some(inner.trim_matches(['[', ' ']))
}

/// `key = value` where the value is not a TOML value but would be one quoted (an address, a
/// path, a size written bare): the key and the value.
fn unquoted(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once('=')?;
    let (key, value) = (key.trim(), value.trim());
    let value = value.split(" #").next().unwrap_or(value).trim();
    let bare = !value.is_empty() && !value.starts_with(['"', '\'', '[', '{']);
    if !bare || key.is_empty() || key.starts_with('[') || value.contains('"') {
        return None;
    }
    // Numbers, true and false parse bare: the error is then about something else.
    let as_toml = format!("v = {value}");
    if toml::from_str::<toml::Table>(&as_toml).is_ok() {
        return None;
    }
    Some((key, value))
}

#[cfg(test)]
mod tests;
