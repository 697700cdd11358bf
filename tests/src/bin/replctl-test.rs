//! `replctl`, built inside the test package so integration tests can run
//! the command as operators do and check what it prints and its exit code.
fn main() -> std::process::ExitCode {
    replctl::main()
}
