//! Failover with the file backend and a ring file: planned (no loss, the
//! source hands over and is demoted), unplanned (latest or a chosen point),
//! and the old source refused afterwards (no split brain).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use replica_control::{send, Command, ErrorCode, PointChoice, Request};
use replica_tests::*;

const VOL: &str = "fo";
const SIZE: usize = 2 << 20;

fn rig(seed: u64) -> Rig {
    let mut r = Rig::new(VOL, SIZE, seed, None, 100, "", 1024, 1024);
    r.start_source(64 << 10, "");
    r
}

fn command(
    dir: &std::path::Path,
    command: Command,
) -> Result<String, replica_control::ControlError> {
    send(
        &replica_control::default_path(dir),
        &Request::new(command),
        Duration::from_secs(120),
    )
    .map(|r| r.message.unwrap_or_default())
}

/// An unplanned failover to `point`.
fn failover(point: Option<PointChoice>) -> Command {
    Command::Failover { point }
}

fn replica(r: &Rig) -> Vec<u8> {
    std::fs::read(r.tstate.join(format!("{VOL}.img"))).expect("replica")
}

fn wait_socket(dir: &std::path::Path) {
    wait_for(Duration::from_secs(20), "control socket", || {
        replica_control::request(&replica_control::default_path(dir), Command::Status).is_ok()
    });
}

#[test]
fn planned_failover_loses_nothing_demotes_the_source_and_refuses_it_afterwards() {
    let mut r = rig(71);
    r.write(200);
    r.src.apply(&Op::Flush);
    r.write(50); // no flush after these: they must arrive all the same
    wait_socket(&r.sstate);
    wait_for(Duration::from_secs(30), "connected", || {
        r.source
            .as_ref()
            .and_then(|s| s.status(VOL))
            .is_some_and(|s| s.connection == replicad::status::Connection::Connected)
    });
    let msg = command(&r.sstate, Command::FailoverPlanned).expect("planned failover");
    assert!(msg.contains("complete"), "{msg}");
    // Zero loss: the replica is the source volume, byte for byte.
    let st = r.target_state();
    let p = st.promoted.as_ref().expect("promoted");
    assert!(p.planned);
    assert_eq!(p.epoch, 2);
    assert_eq!(p.point_seq, r.src.last_seq);
    assert_eq!(st.epoch, 2);
    assert!(
        st.points.iter().any(|x| x.seq == r.src.last_seq),
        "a point at the handover"
    );
    assert!(first_difference(&replica(&r), &r.src.image, &r.src.masked).is_none());
    let ts = r.target.status(VOL).expect("target status");
    assert_eq!(ts.role, replicad::status::Role::Primary);
    // The source stopped by itself, demoted.
    assert_eq!(r.source().wait_exit(Duration::from_secs(30)), Some(0));
    let role = replicad::source::failover::SourceRole::load(&r.sstate).expect("role");
    assert_eq!(role.epoch, 2);
    assert!(role.demoted.is_some());
    // It will not start again as a source of this volume.
    r.start_source(64 << 10, "");
    assert_eq!(r.source().wait_exit(Duration::from_secs(30)), Some(2));
    assert!(r.source().log_text().contains("demoted"));
    // A restarted target is still the primary and refuses any stream.
    r.target.kill9();
    r.restart_target();
    let e = RawClient::connect(&r.env, &r.addr, ("pki", SOURCE_CN), VOL, [1; 16], 2)
        .err()
        .expect("a stream into a promoted volume is refused");
    assert!(e.contains("promoted"), "{e}");
    assert!(first_difference(&replica(&r), &r.src.image, &r.src.masked).is_none());
}

