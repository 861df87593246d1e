//! The `justizbus` binary: parses the command line and hands over to [`justizbus::cli`].

fn main() -> std::process::ExitCode {
    justizbus::cli::main()
}
