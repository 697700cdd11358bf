//! Operations: the control socket (mode 0600, callers checked with
//! SO_PEERCRED, JSON status), systemd readiness, unit files.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use replica_control::ErrorCode;
use replica_tests::*;
use rustls_pki_types::pem::PemObject;

fn target_env(extra: &str) -> (Env, std::path::PathBuf, std::path::PathBuf) {
    let env = Env::new();
    let st = env.path("tstate");
    let cfg = env.target_config("target.toml", &st, &[("v", 1 << 20)], 4, extra);
    (env, st, cfg)
}

#[test]
fn control_socket_serves_json_status_to_root_only() {
    // The socket in a world-reachable directory, made world-writable, so
    // that only the daemon's SO_PEERCRED check stands between a non-root
    // caller and the answer.
    let open_dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let sock = open_dir.path().join("ctl.sock");
    let (_env, st, cfg) = target_env(&format!("control_socket = \"{}\"", sock.display()));
    let (_t, _addr) = Daemon::start_target(&cfg, &st, &_env.path("target.log"));
    wait_for(Duration::from_secs(10), "control socket", || sock.exists());
    assert_eq!(
        std::fs::metadata(&sock).expect("stat").permissions().mode() & 0o777,
        0o600,
        "socket must be 0600"
    );
    let st_mode = std::fs::metadata(&st).expect("stat").permissions().mode() & 0o777;
    assert_eq!(st_mode, 0o700, "state directory must be private");

    let r =
        replica_control::request(&sock, replica_control::Command::Status).expect("root may ask");
    let vols = r.status.expect("status");
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].volume, "v");
    assert_eq!(vols[0].role, replicad::status::Role::Secondary);
    // The wire form is JSON that parses back.
    let json = serde_json::to_string(&vols).expect("json");
    let back: Vec<replicad::status::VolumeStatus> = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, vols);
    let r = control_line(&sock, r#"{"version":1,"command":"frobnicate"}"#);
    assert_eq!(r.code, Some(ErrorCode::UnknownCommand), "{r:?}");
    assert!(r.error.expect("error").contains("unknown command"));

    // A non-root caller: refused by mode 0600 first...
    let nobody = |sock: &std::path::Path| {
        let out = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "control_client_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CONTROL_CLIENT_SOCKET", sock)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run helper as nobody");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // replctl run by that user: refused, exit code 4.
    let replctl_nobody = |sock: &std::path::Path| {
        Command::new(replctl_bin())
            .args(["status", "--socket"])
            .arg(sock)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run replctl as nobody")
    };
    let out = nobody(&sock);
    assert!(
        out.contains("CLIENT-ERR None") && out.to_lowercase().contains("permission denied"),
        "{out}"
    );
    let out = replctl_nobody(&sock);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // ...and by SO_PEERCRED even when the file mode would let it in.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = nobody(&sock);
    assert!(
        out.contains("CLIENT-ERR Some(PermissionDenied)")
            && out.contains("uid 65534 is not allowed"),
        "{out}"
    );
    let out = replctl_nobody(&sock);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uid 65534 is not allowed"),
        "{out:?}"
    );
}

