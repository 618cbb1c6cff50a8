//! ssh's command line as `holdfast ssh` reads it: its options, the destination and the remote
//! command, and the options the bootstrap connection keeps.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use anyhow::{bail, Result};

/// ssh's options that take an argument (OpenSSH 9's `ssh -h`).
const WITH_ARG: &[u8] = b"BbcDEeFIiJLlmOoPpQRSWw";
/// The options the bootstrap connection keeps: those that say how to reach and log in to the
/// host (and how much ssh says). Forwards, terminals, agents, X11, control sockets, tunnels and
/// backgrounding are the session's, not the bootstrap's.
const BOOTSTRAP_KEEPS: &[u8] = b"46CqvkKBbcEFIiJlmoPp";

/// One option as given: its letter and its argument, if it takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Opt {
    pub(crate) letter: u8,
    pub(crate) value: Option<OsString>,
}

/// ssh's arguments, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshLine {
    pub(crate) opts: Vec<Opt>,
    /// `[user@]host` or `ssh://[user@]host[:port]`.
    pub(crate) destination: OsString,
    /// The remote command's words (empty for a login shell).
    pub(crate) command: Vec<OsString>,
}

impl SshLine {
    /// Splits ssh's arguments at the destination: the first word that is neither an option nor
    /// an option's argument (or the word after `--`).
    pub(crate) fn parse(args: &[OsString]) -> Result<SshLine> {
        let mut opts = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let word = args[i].as_bytes();
            if word == b"--" {
                i += 1;
                break;
            }
            if word.len() < 2 || word[0] != b'-' {
                break;
            }
            let mut j = 1;
            while j < word.len() {
                let letter = word[j];
                if !letter.is_ascii_alphanumeric() {
                    bail!("ssh option '{}' is not one ssh has", OsStr::from_bytes(word).to_string_lossy());
                }
                if WITH_ARG.contains(&letter) {
                    let value = if j + 1 < word.len() {
                        OsString::from_vec(word[j + 1..].to_vec())
                    } else {
                        i += 1;
                        match args.get(i) {
                            Some(v) => v.clone(),
                            None => bail!("ssh option -{} needs an argument", letter as char),
                        }
                    };
                    opts.push(Opt { letter, value: Some(value) });
                    break;
                }
                opts.push(Opt { letter, value: None });
                j += 1;
            }
            i += 1;
        }
        let Some(destination) = args.get(i).cloned() else {
            bail!("no destination: give holdfast ssh [SSH OPTIONS] [USER@]HOST [COMMAND...]");
        };
        Ok(SshLine { opts, destination, command: args[i + 1..].to_vec() })
    }

    /// The options for the bootstrap connection, as words.
    pub(crate) fn bootstrap_opts(&self) -> Vec<OsString> {
        let mut words = Vec::new();
        for o in self.opts.iter().filter(|o| BOOTSTRAP_KEEPS.contains(&o.letter)) {
            words.push(OsString::from(format!("-{}", o.letter as char)));
            words.extend(o.value.clone());
        }
        words
    }
}

/// `word` quoted for a POSIX shell if it needs it (a leading `~/` is left unquoted, so that the
/// remote shell expands it).
pub(crate) fn shell_word(word: &str) -> String {
    let safe = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@%".contains(&b));
    if safe(word) {
        return word.to_string();
    }
    if let Some(rest) = word.strip_prefix("~/") {
        if safe(rest) {
            return word.to_string();
        }
        return format!("~/{}", shell_word(rest));
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn splits_at_the_destination_as_ssh_does() {
        let line = SshLine::parse(&words(&[
            "-p",
            "2222",
            "-vA",
            "-L8080:127.0.0.1:80",
            "-oBatchMode=yes",
            "me@host",
            "ls",
            "-l",
        ]))
        .unwrap();
        assert_eq!(line.destination, "me@host");
        assert_eq!(line.command, words(&["ls", "-l"]));
        let letters: Vec<u8> = line.opts.iter().map(|o| o.letter).collect();
        assert_eq!(letters, b"pvALo");
        assert_eq!(
            line.bootstrap_opts(),
            words(&["-p", "2222", "-v", "-o", "BatchMode=yes"]),
            "forwards and agent forwarding stay out of the bootstrap"
        );
        assert_eq!(SshLine::parse(&words(&["--", "-host"])).unwrap().destination, "-host");
        assert!(SshLine::parse(&words(&["-p"])).is_err());
        assert!(SshLine::parse(&words(&["-v"])).is_err());
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("holdfast"), "holdfast");
        assert_eq!(shell_word("~/bin/holdfast"), "~/bin/holdfast");
        assert_eq!(shell_word("/opt/my tools/holdfast"), "'/opt/my tools/holdfast'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("~/a b"), "~/'a b'");
    }
}
