//! Failover with the file backend and a ring file: planned (no loss, the
//! source hands over and is demoted), unplanned (latest or a chosen point),
//! the old source refused afterwards (no split brain), and both while the
//! replica's disk is full (unplanned does not wait for it, planned is
//! refused at once).

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

/// A rig whose replica is a sparse file on the tmpfs `mnt`, as a thin
/// device is thinly provisioned: once the tmpfs is full, writes to parts of
/// the replica never written fail with ENOSPC (state, journal and points
/// stay in the test directory). Returns the replica's path.
fn rig_with_thin_replica(mnt: &Tmpfs, seed: u64) -> (Rig, std::path::PathBuf) {
    rig_with_thin_replica_and(mnt, seed, "")
}

/// [`rig_with_thin_replica`] with `source_extra` in the source's
/// configuration.
fn rig_with_thin_replica_and(
    mnt: &Tmpfs,
    seed: u64,
    source_extra: &str,
) -> (Rig, std::path::PathBuf) {
    let mut r = Rig::new(VOL, SIZE, seed, None, 100, "", 1024, 1024);
    r.target.kill9();
    let replica = mnt.path().join(format!("{VOL}.img"));
    // Created with its size, no space reserved (the file backend reserves
    // the space of a replica it creates itself).
    std::fs::File::create(&replica)
        .and_then(|f| f.set_len(SIZE as u64))
        .expect("sparse replica");
    let text = std::fs::read_to_string(&r.tcfg).expect("cfg").replace(
        &r.tstate.join(format!("{VOL}.img")).display().to_string(),
        &replica.display().to_string(),
    );
    std::fs::write(&r.tcfg, text).expect("cfg");
    r.restart_target();
    r.start_source(64 << 10, source_extra);
    (r, replica)
}

/// Fills the file system of `dir` (a tmpfs); returns the file that does.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    for chunk in [64 << 10, 4 << 10] {
        while f.write_all(&vec![0xa5u8; chunk]).is_ok() {}
    }
    path
}

/// `n` writes of 16 KiB from byte `start`, one after the other.
fn write_run(r: &mut Rig, start: u64, n: u64) {
    for i in 0..n {
        r.src.apply(&Op::Write {
            sector: (start >> 9) + i * 32,
            len: 16 << 10,
            ok: true,
        });
    }
}

/// Writes the first 512 KiB and flushes; waits until it is applied and
/// returns the flush's record.
fn applied_first_region(r: &mut Rig) -> u64 {
    write_run(r, 0, 32);
    r.src.apply(&Op::Flush);
    let flushed = r.src.last_seq;
    r.wait_applied(flushed, Duration::from_secs(60));
    flushed
}

/// Waits until the target's applier retries a write that failed for lack
/// of space, with records after `applied` journaled.
fn wait_retrying(r: &Rig, applied: u64) {
    wait_for(
        Duration::from_secs(60),
        "the applier to retry a full replica disk",
        || {
            r.target.status(VOL).is_some_and(|s| {
                s.durable_seq > applied
                    && s.reasons.iter().any(|x| {
                        x.kind == replicad::status::ReasonKind::Replica
                            && x.message.contains("No space left")
                    })
            })
        },
    );
}

#[test]
fn an_unplanned_failover_preempts_an_applier_retrying_a_full_replica_disk() {
    let mnt = Tmpfs::mount("4m");
    let (mut r, replica) = rig_with_thin_replica(&mnt, 75);
    let applied = applied_first_region(&mut r);
    let filler = fill(mnt.path());
    // The second MiB, never written before: none of it fits now. More
    // segments than the applier's inbox holds: the connection waits on it.
    write_run(&mut r, 1 << 20, 64);
    wait_retrying(&r, applied);
    // The source host is gone; the operator fails over, and it does not
    // wait for the replica's disk.
    r.source().kill9();
    let started = Instant::now();
    let msg = send(
        &replica_control::default_path(&r.tstate),
        &Request::new(failover(Some(PointChoice::Latest))),
        Duration::from_secs(60),
    )
    .map(|x| x.message.unwrap_or_default())
    .unwrap_or_else(|e| panic!("failover: {e}\n{}", r.logs()));
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(msg.contains(&format!("record {applied}")), "{msg}");
    // Promoted as applied: exactly the state at the flush, nothing of what
    // could not be written.
    let st = r.target_state();
    let p = st.promoted.as_ref().expect("promoted");
    assert!(!p.planned);
    assert_eq!(p.point_seq, applied);
    assert_eq!(st.applied_seq, applied);
    let (want, mask) = r.src.points[&applied].clone();
    let got = || std::fs::read(&replica).expect("replica");
    assert!(first_difference(&got(), &want, &mask).is_none());
    // The status says where, and which records received are not in it.
    let received = journal_headers(&r.tstate, VOL)
        .iter()
        .map(|h| h.last_seq)
        .max()
        .expect("journaled segments");
    assert!(received > applied);
    let ts = r.target.status(VOL).expect("target status");
    assert_eq!(ts.role, replicad::status::Role::Primary);
    assert_eq!(ts.applied_seq, applied);
    let promoted = ts
        .reasons
        .iter()
        .find(|x| x.kind == replicad::status::ReasonKind::Promoted)
        .unwrap_or_else(|| panic!("{:?}", ts.reasons));
    assert!(
        promoted
            .message
            .contains(&format!("failed over at record {applied} "))
            && promoted.message.contains(&format!(
                "records {}..={received} received are not in it",
                applied + 1
            )),
        "{}",
        promoted.message
    );
    // Applying has stopped: with space back, nothing journaled is applied,
    // neither by the target's last drain when it stops nor after a restart.
    std::fs::remove_file(&filler).expect("remove filler");
    assert_eq!(r.target.stop(), Some(0));
    assert!(first_difference(&got(), &want, &mask).is_none());
    r.restart_target();
    wait_socket(&r.tstate);
    assert_eq!(r.target_state().applied_seq, applied);
    assert!(first_difference(&got(), &want, &mask).is_none());
}

