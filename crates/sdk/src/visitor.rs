//! A website visitor's side of the website chat (`hafen.webchat.v1.VisitorService`).
//!
//! A visitor has no account: [`Visitor::start`] opens a visit and keeps the visitor token it
//! returns (or resumes the visit of a token kept from before, [`Visitor::with_token`]); every
//! call of [`Visitor::client`] then carries it as `authorization: Visitor <token>`, and the
//! `Origin` of the page the widget is embedded in when one was given ([`Visitor::with_origin`]).
//! Where the token is kept between runs is the application's choice ([`Visitor::token`]); it
//! is a credential to the visitor's data.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use hafen_proto::webchat::v1 as pb;
use hafen_proto::webchat::v1::visitor_service_client::VisitorServiceClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::{Config, Error, channel};

/// Adds the visitor token and the page's `Origin` to every request.
#[derive(Clone, Default)]
pub struct VisitorAuth {
    token: Arc<RwLock<Option<String>>>,
    origin: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for VisitorAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisitorAuth")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl VisitorAuth {
    fn token(&self) -> Option<String> {
        self.token.read().map(|t| t.clone()).unwrap_or_default()
    }

    fn set_token(&self, token: Option<String>) {
        if let Ok(mut slot) = self.token.write() {
            *slot = token;
        }
    }
}

impl tonic::service::Interceptor for VisitorAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(origin) = &self.origin {
            request.metadata_mut().insert("origin", origin.clone());
        }
        if let Some(token) = self.token()
            && let Ok(value) = AsciiMetadataValue::try_from(format!("Visitor {token}"))
        {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A typed client of `VisitorService` carrying the visitor's token.
pub type VisitorClient = VisitorServiceClient<InterceptedService<Channel, VisitorAuth>>;

/// One website visitor. Cheap to clone; clones share the token.
#[derive(Clone, Debug)]
pub struct Visitor {
    unary: Channel,
    streaming: Channel,
    auth: VisitorAuth,
}

impl Visitor {
    /// Prepares a channel to the webchat service of `config`; nothing connects before the
    /// first call.
    pub fn connect(config: &Config) -> Result<Self, Error> {
        let streaming = Config {
            // SubscribeVisit is long: it is not cut by the unary timeout.
            timeout: Duration::from_secs(24 * 3600),
            ..config.clone()
        };
        Ok(Self {
            unary: channel(&config.endpoints.webchat, config)?,
            streaming: channel(&config.endpoints.webchat, &streaming)?,
            auth: VisitorAuth::default(),
        })
    }

    /// Calls as a widget embedded in a page of `origin` (`https://host[:port]`), as a
    /// browser would; the widget's allowed origins decide.
    pub fn with_origin(mut self, origin: &str) -> Result<Self, Error> {
        let value = AsciiMetadataValue::try_from(origin)
            .map_err(|_| Error::Config("the origin is not a valid header value".into()))?;
        self.auth.origin = Some(value);
        Ok(self)
    }

    /// Continues with a visitor token kept from an earlier visit.
    pub fn with_token(self, token: &str) -> Self {
        self.auth.set_token(Some(token.trim().to_owned()));
        self
    }

    /// The visitor token, once a visit was started.
    pub fn token(&self) -> Option<String> {
        self.auth.token()
    }

    /// `hafen.webchat.v1.VisitorService` with the visitor's token and origin, for unary calls.
    pub fn client(&self) -> VisitorClient {
        VisitorServiceClient::with_interceptor(self.unary.clone(), self.auth.clone())
    }

    /// The same for `SubscribeVisit`, whose stream is not cut by the unary timeout.
    pub fn streaming_client(&self) -> VisitorClient {
        VisitorServiceClient::with_interceptor(self.streaming.clone(), self.auth.clone())
    }

    /// Starts a visit on `widget_id`, or resumes the one of the token kept (the same visit
    /// and token when it is still valid, else a new visit), and keeps the token returned.
    pub async fn start(&self, widget_id: &str) -> Result<pb::StartVisitResponse, Error> {
        self.start_with(widget_id, String::new(), String::new(), 0)
            .await
    }

    /// The same for a person the website vouches for: the site's id for them, when the site
    /// signed it (Unix seconds) and the signature, made on the site's server with the
    /// widget's identity secret (see `StartVisitRequest.identity_signature`). With a valid
    /// signature of the last 24 hours the visit is the person's on every device (`identified`
    /// in the answer); without, it is anonymous.
    pub async fn start_identified(
        &self,
        widget_id: &str,
        external_id: &str,
        issued_at: i64,
        signature: &str,
    ) -> Result<pb::StartVisitResponse, Error> {
        self.start_with(
            widget_id,
            external_id.to_owned(),
            signature.to_owned(),
            issued_at,
        )
        .await
    }

    async fn start_with(
        &self,
        widget_id: &str,
        external_id: String,
        identity_signature: String,
        identity_issued_at: i64,
    ) -> Result<pb::StartVisitResponse, Error> {
        let visit = self
            .client()
            .start_visit(pb::StartVisitRequest {
                widget_id: widget_id.to_owned(),
                visitor_token: self.token().unwrap_or_default(),
                external_id,
                identity_signature,
                identity_issued_at,
            })
            .await?
            .into_inner();
        self.auth.set_token(Some(visit.visitor_token.clone()));
        Ok(visit)
    }

    /// Deletes the visitor's data (GDPR Art. 17) and forgets the token, which is dead now.
    pub async fn delete_my_data(&self) -> Result<pb::DeleteMyDataResponse, Error> {
        let deleted = self
            .client()
            .delete_my_data(pb::DeleteMyDataRequest {})
            .await?
            .into_inner();
        self.auth.set_token(None);
        Ok(deleted)
    }
}
