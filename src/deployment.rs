//! [`DeploymentLayer`]: names the deployment a request is for, for `Balance`.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use aoai_balance::Deployment;
use aoai_retry::ReplayBody;
use http::Request;
use serde::Deserialize;
use tower::{Layer, Service};

use crate::include_usage::replace_body;

/// Sets the [`Deployment`] request extension `Balance` reads for per-deployment health and
/// for the instances that offer a deployment: the `{name}` of `/deployments/{name}/...`, the
/// body's `model` on `/v1/...` routes, or a Realtime handshake's `?deployment=` (`?model=` on
/// `/v1/realtime`) (paths below the gateway's mount point). A request that
/// names none (`/models`, a file upload) gets no extension: any instance takes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeploymentLayer;

impl<S> Layer<S> for DeploymentLayer {
    type Service = SetDeployment<S>;

    fn layer(&self, inner: S) -> SetDeployment<S> {
        SetDeployment { inner }
    }
}

/// The service of [`DeploymentLayer`].
#[derive(Debug, Clone)]
pub struct SetDeployment<S> {
    inner: S,
}

impl<S> Service<Request<ReplayBody>> for SetDeployment<S>
where
    S: Service<Request<ReplayBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReplayBody>) -> S::Future {
        if request.extensions().get::<Deployment>().is_none()
            && let Some(deployment) = deployment_of(request.uri(), request.body())
        {
            request.extensions_mut().insert(Deployment::new(deployment));
        }
        self.inner.call(request)
    }
}

/// One instance's names for the deployments callers ask for (`gpt-4o` here is `gpt4o-ptu`
/// there): rewrites the `{name}` of `/deployments/{name}/...`, a v1 body's `model` and a
/// Realtime handshake's `?deployment=`/`?model=`, for a request whose [`Deployment`] it
/// renames. [`Gateway`](crate::Gateway) puts one in each
/// backend's stack ([`Backend::deployments`](crate::Backend::deployments)).
#[derive(Debug, Clone)]
pub struct MapDeployment<S> {
    inner: S,
    names: Option<Arc<HashMap<Arc<str>, Arc<str>>>>,
}

impl<S> MapDeployment<S> {
    /// Renames by `names` (the caller's name to the instance's); `None`: the same names.
    pub fn new(inner: S, names: Option<Arc<HashMap<Arc<str>, Arc<str>>>>) -> Self {
        Self { inner, names }
    }
}

impl<S> Service<Request<ReplayBody>> for MapDeployment<S>
where
    S: Service<Request<ReplayBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReplayBody>) -> S::Future {
        let renamed = self.names.as_ref().and_then(|names| {
            let asked = request.extensions().get::<Deployment>()?;
            names
                .get(asked.as_str())
                .filter(|own| ***own != *asked.as_str())
        });
        if let Some(own) = renamed {
            rename(&mut request, own);
        }
        self.inner.call(request)
    }
}

/// Puts the instance's name `own` where the request names its deployment.
fn rename(request: &mut Request<ReplayBody>, own: &str) {
    let uri = request.uri();
    let path = uri.path();
    if path.ends_with("/realtime") {
        let query = uri.query().unwrap_or_default();
        let renamed: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(
                form_urlencoded::parse(query.as_bytes()).map(|(name, value)| {
                    let value = match &*name {
                        REALTIME_DEPLOYMENT | REALTIME_MODEL => own.into(),
                        _ => value,
                    };
                    (name, value)
                }),
            )
            .finish();
        set_path_and_query(request, &format!("{path}?{renamed}"));
    } else if let Some(at) = path.find("/deployments/") {
        let start = at + "/deployments/".len();
        let end = path[start..].find('/').map_or(path.len(), |i| start + i);
        let mut renamed = format!("{}{own}{}", &path[..start], &path[end..]);
        if let Some(query) = uri.query() {
            renamed.push('?');
            renamed.push_str(query);
        }
        set_path_and_query(request, &renamed);
    } else if let Ok(mut body) =
        serde_json::from_slice::<serde_json::Value>(request.body().as_bytes())
        && let Some(model) = body.get_mut("model")
    {
        *model = serde_json::Value::from(own);
        if let Ok(bytes) = serde_json::to_vec(&body) {
            replace_body(request, bytes);
        }
    }
}

