//! `holdfast man`: the manual page, in roff, from the same definitions as `--help`.
//!
//! One page for the whole program (`man holdfast` has every flag): NAME, SYNOPSIS (a line per
//! command, every option with its value), DESCRIPTION, the global OPTIONS, COMMANDS (a
//! subsection per command: its synopsis, description, options under their help headings, and
//! its notes and examples), EXAMPLES and SEE ALSO. The help texts are prose, reflowed by man;
//! their indented lines (examples, config files) are verbatim blocks, kept as written.

use clap::{Arg, ArgAction, Command};

/// The page for `cmd` (the whole `holdfast` command).
pub(crate) fn render(cmd: &Command) -> String {
    let mut cmd = cmd.clone();
    cmd.build();
    let name = cmd.get_name().to_owned();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let mut out = String::new();
    out.push_str(&format!(".TH {} 1 \"\" \"{name} {version}\" \"User Commands\"\n", name.to_uppercase()));
    // Left-aligned, unhyphenated: option names and values must read as typed.
    out.push_str(".ad l\n.nh\n");
    out.push_str(".SH NAME\n");
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    line(&mut out, &format!("{name} - {}", about.trim_end_matches('.')));

    let subs: Vec<&Command> = cmd.get_subcommands().filter(|s| s.get_name() != "help").collect();
    out.push_str(".SH SYNOPSIS\n");
    for (i, sub) in subs.iter().enumerate() {
        if i > 0 {
            out.push_str(".br\n");
        }
        synopsis(&mut out, &format!("{name} {}", sub.get_name()), sub, false);
    }

    out.push_str(".SH DESCRIPTION\n");
    text(&mut out, &cmd.get_long_about().or(cmd.get_about()).map(|a| a.to_string()).unwrap_or_default());

    out.push_str(".SH OPTIONS\n");
    line(&mut out, "These apply to every command.");
    for arg in cmd.get_arguments().filter(|a| shown(a)) {
        option(&mut out, arg);
    }

    out.push_str(".SH COMMANDS\n");
    for sub in &subs {
        let full = format!("{name} {}", sub.get_name());
        out.push_str(&format!(".SS \"{}\"\n", escape(&full)));
        synopsis(&mut out, &full, sub, true);
        out.push_str(".PP\n");
        text(&mut out, &sub.get_long_about().or(sub.get_about()).map(|a| a.to_string()).unwrap_or_default());
        let mut heading: Option<&str> = None;
        let mut first = true;
        for arg in sub.get_arguments().filter(|a| shown(a) && !a.is_global_set()) {
            if first || arg.get_help_heading() != heading {
                heading = arg.get_help_heading();
                first = false;
                out.push_str(&format!(".PP\n\\fI{}:\\fR\n", escape(heading.unwrap_or("Options"))));
            }
            option(&mut out, arg);
        }
        if let Some(after) = sub.get_after_long_help().or(sub.get_after_help()) {
            out.push_str(".PP\n");
            text(&mut out, &after.to_string());
        }
    }

    if let Some(examples) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        out.push_str(".SH EXAMPLES\n");
        let examples = examples.to_string();
        let body = examples.strip_prefix("Examples:\n").unwrap_or(&examples);
        text(&mut out, body);
    }

    out.push_str(".SH SEE ALSO\n");
    out.push_str(".BR ssh (1),\n.BR systemctl (1)\n.PP\n");
    line(
        &mut out,
        "README.md, docs/DEPLOY.md, docs/PROTOCOL.md and SECURITY.md in the source (in /usr/share/doc/holdfast \
         with the Debian package).",
    );
    out
}

/// Whether an argument belongs on the page (clap's own --help and --version are said once).
fn shown(arg: &Arg) -> bool {
    !arg.is_hide_set() && !matches!(arg.get_id().as_str(), "help" | "version")
}

/// Whether an argument takes a value (as opposed to a switch or a counter).
fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

