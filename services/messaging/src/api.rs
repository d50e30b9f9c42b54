//! The gRPC adapter of `hafen.messaging.v1.MessagingService`: parse requests into domain
//! types, call [`Messaging`], convert the results. Each RPC runs in a span of its own that
//! carries ids only (tenant, user, and the conversation or message named).

use futures::StreamExt;
use hafen_authn::{Authenticator, Principal, user};
use hafen_platform::paging::{self, TimeKey};
use hafen_platform::status::parse_uuid;
use hafen_platform::timestamp;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::messaging::v1::messaging_service_server::MessagingService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::conversations::NewConversation;
use crate::error::Error;
use crate::feed::{Change, FeedItem};
use crate::rows::{ConversationView, MessageView, kind};
use crate::service::Messaging;

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

/// The caller, recorded on the RPC's span.
fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    let caller = user(request)?.clone();
    let span = tracing::Span::current();
    span.record("tenant_id", tracing::field::display(caller.tenant_id));
    span.record("user_id", tracing::field::display(caller.user_id));
    Ok(caller)
}

/// Records the id of what the RPC is about on its span.
fn record(field: &str, id: Uuid) {
    tracing::Span::current().record(field, tracing::field::display(id));
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

    #[instrument(name = "CreateConversation", skip_all, fields(tenant_id, user_id))]
    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let caller = caller(&request)?;
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
        Ok(Response::new(conversation_proto(&created)))
    }

    #[instrument(name = "ListConversations", skip_all, fields(tenant_id, user_id))]
    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let caller = caller(&request)?;
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
            conversations: views.iter().map(conversation_proto).collect(),
            next_page_token,
        }))
    }

    #[instrument(
        name = "AddMembers",
        skip_all,
        fields(tenant_id, user_id, conversation_id)
    )]
    async fn add_members(
        &self,
        request: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::AddMembersResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        record("conversation_id", conversation);
        let users = parse_ids("user_ids", &r.user_ids)?;
        let (view, added) = self
            .messaging
            .add_members(&caller, conversation, users)
            .await?;
        Ok(Response::new(pb::AddMembersResponse {
            conversation: Some(conversation_proto(&view)),
            added_user_ids: added.iter().map(Uuid::to_string).collect(),
        }))
    }

    #[instrument(
        name = "RemoveMember",
        skip_all,
        fields(tenant_id, user_id, conversation_id)
    )]
    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        record("conversation_id", conversation);
        let target = parse_uuid("user_id", &r.user_id)?;
        let (view, removed) = self
            .messaging
            .remove_member(&caller, conversation, target)
            .await?;
        Ok(Response::new(pb::RemoveMemberResponse {
            conversation: Some(conversation_proto(&view)),
            removed,
        }))
    }

    #[instrument(
        name = "SendMessage",
        skip_all,
        fields(tenant_id, user_id, conversation_id, request_id)
    )]
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let request_id = parse_uuid("request_id", &r.request_id)?;
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        record("conversation_id", conversation);
        record("request_id", request_id);
        let message = self
            .messaging
            .send(&caller, conversation, request_id, &r.body)
            .await?;
        Ok(Response::new(message_proto(&message)))
    }

    #[instrument(name = "EditMessage", skip_all, fields(tenant_id, user_id, message_id))]
    async fn edit_message(
        &self,
        request: Request<pb::EditMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let message = parse_uuid("message_id", &r.message_id)?;
        record("message_id", message);
        let edited = self.messaging.edit(&caller, message, &r.body).await?;
        Ok(Response::new(message_proto(&edited)))
    }

    #[instrument(
        name = "DeleteMessage",
        skip_all,
        fields(tenant_id, user_id, message_id)
    )]
    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::Message>, Status> {
        let caller = caller(&request)?;
        let message = parse_uuid("message_id", &request.into_inner().message_id)?;
        record("message_id", message);
        let deleted = self.messaging.delete(&caller, message).await?;
        Ok(Response::new(message_proto(&deleted)))
    }

    #[instrument(
        name = "ListMessages",
        skip_all,
        fields(tenant_id, user_id, conversation_id)
    )]
    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        record("conversation_id", conversation);
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
            messages: messages.iter().map(message_proto).collect(),
            next_page_token,
        }))
    }

    #[instrument(name = "Subscribe", skip_all, fields(tenant_id, user_id))]
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request)?;
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
        let receiver = self.messaging.subscribe(caller, cursor).await?;
        let stream =
            ReceiverStream::new(receiver).map(|item| item.map(feed_proto).map_err(Status::from));
        let stream = hafen_authn::end_on_revocation(stream, self.authenticator.clone(), session);
        Ok(Response::new(stream))
    }
}

/// A conversation's API form. Member ids are listed for direct and group conversations only.
fn conversation_proto(view: &ConversationView) -> pb::Conversation {
    let row = &view.row;
    pb::Conversation {
        conversation_id: row.id.to_string(),
        kind: match row.kind.as_str() {
            kind::DIRECT => pb::ConversationKind::Direct,
            kind::GROUP => pb::ConversationKind::Group,
            kind::CHANNEL => pb::ConversationKind::Channel,
            _ => pb::ConversationKind::Webchat,
        } as i32,
        title: row.title.clone(),
        create_time: Some(timestamp(row.created_at)),
        update_time: Some(timestamp(row.updated_at)),
        last_sequence: u64::try_from(row.last_sequence).unwrap_or_default(),
        member_count: i32::try_from(view.members.len()).unwrap_or(i32::MAX),
        member_user_ids: if matches!(row.kind.as_str(), kind::DIRECT | kind::GROUP) {
            view.members.iter().map(Uuid::to_string).collect()
        } else {
            Vec::new()
        },
        caller_is_member: view.caller_is_member,
        creator_user_id: row.creator_id.to_string(),
    }
}

/// A message's API form.
fn message_proto(message: &MessageView) -> pb::Message {
    pb::Message {
        message_id: message.id.to_string(),
        conversation_id: message.conversation_id.to_string(),
        sequence: u64::try_from(message.sequence).unwrap_or_default(),
        sender_user_id: message.sender_id.to_string(),
        body: message.body.clone(),
        create_time: Some(timestamp(message.created_at)),
        edit_time: message.edited_at.map(timestamp),
        delete_time: message.deleted_at.map(timestamp),
        masked: message.masked,
        sender_erased: message.erased,
    }
}

/// A stream item's API form.
fn feed_proto(item: FeedItem) -> pb::SubscribeResponse {
    use pb::subscribe_response::Event;
    let event = match item.change {
        Change::MessageCreated(message) => Event::MessageCreated(message_proto(&message)),
        Change::MessageEdited(message) => Event::MessageEdited(message_proto(&message)),
        Change::MessageDeleted(message) => Event::MessageDeleted(message_proto(&message)),
        Change::MembershipChanged {
            conversation,
            added,
            removed,
            actor,
            at,
        } => Event::MembershipChanged(pb::MembershipChanged {
            conversation: conversation.as_ref().map(conversation_proto),
            added_user_ids: added.iter().map(Uuid::to_string).collect(),
            removed_user_ids: removed.iter().map(Uuid::to_string).collect(),
            actor_user_id: actor.map(|a| a.to_string()).unwrap_or_default(),
            change_time: Some(timestamp(at)),
        }),
        Change::CaughtUp => Event::CaughtUp(pb::CaughtUp {}),
    };
    pb::SubscribeResponse {
        cursor: item.cursor.to_string(),
        event: Some(event),
    }
}
