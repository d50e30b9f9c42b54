//! The gRPC adapters of `hafen.webchat.v1`: WidgetService (tenants' admins, access tokens)
//! and VisitorService (visitors, visitor tokens). Each RPC runs in a span with ids only: no
//! token, origin, field value or address.

use std::sync::Arc;

use hafen_authn::user;
use hafen_platform::paging;
use hafen_proto::webchat::v1 as pb;
use hafen_proto::webchat::v1::visitor_service_server::VisitorService;
use hafen_proto::webchat::v1::widget_service_server::WidgetService;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::Service;
use crate::error::Error;
use crate::limits::Subject;
use crate::visits::Visitor;
use crate::widgets::parse_id;

/// WidgetService.
#[derive(Clone)]
pub struct WidgetApi {
    service: Arc<Service>,
}

impl WidgetApi {
    pub(crate) fn new(service: Arc<Service>) -> Self {
        Self { service }
    }
}

impl std::fmt::Debug for WidgetApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WidgetApi").finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl WidgetService for WidgetApi {
    #[instrument(name = "CreateWidget", skip_all)]
    async fn create_widget(
        &self,
        request: Request<pb::CreateWidgetRequest>,
    ) -> Result<Response<pb::Widget>, Status> {
        let caller = user(&request)?.clone();
        let widget = self
            .service
            .create_widget(&caller, request.into_inner())
            .await?;
        Ok(Response::new(widget))
    }

    #[instrument(name = "UpdateWidget", skip_all)]
    async fn update_widget(
        &self,
        request: Request<pb::UpdateWidgetRequest>,
    ) -> Result<Response<pb::Widget>, Status> {
        let caller = user(&request)?.clone();
        let widget = self
            .service
            .update_widget(&caller, request.into_inner())
            .await?;
        Ok(Response::new(widget))
    }

    #[instrument(name = "PublishConsentText", skip_all)]
    async fn publish_consent_text(
        &self,
        request: Request<pb::PublishConsentTextRequest>,
    ) -> Result<Response<pb::ConsentText>, Status> {
        let caller = user(&request)?.clone();
        let text = self
            .service
            .publish_consent_text(&caller, request.into_inner())
            .await?;
        Ok(Response::new(text))
    }

    #[instrument(name = "RotateIdentitySecret", skip_all)]
    async fn rotate_identity_secret(
        &self,
        request: Request<pb::RotateIdentitySecretRequest>,
    ) -> Result<Response<pb::RotateIdentitySecretResponse>, Status> {
        let caller = user(&request)?.clone();
        let rotated = self
            .service
            .rotate_identity_secret(&caller, request.into_inner())
            .await?;
        Ok(Response::new(rotated))
    }

    #[instrument(name = "GetWidget", skip_all)]
    async fn get_widget(
        &self,
        request: Request<pb::GetWidgetRequest>,
    ) -> Result<Response<pb::Widget>, Status> {
        let caller = user(&request)?.clone();
        let widget = self
            .service
            .get_widget(&caller, request.into_inner())
            .await?;
        Ok(Response::new(widget))
    }

    #[instrument(name = "GetVisitorFields", skip_all)]
    async fn get_visitor_fields(
        &self,
        request: Request<pb::GetVisitorFieldsRequest>,
    ) -> Result<Response<pb::GetVisitorFieldsResponse>, Status> {
        let caller = user(&request)?.clone();
        let fields = self
            .service
            .visitor_fields(&caller, request.into_inner())
            .await?;
        Ok(Response::new(fields))
    }

    #[instrument(name = "ListWidgets", skip_all)]
    async fn list_widgets(
        &self,
        request: Request<pb::ListWidgetsRequest>,
    ) -> Result<Response<pb::ListWidgetsResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let limit = paging::page_size(r.page_size)?;
        let filter = paging::filter(r.page_size, &[]);
        let after = match paging::decode(&r.page_token, 2)? {
            Some(parts) => {
                paging::same_filter(&parts[1], &filter)?;
                Some(Uuid::try_parse(&parts[0]).map_err(|_| {
                    Error::invalid("page_token", "not a token from a previous page")
                })?)
            }
            None => None,
        };
        let (widgets, next) = self.service.list_widgets(&caller, after, limit).await?;
        Ok(Response::new(pb::ListWidgetsResponse {
            widgets,
            next_page_token: next
                .map(|id| paging::encode(&[&id.to_string(), &filter]))
                .unwrap_or_default(),
        }))
    }
}

/// VisitorService.
#[derive(Clone)]
pub struct VisitorApi {
    service: Arc<Service>,
}

impl VisitorApi {
    pub(crate) fn new(service: Arc<Service>) -> Self {
        Self { service }
    }

