//! The `gateway` example binary, run as a user runs it: bad flags and configs exit 2 with one
//! line on stderr; a good command line serves, balances, guards with client keys, and starts
//! emulated instances when no backend is given.
//!
//! The binary is `target/<profile>/examples/gateway`, next to this test's own `deps/` directory.
//! `cargo test` and `cargo nextest run` build the examples along with the tests; when running
//! only this target (`cargo test --test gateway_cli`), build it first:
//! `cargo build --example gateway`.

mod support;
#[path = "support/tls.rs"]
mod tls;
#[path = "support/wire.rs"]
mod wire;

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aoai_sim::{ObjectKind, SimHandle};
use serde_json::Value;
use support::{BOUND, CHAT, chat, chat_body, client, served_by, sims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::{Answer, RawClient, find};

/// A unique path in the temporary directory for this process.
fn temp_path(what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "aoai-tower-gateway-cli-{}-{n}-{what}",
        std::process::id()
    ))
}

/// A temporary file, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(name: &str, contents: &str) -> Self {
        let path = temp_path(name);
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running gateway process; killed (and reaped) on drop, whatever happens in the test.
struct Gateway {
    child: Child,
    stdout: TempFile,
    stderr: TempFile,
}

impl Gateway {
    /// Starts the gateway with `args`, and `env` on top of this process's environment (without
    /// `RUST_LOG`, so its output does not depend on the caller's).
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let stdout = TempFile::with("stdout", "");
        let stderr = TempFile::with("stderr", "");
        let child = Command::new(support::gateway_binary(
            "cargo build --example gateway` (cargo test and cargo nextest run build it with the \
             other targets)",
        ))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout.0).unwrap())
        .stderr(File::create(&stderr.0).unwrap())
        .spawn()
        .unwrap();
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (bounded) for the process to exit.
    async fn exit(&mut self) -> ExitStatus {
        let stderr = &self.stderr;
        support::exit_within(&mut self.child, BOUND, || {
            let printed = std::fs::read_to_string(&stderr.0).unwrap_or_default();
            format!("the gateway (stderr: {printed})")
        })
        .await
    }

    /// Starts the gateway on a free loopback port over `sims`, with no other flag; returns it,
    /// its address and its base URL.
    fn over(sims: &[SimHandle]) -> (Self, String, String) {
        Self::over_with(sims, &[])
    }

    /// [`over`](Self::over), with `flags` after the backends.
    fn over_with(sims: &[SimHandle], flags: &[&str]) -> (Self, String, String) {
        Self::over_with_env(sims, flags, &[])
    }

    /// [`over_with`](Self::over_with), with `env` as [`spawn`](Self::spawn) takes it.
    fn over_with_env(
        sims: &[SimHandle],
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, String, String) {
        let backends: Vec<String> = sims.iter().map(backend_flag).collect();
        Self::over_urls_with_env(&backends, flags, env)
    }

    /// The gateway on a free loopback port over `backends` (`NAME=URL` each), then `flags`.
    fn over_urls(backends: &[String], flags: &[&str]) -> (Self, String, String) {
        Self::over_urls_with_env(backends, flags, &[])
    }

    /// [`over_urls`](Self::over_urls), with `env` as [`spawn`](Self::spawn) takes it.
    fn over_urls_with_env(
        backends: &[String],
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, String, String) {
        let addr = free_addr();
        let mut args = vec!["--listen".to_owned(), addr.clone()];
        for backend in backends {
            args.extend(["--backend".to_owned(), backend.clone()]);
        }
        args.extend(flags.iter().map(|&flag| flag.to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let base = format!("http://{addr}");
        (Self::spawn(&args, env), addr, base)
    }

    /// The names of the process's serving threads (`gateway-N`), sorted.
    fn worker_threads(&self) -> Vec<String> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut names: Vec<String> = std::fs::read_dir(tasks)
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim_end().to_owned())
            .filter(|name| name.starts_with("gateway-"))
            .collect();
        names.sort();
        names
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout.0).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr.0).unwrap_or_default()
    }

    /// Waits (bounded) until `GET {base}/admin/backends` answers 200 with `key` as client key,
    /// and returns the JSON; fails at once if the process exits.
    async fn ready(&mut self, base: &str, key: Option<&str>) -> Value {
        let client = client();
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the gateway exited with {status}\nstdout: {}\nstderr: {}",
                    self.stdout(),
                    self.stderr()
                );
            }
            let mut request = client.get(format!("{base}/admin/backends"));
            if let Some(key) = key {
                request = request.header("api-key", key);
            }
            if let Ok(response) = request.timeout(Duration::from_secs(1)).send().await
                && response.status() == 200
            {
                return response.json().await.unwrap();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway never answered on {base}\nstdout: {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> String {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Runs the gateway with `args` to its exit; asserts exit code 2 and exactly one line on
/// stderr, `gateway: error: ...`, and returns that line.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut gateway = Gateway::spawn(args, env);
    let status = gateway.exit().await;
    let stderr = gateway.stderr();
    assert_eq!(
        status.code(),
        Some(2),
        "{args:?}: {status}; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: stderr is not one line: {stderr:?}"
    );
    assert!(
        lines[0].starts_with("gateway: error: "),
        "{args:?}: {stderr:?}"
    );
    lines[0].to_owned()
}

/// `NAME=URL` for the `--backend` flag.
fn backend_flag(sim: &SimHandle) -> String {
    format!("{}={}", sim.name(), sim.url())
}

#[tokio::test]
async fn an_unknown_flag_is_refused_naming_it() {
    let line = refused(&["--bogus-flag"], &[]).await;
    assert!(line.contains("--bogus-flag"), "{line}");
}

#[tokio::test]
async fn a_backend_that_is_not_a_url_is_refused_naming_it() {
    let line = refused(&["--backend", "notaurl"], &[]).await;
    assert!(line.contains("notaurl"), "{line}");
    assert!(line.contains("URL"), "{line}");

    let line = refused(&["--backend", "a=ftp://127.0.0.1:21"], &[]).await;
    assert!(line.contains("ftp://127.0.0.1:21"), "{line}");
    assert!(line.contains("scheme"), "{line}");
}

#[tokio::test]
async fn a_missing_config_file_is_refused_naming_it() {
    let missing = temp_path("missing.toml");
    let missing = missing.to_str().unwrap();
    let line = refused(&["--config", missing], &[]).await;
    assert!(line.contains(missing), "{line}");
    assert!(line.contains("cannot read"), "{line}");
}

#[tokio::test]
async fn an_invalid_config_file_is_refused_naming_the_problem() {
    let bad_toml = TempFile::with("bad.toml", "listen = \n");
    let line = refused(&["--config", bad_toml.path()], &[]).await;
    assert!(line.contains(bad_toml.path()), "{line}");
    assert!(line.contains("invalid config"), "{line}");

    let unknown_key = TempFile::with("unknown.toml", "max_attempts = 2\nbogus_key = 1\n");
    let line = refused(&["--config", unknown_key.path()], &[]).await;
    assert!(line.contains(unknown_key.path()), "{line}");
    assert!(line.contains("bogus_key"), "{line}");

    let line_two = TempFile::with("line-two.toml", "max_attempts = 2\nbody_limit = \"x\"\n");
    let line = refused(&["--config", line_two.path()], &[]).await;
    assert!(line.contains("line 2"), "{line}");

    let zero_weight = TempFile::with(
        "zero-weight.toml",
        "[[backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\nweight = 0\n",
    );
    let line = refused(&["--config", zero_weight.path()], &[]).await;
    assert!(line.contains("weight"), "{line}");

    let unknown_backend_key = TempFile::with(
        "unknown-backend.toml",
        "[[backends]]\nurl = \"http://127.0.0.1:9\"\nnmae = \"a\"\n",
    );
    let line = refused(&["--config", unknown_backend_key.path()], &[]).await;
    assert!(line.contains("nmae"), "{line}");
}

/// Settings that must be at least 1 are refused at 0, each with a line naming it.
#[tokio::test]
async fn zero_attempts_timeouts_and_workers_are_refused() {
    for (flag, named) in [
        ("--max-attempts", "attempts"),
        ("--head-timeout", "head timeout"),
        ("--body-timeout", "body timeout"),
        ("--send-timeout", "send timeout"),
        ("--workers", "workers"),
    ] {
        let line = refused(&[flag, "0", "--backend", "http://127.0.0.1:9"], &[]).await;
        assert!(line.contains(named), "{flag} 0: {line}");
    }
}

#[tokio::test]
async fn a_non_loopback_listener_without_client_keys_is_refused() {
    let line = refused(
        &["--listen", "0.0.0.0:0", "--backend", "a=http://127.0.0.1:9"],
        &[],
    )
    .await;
    assert!(line.contains("0.0.0.0:0"), "{line}");
    assert!(line.contains("--client-keys-env"), "{line}");
}

#[tokio::test]
async fn an_unset_client_keys_variable_is_refused_naming_it() {
    let addr = free_addr();
    let line = refused(
        &[
            "--listen",
            &addr,
            "--backend",
            "a=http://127.0.0.1:9",
            "--client-keys-env",
            "AOAI_TOWER_TEST_UNSET_KEYS",
        ],
        &[],
    )
    .await;
    assert!(line.contains("AOAI_TOWER_TEST_UNSET_KEYS"), "{line}");
}

/// A `[[clients]]` table named `name` whose key is in `var`, then `extra` lines.
fn client_table(name: &str, var: &str, extra: &str) -> String {
    format!("[[clients]]\nname = \"{name}\"\nkey_env = \"{var}\"\n{extra}")
}

/// Malformed `[[clients]]` tables are refused with one line naming the file's line, the client
/// and the problem, and never a key.
#[tokio::test]
async fn malformed_client_tables_are_refused_naming_the_problem_never_the_key() {
    const KEY_A: &str = "named-client-key-a-5c81e2";
    const KEY_B: &str = "named-client-key-b-0d47f9";
    const VAR_A: &str = "AOAI_TOWER_TEST_CLIENT_KEY_A";
    const VAR_B: &str = "AOAI_TOWER_TEST_CLIENT_KEY_B";
    const UNSET: &str = "AOAI_TOWER_TEST_CLIENT_KEY_UNSET";
    const EMPTY: &str = "AOAI_TOWER_TEST_CLIENT_KEY_EMPTY";
    let env = [(VAR_A, KEY_A), (VAR_B, KEY_B), (EMPTY, " ")];
    let backend = "[[backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n\n";
    let a = client_table("team-a", VAR_A, "");
    // (what, the file after its backend, what the line must say)
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "missing name",
            format!("{a}\n[[clients]]\nkey_env = \"{VAR_B}\"\n"),
            vec!["name".into(), "missing".into()],
        ),
        (
            "empty name",
            client_table(" ", VAR_A, ""),
            vec!["line 6".into(), "name".into(), "empty".into()],
        ),
        (
            "duplicate name",
            format!("{a}\n{}", client_table("team-a", VAR_B, "")),
            vec!["line 10".into(), "\"team-a\"".into(), "twice".into()],
        ),
        (
            "missing key_env",
            format!("{a}\n[[clients]]\nname = \"team-b\"\n"),
            vec!["key_env".into(), "missing".into()],
        ),
        (
            "key_env unset",
            format!("{a}\n{}", client_table("team-b", UNSET, "")),
            vec![
                "line 11".into(),
                "\"team-b\"".into(),
                UNSET.into(),
                "not set".into(),
            ],
        ),
        (
            "key_env empty",
            client_table("team-b", EMPTY, ""),
            vec!["\"team-b\"".into(), EMPTY.into(), "empty".into()],
        ),
        (
            "tokens_per_minute = 0",
            client_table(
                "team-a",
                VAR_A,
                "requests_per_minute = 60\ntokens_per_minute = 0\n",
            ),
            vec![
                "line 9".into(),
                "\"team-a\"".into(),
                "tokens_per_minute".into(),
                "at least 1".into(),
            ],
        ),
        (
            "requests_per_minute = 0",
            client_table("team-a", VAR_A, "requests_per_minute = 0\n"),
            vec!["\"team-a\"".into(), "requests_per_minute".into()],
        ),
        (
            "negative limit",
            client_table("team-a", VAR_A, "tokens_per_minute = -5\n"),
            vec![
                "line 8".into(),
                "tokens_per_minute".into(),
                "at least 1".into(),
            ],
        ),
        (
            "unknown field",
            client_table("team-a", VAR_A, "tokens_per_minutes = 10\n"),
            vec!["line 8".into(), "tokens_per_minutes".into()],
        ),
        (
            "a key shared by two clients",
            format!("{a}\n{}", client_table("team-b", VAR_A, "")),
            vec!["\"team-a\"".into(), "\"team-b\"".into(), "same key".into()],
        ),
    ];
    for (what, clients, expected) in cases {
        let config = TempFile::with("clients.toml", &format!("{backend}{clients}"));
        let line = refused(&["--config", config.path()], &env).await;
        assert!(line.contains(config.path()), "{what}: {line}");
        for expected in &expected {
            assert!(
                line.contains(expected.as_str()),
                "{what}: {expected:?} in {line}"
            );
        }
        assert!(
            !line.contains(KEY_A) && !line.contains(KEY_B),
            "{what}: a key leaked: {line}"
        );
    }
}

