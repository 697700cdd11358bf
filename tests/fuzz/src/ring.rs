//! `ring_abi`: both sides of the capture ring's trust boundary.
//!
//! The first byte picks the part:
//!
//! * 0, the ABI's index rules (`crates/ring-abi/src/ring_abi.rs`, the file
//!   the kernel module includes): geometry, data reservation, release
//!   validation, stamps and slot offsets, on arbitrary indices, against
//!   what the ABI documentation says they guarantee;
//! * 1, the kernel module's producer logic (`kmod/src/capture.rs`, the very
//!   file the module builds, included here as `crates/capture` does): a
//!   sequence of reservations, completions, overflow switches and releases
//!   with arbitrary `new_cons` values (the release ioctl's argument, which
//!   a process controls), checked against a model: a release is taken
//!   exactly when the ABI allows it and no record in it is in flight, and
//!   the counters never break the ring's bounds;
//! * 2, the module's dirty bitmaps: marks of arbitrary sector ranges,
//!   read-and-clear and give-back, against a model;
//! * 3, the userspace consumer (`replica_ring::Consumer` over a
//!   `Mapping`): ring memory the producer wrote, taken from the input,
//!   mapped read-only as the daemon maps the kernel's, and changed between
//!   steps as a faulty or hostile producer could. The header is validated
//!   or refused; a record the consumer hands out is one the ABI allows and
//!   its payload reads without an error; releases and rewinds are refused
//!   unless they lie between what was released and what was read.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use ring_abi as abi;

use crate::capture::{
    regions_for, seq_before, words_for, Capture, CaptureError, Dirty, RecOp, ReleaseError, Request,
    Slot,
};
use crate::input::{Reader, Writer};

/// Largest allocation the target may make: a payload copied out of the
/// ring, at most the data ring of a mapping of at most [`MAX_MAP`].
pub const ALLOC_LIMIT: usize = 2 * MAX_MAP as usize;

const MAX_OPS: usize = 512;
/// Largest ring mapping the consumer part builds.
const MAX_MAP: u64 = 1 << 20;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() % 4 {
        0 => abi_rules(&mut r),
        1 => capture(&mut r),
        2 => dirty(&mut r),
        _ => consumer(&mut r),
    }
}

/// A value near the interesting edges (0, small, near 2^63, near 2^64)
/// or raw, picked by the input.
fn edgy(r: &mut Reader<'_>) -> u64 {
    let sel = r.u8();
    let v = r.u64();
    match sel % 5 {
        0 => v % 64,
        1 => u64::MAX - v % 64,
        2 => (1u64 << 63).wrapping_add(v % 64).wrapping_sub(32),
        3 => (1u64 << 62).wrapping_add(v % 64).wrapping_sub(32),
        _ => v,
    }
}

