//! The JSON documents the emulator sends, field for field and in the order Azure OpenAI sends
//! them (alphabetical for chat and completions, OpenAI's order for embeddings and Responses).
//!
//! Structs rather than `json!`: `serde_json` sorts `json!` objects unless its `preserve_order`
//! feature is on somewhere in the build, and Azure's order is not always alphabetical
//! (`prompt_index` comes before `content_filter_results`).

use serde::Serialize;

/// `{"filtered": false, "severity": "safe"}`.
#[derive(Debug, Serialize)]
pub(crate) struct Severity {
    filtered: bool,
    severity: &'static str,
}

const SAFE: Severity = Severity {
    filtered: false,
    severity: "safe",
};

/// `{"filtered": false, "detected": false}`.
#[derive(Debug, Serialize)]
pub(crate) struct Detection {
    filtered: bool,
    detected: bool,
}

/// The four harm categories Azure rates on every completion choice.
#[derive(Debug, Serialize)]
pub(crate) struct ContentFilterResults {
    hate: Severity,
    self_harm: Severity,
    sexual: Severity,
    violence: Severity,
}

pub(crate) const ALL_SAFE: ContentFilterResults = ContentFilterResults {
    hate: SAFE,
    self_harm: SAFE,
    sexual: SAFE,
    violence: SAFE,
};

/// The categories Azure rates on a prompt: the four harms and jailbreak detection.
#[derive(Debug, Serialize)]
pub(crate) struct PromptContentFilterResults {
    hate: Severity,
    jailbreak: Detection,
    self_harm: Severity,
    sexual: Severity,
    violence: Severity,
}

/// One entry of `prompt_filter_results`.
#[derive(Debug, Serialize)]
pub(crate) struct PromptFilterResult {
    prompt_index: u32,
    content_filter_results: PromptContentFilterResults,
}

/// `prompt_filter_results` for a prompt that passed every filter.
pub(crate) fn prompt_filter_results() -> [PromptFilterResult; 1] {
    [PromptFilterResult {
        prompt_index: 0,
        content_filter_results: PromptContentFilterResults {
            hate: SAFE,
            jailbreak: Detection {
                filtered: false,
                detected: false,
            },
            self_harm: SAFE,
            sexual: SAFE,
            violence: SAFE,
        },
    }]
}

/// A choice's `content_filter_results`: the ratings, or `{}` on role and finish chunks.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum ChoiceFilter {
    Rated(ContentFilterResults),
    Empty {},
}

// ---- chat completions ----

#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    pub(crate) choices: [ChatChoice<'a>; 1],
    pub(crate) created: u64,
    pub(crate) id: &'a str,
    pub(crate) model: &'a str,
    pub(crate) object: &'static str,
    pub(crate) prompt_filter_results: [PromptFilterResult; 1],
    pub(crate) system_fingerprint: &'static str,
    pub(crate) usage: ChatUsage,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice<'a> {
    pub(crate) content_filter_results: ContentFilterResults,
    pub(crate) finish_reason: &'static str,
    pub(crate) index: u32,
    pub(crate) logprobs: (),
    pub(crate) message: ChatMessage<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatMessage<'a> {
    pub(crate) annotations: [(); 0],
    pub(crate) content: &'a str,
    pub(crate) refusal: (),
    pub(crate) role: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatUsage {
    completion_tokens: u64,
    completion_tokens_details: CompletionTokensDetails,
    prompt_tokens: u64,
    prompt_tokens_details: PromptTokensDetails,
    total_tokens: u64,
}

