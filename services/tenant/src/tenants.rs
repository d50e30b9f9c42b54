//! The tenant domain: provisioning, reading, settings, deletion (DC2, OC6, TM3, BX3, GR2,
//! GR3, GR4). Testable without gRPC; the adapter in `api.rs` only translates.
//!
//! Provisioning creates the tenant's role and schema, applies the tenant migrations, creates
//! the owner account with its first chat code, generates the tenant key and stores it wrapped
//! by the master key, and inserts the tenant row — in one transaction, so any failure leaves
//! nothing behind. A tenant placed on another database (TM3) gets its schema there; that
//! transaction is prepared (two-phase commit) and committed only once the control-plane rows
//! are, so the two databases never disagree.

use hafen_events::{Actor, Event};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, Utc};
use diesel::Connection;
use diesel::connection::SimpleConnection;
use hafen_crypto::{DataKey, MasterKey, Purpose};
use hafen_store::accounts::{self, DisplayName, NewChatCode, NewUser, Username};
use hafen_store::control::{self, NewTenant, TenantRow};
use hafen_store::keystore;
use hafen_store::tenancy::{self, SyncConnection};
use hafen_store::{Databases, Pool, TenantId};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::Error;
use crate::settings::{Settings, SettingsExt as _};

pub use hafen_store::DEFAULT_DATABASE;

/// Device label of the owner's first chat code.
const OWNER_DEVICE_LABEL: &str = "first device";

/// The label of the chat code an operator's recovery issues.
const RECOVERED_DEVICE_LABEL: &str = "recovered by the operator";

/// Prefix of the two-phase-commit ids of provisioning on another database.
const PREPARED_PREFIX: &str = "hafen_provision_";

/// Prefix of the two-phase-commit ids of a new tenant's key in the key store.
const KEY_PROVISION_PREFIX: &str = "hafen_keys_provision_";

/// Prefix of the two-phase-commit ids of a deleted tenant's keys in the key store.
const KEY_DELETION_PREFIX: &str = "hafen_keys_delete_";

/// What the service accepts at creation.
#[derive(Debug, Clone)]
pub struct Policy {
    /// DPA versions customers may accept.
    pub dpa_versions: Vec<String>,
    /// Hosting regions tenants may be placed in.
    pub regions: Vec<String>,
    /// bcrypt cost of the owner's password hash.
    pub bcrypt_cost: u32,
    /// Minimum password length, in characters.
    pub min_password_chars: usize,
}

/// A validated CreateTenant request.
#[derive(Debug, Clone)]
pub struct NewTenantInput {
    /// Client request id, for idempotent retries.
    pub request_id: Option<Uuid>,
    /// Unique short name.
    pub slug: Slug,
    /// Organisation name.
    pub display_name: DisplayName,
    /// Owner login name.
    pub owner_username: Username,
    /// Owner display name.
    pub owner_display_name: DisplayName,
    /// Owner password (checked against the policy).
    pub owner_password: Zeroizing<String>,
    /// Accepted DPA version.
    pub dpa_version: String,
    /// Hosting region.
    pub region: String,
    /// Placement (a configured database name).
    pub database: String,
}

/// The result of CreateTenant.
#[derive(Debug, Clone)]
pub struct Created {
    /// The tenant.
    pub tenant: TenantRow,
    /// The owner's id.
    pub owner_user_id: Uuid,
    /// The owner's first chat code, shown once.
    pub owner_chat_code: Zeroizing<String>,
    /// Its id.
    pub owner_chat_code_id: Uuid,
}

/// A tenant slug: lowercase letters, digits and hyphens, 3-40 characters, no leading or
/// trailing hyphen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slug(String);

impl Slug {
    /// Parses a slug.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let ok = (3..=40).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with('-')
            && !value.ends_with('-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(Error::invalid(
                "slug",
                "must be 3-40 characters of a-z, 0-9 and '-', not starting or ending with '-'",
            ))
        }
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A named database a tenant can be placed on, by URL.
pub type Placements = BTreeMap<String, String>;

/// Which provisioning step a test wants to fail after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After the schema, role, migrations and owner exist, before the control-plane rows.
    AfterSchema,
    /// After everything, just before commit.
    BeforeCommit,
}

/// The tenant domain service.
#[derive(Clone)]
pub struct Tenants {
    inner: Arc<Inner>,
}

struct Inner {
    databases: Databases,
    /// Where session revocations are announced when a tenant is deleted.
    redis: Option<hafen_authn::Redis>,
    /// Low-priority threads for password hashing.
    cpu: hafen_platform::cpu::CpuPool,
    master: MasterKey,
    /// Where `master` was read from: read again for each new tenant, so a tenant created
    /// after a rotation gets its key wrapped under the current version.
    master_file: Option<std::path::PathBuf>,
    /// Users' keys, for reading message bodies into an export (GR5).
    keys: hafen_store::keyring::KeyRing,
    /// Limits the owner's password confirmations (DeleteTenant), with the auth service's.
    limiter: hafen_authn::limits::Limiter,
    chat_code_pepper: DataKey,
    /// Opens the owner's TOTP secret (DeleteTenant's second factor).
    totp_key: DataKey,
    policy: Policy,
    /// 0: none; otherwise a [`FailPoint`] as `1 + index`.
    fail_at: AtomicU8,
    /// Delivers the outbox to the audit service, once started.
    relay: std::sync::OnceLock<hafen_events::Relay>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants")
            .field("databases", &self.inner.databases)
            .finish_non_exhaustive()
    }
}

