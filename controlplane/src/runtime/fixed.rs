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
            .find(|a| !taken.values().any(|t| t == *a))
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
