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

/// A target serving volume `v` (`extra` in its configuration): it, its
/// address and its state directory.
fn target(env: &Env, extra: &str) -> (Daemon, String, std::path::PathBuf) {
    let st = env.path("tstate");
    let tcfg = env.target_config("target.toml", &st, &[("v", SIZE as u64)], 16, extra);
    let (t, addr) = Daemon::start_target(&tcfg, &st, &env.path("target.log"));
    (t, addr, st)
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
    let (t, addr, st) = target(&env, "");
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
    let (_t, addr, st) = target(&env, "[network]\nhandshake_timeout_secs = 2\n");
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
    let (_t, addr, _st) = target(&env, "");
    let e = RawClient::connect_with(
        &env,
        &addr,
        ("pki", SOURCE_CN),
        "v",
        [3; 16],
        1,
        HelloOpts {
            protocol: 4,
            confirm: ConfirmWith::Nothing,
            ..HelloOpts::default()
        },
    )
    .err()
    .expect("protocol 4 is refused");
    assert!(e.starts_with("protocol: "), "{e}");
    assert!(e.contains("protocol version 4"), "{e}");
    assert!(
        e.contains(&format!("speaks {}", replica_proto::msg::PROTOCOL_VERSION)),
        "{e}"
    );
}

/// Opens `n` silent connections to target `t` at `addr` from loopback
/// address `from`, waits until its log says `needle` (`what`), and checks
/// that it is still running; returns the connections.
fn flood_until(
    t: &mut Daemon,
    addr: &str,
    from: [u8; 4],
    n: usize,
    needle: &str,
    what: &str,
) -> Vec<std::net::TcpStream> {
    let flood: Vec<_> = (0..n).map(|_| connect_from(from.into(), addr)).collect();
    wait_for(Duration::from_secs(20), what, || {
        t.log_text().contains(needle)
    });
    assert!(
        t.try_exit().is_none(),
        "the target must not exit:\n{}",
        t.log_text()
    );
    flood
}

/// A TCP connection to `addr` from `from` (another loopback address).
fn connect_from(from: std::net::Ipv4Addr, addr: &str) -> std::net::TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let to: std::net::SocketAddrV4 = addr.parse().expect("an IPv4 address");
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .expect("bind");
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to)).expect("connect");
    std::net::TcpStream::from(fd)
}

/// Whether the peer closed `s` (EOF or reset), without waiting.
fn closed(s: &std::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.set_nonblocking(true).expect("nonblocking");
    match std::io::Read::read(&mut &*s, &mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn a_flood_of_silent_connections_and_huge_declared_frames_leaves_the_target_serving() {
    let mut rig = replicating("[network]\nhandshake_timeout_secs = 30\n");
    let rss0 = rig.target.proc_status("VmRSS").expect("rss");
    let threads0 = rig.target.proc_status("Threads").expect("threads");
    // 300 connections from one address that never speak: the door keeps 8
    // (the default per address) and closes the rest at once, long before
    // the handshake deadline.
    let flood: Vec<_> = (0..300)
        .map(|_| connect_from([127, 0, 0, 2].into(), &rig.addr))
        .collect();
    wait_for(
        Duration::from_secs(20),
        "connections past the per-address limit to be closed",
        || flood.iter().filter(|s| closed(s)).count() >= 292,
    );
    let open = flood.iter().filter(|s| !closed(s)).count();
    assert_eq!(open, 8, "exactly the per-address limit is held open");
    // With a certificate, before the key confirmation: a 4 GiB segment
    // header, a 4 GiB hello header; both refused on the header.
    let env = &rig.env;
    for t in [3u8, 1] {
        let mut link = RawClient::tls(env, &rig.addr, ("pki", SOURCE_CN)).expect("tls");
        let mut h = vec![t];
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&[0x41; 4096]);
        link.send_raw(h);
        let refused = wait_until_closed(&mut link);
        assert!(
            refused,
            "a 4 GiB declaration of type {t} must end the connection"
        );
    }
    // The real source restarts meanwhile (a new connection from the same
    // host as the flood would be: another address here) and replicates.
    rig.source().kill9();
    rig.start_source(64 << 10, "");
    rig.write(60);
    rig.drain_and_check();
    let rss1 = rig.target.proc_status("VmRSS").expect("target is running");
    let threads1 = rig.target.proc_status("Threads").expect("threads");
    eprintln!(
        "target RSS {} KiB before, {} KiB with 300 connections held/refused; threads {threads0} -> {threads1}",
        rss0, rss1
    );
    assert!(
        threads1 <= threads0 + 8 + 4,
        "threads grew from {threads0} to {threads1}: more than the 8 connections the door lets wait"
    );
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    drop(flood);
}

/// Pumps `link` until the peer closes it (true) or 10 s pass (false).
fn wait_until_closed(link: &mut replicad::link::Link) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match link.recv() {
            Err(_) => return true,
            Ok(Some(replica_proto::msg::Message::Error(_))) => return true,
            Ok(_) => {}
        }
        if link.pump(Duration::from_millis(50), None).is_err() {
            return true;
        }
    }
    false
}

