//! Dynamic forwarding's server side: where clients may ask the server to connect (SOCKS5
//! CONNECT, `holdfast client --socks`). Default deny: a destination is reachable only through a
//! `--allow-connect` rule, for every allowed key or for one client by its allow-list name.
//!
//! A rule is `[CLIENT@]HOST:PORT`. HOST is a name (`db.internal`), a name suffix
//! (`*.internal`), `*` (any), an address or a CIDR block (`10.0.0.0/8`, `[fd00::]/8`); PORT is
//! a number, a range (`8000-8999`) or `*`. A name rule matches the name the client asked for (the
//! server resolves it, so clients reach names that only the server knows); an address or CIDR
//! rule matches the address the server would connect to, after resolution, so a name cannot
//! smuggle a client into a network no rule gives it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::TunnelError;

/// Longest host name in a connect request.
pub const MAX_HOST: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Any,
    Name(String),
    Suffix(String),
    Net(IpNet),
}

/// One `--allow-connect` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRule {
    client: Option<String>,
    host: Host,
    ports: (u16, u16),
}

impl fmt::Display for ConnectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = &self.client {
            write!(f, "{c}@")?;
        }
        match &self.host {
            Host::Any => write!(f, "*")?,
            Host::Name(n) => write!(f, "{n}")?,
            Host::Suffix(s) => write!(f, "*.{s}")?,
            // IPv6 in brackets, as the rule is written: `[::1]:22`, `[fd00::]/8:443`.
            Host::Net(n) if n.prefix_len() == n.max_prefix_len() && n.addr().is_ipv6() => write!(f, "[{}]", n.addr())?,
            Host::Net(n) if n.addr().is_ipv6() => write!(f, "[{}]/{}", n.addr(), n.prefix_len())?,
            Host::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr())?,
            Host::Net(n) => write!(f, "{n}")?,
        }
        match self.ports {
            (0, u16::MAX) => write!(f, ":*"),
            (a, b) if a == b => write!(f, ":{a}"),
            (a, b) => write!(f, ":{a}-{b}"),
        }
    }
}

impl std::str::FromStr for ConnectRule {
    type Err = TunnelError;

    /// Parses `[CLIENT@]HOST:PORT`.
    fn from_str(spec: &str) -> Result<Self, TunnelError> {
        let bad = TunnelError::Malformed("connect rule (want [CLIENT@]HOST:PORT, PORT a number, N-M or *)");
        // The last '@': a host has none, a client name may.
        let (client, rest) = match spec.rsplit_once('@') {
            Some((c, r)) if !c.is_empty() => (Some(c.to_string()), r),
            Some(_) => return Err(bad),
            None => (None, spec),
        };
        let (host, port) = rest.rsplit_once(':').ok_or(TunnelError::Malformed("connect rule (no :PORT)"))?;
        let ports = match port {
            "*" => (0, u16::MAX),
            p => match p.split_once('-') {
                Some((a, b)) => (a.parse().map_err(|_| bad_port())?, b.parse().map_err(|_| bad_port())?),
                None => {
                    let n = p.parse().map_err(|_| bad_port())?;
                    (n, n)
                }
            },
        };
        if ports.0 > ports.1 {
            return Err(bad_port());
        }
        let host = host.trim_start_matches('[').replace("]/", "/");
        let host = host.trim_end_matches(']');
        let host = if host == "*" {
            Host::Any
        } else if let Ok(net) = host.parse::<IpNet>() {
            Host::Net(net.trunc())
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Net(IpNet::from(ip))
        } else if let Some(suffix) = host.strip_prefix("*.") {
            check_host(suffix).map_err(|_| bad)?;
            Host::Suffix(suffix.to_ascii_lowercase())
        } else {
            check_host(host).map_err(|_| bad)?;
            Host::Name(host.to_ascii_lowercase())
        };
        Ok(ConnectRule { client, host, ports })
    }
}

fn bad_port() -> TunnelError {
    TunnelError::Malformed("connect rule port (want a number 0-65535, N-M with N <= M, or *)")
}

/// Checks a host name or address as sent in a connect request: 1 to 255 bytes of letters,
/// digits, `.`, `-`, `_` and `:` (for IPv6 addresses).
///
/// # Errors
/// [`TunnelError::Malformed`].
pub fn check_host(host: &str) -> Result<(), TunnelError> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':');
    if host.is_empty() || host.len() > MAX_HOST || !host.bytes().all(ok) {
        return Err(TunnelError::Malformed("connect host"));
    }
    Ok(())
}

