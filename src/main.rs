//! The `gatehouse` binary: everything lives in the library; see `gatehouse::cli`.

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
