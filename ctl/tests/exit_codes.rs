//! The exit codes of the `replctl` binary, one test per code (those that
//! need a running daemon's answer are in tests/tests/ops.rs).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use replctl::error::Exit;
use replica_control::status::{ReasonKind, Role, VolumeStatus};

fn replctl(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_replctl"))
        .args(args)
        .output()
        .expect("run replctl")
}

/// Asserts that `args` end replctl with `code`, its message containing
/// `says`.
fn exits(args: &[&str], code: Exit, says: &str) {
    let out = replctl(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(code.code())),
        "{args:?}: {err}"
    );
    assert!(err.contains(says), "{args:?}: {err}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn help_ends_with_the_exit_codes() {
    let out = replctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit codes:"), "{help}");
    for e in Exit::ALL {
        assert!(
            help.contains(&format!("{}  {}", e.code(), e.summary())),
            "{e:?} missing from {help}"
        );
    }
}

#[test]
fn a_bad_argument_is_a_usage_error() {
    exits(&["status"], Exit::Usage, "--state-dir");
    exits(
        &["failover", "--socket", "/nonexistent", "--point", "soon"],
        Exit::Usage,
        "give `latest` or a recovery point's record sequence",
    );
}

#[test]
fn what_is_not_there_is_not_found() {
    let d = tempfile::tempdir().expect("tmp");
    // No daemon, and none ever published a status there.
    exits(
        &["status", "--state-dir", path(d.path())],
        Exit::NotFound,
        "no daemon answering",
    );
    exits(
        &["resync", "--state-dir", path(d.path())],
        Exit::NotFound,
        "is the daemon running?",
    );
    exits(
        &["points", "--state-dir", path(d.path()), "--volume", "nope"],
        Exit::NotFound,
        "volumes/nope",
    );
}

#[test]
fn overwriting_a_keyring_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let keys = d.path().join("keys.toml");
    std::fs::write(&keys, "precious").expect("w");
    exits(
        &["keys", "generate", "--out", path(&keys)],
        Exit::Refused,
        "refusing to overwrite",
    );
    assert_eq!(std::fs::read_to_string(&keys).expect("r"), "precious");
}

#[test]
fn a_keyring_that_does_not_parse_fails() {
    let d = tempfile::tempdir().expect("tmp");
    let keys = d.path().join("keys.toml");
    std::fs::write(&keys, "active = 1\n").expect("w");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    exits(
        &["keys", "rotate", "--file", path(&keys)],
        Exit::Failed,
        path(&keys),
    );
}

#[test]
fn waiting_on_a_critical_volume_ends_critical() {
    let d = tempfile::tempdir().expect("tmp");
    let mut v = VolumeStatus::new("v", Role::Secondary);
    v.set_reason(ReasonKind::Stopped, "sequence gap");
    v.generation = "aa".into();
    std::fs::write(
        d.path().join(replica_control::status::STATUS_FILE),
        serde_json::to_vec(&vec![v]).expect("json"),
    )
    .expect("w");
    let dir = path(d.path());
    let args = [
        "wait",
        "--state-dir",
        dir,
        "--volume",
        "v",
        "--applied",
        "5",
        "--generation",
        "aa",
        "--timeout",
        "30",
    ];
    exits(&args, Exit::Critical, "is Critical: sequence gap");
}