/// Well-formed `[[clients]]` tables (with `--client-keys-env` beside them) start the gateway,
/// which prints no key.
#[tokio::test]
async fn client_tables_are_read_and_no_key_is_printed() {
    const KEY_A: &str = "named-client-key-a-3b9f60";
    const KEY_B: &str = "named-client-key-b-e2c417";
    const UNNAMED: &str = "unnamed-client-key-88a1d3";
    let sims = sims(1).await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let config = TempFile::with(
        "clients.toml",
        &format!(
            "listen = \"{addr}\"\nclient_keys_env = \"AOAI_TOWER_TEST_UNNAMED_KEYS\"\n\n\
             [[backends]]\nname = \"a\"\nurl = \"{}\"\n\n{}\n{}",
            sims[0].url(),
            client_table(
                "team-a",
                "AOAI_TOWER_TEST_KEY_A",
                "tokens_per_minute = 50000\nrequests_per_minute = 300\n"
            ),
            client_table("team-b", "AOAI_TOWER_TEST_KEY_B", ""),
        ),
    );
    let mut gateway = Gateway::spawn(
        &["--config", config.path()],
        &[
            ("AOAI_TOWER_TEST_KEY_A", KEY_A),
            ("AOAI_TOWER_TEST_KEY_B", KEY_B),
            ("AOAI_TOWER_TEST_UNNAMED_KEYS", UNNAMED),
        ],
    );
    gateway.ready(&base, Some(UNNAMED)).await;
    let response = client()
        .post(format!("{base}{CHAT}"))
        .header("api-key", UNNAMED)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let output = format!("{}{}", gateway.stdout(), gateway.stderr());
    for key in [KEY_A, KEY_B, UNNAMED] {
        assert!(!output.contains(key), "a key was printed: {output}");
    }
}