/// The request's URI with `path_and_query` in place of its own; left as it is when that is not
/// a valid one.
fn set_path_and_query(request: &mut Request<ReplayBody>, path_and_query: &str) {
    if let Ok(path_and_query) = path_and_query.parse() {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(path_and_query);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

/// Where a Realtime handshake names its deployment: `?deployment=` on Azure's route,
/// `?model=` on the v1 route.
const REALTIME_DEPLOYMENT: &str = "deployment";
const REALTIME_MODEL: &str = "model";

/// The deployment a request below the mount point names, if any.
fn deployment_of(uri: &http::Uri, body: &ReplayBody) -> Option<Arc<str>> {
    let path = uri.path().trim_start_matches("/openai");
    if path.ends_with("/realtime") {
        let query = uri.query().unwrap_or_default();
        return form_urlencoded::parse(query.as_bytes())
            .find(|(name, value)| {
                (name == REALTIME_DEPLOYMENT || name == REALTIME_MODEL) && !value.is_empty()
            })
            .map(|(_, value)| Arc::from(&*value));
    }
    if let Some(rest) = path.strip_prefix("/deployments/") {
        let name = rest.split('/').next().unwrap_or_default();
        return (!name.is_empty()).then(|| name.into());
    }
    if path.starts_with("/v1/") {
        /// The one field read of a v1 body; the rest is skipped without being kept.
        #[derive(Deserialize)]
        struct Model<'a> {
            #[serde(borrow)]
            model: Option<std::borrow::Cow<'a, str>>,
        }
        let model = serde_json::from_slice::<Model<'_>>(body.as_bytes())
            .ok()?
            .model?;
        return (!model.is_empty()).then(|| Arc::from(&*model));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn body(json: &'static str) -> ReplayBody {
        ReplayBody::new(Bytes::from_static(json.as_bytes()))
    }

    #[test]
    fn the_deployment_is_read_from_the_path_or_a_v1_body() {
        let none = ReplayBody::default();
        let of = |path: &str, body: &ReplayBody| deployment_of(&path.parse().unwrap(), body);
        assert_eq!(
            of("/deployments/gpt-4o/chat/completions", &none).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(
            of("/openai/deployments/tiny/embeddings", &none).as_deref(),
            Some("tiny")
        );
        assert_eq!(
            of(
                "/v1/chat/completions",
                &body(r#"{"messages":[],"model":"gpt-4o"}"#)
            )
            .as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(of("/v1/chat/completions", &body("not json")), None);
        assert_eq!(of("/v1/files", &none), None);
        assert_eq!(of("/models", &none), None);
        assert_eq!(of("/deployments//chat", &none), None);
        assert_eq!(
            of(
                "/realtime?api-version=2025-04-01-preview&deployment=rt",
                &none
            )
            .as_deref(),
            Some("rt")
        );
        assert_eq!(
            of("/v1/realtime?model=gpt-realtime", &none).as_deref(),
            Some("gpt-realtime")
        );
        assert_eq!(of("/realtime?api-version=1", &none), None);
    }

    #[test]
    fn a_realtime_handshake_is_renamed_in_its_query() {
        let mut request = Request::builder()
            .uri("/openai/realtime?api-version=2025-04-01-preview&deployment=rt&x=1")
            .body(ReplayBody::default())
            .unwrap();
        rename(&mut request, "rt-eastus");
        assert_eq!(
            request.uri().to_string(),
            "/openai/realtime?api-version=2025-04-01-preview&deployment=rt-eastus&x=1"
        );
    }
}
