//! The gateway's settings: command-line flags, optionally on top of a TOML file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aoai_usage::{Caller, CallerLimits};
use clap::Parser;
use serde::Deserialize;
use toml::Spanned;

use crate::serve::Timeouts;

/// The caller-side timeouts' default, each: a minute, as nginx's.
const DEFAULT_CALLER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a Realtime session may go without a frame either way, by default: 5 minutes, long
/// enough for a person to think or type between turns.
const DEFAULT_SESSION_IDLE_LIMIT: Duration = Duration::from_secs(300);
/// How long a Realtime session may last, by default: Azure ends its sessions after 30 minutes
/// (its documented maximum) itself, with its own events; the gateway ends, a minute later, only
/// those it did not.
const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(31 * 60);
/// How long the Realtime sessions open at shutdown may go on, by default.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Command-line flags. Every flag overrides the same setting from `--config`.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    about = "One endpoint in front of several Azure OpenAI instances: round-robin, retry on \
             the next instance, Entra ID auth.",
    after_help = "With no backend, two emulated instances start in-process on loopback."
)]
pub(crate) struct Flags {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A backend, as its endpoint URL (https://NAME.openai.azure.com), optionally named:
    /// NAME=URL. Repeat for each instance.
    #[arg(long = "backend", value_name = "[NAME=]URL")]
    backends: Vec<String>,
    /// A backend's tier: NAME=N, 1 first (e.g. PTU), 2 when every tier-1 backend is cooling,
    /// ... [default: 1]. Repeat for each backend.
    #[arg(long = "priority", value_name = "NAME=N")]
    priorities: Vec<String>,
    /// A backend's share of its tier's traffic: NAME=N [default: 1]. Repeat for each backend.
    #[arg(long = "weight", value_name = "NAME=N")]
    weights: Vec<String>,
    /// A TOML file with the same settings (see examples/gateway.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How the gateway authenticates to the backends: managed-identity[=CLIENT_ID],
    /// workload-identity, developer-tools, client-secret, api-key or none [default:
    /// managed-identity for Azure endpoints, none for loopback ones].
    #[arg(long, value_name = "MODE")]
    auth: Option<String>,
    /// Environment variable holding the comma-separated keys callers must present (as
    /// `api-key` or `Authorization: Bearer`). Required unless listening on loopback.
    #[arg(long, value_name = "VAR")]
    client_keys_env: Option<String>,
    /// Attempts per request, the first included [default: 3].
    #[arg(long, value_name = "N")]
    max_attempts: Option<usize>,
    /// Largest request body in bytes [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    body_limit: Option<usize>,
    /// Seconds one attempt may wait for the response headers [default: 300].
    #[arg(long, value_name = "SECS")]
    attempt_timeout: Option<u64>,
    /// Seconds a request may wait for an access token when none is cached (the token endpoint
    /// is slow or down); then it gets 503 with `Retry-After` [default: 3].
    #[arg(long, value_name = "SECS")]
    token_wait: Option<u64>,
    /// Longest cooldown, in seconds, a 429 may cause [default: 300].
    #[arg(long, value_name = "SECS")]
    cooldown_cap: Option<u64>,
    /// Do not add `x-served-by: NAME` to responses.
    #[arg(long)]
    no_served_by_header: bool,
    /// Do not ask streamed chat completions for their usage when the caller did not (their
    /// tokens then go uncounted).
    #[arg(long)]
    no_include_usage: bool,
    /// Seconds a caller's HTTP/1.1 connection may wait for a whole request head, from its
    /// opening and after each answer; then it is closed (hyper's header read timeout)
    /// [default: 60].
    #[arg(long, value_name = "SECS")]
    head_timeout: Option<u64>,
    /// Seconds a request body still arriving may go without a byte; then the caller gets 408
    /// [default: 60].
    #[arg(long, value_name = "SECS")]
    body_timeout: Option<u64>,
    /// Seconds an answer may wait for room in its caller's connection (a write timeout on the
    /// socket); then the connection is closed and the backend's stream dropped [default: 60].
    #[arg(long, value_name = "SECS")]
    send_timeout: Option<u64>,
    /// Seconds a Realtime (WebSocket) session may go without a frame either way; then both
    /// sides are closed with 1001. 0: no limit [default: 300].
    #[arg(long, value_name = "SECS")]
    session_idle_limit: Option<u64>,
    /// Seconds a Realtime session may last; then both sides are closed with 1001. 0: no limit
    /// [default: 1860, a minute past Azure's own 30-minute limit].
    #[arg(long, value_name = "SECS")]
    session_lifetime: Option<u64>,
    /// Seconds the Realtime sessions still open at shutdown (SIGTERM, Ctrl-C) may go on; then
    /// both sides of each are closed with 1001 [default: 30].
    #[arg(long, value_name = "SECS")]
    shutdown_grace: Option<u64>,
    /// Worker threads of the runtime [default: one per core].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// A PEM file of CA certificates to trust besides the platform's, for instances behind a
    /// private CA or a TLS-inspecting proxy.
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// Push the metrics over OTLP (HTTP/protobuf, http or https) to this URL as well, e.g. a
    /// local collector's http://127.0.0.1:4318/v1/metrics. Headers (a backend's key) come
    /// from `OTEL_EXPORTER_OTLP_HEADERS`.
    #[cfg(feature = "otlp")]
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Seconds between OTLP exports [default: 60].
    #[cfg(feature = "otlp")]
    #[arg(long, value_name = "SECS")]
    otlp_interval: Option<u64>,
}

/// The settings file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    auth: Option<String>,
    client_keys_env: Option<String>,
    max_attempts: Option<usize>,
    body_limit: Option<usize>,
    attempt_timeout_secs: Option<u64>,
    cooldown_cap_secs: Option<u64>,
    token_wait_secs: Option<u64>,
    served_by_header: Option<bool>,
    include_usage: Option<bool>,
    head_timeout_secs: Option<u64>,
    body_timeout_secs: Option<u64>,
    send_timeout_secs: Option<u64>,
    session_idle_limit_secs: Option<u64>,
    session_lifetime_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    workers: Option<usize>,
    ca_file: Option<PathBuf>,
    /// Read without the `otlp` feature too, to say that it needs the feature.
    otlp_endpoint: Option<String>,
    otlp_interval_secs: Option<u64>,
    #[serde(default)]
    backends: Vec<FileBackend>,
    #[serde(default)]
    clients: Vec<FileClient>,
}

