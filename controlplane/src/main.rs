//! `rusty-agent`, RustyBalancer's deployment agent: a placeholder until the agent issue lands.
//! Until then `rusty-lb` reads its table from a file (`--table`) or from any server that speaks
//! the table WebSocket (`--agent`), as described in the README.

fn main() {
    eprintln!(
        "rusty-agent: not built yet; run rusty-lb with --table FILE (see README, \"Status\")"
    );
    std::process::exit(1);
}
