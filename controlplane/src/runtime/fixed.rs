//! The `static` runtime: backends the agent does not run, at addresses from the config. Starting
//! an instance hands out the next unused address; stopping it frees the address again. The agent
//! health-checks them like any other instance.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{InstanceInfo, InstanceSpec, Runtime, RuntimeError};
use crate::spec::InstanceRef;

pub struct StaticRuntime {
    /// Service → its addresses.
    addresses: HashMap<String, Vec<SocketAddr>>,
    taken: Mutex<HashMap<InstanceRef, SocketAddr>>,
}

impl StaticRuntime {
    pub fn new(addresses: HashMap<String, Vec<SocketAddr>>) -> StaticRuntime {
        StaticRuntime {
            addresses,
            taken: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Runtime for StaticRuntime {
    async fn start(&self, spec: InstanceSpec) -> Result<SocketAddr, RuntimeError> {
        let service = &spec.instance.service;
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let free = self
            .addresses
            .get(service)
            .into_iter()
            .flatten()
            // Free within this service: two services may name the same backend (other
            // prefixes, other classes in front of one server).
            .find(|a| !taken.iter().any(|(i, t)| &i.service == service && t == *a))
            .copied()
            .ok_or_else(|| RuntimeError::NoAddress(service.clone()))?;
        taken.insert(spec.instance, free);
        Ok(free)
    }

    async fn stop(&self, instance: &InstanceRef, _grace: Duration) -> Result<(), RuntimeError> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken
            .remove(instance)
            .map(|_| ())
            .ok_or_else(|| RuntimeError::Unknown(instance.to_string()))
    }

    async fn list(&self) -> Vec<InstanceInfo> {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken
            .iter()
            .map(|(i, a)| InstanceInfo {
                id: i.to_string(),
                addr: *a,
                pid: None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RunSpec;

    fn spec(service: &str, seq: u64) -> InstanceSpec {
        InstanceSpec {
            instance: InstanceRef {
                service: service.to_owned(),
                seq,
            },
            generation: 1,
            run: std::sync::Arc::new(RunSpec {
                command: String::new(),
                image: String::new(),
                args: vec![],
                env: Default::default(),
                weight: 1,
                priority: 0,
            }),
        }
    }

    #[tokio::test]
    async fn addresses_are_handed_out_once_per_service_and_may_be_shared_between_services() {
        let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let rt = StaticRuntime::new(HashMap::from([
            ("api".to_owned(), vec![a, b]),
            ("bulk".to_owned(), vec![a]),
        ]));
        assert_eq!(rt.start(spec("api", 1)).await.unwrap(), a);
        assert_eq!(rt.start(spec("api", 2)).await.unwrap(), b);
        assert!(
            rt.start(spec("api", 3)).await.is_err(),
            "all of api's taken"
        );
        assert_eq!(
            rt.start(spec("bulk", 1)).await.unwrap(),
            a,
            "shared with api"
        );
        rt.stop(&spec("api", 1).instance, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(rt.start(spec("api", 4)).await.unwrap(), a);
    }
}
