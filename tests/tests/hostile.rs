//! Hostile peers: a host with an allowed certificate but another key, a key
//! confirmation replayed from another connection, a peer that never
//! confirms, an old peer. None of them changes anything on the target, and
//! the real source replicating beside them is not disturbed.

use std::time::Duration;

use replica_proto::keys::KeyRing;
use replica_tests::*;

const SIZE: usize = 1 << 20;

/// The bytes of the target's persisted state of `vol` (`None`: no file).
fn state_bytes(st: &std::path::Path, vol: &str) -> Option<Vec<u8>> {
    std::fs::read(st.join("volumes").join(vol).join("state.json")).ok()
}

/// A rig whose source replicated some writes, all applied.
fn replicating(extra_target: &str) -> Rig {
    let mut rig = Rig::new("v", SIZE, 14, None, 16, extra_target, 64, 64);
    rig.start_source(64 << 10, "");
    rig.write(40);
    rig.drain_and_check();
    rig
}

/// A key ring with key id 1 that is not the test's key 1.
fn wrong_keys(env: &Env) -> std::path::PathBuf {
    let p = env.path("wrong-keys.toml");
    KeyRing::generate()
        .expect("keyring")
        .save(&p, false)
        .expect("save");
    p
}

#[test]
fn an_allowed_certificate_with_the_wrong_key_changes_nothing_on_the_target() {
    let mut rig = replicating("");
    let before = state_bytes(&rig.tstate, "v");
    assert!(before.is_some(), "the target saved the volume's state");
    let source_epoch = rig.source().status("v").expect("status").epoch;
    // Everything a hello can ask for: the last epoch, a takeover by a new
    // ring generation with a resync.
    let e = RawClient::connect_with(
        &rig.env,
        &rig.addr,
        ("pki", SOURCE_CN),
        "v",
        [0xEE; 16],
        1,
        HelloOpts {
            resync: true,
            epoch: u64::MAX,
            keyring: Some(wrong_keys(&rig.env)),
            ..HelloOpts::default()
        },
    )
    .err()
    .expect("an impostor must be refused");
    assert!(e.starts_with("key-confirmation: "), "{e}");
    assert!(e.contains("key id 1"), "{e}");
    assert_eq!(
        state_bytes(&rig.tstate, "v"),
        before,
        "the target's state file must be byte for byte what it was\n{}",
        rig.logs()
    );
    let ts = rig.target_state();
    assert!(ts.critical.is_none(), "{:?}", ts.critical);
    // The real source goes on at its epoch, not demoted nor fenced.
    rig.write(40);
    rig.drain_and_check();
    let s = rig.source().status("v").expect("status");
    assert_eq!(s.epoch, source_epoch);
    assert_eq!(s.health, replicad::status::Health::OK, "{:?}", s.reasons);
    assert_eq!(s.connection, replicad::status::Connection::Connected);
    assert_eq!(rig.target_state().epoch, source_epoch);
}

#[test]
fn a_source_daemon_with_the_wrong_key_stops_critical_naming_the_key_and_the_target_is_untouched() {
    let env = Env::new();
    let st = env.path("tstate");
    let tcfg = env.target_config("target.toml", &st, &[("v", SIZE as u64)], 16, "");
    let (t, addr) = Daemon::start_target(&tcfg, &st, &env.path("target.log"));
    let before = state_bytes(&st, "v");
    let ring = env.path("ring");
    let mut src = Source::create(&ring, SIZE, 64, 64, 1);
    for _ in 0..10 {
        let op = src.random_op(16);
        src.apply(&op);
    }
    let sst = env.path("sstate");
    let cfg = env.source_config(
        "source.toml",
        "v",
        SIZE as u64,
        &ring,
        &addr,
        &sst,
        ("pki", SOURCE_CN),
        &wrong_keys(&env),
        "[retry]\nschedule_secs = [0.05]\n",
    );
    let mut s = Daemon::start("source", &cfg, &sst, &env.path("source.log"));
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        Some(3),
        "the source must stop as Critical:\n{}",
        s.log_text()
    );
    let status = s.status("v").expect("status");
    assert_eq!(status.health, replicad::status::Health::Critical);
    assert!(
        status
            .reasons
            .iter()
            .any(|r| r.message.contains("refused key id 1") && r.message.contains("key ring")),
        "the reason names the key id and what to do: {:?}",
        status.reasons
    );
    assert_eq!(state_bytes(&st, "v"), before, "{}", t.log_text());
    let ts = target_state(&st, "v");
    assert!(ts.critical.is_none(), "{:?}", ts.critical);
    assert_eq!(ts.applied_seq, 0);
    let tstatus = volume_status(&st, "v").expect("target status");
    assert_ne!(tstatus.health, replicad::status::Health::Critical);
}

