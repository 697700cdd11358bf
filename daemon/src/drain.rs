//! The drain thread of the source: capture ring → spool, continuously and
//! independently of the connection to the target, so the ring (kernel
//! memory) holds seconds of writes and the spool holds outages.
//!
//! While the stream can carry every write, records go to the spool in ring
//! order and ring space is released as soon as a chunk is written. When it
//! cannot (the spool reaches its limit or cannot be written, the kernel ring
//! overflowed, records were lost from a damaged spool), the drain switches to
//! a dirty-region map: records only mark the regions they touch, the map is
//! saved before their ring space is released, and the volume needs a resync.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replica_proto::frame::{self, OP_SKIPPED};
use replica_ring::device::Device;
use replica_ring::{Peek, Record};

use crate::dirty::{DirtyMap, ResyncState};
use crate::source::RingConsumer;
use crate::spool::Spool;
use crate::status::{Health, StatusBoard};
use crate::DaemonError;

/// Prefix of the status reason while a resync is needed.
pub const RESYNC_REASON: &str = "needs resync";

/// The kernel side of a ring, for its dirty bitmap.
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
}

/// What the drain shares with the shipping sessions and the main loop.
pub struct Shared {
    /// The capture ring's generation.
    pub generation: [u8; 16],
    /// The spool.
    pub spool: Arc<Spool>,
    /// Last record the target has durably (the sessions raise it).
    pub durable: AtomicU64,
    /// The ring is dead and everything it held is spooled.
    pub closed: AtomicBool,
    /// A non-recoverable drain error.
    pub fatal: Mutex<Option<String>>,
    /// A session found the spool damaged: the drain turns it into a resync.
    pub damaged: Mutex<Option<String>>,
    /// Set while a resync is needed: the first record the stream lacks.
    pub resync_since: Mutex<Option<u64>>,
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

