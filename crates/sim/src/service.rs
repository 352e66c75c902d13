//! The axum router: one middleware records the request and applies faults and credentials,
//! then one handler per operation answers like Azure OpenAI.

use std::convert::Infallible;
use std::future;
use std::io;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, StreamExt};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::objects;
use crate::shapes::{self, ChoiceFilter, Delta};
use crate::state::Exceeded;
use crate::{Fault, RecordedRequest, SimState, ids, realtime};

/// The emulator as an [`axum::Router`] over `state`, to serve an instance from your own app
/// (or your own listener). Keep a clone of `state` to drive it.
///
/// Routes (`POST` unless noted):
///
/// | path | answer |
/// | --- | --- |
/// | `/openai/deployments/{deployment}/chat/completions` | chat completion, or SSE chunks with `"stream": true` |
/// | `/openai/deployments/{deployment}/completions` | legacy text completion, streaming too |
/// | `/openai/deployments/{deployment}/embeddings` | embedding list (`float` or `base64`) |
/// | `/openai/v1/chat/completions`, `/openai/v1/completions`, `/openai/v1/embeddings` | the same, `model` in the body |
/// | `/openai/responses`, `/openai/v1/responses` | Responses API object, or its SSE events with `"stream": true`; stored unless `"store": false`, continuing `previous_response_id` or a `conversation` |
/// | `GET /openai/realtime?deployment=...`, `GET /openai/v1/realtime?model=...` | Realtime API WebSocket (see the [crate docs](crate#realtime)) |
///
/// And the objects each instance holds, under `/openai` and `/openai/v1` alike:
///
/// | path | answer |
/// | --- | --- |
/// | `GET`, `DELETE /responses/{id}`; `GET /responses/{id}/input_items`; `/responses/{id}/cancel` | the stored response; `{"id":...,"object":"response","deleted":true}`; the list of its input items (earlier turns' included); the response |
/// | `/conversations` (`items` optional); `GET`, `DELETE /conversations/{id}` | conversation `conv_...`; the conversation; `{"id":...,"object":"conversation.deleted","deleted":true}` |
/// | `GET`, `POST /conversations/{id}/items` | the list of its items (each response's input and answer added); the items added |
/// | `/files` (`multipart/form-data`: `purpose`, `file`); `GET /files` | file object `file-...`; the list |
/// | `GET`, `DELETE /files/{id}`; `GET /files/{id}/content` | file object; `{"id":...,"object":"file","deleted":true}`; the bytes |
/// | `/batches` (`input_file_id` on this instance, `endpoint`, `completion_window`); `GET /batches` | batch `batch_...`, `validating`; the list |
/// | `GET /batches/{id}`; `/batches/{id}/cancel` | the batch, `completed` with an `output_file_id` from the first read on; the batch, `cancelling` |
/// | `/threads`; `GET`, `DELETE /threads/{id}` | thread `thread_...`; the thread; `{"id":...,"object":"thread.deleted","deleted":true}` |
/// | `/threads/{id}/messages`; `GET /threads/{id}/messages` | message `msg_...`; the list |
/// | `/threads/{id}/runs`; `GET /threads/{id}/runs/{run_id}` | run `run_...`, `completed`, its reply added to the thread; the run |
///
/// An id this instance does not hold gets its 404: for responses and threads OpenAI's
/// `{"error":{"message":"Response with id '...' not found.","type":"invalid_request_error",
/// "param":null,"code":null}}` (`No thread found with id '...'.`, `No run found with id
/// '...'.`), for files and batches Azure's `{"error":{"code":"notFound","message":"File with id
/// '...' not found."}}`. An unknown `previous_response_id` gets a 400, `"code":
/// "previous_response_not_found"`; an unknown `conversation` a 404, `Conversation with id
/// '...' not found.`
///
/// Anything else gets Azure's 404 `{"error":{"code":"404","message":"Resource not found"}}`.
/// Request bodies have no size limit. Every answer carries `apim-request-id`, `x-request-id`,
/// `x-ms-region`, `x-ratelimit-remaining-requests` and `x-ratelimit-remaining-tokens`.
///
/// ```
/// use aoai_sim::{SimConfig, SimState};
///
/// let state = SimState::new(SimConfig::new("westeurope"));
/// let app: axum::Router = axum::Router::new().merge(aoai_sim::router(state.clone()));
/// # drop(app);
/// ```
pub fn router(state: SimState) -> Router {
    Router::new()
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat),
        )
        .route(
            "/openai/deployments/{deployment}/completions",
            post(completions),
        )
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(embeddings),
        )
        .route("/openai/v1/chat/completions", post(chat))
        .route("/openai/v1/completions", post(completions))
        .route("/openai/v1/embeddings", post(embeddings))
        .route("/openai/responses", post(responses))
        .route("/openai/v1/responses", post(responses))
        .merge(objects::routes())
        .route(realtime::PATH, axum::routing::get(realtime::realtime))
        .route(realtime::V1_PATH, axum::routing::get(realtime::realtime))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), front))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