/// A `[[clients]]` table: a client key with a name and, optionally, per-minute limits. Spans
/// for errors that name the line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClient {
    /// As logs and metrics show it; unique.
    name: Spanned<String>,
    /// The environment variable holding its key.
    key_env: Spanned<String>,
    /// At least 1; absent: no limit. (Signed, so that a negative number gets the same error
    /// as 0, naming the field.)
    tokens_per_minute: Option<Spanned<i64>>,
    /// At least 1; absent: no limit.
    requests_per_minute: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    name: Option<String>,
    url: String,
    /// 1 is the first tier; default 1.
    priority: Option<u32>,
    /// Share of its tier's traffic; default 1.
    weight: Option<u32>,
    /// This backend's auth mode, over the file's `auth`.
    auth: Option<String>,
    /// The deployments it serves: the caller's name to its own; absent = every one, same names.
    deployments: Option<std::collections::BTreeMap<String, String>>,
}

/// How the gateway authenticates to its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthMode {
    /// Managed identity: system-assigned, or user-assigned with this client ID.
    ManagedIdentity(Option<String>),
    /// Workload identity (AKS), from the AZURE_* variables the webhook sets.
    WorkloadIdentity,
    /// `az login` / `azd auth login`, for local development.
    DeveloperTools,
    /// A service principal, from AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET.
    ClientSecret,
    /// A key per backend, from AOAI_KEY_<NAME>.
    ApiKey,
    /// No credential.
    None,
}

