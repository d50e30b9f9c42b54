//! Migrations of the control-plane schema `hafen` and of the key store's schema
//! `hafen_keys` (in its own database).
//!
//! Each keeps its own `__diesel_schema_migrations` inside its schema, so the database's
//! `public` schema stays untouched. Runs hold a PostgreSQL advisory lock, so two replicas or a
//! Helm hook and a developer never migrate at the same time.

use diesel::RunQueryDsl;
use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::error::{Error, Result};
use crate::tenancy::SyncConnection;

/// The control-plane migrations, embedded at build time.
pub const CONTROL_PLANE: EmbeddedMigrations = embed_migrations!("migrations/control");

/// The key store's migrations, embedded at build time.
pub const KEYSTORE: EmbeddedMigrations = embed_migrations!("migrations/keystore");

/// Name of the control-plane schema.
pub const CONTROL_SCHEMA: &str = "hafen";

/// Name of the key store's schema.
pub const KEYSTORE_SCHEMA: &str = "hafen_keys";

/// Key of the advisory lock held while migrating (ASCII "hafenmig").
const MIGRATION_LOCK: i64 = 0x6861_6665_6e6d_6967;

/// A schema and the migrations that make it.
struct Set {
    schema: &'static str,
    migrations: fn() -> EmbeddedMigrations,
    what: &'static str,
}

const CONTROL: Set = Set {
    schema: CONTROL_SCHEMA,
    migrations: || CONTROL_PLANE,
    what: "control plane",
};

const KEYS: Set = Set {
    schema: KEYSTORE_SCHEMA,
    migrations: || KEYSTORE,
    what: "key store",
};

/// Applies every pending control-plane migration to the database at `url` and returns the
/// versions applied (empty when already current).
///
/// Runs on the blocking pool: diesel's migration harness is synchronous.
pub async fn migrate_control_plane(url: &str) -> Result<Vec<String>> {
    migrate(url, &CONTROL).await
}

/// Applies every pending key-store migration to the key store at `url` (see
/// [`migrate_control_plane`]).
pub async fn migrate_keystore(url: &str) -> Result<Vec<String>> {
    migrate(url, &KEYS).await
}

/// The control-plane migrations this build has that the database at `url` lacks. Only reads.
pub async fn pending_control_plane(url: &str) -> Result<Vec<String>> {
    pending(url, &CONTROL).await
}

/// The key-store migrations this build has that the key store at `url` lacks. Only reads.
pub async fn pending_keystore(url: &str) -> Result<Vec<String>> {
    pending(url, &KEYS).await
}

/// The control-plane and key-store migrations this build has that the databases `args` names
/// lack (the key store is the main database when `args` names none). Only reads.
pub async fn pending_with_keystore(args: &crate::DatabasesArgs) -> Result<Vec<String>> {
    let main = &args.main.database_url;
    let mut pending = pending_control_plane(main).await?;
    let keystore = args.keystore_url.as_deref().unwrap_or(main);
    pending.extend(
        pending_keystore(keystore)
            .await?
            .into_iter()
            .map(|version| format!("key store {version}")),
    );
    Ok(pending)
}

/// How often a service waiting for migrations looks again.
const MIGRATION_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The migrations still pending after waiting up to `args.main.migration_wait` for them to
/// be applied (by `hafen-tenant migrate`, running beside a rollout): those of the control
/// plane, and of the key store when `keystore`. Empty once there are none.
pub async fn wait_until_migrated(
    args: &crate::DatabasesArgs,
    keystore: bool,
) -> Result<Vec<String>> {
    let until = std::time::Instant::now() + args.main.migration_wait;
    loop {
        let pending = if keystore {
            pending_with_keystore(args).await?
        } else {
            pending_control_plane(&args.main.database_url).await?
        };
        let now = std::time::Instant::now();
        if pending.is_empty() || now >= until {
            return Ok(pending);
        }
        tracing::info!(
            pending = pending.len(),
            "waiting for `hafen-tenant migrate` to apply pending migrations"
        );
        tokio::time::sleep(MIGRATION_POLL.min(until - now)).await;
    }
}

async fn migrate(url: &str, set: &'static Set) -> Result<Vec<String>> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = crate::connect::establish_sync(&url)?;
        conn.batch_execute(&format!(
            "SELECT pg_advisory_lock({MIGRATION_LOCK}); \
             CREATE SCHEMA IF NOT EXISTS {schema}; \
             SET search_path TO {schema};",
            schema = set.schema
        ))?;
        let applied = conn
            .run_pending_migrations((set.migrations)())
            .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|err| Error::Migration(err.to_string()));
        // Closing the connection releases the lock too; unlocking first keeps it short.
        conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
        let applied = applied?;
        if applied.is_empty() {
            tracing::info!(schema = set.what, "already current");
        } else {
            tracing::info!(schema = set.what, versions = ?applied, "migrated");
        }
        Ok(applied)
    })
    .await
    .map_err(|err| Error::Migration(format!("migration task failed: {err}")))?
}

