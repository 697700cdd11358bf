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
//! The resync (DESIGN section 3): once a session is connected, the drain
//! asks the kernel for a BEGIN marker; from that point of the ring on,
//! records are spooled again (the stream resumes after a gap the target
//! accepts because it starts with BEGIN). Then, a few at a time and paced
//! by the target's acknowledgements, it inserts DATA markers naming runs of
//! dirty regions; when the drain reaches such a marker, every earlier record
//! has completed on the source, so it reads those regions from the volume
//! and spools them as a write *at the marker's position*: later writes come
//! after it in the stream and win. When no region is left, an END marker
//! closes the resync; the target is consistent again at END.
//!
//! Before it inserts END the drain takes the kernel's dirty bitmap again and
//! merges it into the run's map ([`Drainer::kernel_settled`]): regions the
//! kernel marked after the bitmap was first taken (a write that failed, a
//! write made in overflow mode that completed only after the take) must be
//! resent too. Overflow-mode writes are not ordered against ring markers, so
//! while the kernel reports any still in flight a DATA read may have missed
//! them: END waits until a take returns no new region with none in flight;
//! new regions are sent first (the run's cursor laps). The map is saved as
//! "whole volume" before each take, so a daemon killed between the take and
//! the save resends everything rather than forget what it took.
//!
//! One source replicates one volume, and the records of a group's ring
//! carry their volume's index: a record of any other index (a volume that
//! joined the group) stops the drain before it, with
//! [`RingError::OtherVolume`]; nothing of it is spooled, and the source is
//! Critical.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replica_proto::frame::{self, resync::Marker, OP_SKIPPED, RECORD_FLAG_RESYNC};
use replica_ring::device::Device;
use replica_ring::{Peek, Record, RingError};

use crate::dirty::{DirtyMap, ResyncState};
use crate::source::RingConsumer;
use crate::spool::Spool;
use crate::status::{Health, StatusBoard};
use crate::DaemonError;

/// Prefix of the status reason while a resync is needed.
pub const RESYNC_REASON: &str = "needs resync";

/// DATA markers in the ring, not yet drained, at most.
const MAX_OUTSTANDING: u32 = 4;

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

/// What the drain shares with the shipping sessions and the main loop.
pub struct Shared {
    /// The capture ring's generation.
    pub generation: [u8; 16],
    /// The spool.
    pub spool: Arc<Spool>,
    /// Last record the target has durably (the sessions raise it).
    pub durable: AtomicU64,
    /// A session is connected to the target (a resync starts only then).
    pub connected: AtomicBool,
    /// The ring is dead and everything it held is spooled.
    pub closed: AtomicBool,
    /// A non-recoverable drain error.
    pub fatal: Mutex<Option<String>>,
    /// A session found the spool damaged: the drain turns it into a resync.
    pub damaged: Mutex<Option<String>>,
    /// Set while a resync is needed: the first record the stream lacks.
    pub resync_since: Mutex<Option<u64>>,
    /// The kernel ring's control device and the volume's index, for the
    /// kernel's dirty count (none for a ring file).
    kernel_volume: Option<(Arc<Device>, u32)>,
    /// A planned failover waiting for the session to hand over.
    pub planned: Mutex<Option<crate::failover::PlannedFailover>>,
    /// A planned failover is under way (from before the volume is fenced):
    /// the ring closing is expected, not a reason to stop.
    pub failing_over: AtomicBool,
    /// The target said it holds no consistent copy: the drain makes sure a
    /// full resync is pending or running.
    pub copy_required: AtomicBool,
    /// Last record the target said it applied (its welcome or last ack).
    pub target_applied: AtomicU64,
}

impl Shared {
    /// The drain's fatal error, if any.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the target's durable position (from an ack or a welcome).
    pub fn acknowledged(&self, durable: u64) {
        self.durable.fetch_max(durable, Ordering::AcqRel);
        if let Err(e) = self.spool.acknowledge(durable) {
            tracing::error!(error = %e, "cannot trim the spool");
            self.report_damage(e.to_string());
        }
    }