/// Named clients through the example: one over its tokens per minute gets Azure's 429 and no
/// instance hears of it, another goes on; `/metrics` and the log lines name them, and nothing
/// shows a key.
#[tokio::test]
async fn named_clients_are_limited_counted_and_logged_by_name_never_by_key() {
    const KEY_A: &str = "metered-client-key-a-71c0d2";
    const KEY_B: &str = "metered-client-key-b-9e35aa";
    // 900 tokens per answer: most of team-a's minute in one.
    let sims = aoai_sim::start(aoai_sim::SimConfig::new("a").reply_tokens(900)).await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let config = TempFile::with(
        "metered.toml",
        &format!(
            "listen = \"{addr}\"\n\n[[backends]]\nname = \"a\"\nurl = \"{}\"\n\n{}\n{}",
            sims.url(),
            client_table(
                "team-a",
                "AOAI_TOWER_TEST_METERED_A",
                "tokens_per_minute = 1000\n"
            ),
            client_table("team-b", "AOAI_TOWER_TEST_METERED_B", ""),
        ),
    );
    let mut gateway = Gateway::spawn(
        &["--config", config.path()],
        &[
            ("AOAI_TOWER_TEST_METERED_A", KEY_A),
            ("AOAI_TOWER_TEST_METERED_B", KEY_B),
        ],
    );
    gateway.ready(&base, Some(KEY_A)).await;
    let client = client();
    let send = |key: &'static str, body: Value| {
        let request = client
            .post(format!("{base}{CHAT}"))
            .header("api-key", key)
            .json(&body);
        async move { request.send().await.unwrap() }
    };

    let first = send(KEY_A, chat_body()).await;
    assert_eq!(first.status(), 200);
    let used = first.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    let big = serde_json::json!({
        "messages": [{ "role": "user", "content": "x".repeat(4 * (1000 - used as usize) + 400) }]
    });
    let before = sims.request_count();
    let refused = send(KEY_A, big).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(refused.headers().contains_key("retry-after-ms"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429", "{body}");
    assert_eq!(sims.request_count(), before, "no instance is contacted");
    assert_eq!(send(KEY_B, chat_body()).await.status(), 200);

    let metrics = client
        .get(format!("{base}/metrics"))
        .header("api-key", KEY_B)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"aoai_gateway_requests_total{instance="a",deployment="gpt-4o",caller="team-a",status="200"} 1"#,
        r#"instance="",deployment="",caller="team-a",status="429"} 1"#,
        r#"caller="team-b",status="200"} 1"#,
        r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat""#,
        r#"aoai_gateway_attempts_total{instance="a"} 2"#,
    ] {
        assert!(metrics.contains(line), "no {line} in {metrics}");
    }
    let output = format!("{}{}{metrics}", gateway.stdout(), gateway.stderr());
    assert!(
        output.contains("team-a") && output.contains("prompt_tokens"),
        "{output}"
    );
    for key in [KEY_A, KEY_B] {
        assert!(!output.contains(key), "a key was shown: {output}");
    }
}

#[tokio::test]
async fn help_exits_zero() {
    let mut gateway = Gateway::spawn(&["--help"], &[]);
    assert!(gateway.exit().await.success(), "{}", gateway.stderr());
    assert!(
        gateway.stdout().contains("--backend"),
        "{}",
        gateway.stdout()
    );
}

#[tokio::test]
async fn it_serves_and_balances_over_the_given_backends() {
    let sims = sims(2).await;
    let (mut gateway, _, base) = Gateway::over(&sims);
    let backends = gateway.ready(&base, None).await;

    let names: Vec<&str> = backends["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("{backends}"))
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    for backend in backends["backends"].as_array().unwrap() {
        assert_eq!(backend["available"], true, "{backend}");
    }
    // The admin route is the gateway's own: no backend was contacted to answer it.
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);

    let client = client();
    // Only `/openai` and what is below it is forwarded; a look-alike prefix is not.
    for path in ["/openaiX/models", "/other", "/"] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
    let first = chat(&client, &base).await;
    assert_eq!(first.status(), 200);
    assert_eq!(served_by(&first), "a");
    let second = chat(&client, &base).await;
    assert_eq!(second.status(), 200);
    assert_eq!(served_by(&second), "b");
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(sims[1].request_count(), 1);
    assert_eq!(
        sims[0].requests()[0].path,
        "/openai/deployments/gpt-4o/chat/completions"
    );

    // The health view counts the attempts.
    let after = gateway.ready(&base, None).await;
    for backend in after["backends"].as_array().unwrap() {
        assert_eq!(backend["attempts"], 1, "{backend}");
    }
}

#[tokio::test]
async fn a_config_file_sets_backends_timeouts_and_workers_and_turns_the_served_by_header_off() {
    let sims = sims(2).await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let config = TempFile::with(
        "gateway.toml",
        &format!(
            "listen = \"{addr}\"\nmax_attempts = 2\nserved_by_header = false\n\
             head_timeout_secs = 1\nbody_timeout_secs = 1\nworkers = 1\n\n\
             [[backends]]\nname = \"a\"\nurl = \"{}\"\n\n\
             [[backends]]\nname = \"b\"\nurl = \"{}\"\n",
            sims[0].url(),
            sims[1].url()
        ),
    );
    let mut gateway = Gateway::spawn(&["--config", config.path()], &[]);
    gateway.ready(&base, None).await;

    let client = client();
    for _ in 0..2 {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key("x-served-by"));
    }
    assert_eq!(sims[0].request_count(), 1);
    assert_eq!(sims[1].request_count(), 1);
    // The file's head timeout: a silent caller is let go after a second, not the default 60.
    let mut silent = RawClient::connect(&addr).await;
    silent.expect_closed().await;
    // The file's body timeout: a body that stops arriving is answered 408 after a second.
    let mut stalled = RawClient::connect(&addr).await;
    stalled.send(chat_head("content-length: 100\r\n")).await;
    assert_eq!(stalled.read_answer().await.status, 408);
    // The file's worker count: one serving thread.
    assert_eq!(gateway.worker_threads(), ["gateway-worker"]);
}

/// The example config the README points to is read whole (every key known), with its two
/// instances. No request is sent: they are real Azure endpoints.
#[tokio::test]
async fn the_example_config_file_is_read() {
    let addr = free_addr();
    let base = format!("http://{addr}");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.toml");
    let mut gateway = Gateway::spawn(
        &["--config", config, "--listen", &addr, "--auth", "none"],
        &[],
    );
    let backends = gateway.ready(&base, None).await;
    let tiers: Vec<(&str, u64, u64)> = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|backend| {
            (
                backend["name"].as_str().unwrap(),
                backend["priority"].as_u64().unwrap(),
                backend["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        [("ptu", 1, 1), ("eastus", 2, 3), ("swedencentral", 2, 1)],
        "{backends}"
    );
    assert_eq!(
        backends["backends"][0]["deployments"],
        serde_json::json!(["gpt-4o"])
    );
    assert_eq!(backends["backends"][1]["deployments"], Value::Null);
}

#[tokio::test]
async fn client_keys_are_required_and_never_forwarded() {
    const KEY_ONE: &str = "client-key-one-7f3a9c";
    const KEY_TWO: &str = "client-key-two-51be04";
    const VAR: &str = "AOAI_TOWER_TEST_CLIENT_KEYS";
    let sims = sims(2).await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let keys = format!("{KEY_ONE},{KEY_TWO}");
    let mut gateway = Gateway::spawn(
        &[
            "--listen",
            &addr,
            "--backend",
            &backend_flag(&sims[0]),
            "--backend",
            &backend_flag(&sims[1]),
            "--client-keys-env",
            VAR,
        ],
        &[(VAR, &keys)],
    );
    gateway.ready(&base, Some(KEY_ONE)).await;
    let client = client();
    let send = |header: Option<(&'static str, String)>| {
        let mut request = client.post(format!("{base}{CHAT}")).json(&chat_body());
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        request.send()
    };

    for header in [
        None,
        Some(("api-key", "wrong-key".to_owned())),
        Some(("authorization", "Bearer wrong-key".to_owned())),
        Some(("authorization", KEY_ONE.to_owned())),
    ] {
        let response = send(header.clone()).await.unwrap();
        assert_eq!(response.status(), 401, "{header:?}");
        assert_eq!(served_by(&response), "", "{header:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "401", "{header:?}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // The admin route is guarded too.
    let admin = client
        .get(format!("{base}/admin/backends"))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 401);
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);

    let with_api_key = send(Some(("api-key", KEY_ONE.to_owned()))).await.unwrap();
    assert_eq!(with_api_key.status(), 200);
    assert_eq!(served_by(&with_api_key), "a");
    let with_bearer = send(Some(("authorization", format!("Bearer {KEY_TWO}"))))
        .await
        .unwrap();
    assert_eq!(with_bearer.status(), 200);
    assert_eq!(served_by(&with_bearer), "b");

    for sim in &sims {
        let received = sim.requests();
        assert_eq!(received.len(), 1, "{}", sim.name());
        assert_eq!(received[0].header("api-key"), None);
        assert_eq!(received[0].header("authorization"), None);
        for value in received[0].headers.values() {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains("client-key-"),
                "a client key leaked: {value}"
            );
        }
    }
}

#[tokio::test]
async fn without_backends_it_serves_two_emulated_instances() {
    let addr = free_addr();
    let base = format!("http://{addr}");
    let mut gateway = Gateway::spawn(&["--listen", &addr], &[]);
    let backends = gateway.ready(&base, None).await;
    let names: Vec<&str> = backends["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("{backends}"))
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sim-a", "sim-b"]);

    let client = client();
    for expected in ["sim-a", "sim-b"] {
        let response = chat(&client, &base).await;
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), expected);
        let body: Value = response.json().await.unwrap();
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            text.starts_with(&format!("Hello from {expected} ")),
            "{text}"
        );
    }
    assert!(
        gateway.stdout().contains("No --backend given"),
        "{}",
        gateway.stdout()
    );
}

