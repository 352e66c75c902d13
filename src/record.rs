//! [`RequestRecord`]: what the gateway learns about one request, reported when its answer ends.

use std::sync::Arc;
use std::time::Instant;

use aoai_balance::{Deployment, ServedBy};
use aoai_usage::{Admission, UsageCallback, UsageReport};
use http::{Extensions, Method, Response};

use crate::metrics::{Finished, GatewayMetrics};
use crate::pinning::ObjectMap;

/// One request's log line, metrics and token-limit charge, completed by its answer: the head
/// (status, instance, deployment) when it arrives, the usage when its body ends (or fails, or
/// the caller goes away).
#[derive(Debug)]
pub(crate) struct RequestRecord {
    started: Instant,
    /// What the log line shows; `None` while the line is off.
    log: Option<(Method, Box<str>)>,
    operation: Option<&'static str>,
    caller: Option<Arc<str>>,
    metrics: Option<GatewayMetrics>,
    admission: Option<Admission>,
    /// Where the id of the object the answer creates is learnt.
    objects: Option<ObjectMap>,
    status: u16,
    instance: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    stream: bool,
}

impl RequestRecord {
    /// Whether the log line is on: asked once per request, before deciding whether a record
    /// is needed at all, and passed to [`new`](Self::new).
    pub(crate) fn logging() -> bool {
        tracing::enabled!(tracing::Level::INFO)
    }

    pub(crate) fn new(
        method: &Method,
        path: &str,
        log: bool,
        caller: Option<Arc<str>>,
        metrics: Option<GatewayMetrics>,
    ) -> Self {
        Self {
            started: Instant::now(),
            log: log.then(|| (method.clone(), path.into())),
            operation: operation(method, path),
            caller,
            metrics,
            admission: None,
            objects: None,
            status: 0,
            instance: None,
            deployment: None,
            stream: false,
        }
    }

    /// Teaches `objects` where the object the answer creates lives.
    pub(crate) fn learn_into(&mut self, objects: ObjectMap) {
        self.objects = Some(objects);
    }

    /// The caller's token-limit admission, settled with the answer's usage.
    pub(crate) fn set_admission(&mut self, admission: Admission) {
        self.admission = Some(admission);
    }
}

impl UsageCallback for RequestRecord {
    fn on_response<B>(&mut self, response: &Response<B>) {
        self.status = response.status().as_u16();
        (self.instance, self.deployment) = instance_and_deployment(response.extensions());
        self.stream = aoai_usage::is_event_stream(response.headers());
        if self.stream
            && let Some(metrics) = &self.metrics
        {
            metrics.stream_started();
        }
    }

    fn on_report(self, report: UsageReport) {
        if let Some(admission) = self.admission {
            admission.settle(report.usage.as_ref());
        }
        if let (Some(objects), Some(id), Some(instance)) =
            (&self.objects, &report.id, &self.instance)
            && (200..300).contains(&self.status)
        {
            objects.learn(id, instance);
        }
        let duration = self.started.elapsed();
        let time_to_first_token = report
            .first_data_at
            .filter(|_| self.stream)
            .map(|at| at.saturating_duration_since(self.started));
        if let Some((method, path)) = &self.log {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
            tracing::info!(
                method = %method,
                path = &**path,
                caller = self.caller.as_deref().unwrap_or("-"),
                backend = self.instance.as_deref().unwrap_or("-"),
                deployment = self.deployment.as_deref().unwrap_or("-"),
                status = self.status,
                prompt_tokens = report.usage.map(|u| u.input_tokens),
                completion_tokens = report.usage.map(|u| u.output_tokens),
                latency_ms = ms(duration),
                first_token_ms = time_to_first_token.map(ms),
                complete = report.complete,
                "request"
            );
        }
        if let Some(metrics) = self.metrics {
            if self.stream {
                metrics.stream_ended();
            }
            metrics.record(Finished {
                operation: self.operation,
                caller: self.caller,
                instance: self.instance,
                deployment: self.deployment,
                response_model: report.model.map(Arc::from),
                status: self.status,
                usage: report.usage,
                duration,
                time_to_first_token,
            });
        }
    }
}

/// The instance that answered (its [`ServedBy`]) and the deployment it was asked for (its
/// [`Deployment`]), from an answer's extensions.
pub(crate) fn instance_and_deployment(
    extensions: &Extensions,
) -> (Option<Arc<str>>, Option<Arc<str>>) {
    (
        extensions
            .get::<ServedBy>()
            .map(|served_by| served_by.shared_name().clone()),
        extensions
            .get::<Deployment>()
            .map(|deployment| deployment.name().clone()),
    )
}

/// `gen_ai.operation.name` of a request below the mount point, for the operations that
/// report token usage.
fn operation(method: &Method, path: &str) -> Option<&'static str> {
    if method != Method::POST {
        return None;
    }
    if path.ends_with("/chat/completions") || path.ends_with("/responses") {
        Some("chat")
    } else if path.ends_with("/completions") {
        Some("text_completion")
    } else if path.ends_with("/embeddings") {
        Some("embeddings")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_follow_the_genai_conventions() {
        let post = Method::POST;
        assert_eq!(
            operation(&post, "/deployments/gpt-4o/chat/completions"),
            Some("chat")
        );
        assert_eq!(operation(&post, "/v1/responses"), Some("chat"));
        assert_eq!(
            operation(&post, "/deployments/davinci/completions"),
            Some("text_completion")
        );
        assert_eq!(
            operation(&post, "/deployments/ada/embeddings"),
            Some("embeddings")
        );
        assert_eq!(operation(&post, "/v1/files"), None);
        assert_eq!(operation(&Method::GET, "/v1/responses"), None);
    }
}
