//! The `gatehouse` binary: everything lives in the library; see `gatehouse::cli`.

/// jemalloc, configured in `.cargo/config.toml`: fewer instructions per request than glibc's
/// malloc (callgrind: −5 % on HTTP/1, −4 % on HTTP/2), and it gives the memory of a burst back
/// to the system, where glibc keeps it (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