// ---- the front middleware ----

/// Record, then a fault if one is queued, else the credential check, else the route; finally
/// Azure's headers on whatever answer came out.
async fn front(State(state): State<SimState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        // The client stopped sending: nobody is left to read an answer.
        return StatusCode::BAD_REQUEST.into_response();
    };
    state.record(|| RecordedRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let fault = state.pop_fault();
    if let Some(fault) = &fault {
        tracing::debug!(sim = state.name(), ?fault, "fault");
    }
    let operation = operation(parts.uri.path());
    let api_version = api_version(parts.uri.query());
    let response = match fault {
        None => normal(&state, Request::from_parts(parts, Body::from(body)), next).await,
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            normal(&state, Request::from_parts(parts, Body::from(body)), next).await
        }
        Some(Fault::Throttle {
            retry_after_secs,
            retry_after_ms,
        }) => {
            let secs = retry_after_secs.or(retry_after_ms.map(|ms| ms.div_ceil(1000)));
            let mut response = rate_limited(operation, &api_version, "token", secs);
            let headers = response.headers_mut();
            if let Some(secs) = retry_after_secs {
                headers.insert("retry-after", HeaderValue::from(secs));
            }
            if let Some(ms) = retry_after_ms {
                headers.insert("retry-after-ms", HeaderValue::from(ms));
            }
            headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from(0));
            if let Some(secs) = secs {
                headers.insert("x-ratelimit-reset-tokens", HeaderValue::from(secs));
            }
            response
        }
        Some(Fault::Respond {
            status,
            headers,
            body,
        }) => respond(status, headers, body),
        Some(Fault::InternalError) => azure_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "The server had an error processing your request. Sorry about that! You can retry \
             your request, or contact us through an Azure support request at: \
             https://go.microsoft.com/fwlink/?linkid=2213926 if you keep seeing this error.",
        ),
        Some(Fault::ServiceUnavailable) => azure_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "The service is temporarily unable to process your request. Please try again later.",
        ),
        Some(Fault::ContentFilter) => json(
            StatusCode::BAD_REQUEST,
            &shapes::ErrorBody {
                error: shapes::content_filter_error(),
            },
        ),
        Some(Fault::DropMidBody) => drop_mid_body(&state, &body),
        Some(Fault::Hang) => future::pending().await,
    };
    with_azure_headers(&state, response)
}

/// The answer without a fault: Azure's 401 for missing credentials, else the route's.
async fn normal(state: &SimState, request: Request, next: Next) -> Response {
    match unauthorized(state, &request) {
        Some(denied) => denied,
        None => next.run(request).await,
    }
}

/// Add the headers Azure sends with every answer, unless the answer set them already.
fn with_azure_headers(state: &SimState, mut response: Response) -> Response {
    let (requests, tokens) = state.remaining();
    let headers = response.headers_mut();
    let mut add = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers
                .entry(HeaderName::from_static(name))
                .or_insert(value);
        }
    };
    add("x-ratelimit-remaining-requests", requests.to_string());
    add("x-ratelimit-remaining-tokens", tokens.to_string());
    add("apim-request-id", ids::uuid());
    add("x-request-id", ids::uuid());
    add("x-ms-region", state.config().region.clone());
    response
}

/// Azure's 401 when credentials are expected and the request has none that match.
fn unauthorized(state: &SimState, request: &Request) -> Option<Response> {
    let config = state.config();
    if config.api_key.is_none() && config.bearer.is_none() {
        return None;
    }
    let headers = request.headers();
    // Browsers cannot set headers on a WebSocket handshake: Realtime takes the key in the query
    // too.
    let key_ok = config
        .api_key
        .as_deref()
        .zip(headers.get("api-key"))
        .is_some_and(|(want, got)| got.as_bytes() == want.as_bytes())
        || realtime::key_in_query(state, request.uri());
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let bearer_ok = config
        .bearer
        .as_deref()
        .zip(bearer)
        .is_some_and(|(want, got)| got == want);
    if key_ok || bearer_ok {
        return None;
    }
    let token_flavour = config.api_key.is_none()
        || (headers.contains_key(AUTHORIZATION) && !headers.contains_key("api-key"));
    let message = if token_flavour {
        "Unauthorized. Access token is missing, invalid, audience is incorrect \
         (https://cognitiveservices.azure.com), or have expired."
    } else {
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
         provide a valid key for an active subscription and use a correct regional API endpoint \
         for your resource."
    };
    Some(azure_error(StatusCode::UNAUTHORIZED, "401", message))
}

