//! The two layers every typed client goes through: [`Bearer`] adds the session's access
//! token (and refuses calls once the device was wiped); [`WipeWatch`] looks at each answer's
//! status and starts the wipe when the server says `DEVICE_WIPED`.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::metadata::MetadataValue;

use crate::session::State;

/// Adds `authorization: Bearer <access token>` to every request.
#[derive(Clone, Debug)]
pub struct Bearer {
    state: Arc<State>,
}

impl Bearer {
    pub(crate) fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if self.state.is_wiped() {
            return Err(tonic::Status::unauthenticated(
                "this device was wiped; log in again with a new chat code",
            ));
        }
        if let Some(token) = self.state.access_token()
            && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
        {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Watches answers for the wipe signal.
#[derive(Clone, Debug)]
pub struct WipeWatch<S> {
    inner: S,
    state: Arc<State>,
}

impl<S> WipeWatch<S> {
    pub(crate) fn new(inner: S, state: Arc<State>) -> Self {
        Self { inner, state }
    }
}

impl<S, B, RB> Service<http::Request<B>> for WipeWatch<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        let state = self.state.clone();
        Box::pin(async move {
            let response = answer.await?;
            // Refusals come as trailers-only answers: the status is in the headers.
            if let Some(status) = tonic::Status::from_header_map(response.headers()) {
                state.inspect(&status).await;
            }
            Ok(response)
        })
    }
}