fn abi_rules(r: &mut Reader<'_>) {
    while !r.is_empty() {
        let dc = 1u64 << (r.u8() % 64);
        let dg = 1u64 << (r.u8() % 64);
        let raw_dc = r.u64();
        if let Some(g) = abi::geometry(raw_dc, dg) {
            assert!(raw_dc.is_power_of_two());
            assert_eq!(g.desc_count, raw_dc);
        }
        if let Some(g) = abi::geometry(dc, dg) {
            assert_eq!(g.desc_offset, abi::HEADER_SIZE);
            assert_eq!(g.desc_offset % abi::PAGE_SIZE, 0);
            assert_eq!(g.data_offset % abi::PAGE_SIZE, 0);
            let desc_end = u128::from(g.desc_offset) + u128::from(dc) * u128::from(abi::DESC_SIZE);
            assert!(desc_end <= u128::from(g.data_offset));
            assert_eq!(
                u128::from(g.total_size),
                u128::from(g.data_offset) + u128::from(dg) * u128::from(abi::GRANULE_SIZE)
            );
            let seq = edgy(r);
            let off = abi::desc_byte_offset(g.desc_offset, seq, dc);
            assert!(
                off >= g.desc_offset && u128::from(off) + u128::from(abi::DESC_SIZE) <= desc_end
            );
            let pos = edgy(r);
            let doff = abi::data_byte_offset(g.data_offset, pos, dg);
            assert!(doff >= g.data_offset && doff < g.total_size);
        }
        // Data reservation.
        let head = edgy(r);
        let tail = head.wrapping_sub(edgy(r) % (dg.saturating_add(2)));
        let need = edgy(r) % dg.saturating_add(2);
        if let Some((start, end)) = abi::reserve_data(head, tail, dg, need) {
            assert_eq!(end.wrapping_sub(start), need);
            // Padding is less than a lap, and the payload does not cross
            // the end of the ring.
            assert!(start.wrapping_sub(head) < dg || (need == 0 && start == head));
            assert!((start & (dg - 1)) + need <= dg);
            assert!(end.wrapping_sub(tail) <= dg);
        } else {
            assert!(
                need > dg
                    || head.wrapping_sub(tail) > dg
                    || head.wrapping_add(need).wrapping_sub(tail) > dg
                    || (head & (dg - 1)) + need > dg,
                "room for {need} granules at head {head} tail {tail} of {dg} refused"
            );
        }
        // Release validation: exactly the forward moves up to the producer.
        let cons = edgy(r);
        let prod = cons.wrapping_add(edgy(r) % dc.saturating_add(1));
        let new = cons.wrapping_add(edgy(r));
        let want = new.wrapping_sub(cons) <= prod.wrapping_sub(cons);
        assert_eq!(abi::release_is_valid(cons, prod, new), want);
        assert!(abi::release_is_valid(cons, prod, cons));
        assert!(abi::release_is_valid(cons, prod, prod));
        assert_eq!(
            abi::desc_has_room(prod, cons, dc),
            abi::records_live(prod, cons) < dc
        );
        // Stamps.
        let state = r.u8() as u64 & 3;
        let st = abi::stamp(seq_of(cons), state);
        assert_eq!(abi::stamp_state(st), state);
        assert!(abi::stamp_is_for(st, seq_of(cons)));
        assert!(!abi::stamp_is_for(st, seq_of(cons).wrapping_add(1)));
        // Granules and page alignment.
        let len = r.u32();
        let gr = abi::granules_for(len);
        assert!(gr * abi::GRANULE_SIZE >= u64::from(len));
        assert!(gr == 0 || (gr - 1) * abi::GRANULE_SIZE < u64::from(len));
        let x = edgy(r);
        let pa = abi::page_align(x);
        assert_eq!(pa % abi::PAGE_SIZE, 0);
        assert!(pa >= x || x > u64::MAX - (abi::PAGE_SIZE - 1));
        // The resync markers carried in `aux`.
        let aux = edgy(r);
        if let Some(m) = replica_proto::frame::resync::Marker::from_aux(aux) {
            assert_eq!(m.aux(), aux, "{m:?}");
        }
    }
}

/// Stamps compare sequences modulo 2^62.
fn seq_of(s: u64) -> u64 {
    s & (u64::MAX >> 2)
}

/// The model of one reserved record.
#[derive(Debug, Clone, Copy)]
struct ModelRec {
    pending: bool,
    held: bool,
    changes: bool,
    volume: u32,
    start: u64,
    end: u64,
    data_pos: u64,
    granules: u32,
}

struct Model {
    desc_count: u64,
    data_granules: u64,
    prod: u64,
    cons: u64,
    head: u64,
    tail: u64,
    recs: BTreeMap<u64, ModelRec>,
}

impl Model {
    fn overlaps_earlier(&self, volume: u32, start: u64, end: u64, seq: u64) -> bool {
        self.recs.iter().any(|(&s, m)| {
            m.pending
                && m.changes
                && seq_before(s, seq)
                && m.volume == volume
                && m.start < end
                && start < m.end
        })
    }

