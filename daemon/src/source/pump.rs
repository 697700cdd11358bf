//! The session's socket loop: sends sealed segments in counter order, handles
//! acknowledgements, the planned failover's hand-over and the target's errors,
//! pings a stream it has nothing to send on and ends one whose target went
//! silent.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use replica_proto::msg::{self, Message};

use super::drain::Shared;
use super::seal::SealError;
use super::session::{SessionError, MAX_QUEUED_BYTES};
use super::Source;
use crate::link::{Link, Liveness};

impl Source {
    /// Sends sealed segments in counter order and handles acks.
    pub(super) fn pump(
        &self,
        link: &mut Link,
        out_rx: &Receiver<(u64, Result<Vec<u8>, SealError>)>,
        wake: &UnixStream,
        shared: &Shared,
    ) -> Result<(), SessionError> {
        let cfg = self.cfg();
        let live = Liveness::new(&cfg.network);
        let mut next = 0u64;
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut workers_done = false;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.tick();
            if let Some(f) = shared.fatal() {
                return Err(SessionError::Drain(f));
            }
            let handing_over = {
                let mut pf = shared.planned.lock().unwrap_or_else(|p| p.into_inner());
                match pf.as_mut() {
                    Some(f) => {
                        // The target has every record: ask it to take over.
                        let durable = shared.durable.load(Ordering::Acquire);
                        if !f.sent && (durable.wrapping_sub(f.upto) as i64) >= 0 {
                            link.send(&Message::Promote(msg::Promote {
                                upto: f.upto,
                                epoch: f.epoch,
                            }));
                            f.sent = true;
                            tracing::info!(volume = %cfg.volume, upto = f.upto, epoch = f.epoch, "asking the target to take over");
                        }
                        true
                    }
                    None => false,
                }
            };
            if !handing_over
                && !shared.failing_over.load(Ordering::Acquire)
                && shared.closed.load(Ordering::Acquire)
                && shared.durable.load(Ordering::Acquire).wrapping_add(1) == shared.spool.next_seq()
            {
                return Err(SessionError::RingClosed);
            }
            // Collect what the workers finished, in counter order.
            while link.queued() < MAX_QUEUED_BYTES && !workers_done {
                match out_rx.try_recv() {
                    Ok((c, Ok(f))) => {
                        pending.insert(c, f);
                    }
                    Ok((_, Err(e))) => return Err(SessionError::Seal(e)),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => workers_done = true,
                }
                while let Some(f) = pending.remove(&next) {
                    let n = f.len() as u64;
                    link.send_segment(f);
                    next += 1;
                    self.board.update(&cfg.volume, |s| {
                        s.segments += 1;
                        s.frame_bytes += n;
                    });
                }
            }
            if workers_done && pending.is_empty() {
                // The batcher stopped (ring error or shutdown): flush and end.
                if link.drained() {
                    return Ok(());
                }
            }
            // Liveness: a target that said nothing (it acks every ping) for
            // the peer timeout is gone; a stream with nothing to send is
            // pinged so that it hears from a live one.
            if link.silent_for() >= live.peer_timeout {
                // Read what is waiting first: this thread may have been
                // kept from running, not the target from answering.
                link.pump(Duration::ZERO, None)
                    .map_err(SessionError::link)?;
                if link.silent_for() >= live.peer_timeout {
                    return Err(SessionError::TargetSilent {
                        secs: live.peer_timeout.as_secs(),
                    });
                }
            }
            if link.quiet_for() >= live.ping_interval() {
                link.send(&Message::Ping);
            }
            let woke = link
                .pump(Duration::from_millis(100), Some(wake.as_fd()))
                .map_err(SessionError::link)?;
            if woke {
                let mut b = [0u8; 256];
                while matches!((&*wake).read(&mut b), Ok(n) if n > 0) {}
            }
            while let Some(m) = link.recv().map_err(SessionError::link)? {
                match m {
                    Message::Ack(a) => {
                        shared.acknowledged(a.durable_seq);
                        shared
                            .target_applied
                            .store(a.applied_seq, Ordering::Release);
                        // Acks of one session only move forward.
                        self.board.update(&cfg.volume, |s| {
                            s.durable_seq = s.durable_seq.max(a.durable_seq);
                            s.applied_seq = s.applied_seq.max(a.applied_seq);
                            s.target_inconsistent = a.flags & msg::ACK_INCONSISTENT != 0;
                        });
                        if a.flags & msg::ACK_NEEDS_FULL_RESYNC != 0 {
                            // The drain makes sure a full resync that
                            // reaches this target is pending or running.
                            shared.copy_required.store(true, Ordering::Release);
                        }
                    }
                    Message::Compared(c) => shared.answered(c),
                    Message::Zeroes(z) => shared.zeroes(z),
                    Message::Promoted(p) => {
                        let pf = shared
                            .planned
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .take();
                        match pf {
                            Some(f) => {
                                let _ = f.reply.send(Ok(p));
                                // The failover command records the demotion
                                // and stops the daemon.
                                let deadline = Instant::now() + Duration::from_secs(30);
                                while !self.stop.load(Ordering::Acquire)
                                    && Instant::now() < deadline
                                {
                                    std::thread::sleep(Duration::from_millis(10));
                                }
                                return Ok(());
                            }
                            None => {
                                return Err(SessionError::Protocol(format!(
                                    "the target says it took over (epoch {}) but no failover was asked for",
                                    p.epoch
                                )))
                            }
                        }
                    }
                    Message::Error(e) => {
                        if let Some(f) = shared
                            .planned
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .filter(|f| f.sent)
                        {
                            let _ = f.reply.send(Err(format!("target: {}", e.message)));
                        }
                        return Err(SessionError::Ended {
                            class: e.class,
                            code: e.code,
                            message: e.message,
                        });
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected message from target: {}",
                            other.kind()
                        )))
                    }
                }
            }
        }
    }
}
