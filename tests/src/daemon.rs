//! `replicad` processes (and the test binaries), and what a daemon
//! publishes: its status, its control socket's answers, its persisted
//! state, journal and recovery point images.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wait_for;

/// Path of the daemon binary built for these tests.
pub fn replicad_bin() -> PathBuf {
    test_bin("replicad-test")
}

/// Path of the `replctl` binary built for these tests.
pub fn replctl_bin() -> PathBuf {
    test_bin("replctl-test")
}

/// A binary of this package (cargo builds them next to the integration
/// test executables' `deps`).
fn test_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test -p replica-tests`",
        bin.display()
    );
    bin
}

/// Sends one line to a daemon's control socket as it is, and returns the
/// answer (for requests the typed client cannot make: another version, an
/// unknown command, malformed JSON).
pub fn control_line(sock: &Path, line: &str) -> replica_control::Response {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    let mut answer = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut answer)
        .expect("read");
    serde_json::from_str(&answer).expect("a response")
}

/// A `replicad` process.
pub struct Daemon {
    child: Option<Child>,
    /// Its stderr log.
    pub log: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
}

impl Daemon {
    /// Starts `replicad <role> --config <config>`.
    pub fn start(role: &str, config: &Path, state_dir: &Path, log: &Path) -> Self {
        Self::start_limited(role, config, state_dir, log, None)
    }

    /// [`Daemon::start`] with at most `nofile` open files (RLIMIT_NOFILE).
    pub fn start_limited(
        role: &str,
        config: &Path,
        state_dir: &Path,
        log: &Path,
        nofile: Option<u64>,
    ) -> Self {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let mut cmd = Command::new(replicad_bin());
        cmd.args([role, "--config"])
            .arg(config)
            .env("REPLICAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: between fork and exec the closure only calls
            // setrlimit, which is async-signal-safe, on a value it owns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().expect("spawn replicad");
        Self {
            child: Some(child),
            log: log.to_owned(),
            state_dir: state_dir.to_owned(),
        }
    }

    /// Starts a target and waits until it listens; returns it and its address.
    pub fn start_target(config: &Path, state_dir: &Path, log: &Path) -> (Self, String) {
        let _ = std::fs::remove_file(state_dir.join("listen.addr"));
        let mut d = Self::start("target", config, state_dir, log);
        let mut addr = String::new();
        wait_for(Duration::from_secs(20), "target to listen", || {
            if let Some(code) = d.try_exit() {
                panic!(
                    "target exited with {code:?} before listening:\n{}",
                    d.log_text()
                );
            }
            match std::fs::read_to_string(state_dir.join("listen.addr")) {
                Ok(a) if !a.is_empty() => {
                    addr = a.trim().to_owned();
                    true
                }
                _ => false,
            }
        });
        (d, addr)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A field of its `/proc/<pid>/status` in its unit (`VmRSS`: KiB,
    /// `Threads`: a count).
    pub fn proc_status(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Exit code if it has exited.
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        c.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Waits for it to exit on its own (panics with its log on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_exit() {
                self.child = None;
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (e.g. SIGHUP).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("signal");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<i32> {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if self.child.is_some() {
            self.wait_exit(Duration::from_secs(30))
        } else {
            None
        }
    }

    /// The status of `volume` ([`volume_status`]).
    pub fn status(&self, volume: &str) -> Option<replicad::status::VolumeStatus> {
        volume_status(&self.state_dir, volume)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the target has published as applied for `volume`: only once any
/// recovery point at that sequence is recorded (unlike `state.json`, which
/// records the applied sequence before the point it belongs to).
pub fn applied_published(state_dir: &Path, volume: &str) -> u64 {
    // The daemon's live answer (its status file may sit on a full disk).
    volume_status(state_dir, volume).map_or(0, |s| s.applied_seq)
}

/// The status of `volume` of the daemon with state directory `state_dir`:
/// its live answer on its control socket, or (once it stopped) its last
/// published `status.json`, whose counters may be up to a second old
/// while it runs.
pub fn volume_status(state_dir: &Path, volume: &str) -> Option<replicad::status::VolumeStatus> {
    let live = replica_control::request(
        &replica_control::default_path(state_dir),
        replica_control::Command::Status,
    )
    .ok()
    .and_then(|r| r.status);
    live.or_else(|| replicad::status::read(state_dir).ok())?
        .into_iter()
        .find(|v| v.volume == volume)
}

/// The target's persisted state of a volume.
pub fn target_state(state_dir: &Path, volume: &str) -> replica_store::state::VolumeState {
    replica_store::state::VolumeState::load(
        &state_dir.join("volumes").join(volume).join("state.json"),
    )
    .expect("state")
}

/// The header of every segment in a target volume's journal, checked
/// (checksums) and in journal order.
pub fn journal_headers(state_dir: &Path, volume: &str) -> Vec<replica_proto::frame::SegmentHeader> {
    let dir = state_dir.join("volumes").join(volume).join("journal");
    replica_store::journal::frames(&dir)
        .expect("journal")
        .into_iter()
        .map(|f| f.header)
        .collect()
}

/// Path of a recovery point image on the file backend.
pub fn point_image(state_dir: &Path, volume: &str, id: u64) -> PathBuf {
    state_dir
        .join("volumes")
        .join(volume)
        .join("points")
        .join(format!("{id:020}.img"))
}
