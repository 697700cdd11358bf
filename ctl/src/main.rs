//! `replctl`: drive dm-replica.

fn main() -> std::process::ExitCode {
    replctl::main()
}