/// Exactly the scripted status, headers and body.
fn respond(status: StatusCode, headers: Vec<(String, String)>, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().remove(CONTENT_TYPE);
    for (name, value) in headers {
        match (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => tracing::warn!(%name, %value, "Fault::Respond: invalid header skipped"),
        }
    }
    response
}

/// 200, then the start of the answer, then a broken body.
fn drop_mid_body(state: &SimState, body: &Bytes) -> Response {
    let streaming = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    let (content_type, prefix) = if streaming {
        let chunk = shapes::ChatChunk {
            choices: vec![role_choice()],
            created: ids::unix_now(),
            id: &ids::id("chatcmpl-", 29),
            model: &state.config().model,
            object: "chat.completion.chunk",
            system_fingerprint: SYSTEM_FINGERPRINT,
            usage: None,
        };
        let mut prefix = sse_data(&shapes::prompt_filter_chunk());
        prefix.extend_from_slice(&sse_data(&chunk));
        (EVENT_STREAM, prefix)
    } else {
        let whole = chat_completion(state, 1, &reply(state, None));
        let half = whole.len() / 2;
        (APPLICATION_JSON, BytesMut::from(&whole[..half]))
    };
    let broken = stream::iter([Ok(prefix.freeze())]).chain(stream::once(async {
        // Hyper flushes what it has when the body is not ready: wait a moment so the headers
        // and the first part leave before the connection is dropped.
        tokio::time::sleep(Duration::from_millis(10)).await;
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "aoai-sim: connection dropped mid-body (Fault::DropMidBody)",
        ))
    }));
    ([(CONTENT_TYPE, content_type)], Body::from_stream(broken)).into_response()
}

async fn not_found() -> Response {
    azure_error(StatusCode::NOT_FOUND, "404", "Resource not found")
}

// ---- operations ----

/// What every model call reads from its JSON body.
struct Call {
    json: Map<String, Value>,
    stream: bool,
    max_tokens: Option<u64>,
    prompt_tokens: u64,
}

impl Call {
    /// Parse the body; `max_keys` name the token limit fields, `prompt_keys` the prompt fields
    /// (the first is required).
    fn parse(body: &Bytes, max_keys: &[&str], prompt_keys: &[&str]) -> Result<Self, Refused> {
        let Ok(Value::Object(json)) = serde_json::from_slice::<Value>(body) else {
            return Err(Refused::Invalid(
                "We could not parse the JSON body of your request. (HINT: This likely means \
                 you aren't using your HTTP library correctly. The OpenAI API expects a JSON \
                 payload, but what was sent was not valid JSON. If you have trouble figuring out \
                 how to fix this, please contact us through our help center at \
                 help.openai.com.)"
                    .to_owned(),
            ));
        };
        if let Some(required) = prompt_keys.first()
            && !json.contains_key(*required)
        {
            return Err(Refused::Invalid(format!(
                "'{required}' is a required property"
            )));
        }
        let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let max_tokens = max_keys
            .iter()
            .find_map(|key| json.get(*key).and_then(Value::as_u64));
        let chars: usize = prompt_keys
            .iter()
            .filter_map(|key| json.get(*key))
            .map(text_len)
            .sum();
        let prompt_tokens = (chars as u64).div_ceil(4).max(1);
        Ok(Self {
            json,
            stream,
            max_tokens,
            prompt_tokens,
        })
    }

    /// Take the call's tokens from the quota: its prompt and its `max_tokens` (or the reply
    /// length when it sets none).
    fn charge(
        &self,
        state: &SimState,
        operation: &'static str,
        query: Option<&str>,
    ) -> Result<(), Refused> {
        let completion = self.max_tokens.unwrap_or(state.config().reply_tokens);
        charge(
            state,
            self.prompt_tokens.saturating_add(completion),
            operation,
            query,
        )
    }
}

