//! The drain thread of the source: capture ring → spool, continuously and
//! independently of the connection to the target, so the ring (kernel
//! memory) holds seconds of writes and the spool holds outages.
//!
//! While the stream can carry every write, records go to the spool in ring
//! order and ring space is released as soon as a chunk is written. When it
//! cannot (the spool reaches its limit or cannot be written, the kernel ring
//! overflowed, records were lost from a damaged spool, or the volume was
//! never copied), the drain switches to a dirty-region map: records only
//! mark the regions they touch, the map is saved before their ring space is
//! released, and the volume needs a resync.
//!
//!
//! One source replicates one volume, and the records of a group's ring
//! carry their volume's index: a record of any other index (a volume that
//! joined the group) stops the drain before it, with
//! [`RingError::OtherVolume`]; nothing of it is spooled, and the source is
//! Critical.

mod chunks;
mod publish;
mod recovery;
mod resync;
mod shared;
mod switch;
mod verify;

pub use shared::{planned_failover_refusal, KernelDirtyError, PlannedRefusal, Shared};

use resync::Run;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replica_proto::frame::{self, OP_SKIPPED, RECORD_FLAG_RESYNC};
use replica_ring::device::Device;
use replica_ring::{Peek, Record, RingError};

use crate::source::dirty::ResyncState;
use crate::source::ring::RingConsumer;
use crate::status::{ReasonKind, StatusBoard};
use crate::DaemonError;

/// Prefix of the status reason while a resync is needed.
pub const RESYNC_REASON: &str = "needs resync";

/// A full resync asked for on the control socket. The drain answers on
/// `reply` with the ring position it was taken at: the resync's END comes
/// after it, so a wait can tell this resync's END from an earlier one's.
pub struct ResyncRequest {
    /// Why (shown in the status and the log).
    pub why: String,
    /// Where to send the ring position.
    pub reply: crossbeam_channel::Sender<u64>,
    /// Only make sure a full resync is pending or running (an initial
    /// copy): one already under way that reaches the target is kept.
    pub ensure: bool,
    /// Resend every chunk without comparing (`replctl resync --full`).
    pub send_all: bool,
}

/// An online verify asked for on the control socket. The drain answers on
/// `reply` with the ring position it starts at, or why it cannot start.
pub struct VerifyRequest {
    /// Send the chunks found different.
    pub resync: bool,
    /// Bytes compared per second, at most (`None`: as fast as it goes).
    pub max_rate: Option<u64>,
    /// Where to send the answer.
    pub reply: crossbeam_channel::Sender<Result<u64, VerifyRefusal>>,
}

/// Why a verify cannot start.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyRefusal {
    /// A resync is needed or running: the replica is not a copy to verify.
    #[error("a resync is needed or running: the replica is not consistent, there is nothing to verify yet")]
    Resyncing,
    /// One is running.
    #[error("a verify is already running")]
    Running,
    /// The ring is a ring file (no markers).
    #[error(
        "the capture ring is a ring file (development mode): a verify needs the kernel's markers"
    )]
    NoMarkers,
    /// `device` is not configured.
    #[error("`device` (the protected volume) is not configured")]
    NoDevice,
    /// The source is not connected to its target.
    #[error("not connected to the target: a verify compares with the target's replica")]
    NotConnected,
}

/// Verifies asked for and not yet taken by the drain.
pub type VerifyRequests = Arc<Mutex<Vec<VerifyRequest>>>;

/// What operators ask the drain for, through the control socket.
#[derive(Clone, Default)]
pub struct Requests {
    /// Resyncs.
    pub resync: ResyncRequests,
    /// Verifies.
    pub verify: VerifyRequests,
}

/// Full resyncs asked for and not yet taken by the drain.
pub type ResyncRequests = Arc<Mutex<Vec<ResyncRequest>>>;

/// The kernel side of a ring, for its dirty bitmap and markers.
pub struct KernelRing {
    /// The attached control device.
    pub device: Arc<Device>,
    /// The volume's index in its group.
    pub index: u32,
}

