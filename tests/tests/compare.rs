//! The target's side of a checksum resync and an online verify: a hash
//! record in the stream is answered with exactly the chunks of the replica
//! that differ from the source's hashes as of the record's position (a
//! write right after it does not change the answer), the answer comes before
//! any ack that reports the record applied, and a hash record the target
//! cannot check (a key it does not hold) is answered "all differ", never
//! "equal". A resync's BEGIN is answered with what the replica reads as
//! zeros there, never naming a byte a record wrote.

use std::time::Duration;

use replica_proto::chunk::{ChunkKey, HashAux};
use replica_proto::frame::{ring_op, OP_CHUNK_HASHES, RECORD_FLAG_RESYNC};
use replica_proto::keys::KeyRing;
use replica_tests::*;

const SIZE: u64 = 1 << 20;
const CHUNK: u64 = 65536;
const CHUNKS: usize = (SIZE / CHUNK) as usize;

/// A record for `RawClient::seal_records`: seq, op, flags, sector, aux, data.
type Rec<'a> = (u64, u8, u8, u64, u64, &'a [u8]);

fn setup() -> (Env, Daemon, String, std::path::PathBuf, KeyRing) {
    let env = Env::new();
    let t = env.one_volume_target("v", SIZE);
    (env, t.daemon, t.addr, t.state_dir, t.keys)
}

/// The hashes of `image`'s chunks, as the source sends them.
fn hashes(kr: &KeyRing, key_id: u32, image: &[u8]) -> Vec<u8> {
    let k = ChunkKey::derive(kr, key_id, "v").expect("chunk key");
    let mut out = Vec::new();
    for (i, c) in image.chunks(CHUNK as usize).enumerate() {
        out.extend_from_slice(&k.hash(i as u64 * CHUNK, c));
    }
    out
}

fn aux(key_id: u32) -> u64 {
    HashAux {
        key_id,
        chunk_bytes: CHUNK as u32,
    }
    .aux()
}

/// Whether an ack reporting `seq` applied came before the answer to `seq`.
fn acked_before_answer(c: &RawClient, seq: u64) -> bool {
    for h in &c.heard {
        match h {
            Heard::Compared(a) if a.seq == seq => return false,
            Heard::Applied(s) if *s >= seq => return true,
            _ => {}
        }
    }
    false
}

#[test]
fn a_resync_begin_is_answered_with_the_holes_of_the_replica_and_no_written_byte() {
    let (env, _t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [8; 16], 1).expect("connect");
    let a = vec![0x44u8; 4096];
    let s3 = 3 * CHUNK / 512 + 8;
    let begin = replica_proto::frame::resync::Marker::Begin { full: false }.aux();
    let f = c.seal_records(
        &kr,
        0,
        &[
            (1, ring_op::WRITE, 0, s3, 0, &a),
            (2, ring_op::MARKER, RECORD_FLAG_RESYNC, 0, begin, &[]),
            // After BEGIN: not part of what it says.
            (3, ring_op::WRITE, 0, 0, 0, &a),
        ],
    );
    c.send_frame(f).expect("writes and BEGIN");
    let z = c.zeroes_for(2).expect("zero ranges");
    assert_eq!(z.generation, c.generation);
    let claimed = |at: u64| z.ranges().iter().any(|&(s, l)| at >= s && at < s + l);
    let written = s3 * 512;
    for at in [written, written + 4095] {
        assert!(
            !claimed(at),
            "byte {at} was written, yet claimed zero: {:?}",
            z.ranges()
        );
    }
    for &(s, l) in z.ranges() {
        assert!(l > 0 && s + l <= SIZE, "{:?}", z.ranges());
    }
    // Where the filesystem keeps holes, the rest of a fresh replica is
    // named (chunk 0 too: its write came after BEGIN).
    let probe = st.join("hole-probe");
    let f = std::fs::File::create(&probe).expect("probe");
    f.set_len(SIZE).expect("size");
    let holes = replica_store::replica::file_holes(&f, &probe, SIZE).expect("holes");
    if holes.is_empty() {
        eprintln!("NOTE: this filesystem reports no holes: the target rightly names none");
    } else {
        for at in [0, 4096, 2 * CHUNK, 5 * CHUNK, SIZE - 1] {
            assert!(
                claimed(at),
                "byte {at} of a fresh replica not named: {:?}",
                z.ranges()
            );
        }
    }
    assert!(target_state(&st, "v").critical.is_none());
}

