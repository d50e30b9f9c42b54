//! The session and what the SDK does with it: keep it fresh, end it, and wipe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::auth::v1::auth_service_client::AuthServiceClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::error::{Error, reason_of};

/// A logged-in session. Serialisable, so an application can store it (it holds tokens:
/// store it like a password, e.g. in a file only its owner may read).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The tenant's slug.
    pub tenant: String,
    /// The tenant's id.
    pub tenant_id: String,
    /// The logged-in user's id.
    pub user_id: String,
    /// The session's id.
    pub session_id: String,
    /// The chat code (device) the session belongs to.
    pub chat_code_id: String,
    access_token: String,
    refresh_token: String,
    /// When the access token expires (it is refreshed before).
    pub access_expires_at: DateTime<Utc>,
    /// When the refresh token expires: the session ends then.
    pub refresh_expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tenant", &self.tenant)
            .field("user_id", &self.user_id)
            .field("session_id", &self.session_id)
            .field("access_expires_at", &self.access_expires_at)
            .finish_non_exhaustive()
    }
}

fn time(timestamp: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    timestamp
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now)
}

impl Session {
    pub(crate) fn from_login(tenant: &str, response: &auth_pb::LoginResponse) -> Self {
        Self {
            tenant: tenant.to_owned(),
            tenant_id: response.tenant_id.clone(),
            user_id: response
                .user
                .as_ref()
                .map(|u| u.user_id.clone())
                .unwrap_or_default(),
            session_id: response.session_id.clone(),
            chat_code_id: response.chat_code_id.clone(),
            access_token: response.access_token.clone(),
            refresh_token: response.refresh_token.clone(),
            access_expires_at: time(response.access_expire_time.as_ref()),
            refresh_expires_at: time(response.refresh_expire_time.as_ref()),
        }
    }

    /// The access token (for calls made without the SDK's clients).
    pub fn access_token(&self) -> &str {
        &self.access_token
    }
}

type WipeHandler = Box<dyn Fn() + Send + Sync>;
type SessionListener = Box<dyn Fn(Option<&Session>) + Send + Sync>;

/// Shared by a [`crate::Hafen`] and its clones.
pub(crate) struct State {
    auth: Channel,
    session: RwLock<Option<Session>>,
    wiped: AtomicBool,
    wipe_handler: Mutex<Option<WipeHandler>>,
    listener: Mutex<Option<SessionListener>>,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    refreshing: tokio::sync::Mutex<()>,
    /// A fixed bearer token used when there is no session (the operator's platform token).
    fixed_token: RwLock<Option<String>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("wiped", &self.wiped)
            .finish_non_exhaustive()
    }
}

/// Refresh when less than this is left of the access token.
const REFRESH_AHEAD: Duration = Duration::from_secs(60);

impl State {
    pub(crate) fn new(auth: Channel) -> Self {
        Self {
            auth,
            session: RwLock::new(None),
            wiped: AtomicBool::new(false),
            wipe_handler: Mutex::new(None),
            listener: Mutex::new(None),
            refresher: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            fixed_token: RwLock::new(None),
        }
    }

    pub(crate) fn set_fixed_token(&self, token: String) {
        if let Ok(mut slot) = self.fixed_token.write() {
            *slot = Some(token);
        }
    }

    pub(crate) fn set_wipe_handler(&self, handler: WipeHandler) {
        if let Ok(mut slot) = self.wipe_handler.lock() {
            *slot = Some(handler);
        }
    }

    pub(crate) fn set_session_listener(&self, listener: SessionListener) {
        if let Ok(mut slot) = self.listener.lock() {
            *slot = Some(listener);
        }
    }

    pub(crate) fn session(&self) -> Option<Session> {
        self.session.read().ok().and_then(|s| s.clone())
    }