/// Take `tokens` from the quota, or refuse like Azure.
fn charge(
    state: &SimState,
    tokens: u64,
    operation: &'static str,
    query: Option<&str>,
) -> Result<(), Refused> {
    state.charge(tokens).map_err(|exceeded| Refused::OverQuota {
        operation,
        api_version: api_version(query),
        exceeded,
    })
}

/// Why a model call gets no answer.
#[derive(Debug)]
enum Refused {
    /// 400: the body is not what the operation takes.
    Invalid(String),
    /// 429: over the configured quota.
    OverQuota {
        operation: &'static str,
        api_version: String,
        exceeded: Exceeded,
    },
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Invalid(message) => invalid_request(&message),
            Self::OverQuota {
                operation,
                api_version,
                exceeded,
            } => over_quota(operation, &api_version, &exceeded),
        }
    }
}

/// Characters of prompt text in a JSON value: every string, and four per number (token ids).
fn text_len(value: &Value) -> usize {
    match value {
        Value::String(s) => s.chars().count(),
        Value::Number(_) => 4,
        Value::Array(items) => items.iter().map(text_len).sum(),
        Value::Object(fields) => fields.values().map(text_len).sum(),
        Value::Null | Value::Bool(_) => 0,
    }
}

/// The reply's tokens and whether `max_tokens` cut it short.
pub(crate) struct Reply {
    pub(crate) tokens: Vec<String>,
    pub(crate) truncated: bool,
}

impl Reply {
    pub(crate) fn text(&self) -> String {
        self.tokens.concat()
    }

    pub(crate) fn len(&self) -> u64 {
        self.tokens.len() as u64
    }

    fn finish_reason(&self) -> &'static str {
        if self.truncated { "length" } else { "stop" }
    }
}

pub(crate) fn reply(state: &SimState, max_tokens: Option<u64>) -> Reply {
    const FILLER: [&str; 8] = [
        " lorem",
        " ipsum",
        " dolor",
        " sit",
        " amet",
        " consectetur",
        " adipiscing",
        " elit",
    ];
    let full = state.config().reply_tokens;
    let (len, truncated) = match max_tokens {
        Some(max) if max < full => (max.max(1), true),
        _ => (full, false),
    };
    let tokens = (0..len)
        .map(|i| match i {
            0 => "Hello".to_owned(),
            1 => " from".to_owned(),
            2 => format!(" {}", state.name()),
            i => FILLER[(i - 3) as usize % FILLER.len()].to_owned(),
        })
        .collect();
    Reply { tokens, truncated }
}

/// How long the model takes to produce `tokens` tokens, for answers that are not streamed.
fn generation_time(state: &SimState, tokens: u64) -> Duration {
    let config = state.config();
    let gaps = u32::try_from(tokens.saturating_sub(1)).unwrap_or(u32::MAX);
    config
        .time_to_first_token
        .saturating_add(config.chunk_delay.saturating_mul(gaps))
}

const SYSTEM_FINGERPRINT: &str = "fp_ee1d74bde0";