/// Settings of the drain.
#[derive(Debug, Clone)]
pub struct DrainSettings {
    /// Volume id (status key).
    pub volume: String,
    /// Volume size, bytes.
    pub volume_size: u64,
    /// Target size of a spool chunk, bytes.
    pub chunk_bytes: usize,
    /// Spool bytes not acknowledged by the target at which the spool is
    /// dropped for a resync.
    pub limit_bytes: u64,
    /// Dirty-map region size when the ring has none of its own.
    pub region_bytes: u64,
    /// Where the resync state is saved.
    pub state_path: PathBuf,
    /// The protected volume's device, read during a resync.
    pub device: Option<PathBuf>,
    /// A resync inserts no more DATA markers while the spool holds this
    /// many bytes the target has not acknowledged.
    pub resync_window: u64,
    /// Bytes of one resync write (a run of regions), at most.
    pub resync_max_bytes: u64,
    /// The spool directory.
    pub spool_dir: PathBuf,
    /// Spool file size before the next file, bytes.
    pub spool_file_bytes: u64,
    /// The ring generation this source replicated last, if any.
    pub last_generation: Option<[u8; 16]>,
}

enum Mode {
    /// Records go to the spool; with a resync running after a BEGIN, or a
    /// verify.
    Spool(Option<Box<Run>>),
    /// Records only mark the map; `begin`: a BEGIN marker was inserted.
    Bitmap { st: ResyncState, begin: Option<u64> },
}

/// Records drained but not yet committed to the spool (or map).
#[derive(Default)]
struct Pending {
    plain: Vec<u8>,
    first: Option<u64>,
    count: u32,
    first_ns: u64,
    last_ns: u64,
    /// The chunk starts a resync after a gap.
    gap: bool,
    /// Region runs this chunk resends (cleared from the map once spooled).
    clears: Vec<(u64, u64)>,
    /// Region runs proven zeros on both sides by a DATA marker in this
    /// chunk (cleared from the map once spooled).
    zeroed: Vec<(u64, u64)>,
    /// The chunk holds the resync's END.
    end: bool,
}

impl Pending {
    fn clear(&mut self) {
        self.plain.clear();
        self.first = None;
        self.count = 0;
        self.gap = false;
        self.clears.clear();
        self.zeroed.clear();
        self.end = false;
    }
}

/// The drain thread's state.
pub struct Drainer {
    set: DrainSettings,
    consumer: RingConsumer,
    kernel: Option<KernelRing>,
    /// The replicated volume's index in its group (0 for a ring file, whose
    /// ring holds one volume): the only one the stream takes.
    index: u32,
    shared: Arc<Shared>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
    mode: Mode,
    generation: [u8; 16],
    region_bytes: u64,
    pending: Pending,
    /// Bitmap mode: records marked since the map was last saved.
    unsaved: u64,
    last_save: Instant,
    /// The volume, opened for resync reads.
    volume: Option<File>,
    /// Why a needed resync cannot start, once reported.
    blocked: Option<String>,
    last_step: Instant,
    /// Resyncs and verifies asked for by an operator.
    requests: Requests,
    /// The data keys (chunk hashes, the resync cursor's authentication).
    keys: Arc<crate::keystore::KeyStore>,
}

fn data_op(op: u8) -> bool {
    matches!(
        op,
        frame::ring_op::WRITE | frame::ring_op::DISCARD | frame::ring_op::WRITE_ZEROES | OP_SKIPPED
    )
}

fn io_err(what: &'static str, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Critical(format!("{what}: {e}"))
}

impl Drainer {
    /// Runs until stopped or the ring is dead and drained; a fatal error is
    /// left in [`Shared::fatal`].
    pub fn run(mut self) {
        if let Err(e) = self.run_inner() {
            let msg = e.to_string();
            if let DaemonError::Ring(RingError::OtherVolume { seq, volume, .. }) = &e {
                tracing::error!(
                    volume = %self.set.volume,
                    seq,
                    index = volume,
                    "a record of another volume of the group reached the drain: the stream stops before it, nothing of it is spooled or shipped"
                );
            }
            tracing::error!(volume = %self.set.volume, "capture drain stopped: {msg}");
            // Replication cannot go on: Critical now, whether or not a
            // session is there to notice.
            self.board.update(&self.set.volume, |s| {
                s.set_reason(ReasonKind::Stopped, msg.clone());
            });
            *self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
        }
        self.publish();
        self.shared.spool.wake();
    }