/// The official OpenAI Python SDK through the gateway, over `AzureOpenAI` and over
/// `OpenAI(base_url=.../openai/v1/)`: chat, a stream with usage, embeddings, a five-turn
/// Responses conversation (then streamed, retrieved, its input items listed), a conversation
/// (the Conversations API) with three responses, an Assistants thread and a run on it, a file
/// and a batch made from it, a Realtime session; and the gateway's own errors as the SDK raises them (`AuthenticationError` for a
/// wrong key, `RateLimitError` with `retry-after` for a caller over its limit, 413
/// `request_body_too_large`). Any unexpected answer makes the script fail
/// (`tests/sdk/openai_python.py`).
///
/// Needs Python with the `openai` package: `.ci/run` installs a pinned one in a venv and runs
/// this with `AOAI_TEST_PYTHON` set to its interpreter.
#[tokio::test]
#[ignore = "needs the openai Python package: .ci/run installs it and sets AOAI_TEST_PYTHON"]
async fn the_official_python_sdk_works_through_the_gateway() {
    const KEY: &str = "sdk-client-key-5e1a";
    const LIMITED_KEY: &str = "sdk-limited-key-9c2b";
    let python = std::env::var("AOAI_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let sims = sims(2).await;
    let config = TempFile::with(
        "sdk.toml",
        &[
            client_table("sdk", "AOAI_SDK_KEY", ""),
            client_table(
                "limited",
                "AOAI_SDK_LIMITED_KEY",
                "requests_per_minute = 1\n",
            ),
        ]
        .concat(),
    );
    let (mut gateway, _addr, base) = Gateway::over_with_env(
        &sims,
        &["--config", config.path()],
        &[("AOAI_SDK_KEY", KEY), ("AOAI_SDK_LIMITED_KEY", LIMITED_KEY)],
    );
    gateway.ready(&base, Some(KEY)).await;

    let stdout = TempFile::with("sdk-stdout", "");
    let stderr = TempFile::with("sdk-stderr", "");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_python.py");
    let mut sdk = Command::new(&python)
        .arg(&script)
        .args([&base, KEY, LIMITED_KEY])
        .stdin(Stdio::null())
        .stdout(File::create(&stdout.0).unwrap())
        .stderr(File::create(&stderr.0).unwrap())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {python}: {error}"));
    let status = support::exit_within(&mut sdk, Duration::from_secs(120), || {
        format!(
            "the SDK script (stdout: {})",
            std::fs::read_to_string(&stdout.0).unwrap_or_default()
        )
    })
    .await;
    let output = std::fs::read_to_string(&stdout.0).unwrap();
    assert!(
        status.success(),
        "{status}\nstdout: {output}\nstderr: {}\ngateway: {}",
        std::fs::read_to_string(&stderr.0).unwrap(),
        gateway.stderr()
    );

    let printed = format!("{}{}", gateway.stdout(), gateway.stderr());
    assert!(
        printed.contains("\"limited\""),
        "the log names the caller: {printed}"
    );
    assert!(
        !printed.contains(KEY) && !printed.contains(LIMITED_KEY),
        "a client key was printed"
    );

    // Each client's objects are on the instance the SDK saw answer for them.
    let summary: Value = serde_json::from_str(output.trim()).unwrap();
    let on = |name: &Value| {
        sims.iter()
            .find(|sim| sim.name() == name.as_str().unwrap())
            .unwrap_or_else(|| panic!("no instance {name}"))
    };
    let count = |kind| sims.iter().map(|sim| sim.object_count(kind)).sum::<usize>();
    for client in ["azure", "v1"] {
        let homes = &summary[client];
        assert!(on(&homes["response_chain"]).object_count(ObjectKind::Response) >= 6);
        assert!(on(&homes["file_and_batch"]).object_count(ObjectKind::Batch) >= 1);
        assert!(on(&homes["conversation"]).object_count(ObjectKind::Conversation) >= 1);
        assert!(on(&homes["thread"]).object_count(ObjectKind::Run) >= 1);
    }
    assert_eq!(
        count(ObjectKind::Response),
        18,
        "two chains of six turns, two conversations of three"
    );
    assert_eq!(count(ObjectKind::Batch), 2);
    // The SDK's close reaches the instances through the gateway, a moment after the script ends.
    let deadline = tokio::time::Instant::now() + BOUND;
    while sims.iter().map(SimHandle::realtime_sessions).sum::<usize>() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a Realtime session stayed open at an instance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for client in ["azure", "v1"] {
        assert!(summary[client]["realtime_events"].as_u64().unwrap() > 3);
    }
}

#[tokio::test]
async fn sigterm_lets_the_stream_in_flight_finish_then_exits_cleanly() {
    let sim =
        aoai_sim::start(aoai_sim::SimConfig::new("slow").chunk_delay(Duration::from_millis(100)))
            .await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let mut gateway = Gateway::spawn(&["--listen", &addr, "--backend", &backend_flag(&sim)], &[]);
    gateway.ready(&base, None).await;

    let response = client()
        .post(format!("{base}{CHAT}"))
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "Hi" }], "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let terminated = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());

    let body = response
        .text()
        .await
        .expect("the stream in flight completes");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let status = gateway.exit().await;
    assert!(status.success(), "{status}; stderr: {}", gateway.stderr());
    assert!(
        client()
            .get(format!("{base}/admin/backends"))
            .send()
            .await
            .is_err()
    );
}

/// Callers speak HTTP/1.1 or HTTP/2 with prior knowledge (h2c) on the same port; the gateway
/// tells them apart from their first bytes, also when those arrive a few at a time.
#[tokio::test]
async fn it_serves_http1_and_http2_callers_on_one_port() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over(&sims);
    gateway.ready(&base, None).await;

    let http1 = chat(&client(), &base).await;
    assert_eq!(http1.version(), reqwest::Version::HTTP_11);
    assert_eq!(http1.status(), 200);
    assert_eq!(served_by(&http1), "a");
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let http2 = chat(&h2c, &base).await;
    assert_eq!(http2.version(), reqwest::Version::HTTP_2);
    assert_eq!(http2.status(), 200);
    assert_eq!(served_by(&http2), "b");
    assert!(http2.text().await.unwrap().contains("chat.completion"));

    // The preface's first three bytes alone, then the rest with the HTTP/2 client's frames.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.write_all(b"PRI").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let io = hyper_util::rt::TokioIo::new(SkipFirst {
        inner: stream,
        skip: 3,
    });
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = chat_request_with(&base, &chat_body());
    let response = tokio::time::timeout(BOUND, sender.send_request(request))
        .await
        .expect("the gateway answers a preface that came in pieces")
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-served-by"], "a");

    // HTTP/1.1 that begins like the preface, in pieces: served as HTTP/1.1 (the method is not
    // one the admin route takes).
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.write_all(b"PRI").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
        .write_all(b" /admin/backends HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(BOUND, stream.read_to_string(&mut answer))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(sims[0].request_count(), 2);
    assert_eq!(sims[1].request_count(), 1);
}

/// A connection whose first `skip` bytes written were already sent by the test itself.
struct SkipFirst {
    inner: tokio::net::TcpStream,
    skip: usize,
}

