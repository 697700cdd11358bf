//! `replicad`: see the library crate.
fn main() -> std::process::ExitCode {
    replicad::cli::main()
}