impl AuthMode {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text.split_once('=') {
            Some(("managed-identity", id)) if !id.is_empty() => {
                Self::ManagedIdentity(Some(id.to_owned()))
            }
            None => match text {
                "managed-identity" => Self::ManagedIdentity(None),
                "workload-identity" => Self::WorkloadIdentity,
                "developer-tools" => Self::DeveloperTools,
                "client-secret" => Self::ClientSecret,
                "api-key" => Self::ApiKey,
                "none" => Self::None,
                _ => return Err(format!("unknown --auth mode {text:?}")),
            },
            _ => return Err(format!("unknown --auth mode {text:?}")),
        })
    }
}

/// The Realtime (WebSocket) sessions' settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionSettings {
    /// How long a session may go without a frame either way; `None`: no limit.
    pub(crate) idle_limit: Option<Duration>,
    /// How long a session may last; `None`: no limit.
    pub(crate) lifetime: Option<Duration>,
    /// How long the sessions open at shutdown may go on before they are closed.
    pub(crate) shutdown_grace: Duration,
}

/// A session limit of `secs` seconds, 0 for none, or `default` when none is given.
fn session_limit(secs: Option<u64>, default: Duration) -> Option<Duration> {
    match secs {
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs)),
        None => Some(default),
    }
}

/// One backend: a name and its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backend {
    pub(crate) name: String,
    pub(crate) url: String,
    /// 1 is the first tier.
    pub(crate) priority: u32,
    /// Share of its tier's traffic.
    pub(crate) weight: u32,
    /// This backend's own auth mode, over the gateway's.
    pub(crate) auth: Option<AuthMode>,
    /// The deployments it serves (the caller's name, its own); `None`: every one, same names.
    pub(crate) deployments: Option<Vec<(String, String)>>,
}

impl Backend {
    /// A backend at `url` named `name`, in tier 1 with weight 1, the gateway's auth and every
    /// deployment.
    pub(crate) fn new(name: String, url: String) -> Self {
        Self {
            name,
            url,
            priority: 1,
            weight: 1,
            auth: None,
            deployments: None,
        }
    }
}

/// Everything the gateway needs, validated. Its `Debug` shows the clients' names, never their
/// keys.
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) backends: Vec<Backend>,
    pub(crate) auth: Option<AuthMode>,
    /// The variable of `--client-keys-env` (or the file's `client_keys_env`): unnamed keys,
    /// without limits, read by `main`.
    pub(crate) client_keys_env: Option<String>,
    /// The named clients of the file's `[[clients]]` tables, in the file's order: each
    /// `Caller` (its name and limits) with its key, read from its `key_env` variable (trimmed,
    /// not empty; no two clients share one), for `RequireClientKeyLayer::clients`.
    pub(crate) clients: Vec<(Caller, String)>,
    /// The settings below are `None` when neither the flags nor the file give them: the
    /// `Gateway` builder's own defaults apply.
    pub(crate) max_attempts: Option<usize>,
    pub(crate) body_limit: Option<usize>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) cooldown_cap: Option<Duration>,
    pub(crate) token_wait: Option<Duration>,
    pub(crate) served_by_header: bool,
    /// Whether streamed chat completions are asked for their usage (the caller still gets the
    /// stream it asked for).
    pub(crate) include_usage: bool,
    /// How long a caller's connection may wait on its caller.
    pub(crate) timeouts: Timeouts,
    /// The Realtime sessions' limits, and their grace period at shutdown.
    pub(crate) sessions: SessionSettings,
    /// Worker threads; `None`: one per core.
    pub(crate) workers: Option<usize>,
    /// CA certificates to trust besides the platform's.
    pub(crate) ca_file: Option<PathBuf>,
    /// The configuration file, read again on `SIGHUP`.
    pub(crate) config: Option<PathBuf>,
    /// Where to push the metrics over OTLP, and how often.
    #[cfg(feature = "otlp")]
    pub(crate) otlp: Option<Otlp>,
}

/// The OTLP exporter's settings.
#[cfg(feature = "otlp")]
#[derive(Debug, Clone)]
pub(crate) struct Otlp {
    /// An http or https URL, used as it is (the collector's `/v1/metrics` included).
    pub(crate) endpoint: String,
    pub(crate) interval: Duration,
}

