//! Migrations of the control-plane schema `hafen`.
//!
//! The control plane keeps its own `__diesel_schema_migrations` inside `hafen`, so the
//! database's `public` schema stays untouched. Runs hold a PostgreSQL advisory lock, so two
//! replicas or a Helm hook and a developer never migrate at the same time.

use diesel::RunQueryDsl;
use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::error::{Error, Result};

/// The control-plane migrations, embedded at build time.
pub const CONTROL_PLANE: EmbeddedMigrations = embed_migrations!("migrations/control");

/// Name of the control-plane schema.
pub const CONTROL_SCHEMA: &str = "hafen";

/// Key of the advisory lock held while migrating (ASCII "hafenmig").
const MIGRATION_LOCK: i64 = 0x6861_6665_6e6d_6967;

/// Applies every pending control-plane migration to the database at `url` and returns the
/// versions applied (empty when already current).
///
/// Runs on the blocking pool: diesel's migration harness is synchronous.
pub async fn migrate_control_plane(url: &str) -> Result<Vec<String>> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = crate::connect::establish_sync(&url)?;
        conn.batch_execute(&format!(
            "SELECT pg_advisory_lock({MIGRATION_LOCK}); \
             CREATE SCHEMA IF NOT EXISTS {CONTROL_SCHEMA}; \
             SET search_path TO {CONTROL_SCHEMA};"
        ))?;
        let applied = conn
            .run_pending_migrations(CONTROL_PLANE)
            .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|err| Error::Migration(err.to_string()));
        // Closing the connection releases the lock too; unlocking first keeps it short.
        conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
        let applied = applied?;
        if applied.is_empty() {
            tracing::info!("control plane already current");
        } else {
            tracing::info!(versions = ?applied, "control plane migrated");
        }
        Ok(applied)
    })
    .await
    .map_err(|err| Error::Migration(format!("migration task failed: {err}")))?
}

/// The control-plane migrations this build has that the database at `url` lacks. Only reads.
pub async fn pending_control_plane(url: &str) -> Result<Vec<String>> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = crate::connect::establish_sync(&url)?;
        let table = format!("{CONTROL_SCHEMA}.__diesel_schema_migrations");
        let has_table: bool = diesel::select(
            diesel::dsl::sql::<diesel::sql_types::Bool>("to_regclass(")
                .bind::<diesel::sql_types::Text, _>(&table)
                .sql(") IS NOT NULL"),
        )
        .get_result(&mut conn)?;
        let applied: Vec<String> = if has_table {
            diesel::sql_query(format!("SELECT version FROM {table}"))
                .load::<AppliedVersion>(&mut conn)?
                .into_iter()
                .map(|row| row.version)
                .collect()
        } else {
            Vec::new()
        };
        let known = MigrationSource::<Pg>::migrations(&CONTROL_PLANE)
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

#[derive(diesel::QueryableByName)]
struct AppliedVersion {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}