async fn chat(
    State(state): State<SimState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, Refused> {
    let call = Call::parse(
        &body,
        &["max_completion_tokens", "max_tokens"],
        &["messages"],
    )?;
    call.charge(&state, "ChatCompletions_Create", query.as_deref())?;
    let reply = reply(&state, call.max_tokens);
    if call.stream {
        let include_usage = call
            .json
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        return Ok(chat_stream(&state, &call, &reply, include_usage));
    }
    tokio::time::sleep(generation_time(&state, reply.len())).await;
    let body = chat_completion(&state, call.prompt_tokens, &reply);
    Ok(([(CONTENT_TYPE, APPLICATION_JSON)], body).into_response())
}

/// A whole `chat.completion` document.
pub(crate) fn chat_completion(state: &SimState, prompt_tokens: u64, reply: &Reply) -> Bytes {
    let content = reply.text();
    to_json(&shapes::ChatCompletion {
        choices: [shapes::ChatChoice {
            content_filter_results: shapes::ALL_SAFE,
            finish_reason: reply.finish_reason(),
            index: 0,
            logprobs: (),
            message: shapes::ChatMessage {
                annotations: [],
                content: &content,
                refusal: (),
                role: "assistant",
            },
        }],
        created: ids::unix_now(),
        id: &ids::id("chatcmpl-", 29),
        model: &state.config().model,
        object: "chat.completion",
        prompt_filter_results: shapes::prompt_filter_results(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        usage: shapes::ChatUsage::new(prompt_tokens, reply.len()),
    })
}

fn role_choice() -> shapes::ChunkChoice<'static> {
    shapes::ChunkChoice {
        content_filter_results: ChoiceFilter::Empty {},
        delta: Delta::Role {
            content: "",
            refusal: (),
            role: "assistant",
        },
        finish_reason: None,
        index: 0,
        logprobs: (),
    }
}

/// Azure's chat stream: prompt filter results, role, content chunks, finish, (usage), `[DONE]`.
fn chat_stream(state: &SimState, call: &Call, reply: &Reply, include_usage: bool) -> Response {
    let id = ids::id("chatcmpl-", 29);
    let created = ids::unix_now();
    let model = &state.config().model;
    let chunk = |choice: shapes::ChunkChoice<'_>| {
        sse_data(&shapes::ChatChunk {
            choices: vec![choice],
            created,
            id: &id,
            model,
            object: "chat.completion.chunk",
            system_fingerprint: SYSTEM_FINGERPRINT,
            usage: include_usage.then_some(None),
        })
    };
    let mut events = vec![
        (Pace::Now, sse_data(&shapes::prompt_filter_chunk())),
        (Pace::FirstToken, chunk(role_choice())),
    ];
    for (i, token) in reply.tokens.iter().enumerate() {
        let pace = if i == 0 { Pace::Now } else { Pace::NextToken };
        let choice = shapes::ChunkChoice {
            content_filter_results: ChoiceFilter::Rated(shapes::ALL_SAFE),
            delta: Delta::Content { content: token },
            finish_reason: None,
            index: 0,
            logprobs: (),
        };
        events.push((pace, chunk(choice)));
    }
    events.push((
        Pace::Now,
        chunk(shapes::ChunkChoice {
            content_filter_results: ChoiceFilter::Empty {},
            delta: Delta::Empty {},
            finish_reason: Some(reply.finish_reason()),
            index: 0,
            logprobs: (),
        }),
    ));
    if include_usage {
        let usage = sse_data(&shapes::ChatChunk {
            choices: Vec::new(),
            created,
            id: &id,
            model,
            object: "chat.completion.chunk",
            system_fingerprint: SYSTEM_FINGERPRINT,
            usage: Some(Some(shapes::ChatUsage::new(
                call.prompt_tokens,
                reply.len(),
            ))),
        });
        events.push((Pace::Now, usage));
    }
    events.push((Pace::Now, BytesMut::from(&b"data: [DONE]\n\n"[..])));
    sse(state, events)
}

