//! What every request path shares, in one value: the table store, the metrics, the overload
//! queue, the connection counters, the shutdown, the limits, the request ids and the TLS certificates. Built once by
//! `server` and handed (in an `Arc`) to the front, the lane, the pipeline and the admin
//! listener, so none of them reaches into another for state.

use std::sync::Arc;
use std::time::Duration;

use crate::access_log::AccessLog;
use crate::certs::Certs;
use crate::connections::Connections;
use crate::http1::editor::RequestIds;
use crate::http1::trust::TrustedProxies;
use crate::http1::Limits;
use crate::metrics::Registry;
use crate::queue::Queue;
use crate::shutdown::Shutdown;
use crate::store::TableStore;

pub struct Plane {
    pub store: Arc<TableStore>,
    pub metrics: Arc<Registry>,
    pub queue: Arc<Queue>,
    pub connections: Connections,
    pub shutdown: Shutdown,
    pub limits: Limits,
    /// Clients whose forwarding headers are believed (`--trusted-proxies`).
    pub trusted: TrustedProxies,
    pub ids: RequestIds,
    /// How long an idle keep-alive client connection is kept (at least a second).
    pub keepalive: Duration,
    /// How long a write to a client may wait for it to read (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// The TLS listener's certificates, when there is one.
    pub certs: Option<Arc<Certs>>,
    /// The port redirects to HTTPS name (`--https-port`).
    pub https_port: u16,
    /// Where each request is logged, when `--access-log` is given.
    pub access_log: Option<Arc<AccessLog>>,
}

impl Plane {
    /// A plane around `store` (which shares `metrics` and `queue`), with default connection
    /// state.
    pub fn new(
        store: Arc<TableStore>,
        metrics: Arc<Registry>,
        queue: Arc<Queue>,
        limits: Limits,
        trusted: TrustedProxies,
        keepalive: Duration,
        send_timeout: Duration,
    ) -> Plane {
        Plane {
            store,
            metrics,
            queue,
            connections: Connections::default(),
            shutdown: Shutdown::default(),
            limits,
            trusted,
            ids: RequestIds::new(),
            keepalive: keepalive.max(Duration::from_secs(1)),
            send_timeout: send_timeout.max(Duration::from_secs(1)),
            certs: None,
            https_port: 443,
            access_log: None,
        }
    }

    /// Put the metrics of the connections, the queue, the certificates and the access log into
    /// the registry a scrape renders (once, when the plane is complete).
    pub fn register_metrics(&self) -> Result<(), prometheus::Error> {
        let mut all = self.connections.collectors();
        all.extend(self.queue.stats.collectors());
        if let Some(certs) = &self.certs {
            all.extend(certs.collectors());
        }
        if let Some(log) = &self.access_log {
            all.extend(log.collectors());
        }
        self.metrics.register(all)
    }
}