impl ChatUsage {
    pub(crate) fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            completion_tokens,
            completion_tokens_details: CompletionTokensDetails::default(),
            prompt_tokens,
            prompt_tokens_details: PromptTokensDetails::default(),
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct CompletionTokensDetails {
    accepted_prediction_tokens: u64,
    audio_tokens: u64,
    reasoning_tokens: u64,
    rejected_prediction_tokens: u64,
}

#[derive(Debug, Default, Serialize)]
struct PromptTokensDetails {
    audio_tokens: u64,
    cached_tokens: u64,
}

/// The first event of every Azure stream: prompt filter results, everything else empty.
#[derive(Debug, Serialize)]
pub(crate) struct PromptFilterChunk {
    choices: [(); 0],
    created: u64,
    id: &'static str,
    model: &'static str,
    object: &'static str,
    prompt_filter_results: [PromptFilterResult; 1],
}

pub(crate) fn prompt_filter_chunk() -> PromptFilterChunk {
    PromptFilterChunk {
        choices: [],
        created: 0,
        id: "",
        model: "",
        object: "",
        prompt_filter_results: prompt_filter_results(),
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChunk<'a> {
    pub(crate) choices: Vec<ChunkChoice<'a>>,
    pub(crate) created: u64,
    pub(crate) id: &'a str,
    pub(crate) model: &'a str,
    pub(crate) object: &'static str,
    pub(crate) system_fingerprint: &'static str,
    /// Present only when the request asked for `stream_options.include_usage`: `null` on every
    /// chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Option<ChatUsage>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChunkChoice<'a> {
    pub(crate) content_filter_results: ChoiceFilter,
    pub(crate) delta: Delta<'a>,
    pub(crate) finish_reason: Option<&'static str>,
    pub(crate) index: u32,
    pub(crate) logprobs: (),
}

/// A chunk's `delta`: `{"content":"","refusal":null,"role":"assistant"}` on the role chunk,
/// `{"content":"..."}` on content chunks, `{}` on the finish chunk.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum Delta<'a> {
    Role {
        content: &'static str,
        refusal: (),
        role: &'static str,
    },
    Content {
        content: &'a str,
    },
    Empty {},
}

// ---- legacy completions ----

#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion<'a> {
    pub(crate) choices: [TextChoice<'a>; 1],
    pub(crate) created: u64,
    pub(crate) id: &'a str,
    pub(crate) model: &'a str,
    pub(crate) object: &'static str,
    pub(crate) prompt_filter_results: [PromptFilterResult; 1],
    pub(crate) usage: TextUsage,
}

#[derive(Debug, Serialize)]
pub(crate) struct TextChoice<'a> {
    pub(crate) content_filter_results: ChoiceFilter,
    pub(crate) finish_reason: Option<&'static str>,
    pub(crate) index: u32,
    pub(crate) logprobs: (),
    pub(crate) text: &'a str,
}

#[derive(Debug, Serialize)]
pub(crate) struct TextUsage {
    completion_tokens: u64,
    prompt_tokens: u64,
    total_tokens: u64,
}

impl TextUsage {
    pub(crate) fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            completion_tokens,
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A legacy completions stream chunk (no `prompt_filter_results`, no usage).
#[derive(Debug, Serialize)]
pub(crate) struct TextChunk<'a> {
    pub(crate) choices: [TextChoice<'a>; 1],
    pub(crate) created: u64,
    pub(crate) id: &'a str,
    pub(crate) model: &'a str,
    pub(crate) object: &'static str,
}

// ---- embeddings ----

#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingList<'a> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<Embedding>,
    pub(crate) model: &'a str,
    pub(crate) usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
pub(crate) struct Embedding {
    pub(crate) object: &'static str,
    pub(crate) index: usize,
    pub(crate) embedding: Vector,
}

/// `encoding_format: "float"` gives numbers, `"base64"` the little-endian `f32` bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingUsage {
    pub(crate) prompt_tokens: u64,
    pub(crate) total_tokens: u64,
}

// ---- Responses API ----

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Response<'a> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created_at: u64,
    pub(crate) status: &'static str,
    pub(crate) error: (),
    pub(crate) incomplete_details: Option<IncompleteDetails>,
    pub(crate) instructions: (),
    pub(crate) max_output_tokens: Option<u64>,
    pub(crate) model: &'a str,
    pub(crate) output: Vec<OutputMessage<'a>>,
    pub(crate) parallel_tool_calls: bool,
    pub(crate) previous_response_id: Option<&'a str>,
    /// The conversation the response continued, when the request named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) conversation: Option<ConversationRef<'a>>,
    pub(crate) reasoning: Reasoning,
    pub(crate) store: bool,
    pub(crate) temperature: f32,
    pub(crate) text: TextConfig,
    pub(crate) tool_choice: &'static str,
    pub(crate) tools: [(); 0],
    pub(crate) top_p: f32,
    pub(crate) truncation: &'static str,
    pub(crate) usage: Option<ResponseUsage>,
    pub(crate) user: (),
    pub(crate) metadata: Empty,
}

