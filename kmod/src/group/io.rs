// SPDX-License-Identifier: GPL-2.0

//! The bio path of a group: capture in `map`, completion in `end_io`, and
//! the deferred work that submits held bios when their blockers complete
//! and waiting bios when ring space is released, or, after the bounded
//! wait, switches the ring to overflow (the dirty bitmap).

use kernel::prelude::*;
use kernel::sync::Arc;

use crate::capture::{CaptureError, Request};
use crate::dm::sys::{self, desc_field_offset};
use crate::dm::{Bio, BioQueue, Mapped};
use crate::ring_abi as abi;

use super::{BioKind, Group, GroupState, PerBio};

impl Group {
    // --- Capture path (map) ---------------------------------------------------------

    /// Captures a data-changing bio or a flush of volume `volume`, already
    /// remapped to the data device, and says what map returns.
    pub(crate) fn capture(this: &Arc<Self>, mut bio: Bio<'_, PerBio>, req: Request, flags: u8) -> Mapped {
        let mut pb = PerBio {
            kind: BioKind::Passthrough,
            copy_failed: false,
            op: req.op.abi(),
            flags,
            volume: req.volume,
            len: req.len,
            seq: 0,
            sector: req.sector,
            submit_ns: sys::now_ns(),
        };
        let mut st = this.state.lock();
        if !st.waiting.is_empty() {
            // Writes already wait for space: queue behind them, in order.
            pb.kind = BioKind::Waiting;
            bio.set_per_bio(pb);
            let (held, mapped) = bio.hold();
            st.waiting.push_back(held);
            drop(st);
            Self::kick(this);
            return mapped;
        }
        if st.cap.overflowing() {
            Self::overflow_one(&mut st, &req, &mut pb);
            bio.set_per_bio(pb);
            return bio.remapped();
        }
        match st.cap.reserve(&req) {
            Ok(r) => {
                pb.kind = BioKind::Captured;
                pb.seq = r.seq;
                this.publish_header(&st);
                drop(st);
                pb.copy_failed = !this.fill_record(&r, &pb, 0, Some(&bio));
                bio.set_per_bio(pb);
                this.publish_stamp(r.seq, abi::STATE_PENDING);
                // Fault injection (harness check only): never hold back.
                let blocked = r.blocked && !cfg!(dm_replica_no_hold);
                if blocked {
                    let mut st = this.state.lock();
                    if st.cap.is_blocked(r.seq) && st.cap.set_held(r.seq).is_ok() {
                        let (held, mapped) = bio.hold();
                        let slot = abi::desc_slot(r.seq, this.geometry.desc_count) as usize;
                        match st.held.get_mut(slot) {
                            Some(s) => *s = Some(held),
                            // Cannot happen (one entry per slot); submitting
                            // is the safe fallback.
                            None => drop(held),
                        }
                        return mapped;
                    }
                }
                bio.remapped()
            }
            Err(CaptureError::Full) if st.overflow_wait_ns > 0 => {
                pb.kind = BioKind::Waiting;
                bio.set_per_bio(pb);
                let (held, mapped) = bio.hold();
                st.waiting.push_back(held);
                drop(st);
                Self::kick(this);
                mapped
            }
            Err(e) => {
                if e != CaptureError::Full {
                    st.internal_errors = st.internal_errors.wrapping_add(1);
                    pr_err!(
                        "group {}: cannot capture a request ({:?}); switching to the dirty bitmap\n",
                        this.name,
                        e
                    );
                }
                st.cap.enter_overflow();
                Self::overflow_one(&mut st, &req, &mut pb);
                this.publish_header(&st);
                drop(st);
                this.notify();
                bio.set_per_bio(pb);
                bio.remapped()
            }
        }
    }

    /// A request that is not captured because the ring overflowed: its
    /// regions become dirty now and again at completion.
    fn overflow_one(st: &mut GroupState, req: &Request, pb: &mut PerBio) {
        pb.kind = BioKind::Overflow;
        if req.op.changes_data() {
            st.mark_request_dirty(req);
            st.count_overflow(req.volume, false);
            st.cap.stats.overflowed = st.cap.stats.overflowed.wrapping_add(1);
        }
    }

    // --- Completion (end_io, maybe hard IRQ) -------------------------------------------

