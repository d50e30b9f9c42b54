//! Visits (CB1, CB2, CB8, UL3): anonymous visitors of a widget, their consent answers and the
//! fields they chose to give. A visitor token is `<widget>.<visit>.<secret>`: the widget's id
//! (public) leads to the tenant, and only the token's SHA-256 is stored with the visit.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_events::{Actor, Event};
use hafen_proto::webchat::v1 as pb;
use hafen_store::schema::{consent_records, visit_fields, visits, widget_routes};
use hafen_store::settings::Settings as TenantSettings;
use hafen_store::{AsyncPgConnection, now};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::Service;
use crate::error::Error;
use crate::widgets::{self, Settings, WidgetRow};

/// Most fields in one SubmitFields, and longest value in characters.
const MAX_FIELDS: usize = 20;
const MAX_VALUE_CHARS: usize = 1000;

/// A widget that serves visitors: enabled, of an active tenant with the webchat feature on.
pub struct LiveWidget {
    pub tenant: Uuid,
    pub row: WidgetRow,
    pub settings: Settings,
    /// The organisation's settings (masking rules among them).
    pub tenant_settings: TenantSettings,
}

/// How long a widget as visitors' calls see it is kept in memory: admins' changes made
/// through another replica, and the tenant's feature switch, take effect within this time.
const WIDGET_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Most widgets kept; beyond, the cache starts afresh.
const MAX_WIDGETS: usize = 10_000;

/// Widgets (with their tenant's settings) as visitors' calls need them, or that there is no
/// such widget, for [`WIDGET_TTL`]: a visitor's call looks them up in memory instead of three
/// queries in two databases.
#[derive(Default)]
pub struct WidgetCache {
    entries: std::sync::Mutex<std::collections::HashMap<Uuid, Kept>>,
    /// Counts the changes this process made: a lookup that began before one does not keep
    /// what it read.
    changes: std::sync::atomic::AtomicU64,
}

/// When a widget was looked up, and what was found.
type Kept = (std::time::Instant, Option<Arc<LiveWidget>>);

impl WidgetCache {
    /// What is kept of widget `id` (`Some(None)`: there is none), while fresh.
    fn get(&self, id: Uuid) -> Option<Option<Arc<LiveWidget>>> {
        let entries = self.entries.lock().ok()?;
        let (at, found) = entries.get(&id)?;
        (at.elapsed() < WIDGET_TTL).then(|| found.clone())
    }

    /// Where the count of changes stands, before a lookup.
    fn changes(&self) -> u64 {
        std::sync::atomic::AtomicU64::load(&self.changes, std::sync::atomic::Ordering::SeqCst)
    }

    /// Keeps what a lookup that began at `changes` found, unless a change came since.
    fn keep(&self, id: Uuid, found: &Option<Arc<LiveWidget>>, changes: u64) {
        if let Ok(mut entries) = self.entries.lock() {
            if self.changes() != changes {
                return;
            }
            if entries.len() >= MAX_WIDGETS {
                entries.clear();
            }
            entries.insert(id, (std::time::Instant::now(), found.clone()));
        }
    }

    /// Forgets widget `id` after this process changed it.
    pub fn forget(&self, id: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            entries.remove(&id);
        }
    }
}

/// A visitor, authenticated by their token.
pub struct Visitor {
    pub tenant: Uuid,
    pub widget: Arc<LiveWidget>,
    pub visit: VisitRow,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = visits)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct VisitRow {
    pub id: Uuid,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = consent_records)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct ConsentRow {
    pub id: Uuid,
    pub version: i32,
    pub text_sha256: Vec<u8>,
    pub granted: bool,
    pub decided_at: DateTime<Utc>,
    pub language: String,
}

impl ConsentRow {
    pub(crate) fn to_proto(&self) -> pb::ConsentRecord {
        pb::ConsentRecord {
            version: self.version,
            text_sha256: self.text_sha256.clone(),
            granted: self.granted,
            decide_time: Some(hafen_platform::timestamp(self.decided_at)),
            language: self.language.clone(),
        }
    }
}

