fn main() -> std::process::ExitCode {
    keyshift::cli::main()
}
