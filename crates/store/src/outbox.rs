//! The audit outbox table, `hafen.outbox` (BX6), on every database that holds tenant
//! schemas: a tenant's transaction writes its audit events there, so they commit or roll back
//! with the change they record. Tenant roles insert through the group role [`WRITER_ROLE`]
//! and cannot read it. Writing and relaying events is `hafen_events`'s work.

use diesel::connection::SimpleConnection;

use crate::error::Result;
use crate::tenancy::SyncConnection;

/// The group role every tenant role belongs to: INSERT on `hafen.outbox`, nothing else.
pub const WRITER_ROLE: &str = "hafen_outbox_writer";

/// Creates `hafen.outbox` and [`WRITER_ROLE`] where they are missing (a placement database;
/// the main database has them from the control-plane migrations). Does nothing, and takes no
/// lock, when the table exists.
pub fn ensure(conn: &mut SyncConnection) -> Result<()> {
    conn.batch_execute(
        "DO $$
         BEGIN
             IF to_regclass('hafen.outbox') IS NULL THEN
                 CREATE SCHEMA IF NOT EXISTS hafen;
                 CREATE TABLE hafen.outbox (
                     id         uuid PRIMARY KEY,
                     tenant_id  uuid,
                     event      bytea NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now()
                 );
                 BEGIN
                     CREATE ROLE hafen_outbox_writer NOLOGIN;
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                 END;
                 GRANT USAGE ON SCHEMA hafen TO hafen_outbox_writer;
                 GRANT INSERT ON hafen.outbox TO hafen_outbox_writer;
             END IF;
         END $$;",
    )?;
    Ok(())
}
