//! The `replicad` daemon, built inside the test package so integration
//! tests can run it as a separate process (and kill it).
fn main() -> std::process::ExitCode {
    replicad::cli::main()
}
