//! Start-up reconciliation of the drain: the spool, the saved resync state
//! and the ring after a start or restart.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use replica_ring::Peek;

use super::resync::Run;
use super::{io_err, DrainSettings, Drainer, KernelRing, Mode, Pending, Requests, Shared};
use crate::keystore::KeyStore;
use crate::source::dirty::CursorKeys;
use crate::source::dirty::{DirtyMap, ResyncState};
use crate::source::ring::RingConsumer;
use crate::source::spool::Spool;
use crate::status::StatusBoard;
use crate::DaemonError;

impl Drainer {
    /// Reconciles the spool, the saved resync state and the ring after a
    /// start (or restart) and returns the drain, ready to run.
    pub fn new(
        set: DrainSettings,
        mut consumer: RingConsumer,
        kernel: Option<KernelRing>,
        board: Arc<StatusBoard>,
        stop: Arc<AtomicBool>,
        requests: Requests,
        keys: Arc<KeyStore>,
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
        // The map's regions are the resync's chunks; the kernel's bitmap
        // (its own region size) merges into it.
        let region_bytes = set.region_bytes;
        if let Some(k) = &kernel {
            // The volume must be in the group (checked here, at start).
            k.device.volume(k.index)?;
        }
        let released = consumer.released_seq();
        let whole = |why: String, since: u64| {
            let mut map = DirtyMap::new(set.volume_size, region_bytes);
            map.mark_all();
            tracing::error!(volume = %set.volume, "{why}: the whole volume needs a resync");
            ResyncState::new(generation, since, why, map)
        };
        let ring = keys.get();
        let cursor_keys = CursorKeys {
            ring: &ring,
            volume: &set.volume,
        };
        let saved = match ResyncState::load(&set.state_path, &cursor_keys) {
            Ok(s) => s,
            // Damaged, edited, of another version or another volume's: not
            // trusted; every chunk is compared again.
            Err(e) => Some(whole(
                format!("resync state refused ({e})"),
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
                if st.map.volume_size() != set.volume_size {
                    // Made for another size of the volume: its chunks are
                    // not this volume's.
                    tracing::error!(volume = %set.volume, was = st.map.volume_size(), now = set.volume_size, "the resync state is for another volume size: the whole volume needs a resync");
                    st = whole(
                        format!("{}; the volume size changed", st.reason),
                        st.since_seq,
                    );
                    damaged = true;
                }
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
                    // Resumed (the cursor says whether its BEGIN was full).
                    Some(_) if !damaged => {
                        tracing::info!(volume = %set.volume, chunks_left = st.map.count(), of = st.map.regions(), to_send = st.differ.count(), "resync resumes from its saved cursor");
                        let full = st.full;
                        Mode::Spool(Some(Box::new(Run::new(st, full, true))))
                    }
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
            st.save(&set.state_path, &cursor_keys)
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
            answers: Mutex::new(Vec::new()),
            zeroes: Mutex::new(None),
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
            requests,
            keys,
        };
        if let Some(report) = super::verify::load_report(&d.set.state_path) {
            d.board
                .update(&d.set.volume, |s| super::verify::apply_report(s, &report));
        }
        d.publish();
        Ok((d, shared))
    }
}
