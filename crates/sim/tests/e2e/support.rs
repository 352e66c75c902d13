//! Helpers shared by the end-to-end tests: a client, URLs, fixtures, shape comparison and an
//! SSE reader.

use std::path::PathBuf;
use std::time::Duration;

use aoai_sim::SimHandle;
use serde_json::Value;

/// Every test waits at most this long for anything.
pub(crate) const PATIENCE: Duration = Duration::from_secs(5);

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

pub(crate) fn chat_url(sim: &SimHandle) -> String {
    format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        sim.url()
    )
}

pub(crate) fn url(sim: &SimHandle, path: &str) -> String {
    format!("{}{path}", sim.url())
}

pub(crate) fn hello() -> Value {
    serde_json::json!({"messages": [{"role": "user", "content": "Say hello"}]})
}

pub(crate) async fn post(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.expect("send")
}

pub(crate) async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

pub(crate) fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn fixture(name: &str) -> Value {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Assert `actual` has the shape of `expected`: the same keys at every level, and the same JSON
/// type for every value. Arrays: an empty expected array wants an empty one; otherwise every
/// actual element must have the shape of the first expected element.
pub(crate) fn assert_same_shape(actual: &Value, expected: &Value) {
    if let Err(mismatch) = compare(actual, expected, "$") {
        panic!("{mismatch}\nactual:   {actual}\nexpected: {expected}");
    }
}

fn compare(actual: &Value, expected: &Value, at: &str) -> Result<(), String> {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            let mut a_keys: Vec<&String> = a.keys().collect();
            let mut e_keys: Vec<&String> = e.keys().collect();
            a_keys.sort();
            e_keys.sort();
            if a_keys != e_keys {
                return Err(format!("{at}: keys {a_keys:?}, expected {e_keys:?}"));
            }
            e.iter()
                .try_for_each(|(key, value)| compare(&a[key], value, &format!("{at}.{key}")))
        }
        (Value::Array(a), Value::Array(e)) => match e.first() {
            None if a.is_empty() => Ok(()),
            None => Err(format!("{at}: {} elements, expected none", a.len())),
            Some(_) if a.is_empty() => Err(format!("{at}: empty, expected elements")),
            Some(first) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| compare(item, first, &format!("{at}[{i}]"))),
        },
        (Value::Null, Value::Null)
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_)) => Ok(()),
        _ => Err(format!("{at}: {actual} has another type than {expected}")),
    }
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) event: Option<String>,
    pub(crate) data: String,
}

impl Event {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

/// Reads a `text/event-stream` body event by event, as the bytes arrive.
pub(crate) struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl SseReader {
    pub(crate) fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event, `None` at the end of the body; panics on a body error.
    pub(crate) async fn next(&mut self) -> Option<Event> {
        self.try_next().await.expect("body error")
    }

    /// The next event, `Ok(None)` at the end of the body, `Err` on a body error.
    pub(crate) async fn try_next(&mut self) -> Result<Option<Event>, reqwest::Error> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Ok(Some(parse_event(&String::from_utf8_lossy(&raw))));
            }
            match self.response.chunk().await? {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => {
                    assert!(self.buffer.is_empty(), "trailing bytes: {:?}", self.buffer);
                    return Ok(None);
                }
            }
        }
    }

    /// Every remaining event.
    pub(crate) async fn rest(mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn parse_event(raw: &str) -> Event {
    let mut event = None;
    let mut data = Vec::new();
    for line in raw.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            event = Some(name.to_owned());
        } else if let Some(line) = line.strip_prefix("data: ") {
            data.push(line);
        } else {
            assert!(line.is_empty(), "unexpected SSE line {line:?}");
        }
    }
    Event {
        event,
        data: data.join("\n"),
    }
}
