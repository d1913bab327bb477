//! `rusty-lb`: parse flags, set up logging, run. Everything else lives in the library.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let args = rusty_lb::cli::Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        // Colours only for a person at a terminal, not in files or the engine's logs.
        rusty_lb::cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        rusty_lb::cli::LogFormat::Json => logs.json().init(),
    }
    if let Err(e) = rusty_lb::server::run(args) {
        eprintln!("rusty-lb: {e:#}");
        std::process::exit(2);
    }
}
