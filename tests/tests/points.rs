//! `replctl point list/open/close`: through the running target daemon,
//! which holds the replica (the backend's start-up recovery ran there,
//! once), or, when no daemon answers, on the replica opened directly — and
//! replctl says so.
//!
//! What shows which process opened the replica: opening the file backend
//! runs its start-up recovery, which deletes partial point images (`*.tmp`,
//! what a crash leaves while a point is being written). A partial image
//! made while the daemon runs stands for a point the daemon is writing at
//! that moment: it survives the point commands only if nothing opened the
//! replica a second time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use replica_tests::*;

const VOL: &str = "pt";
const SIZE: usize = 2 << 20;

/// What the backend logs each time a replica is opened.
const OPENED: &str = "replica opened (start-up recovery done)";

/// What replctl says when it opens the replica itself.
const DIRECTLY: &str = "opening the replica directly";

/// A target with recovery points (the source killed once they are there).
fn rig_with_points(seed: u64) -> Rig {
    let mut r = Rig::new(VOL, SIZE, seed, None, 100, "", 1024, 1024);
    r.start_source(64 << 10, "");
    r.write(60);
    r.src.apply(&Op::Flush);
    r.write(60);
    r.src.apply(&Op::Flush);
    r.drain_and_check();
    r.source().kill9();
    r
}

fn replctl_point(r: &Rig, args: &[&str]) -> Output {
    Command::new(replctl_bin())
        .arg("point")
        .args(&args[..1])
        .arg("--config")
        .arg(&r.tcfg)
        .args(["--volume", VOL])
        .args(&args[1..])
        .output()
        .expect("run replctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a point command that must succeed and returns its output.
fn ok(r: &Rig, args: &[&str]) -> Output {
    let o = replctl_point(r, args);
    assert_eq!(o.status.code(), Some(0), "replctl point {args:?}: {o:?}");
    o
}

/// A partial point image, as a point being written leaves it.
fn partial_image(r: &Rig) -> PathBuf {
    let p =
        point_image(&r.tstate, VOL, 1).with_file_name(format!("{:020}.tmp", 999_999_999_999u64));
    std::fs::write(&p, b"half a point").expect("partial image");
    p
}

/// The recorded points (id, seq), oldest first.
fn recorded(r: &Rig) -> Vec<(u64, u64)> {
    r.target_state()
        .points
        .iter()
        .map(|p| (p.id, p.seq))
        .collect()
}

fn listed(o: &Output) -> Vec<u64> {
    stdout(o)
        .lines()
        .map(|l| l.trim().parse().expect("a point id per line"))
        .collect()
}

fn check_point_content(r: &Rig, path: &Path, seq: u64) {
    let (want, mask) = &r.src.points[&seq];
    let got = std::fs::read(path).expect("read the opened point");
    assert!(
        first_difference(&got, want, mask).is_none(),
        "{} is not the volume as of record {seq}",
        path.display()
    );
}

#[test]
fn point_commands_go_through_the_running_target_daemon_which_opened_the_replica_once() {
    let r = rig_with_points(81);
    let points = recorded(&r);
    assert!(points.len() >= 2, "{points:?}");
    let partial = partial_image(&r);

    let o = ok(&r, &["list"]);
    assert!(!stderr(&o).contains(DIRECTLY), "{o:?}");
    assert_eq!(
        listed(&o),
        points.iter().map(|p| p.0).collect::<Vec<_>>(),
        "the backend's snapshots are the recorded points"
    );

    let (id, seq) = points[0];
    let id_arg = id.to_string();
    let o = ok(&r, &["open", "--point", &id_arg]);
    assert!(!stderr(&o).contains(DIRECTLY), "{o:?}");
    let opened = PathBuf::from(stdout(&o).trim());
    assert_eq!(opened, point_image(&r.tstate, VOL, id));
    check_point_content(&r, &opened, seq);

    // A writable copy: separate from the point, gone once closed.
    let o = ok(&r, &["open", "--point", &id_arg, "--writable"]);
    let copy = PathBuf::from(stdout(&o).trim());
    assert_ne!(copy, opened);
    check_point_content(&r, &copy, seq);
    std::fs::write(&copy, b"test failover writes here").expect("write the copy");
    check_point_content(&r, &opened, seq);
    ok(&r, &["close", "--point", &id_arg, "--writable"]);
    assert!(!copy.exists(), "the writable copy is discarded");
    let o = ok(&r, &["close", "--point", &id_arg]);
    assert!(!stderr(&o).contains(DIRECTLY), "{o:?}");

    // The daemon's answers keep their codes: no such point is 3.
    let o = replctl_point(&r, &["open", "--point", "123456789"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(stderr(&o).contains("no recovery point 123456789"), "{o:?}");
    assert!(!stderr(&o).contains(DIRECTLY), "{o:?}");

    // Nothing opened the replica again: the partial image is still there,
    // and the daemon opened it once, at start-up.
    assert!(
        partial.exists(),
        "a second open of the replica ran the start-up recovery"
    );
    let log = r.target.log_text();
    assert_eq!(log.matches(OPENED).count(), 1, "{log}");
}

#[test]
fn with_no_target_daemon_point_commands_open_the_replica_directly_and_say_so() {
    let mut r = rig_with_points(82);
    let points = recorded(&r);
    assert!(!points.is_empty());
    assert_eq!(r.target.stop(), Some(0));
    let partial = partial_image(&r);

    let o = ok(&r, &["list"]);
    let sock = replica_control::default_path(&r.tstate);
    assert!(
        stderr(&o).contains(&format!(
            "no target daemon answers on {}: {DIRECTLY}",
            sock.display()
        )),
        "{o:?}"
    );
    assert_eq!(listed(&o), points.iter().map(|p| p.0).collect::<Vec<_>>());
    // It opened the replica itself: the start-up recovery ran here.
    assert!(!partial.exists(), "replctl did not open the replica");

    let (id, seq) = points[points.len() - 1];
    let o = ok(&r, &["open", "--point", &id.to_string()]);
    assert!(stderr(&o).contains(DIRECTLY), "{o:?}");
    check_point_content(&r, Path::new(stdout(&o).trim()), seq);
    let o = replctl_point(&r, &["open", "--point", "123456789"]);
    assert_eq!(o.status.code(), Some(3), "no such point: {o:?}");

    // A daemon that starts again is asked again (and it opens the replica
    // once more, at its own start).
    r.restart_target();
    wait_for(Duration::from_secs(20), "control socket", || {
        replica_control::request(&sock, replica_control::Command::Status).is_ok()
    });
    let o = ok(&r, &["list"]);
    assert!(!stderr(&o).contains(DIRECTLY), "{o:?}");
    assert_eq!(listed(&o), points.iter().map(|p| p.0).collect::<Vec<_>>());
}