    /// Whether a resync is needed.
    pub fn needs_resync(&self) -> Option<u64> {
        *self.resync_since.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Mode {
    Spool,
    Bitmap(ResyncState),
}

/// Records drained but not yet committed to the spool (or map).
#[derive(Default)]
struct Pending {
    plain: Vec<u8>,
    first: Option<u64>,
    count: u32,
    first_ns: u64,
    last_ns: u64,
}

impl Pending {
    fn clear(&mut self) {
        self.plain.clear();
        self.first = None;
        self.count = 0;
    }
}

/// The drain thread's state.
pub struct Drainer {
    set: DrainSettings,
    consumer: RingConsumer,
    kernel: Option<KernelRing>,
    shared: Arc<Shared>,
    board: Arc<StatusBoard>,
    stop: Arc<AtomicBool>,
    mode: Mode,
    generation: [u8; 16],
    pending: Pending,
    /// Bitmap mode: records marked since the map was last saved.
    unsaved: u64,
    last_save: Instant,
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
        spool_dir: &std::path::Path,
        spool_file_bytes: u64,
        board: Arc<StatusBoard>,
        stop: Arc<AtomicBool>,
    ) -> Result<(Self, Arc<Shared>), DaemonError> {
        let generation = consumer.mapping().generation();
        let tag = replica_proto::keys::volume_tag(&set.volume);
        let (spool, rec) = Spool::open(spool_dir, generation, tag, spool_file_bytes)
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
        let saved = match ResyncState::load(&set.state_path) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "resync state unreadable: the whole volume needs a resync");
                let mut map = DirtyMap::new(set.volume_size, region_bytes);
                map.mark_all();
                Some(ResyncState {
                    generation,
                    since_seq: rec.next_seq.unwrap_or(consumer.released_seq()),
                    reason: format!("resync state unreadable ({e})"),
                    map,
                })
            }
        };
        let released = consumer.released_seq();
        let spool = Arc::new(spool);
        let mut resync: Option<ResyncState> = None;
        let whole = |why: String, since: u64| {
            let mut map = DirtyMap::new(set.volume_size, region_bytes);
            map.mark_all();
            tracing::error!(volume = %set.volume, "{why}: the whole volume needs a resync");
            ResyncState {
                generation,
                since_seq: since,
                reason: why,
                map,
            }
        };
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
                // The spool lost records the ring no longer has.
                resync = Some(whole(
                    format!("spool lost records {s}..{}", released.wrapping_sub(1)),
                    s,
                ));
                // The ring continues at `released`; the spool cannot.
            }
        }
        if rec.other_generation && resync.is_none() && saved.is_none() {
            resync = Some(whole(
                "the spool belonged to another capture ring (the host restarted)".into(),
                released,
            ));
        }
        let mode = match (saved, resync) {
            (Some(mut st), lost) => {
                if st.generation != generation {
                    st.map.mark_all();
                    st.generation = generation;
                    st.reason = format!("{}; the capture ring changed", st.reason);
                }
                if let Some(l) = lost {
                    st.map.mark_all();
                    st.reason = format!("{}; {}", st.reason, l.reason);
                }
                Mode::Bitmap(st)
            }
            (None, Some(st)) => Mode::Bitmap(st),
            (None, None) => Mode::Spool,
        };
        if let Mode::Bitmap(st) = &mode {
            st.save(&set.state_path)
                .map_err(|e| io_err("save the resync state", e))?;
            // An empty spool ends where the stream stopped: the target may
            // still lack nothing before it, and must not be asked for more.
            spool.restart_at(st.since_seq);
        }
        let shared = Arc::new(Shared {
            generation,
            spool,
            durable: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            fatal: Mutex::new(None),
            damaged: Mutex::new(None),
            resync_since: Mutex::new(match &mode {
                Mode::Bitmap(st) => Some(st.since_seq),
                Mode::Spool => None,
            }),
        });
        let d = Self {
            set,
            consumer,
            kernel,
            shared: shared.clone(),
            board,
            stop,
            mode,
            generation,
            pending: Pending::default(),
            unsaved: 0,
            last_save: Instant::now(),
        };
        d.publish();
        Ok((d, shared))
    }

    /// Runs until stopped or the ring is dead and drained; a fatal error is
    /// left in [`Shared::fatal`].
    pub fn run(mut self) {
        if let Err(e) = self.run_inner() {
            let msg = e.to_string();
            tracing::error!(volume = %self.set.volume, "capture drain stopped: {msg}");
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
                if matches!(self.mode, Mode::Spool) {
                    self.commit()?;
                    self.go_resync(format!("spool unreadable ({why})"), true)?;
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return self.commit();
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
            self.take(&r, ok)?;
            self.consumer.advance(&r);
            let full = match self.mode {
                Mode::Spool => self.pending.plain.len() >= self.set.chunk_bytes,
                // Keep ring space flowing while saving the map rarely.
                Mode::Bitmap(_) => {
                    self.unsaved >= 4096 || self.last_save.elapsed() >= Duration::from_millis(200)
                }
            };
            if full {
                self.commit()?;
            }
        }
    }

    /// Adds one drained record to the pending chunk (or the map).
    fn take(&mut self, r: &Record, ok: bool) -> Result<(), DaemonError> {
        let d = &r.desc;
        if d.volume > u32::from(u16::MAX) {
            return Err(DaemonError::Critical(format!(
                "record {} names volume index {}",
                r.seq, d.volume
            )));
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
            Mode::Bitmap(st) => {
                if data_op(op) {
                    st.map.mark(d.sector * 512, u64::from(d.len));
                }
                self.unsaved += 1;
            }
            Mode::Spool => {
                let p = &mut self.pending;
                frame::encode_record_parts(
                    &mut p.plain,
                    r.seq,
                    op,
                    d.flags,
                    d.volume,
                    d.sector,
                    d.len,
                    d.submit_ns,
                    d.aux,
                    &[],
                );
                if ok {
                    self.consumer.append_payload(r, &mut p.plain)?;
                }
                if p.first.is_none() {
                    p.first = Some(r.seq);
                    p.first_ns = d.submit_ns;
                }
                p.count += 1;
                p.last_ns = d.submit_ns;
            }
        }
        Ok(())
    }

    /// Writes the pending chunk to the spool (or saves the map) and releases
    /// its ring space.
    fn commit(&mut self) -> Result<(), DaemonError> {
        match &mut self.mode {
            Mode::Bitmap(st) => {
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
            Mode::Spool => {
                let Some(first) = self.pending.first else {
                    return Ok(());
                };
                let p = &self.pending;
                match self
                    .shared
                    .spool
                    .append(first, p.count, p.first_ns, p.last_ns, &p.plain)
                {
                    Ok(()) => {
                        let upto = first.wrapping_add(u64::from(p.count));
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

    /// Switches to the dirty map: the regions of every record the target
    /// does not have (from the spool, when it is dropped, and pending) are
    /// marked, the state is saved, then the spool is dropped.
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
        let mut map = DirtyMap::new(self.set.volume_size, self.map_region_bytes());
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
        *self
            .shared
            .resync_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(since);
        self.mode = Mode::Bitmap(st);
        self.last_save = Instant::now();
        self.publish();
        Ok(())
    }

    fn map_region_bytes(&self) -> u64 {
        match &self.kernel {
            Some(k) => k
                .device
                .volume(k.index)
                .ok()
                .flatten()
                .map_or(self.set.region_bytes, |v| u64::from(v.region_kib) * 1024),
            None => self.set.region_bytes,
        }
    }

    /// The kernel ring overflowed: writes after the last record are only in
    /// its dirty bitmap. The spool keeps the consistent prefix; the bitmap
    /// is taken (which ends the overflow) into the saved map.
    fn overflowed(&mut self) -> Result<(), DaemonError> {
        let next = self.consumer.next_seq();
        let since = match &self.mode {
            Mode::Spool => self.shared.spool.next_seq(),
            Mode::Bitmap(st) => st.since_seq,
        };
        let mut st = match std::mem::replace(&mut self.mode, Mode::Spool) {
            Mode::Bitmap(st) => st,
            Mode::Spool => ResyncState {
                generation: self.generation,
                since_seq: since,
                reason: "capture ring overflowed".into(),
                map: DirtyMap::new(self.set.volume_size, self.map_region_bytes()),
            },
        };
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
        *self
            .shared
            .resync_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(st.since_seq);
        self.mode = Mode::Bitmap(st);
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
        let resync = match &self.mode {
            Mode::Bitmap(st) => Some(st),
            Mode::Spool => None,
        };
        // Records the target lacks: in the spool and still in the ring (or,
        // needing a resync, only those the spool can still ship).
        let end = if resync.is_some() { spooled } else { produced };
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
        let bytes = spool.unacked_bytes()
            + if resync.is_some() {
                0
            } else {
                c.data_bytes_in_use()
            };
        let spool_bytes = spool.unacked_bytes();
        self.board.update(&self.set.volume, |s| {
            s.captured_seq = c.next_seq();
            s.spooled_seq = spooled;
            s.spool_bytes = spool_bytes;
            s.lag_records = records;
            s.lag_bytes = if records == 0 { 0 } else { bytes };
            s.lag_seconds = seconds;
            match resync {
                Some(st) => {
                    s.needs_resync = true;
                    s.resync_since_seq = st.since_seq;
                    s.dirty_regions = st.map.count();
                    s.dirty_bytes = st.map.count() * st.map.region_bytes();
                    s.replica = "Outdated".into();
                    let why = format!(
                        "{RESYNC_REASON}: {} ({} regions dirty since record {})",
                        st.reason,
                        st.map.count(),
                        st.since_seq
                    );
                    s.reasons.retain(|r| !r.starts_with(RESYNC_REASON));
                    s.reasons.push(why);
                    if s.health == Health::OK {
                        s.health = Health::Warning;
                    }
                }
                None => {
                    s.needs_resync = false;
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