#[test]
fn control_errors_carry_a_code_and_replctl_exits_with_its_code() {
    let (env, st, cfg) = target_env("");
    let (_t, _addr) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    let sock = replica_control::default_path(&st);
    wait_for(Duration::from_secs(10), "control socket", || {
        replica_control::request(&sock, replica_control::Command::Status).is_ok()
    });
    // A peer of another protocol version is told so, whatever else its
    // request holds.
    let r = control_line(&sock, r#"{"version":2,"command":"status","since":7}"#);
    assert_eq!(r.code, Some(ErrorCode::UnsupportedVersion), "{r:?}");
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.contains("version 2 not supported") && e.contains("speaks 1")),
        "{r:?}"
    );
    let r = control_line(&sock, "status please");
    assert_eq!(r.code, Some(ErrorCode::MalformedRequest), "{r:?}");
    let r = control_line(
        &sock,
        r#"{"version":1,"command":"failover","point":"soon"}"#,
    );
    assert_eq!(r.code, Some(ErrorCode::MalformedRequest), "{r:?}");
    // A volume that is not there.
    let r = control_line(&sock, r#"{"version":1,"command":"status","volume":"nope"}"#);
    assert_eq!(r.code, Some(ErrorCode::NotFound), "{r:?}");
    // One that is: its status only.
    let r = control_line(&sock, r#"{"version":1,"command":"status","volume":"v"}"#);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.status.map(|v| v.len()), Some(1));
    // A command of the other role.
    let e = replica_control::request(&sock, replica_control::Command::FailoverPlanned)
        .expect_err("a target has no planned failover");
    assert_eq!(e.daemon_code(), Some(ErrorCode::UnknownCommand), "{e}");

    // replctl ends with the code the daemon's error maps to.
    let replctl = |args: &[&str]| {
        let out = Command::new(replctl_bin())
            .args(args)
            .output()
            .expect("run replctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = st.to_str().expect("utf-8 path");
    let (code, err) = replctl(&["status", "--state-dir", dir]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = replctl(&["failover", "--state-dir", dir, "--volume", "nope"]);
    assert_eq!(code, Some(3), "not found: {err}");
    assert!(err.contains("no volume \"nope\""), "{err}");
    let (code, err) = replctl(&["failover", "--planned", "--state-dir", dir]);
    assert_eq!(code, Some(4), "refused: {err}");
    assert!(err.contains("unknown command"), "{err}");
    let (code, err) = replctl(&["failover", "--state-dir", dir, "--point", "soon"]);
    assert_eq!(code, Some(2), "usage: {err}");
    // A verify is the source's: a target refuses it.
    let (code, err) = replctl(&["verify", "--state-dir", dir]);
    assert_eq!(code, Some(4), "refused: {err}");
    assert!(err.contains("unknown command"), "{err}");
}

#[test]
fn a_verify_without_kernel_markers_is_refused_with_the_reason() {
    let env = Env::new();
    let _pair = env.pair("v", 1 << 20, 1000, 256, 1024, 3, "");
    let sstate = env.path("sstate");
    let sock = replica_control::default_path(&sstate);
    wait_for(Duration::from_secs(20), "source control socket", || {
        replica_control::request(&sock, replica_control::Command::Status).is_ok()
    });
    let out = Command::new(replctl_bin())
        .args(["verify", "--wait", "--state-dir"])
        .arg(&sstate)
        .output()
        .expect("run replctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "refused: {err}");
    assert!(err.contains("ring file"), "{err}");
}

use std::os::unix::process::CommandExt;

/// Run as another user by the test above; does nothing on its own.
#[test]
#[ignore = "helper process for control_socket_serves_json_status_to_root_only"]
fn control_client_helper() {
    let Some(sock) = std::env::var_os("CONTROL_CLIENT_SOCKET") else {
        return;
    };
    match replica_control::request(
        std::path::Path::new(&sock),
        replica_control::Command::Status,
    ) {
        Ok(_) => println!("CLIENT-OK"),
        Err(e) => println!("CLIENT-ERR {:?} {e}", e.daemon_code()),
    }
}

fn notify_socket(env: &Env) -> (UnixDatagram, std::path::PathBuf) {
    let p = env.path("notify.sock");
    let s = UnixDatagram::bind(&p).expect("bind notify socket");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    (s, p)
}

fn spawn_with_notify(
    cfg: &std::path::Path,
    notify: &std::path::Path,
    log: &std::path::Path,
) -> std::process::Child {
    Command::new(replicad_bin())
        .args(["target", "--config"])
        .arg(cfg)
        .env("NOTIFY_SOCKET", notify)
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn")
}

#[test]
fn ready_is_sent_only_when_the_target_can_serve() {
    let (env, st, cfg) = target_env("");
    let (ns, np) = notify_socket(&env);
    let mut child = spawn_with_notify(&cfg, &np, &env.path("t.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    let msg = loop {
        assert!(Instant::now() < deadline, "no READY=1 within 30 s");
        if let Ok(n) = ns.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            if m.contains("READY=1") {
                break m;
            }
        }
    };
    // At the moment READY arrives, everything it promises works.
    let addr =
        std::fs::read_to_string(st.join("listen.addr")).expect("listen.addr written before READY");
    std::net::TcpStream::connect(addr.trim()).expect("listening before READY");
    replica_control::request(&st.join("replicad.sock"), replica_control::Command::Status)
        .expect("control socket before READY");
    assert!(msg.contains("STATUS=listening"), "{msg}");
    let _ = child.kill();
    let _ = child.wait();

    // A target that cannot start never says READY.
    let (env, _st, cfg) = target_env("");
    std::fs::remove_file(env.path(&format!("pki/{TARGET_CN}.key"))).expect("remove key");
    let (ns, np) = notify_socket(&env);
    let mut child = spawn_with_notify(&cfg, &np, &env.path("t.log"));
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(2));
    let mut got = Vec::new();
    while let Ok(n) = ns.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(
        !got.iter().any(|m| m.contains("READY=1")),
        "READY from a daemon that failed: {got:?}"
    );
}

#[test]
fn systemd_units_verify() {
    let analyze =
        which("systemd-analyze").expect("systemd-analyze is required (apt-get install systemd)");
    let dir = tempfile::tempdir().expect("dir");
    let units = concat!(env!("CARGO_MANIFEST_DIR"), "/../daemon/systemd");
    let mut files = Vec::new();
    for name in [
        "replicad-target.service",
        "replicad-source@.service",
        "dm-replica-activate.service",
    ] {
        let text = std::fs::read_to_string(format!("{units}/{name}")).expect("unit");
        if name.starts_with("replicad") {
            // A flood of connections or a runaway buffer meets a bound.
            for key in ["TasksMax=", "MemoryMax=", "MemoryHigh="] {
                assert!(
                    text.lines().any(|l| l.starts_with(key)),
                    "{name} must set {key}"
                );
            }
        }
        // Point ExecStart at binaries that exist here (verify checks them).
        let text = text
            .replace(
                "/usr/local/bin/replicad",
                &replicad_bin().display().to_string(),
            )
            .replace(
                "/usr/local/bin/replctl",
                &replicad_bin().display().to_string(),
            );
        let p = dir.path().join(name.replace("@.service", "@demo.service"));
        std::fs::write(&p, text).expect("write");
        files.push(p);
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg("--man=no")
        .args(&files)
        .output()
        .expect("run systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // Only complaints about our own units count (the host's may have others).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("replicad") || l.contains("dm-replica"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Key ids and stream ids of every journaled segment of a volume.
fn journal_keys(tstate: &std::path::Path, vol: &str) -> Vec<(u32, [u8; 16])> {
    journal_headers(tstate, vol)
        .into_iter()
        .map(|h| (h.key_id, h.stream_id))
        .collect()
}

#[test]
fn key_rotation_mid_stream_does_not_interrupt_and_old_segments_still_apply() {
    let env = Env::new();
    let st = env.path("tstate");
    let Pair {
        mut target,
        addr,
        target_config: cfg,
        source,
        mut src,
    } = env.pair("v", 1 << 20, 1000, 256, 1024, 9, "");
    let write = |src: &mut Source, n: usize| {
        for _ in 0..n {
            let op = src.random_op(32);
            src.apply(&op);
        }
        src.apply(&Op::Flush);
    };
    let applied = |seq: u64| {
        wait_for(Duration::from_secs(60), &format!("applied {seq}"), || {
            let s = target_state(&st, "v");
            assert!(s.critical.is_none(), "{:?}", s.critical);
            s.applied_seq >= seq
        })
    };
    write(&mut src, 100);
    applied(src.last_seq);

    // Rotate: new key 2 active, key 1 still accepted. Reload the target
    // first, then the source.
    let mut kr = replica_proto::keys::KeyRing::load(&env.path("keys.toml")).expect("keys");
    assert_eq!(kr.rotate().expect("rotate"), 2);
    kr.save(&env.path("keys.toml"), true).expect("save");
    target.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "target reload", || {
        target.log_text().contains("keyring reloaded")
    });
    source.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "source reload", || {
        source.log_text().contains("keyring reloaded")
    });
    write(&mut src, 100);
    applied(src.last_seq);

    let keys = journal_keys(&st, "v");
    assert!(
        keys.iter().any(|k| k.0 == 1) && keys.iter().any(|k| k.0 == 2),
        "both keys in use: {keys:?}"
    );
    let streams: std::collections::HashSet<_> = keys.iter().map(|k| k.1).collect();
    assert_eq!(streams.len(), 1, "rotation must not reconnect");
    let s = source.status("v").expect("status");
    assert_eq!(s.retries, 0);
    assert_eq!(s.connection, replicad::status::Connection::Connected);

    // Segments sealed with the old key are still read back: a restarted
    // target replays its journal from the last checkpoint.
    let replica = st.join("v.img");
    let before = std::fs::read(&replica).expect("replica");
    target.kill9();
    {
        let mut state = target_state(&st, "v");
        state.applied_seq = 0; // force a replay of everything journaled
        state
            .save(&st.join("volumes/v/state.json"))
            .expect("save state");
    }
    // Both keys are needed while their segments wait to be replayed.
    let needed = replctl::keys::needed_key_ids(&st).expect("needed keys");
    assert_eq!(needed, [1u32, 2].into_iter().collect());
    pin_listen(&cfg, &addr);
    let (_t2, _) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    wait_for(Duration::from_secs(30), "replay", || {
        target_state(&st, "v").applied_seq >= src.last_seq
    });
    assert!(target_state(&st, "v").critical.is_none());
    assert_eq!(std::fs::read(&replica).expect("replica"), before);
    assert!(first_difference(&before, &src.image, &src.masked).is_none());
    // Everything applied: the old key can go; the active one stays.
    let needed = replctl::keys::needed_key_ids(&st).expect("needed keys");
    assert!(needed.is_empty(), "{needed:?}");
    let mut kr = replica_proto::keys::KeyRing::load(&env.path("keys.toml")).expect("keys");
    assert_eq!(kr.retire(&needed), vec![1]);
    assert_eq!(kr.ids(), vec![2]);
}

#[test]
fn expiring_certificate_warns_and_sighup_reloads_certificates() {
    let env = Env::new();
    // Replace the target's certificate by one valid for 10 days.
    let pki = env.path("pki");
    for ext in ["pem", "key"] {
        std::fs::remove_file(pki.join(format!("{TARGET_CN}.{ext}"))).expect("remove");
    }
    replctl::certs::issue(&pki, &pki, TARGET_CN, 10).expect("short certificate");
    let st = env.path("tstate");
    let cfg = env.target_config("target.toml", &st, &[("v", 1 << 20)], 4, "");
    let (t, addr) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    let warned = |t: &Daemon| {
        t.status("v").is_some_and(|s| {
            s.health == replicad::status::Health::Warning
                && s.reasons.iter().any(|r| r.message.contains("expires in"))
        })
    };
    wait_for(Duration::from_secs(10), "expiry warning", || warned(&t));
    assert!(t.log_text().contains("expires in"));

    // Renew, SIGHUP: the warning clears and new connections use the new
    // certificate.
    for ext in ["pem", "key"] {
        std::fs::remove_file(pki.join(format!("{TARGET_CN}.{ext}"))).expect("remove");
    }
    replctl::certs::issue(&pki, &pki, TARGET_CN, 365).expect("renewed certificate");
    let renewed = std::fs::read(pki.join(format!("{TARGET_CN}.pem"))).expect("read");
    t.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "reload", || {
        t.log_text().contains("certificates reloaded")
    });
    wait_for(Duration::from_secs(10), "warning cleared", || !warned(&t));
    let c = RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [1; 16], 1)
        .expect("connect after reload");
    let served = c
        .link
        .tls()
        .peer_certificates()
        .and_then(|p| p.first().map(|d| d.as_ref().to_vec()))
        .expect("peer cert");
    let renewed_der = rustls_pki_types::CertificateDer::pem_slice_iter(&renewed)
        .next()
        .expect("one cert")
        .expect("parse");
    assert_eq!(
        served,
        renewed_der.as_ref(),
        "the target must serve the renewed certificate"
    );
}

#[test]
fn status_lag_grows_while_the_target_is_down_and_returns_to_zero() {
    let env = Env::new();
    let st = env.path("tstate");
    let sst = env.path("sstate");
    let Pair {
        mut target,
        addr,
        target_config: cfg,
        source: _source,
        mut src,
    } = env.pair(
        "v",
        1 << 20,
        100,
        1024,
        1024,
        5,
        "[retry]\nschedule_secs = [0.05]\n",
    );
    let lag = || {
        replica_control::request(&sst.join("replicad.sock"), replica_control::Command::Status)
            .ok()
            .and_then(|r| r.status)
            .and_then(|v| v.into_iter().next())
    };
    for _ in 0..50 {
        let op = src.random_op(16);
        src.apply(&op);
    }
    src.apply(&Op::Flush);
    wait_for(Duration::from_secs(30), "lag 0 on a live pair", || {
        lag().is_some_and(|s| {
            s.lag_records == 0 && s.lag_bytes == 0 && s.durable_seq == src.last_seq
        })
    });

    target.kill9();
    for _ in 0..50 {
        let op = src.random_op(16);
        src.apply(&op);
    }
    let behind = src.last_seq - wait_durable(&lag);
    wait_for(
        Duration::from_secs(30),
        "lag while the target is down",
        || {
            lag().is_some_and(|s| {
                s.lag_records >= behind
                    && s.lag_records > 0
                    && s.lag_bytes > 0
                    && s.lag_seconds > 0.0
            })
        },
    );

    pin_listen(&cfg, &addr);
    let (_t2, _) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    wait_for(Duration::from_secs(60), "lag back to 0", || {
        lag().is_some_and(|s| {
            s.lag_records == 0 && s.lag_seconds == 0.0 && s.durable_seq == src.last_seq
        })
    });
}

fn wait_durable(lag: &impl Fn() -> Option<replicad::status::VolumeStatus>) -> u64 {
    lag().map_or(0, |s| s.durable_seq)
}

#[test]
fn sighup_applies_runtime_config_and_reports_what_needs_a_restart() {
    let env = Env::new();
    let st = env.path("tstate");
    let cfg = env.target_config("target.toml", &st, &[("v", 1 << 20)], 4, "");
    let (t, addr) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [1; 16], 1)
        .expect("authorised before");
    assert!(RawClient::connect(&env, &addr, ("pki", "intruder"), "v", [1; 16], 1).is_err());

    // Authorise another host instead, and (wrongly) change the listen
    // address, which cannot change at run time.
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace(
            &format!("allowed_sources = [\"{SOURCE_CN}\"]"),
            "allowed_sources = [\"intruder\"]",
        )
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(&cfg, text).expect("write cfg");
    t.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "reload", || {
        t.log_text().contains("configuration reloaded")
    });
    let log = t.log_text();
    assert!(
        log.contains("cannot change at run time") && log.contains("listen"),
        "{log}"
    );
    // Still listening where it was; the new authorisation is in force.
    let e = RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [1; 16], 1)
        .err()
        .expect("refused now");
    assert!(e.starts_with("not-authorized"), "{e}");
    RawClient::connect(&env, &addr, ("pki", "intruder"), "v", [1; 16], 1)
        .expect("newly authorised");

    // A configuration that does not parse leaves everything as it was.
    std::fs::write(&cfg, "listen = ").expect("write cfg");
    t.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "failed reload reported", || {
        t.log_text().contains("configuration reload failed")
    });
    RawClient::connect(&env, &addr, ("pki", "intruder"), "v", [1; 16], 1)
        .expect("still authorised");
}