/// `{"id": "conv_..."}`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ConversationRef<'a> {
    pub(crate) id: &'a str,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Empty {}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct IncompleteDetails {
    pub(crate) reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Reasoning {
    pub(crate) effort: (),
    pub(crate) summary: (),
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TextConfig {
    pub(crate) format: TextFormat,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TextFormat {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct OutputMessage<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) id: &'a str,
    pub(crate) status: &'static str,
    pub(crate) role: &'static str,
    pub(crate) content: Vec<OutputText<'a>>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct OutputText<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) annotations: [(); 0],
    pub(crate) text: &'a str,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ResponseUsage {
    input_tokens: u64,
    input_tokens_details: InputTokensDetails,
    output_tokens: u64,
    output_tokens_details: OutputTokensDetails,
    total_tokens: u64,
}

impl ResponseUsage {
    pub(crate) fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            input_tokens_details: InputTokensDetails { cached_tokens: 0 },
            output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
            },
            total_tokens: input_tokens + output_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct InputTokensDetails {
    cached_tokens: u64,
}

#[derive(Debug, Clone, Serialize)]
struct OutputTokensDetails {
    reasoning_tokens: u64,
}

/// One Responses API stream event; `type` first, as OpenAI sends it.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub(crate) enum ResponseEvent<'a> {
    #[serde(rename = "response.created")]
    Created {
        sequence_number: u64,
        response: Response<'a>,
    },
    #[serde(rename = "response.in_progress")]
    InProgress {
        sequence_number: u64,
        response: Response<'a>,
    },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded {
        sequence_number: u64,
        output_index: u32,
        item: OutputMessage<'a>,
    },
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        sequence_number: u64,
        item_id: &'a str,
        output_index: u32,
        content_index: u32,
        part: OutputText<'a>,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        sequence_number: u64,
        item_id: &'a str,
        output_index: u32,
        content_index: u32,
        delta: &'a str,
    },
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        sequence_number: u64,
        item_id: &'a str,
        output_index: u32,
        content_index: u32,
        text: &'a str,
    },
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        sequence_number: u64,
        item_id: &'a str,
        output_index: u32,
        content_index: u32,
        part: OutputText<'a>,
    },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone {
        sequence_number: u64,
        output_index: u32,
        item: OutputMessage<'a>,
    },
    #[serde(rename = "response.completed")]
    Completed {
        sequence_number: u64,
        response: Response<'a>,
    },
    #[serde(rename = "response.incomplete")]
    Incomplete {
        sequence_number: u64,
        response: Response<'a>,
    },
}

impl ResponseEvent<'_> {
    /// The SSE `event:` name, the same as the `type` field.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "response.created",
            Self::InProgress { .. } => "response.in_progress",
            Self::OutputItemAdded { .. } => "response.output_item.added",
            Self::ContentPartAdded { .. } => "response.content_part.added",
            Self::OutputTextDelta { .. } => "response.output_text.delta",
            Self::OutputTextDone { .. } => "response.output_text.done",
            Self::ContentPartDone { .. } => "response.content_part.done",
            Self::OutputItemDone { .. } => "response.output_item.done",
            Self::Completed { .. } => "response.completed",
            Self::Incomplete { .. } => "response.incomplete",
        }
    }
}

// ---- errors ----

/// `{"error": ...}`.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody<E> {
    pub(crate) error: E,
}

/// Azure's own error shape: `{"code": "...", "message": "..."}`.
#[derive(Debug, Serialize)]
pub(crate) struct AzureError<'a> {
    pub(crate) code: &'a str,
    pub(crate) message: &'a str,
}

/// The error the model service behind Azure sends for a request it cannot take.
#[derive(Debug, Serialize)]
pub(crate) struct InvalidRequest<'a> {
    pub(crate) message: &'a str,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) param: Option<&'a str>,
    pub(crate) code: Option<&'a str>,
}

/// Azure's content-filter rejection.
#[derive(Debug, Serialize)]
pub(crate) struct ContentFilterError {
    message: &'static str,
    #[serde(rename = "type")]
    kind: (),
    param: &'static str,
    code: &'static str,
    status: u16,
    innererror: InnerError,
}

#[derive(Debug, Serialize)]
struct InnerError {
    code: &'static str,
    content_filter_result: PromptContentFilterResults,
}

pub(crate) fn content_filter_error() -> ContentFilterError {
    ContentFilterError {
        message: "The response was filtered due to the prompt triggering Azure OpenAI's content \
                  management policy. Please modify your prompt and retry. To learn more about our \
                  content filtering policies please read our documentation: \
                  https://go.microsoft.com/fwlink/?linkid=2198766",
        kind: (),
        param: "prompt",
        code: "content_filter",
        status: 400,
        innererror: InnerError {
            code: "ResponsibleAIPolicyViolation",
            content_filter_result: PromptContentFilterResults {
                hate: SAFE,
                jailbreak: Detection {
                    filtered: false,
                    detected: false,
                },
                self_harm: SAFE,
                sexual: SAFE,
                violence: Severity {
                    filtered: true,
                    severity: "medium",
                },
            },
        },
    }
}
