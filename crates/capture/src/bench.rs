//! The capture path on the host: the module's own reservation, completion
//! and release logic plus the payload copy into ring memory, against a plain
//! `memcpy` of the same payloads to the same places.
//!
//! Per record, the capture path does what the kernel does for a write: take
//! a lock, reserve a sequence and data granules ([`Capture::reserve`]),
//! write the descriptor, copy the payload into the data ring, zero the tail
//! of the last granule and publish the stamp; then complete it (lock,
//! [`Capture::complete`], stamp) and consume it (read the stamp and
//! descriptor, release through [`Capture::release`]). The baseline copies
//! the same payloads to the same offsets with nothing else.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::capture::{Capture, RecOp, Request, Slot};
use crate::ring_abi as abi;

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Result {
    /// Payload size in bytes.
    pub payload: usize,
    /// Capture path throughput, GiB/s of payload.
    pub capture_gib_s: f64,
    /// memcpy throughput, GiB/s.
    pub memcpy_gib_s: f64,
}

struct Ring {
    cap: Mutex<Capture<Vec<Slot>, Vec<u64>>>,
    stamps: Vec<AtomicU64>,
    descs: Vec<[u64; 7]>,
    data: Vec<u8>,
    g: abi::RingGeometry,
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
        stamps: (0..n).map(|_| AtomicU64::new(0)).collect(),
        descs: vec![[0; 7]; n],
        data: vec![0u8; (granules << abi::GRANULE_SHIFT) as usize],
        g,
    };
    let src: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
    let records = (total / payload).max(1);
    let bytes = (records * payload) as f64;

    let mut best_cap = f64::MAX;
    let mut best_copy = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        capture_loop(&mut ring, &src, records);
        best_cap = best_cap.min(t.elapsed().as_secs_f64());

        let t = Instant::now();
        memcpy_loop(&mut ring.data, &src, records, ring.g.data_granules);
        best_copy = best_copy.min(t.elapsed().as_secs_f64());
    }
    let gib = bytes / (1u64 << 30) as f64;
    Result {
        payload,
        capture_gib_s: gib / best_cap,
        memcpy_gib_s: gib / best_copy,
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
        let r = ring.cap.lock().expect("lock").reserve(&req).expect("room");
        let slot = (r.seq & mask) as usize;
        ring.descs[slot] = [req.sector, r.data_pos, 0, u64::from(req.len), u64::from(r.granules), 1, 0];
        let off = ((r.data_pos & (ring.g.data_granules - 1)) << abi::GRANULE_SHIFT) as usize;
        let room = (r.granules as usize) << abi::GRANULE_SHIFT;
        ring.data[off..off + src.len()].copy_from_slice(src);
        ring.data[off + src.len()..off + room].fill(0);
        abi::publish_stamp(&ring.stamps[slot], r.seq, abi::STATE_PENDING);
        // end_io: complete under the lock, publish.
        {
            let mut cap = ring.cap.lock().expect("lock");
            cap.complete(r.seq, true).expect("complete");
            abi::publish_stamp(&ring.stamps[slot], r.seq, abi::STATE_COMMITTED);
        }
        // consumer: see the stamp, read the descriptor, release.
        let st = abi::load_stamp(&ring.stamps[slot]);
        assert!(abi::stamp_is_for(st, r.seq) && abi::stamp_state(st) == abi::STATE_COMMITTED);
        black_box(&ring.descs[slot]);
        black_box(&ring.data[off..off + 64.min(src.len())]);
        ring.cap
            .lock()
            .expect("lock")
            .release(r.seq.wrapping_add(1))
            .expect("release");
        let _ = ring.stamps[slot].load(Ordering::Relaxed);
    }
}

fn memcpy_loop(data: &mut [u8], src: &[u8], records: usize, data_granules: u64) {
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
        data[o..o + src.len()].copy_from_slice(src);
        black_box(&data[o..o + 64.min(src.len())]);
        head = start + need;
    }
}