impl ConnectRule {
    /// The client this rule is limited to (`CLIENT@`), if any.
    pub fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }

    fn for_client(&self, client: Option<&str>) -> bool {
        self.client.as_deref().is_none_or(|c| Some(c) == client)
    }

    fn port(&self, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port)
    }

    /// True if this rule gives `client` the name `host` itself (any address it resolves to).
    fn gives_name(&self, client: Option<&str>, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.for_client(client)
            && self.port(port)
            && match &self.host {
                Host::Any => true,
                Host::Name(n) => *n == host,
                Host::Suffix(s) => host.strip_suffix(s.as_str()).is_some_and(|p| p.ends_with('.')),
                Host::Net(_) => false,
            }
    }

    /// True if this rule gives `client` the address `addr` (for `--allow-listen`, where only
    /// address rules can match).
    pub fn gives(&self, client: Option<&str>, addr: SocketAddr) -> bool {
        self.gives_addr(client, addr)
    }

    /// True if this rule gives `client` the address `addr`. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) reaches the IPv4 address, so it is matched as that: `[::]/0` does not
    /// give `::ffff:127.0.0.1`, and `127.0.0.0/8` does.
    fn gives_addr(&self, client: Option<&str>, addr: SocketAddr) -> bool {
        self.for_client(client)
            && self.port(addr.port())
            && match &self.host {
                Host::Any => true,
                Host::Net(n) => n.contains(&addr.ip().to_canonical()),
                _ => false,
            }
    }

    /// True if this is an address or CIDR rule.
    fn is_net(&self) -> bool {
        matches!(self.host, Host::Net(_))
    }
}

/// What the rules decide about a connect request before any name is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No rule can give it: refused without a look-up (status 1).
    Refuse,
    /// An address (the host was an IP literal, never looked up) that the rules give.
    Addr(SocketAddr),
    /// A name to look up. `by_name`: a name rule gives the name itself, so every address it
    /// resolves to is allowed; otherwise only addresses that address rules give are, and every
    /// failure (no such name, a look-up that fails or times out) is answered as "not allowed",
    /// so that the answer does not tell whether a name exists.
    Lookup {
        /// A name rule matched.
        by_name: bool,
    },
}

/// Decides `host:port` for `client` (its allow-list name) as far as the rules can without a
/// look-up: an IP literal is decided here, and a name that neither a name rule nor an address
/// rule for this client and port could give is refused here.
pub fn plan(rules: &[ConnectRule], client: Option<&str>, host: &str, port: u16) -> Plan {
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, port);
        return if rules.iter().any(|r| r.gives_addr(client, addr)) { Plan::Addr(addr) } else { Plan::Refuse };
    }
    if rules.iter().any(|r| r.gives_name(client, host, port)) {
        return Plan::Lookup { by_name: true };
    }
    if rules.iter().any(|r| r.is_net() && r.for_client(client) && r.port(port)) {
        return Plan::Lookup { by_name: false };
    }
    Plan::Refuse
}