    /// The visitor whose token the call carries (`authorization: Visitor <token>`), on a
    /// widget that serves visitors from the call's origin.
    async fn visitor<T>(&self, request: &Request<T>) -> Result<Visitor, Error> {
        self.authenticated(request, true).await
    }

    /// SendVisitorMessage, or LeaveMessage (`offline`): the token is checked in the send's
    /// transaction.
    async fn send(
        &self,
        request: Request<pb::SendVisitorMessageRequest>,
        offline: bool,
    ) -> Result<Response<pb::VisitMessage>, Status> {
        let token = visitor_token(&request)?;
        let sent = self
            .service
            .send_with_token(token, origin(&request), request.get_ref().clone(), offline)
            .await;
        let (tenant, visit, message) = match sent {
            Ok(sent) => sent,
            Err(err @ Error::Unauthenticated(_)) => {
                self.service
                    .limits
                    .count_lookup(&request)
                    .map_err(Error::RateLimited)?;
                return Err(err.into());
            }
            Err(err) => return Err(err.into()),
        };
        let span = tracing::Span::current();
        span.record("tenant_id", tracing::field::display(tenant));
        span.record("visit_id", tracing::field::display(visit));
        Ok(Response::new(message))
    }

    /// The visitor of the call, for their data rights: whatever the widget's state.
    async fn visitor_with_rights<T>(&self, request: &Request<T>) -> Result<Visitor, Error> {
        self.authenticated(request, false).await
    }

    async fn authenticated<T>(&self, request: &Request<T>, live: bool) -> Result<Visitor, Error> {
        let token = visitor_token(request)?;
        let found = if live {
            self.service.visitor(token, origin(request)).await
        } else {
            self.service.visitor_with_rights(token).await
        };
        let visitor = match found {
            Ok(visitor) => visitor,
            // Tokens that are not valid count against the address: guessing is slowed down.
            Err(err @ Error::Unauthenticated(_)) => {
                self.service
                    .limits
                    .count_lookup(request)
                    .map_err(Error::RateLimited)?;
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        self.service
            .limits
            .count(Subject::Visitor(visitor.visit.id))
            .map_err(Error::RateLimited)?;
        let span = tracing::Span::current();
        span.record("tenant_id", tracing::field::display(visitor.tenant));
        span.record("visit_id", tracing::field::display(visitor.visit.id));
        Ok(visitor)
    }
}

impl std::fmt::Debug for VisitorApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisitorApi").finish_non_exhaustive()
    }
}

/// The visitor token a call carries (`authorization: Visitor <token>`).
fn visitor_token<T>(request: &Request<T>) -> Result<&str, Error> {
    request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Visitor "))
        .ok_or(Error::Unauthenticated(
            "a visitor token is required: authorization: Visitor <token>",
        ))
}

/// The `Origin` a browser sent, if any.
fn origin<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("origin")
        .map(|value| value.to_str().unwrap_or("invalid"))
}

#[tonic::async_trait]
impl VisitorService for VisitorApi {
    #[instrument(name = "GetWidgetConfig", skip_all)]
    async fn get_widget_config(
        &self,
        request: Request<pb::GetWidgetConfigRequest>,
    ) -> Result<Response<pb::WidgetConfig>, Status> {
        let widget = parse_id("widget_id", &request.get_ref().widget_id)?;
        let languages = &request.get_ref().languages;
        crate::visits::check_languages(languages)?;
        self.service
            .limits
            .count_lookup(&request)
            .map_err(Error::RateLimited)?;
        let config = self
            .service
            .widget_config(widget, origin(&request), languages)
            .await?;
        Ok(Response::new(config))
    }

    #[instrument(name = "StartVisit", skip_all)]
    async fn start_visit(
        &self,
        request: Request<pb::StartVisitRequest>,
    ) -> Result<Response<pb::StartVisitResponse>, Status> {
        let widget = parse_id("widget_id", &request.get_ref().widget_id)?;
        let limits = &self.service.limits;
        if let Some(address) = limits.address(&request) {
            limits
                .count(Subject::Address(address))
                .map_err(Error::RateLimited)?;
        }
        limits
            .count(Subject::Widget(widget))
            .map_err(Error::RateLimited)?;
        let started = self
            .service
            .start_visit(widget, request.get_ref(), origin(&request))
            .await?;
        Ok(Response::new(started))
    }

    #[instrument(name = "GiveConsent", skip_all, fields(tenant_id, visit_id))]
    async fn give_consent(
        &self,
        request: Request<pb::GiveConsentRequest>,
    ) -> Result<Response<pb::ConsentRecord>, Status> {
        let visitor = self.visitor(&request).await?;
        let record = self
            .service
            .give_consent(&visitor, request.into_inner())
            .await?;
        Ok(Response::new(record))
    }