impl tokio::io::AsyncRead for SkipFirst {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SkipFirst {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let skipped = self.skip.min(buf.len());
        if skipped > 0 {
            self.skip -= skipped;
            return std::task::Poll::Ready(Ok(skipped));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 on the wire: what the gateway does for callers that write raw bytes.

/// The head of a chat completions `POST` to the gateway, with `fields` (each ending in CRLF)
/// before the blank line.
fn chat_head(fields: &str) -> String {
    format!(
        "POST {CHAT} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n{fields}\r\n"
    )
}

/// A chat request head and body with `Content-Length`, as one string.
fn chat_request(body: &str) -> String {
    let mut request = chat_head(&format!("content-length: {}\r\n", body.len()));
    request.push_str(body);
    request
}

/// `body` in the chunked coding, one chunk per piece of `sizes` bytes (the rest in a last chunk),
/// then the last chunk.
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut rest = body;
    for &size in sizes {
        let (chunk, after) = rest.split_at(size.min(rest.len()));
        wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
        rest = after;
    }
    if !rest.is_empty() {
        wire.extend_from_slice(format!("{:x}\r\n", rest.len()).as_bytes());
        wire.extend_from_slice(rest);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    wire
}

/// `bytes` cut at `at` (ascending offsets).
fn cut<'a>(bytes: &'a [u8], at: &[usize]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for &end in at {
        pieces.push(&bytes[start..end]);
        start = end;
    }
    pieces.push(&bytes[start..]);
    pieces
}

/// A chat request body of exactly `len` bytes of JSON.
fn chat_body_of_len(len: usize) -> String {
    let frame = r#"{"messages":[{"role":"user","content":""}]}"#;
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(len - frame.len())
    );
    assert_eq!(body.len(), len);
    body
}

/// The answer is an Azure-shaped JSON error: `{"error":{"code":"..","message":".."}}`, both
/// non-empty strings. Returns the code.
fn assert_json_error(answer: &Answer) -> String {
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{answer:?}"
    );
    let value: Value =
        serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    let code = value["error"]["code"]
        .as_str()
        .filter(|code| !code.is_empty())
        .unwrap_or_else(|| panic!("no error code: {value}"));
    assert!(
        value["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no error message: {value}"
    );
    code.to_owned()
}

/// The chat completion in `answer` is `sim`'s: 200, `x-served-by`, and the emulator's greeting.
fn assert_chat_from(answer: &Answer, sim: &str) {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("x-served-by"), Some(sim), "{answer:?}");
    let value: Value =
        serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    let text = value["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("not a chat completion: {value}"));
    assert!(text.starts_with(&format!("Hello from {sim} ")), "{text}");
}

/// A body over `--body-limit`, framed by `Content-Length` and arriving in several writes after
/// its head, is refused with 413 in Azure's error shape before any backend is contacted; the
/// caller reads the answer though it kept sending the body the gateway did not want, which the
/// gateway reads and drops (a lingering close): the rest is never taken for a request, and the
/// connection serves the next one. A body at the limit, sent the same way, is served.
#[tokio::test]
async fn a_body_over_the_limit_arriving_in_pieces_gets_413_and_reaches_no_backend() {
    const LIMIT: usize = 1024;
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over_with(&sims, &["--body-limit", "1024"]);
    gateway.ready(&base, None).await;

    let body = chat_body_of_len(4 * LIMIT);
    let head = chat_head(&format!("content-length: {}\r\n", body.len()));
    let mut wire = head.clone().into_bytes();
    wire.extend_from_slice(body.as_bytes());
    // The head with the body's first 100 bytes, then the rest in 512-byte writes.
    let cuts: Vec<usize> = (0..)
        .map(|i| head.len() + 100 + 512 * i)
        .take_while(|&at| at < wire.len())
        .collect();
    let pieces = cut(&wire, &cuts);
    assert!(pieces.len() > 4, "{}", pieces.len());
    let mut caller = RawClient::connect(&addr).await;
    caller.send_in_pieces(&pieces).await;
    let answer = caller.read_answer().await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(assert_json_error(&answer), "request_body_too_large");
    assert!(
        answer.text().contains(&LIMIT.to_string()),
        "the message names the limit: {}",
        answer.text()
    );
    // The rest of the body was read and dropped, never taken for a request.
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
    let next = caller.ask(chat_request(&chat_body().to_string())).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 1);
    sims.iter().for_each(|sim| sim.clear());
    // The caller's mistake is in its request's log line, and is no warning to the operator.
    let printed = format!("{}{}", gateway.stdout(), gateway.stderr());
    assert!(printed.contains("413"), "{printed}");
    assert!(!printed.contains("WARN"), "{printed}");

    // The same over chunked framing, which says no length up front: refused once the body
    // read runs over the limit.
    let mut wire = chat_head("transfer-encoding: chunked\r\n").into_bytes();
    let head_len = wire.len();
    wire.extend_from_slice(&chunked(body.as_bytes(), &[300, 300, 300, 300, 300, 300]));
    let cuts: Vec<usize> = (0..)
        .map(|i| head_len + 200 + 400 * i)
        .take_while(|&at| at < wire.len())
        .collect();
    let mut caller = RawClient::connect(&addr).await;
    caller.send_in_pieces(&cut(&wire, &cuts)).await;
    let answer = caller.read_answer().await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(assert_json_error(&answer), "request_body_too_large");
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
    let next = caller.ask(chat_request(&chat_body().to_string())).await;
    assert_eq!(next.status, 200, "{next:?}");
    sims.iter().for_each(|sim| sim.clear());

    // At the limit exactly, in pieces: served, and the backend gets every byte.
    let body = chat_body_of_len(LIMIT);
    let wire = chat_request(&body);
    let at = wire.len() - body.len();
    let mut caller = RawClient::connect(&addr).await;
    caller
        .send_in_pieces(&cut(wire.as_bytes(), &[at + 10, at + 500]))
        .await;
    let answer = caller.read_answer().await;
    assert_chat_from(&answer, "a");
    let received = sims[0].requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, body.as_bytes());
    assert_eq!(sims[1].request_count(), 0);
}

/// A chunked request body whose chunks (and chunk-size lines) are split across writes reaches
/// the backend whole, byte for byte; the connection then serves the next request.
#[tokio::test]
async fn a_chunked_body_split_across_writes_reaches_the_backend_whole() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over(&sims);
    gateway.ready(&base, None).await;

    let body = serde_json::json!({
        "messages": [
            { "role": "system", "content": "You answer in one word." },
            { "role": "user", "content": "Hello, in several chunks, over several writes" }
        ],
        "temperature": 0.5
    })
    .to_string();
    let mut wire = chat_head("transfer-encoding: chunked\r\n").into_bytes();
    let head_len = wire.len();
    wire.extend_from_slice(&chunked(body.as_bytes(), &[7, 40, 1, 30]));
    // Cut inside the head, inside the first chunk-size line's CRLF, mid-data, and before the
    // last chunk.
    let last = wire.len() - b"0\r\n\r\n".len();
    let pieces = cut(
        &wire,
        &[
            head_len - 10,
            head_len + 2,
            head_len + 20,
            head_len + 60,
            last,
        ],
    );
    let mut caller = RawClient::connect(&addr).await;
    caller.send_in_pieces(&pieces).await;
    let answer = caller.read_answer().await;
    assert_chat_from(&answer, "a");
    assert!(!answer.says_close(), "{answer:?}");

    let received = sims[0].requests();
    assert_eq!(received.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&received[0].body),
        body,
        "the backend got another body"
    );
    assert_eq!(
        received[0].path,
        "/openai/deployments/gpt-4o/chat/completions"
    );

    // The chunked body ended where its last chunk said: the next request on the connection is
    // read from the right place.
    let next = chat_body().to_string();
    caller.send(chat_request(&next).as_bytes()).await;
    let answer = caller.read_answer().await;
    assert_chat_from(&answer, "b");
    assert_eq!(sims[1].requests()[0].body, next.as_bytes());
}