#[test]
fn a_key_confirmation_replayed_from_another_connection_is_refused() {
    // Connection A: the right key; its tag is good on A only.
    let opts = HelloOpts {
        source_random: Some([0x5A; 16]),
        ..HelloOpts::default()
    };
    let env = &Env::new();
    let st = env.path("t2state");
    let tcfg = env.target_config("target2.toml", &st, &[("w", SIZE as u64)], 16, "");
    let (_t2, addr2) = Daemon::start_target(&tcfg, &st, &env.path("target2.log"));
    let a = RawClient::connect_with(
        env,
        &addr2,
        ("pki", SOURCE_CN),
        "w",
        [3; 16],
        1,
        opts.clone(),
    )
    .expect("the real key is confirmed");
    let tag = a.source_tag;
    drop(a);
    let before = state_bytes(&st, "w");
    // Connection B: the same hello byte for byte, A's tag.
    let e = RawClient::connect_with(
        env,
        &addr2,
        ("pki", SOURCE_CN),
        "w",
        [3; 16],
        1,
        HelloOpts {
            confirm: ConfirmWith::Replayed(tag),
            ..opts.clone()
        },
    )
    .err()
    .expect("a replayed confirmation must be refused");
    assert!(e.starts_with("key-confirmation: "), "{e}");
    assert_eq!(state_bytes(&st, "w"), before);
    // And the key still works on a connection of its own.
    RawClient::connect_with(env, &addr2, ("pki", SOURCE_CN), "w", [3; 16], 1, opts)
        .expect("a fresh confirmation is accepted");
}

#[test]
fn a_peer_that_never_confirms_is_closed_at_the_handshake_deadline() {
    let env = Env::new();
    let st = env.path("tstate");
    let tcfg = env.target_config(
        "target.toml",
        &st,
        &[("v", SIZE as u64)],
        16,
        "[network]\nhandshake_timeout_secs = 2\n",
    );
    let (_t, addr) = Daemon::start_target(&tcfg, &st, &env.path("target.log"));
    let before = state_bytes(&st, "v");
    let t0 = std::time::Instant::now();
    let e = RawClient::connect_with(
        &env,
        &addr,
        ("pki", SOURCE_CN),
        "v",
        [3; 16],
        1,
        HelloOpts {
            confirm: ConfirmWith::Nothing,
            ..HelloOpts::default()
        },
    )
    .err()
    .expect("no confirmation, no stream");
    assert!(e.starts_with("timeout: "), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(9),
        "closed by the 2 s deadline, not by the client's own 10 s: {:?}",
        t0.elapsed()
    );
    assert_eq!(state_bytes(&st, "v"), before);
}

#[test]
fn an_old_peer_is_refused_with_the_protocol_versions() {
    let env = Env::new();
    let st = env.path("tstate");
    let tcfg = env.target_config("target.toml", &st, &[("v", SIZE as u64)], 16, "");
    let (_t, addr) = Daemon::start_target(&tcfg, &st, &env.path("target.log"));
    let e = RawClient::connect_with(
        &env,
        &addr,
        ("pki", SOURCE_CN),
        "v",
        [3; 16],
        1,
        HelloOpts {
            protocol: 2,
            confirm: ConfirmWith::Nothing,
            ..HelloOpts::default()
        },
    )
    .err()
    .expect("protocol 2 is refused");
    assert!(e.starts_with("protocol: "), "{e}");
    assert!(e.contains("protocol version 2"), "{e}");
    assert!(e.contains("speaks 3"), "{e}");
}
