//! Table builders shared by the benchmarks in `benches/`.

use rusty_shared::{Backend, Service, Table};

/// One service `web` with `n` backends in tier 0, weights cycling through `weights`.
pub fn table(n: usize, weights: &[u32]) -> Table {
    let backends = (0..n)
        .map(|i| {
            let addr = format!(
                "127.0.{}.{}:{}",
                (i / 250) % 250,
                i % 250 + 1,
                8000 + i % 1000
            );
            Backend::new(format!("b{i}"), addr, weights[i % weights.len()], 0)
        })
        .collect();
    let mut s = Service::new("web", backends);
    s.hosts = vec!["localhost".into(), "*.example.com".into()];
    Table::new(1, vec![s])
}
