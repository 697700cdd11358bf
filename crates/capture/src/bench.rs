//! The capture path on the host: the module's own reservation, completion
//! and release logic plus the payload copy into ring memory, against a plain
//! `memcpy` of the same payloads to the same places.
//!
//! Per record, the capture path does what the kernel does for a write
//! (`kmod/src/group/io.rs` and `kmod/src/group/ring.rs`), with userspace
//! stand-ins for kernel services:
//!
//! * map: read the clock (submission time), take the lock, reserve a
//!   sequence and data granules ([`Capture::reserve`]), publish the header
//!   indices, unlock; store the descriptor body ([`DescBody::words`], seven
//!   aligned words, as the module does), copy the payload one 4 KiB page at
//!   a time (a bio's data is a list of pages), zero the tail of the last
//!   granule, publish the PENDING stamp;
//! * end_io: read the clock, take the lock, [`Capture::complete`], store the
//!   completion time, publish the COMMITTED stamp, unlock, bump the event
//!   counter and check for pollers (a full barrier and a load, as
//!   `wq_has_sleeper` does);
//! * consumer: acquire-load the stamp, read the descriptor; every
//!   [`RELEASE_BATCH`] records release them ([`Capture::release`] under the
//!   lock, as the release ioctl does) and publish the consumer indices.
//!
//! The kernel's lock is an irqsave spinlock, here an uncontended `Mutex`;
//! its clock is `ktime_get_real_ns`, here `SystemTime::now`.
//!
//! The baseline copies the same pages to the same offsets with `memcpy` and
//! nothing else. Copying a payload page by page is slower in userspace than
//! one large `memcpy` (glibc switches to `rep movsb` above a few KiB; the
//! kernel's `memcpy` is `rep movsb` at every size on CPUs with FSRM), so the
//! like-for-like ratio is against the page-by-page baseline; one `memcpy`
//! per payload is measured and reported too.

use std::hint::black_box;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::capture::{Capture, DescBody, RecOp, Request, Slot};
use crate::ring_abi as abi;

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Result {
    /// Payload size in bytes.
    pub payload: usize,
    /// Capture path throughput, GiB/s of payload.
    pub capture_gib_s: f64,
    /// memcpy throughput, page by page (the same copies as the capture
    /// path), GiB/s.
    pub memcpy_gib_s: f64,
    /// memcpy throughput, one copy per payload, GiB/s.
    pub memcpy_whole_gib_s: f64,
}

/// Records the consumer releases at once (the daemon releases what the
/// target acknowledged, many records per ioctl).
pub const RELEASE_BATCH: usize = 32;

/// The size of a page: a bio's data is copied one page at a time.
const PAGE: usize = 4096;

/// The shared header's producer and consumer indices.
#[derive(Default)]
struct Header {
    prod_seq: AtomicU64,
    data_head: AtomicU64,
    flags: AtomicU32,
    overflow_seq: AtomicU64,
    dirty_regions: AtomicU64,
    cons_seq: AtomicU64,
    data_tail: AtomicU64,
}

struct Ring {
    cap: Mutex<Capture<Vec<Slot>, Vec<u64>>>,
    header: Header,
    /// Descriptors: the stamp, then the body words.
    descs: Vec<[AtomicU64; 8]>,
    data: Vec<u8>,
    events: AtomicU64,
    pollers: AtomicU64,
    g: abi::RingGeometry,
}

impl Ring {
    /// What `Group::publish_header` stores.
    fn publish_header(&self, cap: &Capture<Vec<Slot>, Vec<u64>>) {
        let h = &self.header;
        h.data_head.store(cap.data_head(), Ordering::Release);
        h.prod_seq.store(cap.prod_seq(), Ordering::Release);
        h.overflow_seq.store(cap.overflow_seq(), Ordering::Release);
        h.dirty_regions.store(0, Ordering::Release);
        h.flags
            .store(u32::from(cap.overflowing()), Ordering::Release);
    }

