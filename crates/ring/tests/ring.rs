//! Ring protocol tests: the userspace producer against the consumer, both
//! speaking the kernel's ABI over a shared ring file.

use proptest::prelude::*;
use replica_ring::{Consumer, DescFields, Peek, Producer, RingError, RingParams};
use ring_abi::{OP_FLUSH, OP_WRITE};

fn params(desc: u64, granules: u64, first_seq: u64, first_granule: u64) -> RingParams {
    RingParams {
        desc_count: desc,
        data_granules: granules,
        generation: [7; 16],
        first_seq,
        first_granule,
    }
}

fn write(sector: u64, len: u32) -> DescFields {
    DescFields {
        op: OP_WRITE,
        sector,
        len,
        ..Default::default()
    }
}

fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

fn setup(p: RingParams) -> (tempfile::TempDir, Producer, Consumer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let prod = Producer::create(&path, p).expect("create");
    let cons = Consumer::open_file(&path).expect("open");
    (dir, prod, cons)
}

/// Consumes one committed record and checks its payload.
fn take(cons: &mut Consumer, expect_seq: u64, len: usize) {
    match cons.peek().expect("peek") {
        Peek::Committed(r) => {
            assert_eq!(r.seq, expect_seq);
            let mut buf = Vec::new();
            cons.read_payload(&r, &mut buf).expect("payload");
            assert_eq!(buf, pattern(expect_seq, len), "payload of {expect_seq}");
            cons.advance(&r);
        }
        other => panic!("expected committed {expect_seq}, got {other:?}"),
    }
}

#[test]
fn wrap_around_pads_instead_of_splitting_a_payload() {
    // 8 granules: a 3-granule payload at offset 6 cannot fit before the end.
    let (_d, mut prod, mut cons) = setup(params(16, 8, 1, 0));
    for i in 0..2u64 {
        let s = prod
            .reserve(write(i * 24, 3 * 4096), &pattern(1 + i, 3 * 4096))
            .expect("reserve");
        prod.complete(s, true);
    }
    take(&mut cons, 1, 3 * 4096);
    take(&mut cons, 2, 3 * 4096);
    cons.release(3).expect("release");
    // Head is at granule 6; a 3-granule payload must start at 8 (padding 6..8).
    let s = prod
        .reserve(write(0, 3 * 4096), &pattern(3, 3 * 4096))
        .expect("reserve after wrap");
    prod.complete(s, true);
    match cons.peek().expect("peek") {
        Peek::Committed(r) => assert_eq!(r.desc.data_pos, 8, "payload must start at the next lap"),
        o => panic!("{o:?}"),
    }
    take(&mut cons, 3, 3 * 4096);
    cons.release(4).expect("release");
    // Padding was released with that record: 5 granules are free again
    // (8 - 3), so a 5-granule payload fits, a 6-granule one does not.
    assert!(matches!(
        prod.reserve(write(0, 6 * 4096), &pattern(4, 6 * 4096)),
        Err(RingError::Full)
    ));
    let s = prod
        .reserve(write(0, 5 * 4096), &pattern(4, 5 * 4096))
        .expect("5 granules fit");
    prod.complete(s, true);
    take(&mut cons, 4, 5 * 4096);
}

#[test]
fn exactly_full_ring_accepts_the_last_record_and_refuses_one_more() {
    // Descriptors full.
    let (_d, mut prod, _cons) = setup(params(4, 64, 1, 0));
    for i in 0..4 {
        prod.reserve(write(i, 512), &pattern(i, 512)).expect("fits");
    }
    assert!(matches!(
        prod.reserve(
            DescFields {
                op: OP_FLUSH,
                ..Default::default()
            },
            &[]
        ),
        Err(RingError::Full)
    ));
    // Data full to the last granule.
    let (_d, mut prod, mut cons) = setup(params(64, 4, 1, 0));
    let s = prod
        .reserve(write(0, 4 * 4096), &pattern(1, 4 * 4096))
        .expect("exactly the data ring");
    prod.complete(s, true);
    assert!(matches!(
        prod.reserve(write(0, 512), &pattern(2, 512)),
        Err(RingError::Full)
    ));
    // A data-less record still fits while the data ring is full.
    let f = prod
        .reserve(
            DescFields {
                op: OP_FLUSH,
                ..Default::default()
            },
            &[],
        )
        .expect("flush needs no data");
    prod.complete(f, true);
    take(&mut cons, 1, 4 * 4096);
    cons.release(2).expect("release");
    prod.reserve(write(0, 512), &pattern(3, 512))
        .expect("room again after release");
}