/// `Expect: 100-continue`: the caller gets `100 Continue` before it sends the body, then the
/// backend's answer; the backend gets the body.
#[tokio::test]
async fn expect_100_continue_gets_100_before_the_body_then_the_answer() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over(&sims);
    gateway.ready(&base, None).await;

    let body = chat_body().to_string();
    let mut caller = RawClient::connect(&addr).await;
    caller
        .send(
            chat_head(&format!(
                "content-length: {}\r\nexpect: 100-continue\r\n",
                body.len()
            ))
            .as_bytes(),
        )
        .await;
    let interim = caller.read_answer().await;
    assert_eq!(interim.status, 100, "{interim:?}");
    assert!(
        caller.buf.is_empty(),
        "more after 100: {:?}",
        caller.shown()
    );
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);

    caller.send(body.as_bytes()).await;
    let answer = caller.read_answer().await;
    assert_chat_from(&answer, "a");
    let received = sims[0].requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, body.as_bytes());

    // Chunked with `Expect`, on the same connection.
    caller
        .send(chat_head("transfer-encoding: chunked\r\nexpect: 100-continue\r\n").as_bytes())
        .await;
    let interim = caller.read_answer().await;
    assert_eq!(interim.status, 100, "{interim:?}");
    caller.send(&chunked(body.as_bytes(), &[10])).await;
    let answer = caller.read_answer().await;
    assert_chat_from(&answer, "b");
    assert_eq!(sims[1].requests()[0].body, body.as_bytes());
}

/// Two chat requests in one write on one kept-alive connection: two answers, in order, from the
/// two backends in turn; the connection then serves a third.
#[tokio::test]
async fn pipelined_requests_on_one_connection_are_answered_in_order_by_each_backend() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over(&sims);
    gateway.ready(&base, None).await;

    let first = serde_json::json!({ "messages": [{ "role": "user", "content": "first" }] });
    let second = serde_json::json!({ "messages": [{ "role": "user", "content": "second" }] });
    let (first, second) = (first.to_string(), second.to_string());
    let mut caller = RawClient::connect(&addr).await;
    caller
        .send(format!("{}{}", chat_request(&first), chat_request(&second)).as_bytes())
        .await;
    let one = caller.read_answer().await;
    let two = caller.read_answer().await;
    assert_chat_from(&one, "a");
    assert_chat_from(&two, "b");
    assert!(!one.says_close() && !two.says_close(), "{one:?} {two:?}");
    assert_eq!(sims[0].requests()[0].body, first.as_bytes());
    assert_eq!(sims[1].requests()[0].body, second.as_bytes());

    let third = chat_body().to_string();
    caller.send(chat_request(&third).as_bytes()).await;
    assert_chat_from(&caller.read_answer().await, "a");
    assert_eq!(sims[0].request_count(), 2);
    assert_eq!(sims[1].request_count(), 1);
}

/// A backend that answers its first connection's request with the start of an endless SSE
/// stream: returns its URL, the request it received (once it has answered the head and first
/// event), and when the gateway closes that connection (a reset counts).
async fn endless_stream_backend() -> (
    String,
    tokio::sync::oneshot::Receiver<Vec<u8>>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let url = one_connection_backend(|mut stream| async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // The head, then as many body bytes as it says.
        let complete = |request: &[u8]| {
            let end = find(request, b"\r\n\r\n")?;
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            (request.len() >= end + 4 + length).then_some(())
        };
        while complete(&request).is_none() {
            match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
                Ok(Ok(read)) if read > 0 => request.extend_from_slice(&buf[..read]),
                _ => return,
            }
        }
        let event = "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n";
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
            event.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let _ = started_tx.send(request);
        // The stream never goes on: only the gateway closing the connection ends this.
        loop {
            match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    let _ = closed_tx.send(());
                    return;
                }
                Ok(Ok(_)) => {}
                Err(_) => return,
            }
        }
    })
    .await;
    (url, started, closed)
}

/// A backend that serves its first connection, accepted within [`BOUND`], with `serve`: its URL.
async fn one_connection_backend<F, Served>(serve: F) -> String
where
    F: FnOnce(tokio::net::TcpStream) -> Served + Send + 'static,
    Served: std::future::Future<Output = ()> + Send,
{
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        if let Ok(Ok((stream, _))) = tokio::time::timeout(BOUND, listener.accept()).await {
            serve(stream).await;
        }
    });
    url
}

/// A caller that leaves while its streamed completion is in flight: the gateway closes its
/// connection to the backend (it stops reading the stream), and goes on serving.
#[tokio::test]
async fn a_caller_leaving_mid_stream_closes_the_backend_stream_and_the_gateway_serves_on() {
    let (stream_url, started, mut closed) = endless_stream_backend().await;
    let sims = sims(1).await;
    let (mut gateway, addr, base) = Gateway::over_urls(
        &[format!("endless={stream_url}"), backend_flag(&sims[0])],
        &[],
    );
    gateway.ready(&base, None).await;

    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": "Stream to me" }],
        "stream": true
    })
    .to_string();
    let mut caller = RawClient::connect(&addr).await;
    caller.send(chat_request(&body).as_bytes()).await;
    let head = caller.read_head().await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("x-served-by"), Some("endless"), "{head:?}");
    assert!(head.is_chunked(), "{head:?}");
    let first = caller.read_chunk().await.expect("the first event");
    assert!(
        String::from_utf8_lossy(&first).starts_with("data: {"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    let received = tokio::time::timeout(BOUND, started)
        .await
        .expect("the backend answered")
        .expect("the backend task reports its request");
    // The gateway asked for the stream's usage on the caller's behalf.
    assert!(
        find(&received, b"Stream to me").is_some()
            && find(&received, br#""include_usage":true"#).is_some(),
        "the backend got {:?}",
        String::from_utf8_lossy(&received)
    );
    // The stream is in flight, and the gateway holds its backend connection open.
    assert!(closed.try_recv().is_err(), "closed before the caller left");

    drop(caller);
    tokio::time::timeout(BOUND, closed)
        .await
        .expect("the gateway closes the backend's stream when its caller leaves")
        .expect("the backend task reports the close");

    // The gateway serves on: the next request, and its admin route.
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "a");
    let backends = gateway.ready(&base, None).await;
    assert_eq!(backends["backends"][0]["name"], "endless", "{backends}");
    assert_eq!(backends["backends"][0]["attempts"], 1, "{backends}");
    assert_eq!(sims[0].request_count(), 1);
}

/// Requests whose framing cannot be trusted (the shapes request smuggling uses) or whose head
/// is malformed get hyper's 400 and a closed connection; no backend hears of them, and the
/// gateway serves the next caller.
#[tokio::test]
async fn malformed_requests_get_400_and_reach_no_backend() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over(&sims);
    gateway.ready(&base, None).await;

    let body = chat_body().to_string();
    let cases = [
        (
            "conflicting content-lengths",
            format!(
                "{}{body}",
                chat_head(&format!(
                    "content-length: {}\r\ncontent-length: {}\r\n",
                    body.len(),
                    body.len() + 1
                ))
            ),
        ),
        (
            "a malformed content-length",
            format!("{}{body}", chat_head("content-length: 12abc\r\n")),
        ),
        (
            "a transfer coding other than chunked",
            format!("{}{body}", chat_head("transfer-encoding: gzip\r\n")),
        ),
        (
            "a field line without a colon",
            format!("{}{body}", chat_head("content-length 5\r\n")),
        ),
    ];
    for (what, request) in &cases {
        let mut caller = RawClient::connect(&addr).await;
        caller.send(request.as_bytes()).await;
        let answer = caller.read_answer().await;
        assert_eq!(answer.status, 400, "{what}: {answer:?}");
        caller.expect_closed().await;
        assert_eq!(
            sims[0].request_count() + sims[1].request_count(),
            0,
            "{what}: a backend was contacted"
        );
    }

    // Both `Content-Length` and `Transfer-Encoding`: the chunked framing wins, the backend gets
    // the body it frames, and the connection is closed after the answer (RFC 9112, 6.1).
    let both = chat_head(&format!(
        "content-length: {}\r\ntransfer-encoding: chunked\r\n",
        body.len() + 7
    ));
    let mut caller = RawClient::connect(&addr).await;
    let answer = caller
        .ask([both.as_bytes(), &chunked(body.as_bytes(), &[10])].concat())
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    caller.expect_close(&answer).await;
    assert_eq!(sims[0].requests()[0].body, body.as_bytes());

    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "b");
}