/// The argument as it is written: `--listen HOST[:PORT]`, `-v, --verbose`, `SHELL`.
fn spelling(arg: &Arg, both: bool) -> String {
    let value = arg.get_value_names().and_then(|v| v.first()).map(ToString::to_string);
    let value = value.unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(format!("\\fB\\-{}\\fR", escape(&short.to_string())));
    }
    if let Some(long) = arg.get_long() {
        names.push(format!("\\fB\\-\\-{}\\fR", escape(long)));
    }
    if names.is_empty() {
        return format!("\\fI{}\\fR", escape(&value));
    }
    if !both {
        names.drain(..names.len() - 1);
    }
    let mut s = names.join(", ");
    if takes_value(arg) {
        // An unbreakable space: a flag and its value stay on one line.
        s.push_str(&format!("\\ \\fI{}\\fR", escape(&value)));
    }
    s
}

/// `holdfast server [--config FILE] [--listen HOST[:PORT]] ...`: every option with its value.
fn synopsis(out: &mut String, full: &str, cmd: &Command, own_paragraph: bool) {
    let mut parts = vec![format!("\\fB{}\\fR", escape(full))];
    for arg in cmd.get_arguments().filter(|a| shown(a) && !a.is_global_set()) {
        let repeats = matches!(arg.get_action(), ArgAction::Append | ArgAction::Count);
        let mut s = spelling(arg, false);
        if !arg.is_required_set() {
            s = format!("[{s}]");
        }
        if repeats {
            s.push_str("...");
        }
        parts.push(s);
    }
    if own_paragraph {
        out.push_str(".PP\n");
    }
    // Wrapped by man; a line per part keeps the roff readable.
    out.push_str(&parts.join("\n"));
    out.push('\n');
}

/// One option: its spelling, then its help, default and possible values.
fn option(out: &mut String, arg: &Arg) {
    out.push_str(".TP\n");
    out.push_str(&spelling(arg, true));
    out.push('\n');
    let help = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
    let mut help = help.trim().to_owned();
    let defaults: Vec<String> = arg.get_default_values().iter().map(|d| d.to_string_lossy().into_owned()).collect();
    if takes_value(arg) && !defaults.is_empty() && !arg.is_hide_default_value_set() {
        help.push_str(&format!(" [default: {}]", defaults.join(", ")));
    }
    text(out, &help);
    let values: Vec<_> = arg.get_possible_values().into_iter().filter(|v| !v.is_hide_set()).collect();
    if takes_value(arg) && !values.is_empty() {
        out.push_str(".RS\n");
        for v in values {
            out.push_str(&format!(".TP\n\\fB{}\\fR\n", escape(v.get_name())));
            text(out, &v.get_help().map(|h| h.to_string()).unwrap_or_default());
        }
        out.push_str(".RE\n");
    }
}

/// Help text as roff: prose lines are joined and reflowed by man, a blank line starts a new
/// paragraph, and indented lines (examples, a config file) are a verbatim block.
fn text(out: &mut String, text: &str) {
    let mut verbatim = false;
    let mut after_blank = false;
    for raw in text.lines() {
        let indented = raw.starts_with(' ') || raw.starts_with('\t');
        if raw.trim().is_empty() {
            after_blank = true;
            continue;
        }
        if indented != verbatim {
            out.push_str(if indented { ".RS 2\n.nf\n" } else { ".fi\n.RE\n" });
            if !indented && after_blank {
                out.push_str(".sp\n");
            }
            verbatim = indented;
        } else if after_blank && !verbatim {
            out.push_str(".sp\n");
        } else if after_blank {
            out.push('\n');
        }
        after_blank = false;
        line(out, if indented { raw.strip_prefix("  ").unwrap_or(raw) } else { raw.trim() });
    }
    if verbatim {
        out.push_str(".fi\n.RE\n");
    }
}

/// One line of text, escaped, safe from being read as a request.
fn line(out: &mut String, text: &str) {
    let escaped = escape(text);
    if escaped.starts_with(['.', '\'']) {
        out.push_str("\\&");
    }
    out.push_str(&escaped);
    out.push('\n');
}

/// Text escaped for roff: a backslash prints as one, a hyphen as a hyphen-minus (so that
/// options copied from the page work).
fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

#[cfg(test)]
mod tests;