    fn run_inner(&mut self) -> Result<(), DaemonError> {
        let mut idle = 0u32;
        let mut last_pub = Instant::now();
        loop {
            if last_pub.elapsed() >= Duration::from_millis(100) {
                self.publish();
                last_pub = Instant::now();
            }
            let damage = self
                .shared
                .damaged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(why) = damage {
                if matches!(self.mode, Mode::Spool(_)) {
                    self.commit()?;
                    self.go_resync(format!("spool unreadable ({why})"), true)?;
                }
            }
            if self.stop.load(Ordering::Acquire) {
                self.commit()?;
                self.stop_verify("the daemon stopped")?;
                return self.save_run();
            }
            let asked = std::mem::take(
                &mut *self
                    .requests
                    .resync
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if !asked.is_empty() {
                let from = if asked.iter().all(|r| r.ensure) {
                    self.ensure_full_resync()?
                } else {
                    let why = asked[0].why.clone();
                    let send_all = asked.iter().any(|r| r.send_all);
                    self.full_resync(why, send_all)?;
                    // Every marker from here on, END included, comes after it.
                    self.consumer.producer_seq()
                };
                for r in asked {
                    // The asker may have stopped waiting.
                    let _ = r.reply.send(from);
                }
            }
            let verifies = std::mem::take(
                &mut *self
                    .requests
                    .verify
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            for v in verifies {
                let r = self.start_verify(v.resync, v.max_rate);
                let _ = v.reply.send(r);
            }
            if self.shared.copy_required.swap(false, Ordering::AcqRel) {
                self.ensure_full_resync()?;
            }
            if self.last_step.elapsed() >= Duration::from_millis(5) {
                self.resync_step()?;
                self.last_step = Instant::now();
            }
            let rec: Option<(Record, bool)> = match self.consumer.peek()? {
                Peek::Committed(r) => Some((r, true)),
                Peek::Failed(r) => Some((r, false)),
                Peek::Pending | Peek::Empty => None,
            };
            let Some((r, ok)) = rec else {
                if self.pending.first.is_some() || self.unsaved > 0 {
                    self.commit()?;
                    continue;
                }
                if self.consumer.overflowing() {
                    self.overflowed()?;
                    continue;
                }
                if self.consumer.is_dead()
                    && self.consumer.producer_seq() == self.consumer.next_seq()
                {
                    tracing::info!(volume = %self.set.volume, "capture ring closed; everything it held is spooled");
                    self.stop_verify("the capture ring closed")?;
                    self.save_run()?;
                    self.shared.closed.store(true, Ordering::Release);
                    self.shared.spool.wake();
                    return Ok(());
                }
                idle = idle.saturating_add(1);
                if idle > 64 {
                    self.consumer.wait(Duration::from_millis(5))?;
                } else {
                    std::hint::spin_loop();
                }
                continue;
            };
            idle = 0;
            let resync_marker =
                ok && r.desc.op == frame::ring_op::MARKER && r.desc.flags & RECORD_FLAG_RESYNC != 0;
            if resync_marker {
                self.resync_marker(&r)?;
            } else {
                self.take(&r, ok)?;
            }
            self.consumer.advance(&r);
            let full = match self.mode {
                Mode::Spool(_) => self.pending.plain.len() >= self.set.chunk_bytes,
                // Keep ring space flowing while saving the map rarely.
                Mode::Bitmap { .. } => {
                    self.unsaved >= 4096 || self.last_save.elapsed() >= Duration::from_millis(200)
                }
            };
            if full {
                self.commit()?;
            }
        }
    }

    /// Checks a record's volume and bounds.
    fn check(&self, r: &Record) -> Result<(), DaemonError> {
        let d = &r.desc;
        if d.volume != self.index {
            return Err(RingError::OtherVolume {
                seq: r.seq,
                volume: d.volume,
                expected: self.index,
            }
            .into());
        }
        let end = d
            .sector
            .checked_mul(512)
            .and_then(|s| s.checked_add(u64::from(d.len)));
        if end.is_none_or(|e| e > self.set.volume_size) {
            return Err(DaemonError::Critical(format!(
                "record {} lies beyond the volume end",
                r.seq
            )));
        }
        Ok(())
    }

    /// Adds a record to the pending chunk.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        seq: u64,
        op: u8,
        flags: u8,
        d: &replica_ring::DescFields,
        sector: u64,
        len: u32,
    ) {
        let p = &mut self.pending;
        frame::encode_record_parts(
            &mut p.plain,
            seq,
            op,
            flags,
            d.volume,
            sector,
            len,
            d.submit_ns,
            d.aux,
            &[],
        );
        if p.first.is_none() {
            p.first = Some(seq);
            p.first_ns = d.submit_ns;
        }
        p.count += 1;
        p.last_ns = d.submit_ns;
    }

    /// Adds one drained record to the pending chunk (or the map).
    fn take(&mut self, r: &Record, ok: bool) -> Result<(), DaemonError> {
        self.check(r)?;
        let d = &r.desc;
        let op = if ok { d.op } else { OP_SKIPPED };
        if !ok {
            tracing::warn!(
                seq = r.seq,
                sector = d.sector,
                len = d.len,
                "write failed on the source; region marked for resync"
            );
            let (sector, len) = (d.sector, d.len);
            self.board.update(&self.set.volume, |s| {
                s.failed_records += 1;
                s.set_reason(
                    ReasonKind::WriteFailed,
                    format!(
                        "write failed on the source at sector {sector} (+{len} bytes): region needs resync"
                    ),
                );
            });
        }
        match &mut self.mode {
            Mode::Bitmap { st, .. } => {
                if data_op(op) {
                    st.map.mark(d.sector * 512, u64::from(d.len));
                }
                self.unsaved += 1;
            }
            Mode::Spool(run) => {
                if let Some(run) = run.as_mut().filter(|_| ok && data_op(op)) {
                    run.drained_write(r.seq, d.sector * 512, u64::from(d.len));
                }
                self.push(r.seq, op, d.flags & !RECORD_FLAG_RESYNC, d, d.sector, d.len);
                if ok {
                    self.consumer.append_payload(r, &mut self.pending.plain)?;
                } else {
                    // What the disk holds there now is unknown (a failed
                    // write may have reached part of it): the stream stops
                    // before it, its regions join the map, and only a
                    // resync that begins after it makes the replica
                    // consistent again. No point is taken and no planned
                    // failover completes until then.
                    let (sector, len) = (d.sector, d.len);
                    self.go_resync(
                        format!("a write failed on the source at sector {sector} (+{len} bytes)"),
                        false,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Writes the pending chunk to the spool (or saves the map) and releases
    /// its ring space.
    fn commit(&mut self) -> Result<(), DaemonError> {
        match &mut self.mode {
            Mode::Bitmap { st, .. } => {
                if self.unsaved > 0 {
                    resync::save_state(&self.set, &self.keys, st)?;
                    self.unsaved = 0;
                    self.last_save = Instant::now();
                }
                let next = self.consumer.next_seq();
                self.consumer.release(next)?;
                Ok(())
            }
            Mode::Spool(_) => {
                let Some(first) = self.pending.first else {
                    return Ok(());
                };
                let p = &self.pending;
                match self
                    .shared
                    .spool
                    .append(first, p.count, p.first_ns, p.last_ns, &p.plain, p.gap)
                {
                    Ok(()) => {
                        let upto = first.wrapping_add(u64::from(p.count));
                        self.after_spooled()?;
                        self.pending.clear();
                        self.consumer.release(upto)?;
                        let held = self.shared.spool.unacked_bytes();
                        if held >= self.set.limit_bytes {
                            self.go_resync(
                                format!(
                                    "spool reached its limit ({held} bytes not acknowledged, limit {})",
                                    self.set.limit_bytes
                                ),
                                true,
                            )?;
                        }
                        Ok(())
                    }
                    Err(e) => {
                        let why = if e.is_no_space() {
                            format!("spool disk full ({e})")
                        } else {
                            format!("spool write failed ({e})")
                        };
                        self.go_resync(why, true)
                    }
                }
            }
        }
    }
}

/// The stream takes only the replicated volume's records.
#[cfg(test)]
mod volume_index_tests {
    use super::*;
    use crate::status::{Health, Role, VolumeStatus};
    use replica_ring::{Consumer, DescFields, FileRelease, Producer, RingParams};

    const SIZE: u64 = 1 << 20;

    fn write(p: &mut Producer, volume: u32, sector: u64, byte: u8) -> u64 {
        let data = vec![byte; 4096];
        let seq = p
            .reserve(
                DescFields {
                    op: ring_abi::OP_WRITE,
                    volume,
                    sector,
                    len: 4096,
                    submit_ns: replica_ring::now_ns(),
                    ..Default::default()
                },
                &data,
            )
            .expect("reserve");
        p.complete(seq, true);
        seq
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A record of another volume index of the group stops the drain with
    /// a typed error before it: what came before it is spooled, nothing of
    /// it or after it, its ring space is not released, and the volume is
    /// Critical with a reason naming the index.
    #[test]
    fn a_record_of_another_volume_stops_the_drain_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = dir.path().join("ring");
        let mut prod = Producer::create(
            &ring,
            RingParams {
                desc_count: 64,
                data_granules: 256,
                generation: [3; 16],
                first_seq: 1,
                first_granule: 0,
            },
        )
        .expect("ring");
        let consumer = Consumer::new(
            replica_ring::Mapping::open_file(&ring, true).expect("map"),
            Box::new(FileRelease) as Box<dyn replica_ring::Release>,
        )
        .expect("consumer");
        let board = Arc::new(StatusBoard::new(
            dir.path(),
            vec![VolumeStatus::new("v", Role::Primary)],
        ));
        let set = DrainSettings {
            volume: "v".into(),
            volume_size: SIZE,
            chunk_bytes: 1 << 20,
            limit_bytes: 64 << 20,
            region_bytes: 64 << 10,
            state_path: dir.path().join("resync.state"),
            device: None,
            resync_window: 1 << 20,
            resync_max_bytes: 1 << 20,
            spool_dir: dir.path().join("spool"),
            spool_file_bytes: 16 << 20,
            last_generation: None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let keys_path = dir.path().join("keys.toml");
        replica_proto::keys::KeyRing::generate()
            .expect("keys")
            .save(&keys_path, false)
            .expect("save keys");
        let keys = crate::keystore::KeyStore::load(&keys_path).expect("key store");
        let (mut drainer, shared) = Drainer::new(
            set,
            consumer,
            None,
            board.clone(),
            stop,
            Default::default(),
            keys,
        )
        .expect("drainer");
        assert_eq!(drainer.index, 0, "a ring file holds volume index 0");

        // Volume 0's record goes to the spool...
        write(&mut prod, 0, 0, 0xAA);
        let t = std::thread::spawn(move || {
            let r = drainer.run_inner();
            (drainer, r)
        });
        wait_until("record 1 spooled", || shared.spool.next_seq() == 2);
        // ...then another member's record, and one of volume 0 after it.
        let foreign = write(&mut prod, 1, 8, 0xBB);
        write(&mut prod, 0, 16, 0xCC);
        wait_until("the drain to stop", || t.is_finished());
        let (drainer, r) = t.join().expect("drain thread");
        match r {
            Err(DaemonError::Ring(RingError::OtherVolume {
                seq,
                volume,
                expected,
            })) => {
                assert_eq!((seq, volume, expected), (foreign, 1, 0));
            }
            other => panic!("expected OtherVolume, got {other:?}"),
        }
        let mut spooled = Vec::new();
        shared
            .spool
            .for_each_record(1, |rv| spooled.push((rv.seq, rv.volume)))
            .expect("spool");
        assert_eq!(spooled, vec![(1, 0)], "nothing of the other volume spooled");
        assert_eq!(shared.spool.next_seq(), 2);
        assert_eq!(prod.live(), 2, "the other volume's record is not released");

        // The drain thread's run: stopped, Critical, the reason names the
        // volume index.
        drainer.run();
        let f = shared.fatal().expect("fatal error");
        assert!(f.contains("volume index 1"), "{f}");
        let s = board.get("v").expect("status");
        assert_eq!(s.health, Health::Critical);
        assert!(
            s.reason(ReasonKind::Stopped)
                .is_some_and(|r| r.contains("volume index 1")),
            "{:?}",
            s.reasons
        );
        assert_eq!(shared.spool.next_seq(), 2, "still nothing more spooled");
    }
}