/// Most languages a visitor's GetWidgetConfig names, and the longest.
const MAX_LANGUAGES: usize = 10;
const MAX_LANGUAGE_TAG: usize = 35;

/// Checks the visitor's languages (browser language tags, best first).
pub(crate) fn check_languages(languages: &[String]) -> Result<(), Error> {
    if languages.len() > MAX_LANGUAGES || languages.iter().any(|tag| tag.len() > MAX_LANGUAGE_TAG) {
        return Err(Error::invalid(
            "languages",
            "at most 10 language tags of up to 35 characters",
        ));
    }
    Ok(())
}

/// The first of `offered` that one of `preferred` (language tags, best first: "de-AT", "en")
/// names by its language, else `fallback`.
pub(crate) fn choose_language<'a>(
    preferred: &[String],
    offered: &[&'a str],
    fallback: &'a str,
) -> &'a str {
    preferred
        .iter()
        .filter_map(|tag| {
            let primary = tag.split(['-', '_']).next().unwrap_or_default();
            offered
                .iter()
                .copied()
                .find(|language| language.eq_ignore_ascii_case(primary))
        })
        .next()
        .unwrap_or(fallback)
}

pub(crate) fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The widget and visit a token names, if it has the token's shape.
pub(crate) fn token_ids(token: &str) -> Option<(Uuid, Uuid)> {
    let mut parts = token.splitn(3, '.');
    let widget = Uuid::try_parse(parts.next()?).ok()?;
    let visit = Uuid::try_parse(parts.next()?).ok()?;
    let secret = parts.next()?;
    (secret.len() == 43).then_some((widget, visit))
}

/// Longest external id of a signed identity, in characters.
const MAX_EXTERNAL_ID_CHARS: usize = 200;

/// How long a signed identity is good for after its signing time.
const IDENTITY_MAX_AGE: Duration = Duration::hours(24);

/// How far ahead of this server's clock a signing time may be.
const IDENTITY_MAX_SKEW: Duration = Duration::minutes(5);

/// A signed identity StartVisit claims, checked for shape.
struct IdentityClaim<'a> {
    external_id: &'a str,
    signature: [u8; 32],
    issued_at: i64,
}

impl IdentityClaim<'_> {
    /// What the website's server signs: `<issued_at>.<external_id>`.
    fn signed(&self) -> Vec<u8> {
        format!("{}.{}", self.issued_at, self.external_id).into_bytes()
    }

    /// Whether the signing time lies within [`IDENTITY_MAX_AGE`] before `now` (and at most
    /// [`IDENTITY_MAX_SKEW`] after it).
    fn fresh(&self, now: DateTime<Utc>) -> bool {
        let Some(issued) = DateTime::<Utc>::from_timestamp(self.issued_at, 0) else {
            return false;
        };
        issued <= now + IDENTITY_MAX_SKEW && now - issued <= IDENTITY_MAX_AGE
    }
}

/// The signed identity StartVisit claims, checked for shape: `None` when there is no claim
/// (no id, or no signature: an unsigned claim is ignored).
fn identity_claim<'a>(
    external_id: &'a str,
    signature: &str,
    issued_at: i64,
) -> Result<Option<IdentityClaim<'a>>, Error> {
    if external_id.chars().count() > MAX_EXTERNAL_ID_CHARS {
        return Err(Error::invalid("external_id", "at most 200 characters"));
    }
    if signature.is_empty() {
        return Ok(None);
    }
    if issued_at <= 0 {
        return Err(Error::invalid(
            "identity_issued_at",
            "required with identity_signature: when it was signed, in Unix seconds",
        ));
    }
    let bad = || {
        Error::invalid(
            "identity_signature",
            "64 lowercase hexadecimal digits (HMAC-SHA256)",
        )
    };
    if signature.len() != 64 {
        return Err(bad());
    }
    if !signature
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(signature.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok((!external_id.is_empty()).then_some(IdentityClaim {
        external_id,
        signature: bytes,
        issued_at,
    }))
}