#[test]
fn source_sighup_moves_to_a_new_target_address_and_refuses_immutable_changes() {
    let env = Env::new();
    let st = env.path("tstate");
    let sst = env.path("sstate");
    let cfg = env.target_config("target.toml", &st, &[("v", 1 << 20)], 16, "");
    let (_t, addr) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    // A port nobody listens on: bind, read the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .to_string();
    let ring = env.path("ring");
    let mut src = Source::create(&ring, 1 << 20, 256, 256, 3);
    for _ in 0..20 {
        let op = src.random_op(16);
        src.apply(&op);
    }
    src.apply(&Op::Flush);
    let scfg = env.source_config(
        "source.toml",
        "v",
        1 << 20,
        &ring,
        &dead,
        &sst,
        ("pki", SOURCE_CN),
        &env.path("keys.toml"),
        "[retry]\nschedule_secs = [0.05]\n",
    );
    let s = Daemon::start("source", &scfg, &sst, &env.path("source.log"));
    wait_for(
        Duration::from_secs(10),
        "retrying against the dead address",
        || {
            s.status("v")
                .is_some_and(|x| x.connection == replicad::status::Connection::Retrying)
        },
    );
    let text = std::fs::read_to_string(&scfg)
        .expect("cfg")
        .replace(&dead, &addr)
        .replace("volume_size = 1048576", "volume_size = 2097152");
    std::fs::write(&scfg, text).expect("write");
    s.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        Duration::from_secs(30),
        "replicated via the new address",
        || target_state(&st, "v").applied_seq >= src.last_seq,
    );
    let log = s.log_text();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        log.contains("cannot change at run time") && log.contains("volume_size"),
        "{log}"
    );
    let got = std::fs::read(st.join("v.img")).expect("replica");
    assert!(first_difference(&got, &src.image, &src.masked).is_none());
}