async fn completions(
    State(state): State<SimState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, Refused> {
    let call = Call::parse(&body, &["max_tokens"], &["prompt"])?;
    call.charge(&state, "Completions_Create", query.as_deref())?;
    let reply = reply(&state, call.max_tokens);
    let id = ids::id("cmpl-", 29);
    let created = ids::unix_now();
    let model = &state.config().model;
    if call.stream {
        let chunk = |text: &str, filter, finish_reason| {
            sse_data(&shapes::TextChunk {
                choices: [shapes::TextChoice {
                    content_filter_results: filter,
                    finish_reason,
                    index: 0,
                    logprobs: (),
                    text,
                }],
                created,
                id: &id,
                model,
                object: "text_completion",
            })
        };
        let mut events = vec![(Pace::Now, sse_data(&shapes::prompt_filter_chunk()))];
        for (i, token) in reply.tokens.iter().enumerate() {
            let pace = if i == 0 {
                Pace::FirstToken
            } else {
                Pace::NextToken
            };
            let filter = ChoiceFilter::Rated(shapes::ALL_SAFE);
            events.push((pace, chunk(token, filter, None)));
        }
        let finish = Some(reply.finish_reason());
        events.push((Pace::Now, chunk("", ChoiceFilter::Empty {}, finish)));
        events.push((Pace::Now, BytesMut::from(&b"data: [DONE]\n\n"[..])));
        return Ok(sse(&state, events));
    }
    tokio::time::sleep(generation_time(&state, reply.len())).await;
    let text = reply.text();
    Ok(json(
        StatusCode::OK,
        &shapes::TextCompletion {
            choices: [shapes::TextChoice {
                content_filter_results: ChoiceFilter::Rated(shapes::ALL_SAFE),
                finish_reason: Some(reply.finish_reason()),
                index: 0,
                logprobs: (),
                text: &text,
            }],
            created,
            id: &id,
            model,
            object: "text_completion",
            prompt_filter_results: shapes::prompt_filter_results(),
            usage: shapes::TextUsage::new(call.prompt_tokens, reply.len()),
        },
    ))
}

/// The model reported in embedding answers.
const EMBEDDING_MODEL: &str = "text-embedding-3-small";

async fn embeddings(
    State(state): State<SimState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, Refused> {
    let call = Call::parse(&body, &[], &["input"])?;
    // Embeddings generate nothing: their cost is the prompt alone.
    charge(
        &state,
        call.prompt_tokens,
        "Embeddings_Create",
        query.as_deref(),
    )?;
    let inputs: Vec<&Value> = match call.json.get("input").unwrap_or(&Value::Null) {
        Value::Array(items) if items.iter().any(|item| !item.is_number()) => items.iter().collect(),
        single => vec![single],
    };
    let dimensions = call
        .json
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(1536, |d| d.clamp(1, 3072)) as usize;
    let base64 = call.json.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embed(input, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                shapes::Vector::Base64(ids::base64(&bytes))
            } else {
                shapes::Vector::Float(vector)
            };
            shapes::Embedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    tokio::time::sleep(state.config().time_to_first_token).await;
    Ok(json(
        StatusCode::OK,
        &shapes::EmbeddingList {
            object: "list",
            data,
            model: EMBEDDING_MODEL,
            usage: shapes::EmbeddingUsage {
                prompt_tokens: call.prompt_tokens,
                total_tokens: call.prompt_tokens,
            },
        },
    ))
}

/// A deterministic unit vector for `input`: the same text always embeds the same.
fn embed(input: &Value, dimensions: usize) -> Vec<f32> {
    // FNV-1a over the input's JSON text seeds an xorshift generator.
    let seed = input
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let mut x = seed | 1;
    let raw: Vec<f32> = (0..dimensions)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The top 24 bits as a float in [-1, 1).
            (x >> 40) as f32 / 8_388_608.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.into_iter().map(|v| v / norm).collect()
}

async fn responses(
    State(state): State<SimState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, Refused> {
    let call = Call::parse(&body, &["max_output_tokens"], &["input", "instructions"])?;
    // An unknown previous response or conversation is refused before the quota is charged.
    let (previous, conversation) = match objects::previous_response(&state, &call.json)
        .and_then(|previous| Ok((previous, objects::conversation_of(&state, &call.json)?)))
    {
        Ok(found) => found,
        Err(refused) => return Ok(refused.into_response()),
    };
    call.charge(&state, "Responses_Create", query.as_deref())?;
    let mut reply = reply(&state, call.max_tokens);
    let turn = previous
        .as_ref()
        .map(|previous| previous.turn)
        .or(conversation.as_ref().map(|conversation| conversation.turn));
    if let Some(turn) = turn {
        // Say the turn, so a test sees the chain was followed: "Hello from eastus (turn 3)".
        let at = reply.tokens.len().min(3) - 1;
        reply.tokens[at].push_str(&format!(" (turn {turn})"));
    }
    let text = reply.text();
    let ids = ResponseIds {
        id: ids::id("resp_", 48),
        message: ids::id("msg_", 48),
        created_at: ids::unix_now(),
    };
    let store = call.json.get("store").and_then(Value::as_bool) != Some(false);
    let previous_id = previous.as_ref().map(|p| p.id.clone());
    let mut done = response_object(&state, &ids, &call, &reply, &text);
    done.previous_response_id = previous_id.as_deref();
    done.conversation = conversation
        .as_ref()
        .map(|conversation| shapes::ConversationRef {
            id: &conversation.id,
        });
    done.store = store;
    // The answer's output item, for the conversation and the stored response alike.
    let output = vec![(ids.message.clone(), to_json(&done.output[0]))];
    if let Some(conversation) = &conversation {
        objects::extend_conversation(&state, &conversation.id, &call.json, output.clone());
    }
    // The document as answered: stored, and the answer when not streamed.
    let body = to_json(&done);
    if store {
        // With its input items, after those of the chain it continues.
        objects::store_response(&state, &ids.id, body.clone(), previous, &call.json, output);
    }
    if call.stream {
        return Ok(responses_stream(&state, &ids, &reply, done));
    }
    tokio::time::sleep(generation_time(&state, reply.len())).await;
    Ok(json_bytes(StatusCode::OK, body))
}

struct ResponseIds {
    id: String,
    message: String,
    created_at: u64,
}

fn output_message<'a>(
    ids: &'a ResponseIds,
    status: &'static str,
    content: Vec<shapes::OutputText<'a>>,
) -> shapes::OutputMessage<'a> {
    shapes::OutputMessage {
        kind: "message",
        id: &ids.message,
        status,
        role: "assistant",
        content,
    }
}

fn output_text(text: &str) -> shapes::OutputText<'_> {
    shapes::OutputText {
        kind: "output_text",
        annotations: [],
        text,
    }
}