#[test]
fn pending_record_blocks_the_consumer_and_later_records() {
    let (_d, mut prod, mut cons) = setup(params(16, 16, 1, 0));
    let a = prod.reserve(write(0, 4096), &pattern(1, 4096)).expect("a");
    let b = prod.reserve(write(8, 4096), &pattern(2, 4096)).expect("b");
    prod.complete(b, true); // completes out of order
    assert_eq!(
        cons.peek().expect("peek"),
        Peek::Pending,
        "a is in flight: wait"
    );
    assert_eq!(cons.next_seq(), a);
    prod.complete(a, true);
    take(&mut cons, 1, 4096);
    take(&mut cons, 2, 4096);
    assert_eq!(cons.peek().expect("peek"), Peek::Empty);
}

#[test]
fn failed_record_is_reported_and_skipped() {
    let (_d, mut prod, mut cons) = setup(params(16, 16, 1, 0));
    let a = prod.reserve(write(64, 8192), &pattern(1, 8192)).expect("a");
    let b = prod.reserve(write(8, 4096), &pattern(2, 4096)).expect("b");
    prod.complete(a, false);
    prod.complete(b, true);
    match cons.peek().expect("peek") {
        Peek::Failed(r) => {
            assert_eq!((r.seq, r.desc.sector, r.desc.len), (1, 64, 8192));
            cons.advance(&r);
        }
        o => panic!("{o:?}"),
    }
    take(&mut cons, 2, 4096);
    cons.release(3).expect("release");
    assert_eq!(prod.live(), 0);
}

#[test]
fn consumer_never_passes_the_producer() {
    let (_d, mut prod, mut cons) = setup(params(16, 16, 1, 0));
    assert_eq!(cons.peek().expect("peek"), Peek::Empty);
    assert!(
        matches!(cons.release(2), Err(RingError::InvalidRelease(2))),
        "cannot release unseen records"
    );
    let s = prod.reserve(write(0, 512), &pattern(1, 512)).expect("r");
    assert!(
        matches!(cons.release(2), Err(RingError::InvalidRelease(2))),
        "cannot release before advancing"
    );
    prod.complete(s, true);
    take(&mut cons, 1, 512);
    assert_eq!(cons.peek().expect("peek"), Peek::Empty);
    cons.release(2).expect("ok now");
    assert!(
        matches!(cons.release(1), Err(RingError::InvalidRelease(1))),
        "cannot go backwards"
    );
}

#[test]
fn indices_wrap_at_two_to_the_64() {
    // Start both sequence and data indices a few steps before 2^64.
    let (_d, mut prod, mut cons) = setup(params(4, 4, u64::MAX - 2, u64::MAX - 1));
    let mut expect = u64::MAX - 2;
    for round in 0..12u64 {
        let s = prod
            .reserve(write(round, 4096), &pattern(expect, 4096))
            .expect("reserve");
        assert_eq!(s, expect);
        prod.complete(s, true);
        take(&mut cons, expect, 4096);
        expect = expect.wrapping_add(1);
        cons.release(expect).expect("release across the wrap");
    }
    assert!(expect < 16, "sequence wrapped past zero");
}