impl Settings {
    /// Reads the flags, and the file they name, into settings; the error is one line.
    pub(crate) fn from_flags(flags: Flags) -> Result<Self, String> {
        let (file, clients) = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                let mut file = toml::from_str::<File>(&text).map_err(|e| {
                    let line = e.span().map_or(String::new(), |span| {
                        format!("line {}: ", line_of(&text, span.start))
                    });
                    format!("invalid config {}: {line}{}", path.display(), e.message())
                })?;
                let clients = clients_from(std::mem::take(&mut file.clients), path, &text)?;
                (file, clients)
            }
            None => (File::default(), Vec::new()),
        };
        let mut backends = Vec::new();
        for backend in &file.backends {
            let mut parsed = backend_from(backend.name.clone(), &backend.url)?;
            parsed.priority = at_least_one("priority", &parsed.name, backend.priority)?;
            parsed.weight = at_least_one("weight", &parsed.name, backend.weight)?;
            parsed.auth = backend.auth.as_deref().map(AuthMode::parse).transpose()?;
            parsed.deployments = backend
                .deployments
                .clone()
                .map(|names| names.into_iter().collect());
            backends.push(parsed);
        }
        for spec in &flags.backends {
            backends.push(match spec.split_once('=') {
                Some((name, url)) if !name.contains("://") => {
                    backend_from(Some(name.to_owned()), url)?
                }
                _ => backend_from(None, spec)?,
            });
        }
        for (what, specs) in [("priority", &flags.priorities), ("weight", &flags.weights)] {
            for spec in specs {
                let (name, value) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--{what} {spec:?}: expected NAME=N"))?;
                let value = value
                    .parse()
                    .map_err(|_| format!("--{what} {spec:?}: {value:?} is not a whole number"))?;
                let backend = backends
                    .iter_mut()
                    .find(|b| b.name == name)
                    .ok_or_else(|| format!("--{what} {spec:?}: no backend is named {name:?}"))?;
                let value = at_least_one(what, name, Some(value))?;
                match what {
                    "priority" => backend.priority = value,
                    _ => backend.weight = value,
                }
            }
        }
        let auth = flags.auth.as_deref().or(file.auth.as_deref());
        let max_attempts = flags.max_attempts.or(file.max_attempts);
        if max_attempts == Some(0) {
            return Err("max attempts must be at least 1".to_owned());
        }
        let timeouts = Timeouts {
            head: timeout(
                "head",
                flags.head_timeout.or(file.head_timeout_secs),
                DEFAULT_CALLER_TIMEOUT,
            )?,
            body: timeout(
                "body",
                flags.body_timeout.or(file.body_timeout_secs),
                DEFAULT_CALLER_TIMEOUT,
            )?,
            send: timeout(
                "send",
                flags.send_timeout.or(file.send_timeout_secs),
                DEFAULT_CALLER_TIMEOUT,
            )?,
        };
        let sessions = SessionSettings {
            idle_limit: session_limit(
                flags.session_idle_limit.or(file.session_idle_limit_secs),
                DEFAULT_SESSION_IDLE_LIMIT,
            ),
            lifetime: session_limit(
                flags.session_lifetime.or(file.session_lifetime_secs),
                DEFAULT_SESSION_LIFETIME,
            ),
            shutdown_grace: flags
                .shutdown_grace
                .or(file.shutdown_grace_secs)
                .map_or(DEFAULT_SHUTDOWN_GRACE, Duration::from_secs),
        };
        let workers = flags.workers.or(file.workers);
        if workers == Some(0) {
            return Err("workers must be at least 1".to_owned());
        }
        #[cfg(feature = "otlp")]
        let otlp = otlp_from(
            flags.otlp_endpoint.or(file.otlp_endpoint),
            flags.otlp_interval.or(file.otlp_interval_secs),
        )?;
        #[cfg(not(feature = "otlp"))]
        if file.otlp_endpoint.is_some() || file.otlp_interval_secs.is_some() {
            return Err(
                "otlp_endpoint and otlp_interval_secs need a gateway built with \
                        `--features otlp`"
                    .to_owned(),
            );
        }
        Ok(Self {
            listen: flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            backends,
            auth: auth.map(AuthMode::parse).transpose()?,
            client_keys_env: flags.client_keys_env.or(file.client_keys_env),
            clients,
            max_attempts,
            body_limit: flags.body_limit.or(file.body_limit),
            attempt_timeout: flags
                .attempt_timeout
                .or(file.attempt_timeout_secs)
                .map(Duration::from_secs),
            cooldown_cap: flags
                .cooldown_cap
                .or(file.cooldown_cap_secs)
                .map(Duration::from_secs),
            token_wait: flags
                .token_wait
                .or(file.token_wait_secs)
                .map(Duration::from_secs),
            served_by_header: !flags.no_served_by_header && file.served_by_header.unwrap_or(true),
            include_usage: !flags.no_include_usage && file.include_usage.unwrap_or(true),
            timeouts,
            sessions,
            workers,
            ca_file: flags.ca_file.or(file.ca_file),
            config: flags.config,
            #[cfg(feature = "otlp")]
            otlp,
        })
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written out (not derived) for `clients`: their names, never their keys.
        let Self {
            listen,
            backends,
            auth,
            client_keys_env,
            clients,
            max_attempts,
            body_limit,
            attempt_timeout,
            cooldown_cap,
            token_wait,
            served_by_header,
            include_usage,
            timeouts,
            sessions,
            workers,
            ca_file,
            config,
            #[cfg(feature = "otlp")]
            otlp,
        } = self;
        let clients: Vec<(&str, CallerLimits)> = clients
            .iter()
            .map(|(caller, _key)| (caller.name(), caller.limits()))
            .collect();
        let mut f = f.debug_struct("Settings");
        f.field("listen", listen)
            .field("backends", backends)
            .field("auth", auth)
            .field("client_keys_env", client_keys_env)
            .field("clients", &clients)
            .field("max_attempts", max_attempts)
            .field("body_limit", body_limit)
            .field("attempt_timeout", attempt_timeout)
            .field("cooldown_cap", cooldown_cap)
            .field("token_wait", token_wait)
            .field("served_by_header", served_by_header)
            .field("include_usage", include_usage)
            .field("timeouts", timeouts)
            .field("sessions", sessions)
            .field("workers", workers)
            .field("ca_file", ca_file)
            .field("config", config);
        #[cfg(feature = "otlp")]
        f.field("otlp", otlp);
        f.finish()
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}

