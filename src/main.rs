fn main() {
    std::process::exit(labfs::cli::main());
}