/// With `--head-timeout 1`, callers that do not send a whole request head within a second are
/// let go, and none of them reaches a backend: one that sends nothing, one that sends a
/// beginning of the HTTP/2 preface, and one that sends part of an HTTP/1.1 head are closed
/// without an answer (hyper's header read timeout); a keep-alive connection idle after its
/// answer is closed a second after it.
#[tokio::test]
async fn callers_that_send_no_whole_head_in_time_are_let_go_and_reach_no_backend() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over_with(&sims, &["--head-timeout", "1"]);
    gateway.ready(&base, None).await;
    let timeout = Duration::from_secs(1);

    let started = Instant::now();
    let mut silent = RawClient::connect(&addr).await;
    let mut preface = tokio::net::TcpStream::connect(&addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut partial = RawClient::connect(&addr).await;
    partial.send(chat_head("").trim_end_matches("\r\n")).await;
    let mut idle = RawClient::connect(&addr).await;
    let answer = idle.ask(chat_request(&chat_body().to_string())).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(!answer.says_close(), "{answer:?}");

    silent.expect_closed().await;
    // Closed with the part it sent unread: a reset, or an end of stream.
    let mut rest = [0u8; 64];
    match tokio::time::timeout(BOUND, preface.read(&mut rest)).await {
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the partial preface was not let go: {other:?}"),
    }
    partial.expect_closed().await;
    idle.expect_closed().await;
    assert!(
        started.elapsed() >= timeout,
        "let go after {:?}",
        started.elapsed()
    );
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 1);
}

/// A request body that stops arriving is answered 408 once the body timeout has passed without
/// a byte of it (nginx's `client_body_timeout`), and reaches no backend: the retry layer reads a
/// body whole before the first attempt. The message says what happened.
#[tokio::test]
async fn a_request_body_that_stops_arriving_is_answered_408_and_reaches_no_backend() {
    let sims = sims(2).await;
    let (mut gateway, addr, base) = Gateway::over_with(&sims, &["--body-timeout", "1"]);
    gateway.ready(&base, None).await;

    let mut stalled = RawClient::connect(&addr).await;
    let started = Instant::now();
    stalled.send(chat_head("content-length: 100\r\n")).await;
    stalled.send(r#"{"messages":"#).await;
    let answer = stalled.read_answer().await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(assert_json_error(&answer), "request_body_timeout");
    assert!(answer.text().contains("request body"), "{answer:?}");
    stalled.expect_closed().await;
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
}

/// An HTTP/2 client's settings, hyper's defaults.
fn h2c_client() -> hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
}

/// An HTTP/2 client whose window for each stream stays `bytes` (no adaptive window): it takes
/// no more of an answer than that until the application reads it.
fn h2c_client_with_window(
    bytes: u32,
) -> hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut client = h2c_client();
    client
        .initial_stream_window_size(bytes)
        .adaptive_window(false);
    client
}

/// An HTTP/2 connection with prior knowledge to the gateway at `addr`, with `client`'s settings:
/// its sender, and the task that drives it (which ends when the connection does).
async fn h2c_connect<B>(
    addr: &str,
    client: &hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = client
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

/// A chat completion of `body` for the gateway at `base`, as an HTTP/2 client sends it.
fn chat_request_with(
    base: &str,
    body: &Value,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap()
}

/// Reads a request head from a backend's connection, within [`BOUND`]; whether it came whole.
async fn read_request_head(stream: &mut tokio::net::TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&head, b"\r\n\r\n").is_none() {
        match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
            Ok(Ok(read)) if read > 0 => head.extend_from_slice(&buf[..read]),
            _ => return false,
        }
    }
    true
}

/// An HTTP/2 request body that stops arriving is answered 408 once the body timeout has passed
/// without more of it, as over HTTP/1.1, and reaches no backend.
#[tokio::test]
async fn an_http2_request_body_that_stops_arriving_is_answered_408_and_reaches_no_backend() {
    use futures_util::StreamExt as _;
    let sims = sims(1).await;
    let (mut gateway, addr, base) = Gateway::over_with(&sims, &["--body-timeout", "1"]);
    gateway.ready(&base, None).await;

    let (mut sender, _connection) = h2c_connect(&addr, &h2c_client()).await;
    // The first bytes of the body, and then nothing, with the stream left open.
    let first = http_body::Frame::data(bytes::Bytes::from_static(br#"{"messages":"#));
    let body = http_body_util::StreamBody::new(
        futures_util::stream::iter([Ok::<_, std::convert::Infallible>(first)])
            .chain(futures_util::stream::pending()),
    );
    let request = http::Request::post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(BOUND, sender.send_request(request))
        .await
        .expect("the gateway answers a body that stopped arriving")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), 408);
    let answer = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "request_body_timeout", "{answer}");
    assert_eq!(sims[0].request_count(), 0);
}

/// An HTTP/2 caller that reads its answer slowly but steadily, so that one frame of it takes
/// longer than the send timeout to go out, gets all of it: the send limit cuts a caller that
/// takes nothing, not one that takes little.
#[tokio::test]
async fn a_slow_http2_reader_gets_its_whole_answer_though_a_frame_takes_longer_than_the_send_timeout()
 {
    const SIZE: usize = 16 * 1024;
    let url = one_connection_backend(|mut stream| async move {
        if !read_request_head(&mut stream).await {
            return;
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {SIZE}\r\n\r\n{}",
            "x".repeat(SIZE)
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = tokio::time::timeout(BOUND, stream.read(&mut [0u8; 1])).await;
    })
    .await;
    let (mut gateway, addr, base) = Gateway::over_urls(
        &[format!("whole={url}")],
        &["--head-timeout", "1", "--send-timeout", "1"],
    );
    gateway.ready(&base, None).await;

    let client = h2c_client_with_window(1024);
    let (mut sender, _connection) = h2c_connect(&addr, &client).await;
    let request = chat_request_with(&base, &chat_body());
    let response = tokio::time::timeout(BOUND, sender.send_request(request))
        .await
        .expect("the gateway answers over HTTP/2")
        .unwrap();
    assert_eq!(response.status(), 200);
    // A frame of at most the 1 KiB window every 300 ms: the gateway's frames (pieces of up to
    // 8 KiB, as read from the backend) take about 2.4 s each to go out.
    let started = Instant::now();
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = tokio::time::timeout(BOUND, http_body_util::BodyExt::frame(&mut body))
        .await
        .expect("the next frame")
    {
        let frame = frame.expect("the answer is not cut");
        received += frame.data_ref().map_or(0, bytes::Bytes::len);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(received, SIZE);
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "read in {:?}",
        started.elapsed()
    );
}

/// An instance behind TLS whose certificate `pki`'s CA signed, offering HTTP/2 and HTTP/1.1
/// by ALPN; it answers every request with a chat completion saying the HTTP version it was
/// asked over. Returns its `https://localhost:PORT` URL.
async fn tls_instance(pki: &tls::Pki) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|request: http::Request<_>| async move {
                    let answer = serde_json::json!({
                        "choices": [{ "message": { "content": format!("{:?}", request.version()) } }]
                    });
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(answer.to_string())),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    url
}