/// In StartVisit with a verified `identity`: its live visit, or the anonymous visit of the
/// token given (`resumable`, its hash), which becomes the identity's; either way the visit's
/// token becomes the one derived for it (`derive`: its hash), under the widget's current
/// secret. `None`: a new visit is to be made. Expired visits give the identity up first.
async fn resume_identified(
    conn: &mut AsyncPgConnection,
    widget: Uuid,
    identity: &[u8],
    resumable: Option<(Uuid, Vec<u8>)>,
    derive: &(dyn Fn(Uuid) -> Vec<u8> + Send + Sync),
    at: DateTime<Utc>,
    lifetime: Duration,
) -> Result<Option<VisitRow>, Error> {
    diesel::update(
        visits::table
            .filter(visits::widget_id.eq(widget))
            .filter(visits::identity_sha256.eq(identity))
            .filter(visits::expires_at.le(at)),
    )
    .set(visits::identity_sha256.eq(None::<Vec<u8>>))
    .execute(conn)
    .await?;
    let live: Option<Uuid> = visits::table
        .filter(visits::widget_id.eq(widget))
        .filter(visits::identity_sha256.eq(identity))
        .filter(visits::expires_at.gt(at))
        .select(visits::id)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let (visit, adopt) = match (live, resumable) {
        (Some(visit), _) => (visit, None),
        (None, Some((visit, hash))) => (visit, Some(hash)),
        (None, None) => return Ok(None),
    };
    let mut target = visits::table
        .find(visit)
        .filter(visits::expires_at.gt(at))
        .into_boxed();
    if let Some(hash) = adopt {
        target = target
            .filter(visits::token_sha256.eq(hash))
            .filter(visits::identity_sha256.is_null());
    }
    let found: Option<Uuid> = target.select(visits::id).first(conn).await.optional()?;
    let Some(visit) = found else {
        return Ok(None);
    };
    Ok(Some(
        diesel::update(visits::table.find(visit))
            .set((
                visits::identity_sha256.eq(identity),
                visits::token_sha256.eq(derive(visit)),
                visits::last_seen_at.eq(at),
                visits::expires_at.eq(at + lifetime),
            ))
            .returning(VisitRow::as_returning())
            .get_result(conn)
            .await?,
    ))
}

/// The token of an identified visit: derived from the visit and the widget's current sealed
/// identity secret under `key`, so every device of the person gets the same one, only this
/// service can make it, and a new secret makes new tokens.
fn identity_token(key: &[u8; 32], widget: Uuid, visit: Uuid, sealed_secret: &[u8]) -> String {
    let secret =
        hafen_crypto::secret::keyed_hash(key, &[b"visitor token", visit.as_bytes(), sealed_secret]);
    format!(
        "{}.{}.{}",
        widget.simple(),
        visit.simple(),
        hafen_crypto::secret::token_of(&secret)
    )
}

/// The associated data of a field value: its visit and key.
pub(crate) fn field_context(visit: Uuid, key: &str) -> Vec<u8> {
    [visit.as_bytes().as_slice(), key.as_bytes()].concat()
}

/// Locks `visit`'s row for the rest of the transaction: changes of one visit's consent, fields
/// and chat happen one after the other.
pub(crate) async fn lock_visit(conn: &mut AsyncPgConnection, visit: Uuid) -> Result<(), Error> {
    lock_visit_if_there(conn, visit)
        .await?
        .then_some(())
        .ok_or(Error::Unauthenticated("the visit has ended"))
}

/// [`lock_visit`] for a visit that may be gone already: whether it was there.
pub(crate) async fn lock_visit_if_there(
    conn: &mut AsyncPgConnection,
    visit: Uuid,
) -> Result<bool, Error> {
    let found: Option<Uuid> = visits::table
        .find(visit)
        .select(visits::id)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    Ok(found.is_some())
}

/// Holds the tenant's message stores back until this transaction ends (taken after the
/// visit's lock, which the stores of a visit's messages sent alone take first): a batch of
/// visitors' messages (`store_visitor_messages`) checks consent, fields and the visit's end
/// under the event counter's lock, so a change made under it is seen by every later batch
/// and overtaken by none.
pub(crate) async fn hold_sends(conn: &mut AsyncPgConnection) -> Result<(), Error> {
    use hafen_store::schema::event_counter;
    let _: i64 = event_counter::table
        .select(event_counter::last_id)
        .for_no_key_update()
        .first(conn)
        .await?;
    Ok(())
}