    pub(crate) fn access_token(&self) -> Option<String> {
        self.session
            .read()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.access_token.clone()))
            .or_else(|| self.fixed_token.read().ok().and_then(|t| t.clone()))
    }

    pub(crate) fn is_wiped(&self) -> bool {
        self.wiped.load(Ordering::SeqCst)
    }

    pub(crate) fn refuse_if_wiped(&self) -> Result<(), Error> {
        if self.is_wiped() {
            Err(Error::Wiped)
        } else {
            Ok(())
        }
    }

    fn set(&self, session: Option<Session>) {
        if let Ok(mut slot) = self.session.write() {
            slot.clone_from(&session);
        }
        if let Ok(listener) = self.listener.lock()
            && let Some(listener) = listener.as_ref()
        {
            listener(session.as_ref());
        }
    }

    /// Takes `session` on and keeps it fresh in the background.
    pub(crate) fn start(self: &Arc<Self>, session: Session) {
        self.set(Some(session));
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let wait = {
                    let Some(state) = weak.upgrade() else { return };
                    let Some(session) = state.session() else {
                        return;
                    };
                    let left = (session.access_expires_at - Utc::now())
                        .to_std()
                        .unwrap_or_default();
                    left.saturating_sub(REFRESH_AHEAD.min(left / 2))
                };
                tokio::time::sleep(wait).await;
                let Some(state) = weak.upgrade() else { return };
                match state.refresh_when(REFRESH_AHEAD).await {
                    Ok(()) => backoff = Duration::from_secs(1),
                    Err(err) if err.is_transient() => {
                        drop(state);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Err(_) => return,
                }
            }
        });
        if let Ok(mut slot) = self.refresher.lock()
            && let Some(old) = slot.replace(task)
        {
            old.abort();
        }
    }

    /// Forgets the session (logout, revocation, wipe).
    pub(crate) fn end(&self) {
        if let Ok(mut slot) = self.refresher.lock()
            && let Some(task) = slot.take()
        {
            task.abort();
        }
        self.set(None);
    }

    /// Refreshes now when the access token is about to expire.
    pub(crate) async fn ensure_fresh(&self) -> Result<(), Error> {
        self.refuse_if_wiped()?;
        let session = self.session().ok_or(Error::NotLoggedIn)?;
        if session.access_expires_at - Utc::now() < chrono::Duration::seconds(15) {
            self.refresh_when(Duration::from_secs(15)).await?;
        }
        Ok(())
    }

    /// Refreshes now.
    pub(crate) async fn refresh(&self) -> Result<(), Error> {
        self.refresh_when(Duration::MAX).await
    }

    /// Exchanges the refresh token for new tokens when the access token expires within
    /// `ahead` (checked after waiting for any refresh in flight, so two callers never
    /// refresh twice: a refresh replaces the access token). A refusal other than a passing
    /// outage ends the session (and a wipe signal wipes).
    pub(crate) async fn refresh_when(&self, ahead: Duration) -> Result<(), Error> {
        let _one_at_a_time = self.refreshing.lock().await;
        self.refuse_if_wiped()?;
        let session = self.session().ok_or(Error::NotLoggedIn)?;
        let left = (session.access_expires_at - Utc::now())
            .to_std()
            .unwrap_or_default();
        if left > ahead {
            return Ok(());
        }
        let answer = AuthServiceClient::new(self.auth.clone())
            .refresh(auth_pb::RefreshRequest {
                refresh_token: session.refresh_token.clone(),
            })
            .await;
        match answer {
            Ok(response) => {
                let response = response.into_inner();
                self.set(Some(Session {
                    access_token: response.access_token,
                    refresh_token: response.refresh_token,
                    access_expires_at: time(response.access_expire_time.as_ref()),
                    refresh_expires_at: time(response.refresh_expire_time.as_ref()),
                    ..session
                }));
                Ok(())
            }
            Err(status) => {
                let err = self.fail(status).await;
                if !err.is_transient() && !matches!(err, Error::Wiped) {
                    self.end();
                }
                Err(err)
            }
        }
    }

    /// The error for `status`, after acting on a wipe signal in it.
    pub(crate) async fn fail(&self, status: tonic::Status) -> Error {
        self.inspect(&status).await;
        Error::from(status)
    }

    /// The error for `status`, without acting on it.
    pub(crate) fn error(&self, status: tonic::Status) -> Error {
        Error::from(status)
    }

    /// Acts on a wipe signal in `status`.
    pub(crate) async fn inspect(&self, status: &tonic::Status) {
        if reason_of(status).as_deref() == Some("DEVICE_WIPED") {
            self.wipe().await;
        }
    }

    /// The device was wiped (OC5): run the application's handler, confirm the wipe to the
    /// server, forget the session and refuse every further call. Runs once.
    pub(crate) async fn wipe(&self) {
        if self.wiped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(handler) = self.wipe_handler.lock()
            && let Some(handler) = handler.as_ref()
        {
            handler();
        }
        if let Some(token) = self.access_token() {
            let mut request = tonic::Request::new(auth_pb::ConfirmWipeRequest {});
            if let Ok(value) = format!("Bearer {token}").parse() {
                request.metadata_mut().insert("authorization", value);
            }
            if let Err(status) = AuthServiceClient::new(self.auth.clone())
                .confirm_wipe(request)
                .await
            {
                tracing::warn!(code = ?status.code(), "wipe not confirmed to the server");
            }
        }
        self.end();
    }
}