#[test]
fn a_reload_that_removes_a_source_ends_its_live_session_and_one_that_keeps_it_does_not() {
    use replicad::status::{Connection, Health, ReasonKind};
    let env = Env::new();
    let st = env.path("tstate");
    let Pair {
        target,
        target_config: cfg,
        mut source,
        mut src,
        ..
    } = env.pair("v", 1 << 20, 1000, 256, 1024, 13, "");
    let write = |src: &mut Source, n: usize| {
        for _ in 0..n {
            let op = src.random_op(32);
            src.apply(&op);
        }
        src.apply(&Op::Flush);
    };
    let applied = |seq: u64| {
        wait_for(Duration::from_secs(60), &format!("applied {seq}"), || {
            let s = target_state(&st, "v");
            assert!(s.critical.is_none(), "{:?}", s.critical);
            applied_published(&st, "v") >= seq
        })
    };
    let reloads = |t: &Daemon| t.log_text().matches("configuration reloaded").count();
    write(&mut src, 50);
    applied(src.last_seq);

    // A reload that keeps the source's name (another keep_points) leaves
    // its session alone.
    let text = std::fs::read_to_string(&cfg).expect("cfg");
    std::fs::write(
        &cfg,
        text.replace("keep_points = 1000", "keep_points = 999"),
    )
    .expect("cfg");
    target.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "first reload", || {
        reloads(&target) == 1
    });
    write(&mut src, 50);
    applied(src.last_seq);
    let streams: std::collections::HashSet<_> =
        journal_keys(&st, "v").into_iter().map(|k| k.1).collect();
    assert_eq!(
        streams.len(),
        1,
        "a reload that keeps the name must not reconnect"
    );
    let s = source.status("v").expect("source status");
    assert_eq!((s.connection, s.retries), (Connection::Connected, 0));
    assert_eq!(
        target.status("v").expect("target status").connection,
        Connection::Connected
    );

    // Everything written is acknowledged and applied; now the name goes.
    let acknowledged = src.last_seq;
    let text = std::fs::read_to_string(&cfg).expect("cfg");
    std::fs::write(
        &cfg,
        text.replace(
            &format!("allowed_sources = [\"{SOURCE_CN}\"]"),
            "allowed_sources = [\"intruder\"]",
        ),
    )
    .expect("cfg");
    target.signal(nix::sys::signal::Signal::SIGHUP);
    // The source is told on the wire, reports it and stops (Fatal: no
    // reconnecting).
    let code = source.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(3), "{}", source.log_text());
    let log = source.log_text();
    assert!(log.contains("not-authorized"), "{log}");
    let s = source.status("v").expect("source status");
    assert!(
        s.reasons
            .iter()
            .any(|r| r.kind == ReasonKind::Stopped && r.message.contains("not allowed")),
        "{:?}",
        s.reasons
    );
    // The target: not connected, and nothing said against the replica.
    wait_for(Duration::from_secs(10), "target not connected", || {
        target
            .status("v")
            .is_some_and(|t| t.connection != Connection::Connected)
    });
    let t = target.status("v").expect("target status");
    assert_ne!(t.health, Health::Critical, "{:?}", t.reasons);
    assert!(
        t.reasons
            .iter()
            .all(|r| r.kind != ReasonKind::Stopped && r.kind != ReasonKind::Replica),
        "{:?}",
        t.reasons
    );
    assert!(target_state(&st, "v").critical.is_none());
    // What was acknowledged is intact.
    applied(acknowledged);
    let got = std::fs::read(st.join("v.img")).expect("replica");
    assert!(first_difference(&got, &src.image, &src.masked).is_none());
}

#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused_and_the_first_goes_on() {
    let (env, st, cfg) = target_env("");
    let (first, addr) = Daemon::start_target(&cfg, &st, &env.path("target.log"));
    let out = Command::new(replicad_bin())
        .args(["target", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "a second daemon cannot start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another replicad runs with state directory") && err.contains("replicad.lock"),
        "{err}"
    );
    // The first one still serves.
    RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [2; 16], 1)
        .expect("the first daemon serves");
    // And `replctl point` does not open the replica beside it, even when
    // the daemon does not answer on its socket (here: it was moved away).
    let sock = replica_control::default_path(&st);
    let moved = st.join("moved.sock");
    std::fs::rename(&sock, &moved).expect("move the socket");
    let out = Command::new(replctl_bin())
        .args(["point", "list", "--config"])
        .arg(&cfg)
        .args(["--volume", "v"])
        .output()
        .expect("run replctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "refused: {err}");
    assert!(err.contains("holds"), "{err}");
    std::fs::rename(&moved, &sock).expect("move it back");
    drop(first);
}