/// Context string binding a wrapped tenant key to its tenant.
pub fn tenant_key_context(tenant: &TenantId) -> Vec<u8> {
    hafen_crypto::keys::tenant_key_context(tenant.as_uuid().as_bytes())
}

/// The keyed hash a chat code is stored as: HMAC under a master-derived pepper, bound to the
/// tenant, so equal codes in two tenants hash differently.
pub fn chat_code_hash(pepper: &[u8], tenant: &TenantId, code: &str) -> [u8; 32] {
    hafen_crypto::secret::keyed_hash(pepper, &[tenant.as_uuid().as_bytes(), code.as_bytes()])
}

impl Tenants {
    /// The service over `databases`, wrapping tenant keys with `master` (as read from
    /// `master_file`, which is read again for each new tenant and for tenant keys wrapped under
    /// a version `master` lacks); deleting a tenant announces the end of its sessions through
    /// `redis`.
    pub fn new(
        databases: Databases,
        master: MasterKey,
        master_file: Option<std::path::PathBuf>,
        policy: Policy,
        redis: Option<hafen_authn::Redis>,
    ) -> Self {
        let chat_code_pepper = Purpose::ChatCodePepper.derive(&master);
        let capacity = std::num::NonZeroUsize::MIN.saturating_add(999);
        let keys = match &master_file {
            Some(path) => hafen_store::keyring::KeyRing::reloading(
                databases.clone(),
                master.clone(),
                path.clone(),
                capacity,
            ),
            None => hafen_store::keyring::KeyRing::new(databases.clone(), master.clone(), capacity),
        };
        let totp_key = Purpose::TotpSecrets.derive(&master);
        let limiter = hafen_authn::limits::Limiter::new(
            redis.clone(),
            hafen_authn::limits::LimitPolicy::default(),
        );
        Self {
            inner: Arc::new(Inner {
                databases,
                redis,
                cpu: hafen_platform::cpu::CpuPool::new("hafen-tenant-hash"),
                master,
                master_file,
                keys,
                limiter,
                chat_code_pepper,
                totp_key,
                policy,
                fail_at: AtomicU8::new(0),
                relay: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Forgets a tenant's keys when another replica announces its deletion.
    pub fn follow_deletions(&self, deletions: tokio::sync::broadcast::Receiver<Uuid>) {
        self.inner.keys.follow(deletions);
    }

    /// Wakes `relay` whenever audit events were committed.
    pub fn set_relay(&self, relay: hafen_events::Relay) {
        let _ = self.inner.relay.set(relay);
    }

    /// Tells the relay that audit events were committed.
    fn audited(&self) {
        if let Some(relay) = self.inner.relay.get() {
            relay.wake();
        }
    }

    /// Commits `event` on its own (an operator's read, which changes nothing).
    pub async fn record_alone(&self, event: &Event) {
        hafen_events::record_alone(self.pool(), event).await;
        self.audited();
    }

    /// For tests: make provisioning fail at `point` (or never, with `None`), to prove that a
    /// failure leaves nothing behind.
    #[doc(hidden)]
    pub fn set_fail_point(&self, point: Option<FailPoint>) {
        let value = match point {
            None => 0,
            Some(FailPoint::AfterSchema) => 1,
            Some(FailPoint::BeforeCommit) => 2,
        };
        self.inner.fail_at.store(value, Ordering::SeqCst);
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The main database's pool.
    pub fn pool(&self) -> &Pool {
        self.inner.databases.main()
    }

    fn database_url(&self, name: &str) -> Option<&str> {
        self.inner.databases.url(name)
    }

    /// Names of all databases tenants can live on, the default first.
    pub fn database_names(&self) -> Vec<String> {
        self.inner.databases.names()
    }

    /// Checks the parts of a CreateTenant request that depend on configuration.
    pub fn check_choices(&self, input: &NewTenantInput) -> Result<(), Error> {
        let policy = &self.inner.policy;
        if !policy.dpa_versions.contains(&input.dpa_version) {
            return Err(Error::invalid(
                "dpa_version",
                format!("must be one of {:?}", policy.dpa_versions),
            ));
        }
        if !policy.regions.contains(&input.region) {
            return Err(Error::invalid(
                "region",
                format!("must be one of {:?}", policy.regions),
            ));
        }
        if self.database_url(&input.database).is_none() {
            return Err(Error::invalid(
                "database",
                format!("must be one of {:?}", self.database_names()),
            ));
        }
        match hafen_crypto::password::check_policy(&input.owner_password, policy.min_password_chars)
        {
            Ok(()) => Ok(()),
            Err(violation) => Err(Error::PasswordRefused(violation)),
        }
    }

    /// Creates a tenant (see the module documentation). A retry with the same request id
    /// returns the tenant created first.
    pub async fn create(&self, input: NewTenantInput) -> Result<Created, Error> {
        self.check_choices(&input)?;
        if let Some(request_id) = input.request_id {
            let mut conn = self.pool().get().await.map_err(hafen_store::Error::from)?;
            if let Some(existing) = control::find_by_request_id(&mut conn, request_id).await? {
                return self.retry(existing, &input).await;
            }
        }
        {
            let mut conn = self.pool().get().await.map_err(hafen_store::Error::from)?;
            if control::find_by_slug(&mut conn, input.slug.as_str())
                .await?
                .is_some()
            {
                return Err(Error::SlugTaken);
            }
        }

        // The password is hashed on the low-priority CPU pool while a blocking thread
        // provisions.
        let password = input.owner_password.clone();
        let cost = self.inner.policy.bcrypt_cost;
        let cpu = self.inner.cpu.clone();
        let (hash_tx, hash_rx) = std::sync::mpsc::channel::<Result<String, Error>>();
        tokio::spawn(async move {
            let hash = cpu
                .run(move || hafen_crypto::password::hash(&password, cost))
                .await
                .map_err(Error::from)
                .and_then(|hashed| hashed.map_err(Error::from));
            let _ = hash_tx.send(hash);
        });

        let this = self.clone();
        tokio::task::spawn_blocking(move || this.provision_blocking(&input, &hash_rx)).await?
    }

    fn provision_blocking(
        &self,
        input: &NewTenantInput,
        password_hash: &std::sync::mpsc::Receiver<Result<String, Error>>,
    ) -> Result<Created, Error> {
        let inner = &self.inner;
        let tenant = TenantId::generate();
        let now = hafen_store::now();
        let owner_id = Uuid::now_v7();
        let code_id = Uuid::now_v7();
        let code = Zeroizing::new(hafen_crypto::secret::chat_code()?);
        let code_hash = chat_code_hash(inner.chat_code_pepper.expose(), &tenant, &code);
        let key = DataKey::generate()?;
        let master = match &inner.master_file {
            Some(path) => MasterKey::load(path)?,
            None => inner.master.clone(),
        };
        let key_version = master.current_version();
        let wrapped = master.wrap(&key, &tenant_key_context(&tenant))?;
        let settings = Settings::default().to_json();
        let row = NewTenant {
            id: tenant.as_uuid(),
            slug: input.slug.as_str(),
            display_name: input.display_name.as_str(),
            status: control::status::ACTIVE,
            region: &input.region,
            dpa_version: &input.dpa_version,
            dpa_accepted_at: now,
            dpa_accepted_by: owner_id,
            database_name: &input.database,
            create_request_id: input.request_id,
            settings,
            created_at: now,
            updated_at: now,
        };

        let populate = |conn: &mut SyncConnection| -> Result<(), Error> {
            let hash = password_hash
                .recv()
                .map_err(|_| Error::Config("password hashing stopped".into()))??;
            accounts::insert_user_with_code(
                conn,
                &NewUser {
                    id: owner_id,
                    username: input.owner_username.as_str(),
                    display_name: input.owner_display_name.as_str(),
                    password_hash: &hash,
                    role: accounts::role::OWNER,
                    status: "active",
                    created_at: now,
                    updated_at: now,
                },
                &NewChatCode {
                    id: code_id,
                    user_id: owner_id,
                    device_label: OWNER_DEVICE_LABEL,
                    code_hash: &code_hash,
                    state: "active",
                    created_at: now,
                },
            )?;
            Ok(())
        };
        let mut event = Event::new(Some(tenant.as_uuid()), Actor::Operator, "tenant.created")
            .target("tenant", tenant.as_uuid())
            .attribute("owner_user_id", owner_id)
            .attribute("owner_chat_code_id", code_id)
            .attribute("database", &input.database)
            .attribute("region", &input.region)
            .attribute("dpa_version", &input.dpa_version);
        if let Some(request_id) = input.request_id {
            event = event.request_id(request_id);
        }
        let control_rows = |conn: &mut SyncConnection| -> Result<(), Error> {
            self.fail_if(FailPoint::AfterSchema, &tenant)?;
            control::blocking::insert_tenant(conn, &row).map_err(|err| {
                if hafen_store::is_unique_violation(&err, "tenants_slug_key") {
                    Error::SlugTaken
                } else {
                    Error::from(err)
                }
            })?;
            hafen_events::record_sync(conn, &event)?;
            self.fail_if(FailPoint::BeforeCommit, &tenant)
        };

        // The key goes to the key store in the first phase of a two-phase commit, committed
        // only once the tenant's rows are (recovery commits it later if this process stops in
        // between: see `resolve_prepared`).
        let mut keys = hafen_store::connect::establish_sync(inner.databases.keystore_url())
            .map_err(hafen_store::Error::from)?;
        let key_gid = format!("{KEY_PROVISION_PREFIX}{}", tenant.schema());
        keys.transaction(|conn| -> Result<(), Error> {
            keystore::blocking::insert_tenant_key(conn, tenant.as_uuid(), key_version, &wrapped)?;
            conn.batch_execute(&format!("PREPARE TRANSACTION '{key_gid}'"))?;
            Ok(())
        })?;
        let rows = self.provision_rows(input, &tenant, populate, control_rows);
        let verb = if rows.is_ok() { "COMMIT" } else { "ROLLBACK" };
        if let Err(err) = keys.batch_execute(&format!("{verb} PREPARED '{key_gid}'")) {
            tracing::error!(tenant_id = %tenant, action = verb, error = %err, "prepared tenant key not resolved");
        }
        rows?;
        self.audited();
        tracing::info!(tenant_id = %tenant, database = %input.database, "tenant provisioned");
        Ok(self.created(&row, owner_id, code_id, code))
    }

    /// The tenant's schema and its control-plane rows, committed together (on the main
    /// database) or in two phases (on a placement database).
    fn provision_rows(
        &self,
        input: &NewTenantInput,
        tenant: &TenantId,
        populate: impl FnOnce(&mut SyncConnection) -> Result<(), Error>,
        control_rows: impl FnOnce(&mut SyncConnection) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let tenant = *tenant;
        let mut main = hafen_store::connect::establish_sync(inner.databases.main_url())
            .map_err(hafen_store::Error::from)?;
        if input.database == DEFAULT_DATABASE {
            main.transaction(|conn| {
                tenancy::create_schema(conn, &tenant, populate)?;
                control_rows(conn)
            })?;
        } else {
            let url = self
                .database_url(&input.database)
                .ok_or_else(|| Error::invalid("database", "unknown database"))?;
            let mut placed =
                hafen_store::connect::establish_sync(url).map_err(hafen_store::Error::from)?;
            let gid = format!("{PREPARED_PREFIX}{}", tenant.schema());
            // PREPARE TRANSACTION ends the transaction on this session; diesel's COMMIT
            // that follows is a no-op (PostgreSQL only warns).
            placed.transaction(|conn| {
                tenancy::create_schema(conn, &tenant, populate)?;
                conn.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                    .map_err(Error::from)
            })?;
            match main.transaction(|conn| control_rows(conn)) {
                Ok(()) => {
                    if let Err(err) = placed.batch_execute(&format!("COMMIT PREPARED '{gid}'")) {
                        // The rows are committed, so recovery commits this later.
                        tracing::error!(tenant_id = %tenant, error = %err, "commit of prepared provisioning failed");
                    }
                }
                Err(err) => {
                    if let Err(rollback) =
                        placed.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                    {
                        tracing::error!(tenant_id = %tenant, error = %rollback, "rollback of prepared provisioning failed");
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn created(
        &self,
        row: &NewTenant<'_>,
        owner_id: Uuid,
        code_id: Uuid,
        code: Zeroizing<String>,
    ) -> Created {
        Created {
            tenant: TenantRow {
                id: row.id,
                slug: Some(row.slug.to_owned()),
                display_name: Some(row.display_name.to_owned()),
                status: row.status.to_owned(),
                region: row.region.to_owned(),
                dpa_version: row.dpa_version.to_owned(),
                dpa_accepted_at: row.dpa_accepted_at,
                dpa_accepted_by: owner_id,
                database_name: row.database_name.to_owned(),
                create_request_id: row.create_request_id,
                settings: row.settings.clone(),
                created_at: row.created_at,
                updated_at: row.updated_at,
                deleted_at: None,
                audit_public_key: None,
            },
            owner_user_id: owner_id,
            owner_chat_code: code,
            owner_chat_code_id: code_id,
        }
    }

    fn fail_if(&self, point: FailPoint, tenant: &TenantId) -> Result<(), Error> {
        let armed = match self.inner.fail_at.load(Ordering::SeqCst) {
            1 => Some(FailPoint::AfterSchema),
            2 => Some(FailPoint::BeforeCommit),
            _ => None,
        };
        if armed == Some(point) {
            let at = match point {
                FailPoint::AfterSchema => "after schema",
                FailPoint::BeforeCommit => "before commit",
            };
            return Err(Error::Injected(at, *tenant));
        }
        Ok(())
    }

    /// A CreateTenant retry: same parameters → the first result; a fresh owner chat code while
    /// the owner has never logged in (codes are stored hashed, the first cannot be repeated).
    async fn retry(&self, existing: TenantRow, input: &NewTenantInput) -> Result<Created, Error> {
        let same = existing.slug.as_deref() == Some(input.slug.as_str())
            && existing.display_name.as_deref() == Some(input.display_name.as_str())
            && existing.region == input.region
            && existing.dpa_version == input.dpa_version
            && existing.database_name == input.database;
        if !same {
            return Err(Error::RequestIdConflict);
        }
        let tenant = TenantId::from(existing.id);
        let owner = existing.dpa_accepted_by;
        let pepper = DataKey::from_bytes(*self.inner.chat_code_pepper.expose());
        let pool = self.pool_for(&existing.database_name)?;
        let issued = hafen_store::with_tenant(&pool, &tenant, move |conn| {
            Box::pin(async move { reissue_owner_code(conn, &tenant, owner, pepper.expose()).await })
        })
        .await?;
        let (code, code_id) = issued.unwrap_or_default();
        Ok(Created {
            tenant: existing,
            owner_user_id: owner,
            owner_chat_code: Zeroizing::new(code),
            owner_chat_code_id: code_id,
        })
    }

    /// The pool of the database named `name` (the main pool for the default).
    pub fn pool_for(&self, name: &str) -> Result<Pool, Error> {
        self.inner
            .databases
            .pool(name)
            .cloned()
            .ok_or_else(|| Error::Config(format!("tenant placed on unknown database {name}")))
    }

    /// The tenant with `id`, deleted ones included.
    pub async fn get(&self, id: Uuid) -> Result<TenantRow, Error> {
        let mut conn = self.pool().get().await.map_err(hafen_store::Error::from)?;
        control::find(&mut conn, id).await?.ok_or(Error::NotFound)
    }

    /// The active tenant with `slug`.
    pub async fn get_by_slug(&self, slug: &str) -> Result<TenantRow, Error> {
        let mut conn = self.pool().get().await.map_err(hafen_store::Error::from)?;
        control::find_by_slug(&mut conn, slug)
            .await?
            .ok_or(Error::NotFound)
    }

    /// A page of tenants after `after`, oldest first; one more than `limit` is fetched to
    /// know whether another page follows.
    pub async fn list(
        &self,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
        include_deleted: bool,
    ) -> Result<(Vec<TenantRow>, bool), Error> {
        let mut conn = self.pool().get().await.map_err(hafen_store::Error::from)?;
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let mut rows = control::list(&mut conn, after, fetch, include_deleted).await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok((rows, more))
    }

    /// Recovers the owner of `tenant` who lost every device: revokes all of the owner's chat
    /// codes (ending their sessions: a remote wipe) and issues one new code, returned once.
    /// Audited in the tenant's chain as the operator's act.
    pub async fn recover_owner(&self, tenant: Uuid) -> Result<(Zeroizing<String>, Uuid), Error> {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use hafen_store::schema::{chat_codes, users};

        let row = self.get(tenant).await?;
        if row.status != control::status::ACTIVE {
            return Err(Error::NotFound);
        }
        let tenant_id = TenantId::from(tenant);
        let pool = self.pool_for(&row.database_name)?;
        let pepper = DataKey::from_bytes(*self.inner.chat_code_pepper.expose());
        let code = Zeroizing::new(hafen_crypto::secret::chat_code()?);
        let hash = chat_code_hash(pepper.expose(), &tenant_id, &code);
        let (owner, code_id) = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                let owner: Uuid = users::table
                    .filter(users::role.eq(accounts::role::OWNER))
                    .select(users::id)
                    .first(conn)
                    .await?;
                let now = Utc::now();
                diesel::update(
                    chat_codes::table
                        .filter(chat_codes::user_id.eq(owner))
                        .filter(chat_codes::state.eq("active")),
                )
                .set((
                    chat_codes::state.eq("revoked"),
                    chat_codes::revoked_at.eq(now),
                ))
                .execute(conn)
                .await?;
                let id = Uuid::now_v7();
                diesel::insert_into(chat_codes::table)
                    .values(&NewChatCode {
                        id,
                        user_id: owner,
                        device_label: RECOVERED_DEVICE_LABEL,
                        code_hash: &hash,
                        state: "active",
                        created_at: now,
                    })
                    .execute(conn)
                    .await?;
                let event = Event::new(Some(tenant), Actor::Operator, "tenant.owner.recovered")
                    .target("user", owner)
                    .attribute("chat_code_id", id);
                hafen_events::record(conn, &event).await?;
                Ok::<_, Error>((owner, id))
            })
        })
        .await?;
        let ended = {
            let mut conn = self.inner.databases.main_connection().await?;
            hafen_store::sessions::revoke_all(
                &mut conn,
                tenant,
                hafen_store::sessions::Scope::User {
                    user: owner,
                    keep: None,
                },
                hafen_authn::RevokeReason::DeviceWiped.as_str(),
            )
            .await?
        };
        if let Some(redis) = &self.inner.redis {
            redis
                .announce(&ended, hafen_authn::RevokeReason::DeviceWiped)
                .await;
        }
        self.audited();
        tracing::info!(tenant_id = %tenant, chat_code_id = %code_id, sessions = ended.len(), "owner recovered by the operator");
        Ok((code, code_id))
    }

    /// Streams the export of `tenant` for its `owner` (GR5; see [`crate::export`]), after
    /// recording it in the audit log: chunks of at most `chunk` bytes.
    pub async fn export(
        &self,
        tenant: Uuid,
        owner: Uuid,
        chunk: usize,
    ) -> Result<
        tokio::sync::mpsc::Receiver<
            Result<hafen_proto::tenant::v1::ExportTenantResponse, tonic::Status>,
        >,
        Error,
    > {
        let event = Event::new(Some(tenant), Actor::User(owner), "tenant.exported")
            .target("tenant", tenant);
        hafen_store::in_transaction(self.pool(), move |conn| {
            Box::pin(async move {
                hafen_events::record(conn, &event).await?;
                Ok::<_, Error>(())
            })
        })
        .await?;
        self.audited();
        tracing::info!(tenant_id = %tenant, "tenant export started");
        Ok(crate::export::stream(
            self.inner.databases.clone(),
            self.inner.keys.clone(),
            TenantId::from(tenant),
            owner,
            chunk,
        ))
    }

    /// ExportUserData: audits the export of `user`'s data by `actor`, then streams it.
    pub async fn export_user(
        &self,
        tenant: Uuid,
        actor: Uuid,
        user: Uuid,
        chunk: usize,
    ) -> Result<
        tokio::sync::mpsc::Receiver<
            Result<hafen_proto::tenant::v1::ExportTenantResponse, tonic::Status>,
        >,
        Error,
    > {
        let id = TenantId::from(tenant);
        if !crate::user_export::exportable(&self.inner.databases, &id, user).await? {
            return Err(Error::NotFound);
        }
        let event = Event::new(
            Some(tenant),
            Actor::User(actor),
            "tenant.user_data_exported",
        )
        .target("user", user);
        hafen_store::in_transaction(self.pool(), move |conn| {
            Box::pin(async move {
                hafen_events::record(conn, &event).await?;
                Ok::<_, Error>(())
            })
        })
        .await?;
        self.audited();
        tracing::info!(tenant_id = %tenant, user_id = %user, "user data export started");
        let (databases, keys) = (self.inner.databases.clone(), self.inner.keys.clone());
        Ok(crate::export::stream_archive(
            id,
            chunk,
            move |pieces| async move {
                crate::user_export::read_user(&databases, &keys, &id, user, &pieces).await
            },
        ))
    }

    /// Applies a settings update (field mask relative to `TenantSettings`).
    /// `actor` is recorded in the audit event, with the names of the fields changed.
    pub async fn update_settings(
        &self,
        id: Uuid,
        update: &hafen_proto::tenant::v1::TenantSettings,
        paths: &[String],
        actor: Actor,
    ) -> Result<TenantRow, Error> {
        let current = self.get(id).await?;
        if current.status != control::status::ACTIVE {
            return Err(Error::NotFound);
        }
        let next = Settings::from_json(&current.settings).apply(update, paths)?;
        let fields = if paths.is_empty() {
            "all".to_owned()
        } else {
            paths.join(",")
        };
        let event = Event::new(Some(id), actor, "tenant.settings.updated")
            .target("tenant", id)
            .attribute("fields", fields)
            .attribute("retention_days", next.retention_days);
        let updated = hafen_store::in_transaction(self.pool(), move |conn| {
            Box::pin(async move {
                let row = control::update_settings(conn, id, next.to_json())
                    .await?
                    .ok_or(Error::NotFound)?;
                hafen_events::record(conn, &event).await?;
                Ok::<_, Error>(row)
            })
        })
        .await?;
        self.audited();
        // Every service that caches the settings drops them (messaging's masking rules).
        if let Some(redis) = &self.inner.redis {
            redis.announce_settings_changed(id).await;
        }
        Ok(updated)
    }

    /// Deletes a tenant for good (GR3): drops its schema and role, destroys its key, clears
    /// its name and settings, and writes the deletion log (GR4). Returns the deletion time.
    /// `actor` (the owner or the operator) is recorded in the audit event.
    pub async fn delete(
        &self,
        id: Uuid,
        confirm_slug: &str,
        actor: Actor,
    ) -> Result<DateTime<Utc>, Error> {
        let current = self.check_deletable(id, confirm_slug).await?;
        let this = self.clone();
        let event = Event::new(Some(id), actor, "tenant.deleted").target("tenant", id);
        let (deleted_at, sessions) =
            tokio::task::spawn_blocking(move || this.delete_blocking(&current, &event)).await??;
        self.audited();
        // The sessions are gone from PostgreSQL and the schema with them; the announcements
        // end cached sessions and drop the tenant's keys in every service (retried when
        // Redis is down; open streams recheck their sessions meanwhile).
        if let Some(redis) = &self.inner.redis {
            redis
                .announce(&sessions, hafen_authn::RevokeReason::TenantDeleted)
                .await;
            redis.announce_tenant_deleted(id).await;
        }
        Ok(deleted_at)
    }

    /// The tenant, if a deletion confirmed with `confirm_slug` can go ahead: it is active, the
    /// slug matches and no legal hold is in force. Checked before the owner's confirmation,
    /// so that a deletion refused anyway does not use up their TOTP code; the deletion itself
    /// checks the holds again, under a lock.
    pub async fn check_deletable(&self, id: Uuid, confirm_slug: &str) -> Result<TenantRow, Error> {
        use diesel::dsl::count_star;
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use hafen_store::schema::legal_holds;
        let current = self.get(id).await?;
        if current.status != control::status::ACTIVE {
            return Err(Error::NotFound);
        }
        if current.slug.as_deref() != Some(confirm_slug) {
            return Err(Error::invalid(
                "confirm_slug",
                "does not match the tenant's slug",
            ));
        }
        let tenant = TenantId::from(id);
        let pool = self.inner.databases.tenant_pool(&tenant).await?;
        let held: i64 = hafen_store::with_tenant(&pool, &tenant, move |conn| {
            Box::pin(async move {
                Ok::<_, Error>(
                    legal_holds::table
                        .filter(legal_holds::lifted_at.is_null())
                        .select(count_star())
                        .first(conn)
                        .await?,
                )
            })
        })
        .await?;
        if held > 0 {
            return Err(Error::LegalHold);
        }
        Ok(current)
    }

    fn delete_blocking(
        &self,
        tenant_row: &TenantRow,
        event: &Event,
    ) -> Result<(DateTime<Utc>, Vec<Uuid>), Error> {
        let tenant = TenantId::from(tenant_row.id);
        // Its keys are destroyed and the deletion logged in the key store in the first phase
        // of a two-phase commit, committed once the tenant is marked deleted, rolled back if
        // it is not (a legal hold set meanwhile, say); recovery resolves it if this process
        // stops in between (see `resolve_prepared`).
        let mut keys = hafen_store::connect::establish_sync(self.inner.databases.keystore_url())
            .map_err(hafen_store::Error::from)?;
        let key_gid = format!("{KEY_DELETION_PREFIX}{}", tenant.schema());
        keys.transaction(|conn| -> Result<(), Error> {
            keystore::blocking::destroy_tenant_keys(conn, tenant.as_uuid(), hafen_store::now())?;
            conn.batch_execute(&format!("PREPARE TRANSACTION '{key_gid}'"))?;
            Ok(())
        })?;
        let deleted = self.delete_rows(tenant_row, &tenant, event);
        let verb = if deleted.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        if let Err(err) = keys.batch_execute(&format!("{verb} PREPARED '{key_gid}'")) {
            tracing::error!(tenant_id = %tenant, action = verb, error = %err, "prepared key destruction not resolved");
        }
        let deleted_at = deleted?;
        tracing::info!(tenant_id = %tenant, "tenant deleted");
        Ok(deleted_at)
    }

    /// The tenant's schema dropped and its control-plane rows marked deleted (placement
    /// database first, then the main one).
    fn delete_rows(
        &self,
        tenant_row: &TenantRow,
        tenant: &TenantId,
        event: &Event,
    ) -> Result<(DateTime<Utc>, Vec<Uuid>), Error> {
        let tenant = *tenant;
        let mut main = hafen_store::connect::establish_sync(self.inner.databases.main_url())
            .map_err(hafen_store::Error::from)?;
        let deleted_at = if tenant_row.database_name == DEFAULT_DATABASE {
            main.transaction(|conn| -> Result<_, Error> {
                control::blocking::lock_active(conn, tenant.as_uuid())?.ok_or(Error::NotFound)?;
                if tenancy::holds_in_force(conn, &tenant)? {
                    return Err(Error::LegalHold);
                }
                tenancy::drop_schema(conn, &tenant)?;
                hafen_events::record_sync(conn, event)?;
                Ok(control::blocking::mark_deleted(conn, tenant.as_uuid())?)
            })?
        } else {
            // The data goes first; marking the tenant deleted follows. Both steps are
            // idempotent, so a failure in between is repaired by calling DeleteTenant again.
            let url = self
                .database_url(&tenant_row.database_name)
                .ok_or_else(|| Error::Config("tenant placed on an unknown database".into()))?;
            let mut placed =
                hafen_store::connect::establish_sync(url).map_err(hafen_store::Error::from)?;
            placed.transaction(|conn| -> Result<_, Error> {
                if tenancy::holds_in_force(conn, &tenant)? {
                    return Err(Error::LegalHold);
                }
                Ok(tenancy::drop_schema(conn, &tenant)?)
            })?;
            main.transaction(|conn| -> Result<_, Error> {
                control::blocking::lock_active(conn, tenant.as_uuid())?.ok_or(Error::NotFound)?;
                hafen_events::record_sync(conn, event)?;
                Ok(control::blocking::mark_deleted(conn, tenant.as_uuid())?)
            })?
        };
        Ok(deleted_at)
    }

    /// Checks the owner's confirmation of a deletion (GR3): their password, and a current
    /// TOTP code when they enrolled one. Never says which was wrong.
    pub async fn verify_owner(
        &self,
        tenant: Uuid,
        owner: Uuid,
        password: Zeroizing<String>,
        totp_code: &str,
    ) -> Result<(), Error> {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use hafen_store::schema::users;

        // Counted with the owner's other confirmations (ChangePassword): one budget for
        // guessing their password.
        let subject = format!("confirm:{owner}");
        self.inner
            .limiter
            .acquire(&subject)
            .await
            .map_err(Error::RateLimited)?;
        let tenant_id = TenantId::from(tenant);
        let pool = self.inner.databases.tenant_pool(&tenant_id).await?;
        let (hash, totp, role): (String, Option<Vec<u8>>, String) =
            hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
                Box::pin(async move {
                    users::table
                        .find(owner)
                        .filter(users::status.eq("active"))
                        .select((users::password_hash, users::totp_secret, users::role))
                        .first(conn)
                        .await
                        .optional()?
                        .ok_or(Error::ConfirmationFailed)
                })
            })
            .await?;
        if role != accounts::role::OWNER {
            return Err(Error::from(hafen_platform::status::permission_denied(
                "only the owner may delete the tenant",
            )));
        }
        let cost = self.inner.policy.bcrypt_cost;
        let verified = self
            .inner
            .cpu
            .run(move || hafen_crypto::password::verify(&password, &hash, cost))
            .await??;
        if !verified.matches {
            return Err(Error::ConfirmationFailed);
        }
        self.inner.limiter.succeeded(&subject).await;
        match totp {
            Some(sealed) => {
                if totp_code.is_empty() {
                    return Err(Error::TotpRequired);
                }
                // TOTP guesses are counted apart, as ConfirmTotp counts them.
                let guesses = format!("totp:{owner}");
                self.inner
                    .limiter
                    .acquire(&guesses)
                    .await
                    .map_err(Error::RateLimited)?;
                let secret = hafen_crypto::totp::open_secret(
                    &self.inner.totp_key,
                    owner.as_bytes(),
                    &sealed,
                )?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let step = hafen_crypto::totp::matching_step(&secret, totp_code, now)
                    .ok_or(Error::ConfirmationFailed)?;
                // A code confirms once: the same code cannot be replayed within its window.
                let fresh = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
                    Box::pin(async move {
                        Ok::<_, Error>(
                            hafen_store::accounts::use_totp_step(conn, owner, step).await?,
                        )
                    })
                })
                .await?;
                if !fresh {
                    return Err(Error::ConfirmationFailed);
                }
                self.inner.limiter.succeeded(&guesses).await;
            }
            None if !totp_code.is_empty() => {
                return Err(Error::invalid(
                    "totp_code",
                    "the owner has not enrolled TOTP: leave it empty",
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// See [`resolve_prepared`].
    pub async fn resolve_prepared(&self, min_age: std::time::Duration) -> Result<usize, Error> {
        let databases = &self.inner.databases;
        resolve_prepared(
            databases.main_url(),
            databases.keystore_url(),
            &databases.placements(),
            min_age,
        )
        .await
    }
}

/// Resolves two-phase commits left prepared by a crash: provisioning on placement databases
/// and a new tenant's key in the key store at `keystore_url` are committed when the tenant row
/// exists on the main database at `main_url`; a deleted tenant's key destruction is committed
/// when the tenant is marked deleted there; each is rolled back otherwise. Only transactions
/// older than `min_age` are touched, so provisioning and deletion in flight are left alone.
/// Returns how many were resolved.
pub async fn resolve_prepared(
    main_url: &str,
    keystore_url: &str,
    placements: &Placements,
    min_age: std::time::Duration,
) -> Result<usize, Error> {
    let main_url = main_url.to_owned();
    let keystore_url = keystore_url.to_owned();
    let placements = placements.clone();
    tokio::task::spawn_blocking(move || {
        let keys = resolve_prepared_keys(&main_url, &keystore_url, min_age)?;
        Ok(keys + resolve_prepared_blocking(&main_url, &placements, min_age)?)
    })
    .await?
}

/// The ids of this database's prepared transactions that match the `LIKE` pattern `like` and
/// are older than `min_age`.
fn stale_prepared(
    conn: &mut SyncConnection,
    like: &str,
    min_age: std::time::Duration,
) -> Result<Vec<String>, Error> {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::Text)]
        gid: String,
    }
    let stale: Vec<Prepared> = diesel::sql_query(
        "SELECT gid FROM pg_prepared_xacts \
         WHERE database = current_database() AND gid LIKE $2 \
         AND prepared <= now() - make_interval(secs => $1)",
    )
    .bind::<diesel::sql_types::Double, _>(min_age.as_secs_f64())
    .bind::<diesel::sql_types::Text, _>(like)
    .load(conn)?;
    Ok(stale.into_iter().map(|p| p.gid).collect())
}

fn resolve_prepared_keys(
    main_url: &str,
    keystore_url: &str,
    min_age: std::time::Duration,
) -> Result<usize, Error> {
    let mut keys =
        hafen_store::connect::establish_sync(keystore_url).map_err(hafen_store::Error::from)?;
    let stale = stale_prepared(&mut keys, "hafen\\_keys\\_%", min_age)?;
    if stale.is_empty() {
        return Ok(0);
    }
    let mut main =
        hafen_store::connect::establish_sync(main_url).map_err(hafen_store::Error::from)?;
    let mut resolved = 0;
    for gid in stale {
        let (deletion, schema) = if let Some(schema) = gid.strip_prefix(KEY_DELETION_PREFIX) {
            (true, schema)
        } else if let Some(schema) = gid.strip_prefix(KEY_PROVISION_PREFIX) {
            (false, schema)
        } else {
            continue;
        };
        let Some(tenant) = TenantId::from_schema(schema) else {
            continue;
        };
        let status = control::blocking::status(&mut main, tenant.as_uuid())?;
        let done = if deletion {
            status.as_deref() == Some(control::status::DELETED)
        } else {
            status.is_some()
        };
        let verb = if done { "COMMIT" } else { "ROLLBACK" };
        keys.batch_execute(&format!("{verb} PREPARED '{gid}'"))?;
        tracing::warn!(tenant_id = %tenant, action = verb, deletion, "resolved a prepared key change");
        resolved += 1;
    }
    Ok(resolved)
}

fn resolve_prepared_blocking(
    main_url: &str,
    placements: &Placements,
    min_age: std::time::Duration,
) -> Result<usize, Error> {
    let mut main =
        hafen_store::connect::establish_sync(main_url).map_err(hafen_store::Error::from)?;
    let mut resolved = 0;
    for url in placements.values() {
        let mut placed =
            hafen_store::connect::establish_sync(url).map_err(hafen_store::Error::from)?;
        let stale = stale_prepared(&mut placed, "hafen\\_provision\\_%", min_age)?;
        for gid in stale {
            let Some(tenant) = gid
                .strip_prefix(PREPARED_PREFIX)
                .and_then(TenantId::from_schema)
            else {
                continue;
            };
            let exists = control::blocking::exists(&mut main, tenant.as_uuid())?;
            let verb = if exists { "COMMIT" } else { "ROLLBACK" };
            placed.batch_execute(&format!("{verb} PREPARED '{gid}'"))?;
            tracing::warn!(tenant_id = %tenant, action = verb, "resolved prepared provisioning");
            resolved += 1;
        }
    }
    Ok(resolved)
}

/// Revokes the owner's unused chat codes and issues a fresh one, unless the owner has logged
/// in already (then nothing is issued and `None` returned).
async fn reissue_owner_code(
    conn: &mut diesel_async::AsyncPgConnection,
    tenant: &TenantId,
    owner: Uuid,
    pepper: &[u8],
) -> Result<Option<(String, Uuid)>, Error> {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use hafen_store::schema::chat_codes;

    let used: i64 = chat_codes::table
        .filter(chat_codes::user_id.eq(owner))
        .filter(chat_codes::last_used_at.is_not_null())
        .count()
        .get_result(conn)
        .await?;
    if used > 0 {
        return Ok(None);
    }
    let now = Utc::now();
    diesel::update(
        chat_codes::table
            .filter(chat_codes::user_id.eq(owner))
            .filter(chat_codes::state.eq("active")),
    )
    .set((
        chat_codes::state.eq("revoked"),
        chat_codes::revoked_at.eq(now),
    ))
    .execute(conn)
    .await?;
    let code = hafen_crypto::secret::chat_code()?;
    let id = Uuid::now_v7();
    diesel::insert_into(chat_codes::table)
        .values(&NewChatCode {
            id,
            user_id: owner,
            device_label: OWNER_DEVICE_LABEL,
            code_hash: &chat_code_hash(pepper, tenant, &code),
            state: "active",
            created_at: now,
        })
        .execute(conn)
        .await?;
    Ok(Some((code, id)))
}
