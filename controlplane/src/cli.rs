//! Command-line interface of `rusty-agent`: `run` and `check` work on a config file; `status`,
//! `scale`, `deploy` and `drain` talk to a running agent's admin API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// RustyBalancer's deployment agent: runs, health-checks and rolls backend instances and pushes
/// round-robin tables to every data plane.
#[derive(Debug, Parser)]
#[command(name = "rusty-agent", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
    /// How `status`, `scale`, `deploy` and `drain` reach the agent (given anywhere on the line).
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the agent.
    Run(RunArgs),
    /// Validate a config and print it after the environment overlay (like `nginx -t`).
    Check(ConfigArgs),
    /// Services, instances and the last table of a running agent.
    Status {
        /// `text` for people, `json` for scripts (the agent's answer as it is).
        #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
        output: Output,
        /// The same as `--output json`.
        #[arg(long, conflicts_with = "output")]
        json: bool,
    },
    /// Change a service's number of instances and follow until it is done.
    Scale {
        service: String,
        replicas: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Roll a service to a new version and follow until it succeeds or fails.
    ///
    /// Example: rusty-agent deploy web -- ./rusty-echo --listen 127.0.0.1:{port} --id v2-{instance}
    ///          rusty-agent deploy app --image demo:v2
    Deploy {
        service: String,
        /// New image (docker services); arguments after `--` then replace its CMD.
        #[arg(long)]
        image: Option<String>,
        /// New weight of the new instances.
        #[arg(long)]
        weight: Option<u32>,
        /// New priority tier of the new instances (0 is preferred).
        #[arg(long)]
        priority: Option<u32>,
        /// Environment of the new instances, KEY=VALUE (repeat; replaces the current set).
        #[arg(long = "set-env", value_name = "KEY=VALUE")]
        set_env: Vec<String>,
        /// The new command and its arguments; left out, the current ones are run again.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Take one instance (e.g. web-3) out of the table, stop it after the drain time, replace it,
    /// and follow until the replacement serves.
    Drain {
        instance: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Order every `[tls.acme]` certificate again now (the current ones serve until the new
    /// ones arrive).
    Renew,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The agent's TOML config.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Apply [env.NAME] over the base config (e.g. production, development, slim).
    #[arg(long, value_name = "NAME")]
    pub env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The log's lines on stderr: `text` for people, `json` (one object per line) for a log
    /// collector.
    #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's listener.
    #[arg(
        long,
        global = true,
        env = "RUSTY_AGENT",
        default_value = "127.0.0.1:7070"
    )]
    pub agent: String,
    /// File with the agent's bearer token.
    #[arg(
        long,
        global = true,
        env = "RUSTY_AGENT_TOKEN_FILE",
        default_value = ".rusty/agent/token"
    )]
    pub token_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Return once the agent accepted the request.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up following after this many seconds (the operation itself goes on).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}