    /// Records the completion of a bio this target mapped.
    pub(crate) fn complete(this: &Arc<Self>, bio: &Bio<'_, PerBio>, ok: bool) {
        let pb = bio.per_bio();
        match pb.kind {
            BioKind::Captured => {
                let now = sys::now_ns();
                let shipped_ok = ok && !pb.copy_failed;
                let mut st = this.state.lock();
                // Only a region marked dirty changes the shared header here
                // (the indices move in map and release).
                let mut dirtied = true;
                let kick = match st.cap.complete(pb.seq, shipped_ok) {
                    Ok(c) => {
                        let d = this.desc_offset(pb.seq);
                        this.mem.write_words(d + desc_field_offset!(complete_ns), &[now]);
                        let state = if shipped_ok {
                            dirtied = false;
                            abi::STATE_COMMITTED
                        } else {
                            st.mark_dirty(c.volume, c.start, c.end);
                            abi::STATE_FAILED
                        };
                        // Under the lock: the slot cannot be released (and
                        // reused) before its final stamp is visible.
                        this.publish_stamp(pb.seq, state);
                        c.held_waiting
                    }
                    Err(_) => {
                        st.internal_errors = st.internal_errors.wrapping_add(1);
                        if let Some(req) = pb.request() {
                            st.mark_request_dirty(&req);
                        }
                        false
                    }
                };
                if dirtied {
                    this.publish_header(&st);
                }
                drop(st);
                this.notify();
                if kick {
                    Self::kick(this);
                }
            }
            BioKind::Overflow => {
                if let Some(req) = pb.request().filter(|r| r.op.changes_data()) {
                    let mut st = this.state.lock();
                    // Dirty again (a bitmap taken since map cleared it),
                    // and no longer in flight, in one step: a consumer sees
                    // either the write in flight or its regions set.
                    st.mark_request_dirty(&req);
                    st.count_overflow(req.volume, true);
                    this.publish_header(&st);
                }
            }
            BioKind::Passthrough | BioKind::Waiting => {}
        }
    }

    // --- Deferred work (process context) ---------------------------------------------------

    /// Submits held bios whose blockers completed and reserves space for
    /// waiting bios; after the bounded wait, switches to overflow. Loops
    /// (sleeping briefly) while bios wait for space.
    pub(super) fn process(this: &Arc<Self>) {
        loop {
            this.submit_unblocked();
            let mut st = this.state.lock();
            let Some(front) = st.waiting.front_per_bio() else {
                return;
            };
            let Some(req) = front.request() else {
                // Cannot happen (per-bio data is written before queueing);
                // submit rather than strand the bio.
                st.internal_errors = st.internal_errors.wrapping_add(1);
                let b = st.waiting.pop_front();
                drop(st);
                drop(b);
                continue;
            };
            match st.cap.reserve(&req) {
                Ok(r) => {
                    let Some(mut bio) = st.waiting.pop_front() else {
                        continue;
                    };
                    let mut pb = front;
                    pb.kind = BioKind::Captured;
                    pb.seq = r.seq;
                    this.publish_header(&st);
                    drop(st);
                    pb.copy_failed = !this.fill_record(&r, &pb, 0, Some(&bio));
                    bio.set_per_bio(pb);
                    this.publish_stamp(r.seq, abi::STATE_PENDING);
                    if r.blocked && !cfg!(dm_replica_no_hold) {
                        let mut st = this.state.lock();
                        if st.cap.is_blocked(r.seq) && st.cap.set_held(r.seq).is_ok() {
                            let slot = abi::desc_slot(r.seq, this.geometry.desc_count) as usize;
                            if let Some(s) = st.held.get_mut(slot) {
                                *s = Some(bio);
                                continue;
                            }
                        }
                    }
                    bio.submit();
                }
                Err(CaptureError::Full)
                    if sys::now_ns().saturating_sub(front.submit_ns) < st.overflow_wait_ns =>
                {
                    drop(st);
                    sys::sleep_us(200, 1000);
                }
                Err(e) => {
                    // Out of time (or a request that can never fit): the
                    // ring overflows; every waiting bio goes to the bitmap.
                    if e != CaptureError::Full {
                        st.internal_errors = st.internal_errors.wrapping_add(1);
                    }
                    st.cap.enter_overflow();
                    let mut go = BioQueue::new();
                    while let Some(mut b) = st.waiting.pop_front() {
                        let mut pb = b.per_bio();
                        if let Some(req) = pb.request() {
                            Self::overflow_one(&mut st, &req, &mut pb);
                        } else {
                            pb.kind = BioKind::Passthrough;
                        }
                        b.set_per_bio(pb);
                        go.push_back(b);
                    }
                    this.publish_header(&st);
                    drop(st);
                    pr_warn!(
                        "group {}: capture ring full for {} ms; capture switched to the dirty bitmap (overflow), resync needed\n",
                        this.name,
                        this.overflow_wait_ms()
                    );
                    this.notify();
                    drop(go);
                }
            }
        }
    }

    fn overflow_wait_ms(&self) -> u64 {
        self.state.lock().overflow_wait_ns / 1_000_000
    }

    fn submit_unblocked(&self) {
        loop {
            let mut go = BioQueue::new();
            {
                let mut st = self.state.lock();
                while let Some(seq) = st.cap.next_unblocked_held() {
                    let slot = abi::desc_slot(seq, self.geometry.desc_count) as usize;
                    if let Some(b) = st.held.get_mut(slot).and_then(Option::take) {
                        go.push_back(b);
                    }
                }
            }
            if go.is_empty() {
                return;
            }
            drop(go);
        }
    }
}
