//! The `justizbus` binary: parses the command line and hands over to [`justizbus::cli`].

// mimalloc instead of glibc malloc: the XJustiz translation allocates many small strings and
// maps; measured with `justizbus xjustiz bench` side by side (README, section "Speed").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    justizbus::cli::main()
}
