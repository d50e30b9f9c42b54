//! The tower layer that authenticates every call of a service and puts the [`Caller`] into
//! the request's extensions.
//!
//! A call without an `authorization` header passes through without a caller (handlers that
//! need one answer UNAUTHENTICATED). A call with a header that does not authenticate is
//! answered here, with the reason. Some methods authenticate themselves (Login and Refresh by
//! their fields, ConfirmWipe with its revoked token, internal calls by certificate): their
//! paths are exempt.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::Authenticator;

/// Wraps services with authentication.
#[derive(Debug, Clone)]
pub struct AuthnLayer {
    authenticator: Authenticator,
    exempt: &'static [&'static str],
}

impl AuthnLayer {
    /// Authenticates with `authenticator`; methods in `exempt` (e.g. `Login` for
    /// `/hafen.auth.v1.AuthService/Login`) are passed through untouched.
    pub fn new(authenticator: Authenticator, exempt: &'static [&'static str]) -> Self {
        Self {
            authenticator,
            exempt,
        }
    }

    /// `service`, authenticated.
    pub fn wrap<S>(&self, service: S) -> AuthnService<S> {
        AuthnService {
            inner: service,
            layer: self.clone(),
        }
    }
}

/// A service wrapped by [`AuthnLayer`].
#[derive(Debug, Clone)]
pub struct AuthnService<S> {
    inner: S,
    layer: AuthnLayer,
}

impl<S: NamedService> NamedService for AuthnService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for AuthnService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone serves the next call; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let method = request.uri().path().rsplit('/').next().unwrap_or_default();
            let exempt = layer.exempt.contains(&method);
            if !exempt && request.headers().contains_key("authorization") {
                let metadata = MetadataMap::from_headers(request.headers().clone());
                match layer.authenticator.authenticate(&metadata).await {
                    Ok(caller) => {
                        request.extensions_mut().insert(caller);
                    }
                    Err(status) => return Ok(status.into_http()),
                }
            }
            inner.call(request).await
        })
    }
}
