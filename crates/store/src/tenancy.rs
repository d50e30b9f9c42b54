//! Tenant isolation by PostgreSQL itself (DC2, OC6, BX3).
//!
//! Each tenant has a schema `t_<id as 32 hex digits>` owned by a role of the same name
//! (NOLOGIN). The services' login role is a member of every tenant role (NOINHERIT) and has no
//! rights of its own on tenant schemas, so tenant data is reachable only inside
//! [`with_tenant`], whose transaction first switches role and search path to the tenant:
//! a query that forgets its tenant fails, and a query for tenant A cannot read tenant B.
//! The one exception is a connection that a single tenant's task keeps to itself (the
//! messaging committer): [`enter_session`] scopes its whole session, until the pool resets
//! it on return.
//!
//! Creating, migrating and dropping tenant schemas runs synchronously (diesel's migration
//! harness is synchronous) on a [`SyncConnection`], on the blocking pool.

use std::fmt;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sql_types::Text;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::prepared::{Bind, Prepared, bind};

/// The tenant-schema migrations, embedded at build time. Every tenant schema keeps its own
/// `__diesel_schema_migrations`.
pub const TENANT_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/tenant");

/// A synchronous connection for DDL and migrations (use it on the blocking pool).
pub type SyncConnection = AsyncConnectionWrapper<AsyncPgConnection>;

/// A tenant's id. Its schema and role are both named [`TenantId::schema`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Uuid);

impl TenantId {
    /// A new, time-ordered id (UUID v7).
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Name of the tenant's schema and role: `t_` and 32 hex digits. Only hex digits follow
    /// the prefix, so the name is always a safe SQL identifier.
    pub fn schema(&self) -> String {
        format!("t_{}", self.0.simple())
    }

    /// The id named by a schema or role name, if it is one.
    pub fn from_schema(name: &str) -> Option<Self> {
        let hex = name.strip_prefix("t_")?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Uuid::parse_str(hex).ok().map(Self))
            .flatten()
    }
}

impl From<Uuid> for TenantId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The parts of a [`Prepared`] statement that sets role and search path to the schema name
/// bound between them, for the transaction (`is_local` `true`) or the session (`false`).
macro_rules! scope_statement {
    ($is_local:literal) => {
        &[
            concat!(
                "SELECT set_config('role', scope.name, ",
                $is_local,
                "), set_config('search_path', scope.name, ",
                $is_local,
                ") FROM (SELECT "
            ),
            "::text AS name) AS scope",
        ]
    };
}

/// The statement that enters a tenant's scope for the rest of the current transaction: the
/// transaction-local forms of `SET ROLE` and `SET search_path`, in one round trip, with the
/// schema name bound as a parameter.
const ENTER_SCOPE: &[&str] = scope_statement!("true");

/// [`ENTER_SCOPE`] for the whole session rather than the transaction.
const ENTER_SESSION: &[&str] = scope_statement!("false");

/// Leaves the tenant scope inside the current transaction (back to the login role).
const LEAVE_SCOPE: &str =
    "SELECT set_config('role', 'none', true), set_config('search_path', '\"$user\", public', true)";

/// The statement [`enter`] runs, for callers that pipeline it with their first queries
/// (it must follow `BEGIN` in the same transaction). Prepared once per connection.
pub fn enter_statement(tenant: &TenantId) -> Prepared<(Bind<Text, String>,)> {
    Prepared::new(ENTER_SCOPE, (bind::<Text, _>(tenant.schema()),))
}

/// Switches the current transaction to `tenant`'s role and schema.
pub async fn enter(conn: &mut AsyncPgConnection, tenant: &TenantId) -> diesel::QueryResult<()> {
    diesel_async::RunQueryDsl::execute(enter_statement(tenant), conn)
        .await
        .map(drop)
}

/// Scopes the whole session on `conn` to `tenant` (role and search path), for a connection
/// that one tenant's task keeps to itself while it works (the messaging committer): its
/// statements can then run each in an implicit transaction of its own, one round trip and
/// one answer each. The scope stays until the connection goes back to its pool, which resets
/// every session setting before anyone else gets it (see [`crate::pool`]).
pub async fn enter_session(conn: &AsyncPgConnection, tenant: &TenantId) -> diesel::QueryResult<()> {
    use diesel_async::RunQueryDsl;
    Prepared::new(ENTER_SESSION, (bind::<Text, _>(tenant.schema()),))
        .execute(&mut &*conn)
        .await
        .map(drop)
}

