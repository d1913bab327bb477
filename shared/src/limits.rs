//! Size and range limits of a table, shared by the agent (before it sends) and the data plane
//! (before it installs). They bound the memory and CPU one table can cost a data plane.

/// The table schema this build speaks (`"schema"` field; absent means this one).
pub const SCHEMA: u32 = 1;
/// Largest accepted table, in bytes of JSON: 100,000 backends with their schedules take about
/// 9 MiB.
pub const MAX_TABLE_BYTES: usize = 16 << 20;
/// Largest accepted certificate bundle from the agent, in bytes of JSON.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Most backends in one table, over all services.
pub const MAX_BACKENDS: usize = 100_000;
/// Most services in one table.
pub const MAX_SERVICES: usize = 1_000;
/// Most host patterns per service.
pub const MAX_HOSTS_PER_SERVICE: usize = 100;
/// Longest service name or backend id, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest host pattern (a DNS name is at most 253 bytes).
pub const MAX_HOST_LEN: usize = 253;
/// Longest path prefix, in bytes.
pub const MAX_PATH_PREFIX_LEN: usize = 1024;
/// Backend weight range (inclusive).
pub const WEIGHT_MIN: u32 = 1;
pub const WEIGHT_MAX: u32 = 1000;
/// Backend priority range (inclusive); 0 is the most preferred tier.
pub const PRIORITY_MAX: u32 = 127;
/// Longest schedule of one tier: the tier's total weight after dividing by the weights' gcd.
/// At four bytes per entry this caps a tier's schedule at 4 MiB.
pub const MAX_SCHEDULE_LEN: u64 = 1 << 20;
/// Upper bound on the work of building one tier's schedule (length × distinct weights), so a
/// hostile or careless table cannot make an install take more than about a second (2^28 steps
/// took 0.9 s on the project's 2-core test machine). Only tiers of hundreds of distinct weights
/// come near it; 100,000 backends of weights 1–4 are 250,000 × 4.
pub const MAX_SCHEDULE_WORK: u64 = 1 << 28;
/// Overprovisioning factor range (inclusive), as in Envoy's priority levels.
pub const OVERPROVISIONING_MIN: f64 = 1.0;
pub const OVERPROVISIONING_MAX: f64 = 100.0;
/// Timeouts are between 1 ms and 1 hour.
pub const TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Most retries (attempts after the first) per request.
pub const RETRIES_MAX: u32 = 10;
/// Most requests in flight per backend address a service may set (`max_inflight`).
pub const MAX_INFLIGHT_MAX: u32 = 1_000_000;
/// Longest name of a `class_header`.
pub const MAX_CLASS_HEADER_LEN: usize = 64;

/// Longest HSTS max-age accepted: two years, what the preload list asks for.
pub const HSTS_MAX_AGE_MAX: u64 = 2 * 365 * 24 * 3600;

/// Shortest max-age the HSTS preload list accepts.
pub const HSTS_PRELOAD_MIN: u64 = 365 * 24 * 3600;

/// Largest CA bundle carried in a table (`upstream_tls.ca_pem`).
pub const MAX_CA_PEM_BYTES: usize = 64 * 1024;

/// Most ACME challenges open at once (`acme_challenges`): one per name being ordered.
pub const MAX_ACME_CHALLENGES: usize = 1_000;
/// Longest ACME token and key authorization (RFC 8555 tokens carry 128 bits of entropy in
/// base64url; Let's Encrypt's are 43 characters, a key authorization adds a dot and 43 more).
pub const MAX_ACME_TOKEN_LEN: usize = 128;
pub const MAX_ACME_KEY_AUTH_LEN: usize = 256;
