//! `rusty-agent`: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use rusty_agent::api::DeployRequest;
use rusty_agent::cli::{Cli, Cmd, LogFormat, Output};
use rusty_agent::{client, config, wiring};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent = cli.agent;
    match cli.command {
        Cmd::Check(args) => match config::load(&args.config, args.env.as_deref()) {
            Ok(loaded) => {
                let env = args.env.as_deref().unwrap_or("(base)");
                print!(
                    "# effective configuration of {} for environment {env}\n{}",
                    args.config.display(),
                    config::render(&loaded.raw)
                );
                // The other environments must be valid too: they are what the next deploy runs.
                let mut bad = false;
                for other in loaded
                    .environments
                    .iter()
                    .filter(|e| Some(e.as_str()) != args.env.as_deref())
                {
                    if let Err(e) = config::load(&args.config, Some(other)) {
                        eprintln!("--env {other}:\n{e}");
                        bad = true;
                    }
                }
                if bad {
                    eprintln!(
                        "{}: invalid in the environments above",
                        args.config.display()
                    );
                    return ExitCode::from(1);
                }
                eprintln!("{}: ok", args.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Cmd::Run(run) => {
            let args = &run.config;
            // One TLS stack in the process (ring), also for the ACME client's connections.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let loaded = match config::load(&args.config, args.env.as_deref()) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            init_logs(&loaded.config.agent.log, run.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("rusty-agent: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            report(rt.block_on(wiring::run(loaded.config)))
        }
        other => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("rusty-agent: {e}");
                    return ExitCode::from(1);
                }
            };
            report(rt.block_on(async move {
                match other {
                    Cmd::Status { output, json } => {
                        client::status(&agent, json || output == Output::Json).await
                    }
                    Cmd::Scale {
                        service,
                        replicas,
                        wait,
                    } => client::scale(&service, replicas, &agent, &wait).await,
                    Cmd::Deploy {
                        service,
                        image,
                        weight,
                        priority,
                        set_env,
                        command,
                        wait,
                    } => {
                        let docker = image.is_some();
                        let mut request = DeployRequest {
                            image,
                            weight,
                            priority,
                            env: client::parse_env(&set_env)?,
                            ..DeployRequest::default()
                        };
                        if docker {
                            if !command.is_empty() {
                                request.args = Some(command);
                            }
                        } else if let Some((program, args)) = command.split_first() {
                            request.command = Some(program.clone());
                            request.args = Some(args.to_vec());
                        }
                        client::deploy(&service, request, &agent, &wait).await
                    }
                    Cmd::Drain { instance, wait } => client::drain(&instance, &agent, &wait).await,
                    Cmd::Renew => client::renew(&agent).await,
                    Cmd::Run(_) | Cmd::Check(_) => unreachable!("handled above"),
                }
            }))
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rusty-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logs(default: &str, format: LogFormat) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
}