    fn in_flight(&self) -> usize {
        self.recs
            .values()
            .filter(|m| m.pending && m.changes)
            .count()
    }

    fn held(&self) -> usize {
        self.recs.values().filter(|m| m.held).count()
    }
}

fn rec_op(b: u8) -> RecOp {
    match b % 5 {
        0 => RecOp::Write,
        1 => RecOp::Flush,
        2 => RecOp::Discard,
        3 => RecOp::WriteZeroes,
        _ => RecOp::Marker,
    }
}

fn capture(r: &mut Reader<'_>) {
    let desc_count = 1u64 << (r.u8() % 5);
    let data_granules = 1u64 << (r.u8() % 6);
    let first_seq = edgy(r);
    let first_granule = edgy(r);
    let geo = abi::geometry(desc_count, data_granules).expect("small geometry");
    let n = desc_count as usize;
    let mut cap = Capture::new(
        geo,
        vec![Slot::default(); n],
        vec![0u64; n],
        first_seq,
        first_granule,
    )
    .expect("a producer over the right storage");
    let mut m = Model {
        desc_count,
        data_granules,
        prod: first_seq,
        cons: first_seq,
        head: first_granule,
        tail: first_granule,
        recs: BTreeMap::new(),
    };
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 8 {
            0..=2 => reserve(&mut cap, &mut m, r),
            3 | 4 => complete(&mut cap, &mut m, r),
            5 => release(&mut cap, &mut m, r),
            6 => {
                if r.u8() & 1 == 0 {
                    let was = cap.overflowing();
                    let at = cap.prod_seq();
                    cap.enter_overflow();
                    assert!(cap.overflowing());
                    if !was {
                        assert_eq!(cap.overflow_seq(), at);
                    }
                } else {
                    assert_eq!(cap.clear_overflow(), m.prod);
                    assert!(!cap.overflowing());
                }
            }
            _ => {
                // Misuse the kernel never makes must be refused, not
                // obeyed: completing what is not in flight, holding twice.
                let seq = m.cons.wrapping_add(r.u64() % (2 * desc_count + 2));
                let rec = m.recs.get(&seq).copied();
                let pending_free = rec.is_some_and(|x| x.pending && !x.held);
                if !pending_free {
                    assert_eq!(
                        cap.complete(seq, true).err(),
                        Some(CaptureError::Internal),
                        "completed {seq}, which is not in flight"
                    );
                }
                if !rec.is_some_and(|x| x.pending && !x.held) {
                    assert_eq!(cap.set_held(seq).err(), Some(CaptureError::Internal));
                }
                let blocked = rec.is_some_and(|x| {
                    x.pending && x.changes && m.overlaps_earlier(x.volume, x.start, x.end, seq)
                });
                assert_eq!(cap.is_blocked(seq), blocked);
            }
        }
        assert_eq!(cap.prod_seq(), m.prod);
        assert_eq!(cap.cons_seq(), m.cons);
        assert_eq!(cap.data_head(), m.head);
        assert_eq!(cap.data_tail(), m.tail);
        assert!(cap.live() <= desc_count);
        assert!(cap.granules_used() <= data_granules);
        assert_eq!(cap.in_flight(), m.in_flight());
        assert_eq!(cap.held(), m.held());
    }
}