/// The `[[clients]]` of the file at `path` (whose text is `text`), validated, each with its key
/// read from its `key_env`. Errors name the file, the line and the client, never a key.
fn clients_from(
    tables: Vec<FileClient>,
    path: &Path,
    text: &str,
) -> Result<Vec<(Caller, String)>, String> {
    let mut clients: Vec<(Caller, String, String)> = Vec::with_capacity(tables.len());
    for table in tables {
        let at = |offset: usize| {
            format!(
                "invalid config {}: line {}: ",
                path.display(),
                line_of(text, offset)
            )
        };
        let name = table.name.get_ref();
        let line = at(table.name.span().start);
        if name.trim().is_empty() {
            return Err(format!("{line}a client's name must not be empty"));
        }
        if name.chars().any(char::is_control) {
            return Err(format!(
                "{line}client {name:?}: the name holds a control character"
            ));
        }
        if clients.iter().any(|(known, _, _)| known.name() == name) {
            return Err(format!(
                "{line}client {name:?} is defined twice: names must be unique"
            ));
        }
        let limit = |what: &str, value: &Option<Spanned<i64>>| match value {
            None => Ok(None),
            Some(value) => u64::try_from(*value.get_ref())
                .ok()
                .filter(|&n| n >= 1)
                .map(Some)
                .ok_or_else(|| {
                    format!(
                        "{}client {name:?}: {what} must be at least 1 (leave it out for no limit)",
                        at(value.span().start)
                    )
                }),
        };
        let limits = CallerLimits {
            tokens_per_minute: limit("tokens_per_minute", &table.tokens_per_minute)?,
            requests_per_minute: limit("requests_per_minute", &table.requests_per_minute)?,
        };
        let var = table.key_env.get_ref();
        let line = at(table.key_env.span().start);
        if var.trim().is_empty() {
            return Err(format!(
                "{line}client {name:?}: key_env must name an environment variable"
            ));
        }
        // The key is never part of an error: only the client and the variable are named.
        let key = match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => key.trim().to_owned(),
            Ok(_) => {
                return Err(format!(
                    "{line}client {name:?}: environment variable {var} (key_env) is empty"
                ));
            }
            Err(std::env::VarError::NotPresent) => {
                return Err(format!(
                    "{line}client {name:?}: environment variable {var} (key_env) is not set"
                ));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!(
                    "{line}client {name:?}: environment variable {var} (key_env) is not valid UTF-8"
                ));
            }
        };
        if let Some((other, _, other_var)) = clients.iter().find(|(_, known, _)| *known == key) {
            return Err(format!(
                "{line}clients {:?} and {name:?} have the same key (from {other_var} and {var}): \
                 each client needs its own",
                other.name()
            ));
        }
        clients.push((
            Caller::new(name.as_str()).with_limits(limits),
            key,
            var.clone(),
        ));
    }
    Ok(clients
        .into_iter()
        .map(|(caller, key, _var)| (caller, key))
        .collect())
}