#[test]
fn unplanned_failover_to_the_latest_state_and_the_old_source_is_demoted_on_return() {
    let mut r = rig(72);
    r.write(150);
    r.src.apply(&Op::Flush);
    r.write(30);
    r.drain_and_check();
    let last = r.src.last_seq;
    // The source host is gone.
    r.source().kill9();
    wait_socket(&r.tstate);
    let msg = command(&r.tstate, failover(Some(PointChoice::Latest))).expect("failover");
    assert!(msg.contains("failed over"), "{msg}");
    let st = r.target_state();
    let p = st.promoted.as_ref().expect("promoted");
    assert!(!p.planned);
    assert_eq!(p.point_seq, last, "latest = every record journaled");
    assert_eq!(st.epoch, 2);
    assert!(first_difference(&replica(&r), &r.src.image, &r.src.masked).is_none());
    // A second failover is refused (code refused; replctl exits 4).
    let e = command(&r.tstate, failover(None)).expect_err("a second failover");
    assert_eq!(e.daemon_code(), Some(ErrorCode::Refused), "{e}");
    assert!(e.to_string().contains("already failed over"), "{e}");
    let out = std::process::Command::new(replctl_bin())
        .args(["failover", "--state-dir"])
        .arg(&r.tstate)
        .output()
        .expect("run replctl");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // The old source comes back (epoch 1): refused, demoted, stopped.
    r.start_source(64 << 10, "");
    assert_eq!(r.source().wait_exit(Duration::from_secs(60)), Some(3));
    let log = r.source().log_text();
    assert!(log.contains("demoted"), "{log}");
    let role = replicad::source::failover::SourceRole::load(&r.sstate).expect("role");
    assert!(role.demoted.is_some());
    // Nothing it had was applied after the failover.
    assert!(first_difference(&replica(&r), &r.src.image, &r.src.masked).is_none());
}

#[test]
fn unplanned_failover_to_an_older_point_rolls_the_replica_back() {
    let mut r = rig(73);
    r.write(100);
    r.src.apply(&Op::Flush);
    let first_point = r.src.last_seq;
    r.write(100);
    r.src.apply(&Op::Flush);
    r.drain_and_check();
    r.source().kill9();
    wait_socket(&r.tstate);
    let e = command(&r.tstate, failover(Some(PointChoice::Seq(12345678))))
        .expect_err("not a recovery point");
    assert_eq!(e.daemon_code(), Some(ErrorCode::NotFound), "{e}");
    let msg = command(&r.tstate, failover(Some(PointChoice::Seq(first_point)))).expect("failover");
    assert!(msg.contains(&format!("record {first_point}")), "{msg}");
    let (want, mask) = &r.src.points[&first_point];
    assert!(first_difference(&replica(&r), want, mask).is_none());
    assert_eq!(
        r.target_state().promoted.expect("promoted").point_seq,
        first_point
    );
}

/// `replctl failover --planned` on the source, its output captured.
fn spawn_planned(r: &Rig) -> Child {
    std::process::Command::new(replctl_bin())
        .args(["failover", "--planned", "--state-dir"])
        .arg(&r.sstate)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn replctl")
}

/// Waits until one of `children` exits (panics after `timeout`); returns
/// it, taken out of `children`, with its output.
fn first_to_exit(children: &mut Vec<Child>, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        let done = children
            .iter_mut()
            .position(|c| c.try_wait().expect("wait").is_some());
        if let Some(i) = done {
            return children.remove(i).wait_with_output().expect("output");
        }
        assert!(
            Instant::now() < deadline,
            "no replctl ended within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_planned_failover_while_one_runs_is_refused_with_exit_code_4() {
    let mut r = rig(74);
    r.write(100);
    r.src.apply(&Op::Flush);
    r.drain_and_check();
    wait_for(Duration::from_secs(30), "connected", || {
        r.source
            .as_ref()
            .and_then(|s| s.status(VOL))
            .is_some_and(|s| s.connection == replicad::status::Connection::Connected)
    });
    // The target stops answering (the connection stays up): a planned
    // failover waits for it to take over.
    r.target.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut both = vec![spawn_planned(&r), spawn_planned(&r)];
    // Whichever comes second is refused at once; the first waits.
    let out = first_to_exit(&mut both, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "refused: {err}");
    assert!(
        err.contains("a planned failover is already under way"),
        "{err}"
    );
    assert!(
        both[0].try_wait().expect("wait").is_none(),
        "the first failover waits for the target"
    );
    // The target answers again: the first failover completes.
    r.target.signal(nix::sys::signal::Signal::SIGCONT);
    let out = first_to_exit(&mut both, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", r.logs());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("complete"),
        "{out:?}"
    );
    let p = r.target_state().promoted.expect("promoted");
    assert!(p.planned);
    assert_eq!(p.point_seq, r.src.last_seq);
}