/// The addresses of a looked-up name that the rules give `client`: all of them if a name rule
/// gave the name (`by_name`), else those an address rule gives.
pub fn allowed_of(
    rules: &[ConnectRule],
    client: Option<&str>,
    by_name: bool,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> Vec<SocketAddr> {
    addrs.into_iter().filter(|a| by_name || rules.iter().any(|r| r.gives_addr(client, *a))).collect()
}

/// Resolves `host:port` for `client` (its allow-list name) and keeps the addresses the rules
/// give it. `Ok(empty)` if none: the destination is not allowed. IP literals are not looked up,
/// and neither are names no rule could give. The server bounds its look-ups (count and time)
/// through [`super::Services`]; this function, for other uses, does not.
///
/// # Errors
/// The resolver's error, only when a name rule gave the name (otherwise a failed look-up is
/// `Ok(empty)`, as a name that resolves outside every rule: the answer does not tell them apart).
pub async fn allowed_addrs(
    rules: &[ConnectRule],
    client: Option<&str>,
    host: &str,
    port: u16,
) -> std::io::Result<Vec<SocketAddr>> {
    match plan(rules, client, host, port) {
        Plan::Refuse => Ok(Vec::new()),
        Plan::Addr(a) => Ok(vec![a]),
        Plan::Lookup { by_name } => match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => Ok(allowed_of(rules, client, by_name, addrs)),
            Err(e) if by_name => Err(e),
            Err(_) => Ok(Vec::new()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> ConnectRule {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_and_print() {
        for s in [
            "*:*",
            "laptop@db.internal:5432",
            "alice@home@db:1",
            "*.internal:8000-8999",
            "10.0.0.0/8:443",
            "127.0.0.1:22",
        ] {
            assert_eq!(rule(s).to_string(), s);
        }
        // IPv6 is shown in brackets, as a listen request and `--allow-listen` write it.
        assert_eq!(rule("[::1]:22").to_string(), "[::1]:22");
        assert_eq!(rule("::1:22").to_string(), "[::1]:22");
        assert_eq!(rule("[fd00::]/8:22").to_string(), "[fd00::]/8:22");
        for s in ["[::1]:22", "[fd00::]/8:22"] {
            assert_eq!(rule(&rule(s).to_string()), rule(s), "{s} does not read back");
        }
        for bad in ["", "host", "@h:1", "h:x", "h:9-1", "h:70000", "a/b:1", "h\u{1b}:1"] {
            assert!(bad.parse::<ConnectRule>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn names_suffixes_and_networks_match_as_documented() {
        let r = rule("*.internal:443");
        assert!(r.gives_name(None, "db.INTERNAL", 443));
        assert!(!r.gives_name(None, "evilinternal", 443) && !r.gives_name(None, "internal", 443));
        assert!(!r.gives_name(None, "db.internal", 444));
        let n = rule("10.0.0.0/8:*");
        assert!(n.gives_addr(None, "10.1.2.3:9".parse().unwrap()));
        assert!(!n.gives_addr(None, "11.1.2.3:9".parse().unwrap()));
        assert!(!n.gives_name(None, "10.1.2.3", 9), "an address rule must match the resolved address");
        let mine = rule("laptop@*:22");
        assert!(mine.gives_name(Some("laptop"), "x", 22));
        assert!(!mine.gives_name(Some("other"), "x", 22) && !mine.gives_name(None, "x", 22));
    }

    #[tokio::test]
    async fn a_name_cannot_reach_a_network_no_rule_gives() {
        let rules = [rule("10.0.0.0/8:*")];
        assert!(allowed_addrs(&rules, None, "localhost", 80).await.unwrap().is_empty());
        let rules = [rule("127.0.0.0/8:80")];
        let got = allowed_addrs(&rules, None, "127.0.0.1", 80).await.unwrap();
        assert_eq!(got, vec!["127.0.0.1:80".parse().unwrap()]);
        assert!(allowed_addrs(&rules, None, "127.0.0.1", 81).await.unwrap().is_empty());
    }

    #[test]
    fn mapped_ipv6_addresses_match_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:22".parse().unwrap();
        assert!(!rule("[::]/0:*").gives_addr(None, mapped), "an IPv6 rule gave an IPv4 address");
        assert!(!rule("[::ffff:0:0]/96:*").gives_addr(None, mapped), "an IPv6 rule gave an IPv4 address");
        assert!(rule("127.0.0.0/8:22").gives_addr(None, mapped));
        assert!(!rule("10.0.0.0/8:22").gives_addr(None, mapped));
        assert!(rule("[::]/0:*").gives_addr(None, "[::1]:22".parse().unwrap()));
        // A listen request for the mapped address is judged alike.
        assert!(!rule("[::]/0:*").gives(None, mapped));
        assert_eq!(plan(&[rule("[::]/0:*")], None, "::ffff:127.0.0.1", 22), Plan::Refuse);
    }

    #[test]
    fn names_only_address_rules_could_cover_get_one_answer() {
        let rules = [rule("10.0.0.0/8:5432")];
        // Literals are decided without a look-up; names are looked up, and refused alike
        // whether they do not exist or resolve elsewhere.
        assert_eq!(plan(&rules, None, "10.1.2.3", 5432), Plan::Addr("10.1.2.3:5432".parse().unwrap()));
        assert_eq!(plan(&rules, None, "127.0.0.1", 5432), Plan::Refuse);
        assert_eq!(plan(&rules, None, "db.example", 5432), Plan::Lookup { by_name: false });
        assert_eq!(plan(&rules, None, "db.example", 22), Plan::Refuse, "no rule for the port: no look-up");
        assert_eq!(plan(&[rule("*.internal:*")], None, "db.example", 22), Plan::Refuse);
        assert_eq!(plan(&[rule("*.internal:*")], None, "db.internal", 22), Plan::Lookup { by_name: true });
        let outside = ["127.0.0.1:5432".parse().unwrap()];
        assert!(allowed_of(&rules, None, false, outside).is_empty());
        assert_eq!(allowed_of(&rules, None, true, outside), outside.to_vec());
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_not_allowed_either() {
        let rules = [rule("10.0.0.0/8:5432")];
        let missing = allowed_addrs(&rules, None, "no-such-name.invalid", 5432).await;
        assert!(matches!(missing, Ok(ref a) if a.is_empty()), "{missing:?}");
    }
}