#[test]
fn a_hash_record_is_answered_with_exactly_the_chunks_that_differ() {
    let (env, t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    // The replica gets two writes (chunks 0 and 5).
    let a = vec![0x11u8; 4096];
    let b = vec![0x22u8; 4096];
    let s5 = 5 * CHUNK / 512;
    let f = c.seal_records(
        &kr,
        0,
        &[
            (1, ring_op::WRITE, 0, 0, 0, &a),
            (2, ring_op::WRITE, 0, s5, 0, &b),
            (3, ring_op::FLUSH, 0, 0, 0, &[]),
        ],
    );
    c.send_frame(f).expect("writes");
    // The source's view: chunk 0 the same, chunk 5 other data, chunk 9 data
    // the replica never got.
    let mut source = vec![0u8; SIZE as usize];
    source[..4096].copy_from_slice(&a);
    source[5 * CHUNK as usize..5 * CHUNK as usize + 4096].fill(0x33);
    source[9 * CHUNK as usize + 100] = 1;
    let h = hashes(&kr, kr.active(), &source);
    let f = c.seal_records(
        &kr,
        0,
        &[(
            4,
            OP_CHUNK_HASHES,
            RECORD_FLAG_RESYNC,
            0,
            aux(kr.active()),
            &h,
        )],
    );
    c.send_frame(f).expect("hash record");
    let ans = c.answer_for(4).expect("answer");
    assert_eq!(ans.count() as usize, CHUNKS);
    assert_eq!(ans.differing().collect::<Vec<_>>(), vec![5, 9]);
    assert_eq!(ans.generation, c.generation);
    assert!(
        !acked_before_answer(&c, 4),
        "an ack reported the hash record applied before its answer: {:?}",
        c.heard
    );
    // Nothing changed on the replica; the target counts what it compared.
    wait_for(Duration::from_secs(20), "comparison counted", || {
        t.status("v")
            .is_some_and(|s| s.compared_chunks == CHUNKS as u64 && s.differing_chunks == 2)
    });
    let img = std::fs::read(st.join("v.img")).expect("replica");
    assert_eq!(&img[..4096], &a[..]);
    assert_eq!(&img[5 * CHUNK as usize..5 * CHUNK as usize + 4096], &b[..]);
    assert!(target_state(&st, "v").critical.is_none());

    // Hashes made with a key this target does not hold: every chunk is
    // answered as differing (the source then sends them), never equal.
    let f = c.seal_records(
        &kr,
        0,
        &[(5, OP_CHUNK_HASHES, RECORD_FLAG_RESYNC, 0, aux(77), &h[..64])],
    );
    c.send_frame(f).expect("hash record under an unknown key");
    let ans = c.answer_for(5).expect("answer");
    assert_eq!(ans.differing().collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn the_comparison_sees_the_replica_as_of_its_record_not_the_write_after_it() {
    let (env, _t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    // The source hashes the zeroed volume; in the same segment, writes to
    // every chunk follow the hash record. The replica equals the source at
    // the record: every chunk compares equal.
    let source = vec![0u8; SIZE as usize];
    let h = hashes(&kr, kr.active(), &source);
    let data = vec![0x5au8; CHUNK as usize];
    let mut recs: Vec<Rec<'_>> = vec![(
        1,
        OP_CHUNK_HASHES,
        RECORD_FLAG_RESYNC,
        0,
        aux(kr.active()),
        &h,
    )];
    for i in 0..CHUNKS as u64 {
        recs.push((2 + i, ring_op::WRITE, 0, i * CHUNK / 512, 0, &data));
    }
    let f = c.seal_records(&kr, 0, &recs);
    c.send_frame(f).expect("segment");
    let ans = c.answer_for(1).expect("answer");
    assert_eq!(
        ans.differing().count(),
        0,
        "the comparison saw writes made after its record"
    );
    // And the writes were applied after it.
    wait_for(Duration::from_secs(20), "writes applied", || {
        std::fs::read(st.join("v.img")).is_ok_and(|img| img.iter().all(|b| *b == 0x5a))
    });
}

#[test]
fn a_malformed_hash_record_makes_the_stream_critical_and_applies_nothing() {
    let (env, _t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    let a = vec![0x11u8; 4096];
    // 33 bytes: not a list of 32-byte hashes.
    let f = c.seal_records(
        &kr,
        0,
        &[
            (1, ring_op::WRITE, 0, 0, 0, &a),
            (
                2,
                OP_CHUNK_HASHES,
                RECORD_FLAG_RESYNC,
                0,
                aux(kr.active()),
                &[0u8; 33],
            ),
        ],
    );
    let _ = c.send_frame(f);
    wait_for(Duration::from_secs(20), "Critical", || {
        target_state(&st, "v").critical.is_some()
    });
    let why = target_state(&st, "v").critical.unwrap_or_default();
    assert!(why.contains("not a list of chunk hashes"), "{why}");
    let img = std::fs::read(st.join("v.img")).expect("replica");
    assert!(
        img[..4096].iter().all(|b| *b == 0),
        "nothing of the segment applied"
    );
}

#[test]
fn many_hash_records_between_overlapping_writes_never_stall_the_applier() {
    let (env, _t, addr, st, kr) = setup();
    let mut c =
        RawClient::connect(&env, &addr, ("pki", SOURCE_CN), "v", [6; 16], 1).expect("connect");
    let mut rng = Rng::new(5);
    let mut seq = 1u64;
    let data = vec![0x77u8; 8192];
    let zeros = vec![0u8; SIZE as usize];
    let h = hashes(&kr, kr.active(), &zeros);
    let mut hash_seqs = Vec::new();
    for _ in 0..200 {
        let mut recs: Vec<Rec<'_>> = Vec::new();
        for _ in 0..4 {
            let first = rng.below(CHUNKS as u64 - 4);
            let hs = &h[first as usize * 32..(first as usize + 4) * 32];
            recs.push((
                seq,
                OP_CHUNK_HASHES,
                RECORD_FLAG_RESYNC,
                first * CHUNK / 512,
                aux(kr.active()),
                hs,
            ));
            hash_seqs.push(seq);
            seq += 1;
            for _ in 0..3 {
                let sector = rng.below(SIZE / 512 - 16);
                recs.push((seq, ring_op::WRITE, 0, sector, 0, &data));
                seq += 1;
            }
        }
        let f = c.seal_records(&kr, 0, &recs);
        c.send_frame(f).expect("segment");
    }
    let last = seq - 1;
    wait_for(Duration::from_secs(60), "everything applied", || {
        target_state(&st, "v").applied_seq >= last
    });
    for s in hash_seqs {
        c.answer_for(s).expect("every hash record answered");
    }
}