async fn pending(url: &str, set: &'static Set) -> Result<Vec<String>> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = crate::connect::establish_sync(&url)?;
        let table = format!("{}.__diesel_schema_migrations", set.schema);
        let applied: Vec<String> = if has_table(&mut conn, &table)? {
            diesel::sql_query(format!("SELECT version FROM {table}"))
                .load::<AppliedVersion>(&mut conn)?
                .into_iter()
                .map(|row| row.version)
                .collect()
        } else {
            Vec::new()
        };
        let known = MigrationSource::<Pg>::migrations(&(set.migrations)())
            .map_err(|err| Error::Migration(err.to_string()))?;
        Ok(known
            .iter()
            .map(|m| m.name().version().to_string())
            .filter(|version| !applied.contains(version))
            .collect())
    })
    .await
    .map_err(|err| Error::Migration(format!("migration check failed: {err}")))?
}

fn has_table(conn: &mut SyncConnection, table: &str) -> Result<bool> {
    Ok(diesel::select(
        diesel::dsl::sql::<diesel::sql_types::Bool>("to_regclass(")
            .bind::<diesel::sql_types::Text, _>(table)
            .sql(") IS NOT NULL"),
    )
    .get_result(conn)?)
}

/// Moves keys and deletion-log entries that a control plane from before the key store still
/// holds into the key store at `keystore_url` (migrated already), before the control-plane
/// migration that drops their tables runs. Every tenant key was wrapped under master-key
/// version 1 then. Returns how many rows moved; nothing to move is 0.
pub async fn move_keys_to_keystore(main_url: &str, keystore_url: &str) -> Result<u64> {
    let (main_url, keystore_url) = (main_url.to_owned(), keystore_url.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut main = crate::connect::establish_sync(&main_url)?;
        if !has_table(&mut main, "hafen.tenant_keys")? {
            return Ok(0);
        }
        let mut keys = crate::connect::establish_sync(&keystore_url)?;
        let mut moved = 0;
        // Bytes cross as hex text: one statement per table, whatever the two servers are.
        for (select, insert) in [
            (
                "SELECT coalesce(json_agg(json_build_object('t', tenant_id, 'k', \
                 encode(wrapped_key, 'hex'), 'c', created_at)), '[]')::text AS rows \
                 FROM hafen.tenant_keys",
                "INSERT INTO hafen_keys.tenant_keys (tenant_id, key_version, wrapped_key, created_at) \
                 SELECT (r->>'t')::uuid, 1, decode(r->>'k', 'hex'), (r->>'c')::timestamptz \
                 FROM json_array_elements($1::json) r ON CONFLICT DO NOTHING",
            ),
            (
                "SELECT coalesce(json_agg(json_build_object('t', tenant_id, 'u', user_id, 'k', \
                 encode(wrapped_key, 'hex'), 'c', created_at)), '[]')::text AS rows \
                 FROM hafen.user_keys",
                "INSERT INTO hafen_keys.user_keys (tenant_id, user_id, wrapped_key, created_at) \
                 SELECT (r->>'t')::uuid, (r->>'u')::uuid, decode(r->>'k', 'hex'), \
                 (r->>'c')::timestamptz FROM json_array_elements($1::json) r \
                 ON CONFLICT DO NOTHING",
            ),
            (
                "SELECT coalesce(json_agg(json_build_object('i', id, 'k', kind, 't', tenant_id, \
                 'u', user_id, 'd', deleted_at)), '[]')::text AS rows FROM hafen.deletion_log",
                "INSERT INTO hafen_keys.deletion_log (id, kind, tenant_id, user_id, deleted_at) \
                 SELECT (r->>'i')::uuid, r->>'k', (r->>'t')::uuid, (r->>'u')::uuid, \
                 (r->>'d')::timestamptz FROM json_array_elements($1::json) r \
                 ON CONFLICT DO NOTHING",
            ),
        ] {
            #[derive(diesel::QueryableByName)]
            struct Rows {
                #[diesel(sql_type = diesel::sql_types::Text)]
                rows: String,
            }
            let rows: Rows = diesel::sql_query(select).get_result(&mut main)?;
            moved += diesel::sql_query(insert)
                .bind::<diesel::sql_types::Text, _>(&rows.rows)
                .execute(&mut keys)? as u64;
        }
        tracing::info!(rows = moved, "keys and deletion log moved to the key store");
        Ok(moved)
    })
    .await
    .map_err(|err| Error::Migration(format!("moving keys failed: {err}")))?
}

#[derive(diesel::QueryableByName)]
struct AppliedVersion {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}