#[test]
fn a_confirmed_peer_declaring_a_4_gib_segment_is_refused_on_the_header() {
    let env = Env::new();
    let (t, addr, _st) = target(&env, "");
    let rss0 = t.proc_status("VmRSS").expect("rss");
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [4; 16], 1).expect("confirmed");
    let mut h = vec![3u8];
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    // Far more than a bound would let through, were it buffered.
    h.extend_from_slice(&vec![0x42; 8 << 20]);
    c.link.send_raw(h);
    assert!(
        wait_until_closed(&mut c.link),
        "the target must end the stream"
    );
    let rss1 = t.proc_status("VmRSS").expect("the target is running");
    eprintln!("target RSS {rss0} KiB before, {rss1} KiB after");
    assert!(
        rss1 < rss0 + 32 * 1024,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    // And serves the next connection.
    RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [4; 16], 1).expect("next");
}

#[test]
fn running_out_of_descriptors_never_takes_the_target_down() {
    let env = Env::new();
    let st = env.path("tstate");
    let tcfg = env.target_config(
        "target.toml",
        &st,
        &[("v", SIZE as u64)],
        16,
        "[network]\nhandshake_timeout_secs = 3\nmax_unauthenticated = 500\nmax_unauthenticated_per_address = 500\n",
    );
    let _ = std::fs::remove_file(st.join("listen.addr"));
    let mut t = Daemon::start_limited("target", &tcfg, &st, &env.path("target.log"), Some(48));
    wait_for(Duration::from_secs(20), "target to listen", || {
        assert!(t.try_exit().is_none(), "{}", t.log_text());
        std::fs::read_to_string(st.join("listen.addr")).is_ok_and(|a| !a.is_empty())
    });
    let addr = std::fs::read_to_string(st.join("listen.addr"))
        .expect("addr")
        .trim()
        .to_owned();
    // More silent connections than the target has descriptors: accept
    // fails (EMFILE) until the handshake deadline closes the ones it took.
    let flood = flood_until(
        &mut t,
        &addr,
        [127, 0, 0, 3],
        120,
        "accept failed",
        "accept to fail for want of descriptors",
    );
    drop(flood);
    // Once the flood is gone, a source is served again.
    wait_for(
        Duration::from_secs(30),
        "a confirmed connection after the flood",
        || RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [8; 16], 1).is_ok(),
    );
    assert!(t.try_exit().is_none(), "{}", t.log_text());
}

/// A pids cgroup of its own for this test (v1 `pids` hierarchy, or v2 with
/// the pids controller), or why there is none.
struct PidsCgroup {
    dir: std::path::PathBuf,
    parent_procs: std::path::PathBuf,
}

impl PidsCgroup {
    fn new() -> Result<Self, String> {
        let name = format!("dm-replica-test-{}", std::process::id());
        for root in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let root = std::path::Path::new(root);
            let v2 = root.join("cgroup.subtree_control");
            let usable = root.join("tasks").exists()
                || std::fs::read_to_string(&v2)
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "pids"));
            if !usable {
                continue;
            }
            let dir = root.join(&name);
            if std::fs::create_dir(&dir).is_ok() && dir.join("pids.max").exists() {
                return Ok(Self {
                    dir,
                    parent_procs: root.join("cgroup.procs"),
                });
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Err(
            "no writable pids cgroup (v1 /sys/fs/cgroup/pids or v2 with the pids controller)"
                .into(),
        )
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("join the cgroup");
    }

    fn limit(&self, max: Option<u64>) {
        let v = max.map_or_else(|| "max".to_owned(), |m| m.to_string());
        std::fs::write(self.dir.join("pids.max"), v).expect("pids.max");
    }

    fn current(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("pids.current"))
            .expect("pids.current")
            .trim()
            .parse()
            .expect("a count")
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in procs.split_whitespace() {
                let _ = std::fs::write(&self.parent_procs, p);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_thread_that_cannot_start_closes_its_connection_not_the_target() {
    let cg = match PidsCgroup::new() {
        Ok(c) => c,
        Err(why) => {
            eprintln!(
                "SKIPPED a_thread_that_cannot_start_closes_its_connection_not_the_target: {why}"
            );
            return;
        }
    };
    let env = Env::new();
    let st = env.path("tstate");
    let tcfg = env.target_config(
        "target.toml",
        &st,
        &[("v", SIZE as u64)],
        16,
        "[network]\nhandshake_timeout_secs = 5\n",
    );
    let (mut t, addr) = Daemon::start_target(&tcfg, &st, &env.path("target.log"));
    cg.add(t.pid().expect("pid"));
    // Room for one more thread only.
    cg.limit(Some(cg.current() + 1));
    let flood = flood_until(
        &mut t,
        &addr,
        [127, 0, 0, 4],
        6,
        "cannot start a connection thread",
        "a connection thread to fail to start",
    );
    // The connections it could not serve were closed at once.
    wait_for(
        Duration::from_secs(10),
        "the unserved connections closed",
        || flood.iter().filter(|s| closed(s)).count() >= 5,
    );
    drop(flood);
    cg.limit(None);
    RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1)
        .expect("served once threads can start again");
    assert!(t.try_exit().is_none(), "{}", t.log_text());
}