/// The finished `response` object.
fn response_object<'a>(
    state: &'a SimState,
    ids: &'a ResponseIds,
    call: &Call,
    reply: &Reply,
    text: &'a str,
) -> shapes::Response<'a> {
    let status = if reply.truncated {
        "incomplete"
    } else {
        "completed"
    };
    shapes::Response {
        id: &ids.id,
        object: "response",
        created_at: ids.created_at,
        status,
        error: (),
        incomplete_details: reply.truncated.then_some(shapes::IncompleteDetails {
            reason: "max_output_tokens",
        }),
        instructions: (),
        max_output_tokens: call.max_tokens,
        model: &state.config().model,
        output: vec![output_message(ids, status, vec![output_text(text)])],
        parallel_tool_calls: true,
        previous_response_id: None,
        conversation: None,
        reasoning: shapes::Reasoning {
            effort: (),
            summary: (),
        },
        store: true,
        temperature: 1.0,
        text: shapes::TextConfig {
            format: shapes::TextFormat { kind: "text" },
        },
        tool_choice: "auto",
        tools: [],
        top_p: 1.0,
        truncation: "disabled",
        usage: Some(shapes::ResponseUsage::new(call.prompt_tokens, reply.len())),
        user: (),
        metadata: shapes::Empty {},
    }
}

/// The Responses API stream: created, in progress, item and part added, one delta per token,
/// then the done events and `response.completed` (or `response.incomplete`).
fn responses_stream(
    state: &SimState,
    ids: &ResponseIds,
    reply: &Reply,
    done: shapes::Response<'_>,
) -> Response {
    let text = done.output[0].content[0].text;
    let mut started = done.clone();
    started.status = "in_progress";
    started.incomplete_details = None;
    started.output = Vec::new();
    started.usage = None;
    let item_status = done.status;
    let mut events = Vec::new();
    let mut push = |pace, event: shapes::ResponseEvent<'_>| {
        let mut bytes = BytesMut::from(format!("event: {}\n", event.name()).as_bytes());
        bytes.extend_from_slice(&sse_data(&event));
        events.push((pace, bytes));
    };
    let mut seq = 0_u64;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    push(
        Pace::Now,
        shapes::ResponseEvent::Created {
            sequence_number: next(),
            response: started.clone(),
        },
    );
    push(
        Pace::Now,
        shapes::ResponseEvent::InProgress {
            sequence_number: next(),
            response: started,
        },
    );
    push(
        Pace::FirstToken,
        shapes::ResponseEvent::OutputItemAdded {
            sequence_number: next(),
            output_index: 0,
            item: output_message(ids, "in_progress", Vec::new()),
        },
    );
    push(
        Pace::Now,
        shapes::ResponseEvent::ContentPartAdded {
            sequence_number: next(),
            item_id: &ids.message,
            output_index: 0,
            content_index: 0,
            part: output_text(""),
        },
    );
    for (i, token) in reply.tokens.iter().enumerate() {
        let pace = if i == 0 { Pace::Now } else { Pace::NextToken };
        push(
            pace,
            shapes::ResponseEvent::OutputTextDelta {
                sequence_number: next(),
                item_id: &ids.message,
                output_index: 0,
                content_index: 0,
                delta: token,
            },
        );
    }
    push(
        Pace::Now,
        shapes::ResponseEvent::OutputTextDone {
            sequence_number: next(),
            item_id: &ids.message,
            output_index: 0,
            content_index: 0,
            text,
        },
    );
    push(
        Pace::Now,
        shapes::ResponseEvent::ContentPartDone {
            sequence_number: next(),
            item_id: &ids.message,
            output_index: 0,
            content_index: 0,
            part: output_text(text),
        },
    );
    push(
        Pace::Now,
        shapes::ResponseEvent::OutputItemDone {
            sequence_number: next(),
            output_index: 0,
            item: output_message(ids, item_status, vec![output_text(text)]),
        },
    );
    let sequence_number = next();
    let last = if reply.truncated {
        shapes::ResponseEvent::Incomplete {
            sequence_number,
            response: done,
        }
    } else {
        shapes::ResponseEvent::Completed {
            sequence_number,
            response: done,
        }
    };
    push(Pace::Now, last);
    sse(state, events)
}

// ---- streaming ----