/// Whether `visit`'s latest consent answer grants the current text of `widget`.
pub(crate) async fn consented(
    conn: &mut AsyncPgConnection,
    widget: Uuid,
    visit: Uuid,
) -> Result<bool, Error> {
    let current = widgets::current_text(conn, widget).await?;
    Ok(latest_consent(conn, visit)
        .await?
        .is_some_and(|c| c.granted && c.version == current.version))
}

/// The latest consent answer of `visit`.
async fn latest_consent(
    conn: &mut AsyncPgConnection,
    visit: Uuid,
) -> Result<Option<ConsentRow>, Error> {
    Ok(consent_records::table
        .filter(consent_records::visit_id.eq(visit))
        .order((
            consent_records::decided_at.desc(),
            consent_records::id.desc(),
        ))
        .select(ConsentRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

impl Service {
    /// Widget `id` as it serves visitors from `origin` (a browser's `Origin` header, when
    /// there is one). A widget that does not serve visitors is NOT_FOUND, whatever the reason.
    pub async fn live_widget(
        &self,
        id: Uuid,
        origin: Option<&str>,
    ) -> Result<Arc<LiveWidget>, Error> {
        self.widget(id, origin, true).await
    }

    /// Widget `id` whatever its state, when `origin` may embed it: for a visitor's data rights
    /// from a browser.
    pub(crate) async fn widget_in_any_state(
        &self,
        id: Uuid,
        origin: &str,
    ) -> Result<Arc<LiveWidget>, Error> {
        self.widget(id, Some(origin), false).await
    }

    /// Widget `id`; with `live`, only while it serves visitors from `origin` (see
    /// [`Service::live_widget`]); without, whatever its state (a visitor's data rights do not
    /// depend on it).
    async fn widget(
        &self,
        id: Uuid,
        origin: Option<&str>,
        live: bool,
    ) -> Result<Arc<LiveWidget>, Error> {
        let found = match self.widgets.get(id) {
            Some(found) => found,
            None => {
                let changes = self.widgets.changes();
                let found = self.load_widget(id).await?;
                self.widgets.keep(id, &found, changes);
                found
            }
        };
        let Some(found) = found else {
            return Err(Error::NotFound("widget"));
        };
        if live && (!found.tenant_settings.features.webchat || !found.row.enabled) {
            return Err(Error::NotFound("widget"));
        }
        if let Some(origin) = origin
            && !found.settings.allows_origin(origin)
        {
            return Err(Error::PermissionDenied(
                "this page's origin may not embed the widget",
            ));
        }
        Ok(found)
    }

    /// Widget `id` of an active tenant, whatever its state; `None` when there is none.
    async fn load_widget(&self, id: Uuid) -> Result<Option<Arc<LiveWidget>>, Error> {
        let tenant = {
            let mut conn = self.databases.main_connection().await?;
            let tenant: Option<Uuid> = widget_routes::table
                .find(id)
                .select(widget_routes::tenant_id)
                .first(&mut conn)
                .await
                .optional()?;
            match tenant {
                Some(tenant) => hafen_store::control::find(&mut conn, tenant)
                    .await?
                    .filter(|row| row.status == hafen_store::control::status::ACTIVE),
                None => None,
            }
        };
        let Some(tenant) = tenant else {
            return Ok(None);
        };
        let tenant_settings = TenantSettings::from_json(&tenant.settings);
        let tenant = tenant.id;
        let Some(row) = self
            .scoped(tenant, move |conn| Box::pin(widgets::find(conn, id)))
            .await?
        else {
            return Ok(None);
        };
        let settings = row.settings()?;
        Ok(Some(Arc::new(LiveWidget {
            tenant,
            row,
            settings,
            tenant_settings,
        })))
    }

    /// The visitor whose token is `token`, calling from `origin`.
    pub async fn visitor(&self, token: &str, origin: Option<&str>) -> Result<Visitor, Error> {
        self.visitor_of(token, origin, true).await
    }

    /// The visitor whose token is `token`, for their data rights (see, correct, export,
    /// delete): whatever the state of the widget, the feature or the allowed origins.
    pub async fn visitor_with_rights(&self, token: &str) -> Result<Visitor, Error> {
        self.visitor_of(token, None, false).await
    }

    async fn visitor_of(
        &self,
        token: &str,
        origin: Option<&str>,
        live: bool,
    ) -> Result<Visitor, Error> {
        let refused = || Error::Unauthenticated("no valid visitor token; start a visit");
        let (widget, visit) = token_ids(token).ok_or_else(refused)?;
        let widget = match self.widget(widget, origin, live).await {
            Ok(widget) => widget,
            Err(Error::NotFound(_)) => return Err(refused()),
            Err(err) => return Err(err),
        };
        let hash = token_hash(token);
        let visit = self
            .scoped(widget.tenant, move |conn| {
                Box::pin(async move {
                    Ok(visits::table
                        .find(visit)
                        .filter(visits::token_sha256.eq(hash))
                        .filter(visits::expires_at.gt(now()))
                        .select(VisitRow::as_select())
                        .first(conn)
                        .await
                        .optional()?)
                })
            })
            .await?
            .ok_or_else(refused)?;
        Ok(Visitor {
            tenant: widget.tenant,
            widget,
            visit,
        })
    }

    /// GetWidgetConfig, in the first of the visitor's `languages` that the widget offers: one
    /// it has texts in and the current consent text has too.
    pub async fn widget_config(
        &self,
        id: Uuid,
        origin: Option<&str>,
        languages: &[String],
    ) -> Result<pb::WidgetConfig, Error> {
        let live = self.live_widget(id, origin).await?;
        let hours = live.settings.business_hours.clone();
        let agents = live.settings.agents.clone();
        let (consent, online) = self
            .scoped(live.tenant, move |conn| {
                Box::pin(async move {
                    let consent = widgets::current_version(conn, id).await?;
                    let online = hours.open_now(conn).await?
                        && !widgets::active_agents(conn, &agents).await?.is_empty();
                    Ok((consent, online))
                })
            })
            .await?;
        let s = &live.settings;
        let offered: Vec<&str> = s
            .languages()
            .filter(|language| consent.in_language(language).is_some())
            .collect();
        let language = choose_language(languages, &offered, &s.language);
        let texts = s.texts(language);
        Ok(pb::WidgetConfig {
            widget_id: id.to_string(),
            privacy_policy_url: s.privacy_policy_url.clone(),
            welcome_message: texts.welcome_message,
            offline_message: texts.offline_message,
            pre_chat_fields: texts.pre_chat_fields,
            consent_text: Some(consent.to_proto_in(language)),
            business_hours: Some(s.business_hours.to_proto()),
            allow_anonymous_chat: s.allow_anonymous_chat,
            online,
            remember_visitors: s.remember_visitors,
            visit_lifetime_days: live.row.visit_lifetime_days,
            language: language.to_owned(),
        })
    }

    /// StartVisit: with a signed identity, the identity's live visit, or the visit of the
    /// token given (which becomes the identity's), or a new one; without, the visit of the
    /// token given if it is valid for this widget, else a new one.
    pub async fn start_visit(
        &self,
        widget: Uuid,
        request: &pb::StartVisitRequest,
        origin: Option<&str>,
    ) -> Result<pb::StartVisitResponse, Error> {
        let claim = identity_claim(
            &request.external_id,
            &request.identity_signature,
            request.identity_issued_at,
        )?;
        let live = self.live_widget(widget, origin).await?;
        let identity = match claim {
            Some(claim) => self.verified_identity(&live, &claim).await?,
            None => None,
        };
        let lifetime = Duration::days(i64::from(live.row.visit_lifetime_days));
        let given = request.visitor_token.as_str();
        let resumable = token_ids(given)
            .filter(|(w, _)| *w == widget)
            .map(|(_, v)| (v, token_hash(given)));
        let key: [u8; 32] = *self.identity_key.expose();
        let sealed = live.row.identity_secret_sealed.clone().unwrap_or_default();
        let derived_token = move |visit: Uuid| identity_token(&key, widget, visit, &sealed);
        // Two first visits of one identity at once: the second finds the first's.
        let mut attempt = 0;
        let (visit, resumed, consent, token) = loop {
            let new_id = Uuid::now_v7();
            let new_token = match &identity {
                Some(_) => derived_token(new_id),
                None => format!(
                    "{}.{}.{}",
                    widget.simple(),
                    new_id.simple(),
                    hafen_crypto::secret::random_token()?
                ),
            };
            let derive = derived_token.clone();
            let claimed = identity.clone();
            let resumable = resumable.clone();
            let new_hash = token_hash(&new_token);
            let result = self
                .scoped(live.tenant, move |conn| {
                    Box::pin(async move {
                        let at = now();
                        let found = match &claimed {
                            Some(identity) => {
                                let derive = move |visit: Uuid| token_hash(&derive(visit));
                                resume_identified(
                                    conn, widget, identity, resumable, &derive, at, lifetime,
                                )
                                .await?
                            }
                            None => match resumable {
                                Some((visit, hash)) => diesel::update(
                                    visits::table
                                        .find(visit)
                                        .filter(visits::token_sha256.eq(hash))
                                        .filter(visits::expires_at.gt(at)),
                                )
                                .set((
                                    visits::last_seen_at.eq(at),
                                    visits::expires_at.eq(at + lifetime),
                                ))
                                .returning(VisitRow::as_returning())
                                .get_result(conn)
                                .await
                                .optional()?,
                                None => None,
                            },
                        };
                        if let Some(visit) = found {
                            let consent = latest_consent(conn, visit.id).await?;
                            return Ok((visit, true, consent));
                        }
                        // An expired or unknown token: a new visit, with a new token.
                        let visit: VisitRow = diesel::insert_into(visits::table)
                            .values((
                                visits::id.eq(new_id),
                                visits::widget_id.eq(widget),
                                visits::token_sha256.eq(&new_hash),
                                visits::identity_sha256.eq(claimed),
                                visits::created_at.eq(at),
                                visits::last_seen_at.eq(at),
                                visits::expires_at.eq(at + lifetime),
                            ))
                            .returning(VisitRow::as_returning())
                            .get_result(conn)
                            .await?;
                        Ok((visit, false, None))
                    })
                })
                .await;
            match result {
                Ok((visit, resumed, consent)) => {
                    let token = if identity.is_some() {
                        derived_token(visit.id)
                    } else if resumed {
                        given.to_owned()
                    } else {
                        new_token
                    };
                    break (visit, resumed, consent, token);
                }
                Err(Error::Database(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    _,
                ))) if attempt == 0 && identity.is_some() => attempt += 1,
                Err(err) => return Err(err),
            }
        };
        let current = self
            .scoped(live.tenant, move |conn| {
                Box::pin(widgets::current_text(conn, widget))
            })
            .await?;
        Ok(pb::StartVisitResponse {
            visit_id: visit.id.to_string(),
            visitor_token: token,
            resumed,
            expire_time: Some(hafen_platform::timestamp(visit.expires_at)),
            consent: consent
                .filter(|c| c.version == current.version)
                .map(|c| c.to_proto()),
            identified: identity.is_some(),
        })
    }

    /// The keyed hash of the identity a visitor claims, if the widget has an identity secret
    /// and `signature` is the claim's HMAC under it; `None` (the claim is ignored) otherwise.
    async fn verified_identity(
        &self,
        live: &LiveWidget,
        claim: &IdentityClaim<'_>,
    ) -> Result<Option<Vec<u8>>, Error> {
        let Some(sealed) = &live.row.identity_secret_sealed else {
            return Ok(None);
        };
        let widget = live.row.id;
        let key = self.keys.user_key(live.tenant, widget).await?;
        let secret = key.open(&widgets::identity_context(widget), sealed)?;
        let expected = hafen_crypto::secret::hmac_sha256(&secret, &claim.signed());
        if !hafen_crypto::secret::constant_time_eq(&expected, &claim.signature)
            || !claim.fresh(now())
        {
            return Ok(None);
        }
        let external_id = claim.external_id;
        Ok(Some(
            hafen_crypto::secret::keyed_hash(
                self.identity_key.expose(),
                &[
                    b"visitor identity",
                    widget.as_bytes(),
                    external_id.as_bytes(),
                ],
            )
            .to_vec(),
        ))
    }

    /// GiveConsent.
    pub async fn give_consent(
        &self,
        visitor: &Visitor,
        request: pb::GiveConsentRequest,
    ) -> Result<pb::ConsentRecord, Error> {
        if request.version < 1 {
            return Err(Error::invalid("version", "a consent text version, from 1"));
        }
        if !request.language.is_empty()
            && (request.language.len() != 2
                || !request.language.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Err(Error::invalid(
                "language",
                "an ISO 639-1 language code, two lowercase letters such as de or en",
            ));
        }
        let (tenant, widget, visit) = (visitor.tenant, visitor.widget.row.id, visitor.visit.id);
        let granted = request.granted;
        let record = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    lock_visit(conn, visit).await?;
                    hold_sends(conn).await?;
                    let current = widgets::current_version(conn, widget).await?;
                    if current.version() != request.version {
                        return Err(Error::InvalidState(
                            "not the widget's current consent text; ask with the current one",
                        ));
                    }
                    let language = match request.language.as_str() {
                        "" => current.own.language.clone(),
                        given => given.to_owned(),
                    };
                    let (_, text_sha256) = current.in_language(&language).ok_or_else(|| {
                        Error::invalid("language", "the consent text has no version in it")
                    })?;
                    let row: ConsentRow = diesel::insert_into(consent_records::table)
                        .values((
                            consent_records::id.eq(Uuid::now_v7()),
                            consent_records::visit_id.eq(visit),
                            consent_records::version.eq(current.version()),
                            consent_records::text_sha256.eq(text_sha256),
                            consent_records::granted.eq(granted),
                            consent_records::decided_at.eq(now()),
                            consent_records::language.eq(&language),
                        ))
                        .returning(ConsentRow::as_returning())
                        .get_result(conn)
                        .await?;
                    if !granted {
                        // Declined (or withdrawn): nothing personal stays.
                        diesel::delete(
                            visit_fields::table
                                .filter(visit_fields::visit_id.eq(visit))
                                .filter(visit_fields::personal.eq(true)),
                        )
                        .execute(conn)
                        .await?;
                    }
                    let action = if granted {
                        "webchat.consent.granted"
                    } else {
                        "webchat.consent.declined"
                    };
                    let event = Event::new(Some(tenant), Actor::Service(crate::NAME), action)
                        .target("visit", visit)
                        .attribute("widget_id", widget)
                        .attribute("version", i64::from(row.version))
                        .attribute("language", &row.language)
                        .attribute("consent_record_id", row.id);
                    hafen_events::record(conn, &event).await?;
                    Ok(row)
                })
            })
            .await?;
        self.audited();
        Ok(record.to_proto())
    }

    /// SubmitFields.
    pub async fn submit_fields(
        &self,
        visitor: &Visitor,
        request: pb::SubmitFieldsRequest,
    ) -> Result<pb::SubmitFieldsResponse, Error> {
        let stored_keys = self.store_fields(visitor, request.fields, false).await?;
        Ok(pb::SubmitFieldsResponse { stored_keys })
    }

    /// Stores `fields` of the visit, all or nothing (with `only_stored`, each must be held
    /// already: a correction); returns the keys the visit then holds.
    pub(crate) async fn store_fields(
        &self,
        visitor: &Visitor,
        fields: Vec<pb::FieldValue>,
        only_stored: bool,
    ) -> Result<Vec<String>, Error> {
        if fields.is_empty() || fields.len() > MAX_FIELDS {
            return Err(Error::invalid("fields", "1 to 20 fields"));
        }
        let settings = &visitor.widget.settings;
        let mut keys = HashSet::new();
        let mut personal_sent = false;
        for (i, field) in fields.iter().enumerate() {
            let declared = settings.field(&field.key).ok_or_else(|| {
                Error::invalid(format!("fields[{i}].key"), "not a field of this widget")
            })?;
            if !keys.insert(field.key.as_str()) {
                return Err(Error::invalid(format!("fields[{i}].key"), "sent twice"));
            }
            let chars = field.value.chars().count();
            if field.value.trim().is_empty()
                || chars > MAX_VALUE_CHARS
                || field.value.chars().any(char::is_control)
            {
                return Err(Error::invalid(
                    format!("fields[{i}].value"),
                    "1 to 1,000 characters, no control characters",
                ));
            }
            if declared.personal {
                if !field.released {
                    return Err(Error::invalid(
                        format!("fields[{i}].released"),
                        "a personal field is sent only once the visitor releases it",
                    ));
                }
                personal_sent = true;
            }
        }
        let (tenant, widget, visit) = (visitor.tenant, visitor.widget.row.id, visitor.visit.id);
        let key = self.keys.user_key(tenant, visit).await?;
        let mut sealed = Vec::with_capacity(fields.len());
        for field in &fields {
            let personal = settings.field(&field.key).is_some_and(|f| f.personal);
            let value = key.seal(&field_context(visit, &field.key), field.value.as_bytes())?;
            sealed.push((field.key.clone(), value, personal));
        }
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                // Serialised with GiveConsent: a decline cannot slip between the check and the
                // insert.
                lock_visit(conn, visit).await?;
                if personal_sent {
                    let current = widgets::current_text(conn, widget).await?;
                    let consented = latest_consent(conn, visit)
                        .await?
                        .is_some_and(|c| c.granted && c.version == current.version);
                    if !consented {
                        return Err(Error::ConsentRequired);
                    }
                }
                if only_stored {
                    let keys: Vec<&str> = sealed.iter().map(|(key, _, _)| key.as_str()).collect();
                    let held: Vec<String> = visit_fields::table
                        .filter(visit_fields::visit_id.eq(visit))
                        .filter(visit_fields::key.eq_any(&keys))
                        .select(visit_fields::key)
                        .load(conn)
                        .await?;
                    if let Some(i) = keys.iter().position(|key| !held.iter().any(|h| h == key)) {
                        return Err(Error::invalid(
                            format!("fields[{i}].key"),
                            "not stored: only fields given before are corrected",
                        ));
                    }
                }
                let at = now();
                for (key, value, personal) in sealed {
                    let released = personal.then_some(at);
                    diesel::insert_into(visit_fields::table)
                        .values((
                            visit_fields::visit_id.eq(visit),
                            visit_fields::key.eq(&key),
                            visit_fields::sealed.eq(&value),
                            visit_fields::personal.eq(personal),
                            visit_fields::released_at.eq(released),
                            visit_fields::updated_at.eq(at),
                        ))
                        .on_conflict((visit_fields::visit_id, visit_fields::key))
                        .do_update()
                        .set((
                            visit_fields::sealed.eq(&value),
                            visit_fields::personal.eq(personal),
                            visit_fields::released_at.eq(released),
                            visit_fields::updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await?;
                }
                let stored: Vec<String> = visit_fields::table
                    .filter(visit_fields::visit_id.eq(visit))
                    .order(visit_fields::key.asc())
                    .select(visit_fields::key)
                    .load(conn)
                    .await?;
                Ok(stored)
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn cb2_the_first_of_the_visitors_languages_the_widget_offers_is_chosen() {
        let offered = ["en", "de"];
        let choose = |preferred: &[&str]| choose_language(&tags(preferred), &offered, "en");
        assert_eq!(choose(&["de-AT", "en"]), "de", "by the primary subtag");
        assert_eq!(choose(&["fr", "DE"]), "de", "case does not matter");
        assert_eq!(choose(&["en_GB", "de"]), "en");
        assert_eq!(
            choose(&["fr-FR", "it"]),
            "en",
            "none offered: the widget's own"
        );
        assert_eq!(choose(&[]), "en");
        assert_eq!(choose(&["", "-de"]), "en", "odd tags choose nothing");
        assert!(check_languages(&tags(&["de"; 10])).is_ok());
        assert!(check_languages(&tags(&["de"; 11])).is_err());
        assert!(check_languages(&[format!("de-{}", "x".repeat(33))]).is_err());
    }
}
