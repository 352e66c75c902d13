//! [`Usage`], and reading it from one JSON document.

use serde::Deserialize;

/// The tokens one answer used, as the instance reported them.
///
/// Named after OpenTelemetry's GenAI token types (`input`, `output`). Each API spells them its own
/// way; all map here:
///
/// | field | Chat Completions, Completions, Embeddings | Responses API |
/// | --- | --- | --- |
/// | `input_tokens` | `usage.prompt_tokens` | `usage.input_tokens` |
/// | `output_tokens` | `usage.completion_tokens` (0 for embeddings) | `usage.output_tokens` |
/// | `total_tokens` | `usage.total_tokens` | `usage.total_tokens` |
/// | `cached_tokens` | `usage.prompt_tokens_details.cached_tokens` | `usage.input_tokens_details.cached_tokens` |
/// | `reasoning_tokens` | `usage.completion_tokens_details.reasoning_tokens` | `usage.output_tokens_details.reasoning_tokens` |
///
/// A count the answer leaves out is 0; a missing `total_tokens` is input plus output. Cached
/// tokens are part of the input tokens and reasoning tokens part of the output tokens, as in the
/// APIs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Tokens of the prompt (`prompt_tokens` / `input_tokens`).
    pub input_tokens: u64,
    /// Tokens generated (`completion_tokens` / `output_tokens`).
    pub output_tokens: u64,
    /// All tokens billed (`total_tokens`).
    pub total_tokens: u64,
    /// Prompt tokens served from the prompt cache (`*_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
    /// Output tokens spent on reasoning (`*_tokens_details.reasoning_tokens`).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Reads the usage from one JSON document: a whole answer (`{"usage": {...}}`), one chunk of a
    /// chat stream, or one Responses API stream event (`{"type": "response.completed",
    /// "response": {"usage": {...}}}`).
    ///
    /// `None` when the document is not JSON, has no `usage` object (or `usage: null`, as chat
    /// chunks before the last one may), or the object has none of the token counts.
    ///
    /// ```
    /// use aoai_usage::Usage;
    ///
    /// let usage = Usage::from_json(br#"{"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#);
    /// assert_eq!(usage.map(|u| u.output_tokens), Some(3));
    /// assert_eq!(Usage::from_json(b"not json"), None);
    /// ```
    pub fn from_json(json: &[u8]) -> Option<Self> {
        read_document(json)?.usage
    }
}

/// What one JSON document says of its answer: its usage, and the `model` and `id` beside it.
#[derive(Debug, Default)]
pub(crate) struct Document {
    pub(crate) usage: Option<Usage>,
    pub(crate) model: Option<Box<str>>,
    pub(crate) id: Option<Box<str>>,
}

/// Reads `json`, a whole answer or one stream event (whose Responses API object is under
/// `response`); `None` when it is not a JSON object.
pub(crate) fn read_document(json: &[u8]) -> Option<Document> {
    // Typed: serde skips every other field (the answer's text included) without allocating for
    // it; only the model's name and the id are copied.
    let envelope: Envelope = serde_json::from_slice(json).ok()?;
    Some(match envelope.response {
        Some(response) if envelope.usage.is_none() => Document {
            usage: response.usage.and_then(RawUsage::into_usage),
            model: response.model,
            id: response.id,
        },
        _ => Document {
            usage: envelope.usage.and_then(RawUsage::into_usage),
            model: envelope.model,
            id: envelope.id,
        },
    })
}

// A field left out, like one that is `null`, reads as `None` (serde's rule for `Option` fields).
#[derive(Deserialize)]
struct Envelope {
    usage: Option<RawUsage>,
    model: Option<Box<str>>,
    id: Option<Box<str>>,
    /// The Responses API's stream events carry the response, usage inside, under `response`.
    response: Option<ResponseObject>,
}

#[derive(Deserialize)]
struct ResponseObject {
    usage: Option<RawUsage>,
    model: Option<Box<str>>,
    id: Option<Box<str>>,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let input = self.prompt_tokens.or(self.input_tokens);
        let output = self.completion_tokens.or(self.output_tokens);
        if input.is_none() && output.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let input_tokens = input.unwrap_or(0);
        let output_tokens = output.unwrap_or(0);
        let detail = |a: Option<Details>, b: Option<Details>, f: fn(&Details) -> Option<u64>| {
            a.as_ref()
                .and_then(f)
                .or(b.as_ref().and_then(f))
                .unwrap_or(0)
        };
        Some(Usage {
            input_tokens,
            output_tokens,
            total_tokens: self
                .total_tokens
                .unwrap_or(input_tokens.saturating_add(output_tokens)),
            cached_tokens: detail(self.prompt_tokens_details, self.input_tokens_details, |d| {
                d.cached_tokens
            }),
            reasoning_tokens: detail(
                self.completion_tokens_details,
                self.output_tokens_details,
                |d| d.reasoning_tokens,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_usage_with_details() {
        let json = br#"{"id":"x","choices":[{"message":{"content":"hi \"usage\""}}],
            "usage":{"prompt_tokens":20,"completion_tokens":10,"total_tokens":30,
            "prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":4,"accepted_prediction_tokens":0}}}"#;
        assert_eq!(
            Usage::from_json(json),
            Some(Usage {
                input_tokens: 20,
                output_tokens: 10,
                total_tokens: 30,
                cached_tokens: 8,
                reasoning_tokens: 4,
            })
        );
    }

    #[test]
    fn responses_usage_and_null_details() {
        let json = br#"{"object":"response","usage":{"input_tokens":5,"output_tokens":7,
            "total_tokens":12,"input_tokens_details":{"cached_tokens":2},
            "output_tokens_details":null}}"#;
        let usage = Usage::from_json(json).unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (5, 7));
        assert_eq!((usage.cached_tokens, usage.reasoning_tokens), (2, 0));
    }

    #[test]
    fn no_usage() {
        assert_eq!(Usage::from_json(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(Usage::from_json(br#"{"usage":{}}"#), None);
        assert_eq!(Usage::from_json(br#"{"error":{"code":"429"}}"#), None);
        assert_eq!(Usage::from_json(b"[DONE]"), None);
    }

    #[test]
    fn the_model_beside_the_usage() {
        let chat = br#"{"model":"gpt-4o-2024-11-20","usage":{"total_tokens":1}}"#;
        let event = br#"{"type":"response.completed","response":{"model":"o4-mini","usage":{"total_tokens":1}}}"#;
        assert_eq!(
            read_document(chat).unwrap().model.as_deref(),
            Some("gpt-4o-2024-11-20")
        );
        assert_eq!(
            read_document(event).unwrap().model.as_deref(),
            Some("o4-mini")
        );
    }

    #[test]
    fn the_answers_id_with_or_without_usage() {
        let file = br#"{"id":"file-abc","object":"file","bytes":12}"#;
        let event = br#"{"type":"response.completed","response":{"id":"resp_1","usage":{"total_tokens":1}}}"#;
        let read = read_document(file).unwrap();
        assert_eq!((read.id.as_deref(), read.usage), (Some("file-abc"), None));
        assert_eq!(read_document(event).unwrap().id.as_deref(), Some("resp_1"));
        assert!(read_document(b"[1]").is_none());
    }

    #[test]
    fn missing_total_is_the_sum() {
        let usage = Usage::from_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(usage.map(|u| u.total_tokens), Some(7));
    }
}