/// Runs `statements` in a transaction scoped to `tenant` on `conn`, pipelined: `begin`
/// (`BEGIN` or one of its forms), the scope, the statements and `COMMIT` go out together, one
/// round trip once each is prepared on the connection. `statements` must be a future that
/// has not been polled and that sends its queries on its first poll, in order (diesel
/// futures, or a `futures::join!` of them). After any failure the transaction is rolled back
/// and the first error returned; the connection is then ready for the next transaction.
pub async fn pipelined<R>(
    conn: &AsyncPgConnection,
    begin: &'static [&'static str],
    tenant: &TenantId,
    statements: impl Future<Output = diesel::QueryResult<R>>,
) -> diesel::QueryResult<R> {
    use diesel_async::RunQueryDsl;
    // Every statement runs to its end (join, not try_join), so the connection's answers stay
    // in step. After a failed statement, PostgreSQL answers the COMMIT with a rollback.
    let (begun, entered, result, committed) = futures::join!(
        Prepared::text(begin).execute(&mut &*conn),
        enter_statement(tenant).execute(&mut &*conn),
        statements,
        Prepared::text(&["COMMIT"]).execute(&mut &*conn),
    );
    let result = begun
        .and(entered)
        .and(result)
        .and_then(|result| committed.map(|_| result));
    if result.is_err() {
        // Ends whatever is left of the transaction (a no-op when COMMIT ran).
        let _ = Prepared::text(&["ROLLBACK"]).execute(&mut &*conn).await;
    }
    result
}

/// Runs `f` in a transaction scoped to `tenant` on a pooled connection: the only way any
/// service touches tenant data. The scope ends with the transaction; the pool resets the
/// connection before anyone else gets it. `f` returns a boxed future:
/// `|conn| Box::pin(async move { … })`.
pub async fn with_tenant<R, E, F>(pool: &Pool, tenant: &TenantId, f: F) -> Result<R, E>
where
    F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, E>>,
    E: From<diesel::result::Error> + From<Error>,
{
    let mut conn = pool.get().await.map_err(|err| E::from(Error::Pool(err)))?;
    let conn: &mut AsyncPgConnection = &mut conn;
    AnsiTransactionManager::begin_transaction(conn).await?;
    let result = match enter(conn, tenant).await {
        Ok(()) => f(conn).await,
        Err(err) => Err(E::from(err)),
    };
    finish(conn, result).await
}

/// Runs `f` in a transaction on a pooled connection without entering any tenant's scope:
/// the control plane (sessions, the outbox). Same shape as [`with_tenant`].
pub async fn in_transaction<R, E, F>(pool: &Pool, f: F) -> Result<R, E>
where
    F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, E>>,
    E: From<diesel::result::Error> + From<Error>,
{
    let mut conn = pool.get().await.map_err(|err| E::from(Error::Pool(err)))?;
    let conn: &mut AsyncPgConnection = &mut conn;
    AnsiTransactionManager::begin_transaction(conn).await?;
    let result = f(conn).await;
    finish(conn, result).await
}

/// Commits the transaction open on `conn` when `result` is a success, rolls it back
/// otherwise.
async fn finish<R, E>(conn: &mut AsyncPgConnection, result: Result<R, E>) -> Result<R, E>
where
    E: From<diesel::result::Error>,
{
    match result {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn).await?;
            Ok(value)
        }
        Err(err) => {
            // A failed rollback leaves the connection marked broken; the pool discards it.
            let _ = AnsiTransactionManager::rollback_transaction(conn).await;
            Err(err)
        }
    }
}