/// When a streamed event may go out: an SSE event, or a Realtime response event.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pace {
    /// At once.
    Now,
    /// After the time to first token.
    FirstToken,
    /// After the chunk delay, and a release while chunks are held.
    NextToken,
}

/// `events` in order, each once its pace allows.
pub(crate) fn paced<T: Send + 'static>(
    state: &SimState,
    events: Vec<(Pace, T)>,
) -> BoxStream<'static, T> {
    let state = state.clone();
    stream::iter(events)
        .then(move |(pace, event)| {
            let state = state.clone();
            async move {
                let config = state.config();
                match pace {
                    Pace::Now => {}
                    Pace::FirstToken => pause(config.time_to_first_token).await,
                    Pace::NextToken => {
                        pause(config.chunk_delay).await;
                        state.gate().await;
                    }
                }
                event
            }
        })
        .boxed()
}

/// A `text/event-stream` answer that sends `events` at their pace. The events are already
/// serialized; the stream only waits between them.
fn sse(state: &SimState, events: Vec<(Pace, BytesMut)>) -> Response {
    let body = paced(state, events).map(|bytes| Ok::<_, Infallible>(bytes.freeze()));
    ([(CONTENT_TYPE, EVENT_STREAM)], Body::from_stream(body)).into_response()
}

async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// `data: <json>\n\n`.
fn sse_data(value: &impl Serialize) -> BytesMut {
    let mut bytes = BytesMut::from(&b"data: "[..]);
    bytes.extend_from_slice(&to_json(value));
    bytes.extend_from_slice(b"\n\n");
    bytes
}

// ---- errors and helpers ----

const APPLICATION_JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";

pub(crate) fn to_json(value: &impl Serialize) -> Bytes {
    // Serializing these plain structs (no maps with non-string keys, no failing impls) cannot
    // fail.
    serde_json::to_vec(value)
        .map(Bytes::from)
        .unwrap_or_default()
}

pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Response {
    json_bytes(status, to_json(value))
}

/// `status` with a JSON document serialized already.
pub(crate) fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    (status, [(CONTENT_TYPE, APPLICATION_JSON)], body).into_response()
}

pub(crate) fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    json(
        status,
        &shapes::ErrorBody {
            error: shapes::AzureError { code, message },
        },
    )
}

fn invalid_request(message: &str) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        &shapes::ErrorBody {
            error: shapes::InvalidRequest {
                message,
                kind: "invalid_request_error",
                param: None,
                code: None,
            },
        },
    )
}

/// Azure's 429 body; `limit` is `"token"` or `"call"`.
fn rate_limited(operation: &str, api_version: &str, limit: &str, secs: Option<u64>) -> Response {
    let retry = secs.map_or_else(String::new, |secs| {
        format!(
            " Please retry after {secs} second{}.",
            if secs == 1 { "" } else { "s" }
        )
    });
    let message = format!(
        "Requests to the {operation} Operation under Azure OpenAI API version {api_version} \
         have exceeded {limit} rate limit of your current OpenAI S0 pricing tier.{retry} Please \
         go here: https://aka.ms/oai/quotaincrease if you would like to further increase the \
         default rate limit."
    );
    azure_error(StatusCode::TOO_MANY_REQUESTS, "429", &message)
}

/// The 429 for a request over the configured quota, with the time left in the window.
fn over_quota(operation: &str, api_version: &str, exceeded: &Exceeded) -> Response {
    let ms = u64::try_from(exceeded.retry_after.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let secs = ms.div_ceil(1000);
    let limit = if exceeded.calls { "call" } else { "token" };
    let mut response = rate_limited(operation, api_version, limit, Some(secs));
    let headers = response.headers_mut();
    headers.insert("retry-after", HeaderValue::from(secs));
    headers.insert("retry-after-ms", HeaderValue::from(ms));
    response
}

/// Azure's operation name for a path, as its 429 messages name it.
fn operation(path: &str) -> &'static str {
    if path.ends_with("/chat/completions") {
        "ChatCompletions_Create"
    } else if path.ends_with("/completions") {
        "Completions_Create"
    } else if path.ends_with("/embeddings") {
        "Embeddings_Create"
    } else if path.ends_with("/responses") {
        "Responses_Create"
    } else {
        "ChatCompletions_Create"
    }
}

/// The `api-version` query parameter, or `v1` for the version-less v1 routes.
fn api_version(query: Option<&str>) -> String {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("api-version="))
        .unwrap_or("v1")
        .to_owned()
}
