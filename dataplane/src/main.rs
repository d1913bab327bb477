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
        rusty_lb::cli::LogFormat::Text => logs.init(),
        rusty_lb::cli::LogFormat::Json => logs.json().init(),
    }
    if let Err(e) = rusty_lb::server::run(args) {
        eprintln!("rusty-lb: {e:#}");
        std::process::exit(2);
    }
}
