//! The guard that ends every process a test starts, even when the test passes or panics.
//!
//! A child is started in a process group of its own ([`own_group`], [`own_group_std`]) and
//! owned by a [`Group`] guard, which kills the whole group (SIGKILL) on drop: the child and
//! anything it started without leaving the group (the `holdfast` that `sh -c` runs, the new
//! server a SIGUSR2 upgrade starts, an ssh `ProxyCommand`). Killing only the direct child is not
//! enough: `sh -c 'holdfast server ...'` dies and leaves the server running, re-parented to init
//! with its working directory deleted.
//!
//! CI checks the result: `.ci/run` gives `cargo test` the environment variable [`RUN_ENV`],
//! which every process the suite starts inherits, and after the suite fails if any process
//! still carries it.

/// Set by `.ci/run` for `cargo test`: every process the suite starts inherits it, so a leftover
/// can be found in `/proc/*/environ` after the suite.
pub const RUN_ENV: &str = "HOLDFAST_TEST_RUN";

/// Puts a (tokio) command's child in a process group of its own and kills it if its `Child`
/// is dropped; own the child's group with a [`Group`] as soon as it is spawned.
pub fn own_group(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    cmd.process_group(0).kill_on_drop(true)
}

/// [`own_group`] for a `std::process::Command`.
pub fn own_group_std(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0)
}

/// Owns a process group (started by [`own_group`]): kills every process in it on drop.
pub struct Group(Option<rustix::process::Pid>);

impl Group {
    /// The group of the child `pid` (its leader); `None` (a child already reaped) owns nothing.
    pub fn new(pid: Option<u32>) -> Group {
        Group(pid.and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw))
    }

    /// Kills every process in the group now, once: call it before the child is reaped (until
    /// then the group's id cannot be reused).
    pub fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH once the group is empty: nothing left to do.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}
