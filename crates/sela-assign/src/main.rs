use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = sela_assign::Args::parse();
    #[cfg(feature = "mpi")]
    if sela_assign::mpi_launch().is_some() {
        return sela_assign::mpi::main(&args);
    }
    sela_cli::run(|| sela_assign::run(&args))
}