/// `--ca-file` adds a private CA's roots: an instance whose certificate it signed is reached
/// over HTTP/2 (ALPN); without the flag the same instance cannot be trusted, and the caller
/// gets 502. A CA file that cannot be read, or holds no certificate, is refused naming it.
#[tokio::test]
async fn a_ca_file_lets_the_gateway_trust_a_private_ca_and_speak_http2_to_its_instance() {
    let pki = tls::Pki::new();
    let url = tls_instance(&pki).await;
    let ca = TempFile::with("ca.pem", &pki.ca_pem());

    let (mut gateway, _, base) =
        Gateway::over_urls(&[format!("tls={url}")], &["--ca-file", ca.path()]);
    gateway.ready(&base, None).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "tls");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "HTTP/2.0");

    let (mut untrusting, _, base) = Gateway::over_urls(&[format!("tls={url}")], &[]);
    untrusting.ready(&base, None).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 502);

    let line = refused(&["--ca-file", "/nonexistent/ca.pem"], &[]).await;
    assert!(line.contains("/nonexistent/ca.pem"), "{line}");
    let not_pem = TempFile::with("not-a-ca.pem", "hello");
    let line = refused(&["--ca-file", not_pem.path()], &[]).await;
    assert!(line.contains(not_pem.path()), "{line}");
    assert!(line.contains("certificate"), "{line}");
}

/// The admin route says why an instance takes no traffic: one refusing connections is cooling
/// for a connect failure, with the time it has left; the other is available.
#[tokio::test]
async fn the_admin_route_shows_a_cooling_instance_and_why() {
    let sims = sims(1).await;
    let closed = free_addr();
    let (mut gateway, _, base) = Gateway::over_urls(
        &[format!("down=http://{closed}"), backend_flag(&sims[0])],
        &[],
    );
    gateway.ready(&base, None).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert_eq!(served_by(&response), "a");

    let backends = gateway.ready(&base, None).await;
    let down = &backends["backends"][0];
    assert_eq!(down["name"], "down", "{down}");
    assert_eq!(down["state"], "cooling", "{down}");
    assert_eq!(down["available"], false, "{down}");
    assert_eq!(down["cooling_reason"], "connect", "{down}");
    assert!(
        down["cooling_down_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{down}"
    );
    assert_eq!(down["trial_in_flight"], false, "{down}");
    let up = &backends["backends"][1];
    assert_eq!(up["state"], "available", "{up}");
    assert_eq!(up["cooling_reason"], Value::Null, "{up}");
}

/// A backend's own `auth` in the file overrides the gateway's: an api-key backend needs its
/// `AOAI_KEY_<NAME>`, named when missing; an unknown mode is refused naming it.
#[tokio::test]
async fn a_backends_own_auth_mode_is_read_and_checked() {
    let api_key = TempFile::with(
        "per-backend-auth.toml",
        "auth = \"none\"\n[[backends]]\nname = \"ptu\"\nurl = \"http://127.0.0.1:9\"\n\
         auth = \"api-key\"\n",
    );
    let line = refused(&["--config", api_key.path()], &[]).await;
    assert!(line.contains("AOAI_KEY_PTU"), "{line}");

    let bogus = TempFile::with(
        "bogus-backend-auth.toml",
        "[[backends]]\nname = \"ptu\"\nurl = \"http://127.0.0.1:9\"\nauth = \"bogus\"\n",
    );
    let line = refused(&["--config", bogus.path()], &[]).await;
    assert!(line.contains("bogus"), "{line}");
}

/// `SIGHUP` rereads the configuration file and swaps the pool under load: no request fails, a
/// stream in flight completes, the instance that left gets nothing more, the one that came
/// serves, and the one that stayed keeps its health. A file that no longer parses leaves the
/// running pool in place.
#[tokio::test]
async fn sighup_reloads_the_pool_under_load_without_a_failed_request() {
    let sims = sims(3).await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let config_of = |names: &[usize]| {
        let mut text = format!("listen = \"{addr}\"\n");
        for &i in names {
            text.push_str(&format!(
                "[[backends]]\nname = \"{}\"\nurl = \"{}\"\n",
                sims[i].name(),
                sims[i].url()
            ));
        }
        text
    };
    let config = TempFile::with("reload.toml", &config_of(&[0, 1]));
    let mut gateway = Gateway::spawn(&["--config", config.path()], &[]);
    gateway.ready(&base, None).await;
    let hangup = |gateway: &Gateway| {
        let sent = Command::new("kill")
            .args(["-HUP", &gateway.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };

    let stream = client()
        .post(format!("{base}{CHAT}"))
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "Hi" }], "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (base, stop) = (base.clone(), stop.clone());
            tokio::spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    statuses.push(chat(&client, &base).await.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&config.0, config_of(&[1, 2])).unwrap();
    hangup(&gateway);
    // The admin route shows the new pool once it is in place.
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let backends = gateway.ready(&base, None).await;
        let names: Vec<&str> = backends["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        if names == ["b", "c"] {
            assert!(
                backends["backends"][0]["attempts"].as_u64().unwrap() > 0,
                "b kept"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reloaded: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_after_reload = sims[0].request_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        let statuses = caller.await.unwrap();
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    let body = stream.text().await.expect("the stream in flight completes");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(sims[2].request_count() > 0, "c serves");
    // At most the requests already in flight at the swap reached a afterwards.
    assert!(sims[0].request_count() <= a_after_reload + 4);

    // A file that does not parse: the running pool stays.
    std::fs::write(&config.0, "listen = \n").unwrap();
    hangup(&gateway);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = chat(&client(), &base).await;
    assert_eq!(response.status(), 200);
    assert!(["b", "c"].contains(&served_by(&response).as_str()));
}

/// `--priority NAME=N` and `--weight NAME=N` set a backend's tier and share; a name no
/// backend has, or a 0, is refused naming it.
#[tokio::test]
async fn priority_and_weight_flags_set_a_backends_tier_and_share() {
    let sims = sims(2).await;
    let (mut gateway, _, base) =
        Gateway::over_with(&sims, &["--priority", "b=2", "--weight", "a=3"]);
    let backends = gateway.ready(&base, None).await;
    assert_eq!(backends["backends"][0]["weight"], 3, "{backends}");
    assert_eq!(backends["backends"][1]["priority"], 2, "{backends}");
    for _ in 0..3 {
        assert_eq!(served_by(&chat(&client(), &base).await), "a");
    }

    let a = format!("a={}", sims[0].url());
    let line = refused(&["--backend", &a, "--weight", "zz=2"], &[]).await;
    assert!(line.contains("zz"), "{line}");
    let line = refused(&["--backend", &a, "--priority", "a=0"], &[]).await;
    assert!(line.contains("priority"), "{line}");
}

/// A WebSocket instance that echoes every data frame; returns its URL.
async fn websocket_echo_instance() -> String {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut session) = tokio_tungstenite::accept_async(socket).await else {
                    return;
                };
                while let Some(Ok(message)) = session.next().await {
                    if (message.is_text() || message.is_binary())
                        && session.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A Realtime session through the example: the admin route counts it while it is open; on
/// SIGTERM it goes on for the grace period (`--shutdown-grace 1`), then the caller's session is
/// closed with 1001 and the process exits.
#[tokio::test]
async fn sigterm_closes_a_realtime_session_with_1001_after_the_grace_period() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let instance = websocket_echo_instance().await;
    let (mut gateway, _, base) =
        Gateway::over_urls(&[format!("rt={instance}")], &["--shutdown-grace", "1"]);
    assert_eq!(gateway.ready(&base, None).await["realtime_sessions"], 0);

    let url = format!(
        "{}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime",
        base.replace("http://", "ws://")
    );
    let (mut session, response) =
        tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(url))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(response.status(), 101);
    let echo = async |session: &mut tokio_tungstenite::WebSocketStream<_>, text: &str| {
        session.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(BOUND, session.next()).await.unwrap();
        assert_eq!(echoed.unwrap().unwrap(), Message::text(text));
    };
    echo(&mut session, "hello").await;
    let admin = gateway.ready(&base, None).await;
    assert_eq!(admin["realtime_sessions"], 1, "{admin}");

    let terminated = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let signalled = Instant::now();
    // Within the grace period the session goes on.
    echo(&mut session, "still here").await;
    let mut close = None;
    while let Some(Ok(message)) = tokio::time::timeout(BOUND, session.next()).await.unwrap() {
        if let Message::Close(frame) = message {
            close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
        }
    }
    assert_eq!(close, Some((1001, "gateway shutting down".to_owned())));
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "{:?}",
        signalled.elapsed()
    );
    let status = gateway.exit().await;
    assert!(status.success(), "{status}; stderr: {}", gateway.stderr());
}