#[test]
fn a_planned_failover_while_the_replica_cannot_be_written_fails_at_once_and_blames_nothing() {
    let mnt = Tmpfs::mount("4m");
    let (mut r, replica) = rig_with_thin_replica(&mnt, 76);
    let applied = applied_first_region(&mut r);
    let filler = fill(mnt.path());
    // A few writes the replica's disk has no room for (all of them fit in
    // the applier's inbox: the target has every record durable).
    write_run(&mut r, 1 << 20, 4);
    let last = r.src.last_seq;
    wait_retrying(&r, applied);
    wait_for(Duration::from_secs(30), "every record durable", || {
        r.target.status(VOL).is_some_and(|s| s.durable_seq == last)
    });
    let started = Instant::now();
    let e = command(&r.sstate, Command::FailoverPlanned).expect_err("refused");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("cannot be written"), "{e}");
    // Not promoted, and a full disk is no reason for Critical.
    let st = r.target_state();
    assert!(st.promoted.is_none());
    assert!(st.critical.is_none(), "{:?}", st.critical);
    let ts = r.target.status(VOL).expect("target status");
    assert_ne!(
        ts.health,
        replicad::status::Health::Critical,
        "{:?}",
        ts.reasons
    );
    // Space comes back: every record is applied, and the planned failover
    // goes through (from the same last record).
    std::fs::remove_file(&filler).expect("remove filler");
    r.wait_applied(last, Duration::from_secs(60));
    let msg = command(&r.sstate, Command::FailoverPlanned)
        .unwrap_or_else(|e| panic!("planned failover: {e}\n{}", r.logs()));
    assert!(msg.contains("complete"), "{msg}");
    let p = r.target_state().promoted.expect("promoted");
    assert!(p.planned);
    assert_eq!(p.point_seq, last);
    let got = std::fs::read(&replica).expect("replica");
    assert!(first_difference(&got, &r.src.image, &r.src.masked).is_none());
}

#[test]
fn a_reload_that_removes_the_source_while_the_applier_retries_ends_its_session_at_once() {
    use replicad::status::{Connection, Health};
    let mnt = Tmpfs::mount("4m");
    let (mut r, _replica) =
        rig_with_thin_replica_and(&mnt, 77, "[network]\npeer_timeout_secs = 3\n");
    let applied = applied_first_region(&mut r);
    let _filler = fill(mnt.path());
    // More than the applier's inbox holds: the connection waits on it.
    write_run(&mut r, 1 << 20, 64);
    wait_retrying(&r, applied);
    let text = std::fs::read_to_string(&r.tcfg).expect("cfg").replace(
        &format!("allowed_sources = [\"{SOURCE_CN}\"]"),
        "allowed_sources = [\"another-host\"]",
    );
    std::fs::write(&r.tcfg, text).expect("cfg");
    r.target.signal(nix::sys::signal::Signal::SIGHUP);
    // The session still owes the applier a segment it cannot take, but
    // it is over: the target says so at once...
    wait_for(
        Duration::from_secs(10),
        "the target to show the session ended by the reload",
        || {
            r.target.status(VOL).is_some_and(|s| {
                s.connection != Connection::Connected
                    && s.reasons.iter().any(|x| x.message.contains("not allowed"))
            })
        },
    );
    // ...stops telling the source it is alive, and the source, refused
    // when it reconnects, stops as the reload wants.
    assert_eq!(
        r.source().wait_exit(Duration::from_secs(30)),
        Some(3),
        "{}",
        r.logs()
    );
    let s = r.source().status(VOL).expect("source status");
    assert!(
        s.reasons.iter().any(|x| x.message.contains("not allowed")),
        "{:?}",
        s.reasons
    );
    let ts = r.target.status(VOL).expect("target status");
    assert_ne!(ts.health, Health::Critical, "{:?}", ts.reasons);
    assert!(r.target_state().critical.is_none());
}