fn reserve<S, I>(cap: &mut Capture<S, I>, m: &mut Model, r: &mut Reader<'_>)
where
    S: std::ops::DerefMut<Target = [Slot]>,
    I: std::ops::DerefMut<Target = [u64]>,
{
    let kind = r.u8();
    let op = rec_op(kind);
    let volume = u32::from(kind >> 7);
    let raw = kind & 0x40 != 0;
    let sector = if raw { edgy(r) } else { u64::from(r.u8() % 32) };
    let len = match op {
        RecOp::Flush | RecOp::Marker => 0,
        _ if raw => r.u32(),
        _ => u32::from(r.u8() % 24) * 512,
    };
    let req = Request {
        op,
        volume,
        sector,
        len,
    };
    let need = if op == RecOp::Write {
        abi::granules_for(len)
    } else {
        0
    };
    let start = sector;
    let end = sector.checked_add(u64::from(len) >> 9);
    let res = cap.reserve(&req);
    let invalid = end.is_none() || need > m.data_granules || (op == RecOp::Write && len == 0);
    match res {
        Err(CaptureError::Invalid) => assert!(invalid, "{req:?} refused as invalid"),
        Err(CaptureError::Full) => {
            assert!(!invalid);
            assert!(
                !abi::desc_has_room(m.prod, m.cons, m.desc_count)
                    || abi::reserve_data(m.head, m.tail, m.data_granules, need).is_none(),
                "{req:?} refused as full with room"
            );
        }
        Err(CaptureError::Internal) => panic!("{req:?}: internal error"),
        Ok(got) => {
            assert!(!invalid, "{req:?} accepted");
            let end = end.unwrap_or(u64::MAX);
            assert_eq!(got.seq, m.prod);
            let (pos, new_head) = abi::reserve_data(m.head, m.tail, m.data_granules, need)
                .expect("a reservation the ABI allows");
            assert_eq!((got.data_pos, u64::from(got.granules)), (pos, need));
            let changes = op.changes_data();
            assert_eq!(
                got.blocked,
                changes && m.overlaps_earlier(volume, start, end, got.seq)
            );
            m.recs.insert(
                got.seq,
                ModelRec {
                    pending: true,
                    held: false,
                    changes,
                    volume,
                    start,
                    end,
                    data_pos: pos,
                    granules: got.granules,
                },
            );
            m.prod = m.prod.wrapping_add(1);
            m.head = new_head;
            if got.blocked {
                cap.set_held(got.seq).expect("hold a blocked write");
                if let Some(x) = m.recs.get_mut(&got.seq) {
                    x.held = true;
                }
            }
        }
    }
}

fn complete<S, I>(cap: &mut Capture<S, I>, m: &mut Model, r: &mut Reader<'_>)
where
    S: std::ops::DerefMut<Target = [Slot]>,
    I: std::ops::DerefMut<Target = [u64]>,
{
    let pick = r.u8() as usize;
    let ok = r.u8() & 7 != 0;
    let free: Vec<u64> = m
        .recs
        .iter()
        .filter(|(_, x)| x.pending && !x.held)
        .map(|(&s, _)| s)
        .collect();
    let Some(&seq) = free.get(pick % free.len().max(1)) else {
        return;
    };
    let done = cap.complete(seq, ok).expect("complete a record in flight");
    let x = m.recs.get_mut(&seq).expect("modelled");
    x.pending = false;
    assert_eq!(
        (done.volume, done.start, done.end),
        (x.volume, x.start, x.end)
    );
    assert_eq!(done.held_waiting, m.held() > 0);
    // Submit every held write no earlier write blocks any more, as the
    // module does after a completion.
    while let Some(s) = cap.next_unblocked_held() {
        let h = *m.recs.get(&s).expect("a held record is modelled");
        assert!(h.held && h.pending);
        assert!(
            !m.overlaps_earlier(h.volume, h.start, h.end, s),
            "held write {s} released while an earlier overlapping write is in flight"
        );
        if let Some(x) = m.recs.get_mut(&s) {
            x.held = false;
        }
    }
    // Every write still held is still blocked.
    for (&s, h) in &m.recs {
        if h.held {
            assert!(m.overlaps_earlier(h.volume, h.start, h.end, s));
        }
    }
}

fn release<S, I>(cap: &mut Capture<S, I>, m: &mut Model, r: &mut Reader<'_>)
where
    S: std::ops::DerefMut<Target = [Slot]>,
    I: std::ops::DerefMut<Target = [u64]>,
{
    let sel = r.u8();
    let new = match sel % 4 {
        // Somewhere in (or just past) the live records.
        0 | 1 => m.cons.wrapping_add(u64::from(r.u8()) % (m.desc_count + 2)),
        // Backwards.
        2 => m.cons.wrapping_sub(1 + u64::from(r.u8())),
        // Anything at all.
        _ => r.u64(),
    };
    let valid = abi::release_is_valid(m.cons, m.prod, new);
    let mut s = m.cons;
    let mut in_flight = false;
    while valid && s != new {
        in_flight |= m.recs.get(&s).is_none_or(|x| x.pending);
        s = s.wrapping_add(1);
    }
    match cap.release(new) {
        Err(ReleaseError::OutOfRange) => {
            assert!(!valid, "release to {new} refused as out of range")
        }
        Err(ReleaseError::InFlight) => assert!(valid && in_flight, "release to {new} refused"),
        Ok(tail) => {
            assert!(valid && !in_flight, "release to {new} accepted");
            if new != m.cons {
                let last = m.recs[&new.wrapping_sub(1)];
                assert_eq!(tail, last.data_pos.wrapping_add(u64::from(last.granules)));
                let mut s = m.cons;
                while s != new {
                    m.recs.remove(&s);
                    s = s.wrapping_add(1);
                }
                m.cons = new;
                m.tail = tail;
            } else {
                assert_eq!(tail, m.tail);
            }
        }
    }
}

fn dirty(r: &mut Reader<'_>) {
    let shift = u32::from(r.u8() % 66);
    let regions = u64::from(r.u32() % 4096);
    let words = words_for(regions) as usize;
    let Some(mut d) = Dirty::new(shift, regions, vec![0u64; words]) else {
        assert!(
            shift >= 63,
            "a bitmap of {regions} regions of shift {shift} refused"
        );
        return;
    };
    assert!(shift < 63);
    let sectors = r.u64() >> (r.u8() % 64);
    let needed = regions_for(sectors, shift);
    assert!(u128::from(needed) << shift >= u128::from(sectors));
    assert!(needed == 0 || (u128::from(needed - 1) << shift) < u128::from(sectors));
    let mut model = vec![false; regions as usize];
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        match r.u8() % 4 {
            0 | 1 => {
                let start = edgy(r);
                let end = if r.u8() & 1 == 0 {
                    start.wrapping_add(r.u64() % 4096)
                } else {
                    edgy(r)
                };
                let mut want = 0;
                if end > start && regions > 0 {
                    let first = start >> shift;
                    let last = ((end - 1) >> shift).min(regions - 1);
                    let mut x = first;
                    while x <= last {
                        if !model[x as usize] {
                            model[x as usize] = true;
                            want += 1;
                        }
                        x += 1;
                    }
                }
                assert_eq!(d.mark(start, end), want, "mark {start}..{end}");
            }
            2 => {
                let mut out = vec![0u64; words];
                assert!(d.take_into(&mut out));
                for (i, set) in model.iter_mut().enumerate() {
                    assert_eq!(out[i / 64] >> (i % 64) & 1 == 1, *set, "region {i}");
                    *set = false;
                }
                assert!(!d.take_into(&mut vec![0u64; words + 1]));
                // Give some of it back, as a failed copy-out does.
                let keep = r.u64();
                for (wi, w) in out.iter_mut().enumerate() {
                    *w &= keep.rotate_left(wi as u32);
                }
                let mut want = 0;
                for (i, set) in model.iter_mut().enumerate() {
                    if out[i / 64] >> (i % 64) & 1 == 1 {
                        *set = true;
                        want += 1;
                    }
                }
                assert_eq!(d.or_in(&out), want);
            }
            _ => {
                let x = r.u64() % (regions + 64);
                assert_eq!(
                    d.is_dirty(x),
                    model.get(x as usize).copied().unwrap_or(false)
                );
            }
        }
        assert_eq!(d.dirty(), model.iter().filter(|&&b| b).count() as u64);
        assert_eq!(d.regions(), regions);
    }
}

/// A release mechanism that writes nothing (the kernel's mapping is
/// read-only) and checks what it is asked for.
struct Recorder {
    calls: Vec<(u64, u64)>,
}

impl replica_ring::Release for Recorder {
    fn release(
        &mut self,
        _map: &replica_ring::Mapping,
        new_cons: u64,
        data_tail: u64,
    ) -> Result<(), replica_ring::RingError> {
        self.calls.push((new_cons, data_tail));
        Ok(())
    }

    fn wait(
        &mut self,
        _map: &replica_ring::Mapping,
        _timeout: std::time::Duration,
    ) -> Result<(), replica_ring::RingError> {
        Ok(())
    }
}

/// An anonymous memory file holding the ring.
fn memfd(size: u64) -> std::fs::File {
    // SAFETY: a static NUL-terminated name and flags; no memory is shared.
    let fd = unsafe { libc::memfd_create(c"replica-fuzz-ring".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody
    // else.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).expect("size the ring");
    f
}

fn consumer(r: &mut Reader<'_>) {
    let flags = r.u8();
    let header: [u8; 192] = r.array();
    let desc = r.section();
    let data = r.section();
    let field = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes"));
    let geo = abi::geometry(field(32), field(40)).filter(|g| g.total_size <= MAX_MAP);
    // The size of the mapping: the header's own, or (rarely) another one.
    let size = match (geo, flags & 3) {
        (Some(g), 0..=2) => g.total_size,
        _ => (u64::from(r.u32()) % MAX_MAP).max(1),
    };
    let size = abi::page_align(size);
    let f = memfd(size);
    f.write_all_at(&header, 0).expect("write");
    if let Some(g) = geo {
        write_within(&f, size, g.desc_offset, desc);
        write_within(&f, size, g.data_offset, data);
    }
    let map = match replica_ring::Mapping::from_fd(f.as_raw_fd(), size, false) {
        Ok(m) => m,
        Err(_) => return,
    };
    let g = map.geometry();
    assert!(g.total_size <= size);
    let mut c = match replica_ring::Consumer::new(map, Recorder { calls: Vec::new() }) {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut payload = Vec::new();
    for _ in 0..MAX_OPS {
        match r.u8() % 6 {
            0..=2 => {
                let next = c.next_seq();
                match c.peek() {
                    Ok(replica_ring::Peek::Committed(rec))
                    | Ok(replica_ring::Peek::Failed(rec)) => {
                        assert_eq!(rec.seq, next);
                        check_desc(&rec.desc, g);
                        // What the consumer validated reads without an error.
                        if let Err(e) = c.read_payload(&rec, &mut payload) {
                            panic!(
                                "validated record {next} ({:?}): payload unreadable: {e}",
                                rec.desc
                            );
                        }
                        assert_eq!(payload.len(), rec.payload_len());
                        payload.clear();
                        c.append_payload(&rec, &mut payload)
                            .expect("append the payload");
                        c.advance(&rec);
                        assert_eq!(c.next_seq(), next.wrapping_add(1));
                    }
                    Ok(_) | Err(_) => {
                        if r.is_empty() {
                            break;
                        }
                    }
                }
            }
            3 => {
                let (released, next) = (c.released_seq(), c.next_seq());
                let upto = released.wrapping_add(edgy(r) % (g.desc_count + 2));
                let before = c.releaser().calls.len();
                match c.release(upto) {
                    Ok(()) => {
                        assert!(abi::release_is_valid(released, next, upto));
                        assert_eq!(c.released_seq(), upto);
                        if upto != released {
                            let (n, _) = c.releaser().calls[before];
                            assert_eq!(n, upto);
                        }
                    }
                    Err(_) => {
                        assert!(!abi::release_is_valid(released, next, upto));
                        assert_eq!(c.released_seq(), released);
                    }
                }
            }
            4 => {
                let (released, next) = (c.released_seq(), c.next_seq());
                let to = released.wrapping_add(edgy(r) % (g.desc_count + 2));
                match c.rewind(to) {
                    Ok(()) => {
                        assert!(abi::release_is_valid(released, next, to));
                        assert_eq!(c.next_seq(), to);
                    }
                    Err(_) => {
                        assert!(!abi::release_is_valid(released, next, to));
                        assert_eq!(c.next_seq(), next);
                    }
                }
            }
            _ => {
                // The producer writes 8 bytes anywhere in the mapping.
                let at = r.u32() as u64 % size;
                let v = r.array::<8>();
                let n = (size - at).min(8) as usize;
                f.write_all_at(&v[..n], at).expect("write");
                let _ = c.submit_ns(edgy(r));
                assert!(c.data_bytes_in_use() <= g.data_granules * abi::GRANULE_SIZE);
                let _ = (c.flags(), c.overflowing(), c.is_dead(), c.dirty_regions());
                if r.is_empty() {
                    break;
                }
            }
        }
    }
}

fn write_within(f: &std::fs::File, size: u64, at: u64, bytes: &[u8]) {
    if at < size {
        let n = ((size - at) as usize).min(bytes.len());
        f.write_all_at(&bytes[..n], at).expect("write");
    }
}

/// What the ABI says of a descriptor the consumer accepted.
fn check_desc(d: &replica_ring::DescFields, g: abi::RingGeometry) {
    let want = match d.op {
        abi::OP_WRITE => abi::granules_for(d.len),
        abi::OP_FLUSH | abi::OP_MARKER => {
            assert_eq!(d.len, 0);
            0
        }
        abi::OP_DISCARD | abi::OP_WRITE_ZEROES => 0,
        op => panic!("accepted unknown op {op}"),
    };
    assert_eq!(u64::from(d.granules), want);
    assert_eq!(u64::from(d.len) % abi::SECTOR_SIZE, 0);
    assert!((d.data_pos & (g.data_granules - 1)) + want <= g.data_granules);
}

/// Seed inputs: an ABI walk, a capture session, bitmap marks, and rings a
/// producer wrote (records committed, failed and pending).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut abi_walk = Writer::new().u8(0);
    for i in 0..4u8 {
        // Counts, then (the geometry exists) a slot and a granule, the data
        // reservation, the release, a stamp state, a length, an address
        // to align and a marker's aux.
        abi_walk = abi_walk.u8(4 + i).u8(2 + i).u64(1 << (3 + i));
        for k in 0..8u64 {
            abi_walk = abi_walk.u8(i + k as u8).u64(u64::from(i) * 7 + k);
        }
        abi_walk = abi_walk
            .u8(i)
            .u32(4097 * u32::from(i))
            .u8(4)
            .u64(4095)
            .u8(4)
            .u64(frame_marker(i));
    }
    out.push(("abi".into(), abi_walk.finish()));

    // 8 descriptors, 16 granules, sequences and granules near 2^64.
    let mut cap = Writer::new().u8(1).u8(3).u8(4).u8(1).u64(3).u8(1).u64(5);
    for i in 0..24u8 {
        // Overlapping writes, a flush, a discard; completions; releases.
        cap = match i % 6 {
            0 | 1 => cap.u8(0).u8(0).u8(i % 4).u8(8),
            2 => cap.u8(1).u8(1).u8(0),
            3 => cap.u8(2).u8(2).u8(3).u8(16),
            4 => cap.u8(3).u8(i).u8(1),
            _ => cap.u8(5).u8(0).u8(2),
        };
    }
    out.push(("capture".into(), cap.u8(6).u8(0).u8(6).u8(1).finish()));

    let mut dirty = Writer::new().u8(2).u8(3).u32(300).u64(2400).u8(0);
    for i in 0..6u64 {
        dirty = dirty.u8(0).u8(0).u64(i * 37).u8(0).u64(100 + i);
    }
    out.push((
        "dirty".into(),
        dirty.u8(2).u64(0x5555_5555_5555_5555).u8(3).u64(7).finish(),
    ));

    for (name, first_seq) in [("ring", 1u64), ("ring-wrapping", u64::MAX - 2)] {
        out.push((name.into(), ring_seed(first_seq)));
    }
    out
}

/// The `aux` of a resync marker.
fn frame_marker(i: u8) -> u64 {
    use replica_proto::frame::resync::Marker;
    match i % 3 {
        0 => Marker::Begin { full: true }.aux(),
        1 => Marker::Data {
            region: 12,
            count: 3,
        }
        .aux(),
        _ => Marker::End.aux(),
    }
}

/// A ring of 8 descriptors and 4 data granules written by the userspace
/// producer (the kernel's ABI), as the consumer part reads it.
fn ring_seed(first_seq: u64) -> Vec<u8> {
    let dir = crate::input::scratch_dir();
    let path = dir.path().join("ring");
    let mut p = replica_ring::Producer::create(
        &path,
        replica_ring::RingParams {
            desc_count: 8,
            data_granules: 4,
            generation: [0x44; 16],
            first_seq,
            first_granule: first_seq.wrapping_mul(3),
        },
    )
    .expect("create a ring");
    let field = |op, sector, len| replica_ring::DescFields {
        op,
        sector,
        len,
        submit_ns: 1,
        ..Default::default()
    };
    let s1 = p
        .reserve(field(abi::OP_WRITE, 8, 4096), &[0xab; 4096])
        .expect("reserve");
    let s2 = p.reserve(field(abi::OP_FLUSH, 0, 0), &[]).expect("reserve");
    let s3 = p
        .reserve(field(abi::OP_WRITE, 16, 1024), &[0xcd; 1024])
        .expect("reserve");
    let s4 = p
        .reserve(field(abi::OP_DISCARD, 64, 8192), &[])
        .expect("reserve");
    let _pending = p
        .reserve(field(abi::OP_WRITE, 0, 512), &[1; 512])
        .expect("reserve");
    p.complete(s1, true);
    p.complete(s2, true);
    p.complete(s3, false);
    p.complete(s4, true);
    drop(p);
    let mem = std::fs::read(&path).expect("read the ring");
    let g = abi::geometry(8, 4).expect("geometry");
    let mut desc =
        mem[g.desc_offset as usize..(g.desc_offset + 8 * abi::DESC_SIZE) as usize].to_vec();
    // The completion times are the clock's: zero them, so the seed is the
    // same from run to run.
    for d in desc.chunks_mut(abi::DESC_SIZE as usize) {
        d[56..64].fill(0);
    }
    // Only the start of each payload: the rest reads as zeros.
    let mut data = Vec::new();
    for gr in 0..4usize {
        let at = g.data_offset as usize + gr * abi::GRANULE_SIZE as usize;
        data.extend_from_slice(&mem[at..at + 64]);
    }
    let mut w = Writer::new()
        .u8(3)
        .u8(0)
        .bytes(&mem[..192])
        .section(&desc)
        .section(&data[..64]);
    // Peek three, release two, peek, rewind one, peek on, then the
    // producer changes a descriptor's length.
    w = w
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(3)
        .u8(0)
        .u64(2)
        .u8(0)
        .u8(4)
        .u8(0)
        .u64(1);
    w = w.u8(0).u8(0).u8(0).u8(0);
    let len_at = g.desc_offset as u32 + (first_seq % 8) as u32 * abi::DESC_SIZE as u32 + 32;
    w.u8(5)
        .u32(len_at)
        .bytes(&[0, 2, 0, 0, 1, 0, 0, 0])
        .u8(0)
        .u64(0)
        .u8(0)
        .u8(0)
        .finish()
}
