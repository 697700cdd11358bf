//! Capture-path microbenchmark: the module's capture logic plus the payload
//! copy, next to a plain memcpy of the same buffers, in one run. Prints a
//! table; asserts nothing (see `scripts/bench-capture.sh`).

fn main() {
    let total: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048)
        << 20;
    println!(
        "capture path (reserve + copy + commit + consume, released {} at a time) vs memcpy of the same 4 KiB pages, {} MiB per round, best of 5, 64 MiB ring",
        replica_capture::bench::RELEASE_BATCH,
        total >> 20
    );
    println!(
        "{:>10} {:>14} {:>14} {:>8} {:>18} {:>8}",
        "payload", "capture GiB/s", "memcpy GiB/s", "ratio", "1 memcpy GiB/s", "ratio"
    );
    for payload in [4096usize, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let r = replica_capture::bench::run(payload, total, 64, 5);
        println!(
            "{:>10} {:>14.2} {:>14.2} {:>8.2} {:>18.2} {:>8.2}",
            format!("{} KiB", payload >> 10),
            r.capture_gib_s,
            r.memcpy_gib_s,
            r.capture_gib_s / r.memcpy_gib_s,
            r.memcpy_whole_gib_s,
            r.capture_gib_s / r.memcpy_whole_gib_s
        );
    }
    println!("goal: capture >= 0.8x memcpy of the same pages");
}