    /// What `Group::notify` does when nobody polls.
    fn notify(&self) {
        self.events.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::SeqCst);
        black_box(self.pollers.load(Ordering::Relaxed));
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs both loops over `total` bytes of `payload`-sized records in a ring
/// with `ring_mib` MiB of data, `rounds` times, and keeps the best of each.
pub fn run(payload: usize, total: usize, ring_mib: u64, rounds: usize) -> Result {
    let granules = ring_mib << (20 - abi::GRANULE_SHIFT);
    let g = abi::geometry(granules, granules).expect("geometry");
    let n = granules as usize;
    let mut ring = Ring {
        cap: Mutex::new(
            Capture::new(g, vec![Slot::default(); n], vec![0; n], 1, 0).expect("capture"),
        ),
        header: Header::default(),
        descs: (0..n).map(|_| Default::default()).collect(),
        data: vec![0u8; (granules << abi::GRANULE_SHIFT) as usize],
        events: AtomicU64::new(0),
        pollers: AtomicU64::new(0),
        g,
    };
    let src: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
    let records = (total / payload).max(1);
    let bytes = (records * payload) as f64;

    let mut best_cap = f64::MAX;
    let mut best_copy = f64::MAX;
    let mut best_whole = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        capture_loop(&mut ring, &src, records);
        best_cap = best_cap.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        memcpy_loop(&mut ring.data, &src, records, ring.g.data_granules, PAGE);
        best_copy = best_copy.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        memcpy_loop(
            &mut ring.data,
            &src,
            records,
            ring.g.data_granules,
            usize::MAX,
        );
        best_whole = best_whole.min(t.elapsed().as_secs_f64());
    }
    let gib = bytes / (1u64 << 30) as f64;
    Result {
        payload,
        capture_gib_s: gib / best_cap,
        memcpy_gib_s: gib / best_copy,
        memcpy_whole_gib_s: gib / best_whole,
    }
}

fn capture_loop(ring: &mut Ring, src: &[u8], records: usize) {
    let req = Request {
        op: RecOp::Write,
        volume: 0,
        sector: 0,
        len: src.len() as u32,
    };
    let mask = ring.g.desc_count - 1;
    for i in 0..records {
        let req = Request {
            sector: (i as u64 * 8) & 0xffff,
            ..req
        };
        // map: reserve under the lock, then fill and publish.
        let submit_ns = now_ns();
        let r = {
            let mut cap = ring.cap.lock().expect("lock");
            let r = cap.reserve(&req).expect("room");
            ring.publish_header(&cap);
            r
        };
        let desc = &ring.descs[(r.seq & mask) as usize];
        let body = DescBody {
            sector: req.sector,
            data_pos: r.data_pos,
            submit_ns,
            len: req.len,
            granules: r.granules,
            volume: req.volume,
            op: req.op.abi(),
            flags: 0,
            aux: 0,
            complete_ns: 0,
        };
        for (d, w) in desc[1..].iter().zip(body.words()) {
            d.store(w, Ordering::Relaxed);
        }
        let off = ((r.data_pos & (ring.g.data_granules - 1)) << abi::GRANULE_SHIFT) as usize;
        let room = (r.granules as usize) << abi::GRANULE_SHIFT;
        let dst = &mut ring.data[off..off + room];
        for (d, s) in dst.chunks_mut(PAGE).zip(src.chunks(PAGE)) {
            d[..s.len()].copy_from_slice(s);
        }
        dst[src.len()..].fill(0);
        abi::publish_stamp(&desc[0], r.seq, abi::STATE_PENDING);
        // end_io: complete under the lock, publish, notify.
        let complete_ns = now_ns();
        {
            let mut cap = ring.cap.lock().expect("lock");
            cap.complete(r.seq, true).expect("complete");
            desc[7].store(complete_ns, Ordering::Relaxed);
            abi::publish_stamp(&desc[0], r.seq, abi::STATE_COMMITTED);
        }
        ring.notify();
        // consumer: see the stamp, read the descriptor, release.
        let st = abi::load_stamp(&desc[0]);
        assert!(abi::stamp_is_for(st, r.seq) && abi::stamp_state(st) == abi::STATE_COMMITTED);
        for d in &desc[1..] {
            black_box(d.load(Ordering::Relaxed));
        }
        black_box(&ring.data[off..off + 64.min(src.len())]);
        if (i + 1) % RELEASE_BATCH == 0 || i + 1 == records {
            let mut cap = ring.cap.lock().expect("lock");
            let tail = cap.release(r.seq.wrapping_add(1)).expect("release");
            ring.header.data_tail.store(tail, Ordering::Release);
            ring.header
                .cons_seq
                .store(cap.cons_seq(), Ordering::Release);
        }
    }
}

/// Copies `records` payloads to where the ring would put them, `chunk`
/// bytes per `memcpy`.
fn memcpy_loop(data: &mut [u8], src: &[u8], records: usize, data_granules: u64, chunk: usize) {
    let need = abi::granules_for(src.len() as u32);
    let mut head = 0u64;
    for _ in 0..records {
        let off = head & (data_granules - 1);
        let start = if off + need > data_granules {
            head + (data_granules - off)
        } else {
            head
        };
        let o = ((start & (data_granules - 1)) << abi::GRANULE_SHIFT) as usize;
        for (d, s) in data[o..o + src.len()]
            .chunks_mut(chunk)
            .zip(src.chunks(chunk))
        {
            d.copy_from_slice(s);
        }
        black_box(&data[o..o + 64.min(src.len())]);
        head = start + need;
    }
}
