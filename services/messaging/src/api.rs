//! The gRPC adapter of `hafen.messaging.v1.MessagingService`: parse requests into domain
//! types, call [`Messaging`], convert the results.

use hafen_authn::{Authenticator, user};
use hafen_platform::paging::{self, TimeKey};
use hafen_platform::status::parse_uuid;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::messaging::v1::messaging_service_server::MessagingService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{Messaging, NewConversation};
use crate::error::Error;
use crate::rows::kind;

/// The MessagingService implementation.
#[derive(Debug, Clone)]
pub struct MessagingApi {
    messaging: Messaging,
    authenticator: Authenticator,
}

impl MessagingApi {
    /// The adapter over `messaging`; streams end through `authenticator`'s revocations.
    pub fn new(messaging: Messaging, authenticator: Authenticator) -> Self {
        Self {
            messaging,
            authenticator,
        }
    }
}

fn parse_ids(field: &str, values: &[String]) -> Result<Vec<Uuid>, Error> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Uuid::try_parse(v)
                .map_err(|_| Error::invalid(format!("{field}[{i}]"), "must be a UUID"))
        })
        .collect()
}

#[tonic::async_trait]
impl MessagingService for MessagingApi {
    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let kind = match pb::ConversationKind::try_from(r.kind) {
            Ok(pb::ConversationKind::Direct) => kind::DIRECT,
            Ok(pb::ConversationKind::Group) => kind::GROUP,
            Ok(pb::ConversationKind::Channel) => kind::CHANNEL,
            Ok(pb::ConversationKind::Webchat) => kind::WEBCHAT,
            _ => return Err(Error::invalid("kind", "DIRECT, GROUP, CHANNEL or WEBCHAT").into()),
        };
        let title = r.title.trim().to_owned();
        if title.chars().count() > 200 || title.chars().any(char::is_control) {
            return Err(
                Error::invalid("title", "at most 200 characters, no control characters").into(),
            );
        }
        if matches!(kind, kind::GROUP | kind::CHANNEL) && title.is_empty() {
            return Err(Error::invalid("title", "groups and channels need a title").into());
        }
        if kind == kind::DIRECT && !title.is_empty() {
            return Err(Error::invalid("title", "a direct conversation has no title").into());
        }
        let request_id = if r.request_id.is_empty() {
            None
        } else {
            Some(parse_uuid("request_id", &r.request_id)?)
        };
        let members = parse_ids("member_user_ids", &r.member_user_ids)?;
        let created = self
            .messaging
            .create_conversation(
                &caller,
                NewConversation {
                    request_id,
                    kind,
                    title,
                    members,
                },
            )
            .await?;
        Ok(Response::new(created.to_proto()))
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let limit = paging::page_size(r.page_size)?;
        let filter = paging::filter(r.page_size, &[]);
        let after = TimeKey::decode(&r.page_token, &filter)?.map(|k| (k.at, k.id));
        let (views, more) = self
            .messaging
            .list_conversations(&caller, after, limit)
            .await?;
        let next_page_token = match (more, views.last()) {
            (true, Some(last)) => TimeKey {
                at: last.row.created_at,
                id: last.row.id,
            }
            .encode(&filter),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListConversationsResponse {
            conversations: views.iter().map(|v| v.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn add_members(
        &self,
        request: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::AddMembersResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        let users = parse_ids("user_ids", &r.user_ids)?;
        let (view, added) = self
            .messaging
            .add_members(&caller, conversation, users)
            .await?;
        Ok(Response::new(pb::AddMembersResponse {
            conversation: Some(view.to_proto()),
            added_user_ids: added.iter().map(Uuid::to_string).collect(),
        }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        let target = parse_uuid("user_id", &r.user_id)?;
        let (view, removed) = self
            .messaging
            .remove_member(&caller, conversation, target)
            .await?;
        Ok(Response::new(pb::RemoveMemberResponse {
            conversation: Some(view.to_proto()),
            removed,
        }))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let request_id = parse_uuid("request_id", &r.request_id)?;
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        let message = self
            .messaging
            .send(&caller, conversation, request_id, &r.body)
            .await?;
        Ok(Response::new(message.to_proto()))
    }

    async fn edit_message(
        &self,
        request: Request<pb::EditMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let message = parse_uuid("message_id", &r.message_id)?;
        Ok(Response::new(
            self.messaging
                .edit(&caller, message, &r.body)
                .await?
                .to_proto(),
        ))
    }

    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = user(&request)?.clone();
        let message = parse_uuid("message_id", &request.into_inner().message_id)?;
        Ok(Response::new(
            self.messaging.delete(&caller, message).await?.to_proto(),
        ))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        let forward = match pb::Direction::try_from(r.direction) {
            Ok(pb::Direction::Forward | pb::Direction::Unspecified) => true,
            Ok(pb::Direction::Backward) => false,
            Err(_) => return Err(Error::invalid("direction", "FORWARD or BACKWARD").into()),
        };
        let filter = paging::filter(
            r.page_size,
            &[&r.conversation_id, &u8::from(forward).to_string()],
        );
        let start = match paging::decode(&r.page_token, 2)? {
            Some(parts) => {
                paging::same_filter(&parts[1], &filter)?;
                parts[0]
                    .parse::<i64>()
                    .map_err(|_| Error::invalid("page_token", "not a token from a previous page"))?
            }
            None => {
                let start = i64::try_from(r.start_sequence)
                    .map_err(|_| Error::invalid("start_sequence", "too large"))?;
                // start_sequence is inclusive; the position the domain takes is the one just
                // before (forward) or after (backward) the first message to return.
                match (start, forward) {
                    (0, _) => 0,
                    (start, true) => start - 1,
                    (start, false) => start.saturating_add(1),
                }
            }
        };
        let limit = paging::page_size(r.page_size)?;
        let (messages, more) = self
            .messaging
            .list_messages(&caller, conversation, forward, start, limit)
            .await?;
        let next_page_token = match (more, messages.last()) {
            (true, Some(last)) => paging::encode(&[&last.sequence.to_string(), &filter]),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListMessagesResponse {
            messages: messages.iter().map(|m| m.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = user(&request)?.clone();
        let after = request.into_inner().after;
        let cursor = if after.is_empty() {
            None
        } else {
            Some(
                after
                    .parse::<i64>()
                    .ok()
                    .filter(|c| *c >= 0)
                    .ok_or_else(|| Error::invalid("after", "not a cursor from this stream"))?,
            )
        };
        let session = caller.session_id;
        let receiver = self
            .messaging
            .inner
            .hub
            .subscribe(self.messaging.clone(), caller, cursor)
            .await?;
        let stream = hafen_authn::end_on_revocation(
            ReceiverStream::new(receiver),
            self.authenticator.clone(),
            session,
        );
        Ok(Response::new(stream))
    }
}
