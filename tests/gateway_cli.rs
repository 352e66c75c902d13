//! The `gateway` example binary, run as a user runs it: bad flags and configs exit 2 with one
//! line on stderr; a good command line serves, balances, guards with client keys, and starts
//! emulated instances when no backend is given.
//!
//! The binary is `target/<profile>/examples/gateway`, next to this test's own `deps/` directory.
//! `cargo test` and `cargo nextest run` build the examples along with the tests; when running
//! only this target (`cargo test --test gateway_cli`), build it first:
//! `cargo build --example gateway`.

mod support;

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aoai_sim::SimHandle;
use serde_json::Value;
use support::{BOUND, CHAT, chat, chat_body, client, served_by, sims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The example binary, found from this test binary (`target/<profile>/deps/gateway_cli-*`).
fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build --example gateway` (cargo test and cargo nextest run \
         build it with the other targets)",
        binary.display()
    );
    binary
}

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
        let child = Command::new(gateway_binary())
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
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not exit; stderr: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the gateway on a free loopback port over `sims`, with no other flag; returns it,
    /// its address and its base URL.
    fn over(sims: &[SimHandle]) -> (Self, String, String) {
        let addr = free_addr();
        let mut args = vec!["--listen".to_owned(), addr.clone()];
        for sim in sims {
            args.extend(["--backend".to_owned(), backend_flag(sim)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let base = format!("http://{addr}");
        (Self::spawn(&args, &[]), addr, base)
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

    let unknown_backend_key = TempFile::with(
        "unknown-backend.toml",
        "[[backends]]\nurl = \"http://127.0.0.1:9\"\nnmae = \"a\"\n",
    );
    let line = refused(&["--config", unknown_backend_key.path()], &[]).await;
    assert!(line.contains("nmae"), "{line}");
}

#[tokio::test]
async fn zero_attempts_are_refused() {
    let line = refused(
        &["--max-attempts", "0", "--backend", "http://127.0.0.1:9"],
        &[],
    )
    .await;
    assert!(line.contains("attempts"), "{line}");
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
async fn a_config_file_sets_backends_and_turns_the_served_by_header_off() {
    let sims = sims(2).await;
    let addr = free_addr();
    let base = format!("http://{addr}");
    let config = TempFile::with(
        "gateway.toml",
        &format!(
            "listen = \"{addr}\"\nmax_attempts = 2\nserved_by_header = false\n\n\
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
    let request = http::Request::post(format!("{base}{CHAT}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            chat_body().to_string(),
        )))
        .unwrap();
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
