//! Dead peers are noticed: a path that goes dead without a FIN or RST (a
//! blackhole) ends the stream on both ends within the peer timeout, the
//! source reconnects once the path is back, taking over from the target's
//! silent connection, and nothing is lost; an idle live stream stays
//! connected (the source pings it, the target answers).

use std::time::{Duration, Instant};

use replica_tests::*;
use replicad::status::{Connection, ReasonKind, VolumeStatus};

const VOL: &str = "v";
/// The source's peer timeout, s (pings every second).
const PEER_TIMEOUT: u64 = 3;

fn network(peer_timeout: u64) -> String {
    format!(
        "[network]\npeer_timeout_secs = {peer_timeout}\nkeepalive_secs = 1\nhandshake_timeout_secs = 3\n"
    )
}

/// A target whose peer timeout is `target_timeout` and a source (peer
/// timeout [`PEER_TIMEOUT`]) shipping to it through a [`Proxy`].
fn through_proxy(seed: u64, target_timeout: u64) -> (Rig, Proxy) {
    let mut r = Rig::new(
        VOL,
        1 << 20,
        seed,
        None,
        1000,
        &network(target_timeout),
        256,
        256,
    );
    let proxy = Proxy::start(&r.addr);
    r.start_source_to(
        &proxy.addr(),
        1 << 16,
        &format!(
            "[retry]\nschedule_secs = [0.5, 1]\n{}",
            network(PEER_TIMEOUT)
        ),
    );
    (r, proxy)
}

fn source(r: &Rig) -> Option<VolumeStatus> {
    r.source.as_ref().and_then(|s| s.status(VOL))
}

fn target(r: &Rig) -> Option<VolumeStatus> {
    r.target.status(VOL)
}

fn connected(s: &Option<VolumeStatus>) -> bool {
    s.as_ref()
        .is_some_and(|s| s.connection == Connection::Connected)
}

/// Writes, flushes and waits until the target applied everything, with
/// both ends connected.
fn replicate(r: &mut Rig, n: usize) {
    r.write(n);
    r.src.apply(&Op::Flush);
    r.wait_applied(r.src.last_seq, Duration::from_secs(60));
    wait_for(Duration::from_secs(20), "both ends connected", || {
        connected(&source(r)) && connected(&target(r))
    });
}

/// The session reason of `s` if it is not connected.
fn dropped_because(s: Option<VolumeStatus>) -> Option<String> {
    let s = s?;
    if s.connection == Connection::Connected {
        return None;
    }
    s.reason(ReasonKind::Session).map(str::to_owned)
}

/// Waits until the source is connected again in a new session and the
/// target streams from it; returns how long that took.
fn wait_reconnected(r: &Rig, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for(timeout, "the source to reconnect", || {
        let (s, t) = (source(r), target(r));
        connected(&s)
            && connected(&t)
            && s.is_some_and(|s| s.sessions >= 2)
            && t.is_some_and(|t| t.sessions >= 2)
    });
    t0.elapsed()
}