    /// A session could not read the spool.
    pub fn report_damage(&self, why: String) {
        *self.damaged.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Whether a resync is needed (or running): the first record the stream
    /// lacks.
    pub fn needs_resync(&self) -> Option<u64> {
        *self.resync_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_resync(&self, since: Option<u64>) {
        *self.resync_since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }

    /// Regions the kernel holds dirty for the volume (writes that failed or
    /// were made in overflow mode, not yet taken by a resync); `None` for a
    /// ring file.
    pub fn kernel_dirty_regions(&self) -> Result<Option<u64>, String> {
        let Some((dev, index)) = &self.kernel_volume else {
            return Ok(None);
        };
        match dev.volume(*index) {
            Ok(Some(v)) => Ok(Some(v.dirty_regions)),
            Ok(None) => Err(format!("volume index {index} is no longer in its group")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Why a planned failover must not go on, if it must not: the stream lacks
/// records (a resync is needed or running since `needs_resync`), or the
/// kernel holds regions no resync has covered yet (or cannot say).
pub fn planned_failover_refusal(
    needs_resync: Option<u64>,
    kernel_dirty: Result<Option<u64>, String>,
) -> Option<String> {
    if let Some(since) = needs_resync {
        return Some(format!(
            "the replica needs a resync (the stream stopped at record {since}): a planned failover would lose writes; let the resync finish, or fail over (unplanned) on the target"
        ));
    }
    match kernel_dirty {
        Ok(None | Some(0)) => None,
        Ok(Some(n)) => Some(format!(
            "the kernel holds {n} dirty regions of the volume that no resync has resent yet (writes that failed or were not captured): a planned failover would lose them; let the resync they start finish, or fail over (unplanned) on the target"
        )),
        Err(e) => Some(format!(
            "cannot read the kernel's dirty regions of the volume ({e}): a planned failover cannot tell whether it would lose writes"
        )),
    }
}

/// A resync in progress: BEGIN is in the spool.
struct Run {
    /// Regions still to send (`begin_seq` set).
    st: ResyncState,
    /// Regions in the map when the resync began.
    total: u64,
    /// Next region to ask for.
    cursor: u64,
    /// DATA markers inserted and not yet drained.
    outstanding: u32,
    /// The END marker's sequence, once inserted.
    end: Option<u64>,
    /// Its BEGIN said it resends every region.
    full: bool,
    /// Regions sent since the state was last saved.
    unsaved: bool,
    last_save: Instant,
    /// When the kernel's bitmap was last taken before END (END waits while
    /// overflow-mode writes are in flight; takes are spaced out).
    last_kernel_take: Option<Instant>,
    /// Overflow-mode writes in flight at that take.
    kernel_in_flight: u64,
    /// Why that take failed, once logged.
    kernel_take_error: Option<String>,
}

impl Run {
    /// A resync that begins (or resumes after a restart) with the regions
    /// still in `st`'s map.
    fn new(st: ResyncState, full: bool) -> Self {
        Self {
            total: st.map.count(),
            st,
            cursor: 0,
            outstanding: 0,
            end: None,
            full,
            unsaved: false,
            last_save: Instant::now(),
            last_kernel_take: None,
            kernel_in_flight: 0,
            kernel_take_error: None,
        }
    }
}

/// How long END waits between two takes of the kernel's bitmap while
/// overflow-mode writes are in flight.
const KERNEL_RETAKE: Duration = Duration::from_millis(20);

/// What a take of the kernel's bitmap before END says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// No new region, nothing in flight: END may go in.
    Yes,
    /// Regions added to the run's map: send them first.
    Added(u64),
    /// Overflow-mode writes still in flight: take again later.
    InFlight(u64),
    /// The bitmap could not be taken: try again later.
    Unknown,
}

/// Merges a bitmap taken from the kernel (`region_bytes` per bit) into a
/// run's map and says whether the resync may end.
fn merge_before_end(
    map: &mut DirtyMap,
    region_bytes: u64,
    regions: impl Iterator<Item = u64>,
    in_flight_overflow: u64,
) -> Settled {
    let before = map.count();
    map.merge_regions(region_bytes, regions);
    let added = map.count().saturating_sub(before);
    if added > 0 {
        Settled::Added(added)
    } else if in_flight_overflow > 0 {
        Settled::InFlight(in_flight_overflow)
    } else {
        Settled::Yes
    }
}

enum Mode {
    /// Records go to the spool; with a resync running after a BEGIN.
    Spool(Option<Run>),
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
    /// Full resyncs asked for by an operator.
    resync_request: ResyncRequests,
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
    /// Reconciles the spool, the saved resync state and the ring after a
    /// start (or restart) and returns the drain, ready to run.
    pub fn new(
        set: DrainSettings,
        mut consumer: RingConsumer,
        kernel: Option<KernelRing>,
        board: Arc<StatusBoard>,
        stop: Arc<AtomicBool>,
        resync_request: ResyncRequests,
    ) -> Result<(Self, Arc<Shared>), DaemonError> {
        let generation = consumer.mapping().generation();
        let tag = replica_proto::keys::volume_tag(&set.volume);
        let (spool, rec) = Spool::open(&set.spool_dir, generation, tag, set.spool_file_bytes)
            .map_err(|e| io_err("open the spool", e))?;
        for d in &rec.damage {
            tracing::warn!(volume = %set.volume, "spool: {d}");
        }
        if rec.truncated_bytes > 0 {
            tracing::warn!(volume = %set.volume, bytes = rec.truncated_bytes, "spool: torn tail cut at the last whole chunk");
        }
        let region_bytes = match &kernel {
            Some(k) => k
                .device
                .volume(k.index)?
                .map_or(set.region_bytes, |v| u64::from(v.region_kib) * 1024),
            None => set.region_bytes,
        };
        let released = consumer.released_seq();
        let whole = |why: String, since: u64| {
            let mut map = DirtyMap::new(set.volume_size, region_bytes);
            map.mark_all();
            tracing::error!(volume = %set.volume, "{why}: the whole volume needs a resync");
            ResyncState {
                generation,
                since_seq: since,
                reason: why,
                map,
                begin_seq: None,
            }
        };
        let saved = match ResyncState::load(&set.state_path) {
            Ok(s) => s,
            Err(e) => Some(whole(
                format!("resync state unreadable ({e})"),
                rec.next_seq.unwrap_or(released),
            )),
        };
        let spool = Arc::new(spool);
        let mut lost: Option<ResyncState> = None;
        match rec.next_seq {
            None => spool.restart_at(released),
            Some(s) if s == released => {}
            Some(s) if (s.wrapping_sub(released) as i64) > 0 => {
                // Spooled but not released when the daemon stopped: step
                // over them in the ring.
                while consumer.next_seq() != s {
                    match consumer.peek()? {
                        Peek::Committed(r) | Peek::Failed(r) => consumer.advance(&r),
                        Peek::Pending | Peek::Empty => {
                            return Err(DaemonError::Critical(format!(
                                "the spool holds records up to {} but the ring ends at {}: not this ring's spool",
                                s.wrapping_sub(1),
                                consumer.next_seq()
                            )))
                        }
                    }
                }
                consumer.release(s)?;
            }
            Some(s) => {
                // The spool lost records the ring no longer has; the ring
                // continues at `released`, the spool cannot.
                lost = Some(whole(
                    format!("spool lost records {s}..{}", released.wrapping_sub(1)),
                    s,
                ));
            }
        }
        let ring_changed =
            rec.other_generation || set.last_generation.is_some_and(|g| g != generation);
        if ring_changed && lost.is_none() && saved.is_none() {
            lost = Some(whole(
                "the capture ring was re-created (the host restarted or the table was loaded anew): writes may have gone uncaptured".into(),
                released,
            ));
        }
        let mode = match (saved, lost) {
            (Some(mut st), lost) => {
                let mut damaged = false;
                if st.generation != generation {
                    st.map.mark_all();
                    st.generation = generation;
                    if st.begin_seq.is_some() || !st.reason.is_empty() {
                        st.reason = format!("{}; the capture ring changed", st.reason);
                    }
                    damaged = true;
                }
                if let Some(l) = lost {
                    st.map.mark_all();
                    st.reason = format!("{}; {}", st.reason, l.reason);
                    damaged = true;
                }
                match st.begin_seq {
                    // Resumed: whether its BEGIN was full is not known here;
                    // a target that still lacks a copy says so again.
                    Some(_) if !damaged => Mode::Spool(Some(Run::new(st, false))),
                    _ => {
                        st.begin_seq = None;
                        Mode::Bitmap { st, begin: None }
                    }
                }
            }
            (None, Some(st)) => Mode::Bitmap { st, begin: None },
            (None, None) => Mode::Spool(None),
        };
        if let Mode::Bitmap { st, .. } = &mode {
            st.save(&set.state_path)
                .map_err(|e| io_err("save the resync state", e))?;
            // An empty spool ends where the stream stopped: the target may
            // still lack nothing before it, and must not be asked for more.
            spool.restart_at(st.since_seq);
        }
        let since = match &mode {
            Mode::Bitmap { st, .. } => Some(st.since_seq),
            Mode::Spool(Some(run)) => Some(run.st.since_seq),
            Mode::Spool(None) => None,
        };
        let shared = Arc::new(Shared {
            generation,
            spool,
            durable: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            fatal: Mutex::new(None),
            damaged: Mutex::new(None),
            resync_since: Mutex::new(since),
            kernel_volume: kernel.as_ref().map(|k| (k.device.clone(), k.index)),
            planned: Mutex::new(None),
            failing_over: AtomicBool::new(false),
            copy_required: AtomicBool::new(false),
            target_applied: AtomicU64::new(0),
        });
        let index = kernel.as_ref().map_or(0, |k| k.index);
        let d = Self {
            set,
            consumer,
            kernel,
            index,
            shared: shared.clone(),
            board,
            stop,
            mode,
            generation,
            region_bytes,
            pending: Pending::default(),
            unsaved: 0,
            last_save: Instant::now(),
            volume: None,
            blocked: None,
            last_step: Instant::now(),
            resync_request,
        };
        d.publish();
        Ok((d, shared))
    }

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
                s.health = Health::Critical;
                if !s.reasons.contains(&msg) {
                    s.reasons.push(msg.clone());
                }
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
                return self.save_run();
            }
            let asked = std::mem::take(
                &mut *self
                    .resync_request
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if !asked.is_empty() {
                let from = if asked.iter().all(|r| r.ensure) {
                    self.ensure_full_resync()?
                } else {
                    let why = asked[0].why.clone();
                    self.full_resync(why)?;
                    // Every marker from here on, END included, comes after it.
                    self.consumer.producer_seq()
                };
                for r in asked {
                    // The asker may have stopped waiting.
                    let _ = r.reply.send(from);
                }
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
                s.health = Health::Warning;
                let why = format!(
                    "write failed on the source at sector {sector} (+{len} bytes): region needs resync"
                );
                s.reasons.retain(|x| x != &why);
                s.reasons.push(why);
            });
        }
        match &mut self.mode {
            Mode::Bitmap { st, .. } => {
                if data_op(op) {
                    st.map.mark(d.sector * 512, u64::from(d.len));
                }
                self.unsaved += 1;
            }
            Mode::Spool(_) => {
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

    /// A resync marker reached the drain: every record before it has
    /// completed on the source.
    fn resync_marker(&mut self, r: &Record) -> Result<(), DaemonError> {
        self.check(r)?;
        let d = r.desc;
        let marker = Marker::from_aux(d.aux);
        let spool_next = self.shared.spool.next_seq();
        match (&mut self.mode, marker) {
            // The resync begins here: spool from this record on.
            // The resync begins here: spool from this record on. Only the
            // BEGIN inserted for the map as it is now: one inserted before
            // the map was replaced (a full resync asked for meanwhile) says
            // less than this resync does.
            (Mode::Bitmap { begin, .. }, Some(Marker::Begin { full })) if *begin == Some(r.seq) => {
                self.commit()?;
                let Mode::Bitmap { mut st, .. } =
                    std::mem::replace(&mut self.mode, Mode::Spool(None))
                else {
                    return Ok(());
                };
                st.begin_seq = Some(r.seq);
                // Saved first: a restart then knows the resync began here
                // (and re-drains BEGIN if it was not spooled).
                st.save(&self.set.state_path)
                    .map_err(|e| io_err("save the resync state", e))?;
                tracing::info!(volume = %self.set.volume, seq = r.seq, regions = st.map.count(), full, "resync begins");
                self.mode = Mode::Spool(Some(Run::new(st, full)));
                self.pending.gap = true;
                self.push(r.seq, d.op, d.flags, &d, 0, 0);
            }
            // BEGIN saved but not spooled when the daemon stopped.
            (Mode::Spool(Some(run)), Some(Marker::Begin { .. }))
                if run.st.begin_seq == Some(r.seq)
                    && (r.seq.wrapping_sub(spool_next) as i64) > 0 =>
            {
                self.commit()?;
                self.pending.gap = true;
                self.push(r.seq, d.op, d.flags, &d, 0, 0);
            }
            (Mode::Spool(Some(run)), Some(Marker::Data { region, count })) => {
                run.outstanding = run.outstanding.saturating_sub(1);
                let rb = self.region_bytes;
                let start = region.saturating_mul(rb);
                let end = region
                    .saturating_add(u64::from(count))
                    .saturating_mul(rb)
                    .min(self.set.volume_size);
                if start >= end {
                    self.push(r.seq, OP_SKIPPED, 0, &d, 0, 0);
                    return Ok(());
                }
                let len = end - start;
                let data = self.read_volume(start, len)?;
                self.push(
                    r.seq,
                    frame::ring_op::WRITE,
                    RECORD_FLAG_RESYNC,
                    &d,
                    start / 512,
                    len as u32,
                );
                self.pending.plain.extend_from_slice(&data);
                self.pending.clears.push((region, u64::from(count)));
            }
            (Mode::Spool(Some(run)), Some(Marker::End)) if run.end == Some(r.seq) => {
                self.push(r.seq, d.op, d.flags, &d, 0, 0);
                self.pending.end = true;
            }
            // In the map: nothing to do with markers (their regions stay
            // set).
            (Mode::Bitmap { .. }, _) => {}
            // A marker of an abandoned resync: keep the sequence dense,
            // carry nothing.
            (Mode::Spool(_), _) => self.push(r.seq, OP_SKIPPED, 0, &d, 0, 0),
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the protected volume, bypassing the
    /// page cache (writes through the filesystem do not update the block
    /// device's cache).
    fn read_volume(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, DaemonError> {
        if self.volume.is_none() {
            let path = self.set.device.clone().ok_or_else(|| {
                DaemonError::Critical("resync needs `device` (the protected volume)".into())
            })?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .map_err(|e| DaemonError::io("open the protected volume", &path, e))?;
            self.volume = Some(f);
        }
        let f = self
            .volume
            .as_ref()
            .ok_or_else(|| DaemonError::Critical("protected volume not open".into()))?;
        // O_DIRECT wants an aligned buffer: over-allocate, use the aligned
        // part.
        let mut buf = vec![0u8; len as usize + 4096];
        let at = buf.as_ptr().align_offset(4096);
        let dst = &mut buf[at..at + len as usize];
        f.read_exact_at(dst, offset).map_err(|e| {
            DaemonError::Critical(format!(
                "resync: cannot read the protected volume at byte {offset} (+{len}): {e}"
            ))
        })?;
        Ok(dst.to_vec())
    }

    /// Starts a needed resync, or keeps a running one supplied with DATA
    /// markers (paced by the spool's unacknowledged bytes), and ends it.
    fn resync_step(&mut self) -> Result<(), DaemonError> {
        if let Some(why) = self.resync_step_inner()? {
            self.block(why);
        }
        Ok(())
    }

    /// [`Self::resync_step`]; returns why a needed resync cannot start.
    fn resync_step_inner(&mut self) -> Result<Option<&'static str>, DaemonError> {
        let Some(k) = &self.kernel else {
            return Ok(matches!(self.mode, Mode::Bitmap { .. })
                .then_some("the capture ring is a ring file (development mode)"));
        };
        if self.consumer.overflowing() {
            return Ok(None);
        }
        let spool = &self.shared.spool;
        match &mut self.mode {
            Mode::Bitmap { begin, st } => {
                if begin.is_some() {
                    return Ok(None);
                }
                // Full when the map holds every region: the target may then
                // count on every region being resent.
                let full = st.map.count() == st.map.regions();
                if self.set.device.is_none() {
                    return Ok(Some("`device` (the protected volume) is not configured"));
                }
                if !self.shared.connected.load(Ordering::Acquire) {
                    return Ok(None);
                }
                match k.device.insert_marker(
                    k.index,
                    RECORD_FLAG_RESYNC,
                    Marker::Begin { full }.aux(),
                ) {
                    Ok(seq) => {
                        tracing::info!(volume = %self.set.volume, seq, "resync requested");
                        *begin = Some(seq);
                        self.blocked = None;
                    }
                    Err(e) => tracing::debug!(error = %e, "resync BEGIN not inserted yet"),
                }
            }
            Mode::Spool(Some(run)) => {
                if run.end.is_some() {
                    return Ok(None);
                }
                let max_regions = (self.set.resync_max_bytes / self.region_bytes).clamp(1, 65535);
                // Never let a resync itself fill the spool to its limit.
                let window = self.set.resync_window.min(self.set.limit_bytes / 4);
                while run.outstanding < MAX_OUTSTANDING && spool.unacked_bytes() < window {
                    let next = run.st.map.next_run(run.cursor, max_regions);
                    let aux = match next {
                        Some((region, count)) => Marker::Data {
                            region,
                            count: count as u32,
                        }
                        .aux(),
                        None if run.outstanding == 0 && self.pending.clears.is_empty() => {
                            if run.st.map.count() > 0 && run.cursor != 0 {
                                // Regions behind the cursor (a resync
                                // resumed after a restart, or added by the
                                // kernel's bitmap): another lap.
                                run.cursor = 0;
                                continue;
                            }
                            // Every region of the map was sent and no DATA
                            // marker is in flight: what the kernel marked
                            // since is sent before END.
                            match Self::kernel_settled(k, run, &self.set)? {
                                Settled::Yes => {}
                                Settled::Added(_) => continue,
                                Settled::InFlight(_) | Settled::Unknown => break,
                            }
                            Marker::End.aux()
                        }
                        None => break,
                    };
                    match k.device.insert_marker(k.index, RECORD_FLAG_RESYNC, aux) {
                        Ok(seq) => match next {
                            Some((region, count)) => {
                                run.outstanding += 1;
                                run.cursor = region + count;
                            }
                            None => {
                                run.end = Some(seq);
                                break;
                            }
                        },
                        Err(e) => {
                            tracing::debug!(error = %e, "resync marker not inserted yet");
                            break;
                        }
                    }
                }
            }
            Mode::Spool(None) => {}
        }
        Ok(None)
    }

    /// Before a resync's END (every region of the run's map sent, no DATA
    /// marker in flight): takes the kernel's bitmap again into the run's
    /// map. The map is saved as "whole volume" first, since the kernel
    /// clears what it hands over; then the merged map is saved.
    fn kernel_settled(
        k: &KernelRing,
        run: &mut Run,
        set: &DrainSettings,
    ) -> Result<Settled, DaemonError> {
        if run
            .last_kernel_take
            .is_some_and(|t| run.kernel_in_flight > 0 && t.elapsed() < KERNEL_RETAKE)
        {
            return Ok(Settled::InFlight(run.kernel_in_flight));
        }
        let mut whole = run.st.clone();
        whole.map.mark_all();
        whole
            .save(&set.state_path)
            .map_err(|e| io_err("save the resync state", e))?;
        let b = match k.device.take_bitmap(k.index) {
            Ok(b) => b,
            Err(e) => {
                // Nothing was taken (the kernel keeps the bits of a failed
                // hand-over): the map as it was.
                run.st
                    .save(&set.state_path)
                    .map_err(|e| io_err("save the resync state", e))?;
                let why = e.to_string();
                if run.kernel_take_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!(volume = %set.volume, error = %why, "cannot take the kernel's dirty bitmap before the resync's END; the resync does not end until it can");
                    run.kernel_take_error = Some(why);
                }
                run.last_kernel_take = Some(Instant::now());
                run.kernel_in_flight = 1;
                return Ok(Settled::Unknown);
            }
        };
        let settled = merge_before_end(
            &mut run.st.map,
            u64::from(b.region_kib) * 1024,
            b.regions_set(),
            b.in_flight_overflow,
        );
        run.st
            .save(&set.state_path)
            .map_err(|e| io_err("save the resync state", e))?;
        run.unsaved = false;
        run.last_save = Instant::now();
        let was_in_flight = run.kernel_in_flight;
        run.kernel_take_error = None;
        run.last_kernel_take = Some(Instant::now());
        run.kernel_in_flight = b.in_flight_overflow;
        match settled {
            Settled::Added(n) => {
                run.total = run.total.saturating_add(n);
                run.cursor = 0;
                tracing::warn!(
                    volume = %set.volume,
                    regions = n,
                    in_flight_overflow = b.in_flight_overflow,
                    "the kernel marked regions dirty after the resync took its bitmap (failed writes, or writes made in overflow mode that completed later): they are resent before the resync ends"
                );
            }
            Settled::InFlight(n) if was_in_flight == 0 => {
                tracing::info!(
                    volume = %set.volume,
                    in_flight_overflow = n,
                    "writes made in overflow mode are still in flight: the resync ends once they completed and their regions were resent"
                );
            }
            Settled::InFlight(_) | Settled::Yes | Settled::Unknown => {}
        }
        Ok(settled)
    }

    /// Says (once) why a needed resync cannot start.
    fn block(&mut self, why: &str) {
        if self.blocked.as_deref() != Some(why) {
            tracing::warn!(volume = %self.set.volume, "a resync is needed but cannot start: {why}");
            self.blocked = Some(why.to_owned());
        }
    }

    /// Saves a running resync's remaining regions if they changed.
    fn save_run(&mut self) -> Result<(), DaemonError> {
        if let Mode::Spool(Some(run)) = &mut self.mode {
            if run.unsaved {
                run.st
                    .save(&self.set.state_path)
                    .map_err(|e| io_err("save the resync state", e))?;
                run.unsaved = false;
                run.last_save = Instant::now();
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
                    st.save(&self.set.state_path)
                        .map_err(|e| io_err("save the resync state", e))?;
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

    /// A chunk reached the spool: the regions it resends are no longer
    /// dirty; with the END in it, the resync is over.
    fn after_spooled(&mut self) -> Result<(), DaemonError> {
        let Mode::Spool(Some(run)) = &mut self.mode else {
            return Ok(());
        };
        for (region, count) in self.pending.clears.drain(..) {
            run.st.map.clear(region, count);
            run.unsaved = true;
        }
        if self.pending.end {
            let end = run.end.unwrap_or(0);
            tracing::info!(volume = %self.set.volume, end, "resync complete: every dirty region was resent");
            match std::fs::remove_file(&self.set.state_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove the resync state", e)),
            }
            self.mode = Mode::Spool(None);
            self.shared.set_resync(None);
            self.board.update(&self.set.volume, |s| {
                s.resync_end_seq = end;
                s.reasons.retain(|r| !r.starts_with(RESYNC_REASON));
                if s.reasons.is_empty() && s.health == Health::Warning {
                    s.health = Health::OK;
                }
            });
            self.publish();
            return Ok(());
        }
        if run.unsaved && run.last_save.elapsed() >= Duration::from_millis(500) {
            self.save_run()?;
        }
        Ok(())
    }

    /// Switches to the dirty map: the regions of every record the target
    /// does not have (from the spool, when it is dropped, and pending) and
    /// those a running resync has not sent yet are marked, the state is
    /// saved, then the spool is dropped.
    fn go_resync(&mut self, why: String, drop_spool: bool) -> Result<(), DaemonError> {
        let spool = self.shared.spool.clone();
        let durable = self.shared.durable.load(Ordering::Acquire);
        let oldest = spool.oldest_seq();
        let since = if drop_spool {
            let d1 = durable.wrapping_add(1);
            if (d1.wrapping_sub(oldest) as i64) > 0 {
                d1
            } else {
                oldest
            }
        } else {
            spool.next_seq()
        };
        let mut map = match std::mem::replace(&mut self.mode, Mode::Spool(None)) {
            Mode::Spool(Some(run)) => run.st.map,
            _ => DirtyMap::new(self.set.volume_size, self.region_bytes),
        };
        if drop_spool {
            let r = spool.for_each_record(since, |rv| {
                if data_op(rv.op) {
                    map.mark(rv.sector * 512, u64::from(rv.len));
                }
            });
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot read the spool back: the whole volume needs a resync");
                map.mark_all();
            }
        }
        if let Some(first) = self.pending.first {
            match frame::decode_record_run(first, self.pending.count, &self.pending.plain) {
                Ok(recs) => {
                    for rv in recs.iter().filter(|rv| data_op(rv.op)) {
                        map.mark(rv.sector * 512, u64::from(rv.len));
                    }
                }
                Err(_) => map.mark_all(),
            }
        }
        let st = ResyncState {
            generation: self.generation,
            since_seq: since,
            reason: why.clone(),
            map,
            begin_seq: None,
        };
        st.save(&self.set.state_path)
            .map_err(|e| io_err("save the resync state", e))?;
        if drop_spool {
            spool
                .drop_all(since)
                .map_err(|e| io_err("drop the spool", e))?;
        }
        self.pending.clear();
        let next = self.consumer.next_seq();
        self.consumer.release(next)?;
        tracing::error!(
            volume = %self.set.volume,
            since_seq = since,
            regions = st.map.count(),
            "{why}: replication continues as a dirty-region map; the volume needs a resync"
        );
        self.shared.set_resync(Some(since));
        self.mode = Mode::Bitmap { st, begin: None };
        self.last_save = Instant::now();
        self.publish();
        Ok(())
    }

    /// Every region of the volume is to be resent (an initial copy, or an
    /// operator's request): what the spool holds still ships, then the
    /// stream stops and a resync of the whole volume follows.
    fn full_resync(&mut self, why: String) -> Result<(), DaemonError> {
        self.commit()?;
        let since = self.shared.spool.next_seq();
        let mut st = match std::mem::replace(&mut self.mode, Mode::Spool(None)) {
            Mode::Bitmap { mut st, .. } => {
                st.reason = format!("{}; {why}", st.reason);
                st
            }
            Mode::Spool(run) => ResyncState {
                generation: self.generation,
                since_seq: since,
                reason: why.clone(),
                map: match run {
                    Some(run) => run.st.map,
                    None => DirtyMap::new(self.set.volume_size, self.region_bytes),
                },
                begin_seq: None,
            },
        };
        st.begin_seq = None;
        st.map.mark_all();
        st.save(&self.set.state_path)
            .map_err(|e| io_err("save the resync state", e))?;
        tracing::warn!(volume = %self.set.volume, since_seq = st.since_seq, "{why}: every region will be resent");
        self.shared.set_resync(Some(st.since_seq));
        self.mode = Mode::Bitmap { st, begin: None };
        self.last_save = Instant::now();
        self.publish();
        Ok(())
    }

    /// The target holds no consistent copy: a full resync must come, unless
    /// one is pending (the map holds every region) or running with a BEGIN
    /// that still reaches this target (not yet durable there, or durable
    /// and not yet applied: a target that had applied it would not ask).
    /// Returns a ring position the resync's END comes after.
    fn ensure_full_resync(&mut self) -> Result<u64, DaemonError> {
        let durable = self.shared.durable.load(Ordering::Acquire);
        let applied = self.shared.target_applied.load(Ordering::Acquire);
        let keep = match &self.mode {
            Mode::Bitmap { st, .. } if st.map.count() == st.map.regions() => {
                Some(self.consumer.producer_seq())
            }
            Mode::Spool(Some(run)) if run.full => run.st.begin_seq.filter(|&b| {
                (b.wrapping_sub(durable) as i64) > 0 || (applied.wrapping_sub(b) as i64) < 0
            }),
            _ => None,
        };
        if let Some(from) = keep {
            return Ok(from);
        }
        self.full_resync("the target holds no consistent copy of the volume".into())?;
        Ok(self.consumer.producer_seq())
    }

    /// The kernel ring overflowed: writes after the last record are only in
    /// its dirty bitmap. The spool keeps the consistent prefix; the bitmap
    /// is taken (which ends the overflow) into the saved map, with whatever
    /// a running resync had not sent yet.
    fn overflowed(&mut self) -> Result<(), DaemonError> {
        let next = self.consumer.next_seq();
        let mut st = match std::mem::replace(&mut self.mode, Mode::Spool(None)) {
            Mode::Bitmap { st, .. } => st,
            Mode::Spool(run) => ResyncState {
                generation: self.generation,
                since_seq: self.shared.spool.next_seq(),
                reason: "capture ring overflowed".into(),
                map: match run {
                    Some(run) => run.st.map,
                    None => DirtyMap::new(self.set.volume_size, self.region_bytes),
                },
                begin_seq: None,
            },
        };
        st.begin_seq = None;
        // Saved as "whole volume" first: the kernel clears its bitmap when
        // it hands it over, so dying between the two must not forget it.
        let mut whole = st.clone();
        whole.map.mark_all();
        whole
            .save(&self.set.state_path)
            .map_err(|e| io_err("save the resync state", e))?;
        match &self.kernel {
            Some(k) => {
                let b = k.device.take_bitmap(k.index)?;
                st.map
                    .merge_regions(u64::from(b.region_kib) * 1024, b.regions_set());
                if b.resume_seq != next {
                    tracing::error!(
                        resume = b.resume_seq,
                        next,
                        "capture resumed away from the drain position: marking the whole volume"
                    );
                    st.map.mark_all();
                }
            }
            None => st.map.mark_all(),
        }
        if !st.reason.contains("overflow") {
            st.reason = format!("{}; capture ring overflowed", st.reason);
        }
        st.save(&self.set.state_path)
            .map_err(|e| io_err("save the resync state", e))?;
        tracing::error!(
            volume = %self.set.volume,
            since_seq = st.since_seq,
            regions = st.map.count(),
            "capture ring overflowed: the volume needs a resync"
        );
        self.shared.set_resync(Some(st.since_seq));
        self.mode = Mode::Bitmap { st, begin: None };
        self.publish();
        Ok(())
    }

    /// Publishes lag, spool and resync figures.
    fn publish(&self) {
        let c = &self.consumer;
        let spool = &self.shared.spool;
        let durable = self.shared.durable.load(Ordering::Acquire);
        let produced = c.producer_seq();
        let spooled = spool.next_seq();
        let (map, running) = match &self.mode {
            Mode::Bitmap { st, .. } => (Some(st), None),
            Mode::Spool(Some(run)) => (Some(&run.st), Some(run)),
            Mode::Spool(None) => (None, None),
        };
        let stopped = matches!(self.mode, Mode::Bitmap { .. });
        // Records the target lacks: in the spool and still in the ring (or,
        // while the stream is stopped, only those the spool can still ship).
        let end = if stopped { spooled } else { produced };
        let records = end.wrapping_sub(durable.wrapping_add(1));
        let records = if (records as i64) < 0 { 0 } else { records };
        let now = replica_ring::now_ns();
        let oldest_ns = spool
            .oldest_unacked_ns()
            .or_else(|| c.submit_ns(c.released_seq()));
        let seconds = match (records, oldest_ns) {
            (0, _) | (_, None) => 0.0,
            (_, Some(t)) => now.saturating_sub(t) as f64 / 1e9,
        };
        let bytes = spool.unacked_bytes() + if stopped { 0 } else { c.data_bytes_in_use() };
        let spool_bytes = spool.unacked_bytes();
        let blocked = self.blocked.clone();
        self.board.update(&self.set.volume, |s| {
            s.captured_seq = c.next_seq();
            s.spooled_seq = spooled;
            s.spool_bytes = spool_bytes;
            s.lag_records = records;
            s.lag_bytes = if records == 0 { 0 } else { bytes };
            s.lag_seconds = seconds;
            s.reasons.retain(|r| !r.starts_with(RESYNC_REASON));
            match map {
                Some(st) => {
                    s.needs_resync = true;
                    s.resync_since_seq = st.since_seq;
                    s.dirty_regions = st.map.count();
                    s.dirty_bytes = st.map.count() * st.map.region_bytes();
                    s.resync_running = running.is_some();
                    s.resync_total_regions = running.map_or(st.map.count(), |r| r.total);
                    s.replica = if running.is_some() {
                        "Inconsistent"
                    } else {
                        "Outdated"
                    }
                    .into();
                    let state = match (running, &blocked) {
                        (Some(r), _) => format!(
                            "resync running: {} of {} regions left",
                            st.map.count(),
                            r.total
                        ),
                        (None, Some(b)) => format!("resync cannot start: {b}"),
                        (None, None) => "resync starts when the target is connected".into(),
                    };
                    s.reasons.push(format!(
                        "{RESYNC_REASON}: {} ({} regions dirty since record {}; {state})",
                        st.reason,
                        st.map.count(),
                        st.since_seq
                    ));
                    if s.health == Health::OK {
                        s.health = Health::Warning;
                    }
                }
                None => {
                    s.needs_resync = false;
                    s.resync_running = false;
                    s.dirty_regions = 0;
                    s.dirty_bytes = 0;
                    s.replica = if durable == 0 && records > 0 {
                        "Inconsistent"
                    } else if records == 0 {
                        "UpToDate"
                    } else {
                        "Consistent"
                    }
                    .into();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB64: u64 = 64 * 1024;

    #[test]
    fn a_resync_ends_only_after_a_take_with_nothing_new_and_nothing_in_flight() {
        // The run's map is empty at END time (every region was sent).
        let mut map = DirtyMap::new(16 << 20, KIB64);
        // An overflow-mode write in flight: its bit was cleared by the first
        // take and is not set again yet.
        assert_eq!(
            merge_before_end(&mut map, KIB64, std::iter::empty(), 1),
            Settled::InFlight(1)
        );
        assert_eq!(map.count(), 0);
        // It completed and set its two regions again; another write of a
        // region still in flight.
        assert_eq!(
            merge_before_end(&mut map, KIB64, [3, 4].into_iter(), 1),
            Settled::Added(2)
        );
        assert!(map.is_set(3) && map.is_set(4));
        // Sent (the lap), then taken again: nothing new, but still in flight.
        map.clear(3, 2);
        assert_eq!(
            merge_before_end(&mut map, KIB64, std::iter::empty(), 1),
            Settled::InFlight(1)
        );
        // The last one completed: its region comes back once more.
        assert_eq!(
            merge_before_end(&mut map, KIB64, [9].into_iter(), 0),
            Settled::Added(1)
        );
        map.clear(9, 1);
        assert_eq!(
            merge_before_end(&mut map, KIB64, std::iter::empty(), 0),
            Settled::Yes
        );
    }

    #[test]
    fn kernel_regions_of_another_size_are_merged_as_bytes() {
        // The kernel's 16 KiB regions into a map of 64 KiB regions: two
        // kernel bits in one map region add one.
        let mut map = DirtyMap::new(16 << 20, KIB64);
        assert_eq!(
            merge_before_end(&mut map, 16 * 1024, [4, 5, 8].into_iter(), 0),
            Settled::Added(2)
        );
        assert!(map.is_set(1) && map.is_set(2));
        // Bits the map already holds add nothing (but the run must not end
        // while writes are in flight).
        assert_eq!(
            merge_before_end(&mut map, 16 * 1024, [4].into_iter(), 2),
            Settled::InFlight(2)
        );
    }

    #[test]
    fn a_planned_failover_is_refused_while_any_region_is_unresent() {
        assert_eq!(planned_failover_refusal(None, Ok(None)), None);
        assert_eq!(planned_failover_refusal(None, Ok(Some(0))), None);
        let r = planned_failover_refusal(Some(17), Ok(Some(0))).expect("needs resync");
        assert!(r.contains("needs a resync") && r.contains("17"), "{r}");
        let r = planned_failover_refusal(None, Ok(Some(4))).expect("kernel dirty");
        assert!(r.contains("4 dirty regions"), "{r}");
        let r = planned_failover_refusal(None, Err("ENOENT".into())).expect("unknown");
        assert!(r.contains("cannot read") && r.contains("ENOENT"), "{r}");
    }
}

/// The stream takes only the replicated volume's records.
#[cfg(test)]
mod volume_index_tests {
    use super::*;
    use crate::status::{Role, VolumeStatus};
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
        let (mut drainer, shared) =
            Drainer::new(set, consumer, None, board.clone(), stop, Default::default())
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
            s.reasons.iter().any(|r| r.contains("volume index 1")),
            "{:?}",
            s.reasons
        );
        assert_eq!(shared.spool.next_seq(), 2, "still nothing more spooled");
    }
}
