//! replctl: the dm-replica command-line tool. The command line is
//! [`cli`], what each command does [`cmd`], its errors and exit codes
//! [`error`]; the rest is the work itself, shared with tests.

pub mod certs;
pub mod cli;
pub mod cmd;
pub mod dev;
pub mod error;
pub mod keys;
pub mod progress;
pub mod protect;
pub mod start;
pub mod verify;
pub mod wait;

/// The `replctl` program: runs the command line's command, says why it
/// failed if it did, and ends with its [`error::Exit`] code.
pub fn main() -> std::process::ExitCode {
    // Output piped into `head` or `grep -q`: a closed pipe ends replctl
    // quietly, as it does any Unix tool, instead of a panic on EPIPE.
    // SAFETY: called first thing, before any other thread exists; SIG_DFL
    // is a valid disposition for SIGPIPE and no handler is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match cmd::run(cli::parse()) {
        Ok(()) => error::Exit::Ok.into(),
        Err(e) => {
            eprintln!("replctl: {e}");
            e.exit().into()
        }
    }
}