#[test]
fn a_blackholed_path_is_noticed_on_both_ends_and_the_source_reconnects_losing_nothing() {
    let (mut r, proxy) = through_proxy(81, PEER_TIMEOUT);
    replicate(&mut r, 100);

    proxy.blackhole();
    let cut = Instant::now();
    // Writes go on: they are spooled, the target cannot have them.
    r.write(20);
    r.src.apply(&Op::Flush);
    let mut source_saw: Option<(Duration, String)> = None;
    let mut target_saw: Option<(Duration, String)> = None;
    wait_for(
        Duration::from_secs(PEER_TIMEOUT + 7),
        "both ends to notice the dead path",
        || {
            if source_saw.is_none() {
                // The application's timeout; never a reconnect attempt's.
                source_saw = dropped_because(source(&r))
                    .filter(|m| {
                        m.contains(&format!("the target sent nothing for {PEER_TIMEOUT} s"))
                    })
                    .map(|m| (cut.elapsed(), m));
            }
            if target_saw.is_none() {
                target_saw = dropped_because(target(&r))
                    .filter(|m| {
                        m.contains(&format!("the source sent nothing for {PEER_TIMEOUT} s"))
                    })
                    .map(|m| (cut.elapsed(), m));
            }
            source_saw.is_some() && target_saw.is_some()
        },
    );
    let (s_after, s_why) = source_saw.expect("source noticed");
    let (t_after, t_why) = target_saw.expect("target noticed");
    eprintln!(
        "dead path noticed: source after {s_after:?} ({s_why}), target after {t_after:?} ({t_why})"
    );

    // A reconnect through the dead path hangs after the TCP connect and is
    // given up at the source's handshake deadline (3 s here, not the
    // default 10 s).
    wait_for(
        Duration::from_secs(8),
        "a reconnect attempt to time out in the TLS handshake",
        || dropped_because(source(&r)).is_some_and(|m| m.contains("timed out in TLS handshake")),
    );
    // More writes while the path is down, then it comes back.
    r.write(20);
    proxy.restore();
    let took = wait_reconnected(&r, Duration::from_secs(30));
    eprintln!("reconnected {took:?} after the path came back");
    let t = target(&r).expect("target status");
    assert_eq!(
        t.reason(ReasonKind::Session),
        None,
        "a new stream clears the old one's reason"
    );
    r.write(50);
    r.src.apply(&Op::Flush);
    r.drain_and_check();
}

#[test]
fn a_reconnecting_source_takes_over_from_the_targets_silent_connection_without_waiting_for_its_timeout(
) {
    // The target would wait a minute for its silent connection: the source
    // notices first and comes back well before.
    let target_timeout = 60;
    let (mut r, proxy) = through_proxy(82, target_timeout);
    replicate(&mut r, 60);

    proxy.blackhole();
    wait_for(
        Duration::from_secs(PEER_TIMEOUT + 7),
        "the source to notice the dead path",
        || dropped_because(source(&r)).is_some_and(|m| m.contains("sent nothing")),
    );
    assert!(
        connected(&target(&r)),
        "the target's connection is silent for less than its own timeout: {:?}",
        target(&r)
    );
    r.write(30);
    proxy.restore();
    let took = wait_reconnected(&r, Duration::from_secs(20));
    eprintln!("took over the target's silent connection {took:?} after the path came back");
    assert!(
        took < Duration::from_secs(target_timeout / 2),
        "the new connection waited for the old one's timeout: {took:?}"
    );
    assert!(
        r.target
            .log_text()
            .contains("a newer connection took over this volume"),
        "the target's old connection was taken over, not timed out\n{}",
        r.logs()
    );
    r.write(30);
    r.src.apply(&Op::Flush);
    r.drain_and_check();
}

#[test]
fn an_idle_stream_stays_connected_across_several_peer_timeouts() {
    let mut r = Rig::new(
        VOL,
        1 << 20,
        83,
        None,
        1000,
        &network(PEER_TIMEOUT),
        256,
        256,
    );
    r.start_source(1 << 16, &network(PEER_TIMEOUT));
    replicate(&mut r, 50);

    // Nothing to send from here on: only the pings and their acks say
    // that the other end is alive.
    let idle_since = Instant::now();
    let before = target(&r).expect("target status").pings;
    let pings = 12;
    wait_for(
        Duration::from_secs(40),
        "the target to answer a dozen pings",
        || {
            let (s, t) = (source(&r), target(&r));
            assert!(
                connected(&s) && connected(&t),
                "an idle live stream was dropped:\nsource {s:?}\ntarget {t:?}\n{}",
                r.logs()
            );
            t.is_some_and(|t| t.pings >= before + pings)
        },
    );
    let idle = idle_since.elapsed();
    assert!(
        idle > Duration::from_secs(3 * PEER_TIMEOUT),
        "{pings} pings in {idle:?}: an idle stream pings every third of the peer timeout, not more often"
    );
    let (s, t) = (source(&r).expect("source"), target(&r).expect("target"));
    assert_eq!(s.sessions, 1, "the source never reconnected");
    assert_eq!(t.sessions, 1, "the target accepted one stream");
    assert_eq!(s.durable_seq, r.src.last_seq);
}
