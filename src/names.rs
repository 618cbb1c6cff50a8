//! Names shared by the allow-list ([`crate::keys`]) and the tunnel ([`crate::tunnel`]): which
//! service names and client names are valid. It sits low in the house so that `keys` need not
//! import `tunnel`.

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME: usize = 64;

/// Longest client name (the name on an allow-list line), in bytes.
pub const MAX_CLIENT_NAME: usize = 128;

/// True if `name` is a valid service name: 1 to [`MAX_SERVICE_NAME`] bytes of `A-Z a-z 0-9 . _ -`.
pub fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// What is wrong with `name` as a client name, if anything. A client name is 1 to
/// [`MAX_CLIENT_NAME`] bytes without control characters, and a word of it may not contain `=`
/// (on an allow-list line such a word is an option).
pub fn client_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("the name is empty")
    } else if name.len() > MAX_CLIENT_NAME {
        Some("the name is longer than 128 bytes")
    } else if name.chars().any(char::is_control) {
        Some("the name has a control character")
    } else if name.contains('=') {
        Some("the name has a '=' (a word with '=' is an option, and options come after the name)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_client_names() {
        for ok in ["ssh", "db-1.internal", "a_b", &"x".repeat(MAX_SERVICE_NAME)] {
            assert!(is_service_name(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "d\u{1b}b", "é", &"x".repeat(MAX_SERVICE_NAME + 1)] {
            assert!(!is_service_name(bad), "{bad:?}");
        }
        for ok in ["laptop", "alice laptop (home)", "café", "alice@home", &"x".repeat(MAX_CLIENT_NAME)] {
            assert_eq!(client_name_problem(ok), None, "{ok}");
        }
        for bad in ["", "a\u{1b}b", "a\tb", "x=y", &"x".repeat(MAX_CLIENT_NAME + 1)] {
            assert!(client_name_problem(bad).is_some(), "{bad:?}");
        }
    }
}
