use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = sela_assign::Args::parse();
    sela_cli::run(|| sela_assign::run(&args))
}
