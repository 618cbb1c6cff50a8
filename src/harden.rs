//! Process hardening for programs that hold private keys: no core dumps.
//!
//! A core dump (or a debugger attached by another process of the same user) would copy every
//! secret in memory, the static private key and the session keys included, to disk. Call
//! [`disable_core_dumps`] once, early in `main`, before any key is loaded.

use std::io;

/// Stops this process from writing core dumps.
///
/// On unix it sets the `RLIMIT_CORE` soft and hard limits to 0 (the hard limit too, so nothing
/// later in the process can raise it again). On Linux it also clears the "dumpable" flag with
/// `prctl(PR_SET_DUMPABLE, 0)`, which additionally keeps other unprivileged processes of the
/// same user from attaching with `ptrace` and reading memory, and makes `/proc/<pid>/mem` and
/// similar files owned by root. On other systems it does nothing and returns `Ok(())`.
///
/// # Errors
/// The operating system's error if either setting is refused.
pub fn disable_core_dumps() -> io::Result<()> {
    #[cfg(unix)]
    {
        use rustix::process::{setrlimit, Resource, Rlimit};
        setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })?;
        #[cfg(target_os = "linux")]
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    }
    Ok(())
}

/// True when this process cannot write a core dump (`RLIMIT_CORE` is 0, and on Linux the
/// process is not dumpable). Always false on non-unix systems.
pub fn core_dumps_disabled() -> bool {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, Resource};
        let limit_zero = getrlimit(Resource::Core).current == Some(0);
        #[cfg(target_os = "linux")]
        let not_dumpable =
            matches!(rustix::process::dumpable_behavior(), Ok(rustix::process::DumpableBehavior::NotDumpable));
        #[cfg(not(target_os = "linux"))]
        let not_dumpable = true;
        limit_zero && not_dumpable
    }
    #[cfg(not(unix))]
    false
}