/// The OTLP settings: none without an endpoint; an interval needs one.
#[cfg(feature = "otlp")]
fn otlp_from(endpoint: Option<String>, interval: Option<u64>) -> Result<Option<Otlp>, String> {
    let Some(endpoint) = endpoint else {
        return match interval {
            Some(_) => Err("the OTLP interval needs an OTLP endpoint".to_owned()),
            None => Ok(None),
        };
    };
    let url = url::Url::parse(&endpoint)
        .map_err(|e| format!("invalid OTLP endpoint {endpoint:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "invalid OTLP endpoint {endpoint:?}: the exporter speaks http or https (a local \
             collector's http://127.0.0.1:4318/v1/metrics)"
        ));
    }
    let interval = match interval {
        Some(0) => return Err("the OTLP interval must be at least 1 second".to_owned()),
        Some(secs) => Duration::from_secs(secs),
        None => Duration::from_secs(60),
    };
    Ok(Some(Otlp { endpoint, interval }))
}

/// A backend's `what` (priority or weight): at least 1, default 1.
fn at_least_one(what: &str, name: &str, value: Option<u32>) -> Result<u32, String> {
    match value {
        Some(0) => Err(format!("backend {name:?}: the {what} must be at least 1")),
        Some(value) => Ok(value),
        None => Ok(1),
    }
}

/// The `kind` timeout of `secs` seconds, at least one, or `default` when none is given.
fn timeout(kind: &str, secs: Option<u64>, default: Duration) -> Result<Duration, String> {
    match secs {
        Some(0) => Err(format!("the {kind} timeout must be at least 1 second")),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Ok(default),
    }
}

/// A backend from an endpoint URL; without a name, the first label of its host
/// (`https://eastus.openai.azure.com` is `eastus`), or `host:port` for an IP address.
fn backend_from(name: Option<String>, url: &str) -> Result<Backend, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid backend URL {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "invalid backend URL {url:?}: the scheme must be https (or http)"
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("invalid backend URL {url:?}: it has no host"))?;
    let name = match name {
        Some(name) => name,
        None if parsed.domain().is_some() && host != "localhost" => {
            host.split('.').next().unwrap_or(host).to_owned()
        }
        None => match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        },
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("invalid backend name {name:?}"));
    }
    Ok(Backend::new(name, url.trim_end_matches('/').to_owned()))
}

/// Whether a URL points at this machine (an emulator), which needs no credential.
pub(crate) fn is_loopback_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    })
}