#[test]
fn corrupt_descriptor_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let mut prod = Producer::create(&path, params(16, 16, 1, 0)).expect("create");
    // A descriptor with an unknown operation: the producer trusts its
    // caller, the consumer must not.
    let s = prod
        .reserve(
            DescFields {
                op: 99,
                ..Default::default()
            },
            &[],
        )
        .expect("reserve");
    prod.complete(s, true);
    let cons = Consumer::open_file(&path).expect("open");
    assert!(matches!(cons.peek(), Err(RingError::Corrupt(_))));
    // A file that is not a ring at all.
    std::fs::write(dir.path().join("junk"), vec![0u8; 8192]).expect("junk");
    assert!(matches!(
        Consumer::open_file(&dir.path().join("junk")),
        Err(RingError::BadHeader(_))
    ));
}

#[derive(Debug, Clone)]
enum Step {
    Reserve { len_sectors: u32, flush: bool },
    Complete { which: usize, ok: bool },
    Consume,
    Release,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1u32..40, any::<bool>()).prop_map(|(l, f)| Step::Reserve { len_sectors: l, flush: f && l % 5 == 0 }),
        3 => (0usize..8, prop::bool::weighted(0.9)).prop_map(|(w, ok)| Step::Complete { which: w, ok }),
        2 => Just(Step::Consume),
        1 => Just(Step::Release),
    ]
}

proptest! {
    /// Any interleaving of reservations, out-of-order completions,
    /// consumption and release: the consumer sees exactly the reserved
    /// records, in order, each with its own payload, FAILED ones flagged.
    #[test]
    fn model_check(steps in prop::collection::vec(step(), 1..200), first in prop_oneof![Just(1u64), Just(u64::MAX - 20)]) {
        let (_d, mut prod, mut cons) = setup(params(8, 16, first, first));
        let mut inflight: Vec<u64> = Vec::new();
        let mut outcome = std::collections::HashMap::new();
        let mut lens = std::collections::HashMap::new();
        let mut seen = Vec::new();
        for s in steps {
            match s {
                Step::Reserve { len_sectors, flush } => {
                    let (f, payload) = if flush {
                        (DescFields { op: OP_FLUSH, ..Default::default() }, Vec::new())
                    } else {
                        let len = len_sectors * 512;
                        (write(u64::from(len_sectors), len), pattern(prod.next_seq(), len as usize))
                    };
                    let seq_before = prod.next_seq();
                    match prod.reserve(f, &payload) {
                        Ok(seq) => { prop_assert_eq!(seq, seq_before); inflight.push(seq); lens.insert(seq, payload.len()); }
                        Err(RingError::Full) => {}
                        Err(e) => prop_assert!(false, "{}", e),
                    }
                }
                Step::Complete { which, ok } => {
                    if !inflight.is_empty() {
                        let seq = inflight.remove(which % inflight.len());
                        prod.complete(seq, ok);
                        outcome.insert(seq, ok);
                    }
                }
                Step::Consume => match cons.peek().expect("peek") {
                    Peek::Committed(r) => {
                        prop_assert_eq!(outcome.get(&r.seq), Some(&true));
                        let mut buf = Vec::new();
                        cons.read_payload(&r, &mut buf).expect("payload");
                        prop_assert_eq!(buf.len(), lens[&r.seq]);
                        prop_assert_eq!(&buf, &pattern(r.seq, buf.len()));
                        seen.push(r.seq);
                        cons.advance(&r);
                    }
                    Peek::Failed(r) => {
                        prop_assert_eq!(outcome.get(&r.seq), Some(&false));
                        seen.push(r.seq);
                        cons.advance(&r);
                    }
                    Peek::Pending => prop_assert!(inflight.contains(&cons.next_seq())),
                    Peek::Empty => prop_assert_eq!(cons.next_seq(), prod.next_seq()),
                },
                Step::Release => { let n = cons.next_seq(); cons.release(n).expect("release"); }
            }
        }
        for w in seen.windows(2) {
            prop_assert_eq!(w[1], w[0].wrapping_add(1));
        }
    }
}