    #[instrument(name = "SubmitFields", skip_all, fields(tenant_id, visit_id))]
    async fn submit_fields(
        &self,
        request: Request<pb::SubmitFieldsRequest>,
    ) -> Result<Response<pb::SubmitFieldsResponse>, Status> {
        let visitor = self.visitor(&request).await?;
        let stored = self
            .service
            .submit_fields(&visitor, request.into_inner())
            .await?;
        Ok(Response::new(stored))
    }

    #[instrument(name = "GetMyData", skip_all, fields(tenant_id, visit_id))]
    async fn get_my_data(
        &self,
        request: Request<pb::GetMyDataRequest>,
    ) -> Result<Response<pb::MyData>, Status> {
        let visitor = self.visitor_with_rights(&request).await?;
        Ok(Response::new(self.service.my_data(&visitor).await?))
    }

    #[instrument(name = "CorrectMyData", skip_all, fields(tenant_id, visit_id))]
    async fn correct_my_data(
        &self,
        request: Request<pb::CorrectMyDataRequest>,
    ) -> Result<Response<pb::MyData>, Status> {
        let visitor = self.visitor_with_rights(&request).await?;
        let corrected = self
            .service
            .correct_my_data(&visitor, request.into_inner())
            .await?;
        Ok(Response::new(corrected))
    }

    #[instrument(name = "ExportMyData", skip_all, fields(tenant_id, visit_id))]
    async fn export_my_data(
        &self,
        request: Request<pb::ExportMyDataRequest>,
    ) -> Result<Response<pb::ExportMyDataResponse>, Status> {
        let visitor = self.visitor_with_rights(&request).await?;
        Ok(Response::new(self.service.export_my_data(&visitor).await?))
    }

    #[instrument(name = "DeleteMyData", skip_all, fields(tenant_id, visit_id))]
    async fn delete_my_data(
        &self,
        request: Request<pb::DeleteMyDataRequest>,
    ) -> Result<Response<pb::DeleteMyDataResponse>, Status> {
        let visitor = self.visitor_with_rights(&request).await?;
        Ok(Response::new(self.service.delete_my_data(&visitor).await?))
    }

    #[instrument(name = "SendVisitorMessage", skip_all, fields(tenant_id, visit_id))]
    async fn send_visitor_message(
        &self,
        request: Request<pb::SendVisitorMessageRequest>,
    ) -> Result<Response<pb::VisitMessage>, Status> {
        self.send(request, false).await
    }

    #[instrument(name = "LeaveMessage", skip_all, fields(tenant_id, visit_id))]
    async fn leave_message(
        &self,
        request: Request<pb::SendVisitorMessageRequest>,
    ) -> Result<Response<pb::VisitMessage>, Status> {
        self.send(request, true).await
    }

    type SubscribeVisitStream = BoxStream<pb::SubscribeVisitResponse>;

    #[instrument(name = "SubscribeVisit", skip_all, fields(tenant_id, visit_id))]
    async fn subscribe_visit(
        &self,
        request: Request<pb::SubscribeVisitRequest>,
    ) -> Result<Response<Self::SubscribeVisitStream>, Status> {
        let visitor = self.visitor(&request).await?;
        let after = match request.get_ref().after.as_str() {
            "" => 0,
            after => after
                .parse::<i64>()
                .ok()
                .filter(|cursor| *cursor >= 0)
                .ok_or_else(|| Error::invalid("after", "not a cursor from this stream"))?,
        };
        let receiver = Arc::clone(&self.service)
            .subscribe_visit(visitor, after)
            .await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver)
            .map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(name = "EditVisitorMessage", skip_all, fields(tenant_id, visit_id))]
    async fn edit_visitor_message(
        &self,
        request: Request<pb::EditVisitorMessageRequest>,
    ) -> Result<Response<pb::VisitMessage>, Status> {
        let visitor = self.visitor(&request).await?;
        let edited = self
            .service
            .edit_visitor_message(&visitor, request.into_inner())
            .await?;
        Ok(Response::new(edited))
    }

    #[instrument(name = "DeleteVisitorMessage", skip_all, fields(tenant_id, visit_id))]
    async fn delete_visitor_message(
        &self,
        request: Request<pb::DeleteVisitorMessageRequest>,
    ) -> Result<Response<pb::VisitMessage>, Status> {
        let visitor = self.visitor(&request).await?;
        let deleted = self
            .service
            .delete_visitor_message(&visitor, request.into_inner())
            .await?;
        Ok(Response::new(deleted))
    }
}