/// Creates `tenant`'s role and schema, applies every tenant migration and runs `populate`
/// in the tenant's scope — all inside the transaction the caller has open on `conn`, so a
/// rollback leaves nothing behind. Leaves the transaction back in the login role's scope.
pub fn create_schema<E>(
    conn: &mut SyncConnection,
    tenant: &TenantId,
    populate: impl FnOnce(&mut SyncConnection) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<Error>,
{
    let name = tenant.schema();
    conn.batch_execute(&format!(
        "CREATE ROLE {name} NOLOGIN; \
         GRANT {name} TO CURRENT_USER; \
         CREATE SCHEMA {name} AUTHORIZATION {name};"
    ))
    .map_err(Error::from)?;
    crate::outbox::ensure(conn)?;
    conn.batch_execute(&format!("GRANT {} TO {name}", crate::outbox::WRITER_ROLE))
        .map_err(Error::from)?;
    enter_sync(conn, tenant)?;
    conn.run_pending_migrations(TENANT_MIGRATIONS)
        .map_err(|err| Error::Migration(err.to_string()))?;
    populate(conn)?;
    leave_sync(conn)?;
    Ok(())
}

/// Drops `tenant`'s schema in this database with everything in it, then its role, inside
/// the caller's transaction. The schema is dropped as the tenant role (its owner); the login
/// role then drops the role, unless the role still owns or may use something in another
/// database of the cluster (roles are the cluster's: the tenant was restored there, and
/// this is the schema it left behind). Missing schema or role are not errors (a replayed
/// deletion).
pub fn drop_schema(conn: &mut SyncConnection, tenant: &TenantId) -> Result<()> {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let name = tenant.schema();
    if role_exists(conn, &name)? {
        enter_sync(conn, tenant)?;
        conn.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))?;
        leave_sync(conn)?;
        let elsewhere: Found = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_shdepend d JOIN pg_database db ON db.oid = d.dbid \
             WHERE d.refclassid = 'pg_authid'::regclass \
             AND d.refobjid = (SELECT oid FROM pg_roles WHERE rolname = $1) \
             AND db.datname <> current_database()) AS found",
        )
        .bind::<diesel::sql_types::Text, _>(&name)
        .get_result(conn)?;
        if !elsewhere.found {
            conn.batch_execute(&format!("DROP ROLE {name}"))?;
        }
    }
    Ok(())
}

/// Whether a legal hold is in force anywhere in `tenant`'s schema, inside the caller's
/// transaction. Takes a SHARE lock on the schema's `legal_holds` first, so a hold being set
/// at the same moment either committed before (and is seen) or waits until this transaction
/// ends. A tenant without schema has no holds.
pub fn holds_in_force(conn: &mut SyncConnection, tenant: &TenantId) -> Result<bool> {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    if !role_exists(conn, &tenant.schema())? {
        return Ok(false);
    }
    enter_sync(conn, tenant)?;
    conn.batch_execute("LOCK TABLE legal_holds IN SHARE MODE")?;
    let held: Found = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM legal_holds WHERE lifted_at IS NULL) AS found",
    )
    .get_result(conn)?;
    leave_sync(conn)?;
    Ok(held.found)
}

/// Applies pending tenant migrations to `tenant`'s schema, in one transaction; returns the
/// versions applied (none when the schema is current).
pub fn migrate_schema(conn: &mut SyncConnection, tenant: &TenantId) -> Result<Vec<String>> {
    use diesel::Connection;
    conn.transaction(|conn| {
        enter_sync(conn, tenant)?;
        let applied = conn
            .run_pending_migrations(TENANT_MIGRATIONS)
            .map_err(|err| Error::Migration(err.to_string()))?
            .iter()
            .map(ToString::to_string)
            .collect();
        leave_sync(conn)?;
        Ok(applied)
    })
}

/// The versions of every tenant migration this build knows, oldest first.
pub fn known_versions() -> Result<Vec<String>> {
    Ok(MigrationSource::<Pg>::migrations(&TENANT_MIGRATIONS)
        .map_err(|err| Error::Migration(err.to_string()))?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

fn enter_sync(conn: &mut SyncConnection, tenant: &TenantId) -> Result<()> {
    use diesel::RunQueryDsl as _;
    enter_statement(tenant).execute(conn)?;
    Ok(())
}

fn leave_sync(conn: &mut SyncConnection) -> Result<()> {
    use diesel::RunQueryDsl as _;
    diesel::sql_query(LEAVE_SCOPE).execute(conn)?;
    Ok(())
}

fn role_exists(conn: &mut SyncConnection, name: &str) -> Result<bool> {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let row: Found =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS found")
            .bind::<diesel::sql_types::Text, _>(name)
            .get_result(conn)?;
    Ok(row.found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_safe_identifiers_and_round_trip() {
        let id = TenantId::generate();
        let name = id.schema();
        assert_eq!(name.len(), 34);
        assert!(name[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(TenantId::from_schema(&name), Some(id));
        assert_eq!(TenantId::from_schema("t_x; DROP"), None);
        assert_eq!(TenantId::from_schema("public"), None);
    }
}
